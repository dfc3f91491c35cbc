-- The clinic service's cases, sealed by phi: patient fields hold envelopes,
-- the last name and date of birth also blind indexes for the duplicate
-- check. `revision` counts the row's writes (the ETag of optimistic
-- concurrency: an update names the revision it read).
CREATE TABLE service_cases (
    case_id           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    provider_id       VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    patient_first     VARBINARY(1024)        NOT NULL,
    patient_last      VARBINARY(1024)        NOT NULL,
    patient_dob       VARBINARY(1024)        NOT NULL,
    ins_provider      VARBINARY(1024),
    patient_last_bidx VARBINARY(16),
    patient_dob_bidx  VARBINARY(16),
    procedure_code    VARCHAR(16)  NOT NULL,
    surgery_date      DATE         NOT NULL,
    status            VARCHAR(32)  NOT NULL,
    phi_encrypted     BOOLEAN      NOT NULL DEFAULT FALSE,
    revision          BIGINT       NOT NULL DEFAULT 1
) CHARACTER SET utf8mb4;
CREATE INDEX service_cases_provider ON service_cases (provider_id, case_id);
CREATE INDEX service_cases_duplicate_check ON service_cases (provider_id, patient_last_bidx, patient_dob_bidx);

-- Its plaintext twin, for measuring phi's cost side by side: the same
-- columns in the clear, the normalised last name in place of the index.
CREATE TABLE service_cases_plain (
    case_id           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    provider_id       VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    patient_first     TEXT         NOT NULL,
    patient_last      TEXT         NOT NULL,
    patient_dob       DATE         NOT NULL,
    ins_provider      TEXT,
    patient_last_norm VARCHAR(255)         NOT NULL,
    procedure_code    VARCHAR(16)  NOT NULL,
    surgery_date      DATE         NOT NULL,
    status            VARCHAR(32)  NOT NULL,
    revision          BIGINT       NOT NULL DEFAULT 1
) CHARACTER SET utf8mb4;
CREATE INDEX service_cases_plain_provider ON service_cases_plain (provider_id, case_id);
CREATE INDEX service_cases_plain_duplicate_check ON service_cases_plain (provider_id, patient_last_norm, patient_dob);
