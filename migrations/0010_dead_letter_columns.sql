-- Dead letters keep what a template may route by: the other columns of the row that topic,
-- key or routing-key templates name (`{tenant}`), as a JSON object of their text values, so
-- that a retried dead letter goes where the original event would have gone. The payload may
-- be NULL: a row of a table whose payload allows NULL is dead-lettered unless it becomes a
-- Kafka tombstone (kafka.tombstone_on_null_payload).
ALTER TABLE {{dead_letters}} ADD COLUMN IF NOT EXISTS columns jsonb;
ALTER TABLE {{dead_letters}} ALTER COLUMN payload DROP NOT NULL;
