-- The least-privileged role for `outbox-relay run` (and the operator commands).
--
-- Run as the owner of the outbox (the role that ran `outbox-relay migrate`), after migrate.
-- Set the psql variables (names of the default set-up shown):
--   psql -v relay_role=outbox_relay -v relay_password=... -v outbox=outbox \
--        -v dead_letters=outbox_dead_letters -v replays=outbox_replays \
--        -v replay_items=outbox_replay_items -v progress=outbox_relay_progress \
--        -v attempts=outbox_relay_attempts \
--        -f docs/least-privilege.sql
--
-- REPLICATION is needed in wal mode only (the slot and the stream); poll mode works without it.
-- The relay never needs CREATE, ownership, or any right on the service's other tables.

CREATE ROLE :"relay_role" LOGIN PASSWORD :'relay_password' REPLICATION;

GRANT USAGE ON SCHEMA public TO :"relay_role";

-- Poll: read pending rows, mark them published, delete past retention and when dead-lettering.
-- Wal: read the table's shape at start-up; retention cleanup deletes old rows.
GRANT SELECT, UPDATE, DELETE ON :"outbox" TO :"relay_role";

-- Dead letters: written by the daemon, listed / retried / discarded by the operator commands.
GRANT SELECT, INSERT, UPDATE, DELETE ON :"dead_letters" TO :"relay_role";

-- Wal: where log tailing got to, to repair a lost slot from the table.
GRANT SELECT, INSERT, UPDATE ON :"progress" TO :"relay_role";

-- Wal: publish attempts of failing events, so a restart does not start them again.
GRANT SELECT, INSERT, UPDATE, DELETE ON :"attempts" TO :"relay_role";

-- Operator commands only (`replay` progress; `dead-letters retry` in poll mode re-inserts rows).
GRANT INSERT ON :"outbox" TO :"relay_role";
GRANT SELECT, INSERT, UPDATE, DELETE ON :"replays", :"replay_items" TO :"relay_role";
