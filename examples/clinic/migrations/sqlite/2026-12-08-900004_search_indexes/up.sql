-- Derived indexes for `case find`: the first two characters of the
-- surname (16-bit tags: 65,536 buckets, so a tag stands for a few prefixes
-- at most) and the year of birth (6-bit tags: 64 buckets, several years
-- each). Each is a keyed tag under the provider's own key, NULL while the
-- row is unsealed; indexed with the provider. Rows sealed before this
-- migration get their tags from `clinic reindex` (phi's re-index job).
ALTER TABLE cases ADD COLUMN last_prefix BLOB NULL;
ALTER TABLE cases ADD COLUMN dob_year BLOB NULL;
CREATE INDEX cases_last_prefix ON cases (user_id, last_prefix);
CREATE INDEX cases_dob_year ON cases (user_id, dob_year);
