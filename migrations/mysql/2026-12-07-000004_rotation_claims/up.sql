-- Rotation jobs shared by several workers (phi keys rotate --all | --due |
-- --owners-query, phi_types::lifecycle::rotate_all): one row per (job,
-- owner). A worker claims pending owners for a while (claimed_until), records
-- the data key version it created for each in the same transaction as the key
-- row (new_version), and marks each owner done once its values are re-sealed,
-- verified and its older versions retired. An expired claim is taken again
-- by any worker; a rerun of the same job skips the owners done.
-- Owner ids, job ids and worker names compare byte for byte (VARBINARY,
-- as 2026-12-07-000001_owner_ids_byte_exact made phi's other id columns).
CREATE TABLE phi_rotation_claims (
    job_id        VARBINARY(256)  NOT NULL,
    owner_id      VARBINARY(1020) NOT NULL,
    state         VARCHAR(16)     NOT NULL,
    new_version   BIGINT,
    claimed_by    VARBINARY(1020),
    claimed_until DATETIME(6),
    updated_at    DATETIME(6)     NOT NULL,
    PRIMARY KEY (job_id, owner_id)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE INDEX phi_rotation_claims_pending ON phi_rotation_claims (job_id, state, claimed_until);
