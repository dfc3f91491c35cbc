-- Back to VARCHAR in utf8mb4_bin (PAD SPACE: 'acme' = 'acme ' again).
-- Fails on a primary key that would then hold two equal values (owners
-- 'acme' and 'acme ' both with a key row, say): merge or remove one first.
ALTER TABLE phi_feed_readers
    MODIFY reader VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;

ALTER TABLE phi_rollout_owners
    MODIFY policy   VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY owner_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;

ALTER TABLE phi_rollout
    MODIFY policy VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;

ALTER TABLE phi_key_events
    MODIFY owner_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL;

ALTER TABLE kek_check_values
    MODIFY kek_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;

ALTER TABLE encryption_key_audit
    MODIFY owner_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;

ALTER TABLE user_encryption_keys
    MODIFY owner_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    MODIFY kek_id   VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
