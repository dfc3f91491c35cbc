-- How far each following keyring has read the key-event feed: one row per
-- reader (a name the application chose, or host:pid), written by the
-- keyring at most once per feed interval and removed when it stops.
CREATE TABLE phi_feed_readers (
    reader       VARCHAR(255) NOT NULL PRIMARY KEY,
    position     BIGINT       NOT NULL,
    updated_at   TIMESTAMP    NOT NULL
);
