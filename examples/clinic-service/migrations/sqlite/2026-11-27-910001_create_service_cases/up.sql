-- The clinic service's cases, sealed by phi: patient fields hold envelopes,
-- the last name and date of birth also blind indexes for the duplicate
-- check. `revision` counts the row's writes (the ETag of optimistic
-- concurrency: an update names the revision it read).
CREATE TABLE service_cases (
    case_id           VARCHAR(64)  NOT NULL PRIMARY KEY,
    provider_id       VARCHAR(255) NOT NULL,
    patient_first     BLOB        NOT NULL,
    patient_last      BLOB        NOT NULL,
    patient_dob       BLOB        NOT NULL,
    ins_provider      BLOB,
    patient_last_bidx BLOB,
    patient_dob_bidx  BLOB,
    procedure_code    VARCHAR(16)  NOT NULL,
    surgery_date      DATE         NOT NULL,
    status            VARCHAR(32)  NOT NULL,
    phi_encrypted     BOOLEAN      NOT NULL DEFAULT 0,
    revision          BIGINT       NOT NULL DEFAULT 1
);
CREATE INDEX service_cases_provider ON service_cases (provider_id, case_id);
CREATE INDEX service_cases_duplicate_check ON service_cases (provider_id, patient_last_bidx, patient_dob_bidx);

-- Its plaintext twin, for measuring phi's cost side by side: the same
-- columns in the clear, the normalised last name in place of the index.
CREATE TABLE service_cases_plain (
    case_id           VARCHAR(64)  NOT NULL PRIMARY KEY,
    provider_id       VARCHAR(255) NOT NULL,
    patient_first     TEXT         NOT NULL,
    patient_last      TEXT         NOT NULL,
    patient_dob       DATE         NOT NULL,
    ins_provider      TEXT,
    patient_last_norm TEXT         NOT NULL,
    procedure_code    VARCHAR(16)  NOT NULL,
    surgery_date      DATE         NOT NULL,
    status            VARCHAR(32)  NOT NULL,
    revision          BIGINT       NOT NULL DEFAULT 1
);
CREATE INDEX service_cases_plain_provider ON service_cases_plain (provider_id, case_id);
CREATE INDEX service_cases_plain_duplicate_check ON service_cases_plain (provider_id, patient_last_norm, patient_dob);
