-- Poll mode keeps its outbox healthy under sustained load. Every published row is updated
-- once (relay_published_at is in the pending index's predicate, so that update is never HOT:
-- each leaves a dead tuple and new index entries) and deleted after the retention.
-- Postgres's defaults vacuum a table once 20 % of it is dead and analyze it once 10 % changed:
-- on an outbox that keeps a day of events that is millions of dead rows, and statistics that
-- describe an empty table long after a backlog was committed. Vacuum at 2 % and analyze at
-- 1 % instead (plus 1,000 rows, so a small table is not vacuumed all the time). A table that
-- already has autovacuum settings of its own keeps them.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_class c, unnest(coalesce(c.reloptions, '{}')) AS o(opt)
        WHERE c.oid = '{{table}}'::regclass AND o.opt LIKE 'autovacuum%'
    ) THEN
        ALTER TABLE {{table}} SET (
            autovacuum_vacuum_scale_factor = 0.02,
            autovacuum_vacuum_threshold = 1000,
            autovacuum_vacuum_insert_scale_factor = 0.02,
            autovacuum_vacuum_insert_threshold = 1000,
            autovacuum_analyze_scale_factor = 0.01,
            autovacuum_analyze_threshold = 1000
        );
    END IF;
END $$;
