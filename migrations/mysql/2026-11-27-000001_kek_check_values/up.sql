-- One row per KEK id: a commitment to the key material first used under
-- that id, so a process configured with another key under the same id is
-- refused before it writes anything. Never key bytes.
CREATE TABLE kek_check_values (
    kek_id       VARCHAR(255)    NOT NULL PRIMARY KEY,
    format       VARCHAR(32)     NOT NULL,
    check_value  VARBINARY(2048) NOT NULL,
    created_at   DATETIME(6)     NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
