-- Event kinds are open: a newer build may append kinds this schema's
-- version of phi does not know, and older keyrings apply them
-- conservatively (they drop the named owner's cached keys, or every
-- owner's). The CHECK listing today's kinds is replaced by one that only
-- refuses an empty kind; phi checks the kinds it writes.
--
-- SQLite cannot change a CHECK in place: the table is rebuilt, rows kept,
-- inside the migration's transaction.
CREATE TABLE phi_key_events_open (
    id           BIGINT       NOT NULL PRIMARY KEY,
    occurred_at  TIMESTAMP    NOT NULL,
    kind         VARCHAR(16)  NOT NULL CHECK (kind <> ''),
    owner_id     VARCHAR(255),
    key_version  BIGINT,
    actor        VARCHAR(255) NOT NULL,
    detail       TEXT
);
INSERT INTO phi_key_events_open (id, occurred_at, kind, owner_id, key_version, actor, detail)
    SELECT id, occurred_at, kind, owner_id, key_version, actor, detail FROM phi_key_events;
DROP TABLE phi_key_events;
ALTER TABLE phi_key_events_open RENAME TO phi_key_events;
