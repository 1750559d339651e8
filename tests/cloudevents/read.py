#!/usr/bin/env python3
"""Reads messages the relay wrote with the official CloudEvents SDK (PyPI `cloudevents` 2.2,
its Kafka and RabbitMQ protocol bindings), for the end-to-end tests in tests/formats.rs.

stdin: a JSON list of messages as a consumer received them:
  {"broker": "kafka" | "rabbitmq", "headers": {name: text}, "key": text | null,
   "content_type": text | null (RabbitMQ's property), "body_hex": hex}
stdout: a JSON list, one entry per message: the event's attributes (time as RFC 3339) and
  its data, or {"error": ...} when the SDK refuses the message.
"""
import json
import sys

from cloudevents.core.bindings import kafka, rabbitmq
from cloudevents.core.formats.json import JSONFormat


def read(m):
    body = bytes.fromhex(m["body_hex"])
    if m["broker"] == "kafka":
        message = kafka.KafkaMessage(
            headers={k: v.encode() for k, v in m["headers"].items()},
            key=m["key"],
            value=body,
        )
        event = kafka.from_kafka(message, JSONFormat())
    else:
        message = rabbitmq.RabbitMQMessage(
            headers=m["headers"], content_type=m["content_type"], body=body
        )
        event = rabbitmq.from_rabbitmq(message, JSONFormat())
    attributes = {
        k: (v.isoformat() if hasattr(v, "isoformat") else v)
        for k, v in event.get_attributes().items()
    }
    return {"attributes": attributes, "data": event.get_data()}


def main():
    out = []
    for m in json.load(sys.stdin):
        try:
            out.append(read(m))
        except Exception as e:  # the test reports what the SDK refused
            out.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
