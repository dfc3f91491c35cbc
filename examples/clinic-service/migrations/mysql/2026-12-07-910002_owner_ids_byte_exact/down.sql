-- Back to utf8mb4_bin (PAD SPACE: 'acme' = 'acme ' again).
ALTER TABLE service_cases_plain MODIFY provider_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
ALTER TABLE service_cases MODIFY provider_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL;
