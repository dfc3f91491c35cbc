DROP TABLE phi_rotation_claims;
