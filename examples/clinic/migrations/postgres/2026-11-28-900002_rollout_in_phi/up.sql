-- The clinic's roll-out moves into phi's roll-out table, as the policy
-- 'clinic' (phi's migrations run first): '*' becomes mode 'all', owner rows
-- become mode 'owners' with those owners, no row at all becomes 'nobody'.
-- Keyrings then change it with phi's lifecycle::set_rollout, which also
-- tells every process following the key-event feed.
DELETE FROM phi_rollout_owners WHERE policy = 'clinic';
DELETE FROM phi_rollout WHERE policy = 'clinic';
INSERT INTO phi_rollout (policy, mode, updated_at, updated_by)
SELECT 'clinic',
       CASE
           WHEN EXISTS (SELECT 1 FROM clinic_rollout WHERE owner_id = '*') THEN 'all'
           WHEN EXISTS (SELECT 1 FROM clinic_rollout) THEN 'owners'
           ELSE 'nobody'
       END,
       CURRENT_TIMESTAMP,
       'clinic migration';
INSERT INTO phi_rollout_owners (policy, owner_id)
SELECT 'clinic', owner_id FROM clinic_rollout
WHERE NOT EXISTS (SELECT 1 FROM clinic_rollout WHERE owner_id = '*');
DROP TABLE clinic_rollout;
