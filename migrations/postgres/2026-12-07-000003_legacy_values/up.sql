-- Values recorded as legacy ciphertexts (Fernet tokens, `v1:` texts) before
-- phi's writers ran: the only flag-off values the backfill decodes, and
-- only in the same table, column and row, for the same owner, with exactly
-- these bytes (see phi_types::legacy). Filled by the generated adoption
-- migrations (which create the table too, where phi's key tables are in
-- another database: hence IF NOT EXISTS) and by `phi migration
-- record-legacy`; a record is deleted by the backfill batch that seals its row.
CREATE TABLE IF NOT EXISTS phi_legacy_values (table_name VARCHAR(128) NOT NULL, column_name VARCHAR(64) NOT NULL, row_key VARCHAR(255) NOT NULL, owner_id VARCHAR(255) NOT NULL, stored BYTEA NOT NULL, recorded_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'), PRIMARY KEY (table_name, column_name, row_key));
