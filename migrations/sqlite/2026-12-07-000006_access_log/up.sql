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
CREATE TABLE phi_access_chains (
    chain        VARCHAR(64)  NOT NULL PRIMARY KEY,
    head         BIGINT       NOT NULL,
    head_hash    BLOB         NOT NULL,
    updated_at   TIMESTAMP    NOT NULL
);

CREATE TABLE phi_access_batches (
    chain          VARCHAR(64)  NOT NULL,
    id             BIGINT       NOT NULL,
    kind           VARCHAR(16)  NOT NULL,
    written_at     TIMESTAMP    NOT NULL,
    last_at        TIMESTAMP    NOT NULL,
    records        BIGINT       NOT NULL,
    key_version    BIGINT       NOT NULL,
    prev_hash      BLOB         NOT NULL,
    hash           BLOB         NOT NULL,
    pruned_before  BIGINT,
    pruned_hash    BLOB,
    detail         TEXT,
    PRIMARY KEY (chain, id)
);
CREATE INDEX phi_access_batches_last_at ON phi_access_batches (chain, last_at);

CREATE TABLE phi_access_log (
    chain        VARCHAR(64)  NOT NULL,
    batch        BIGINT       NOT NULL,
    seq          INTEGER      NOT NULL,
    occurred_at  TIMESTAMP    NOT NULL,
    user_id      VARCHAR(255) NOT NULL,
    purpose      VARCHAR(255) NOT NULL,
    request_id   VARCHAR(255),
    op           VARCHAR(16)  NOT NULL,
    owner_id     VARCHAR(255) NOT NULL,
    table_name   VARCHAR(255) NOT NULL,
    row_key      VARCHAR(255),
    fields       TEXT         NOT NULL,
    PRIMARY KEY (chain, batch, seq)
);
CREATE INDEX phi_access_log_owner ON phi_access_log (owner_id, occurred_at);
CREATE INDEX phi_access_log_user ON phi_access_log (user_id, occurred_at);
CREATE INDEX phi_access_log_row ON phi_access_log (table_name, row_key);
CREATE INDEX phi_access_log_occurred ON phi_access_log (occurred_at);
