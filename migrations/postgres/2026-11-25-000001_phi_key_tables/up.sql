-- One row per (owner, data key version); the key itself only ever wrapped.
CREATE TABLE user_encryption_keys (
    owner_id     VARCHAR(255) NOT NULL,
    version      BIGINT       NOT NULL CHECK (version BETWEEN 1 AND 4294967295),
    kek_id       VARCHAR(255) NOT NULL,
    wrapped_key  BYTEA        NOT NULL,
    state        VARCHAR(16)  NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at   TIMESTAMP    NOT NULL,
    updated_at   TIMESTAMP    NOT NULL,
    PRIMARY KEY (owner_id, version)
);
CREATE INDEX user_encryption_keys_kek_id ON user_encryption_keys (kek_id);

-- Every key operation; never key bytes, never plaintext.
CREATE TABLE encryption_key_audit (
    id           BIGSERIAL    PRIMARY KEY,
    occurred_at  TIMESTAMP    NOT NULL,
    owner_id     VARCHAR(255) NOT NULL,
    action       VARCHAR(16)  NOT NULL,
    key_version  BIGINT,
    kek_id       VARCHAR(255),
    actor        VARCHAR(255) NOT NULL,
    detail       TEXT
);
CREATE INDEX encryption_key_audit_owner ON encryption_key_audit (owner_id, occurred_at);
