//! A life-cycle change whose feed event cannot be appended is rolled back
//! (on a SQLite database of the test's own: the feed's head row is removed).
#![cfg(feature = "sqlite")]

use std::sync::Arc;

use diesel::prelude::*;
use phi_types::{DieselKeyStore, KeyBytes, KeyState, KeyStore, Keyring, LocalKek, lifecycle};

#[test]
fn a_change_whose_event_cannot_be_appended_is_rolled_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("feed.db").display().to_string();
    let store = Arc::new(
        DieselKeyStore::<SqliteConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("store"),
    );
    let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
    let keyring = Keyring::builder(store.clone(), kek)
        .build()
        .expect("keyring");
    keyring.keys_for_seal("provider-17").expect("first key");
    let mut conn = SqliteConnection::establish(&url).expect("connect");
    diesel::sql_query("PRAGMA busy_timeout = 10000")
        .execute(&mut conn)
        .expect("busy timeout");
    keyring.flush_audit().expect("audit written");
    diesel::sql_query("DELETE FROM phi_key_feed")
        .execute(&mut conn)
        .expect("break the feed");

    let error = lifecycle::shred(&mut conn, &keyring, "provider-17", &[], 0)
        .expect_err("no event, no shred");
    assert!(
        error.to_string().contains("destroying data keys"),
        "{error}"
    );
    assert!(
        lifecycle::rotate(&keyring, "provider-17").is_err(),
        "no event, no rotation"
    );
    assert!(lifecycle::clear_cache_fleet(&keyring, None).is_err());
    let rows = store.load_keys(&["provider-17"]).expect("load");
    assert_eq!(rows.len(), 1, "no version added");
    assert!(
        rows.iter()
            .all(|r| r.state == KeyState::Active && !r.wrapped_key.is_empty())
    );
    let audit = store.audit(Some("provider-17"), 10).expect("audit");
    assert!(
        audit
            .iter()
            .all(|r| r.event.action == phi_types::AuditAction::Generate),
        "no destroy or rotate record: {audit:?}"
    );
}
