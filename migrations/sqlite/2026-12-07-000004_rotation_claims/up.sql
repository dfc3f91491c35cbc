-- Rotation jobs shared by several workers (phi keys rotate --all | --due |
-- --owners-query, phi_types::lifecycle::rotate_all): one row per (job,
-- owner). A worker claims pending owners for a while (claimed_until), records
-- the data key version it created for each in the same transaction as the key
-- row (new_version), and marks each owner done once its values are re-sealed,
-- verified and its older versions retired. An expired claim is taken again
-- by any worker; a rerun of the same job skips the owners done.
CREATE TABLE phi_rotation_claims (
    job_id        VARCHAR(64)  NOT NULL,
    owner_id      VARCHAR(255) NOT NULL,
    state         VARCHAR(16)  NOT NULL,
    new_version   BIGINT,
    claimed_by    VARCHAR(255),
    claimed_until TIMESTAMP,
    updated_at    TIMESTAMP    NOT NULL,
    PRIMARY KEY (job_id, owner_id)
);
CREATE INDEX phi_rotation_claims_pending ON phi_rotation_claims (job_id, state, claimed_until);
