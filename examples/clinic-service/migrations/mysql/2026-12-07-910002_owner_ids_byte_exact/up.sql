-- The owner columns compare byte for byte, with no padding. utf8mb4_bin is
-- a PAD SPACE collation: `WHERE provider_id = 'acme '` found 'acme''s cases
-- (which then failed to open: phi binds every value to its owner, so
-- nothing leaked, but a listing by owner must not mix two owners).
--
-- A NO PAD binary collation keeps the columns text, so `diesel
-- print-schema` prints them as before (`Text`), and compares bytes. Its
-- name depends on the server: MariaDB (>= 10.2) has utf8mb4_nopad_bin,
-- MySQL (>= 8.0.17) utf8mb4_0900_bin; the statement is built with the one
-- this server has. A server with neither (MySQL 5.7) fails here, on the
-- unknown collation utf8mb4_nopad_bin: use VARBINARY(1020) there, read as
-- text the same way (Diesel's `FromSql<Text>` takes the column's bytes).
SET @service_nopad_bin = COALESCE(
    (SELECT MIN(COLLATION_NAME) FROM information_schema.COLLATIONS
     WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin')),
    'utf8mb4_nopad_bin');

SET @service_sql = CONCAT('ALTER TABLE service_cases MODIFY provider_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE ',
                          @service_nopad_bin, ' NOT NULL');
PREPARE service_stmt FROM @service_sql;
EXECUTE service_stmt;
DEALLOCATE PREPARE service_stmt;

SET @service_sql = CONCAT('ALTER TABLE service_cases_plain MODIFY provider_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE ',
                          @service_nopad_bin, ' NOT NULL');
PREPARE service_stmt FROM @service_sql;
EXECUTE service_stmt;
DEALLOCATE PREPARE service_stmt;
