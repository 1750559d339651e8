-- Dead letters keep the payload's exact bytes: a bytea outbox payload may hold bytes that are
-- not UTF-8 (or a NUL byte, which a text column refuses). Tables made by an earlier
-- 0003_dead_letters had a text column: convert it.
DO $$
BEGIN
    IF (SELECT format_type(a.atttypid, a.atttypmod)
          FROM pg_attribute a
         WHERE a.attrelid = '{{dead_letters}}'::regclass
           AND a.attname = 'payload' AND NOT a.attisdropped) <> 'bytea' THEN
        ALTER TABLE {{dead_letters}}
            ALTER COLUMN payload TYPE bytea USING convert_to(payload, 'UTF8');
    END IF;
END
$$;
