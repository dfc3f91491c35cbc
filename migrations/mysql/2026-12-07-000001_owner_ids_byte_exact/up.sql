-- Owner ids, and the other identifiers phi's tables compare by equality
-- (KEK ids, roll-out policy names, feed reader names), compare byte for
-- byte, with no padding.
--
-- Until now these columns were VARCHAR in utf8mb4_bin, a PAD SPACE
-- collation: trailing spaces are ignored when comparing, so 'acme' and
-- 'acme ' were equal, primary keys included. A seal for owner 'acme ' then
-- loaded, or (its insert taken as a lost race) used, owner 'acme''s data
-- keys, and shredding 'acme ' destroyed 'acme''s.
--
-- The choice: VARBINARY. It compares bytes, pads nothing and strips nothing,
-- on every MySQL and MariaDB version, and a comparison with a text value or
-- a column of any collation is a binary one. A NO PAD binary collation
-- would do the same, but it has no common name: MariaDB (>= 10.2) has
-- utf8mb4_nopad_bin, MySQL (>= 8.0.17) utf8mb4_0900_bin, MySQL 5.7 neither.
-- phi reads and writes these columns as Diesel `Text` all the same:
-- Diesel's MySQL `FromSql<Text>` takes the column's bytes and checks they
-- are UTF-8, whatever the column's type, and a bound text value is stored
-- as its UTF-8 bytes. (`diesel print-schema` would print them as binary:
-- phi's tables are left out of an application's schema, see
-- phi_types::migrations; phi_types::schema declares them as text.)
--
-- Each column keeps its byte capacity: VARCHAR(255) in utf8mb4 holds up to
-- 1020 bytes, VARCHAR(64) up to 256, so no stored value can be cut.
-- ALTER TABLE ... MODIFY copies each table (writes to it wait meanwhile):
-- encryption_key_audit may be large, run this where a copy of it is
-- acceptable.
ALTER TABLE user_encryption_keys
    MODIFY owner_id VARBINARY(1020) NOT NULL,
    MODIFY kek_id   VARBINARY(1020) NOT NULL;

ALTER TABLE encryption_key_audit
    MODIFY owner_id VARBINARY(1020) NOT NULL;

ALTER TABLE kek_check_values
    MODIFY kek_id VARBINARY(1020) NOT NULL;

ALTER TABLE phi_key_events
    MODIFY owner_id VARBINARY(1020) NULL;

ALTER TABLE phi_rollout
    MODIFY policy VARBINARY(256) NOT NULL;

ALTER TABLE phi_rollout_owners
    MODIFY policy   VARBINARY(256)  NOT NULL,
    MODIFY owner_id VARBINARY(1020) NOT NULL;

ALTER TABLE phi_feed_readers
    MODIFY reader VARBINARY(1020) NOT NULL;
