DROP TABLE phi_rollout_owners;
DROP TABLE phi_rollout;
DROP TABLE phi_key_events;
DROP TABLE phi_key_feed;
