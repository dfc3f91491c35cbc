-- Values sealed per data key version, counted by every process that seals
-- and added here at most once per feed interval (and when a keyring is
-- flushed or dropped): a count may run behind, never backwards. Against
-- envelope v1's random-nonce budget (2^32 seals per version).
CREATE TABLE phi_seal_counts (
    owner_id     VARCHAR(255) NOT NULL,
    version      BIGINT       NOT NULL,
    seals        BIGINT       NOT NULL,
    updated_at   TIMESTAMP    NOT NULL,
    PRIMARY KEY (owner_id, version)
);
