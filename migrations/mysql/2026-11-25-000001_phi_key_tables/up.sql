-- One row per (owner, data key version); the key itself only ever wrapped.
CREATE TABLE user_encryption_keys (
    owner_id     VARCHAR(255)   NOT NULL,
    version      BIGINT         NOT NULL CHECK (version BETWEEN 1 AND 4294967295),
    kek_id       VARCHAR(255)   NOT NULL,
    wrapped_key  VARBINARY(2048) NOT NULL,
    state        VARCHAR(16)    NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retired', 'destroyed')),
    created_at   DATETIME(6)    NOT NULL,
    updated_at   DATETIME(6)    NOT NULL,
    PRIMARY KEY (owner_id, version),
    INDEX user_encryption_keys_kek_id (kek_id)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- Every key operation; never key bytes, never plaintext.
CREATE TABLE encryption_key_audit (
    id           BIGINT         NOT NULL AUTO_INCREMENT PRIMARY KEY,
    occurred_at  DATETIME(6)    NOT NULL,
    owner_id     VARCHAR(255)   NOT NULL,
    action       VARCHAR(16)    NOT NULL,
    key_version  BIGINT,
    kek_id       VARCHAR(255),
    actor        VARCHAR(255)   NOT NULL,
    detail       TEXT,
    INDEX encryption_key_audit_owner (owner_id, occurred_at)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
