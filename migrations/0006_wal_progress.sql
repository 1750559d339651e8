-- Where log tailing got to (wal mode), so that a lost slot — invalidated by
-- max_slot_wal_keep_size, dropped by an operator, or missing after a restore from backup — is
-- repaired by publishing the gap from the table instead of silently skipping it.
CREATE TABLE IF NOT EXISTS {{wal_progress}} (
    slot_name     text        PRIMARY KEY,
    confirmed_lsn pg_lsn      NOT NULL,
    -- Commit time of the newest transaction confirmed (or the time of an idle advance).
    commit_time   timestamptz NOT NULL,
    -- Set while a repair is publishing rows created since this time; cleared when done.
    backfill_from timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The cluster the position belongs to: a copy of the database in another cluster (dump and
-- restore, logical copy) carries this row along, and its LSN means nothing there.
ALTER TABLE {{wal_progress}} ADD COLUMN IF NOT EXISTS system_identifier text;
