DROP TABLE IF EXISTS phi_access_log;
DROP TABLE IF EXISTS phi_access_batches;
DROP TABLE IF EXISTS phi_access_chains;
