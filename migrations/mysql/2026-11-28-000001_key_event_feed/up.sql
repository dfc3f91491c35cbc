-- The key-event feed: one row; `head` is the id of the last event appended.
-- Appending an event increments it first, inside the transaction of the
-- change itself: the row lock orders appends, so ids commit in order and a
-- reader that has seen event n has seen every event before it.
CREATE TABLE phi_key_feed (
    id           INTEGER      NOT NULL PRIMARY KEY CHECK (id = 1),
    head         BIGINT       NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
INSERT INTO phi_key_feed (id, head) VALUES (1, 0);

-- Every change a keyring in another process must follow: shred, rotate,
-- retire, rewrap, roll-out changes and cache clears. Never key bytes.
CREATE TABLE phi_key_events (
    id           BIGINT       NOT NULL PRIMARY KEY,
    occurred_at  DATETIME(6) NOT NULL,
    kind         VARCHAR(16)  NOT NULL CHECK (kind IN ('shred', 'rotate', 'retire', 'rewrap', 'rollout', 'clear')),
    owner_id     VARCHAR(255),
    key_version  BIGINT,
    actor        VARCHAR(255) NOT NULL,
    detail       TEXT
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- Roll-out policies, by name (a keyring follows one, `default` unless
-- configured): at most one row each. No row: each keyring keeps the policy
-- it was built with.
CREATE TABLE phi_rollout (
    policy       VARCHAR(64)  NOT NULL PRIMARY KEY,
    mode         VARCHAR(16)  NOT NULL CHECK (mode IN ('all', 'nobody', 'owners')),
    updated_at   DATETIME(6)  NOT NULL,
    updated_by   VARCHAR(255) NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- The owners a policy seals when its mode is 'owners'.
CREATE TABLE phi_rollout_owners (
    policy       VARCHAR(64)  NOT NULL,
    owner_id     VARCHAR(255) NOT NULL,
    PRIMARY KEY (policy, owner_id)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
