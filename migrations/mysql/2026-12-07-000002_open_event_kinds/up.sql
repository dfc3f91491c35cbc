-- Event kinds are open: a newer build may append kinds this schema's
-- version of phi does not know, and older keyrings apply them
-- conservatively (they drop the named owner's cached keys, or every
-- owner's). The CHECK listing today's kinds is replaced by one that only
-- refuses an empty kind; phi checks the kinds it writes.
--
-- The old CHECK was written on the column and left unnamed; servers keep
-- it differently:
-- - MariaDB keeps it as part of the column (information_schema shows it
--   named `kind`, LEVEL 'Column'), and DROP CONSTRAINT cannot reach it:
--   redefining the column without it removes it;
-- - MySQL 8.0.16+ keeps it as a table constraint named
--   `phi_key_events_chk_1` (or another number): it is found in
--   information_schema by its clause and dropped by its real name;
-- - MySQL before 8.0.16 never stored it: nothing to drop.
ALTER TABLE phi_key_events MODIFY kind VARCHAR(16) NOT NULL;
SET @phi_drop_kind_check = (
    SELECT CONCAT(
        'ALTER TABLE phi_key_events ',
        IF(VERSION() LIKE '%MariaDB%', 'DROP CONSTRAINT', 'DROP CHECK'),
        ' `', REPLACE(tc.CONSTRAINT_NAME, '`', '``'), '`'
    )
    FROM information_schema.TABLE_CONSTRAINTS tc
    JOIN information_schema.CHECK_CONSTRAINTS cc
      ON cc.CONSTRAINT_SCHEMA = tc.CONSTRAINT_SCHEMA
     AND cc.CONSTRAINT_NAME = tc.CONSTRAINT_NAME
    WHERE tc.TABLE_SCHEMA = DATABASE()
      AND tc.TABLE_NAME = 'phi_key_events'
      AND tc.CONSTRAINT_TYPE = 'CHECK'
      AND cc.CHECK_CLAUSE LIKE '%kind%'
      AND cc.CHECK_CLAUSE LIKE '%rollout%'
    LIMIT 1
);
SET @phi_drop_kind_check = COALESCE(@phi_drop_kind_check, 'DO 0');
PREPARE phi_drop_kind_check FROM @phi_drop_kind_check;
EXECUTE phi_drop_kind_check;
DEALLOCATE PREPARE phi_drop_kind_check;
SET @phi_drop_kind_check = NULL;
ALTER TABLE phi_key_events ADD CONSTRAINT phi_key_events_kind_not_empty CHECK (kind <> '');
