-- Nothing to change on PostgreSQL: owner ids (and KEK ids, policy and
-- reader names) are VARCHAR under the database's default, deterministic
-- collation, whose equality is byte for byte and pads nothing ('acme' <>
-- 'acme '; only a nondeterministic ICU collation, never used here, could
-- make two different strings equal). The version exists on every backend so
-- that the three lists stay one; the MySQL / MariaDB migration of the same
-- version is the one that changes columns. (tests/suite/key_store.rs checks
-- the comparison on every backend.)
SELECT 1;
