//! A keyring that follows the key-event feed and cannot read it for longer
//! than its maximum staleness refuses to seal, from sync and async code
//! alike, and goes on opening; a successful read lifts the refusal (on a
//! SQLite database of the test's own: the events table is renamed away).
#![cfg(feature = "sqlite")]

use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use phi_types::{DieselKeyStore, Error, KeyBytes, Keyring, LocalKek};

#[test]
fn a_stale_feed_refuses_sealing_and_keeps_opening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("feed.db").display().to_string();
    let store = Arc::new(
        DieselKeyStore::<SqliteConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("store"),
    );
    let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
    // The thread reads once an hour: only `sync_feed` reads during the test.
    let keyring = Keyring::builder(store, kek)
        .feed_interval(Duration::from_secs(3600))
        .feed_max_staleness(Duration::from_secs(2))
        .build()
        .expect("keyring");
    keyring.sync_feed();
    let sealed = keyring
        .seal(
            &"Doe".to_string(),
            "provider-17",
            "cases.patient_last",
            b"C-1",
        )
        .expect("fresh: seals");
    keyring.flush_audit().expect("audit written");

    let mut conn = SqliteConnection::establish(&url).expect("connect");
    diesel::sql_query("PRAGMA busy_timeout = 10000")
        .execute(&mut conn)
        .expect("busy timeout");
    diesel::sql_query("ALTER TABLE phi_key_events RENAME TO phi_key_events_away")
        .execute(&mut conn)
        .expect("break the feed");
    assert_eq!(keyring.sync_feed(), 0, "the feed cannot be read");
    // Past the maximum staleness (a lower bound on elapsed time, not a race).
    std::thread::sleep(Duration::from_millis(2200));

    let refused = keyring
        .seal(
            &"Roe".to_string(),
            "provider-17",
            "cases.patient_last",
            b"C-2",
        )
        .expect_err("stale: no seal");
    assert!(matches!(refused, Error::FeedStale { .. }), "{refused:?}");
    assert!(refused.is_retryable());
    #[cfg(feature = "async")]
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let one = runtime.block_on(keyring.keys_for_seal_async("provider-17"));
        assert!(matches!(one, Err(Error::FeedStale { .. })), "{one:?}");
        let many = runtime.block_on(keyring.keys_for_seal_many_async(["provider-17"]));
        assert!(matches!(many, Err(Error::FeedStale { .. })), "{many:?}");
        let open = runtime.block_on(keyring.keys_for_open_async("provider-17"));
        assert!(open.is_ok(), "opening goes on: {open:?}");
    }
    let opened: String = keyring
        .open(sealed, "provider-17", "cases.patient_last", b"C-1")
        .expect("opening goes on");
    assert_eq!(opened, "Doe");

    diesel::sql_query("ALTER TABLE phi_key_events_away RENAME TO phi_key_events")
        .execute(&mut conn)
        .expect("mend the feed");
    keyring.sync_feed();
    keyring
        .seal(
            &"Roe".to_string(),
            "provider-17",
            "cases.patient_last",
            b"C-2",
        )
        .expect("read again: seals");
}
