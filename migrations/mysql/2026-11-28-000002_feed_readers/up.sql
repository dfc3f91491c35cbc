-- How far each following keyring has read the key-event feed: one row per
-- reader (a name the application chose, or host:pid), written by the
-- keyring at most once per feed interval and removed when it stops.
CREATE TABLE phi_feed_readers (
    reader       VARCHAR(255) NOT NULL PRIMARY KEY,
    position     BIGINT       NOT NULL,
    updated_at   DATETIME(6)  NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
