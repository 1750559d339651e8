-- Poll mode keeps its outbox healthy under sustained load. Every published row is updated
-- once (relay_published_at is in the pending index's predicate, so that update is never HOT:
-- each leaves a dead tuple and new index entries) and deleted after the retention.
-- Postgres's defaults vacuum a table once 20 % of it is dead and analyze it once 10 % changed:
-- on a large outbox that is millions of dead rows, and statistics that describe an empty
-- table long after a backlog was committed. Vacuum and analyze after a fixed number of
-- changes instead, and let vacuum run unthrottled on this one table. A table that already
-- has autovacuum settings of its own keeps them.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_class c, unnest(coalesce(c.reloptions, '{}')) AS o(opt)
        WHERE c.oid = '{{table}}'::regclass AND o.opt LIKE 'autovacuum%'
    ) THEN
        ALTER TABLE {{table}} SET (
            autovacuum_vacuum_scale_factor = 0,
            autovacuum_vacuum_threshold = 20000,
            autovacuum_vacuum_insert_scale_factor = 0,
            autovacuum_vacuum_insert_threshold = 20000,
            autovacuum_analyze_scale_factor = 0,
            autovacuum_analyze_threshold = 20000,
            autovacuum_vacuum_cost_delay = 0
        );
    END IF;
END $$;
