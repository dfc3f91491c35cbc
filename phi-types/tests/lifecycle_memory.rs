//! The key life cycle on the in-memory key store: rotation, rewrap,
//! destroying keys and the audit trail, without a database.

use std::sync::Arc;

use phi_types::lifecycle::{self, RewrapOptions};
use phi_types::{
    AuditAction, Error, KeyBytes, KeyState, KeyStore, Keyring, LocalKek, MemoryKeyStore,
};

fn kek(id: &str, byte: u8) -> Arc<LocalKek> {
    Arc::new(LocalKek::new(id, &KeyBytes::new([byte; 32])))
}

#[test]
fn rotate_rewrap_destroy_and_audit_in_memory() {
    let store = Arc::new(MemoryKeyStore::new());
    let old = kek("old", 1);
    let keyring = Keyring::builder(store.clone(), old.clone())
        .actor("ops")
        .build()
        .expect("keyring");
    let mut sealed = Vec::new();
    for owner in ["a", "b", "c"] {
        sealed.push(
            keyring
                .seal(&format!("value of {owner}"), owner, "t.c", b"r")
                .expect("seal"),
        );
    }
    assert!(matches!(
        lifecycle::rotate(&keyring, "nobody"),
        Err(Error::Refused { .. })
    ));
    assert_eq!(lifecycle::rotate(&keyring, "a").expect("rotate"), 2);
    let newer = keyring
        .seal(&"newer".to_string(), "a", "t.c", b"r")
        .expect("seal");
    assert_eq!(newer.key_version(), Some(2));

    let new = kek("new", 2);
    let rewrapping = Keyring::builder(store.clone(), new.clone())
        .unwrap_with(old.clone())
        .actor("ops")
        .build()
        .expect("keyring");
    let scope = RewrapOptions::default().batch_size(2);
    let report = lifecycle::rewrap(&rewrapping, &scope).expect("rewrap");
    assert_eq!((report.total, report.rewrapped, report.batches), (4, 4, 2));
    let counts = store.key_counts().expect("counts");
    assert_eq!(counts.len(), 1);
    assert_eq!(
        (counts[0].kek_id.as_str(), counts[0].keys, counts[0].owners),
        ("new", 4, 3)
    );
    let only_new = Keyring::builder(store.clone(), new)
        .build()
        .expect("keyring");
    for (owner, value) in ["a", "b", "c"].iter().zip(sealed) {
        let opened: String = only_new.open(value, owner, "t.c", b"r").expect("opens");
        assert_eq!(opened, format!("value of {owner}"));
    }

    let event = phi_types::AuditEvent {
        occurred_at: chrono::Utc::now().naive_utc(),
        owner_id: "a".into(),
        action: AuditAction::Destroy,
        key_version: None,
        kek_id: None,
        actor: "ops".into(),
        detail: None,
    };
    // Version 2 was not listed: refused, nothing destroyed.
    assert!(matches!(
        store.destroy_keys("a", Some(&[1]), &event),
        Err(Error::Refused { .. })
    ));
    assert!(matches!(
        store.destroy_keys("a", Some(&[]), &event),
        Err(Error::Refused { .. })
    ));
    assert!(
        store
            .load_keys(&["a"])
            .expect("keys")
            .iter()
            .all(|k| k.state != KeyState::Destroyed)
    );
    assert_eq!(
        store
            .destroy_keys("a", Some(&[1, 2]), &event)
            .expect("destroy"),
        [1, 2]
    );
    assert!(
        store
            .destroy_keys("a", Some(&[]), &event)
            .expect("again")
            .is_empty()
    );
    assert!(
        store
            .destroy_keys("a", None, &event)
            .expect("and again")
            .is_empty()
    );
    let keys = store.load_keys(&["a"]).expect("keys");
    assert!(
        keys.iter()
            .all(|k| k.state == KeyState::Destroyed && k.wrapped_key.is_empty())
    );
    only_new.clear("a");
    assert!(matches!(
        only_new.seal(&"x".to_string(), "a", "t.c", b"r"),
        Err(Error::Shredded { .. })
    ));
    assert!(
        store
            .keys_page(None, None, None, 10)
            .expect("page")
            .iter()
            .all(|k| k.owner_id != "a")
    );

    // Unwrap records are written in the background: wait for them.
    for k in [&keyring, &rewrapping, &only_new] {
        k.flush_audit().expect("audit written");
    }
    let trail = store.audit(Some("a"), 100).expect("audit");
    let actions: Vec<AuditAction> = trail.iter().map(|r| r.event.action).collect();
    // Unwrap records come from the background writer, after the
    // operations that caused them: the others are in order.
    let ordered: Vec<AuditAction> = actions
        .iter()
        .copied()
        .filter(|a| *a != AuditAction::Unwrap)
        .collect();
    assert_eq!(ordered[..2], [AuditAction::Destroy, AuditAction::Destroy]);
    assert_eq!(ordered.last(), Some(&AuditAction::Generate));
    for action in [
        AuditAction::Rotate,
        AuditAction::Rewrap,
        AuditAction::Unwrap,
    ] {
        assert!(actions.contains(&action), "{actions:?}");
    }
    assert_eq!(store.audit(Some("a"), 3).expect("audit").len(), 3);
    assert!(trail.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(
        store.owners_from_query("SELECT 1").is_err(),
        "no SQL in memory"
    );
}
