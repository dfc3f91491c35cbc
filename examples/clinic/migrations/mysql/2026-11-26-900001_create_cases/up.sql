-- The clinic's surgical cases. The patient fields are binary: phi stores an
-- envelope (flag on) or, for a row written before the roll-out, the value's
-- plain encoding (flag off). The blind indexes are set for sealed rows only.
CREATE TABLE cases (
    case_id           VARCHAR(64)     NOT NULL PRIMARY KEY,
    user_id           VARCHAR(255)    NOT NULL,
    patient_first     VARBINARY(1024) NOT NULL,
    patient_last      VARBINARY(1024) NOT NULL,
    patient_dob       VARBINARY(64)   NOT NULL,
    ins_provider      VARBINARY(1024),
    patient_last_bidx VARBINARY(16),
    patient_dob_bidx  VARBINARY(16),
    procedure_code    VARCHAR(16)     NOT NULL,
    surgery_date      DATE            NOT NULL,
    status            VARCHAR(32)     NOT NULL,
    phi_encrypted     TINYINT(1)      NOT NULL DEFAULT 0,
    INDEX cases_user_id (user_id, case_id),
    INDEX cases_duplicate_check (user_id, patient_last_bidx, patient_dob_bidx)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- Deleted cases, sealed again for this table under the same owner.
CREATE TABLE deleted_cases (
    case_id        VARCHAR(64)     NOT NULL PRIMARY KEY,
    user_id        VARCHAR(255)    NOT NULL,
    patient_first  VARBINARY(1024) NOT NULL,
    patient_last   VARBINARY(1024) NOT NULL,
    patient_dob    VARBINARY(64)   NOT NULL,
    ins_provider   VARBINARY(1024),
    procedure_code VARCHAR(16)     NOT NULL,
    surgery_date   DATE            NOT NULL,
    status         VARCHAR(32)     NOT NULL,
    deleted_at     DATETIME(6)     NOT NULL,
    phi_encrypted  TINYINT(1)      NOT NULL DEFAULT 0,
    INDEX deleted_cases_user_id (user_id, case_id)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- Which owners' new rows are sealed: one row per owner, or the row '*' for
-- every owner; no row at all seals nobody's. A new database seals everyone's.
CREATE TABLE clinic_rollout (
    owner_id VARCHAR(255) NOT NULL PRIMARY KEY
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
INSERT INTO clinic_rollout (owner_id) VALUES ('*');
