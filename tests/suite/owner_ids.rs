// Owner ids are compared byte for byte, on every backend: `acme` and
// `acme ` are two owners when a keyring takes whitespace
// (`allow_owner_id_whitespace`), and `acme ` is refused when it does not.
// Included by `suite/mod.rs` inside `mod owner_ids`.

use std::sync::atomic::{AtomicBool, Ordering};

use phi::blind::Normalize;
use phi::lifecycle;
use phi::{AuditEvent, Rollout, StoredKey};

/// A keyring over `db`'s store that takes owner ids as they are.
fn keyring_taking_whitespace(db: &TestDb) -> Keyring {
    Keyring::builder(db.store(), common::local_kek())
        .actor("integration-test")
        .allow_owner_id_whitespace(true)
        .build()
        .expect("keyring")
}

/// The owner ids of `owner`'s key rows, as the store returns them.
fn key_row_owners(store: &dyn KeyStore, owner: &str) -> Vec<String> {
    store.load_keys(&[owner]).expect("load keys").into_iter().map(|k| k.owner_id).collect()
}

#[test]
fn owners_differing_by_a_trailing_space_get_their_own_keys_and_shredding_one_spares_the_other() {
    let db = TestDb::new();
    let keyring = keyring_taking_whitespace(&db);
    let acme = common::unique_owner("acme");
    let padded = format!("{acme} ");
    let (row_a, row_p) = (format!("{acme}-a"), format!("{acme}-p"));
    let doe = "Doe".to_string();

    // `acme` first: on a padding comparison `acme `'s insert would then
    // meet `acme`'s row and take its key.
    let sealed_a = keyring.seal(&doe, &acme, TEXT, row_a.as_bytes()).expect("seal for acme");
    let sealed_p = keyring.seal(&doe, &padded, TEXT, row_p.as_bytes()).expect("seal for acme + space");

    // Two key rows, each of its own owner, byte for byte.
    let store = db.store();
    assert_eq!(key_row_owners(store.as_ref(), &acme), [acme.as_str()]);
    assert_eq!(key_row_owners(store.as_ref(), &padded), [padded.as_str()]);
    let owners = store.owners().expect("owners");
    assert!(owners.contains(&acme) && owners.contains(&padded), "both owners have keys");
    let mut conn = db.conn();
    assert_eq!(key_rows(&mut conn, &acme), 1, "one key row compares equal to {acme:?}");
    assert_eq!(key_rows(&mut conn, &padded), 1, "one key row compares equal to {padded:?}");

    // Two data keys: the blind indexes of one value differ.
    let index = |owner: &str| {
        keyring
            .keys_for_seal(owner)
            .expect("keys")
            .blind_index(TEXT, &doe, Normalize::TRIM_LOWERCASE)
            .expect("blind index")
    };
    assert_ne!(index(&acme), index(&padded), "one data key for two owners");

    // Each value opens under its own owner only.
    assert_eq!(keyring.open(sealed_a.clone(), &acme, TEXT, row_a.as_bytes()).expect("acme opens"), doe);
    assert_eq!(keyring.open(sealed_p.clone(), &padded, TEXT, row_p.as_bytes()).expect("acme + space opens"), doe);
    keyring.open(sealed_a.clone(), &padded, TEXT, row_a.as_bytes()).expect_err("acme's value under acme + space");
    keyring.open(sealed_p.clone(), &acme, TEXT, row_p.as_bytes()).expect_err("acme + space's value under acme");

    // Shredding `acme ` destroys its key only.
    let report = lifecycle::shred(&mut conn, &keyring, &padded, &[], 0).expect("shred acme + space");
    assert_eq!(report.destroyed_versions, [1], "{report:?}");
    assert_eq!(report.key_rows, 1, "{report:?}");
    let acme_rows = store.load_keys(&[acme.as_str()]).expect("acme's rows");
    assert_eq!(acme_rows.len(), 1);
    assert_eq!(acme_rows[0].state, phi::KeyState::Active, "acme's key survives");
    // Readable here and by a keyring with a cold cache; the shredded owner's
    // value is not.
    let fresh = keyring_taking_whitespace(&db);
    for k in [&keyring, &fresh] {
        assert_eq!(k.open(sealed_a.clone(), &acme, TEXT, row_a.as_bytes()).expect("acme still opens"), doe);
        k.open(sealed_p.clone(), &padded, TEXT, row_p.as_bytes()).expect_err("shredded");
    }
    let err = fresh.keys_for_seal(&padded).expect_err("a shredded owner gets no new key");
    assert!(matches!(err, Error::Shredded { .. }), "{err:?}");
    fresh.keys_for_seal(&acme).expect("acme still seals");
}

