-- Back to the clinic's own roll-out table, from phi's policy 'clinic'.
CREATE TABLE clinic_rollout (
    owner_id VARCHAR(255) NOT NULL PRIMARY KEY
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
INSERT INTO clinic_rollout (owner_id)
SELECT '*' FROM phi_rollout WHERE policy = 'clinic' AND mode = 'all';
INSERT INTO clinic_rollout (owner_id)
SELECT o.owner_id FROM phi_rollout_owners o
JOIN phi_rollout r ON r.policy = o.policy
WHERE o.policy = 'clinic' AND r.mode = 'owners';
-- Never set: the clinic's default, every owner.
INSERT INTO clinic_rollout (owner_id)
SELECT '*' FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM phi_rollout WHERE policy = 'clinic');
DELETE FROM phi_rollout_owners WHERE policy = 'clinic';
DELETE FROM phi_rollout WHERE policy = 'clinic';
