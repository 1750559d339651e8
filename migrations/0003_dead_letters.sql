-- Events the broker refused permanently, with the error. While a dead letter holds its
-- aggregate, later events of that aggregate wait in the outbox (order is preserved).
CREATE TABLE IF NOT EXISTS {{dead_letters}} (
    event_id        text        PRIMARY KEY,
    relay_seq       bigint      NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    payload         bytea       NOT NULL,
    headers         text,
    traceparent     text,
    tracestate      text,
    created_at      timestamptz,
    error           text        NOT NULL,
    attempts        integer     NOT NULL,
    holds_aggregate boolean     NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT now(),
    -- Order in which events were dead-lettered (retry sends them back in this order).
    position        bigint      GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX IF NOT EXISTS {{dead_letters_name}}_held_idx
    ON {{dead_letters}} (aggregate_type, aggregate_id) WHERE holds_aggregate;
