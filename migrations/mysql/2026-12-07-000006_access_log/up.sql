-- The access log: who read or wrote which owner's record (one row per
-- accessor, operation, owner, table and row; field names, never values),
-- written in batches by phi_types::access_log::DieselAccessLog.
--
-- Tamper evidence: each batch of a chain carries an HMAC-SHA256 over its
-- records and the previous batch's hash, under a key derived from a data
-- key of the reserved owner `phi:access-log` (so from the KEK): the
-- construction is documented in phi_types::access_log. `phi audit verify`
-- walks it; `phi audit prune` removes old batches and appends a checkpoint
-- batch that carries the hash the kept batches follow.
--
-- phi_access_chains: one row per chain (default `default`): its head, the
-- id and hash of its last batch. Appenders update it first, so its row
-- lock orders them.
--
-- Identifiers are VARBINARY (compared byte for byte, as the owner ids of
-- 2026-12-07-000001_owner_ids_byte_exact); phi bounds each to 255 bytes.
CREATE TABLE phi_access_chains (
    chain        VARBINARY(256)  NOT NULL PRIMARY KEY,
    head         BIGINT          NOT NULL,
    head_hash    VARBINARY(64)   NOT NULL,
    updated_at   DATETIME(6)     NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE phi_access_batches (
    chain          VARBINARY(256)  NOT NULL,
    id             BIGINT          NOT NULL,
    kind           VARCHAR(16)     NOT NULL,
    written_at     DATETIME(6)     NOT NULL,
    last_at        DATETIME(6)     NOT NULL,
    records        BIGINT          NOT NULL,
    key_version    BIGINT          NOT NULL,
    prev_hash      VARBINARY(64)   NOT NULL,
    hash           VARBINARY(64)   NOT NULL,
    pruned_before  BIGINT,
    pruned_hash    VARBINARY(64),
    detail         TEXT,
    PRIMARY KEY (chain, id),
    INDEX phi_access_batches_last_at (chain, last_at)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE phi_access_log (
    chain        VARBINARY(256)  NOT NULL,
    batch        BIGINT          NOT NULL,
    seq          INTEGER         NOT NULL,
    occurred_at  DATETIME(6)     NOT NULL,
    user_id      VARBINARY(255)  NOT NULL,
    purpose      VARBINARY(255)  NOT NULL,
    request_id   VARBINARY(255),
    op           VARCHAR(16)     NOT NULL,
    owner_id     VARBINARY(1020) NOT NULL,
    table_name   VARBINARY(255)  NOT NULL,
    row_key      VARBINARY(255),
    fields       TEXT            NOT NULL,
    PRIMARY KEY (chain, batch, seq),
    INDEX phi_access_log_owner (owner_id, occurred_at),
    INDEX phi_access_log_user (user_id, occurred_at),
    INDEX phi_access_log_row (table_name, row_key),
    INDEX phi_access_log_occurred (occurred_at)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
