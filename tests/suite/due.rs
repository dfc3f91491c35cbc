// Rotation racing a shred, the rotation policy, seal counts and the keys
// due. Included by `suite/mod.rs` inside `mod due`.

use std::sync::Mutex;

use phi::lifecycle;

/// A key store whose `add_key_version` first runs a hook (once), then
/// goes on: a rotation paused between reading the owner's keys and
/// inserting its new version, while another process acts.
struct PausedInsert {
    inner: Arc<dyn phi::KeyStore>,
    #[allow(clippy::type_complexity)]
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl PausedInsert {
    fn new(inner: Arc<dyn phi::KeyStore>, hook: impl FnOnce() + Send + 'static) -> Arc<Self> {
        Arc::new(PausedInsert { inner, hook: Mutex::new(Some(Box::new(hook))) })
    }
}

impl std::fmt::Debug for PausedInsert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PausedInsert").finish_non_exhaustive()
    }
}

impl phi::KeyStore for PausedInsert {
    fn load_keys(&self, owners: &[&str]) -> phi::Result<Vec<phi::StoredKey>> {
        self.inner.load_keys(owners)
    }
    fn insert_key_if_absent(&self, key: &phi::StoredKey) -> phi::Result<bool> {
        self.inner.insert_key_if_absent(key)
    }
    fn append_audit(&self, events: &[phi::AuditEvent]) -> phi::Result<()> {
        self.inner.append_audit(events)
    }
    fn owners(&self) -> phi::Result<Vec<String>> {
        self.inner.owners()
    }
    fn kek_check(&self, kek_id: &str) -> phi::Result<Option<phi::KekCheck>> {
        self.inner.kek_check(kek_id)
    }
    fn insert_kek_check_if_absent(&self, kek_id: &str, check: &phi::KekCheck) -> phi::Result<bool> {
        self.inner.insert_kek_check_if_absent(kek_id, check)
    }
    fn add_key_version(
        &self,
        key: &phi::StoredKey,
        audit: &phi::AuditEvent,
        event: &phi::feed::KeyEvent,
    ) -> phi::Result<bool> {
        let hook = self.hook.lock().expect("hook").take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.add_key_version(key, audit, event)
    }
}

/// A rotation that read the owner's keys before another process shredded
/// the owner must not insert its new version afterwards: the owner stays
/// shredded, and nothing seals for it. The interleaving is fixed: the
/// rotation's store runs the other process's whole shred (on a pool of its
/// own) between the rotation's read and its insert.
#[test]
fn a_rotation_racing_a_shred_does_not_bring_the_owner_back() {
    let db = TestDb::new();
    let owner = common::unique_owner("race-shred");
    db.keyring().seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("first key");

    // The other process: its own pool, its own keyring.
    let shredder = db.keyring();
    let shredded_owner = owner.clone();
    let store = PausedInsert::new(db.store(), move || {
        let report = lifecycle::shred_keys_by(&shredder, &shredded_owner, "other-process").expect("shred");
        assert_eq!(report.destroyed_versions, vec![1]);
    });
    let rotating = Keyring::builder(store, common::local_kek())
        .actor("rotating")
        .without_feed()
        .build()
        .expect("keyring");

    let err = lifecycle::rotate(&rotating, &owner).expect_err("the owner was shredded meanwhile");
    assert!(matches!(err, Error::Shredded { .. }), "{err:?}");

    // Every row destroyed, no live version.
    let rows = db.store().load_keys(&[&owner]).expect("rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows.iter().all(|r| r.state == phi::KeyState::Destroyed && r.wrapped_key.is_empty()), "{rows:?}");
    // Neither process seals for the owner.
    for keyring in [&rotating, &db.keyring()] {
        let err = keyring.seal(&"Roe".to_string(), &owner, TEXT, b"r2").expect_err("shredded");
        assert!(matches!(err, Error::Shredded { .. }), "{err:?}");
    }
}
