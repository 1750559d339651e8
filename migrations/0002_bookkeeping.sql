-- The relay's bookkeeping (poll mode). relay_seq is the outbox order: assigned at insert, so
-- rows may commit out of relay_seq order; the relay reads every unpublished row, never a
-- watermark, so a late commit is never skipped.
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS relay_seq bigint GENERATED ALWAYS AS IDENTITY;
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS relay_published_at timestamptz;
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS relay_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS relay_last_error text;

-- What the relay reads: unpublished rows in outbox order.
CREATE INDEX IF NOT EXISTS {{table_name}}_relay_pending_idx
    ON {{table}} (relay_seq) WHERE relay_published_at IS NULL;
-- What retention cleanup deletes.
CREATE INDEX IF NOT EXISTS {{table_name}}_relay_published_idx
    ON {{table}} (relay_published_at) WHERE relay_published_at IS NOT NULL;
