DROP TABLE encryption_key_audit;
DROP TABLE user_encryption_keys;
