// KEK check values: a KEK id names exactly one key. Included in
// `tests/suite/mod.rs` as `mod kek_check`. Every test uses KEK ids of its
// own, so the shared servers' other rows do not matter.

use phi::schema::kek_check_values;
use phi::{KekCheck, KeyBytes, LocalKek};

fn local(id: &str, byte: u8) -> Arc<dyn KeyEncryptionKey> {
    Arc::new(LocalKek::new(id, &KeyBytes::new([byte; 32])))
}

fn check_row(db: &TestDb, kek_id: &str) -> Option<(String, Vec<u8>, NaiveDateTime)> {
    kek_check_values::table
        .filter(kek_check_values::kek_id.eq(kek_id))
        .select((kek_check_values::format, kek_check_values::check_value, kek_check_values::created_at))
        .first(&mut db.conn())
        .optional()
        .expect("kek_check_values")
}

/// Rows naming `kek_id`: (data key rows, audit rows).
fn rows_under(db: &TestDb, kek_id: &str) -> (i64, i64) {
    let mut conn = db.conn();
    let keys = user_encryption_keys::table
        .filter(user_encryption_keys::kek_id.eq(kek_id))
        .count()
        .get_result(&mut conn)
        .expect("count keys");
    let audit = encryption_key_audit::table
        .filter(encryption_key_audit::kek_id.eq(kek_id))
        .count()
        .get_result(&mut conn)
        .expect("count audit");
    (keys, audit)
}

fn build(db: &TestDb, kek: Arc<dyn KeyEncryptionKey>) -> phi::Result<Keyring> {
    Keyring::builder(db.store(), kek).build()
}

#[test]
fn first_use_records_the_check_value_and_the_same_key_builds_again() {
    let db = TestDb::new();
    let id = common::unique_owner("kc-first");
    assert!(check_row(&db, &id).is_none());
    build(&db, local(&id, 1)).expect("first use");
    let (format, value, created_at) = check_row(&db, &id).expect("check value stored on first use");
    assert_eq!(format, "local-hmac-v1");
    assert_eq!(value, local(&id, 1).check_value().expect("check").value);
    assert_eq!(value.len(), 32);
    assert_eq!(rows_under(&db, &id), (0, 0), "building writes no key and no audit row");

    // The same key, in a fresh KEK and keyring (another process): builds,
    // and the stored check value is not rewritten.
    let keyring = build(&db, local(&id, 1)).expect("same key");
    let owner = common::unique_owner("kc-first");
    keyring.seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    assert_eq!(check_row(&db, &id), Some((format, value, created_at)));
}

#[test]
fn a_wrong_master_key_under_the_same_id_is_refused_and_nothing_is_written() {
    let db = TestDb::new();
    let id = common::unique_owner("kc-wrong");
    let good = build(&db, local(&id, 1)).expect("first use");
    let owner = common::unique_owner("kc-wrong");
    let sealed = good.seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    let check = check_row(&db, &id);
    let before = rows_under(&db, &id);
    assert_eq!(before.0, 1);

    let err = build(&db, local(&id, 2)).expect_err("another key under the same id");
    assert!(matches!(err, Error::KekMismatch { ref kek_id, .. } if *kek_id == id), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&id) && text.contains("PHI_MASTER_KEY") && text.contains("nothing was written"), "{text}");
    assert!(!text.contains(common::MASTER_KEY_B64));

    // Also as an older KEK beside a new primary: refused before the new
    // primary's check value is stored.
    let next = common::unique_owner("kc-wrong-next");
    let err = Keyring::builder(db.store(), local(&next, 3))
        .unwrap_with(local(&id, 2))
        .build()
        .expect_err("a wrong older KEK");
    assert!(matches!(err, Error::KekMismatch { ref kek_id, .. } if *kek_id == id), "{err:?}");
    assert!(check_row(&db, &next).is_none(), "nothing written for the new primary either");

    assert_eq!(rows_under(&db, &id), before, "no key row, no audit row");
    assert_eq!(check_row(&db, &id), check, "the check value is unchanged");
    // The right key still opens what was sealed.
    let value: String = build(&db, local(&id, 1)).expect("right key").open(sealed, &owner, TEXT, b"r").expect("open");
    assert_eq!(value, "Doe");
}

