-- Event kinds are open: a newer build may append kinds this schema's
-- version of phi does not know, and older keyrings apply them
-- conservatively (they drop the named owner's cached keys, or every
-- owner's). The CHECK listing today's kinds is replaced by one that only
-- refuses an empty kind; phi checks the kinds it writes.
--
-- The old CHECK was unnamed (PostgreSQL called it phi_key_events_kind_check
-- unless the table was created otherwise): every CHECK on the kind column
-- is dropped by its real name, found in the catalog.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT con.conname
        FROM pg_constraint con
        JOIN pg_attribute att
          ON att.attrelid = con.conrelid AND att.attnum = ANY (con.conkey)
        WHERE con.conrelid = 'phi_key_events'::regclass
          AND con.contype = 'c'
          AND att.attname = 'kind'
    LOOP
        EXECUTE format('ALTER TABLE phi_key_events DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;
ALTER TABLE phi_key_events ADD CONSTRAINT phi_key_events_kind_not_empty CHECK (kind <> '');
