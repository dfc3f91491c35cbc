-- Nothing to change here: this backend compares text byte for byte, with
-- no padding, already ('acme' <> 'acme '). The MySQL / MariaDB migration of
-- the same version makes the owner columns do so there.
SELECT 1;
