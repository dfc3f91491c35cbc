DROP TABLE phi_feed_readers;
