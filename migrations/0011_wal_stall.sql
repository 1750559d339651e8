-- What the active log-tailing relay found when its stream stalled (connected, the server's WAL
-- moving, nothing sent to it), and since when; NULL while it streams. `outbox-relay status`
-- shows it.
ALTER TABLE {{wal_progress}} ADD COLUMN IF NOT EXISTS stall text;
ALTER TABLE {{wal_progress}} ADD COLUMN IF NOT EXISTS stall_since timestamptz;