#[test]
fn owner_ids_with_whitespace_or_control_characters_are_refused_by_default_naming_the_owner() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let acme = common::unique_owner("acme");
    let store = db.store();
    for owner in [format!("{acme} "), format!(" {acme}"), format!("{acme}\t"), format!("{acme}\n"), format!("ac\u{1b}{acme}")] {
        let escaped = format!("{owner:?}");
        let checks: Vec<(&str, phi::Result<()>)> = vec![
            ("check_owner_id", keyring.check_owner_id(&owner)),
            ("keys_for_seal", keyring.keys_for_seal(&owner).map(drop)),
            ("keys_for_open", keyring.keys_for_open(&owner).map(drop)),
            ("seal", keyring.seal(&"Doe".to_string(), &owner, TEXT, b"r").map(drop)),
            ("keys_for_seal_many", keyring.keys_for_seal_many([acme.as_str(), owner.as_str()]).map(drop)),
            ("rotate", lifecycle::rotate(&keyring, &owner).map(drop)),
            ("shred", lifecycle::shred_keys_by(&keyring, &owner, "test").map(drop)),
            ("clear_cache_fleet", lifecycle::clear_cache_fleet(&keyring, Some(&owner)).map(drop)),
            ("set_rollout", lifecycle::set_rollout(&keyring, &Rollout::owners([owner.clone()])).map(drop)),
        ];
        for (entry, result) in checks {
            let err = result.expect_err(&format!("{entry} takes {escaped}"));
            assert!(matches!(err, Error::InvalidInput { what: "owner id", .. }), "{entry}: {err:?}");
            let message = err.to_string();
            assert!(message.contains(&escaped), "{entry}: the owner is named, escaped: {message}");
            if owner.trim() != owner {
                assert!(message.contains("allow_owner_id_whitespace"), "{entry}: the opt-out is named: {message}");
            }
        }
        assert!(key_row_owners(store.as_ref(), &owner).is_empty(), "no key row for {escaped}");
    }
    assert!(key_row_owners(store.as_ref(), &acme).len() == 1, "the batch's valid owner was resolved");

    // The opt-out takes whitespace, not other control characters.
    let taking = keyring_taking_whitespace(&db);
    taking.check_owner_id(&format!("{acme}\t")).expect("whitespace taken");
    let err = taking.check_owner_id(&format!("ac\u{0}{acme}")).expect_err("NUL");
    assert!(err.to_string().contains("U+0000"), "{err}");
    assert!(taking.check_owner_id("").is_err(), "empty");
}

/// A store whose owner column pads, as MySQL / MariaDB `utf8mb4_bin` did
/// (owner ids compared without their trailing spaces), and whose first load
/// of `racer` finds nothing: the key row of the owner it pads to commits
/// meanwhile, so the keyring's insert of a first key meets it and takes the
/// "another process won the race" path.
#[derive(Debug)]
struct PaddingStore {
    inner: Arc<dyn KeyStore>,
    racer: String,
    raced: AtomicBool,
}

fn padded(owner: &str) -> &str {
    owner.trim_end_matches(' ')
}

impl KeyStore for PaddingStore {
    fn load_keys(&self, owners: &[&str]) -> phi::Result<Vec<StoredKey>> {
        if owners == [self.racer.as_str()] && !self.raced.swap(true, Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let owners: Vec<&str> = owners.iter().map(|o| padded(o)).collect();
        self.inner.load_keys(&owners)
    }

    fn insert_key_if_absent(&self, key: &StoredKey) -> phi::Result<bool> {
        let mut key = key.clone();
        key.owner_id = padded(&key.owner_id).to_owned();
        self.inner.insert_key_if_absent(&key)
    }

    fn append_audit(&self, events: &[AuditEvent]) -> phi::Result<()> {
        self.inner.append_audit(events)
    }

    fn kek_check(&self, kek_id: &str) -> phi::Result<Option<phi::KekCheck>> {
        self.inner.kek_check(kek_id)
    }

    fn insert_kek_check_if_absent(&self, kek_id: &str, check: &phi::KekCheck) -> phi::Result<bool> {
        self.inner.insert_kek_check_if_absent(kek_id, check)
    }

    fn owners(&self) -> phi::Result<Vec<String>> {
        self.inner.owners()
    }
}

/// An error's message and its sources'.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[test]
fn a_lost_first_key_race_never_takes_a_key_row_of_another_owner() {
    let db = TestDb::new();
    let acme = common::unique_owner("acme");
    let racer = format!("{acme} ");
    db.keyring().keys_for_seal(&acme).expect("acme's key");
    let store = PaddingStore { inner: db.store(), racer: racer.clone(), raced: AtomicBool::new(false) };
    let keyring = Keyring::builder(Arc::new(store), common::local_kek())
        .allow_owner_id_whitespace(true)
        .build()
        .expect("keyring");

    let err = keyring.keys_for_seal(&racer).expect_err("acme's key for acme + space");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    let message = chain(&err);
    assert!(
        message.contains(&format!("{acme:?}")) && message.contains(&format!("{racer:?}")),
        "both owners named, escaped: {message}"
    );
    assert!(message.contains("byte for byte"), "{message}");
}
