-- Nothing to undo: up.sql changes nothing on this backend.
SELECT 1;
