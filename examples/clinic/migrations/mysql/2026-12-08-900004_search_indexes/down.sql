DROP INDEX cases_dob_year ON cases;
DROP INDEX cases_last_prefix ON cases;
ALTER TABLE cases DROP COLUMN dob_year;
ALTER TABLE cases DROP COLUMN last_prefix;
