-- Wakes the polling publisher as soon as a transaction that wrote events commits (NOTIFY is
-- delivered at commit; one per statement, and Postgres folds duplicates within a transaction).
CREATE OR REPLACE FUNCTION {{notify_function}}() RETURNS trigger
LANGUAGE plpgsql AS $relay$
BEGIN
    PERFORM pg_notify('{{channel}}', '');
    RETURN NULL;
END
$relay$;

DROP TRIGGER IF EXISTS relay_notify ON {{table}};
CREATE TRIGGER relay_notify AFTER INSERT ON {{table}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{notify_function}}();
