DROP INDEX cases_dob_year;
DROP INDEX cases_last_prefix;
ALTER TABLE cases DROP COLUMN dob_year;
ALTER TABLE cases DROP COLUMN last_prefix;
