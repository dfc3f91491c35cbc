-- Nothing to undo: up.sql changes nothing on SQLite.
SELECT 1;
