DROP TABLE IF EXISTS phi_seal_counts;
