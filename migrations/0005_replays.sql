-- Replays started by `outbox-relay replay`. The selection is frozen into {{replay_items}} when
-- the replay starts, numbered in outbox order (`ord`); `last_ord` is the last item the broker
-- confirmed. An interrupted replay resumes after `last_ord`, so what already went is not sent
-- twice. Items are deleted when the replay finishes; the summary row is kept.
CREATE TABLE IF NOT EXISTS {{replays}} (
    replay_id   text        PRIMARY KEY,
    selection   text        NOT NULL,
    -- Topic template (Kafka) or exchange (RabbitMQ) given with --topic/--exchange; NULL: the
    -- configured destination.
    destination text,
    total       bigint      NOT NULL,
    sent        bigint      NOT NULL DEFAULT 0,
    -- Items whose row was deleted (purge, retention) before it could be sent.
    skipped     bigint      NOT NULL DEFAULT 0,
    last_ord    bigint      NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS {{replay_items}} (
    replay_id text   NOT NULL REFERENCES {{replays}} (replay_id) ON DELETE CASCADE,
    ord       bigint NOT NULL,
    event_id  text   NOT NULL,
    PRIMARY KEY (replay_id, ord)
);
