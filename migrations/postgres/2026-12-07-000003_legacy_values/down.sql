DROP TABLE IF EXISTS phi_legacy_values;
