DROP TABLE clinic_rollout;
DROP TABLE deleted_cases;
DROP TABLE cases;