#[test]
fn two_first_uses_at_once_agree_on_one_check_value() {
    let db = TestDb::new();
    // Two processes both find no check value and both insert: one wins.
    let id = common::unique_owner("kc-race");
    let (a, b) = (local(&id, 1).check_value().expect("a"), local(&id, 2).check_value().expect("b"));
    let (store_a, store_b) = (db.store(), db.store());
    assert_eq!(store_a.kek_check(&id).expect("read"), None);
    assert_eq!(store_b.kek_check(&id).expect("read"), None);
    assert!(store_a.insert_kek_check_if_absent(&id, &a).expect("insert"));
    assert!(!store_b.insert_kek_check_if_absent(&id, &b).expect("insert"), "the second insert loses");
    assert_eq!(store_b.kek_check(&id).expect("read"), Some(a.clone()), "and both read the winner");
    assert!(matches!(build(&db, local(&id, 2)), Err(Error::KekMismatch { .. })));
    build(&db, local(&id, 1)).expect("the winner's key builds");

    // Keyrings built at once: with one key, all build and one value is
    // stored; with two keys, only the keyrings of the stored one build.
    for keys in [[1u8, 1, 1, 1], [1, 2, 1, 2]] {
        let id = common::unique_owner("kc-race");
        let barrier = Arc::new(Barrier::new(keys.len()));
        let url = db.url.clone();
        let results: Vec<(u8, bool)> = keys
            .iter()
            .map(|&byte| {
                let (barrier, id, url) = (barrier.clone(), id.clone(), url.clone());
                std::thread::spawn(move || {
                    let store = Arc::new(phi::DieselKeyStore::<Conn>::builder(&url).run_migrations(true).connect().expect("store"));
                    barrier.wait();
                    (byte, Keyring::builder(store, local(&id, byte)).build().is_ok())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let (_, stored, _) = check_row(&db, &id).expect("one check value");
        let winner = [1u8, 2]
            .into_iter()
            .find(|b| local(&id, *b).check_value().expect("check").value == stored)
            .expect("the stored value is one of the keys'");
        for (byte, built) in results {
            assert_eq!(built, byte == winner, "key {byte}, winner {winner}");
        }
    }
}

#[test]
fn a_store_from_before_check_values_is_checked_against_its_data_keys() {
    let db = TestDb::new();
    let id = common::unique_owner("kc-legacy");
    let keyring = build(&db, local(&id, 1)).expect("keyring");
    let owner = common::unique_owner("kc-legacy");
    keyring.seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    // As written before check values existed: data keys, no check value.
    diesel::delete(kek_check_values::table.filter(kek_check_values::kek_id.eq(&id)))
        .execute(&mut db.conn())
        .expect("delete");
    let before = rows_under(&db, &id);

    let err = build(&db, local(&id, 2)).expect_err("opens none of the stored keys");
    assert!(matches!(err, Error::KekMismatch { ref kek_id, .. } if *kek_id == id), "{err:?}");
    assert!(err.to_string().contains("no check value yet"), "{err}");
    assert!(check_row(&db, &id).is_none(), "a wrong key records nothing");
    assert_eq!(rows_under(&db, &id), before);

    build(&db, local(&id, 1)).expect("the key that wrapped them");
    let (format, value, _) = check_row(&db, &id).expect("recorded once verified");
    assert_eq!(KekCheck::new(format, value), local(&id, 1).check_value().expect("check"));
    assert!(matches!(build(&db, local(&id, 2)), Err(Error::KekMismatch { .. })));
}

#[test]
fn a_check_value_of_another_kind_of_kek_is_refused() {
    let db = TestDb::new();
    let id = common::unique_owner("kc-kind");
    db.store()
        .insert_kek_check_if_absent(&id, &KekCheck::new("kms-canary-v1", vec![7; 100]))
        .expect("insert");
    let err = build(&db, local(&id, 1)).expect_err("another kind of key");
    assert!(matches!(err, Error::KekMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("kms-canary-v1"), "{err}");
}

#[test]
fn a_store_from_before_check_values_with_keys_of_two_master_keys_pins_neither() {
    // A misconfigured process once wrapped some data keys under the same id
    // with another master key: neither key may be pinned, or the other's
    // data keys would be orphaned. The operator decides.
    let db = TestDb::new();
    let id = common::unique_owner("kc-mixed");
    let (right, wrong) = (local(&id, 1), local(&id, 2));
    let store = db.store();
    for (i, kek) in (1u8..).zip([&right, &wrong, &right]) {
        let owner = format!("{id}-owner-{i}");
        let wrapped = kek.wrap(&owner, 1, &KeyBytes::new([i; 32])).expect("wrap");
        assert!(
            store
                .insert_key_if_absent(&phi::StoredKey::active(owner, 1, id.clone(), wrapped))
                .expect("insert")
        );
    }
    let before = rows_under(&db, &id);
    for kek in [right, wrong] {
        let err = build(&db, kek).expect_err("keys of two master keys under one id");
        assert!(matches!(err, Error::KekMismatch { ref kek_id, .. } if *kek_id == id), "{err:?}");
        assert!(err.to_string().contains("do not open with it"), "{err}");
        assert!(check_row(&db, &id).is_none(), "nothing pinned");
    }
    assert_eq!(rows_under(&db, &id), before);
}
