-- Back to utf8mb4_bin (PAD SPACE: 'acme' = 'acme ' again).
ALTER TABLE deleted_cases MODIFY user_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE cases MODIFY user_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
