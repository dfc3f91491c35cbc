-- Back to the closed list of kinds. Fails while the feed holds an event of
-- another kind: delete those first.
ALTER TABLE phi_key_events DROP CONSTRAINT phi_key_events_kind_not_empty;
ALTER TABLE phi_key_events ADD CONSTRAINT phi_key_events_kind_check
    CHECK (kind IN ('shred', 'rotate', 'retire', 'rewrap', 'rollout', 'clear'));
