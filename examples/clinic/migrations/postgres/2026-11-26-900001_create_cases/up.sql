-- The clinic's surgical cases. The patient fields are binary: phi stores an
-- envelope (flag on) or, for a row written before the roll-out, the value's
-- plain encoding (flag off). The blind indexes are set for sealed rows only.
CREATE TABLE cases (
    case_id           VARCHAR(64)  NOT NULL PRIMARY KEY,
    user_id           VARCHAR(255) NOT NULL,
    patient_first     BYTEA        NOT NULL,
    patient_last      BYTEA        NOT NULL,
    patient_dob       BYTEA        NOT NULL,
    ins_provider      BYTEA,
    patient_last_bidx BYTEA,
    patient_dob_bidx  BYTEA,
    procedure_code    VARCHAR(16)  NOT NULL,
    surgery_date      DATE         NOT NULL,
    status            VARCHAR(32)  NOT NULL,
    phi_encrypted     BOOLEAN      NOT NULL DEFAULT FALSE
);
CREATE INDEX cases_user_id ON cases (user_id, case_id);
CREATE INDEX cases_duplicate_check ON cases (user_id, patient_last_bidx, patient_dob_bidx);

-- Deleted cases, sealed again for this table under the same owner.
CREATE TABLE deleted_cases (
    case_id        VARCHAR(64)  NOT NULL PRIMARY KEY,
    user_id        VARCHAR(255) NOT NULL,
    patient_first  BYTEA        NOT NULL,
    patient_last   BYTEA        NOT NULL,
    patient_dob    BYTEA        NOT NULL,
    ins_provider   BYTEA,
    procedure_code VARCHAR(16)  NOT NULL,
    surgery_date   DATE         NOT NULL,
    status         VARCHAR(32)  NOT NULL,
    deleted_at     TIMESTAMP    NOT NULL,
    phi_encrypted  BOOLEAN      NOT NULL DEFAULT FALSE
);
CREATE INDEX deleted_cases_user_id ON deleted_cases (user_id, case_id);

-- Which owners' new rows are sealed: one row per owner, or the row '*' for
-- every owner; no row at all seals nobody's. A new database seals everyone's.
CREATE TABLE clinic_rollout (
    owner_id VARCHAR(255) NOT NULL PRIMARY KEY
);
INSERT INTO clinic_rollout (owner_id) VALUES ('*');
