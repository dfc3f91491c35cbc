DROP TABLE kek_check_values;
