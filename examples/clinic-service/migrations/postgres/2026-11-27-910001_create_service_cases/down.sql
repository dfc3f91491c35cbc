DROP TABLE service_cases_plain;
DROP TABLE service_cases;
