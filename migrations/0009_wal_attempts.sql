-- Publish attempts of events that failed, in wal mode (the outbox table has no bookkeeping
-- there), so that a restart does not give a failing event a fresh set of attempts before it
-- is dead-lettered. A row lives until its event is published or dead-lettered; rows left by
-- an instance that died are deleted a day after their last attempt.
CREATE TABLE IF NOT EXISTS {{wal_attempts}} (
    event_id   text        PRIMARY KEY,
    attempts   integer     NOT NULL,
    last_error text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
