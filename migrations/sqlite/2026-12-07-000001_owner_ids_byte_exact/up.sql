-- Nothing to change on SQLite: owner ids (and KEK ids, policy and reader
-- names) are TEXT with SQLite's default BINARY collation, which compares
-- bytes with memcmp and pads nothing ('acme' <> 'acme '). The version
-- exists on every backend so that the three lists stay one; the MySQL /
-- MariaDB migration of the same version is the one that changes columns.
-- (tests/suite/key_store.rs checks the comparison on every backend.)
SELECT 1;
