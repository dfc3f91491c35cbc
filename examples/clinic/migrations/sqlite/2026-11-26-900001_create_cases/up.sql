-- The clinic's surgical cases. The patient fields are binary: phi stores an
-- envelope (flag on) or, for a row written before the roll-out, the value's
-- plain encoding (flag off). The blind indexes are set for sealed rows only.
CREATE TABLE cases (
    case_id           TEXT    NOT NULL PRIMARY KEY,
    user_id           TEXT    NOT NULL,
    patient_first     BLOB    NOT NULL,
    patient_last      BLOB    NOT NULL,
    patient_dob       BLOB    NOT NULL,
    ins_provider      BLOB,
    patient_last_bidx BLOB,
    patient_dob_bidx  BLOB,
    procedure_code    TEXT    NOT NULL,
    surgery_date      DATE    NOT NULL,
    status            TEXT    NOT NULL,
    phi_encrypted     BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX cases_user_id ON cases (user_id, case_id);
CREATE INDEX cases_duplicate_check ON cases (user_id, patient_last_bidx, patient_dob_bidx);

-- Deleted cases, sealed again for this table under the same owner.
CREATE TABLE deleted_cases (
    case_id        TEXT      NOT NULL PRIMARY KEY,
    user_id        TEXT      NOT NULL,
    patient_first  BLOB      NOT NULL,
    patient_last   BLOB      NOT NULL,
    patient_dob    BLOB      NOT NULL,
    ins_provider   BLOB,
    procedure_code TEXT      NOT NULL,
    surgery_date   DATE      NOT NULL,
    status         TEXT      NOT NULL,
    deleted_at     TIMESTAMP NOT NULL,
    phi_encrypted  BOOLEAN   NOT NULL DEFAULT FALSE
);
CREATE INDEX deleted_cases_user_id ON deleted_cases (user_id, case_id);

-- Which owners' new rows are sealed: one row per owner, or the row '*' for
-- every owner; no row at all seals nobody's. A new database seals everyone's.
CREATE TABLE clinic_rollout (
    owner_id TEXT NOT NULL PRIMARY KEY
);
INSERT INTO clinic_rollout (owner_id) VALUES ('*');
