// The key life cycle on this backend: rotation and re-seal, retirement,
// KEK rotation (rewrap), crypto-shredding, and crash recovery of the two
// batch jobs. Included by `suite/mod.rs` inside `mod lifecycle`.

use std::io::BufRead as _;

use phi::lifecycle::{self, GenerateOptions, ResealOptions, ResealTable, RewrapOptions, ShredOutcome, UnverifiedReason};
use phi::migrate::Migratable as _;
use phi::{KeyBytes, LocalKek};

diesel::table! {
    phi_it_life (id) {
        id -> Varchar,
        owner_id -> Varchar,
        name -> Nullable<Binary>,
        note -> Nullable<Binary>,
    }
}

diesel::table! {
    phi_it_life_nokey (owner_id, seq) {
        owner_id -> Varchar,
        seq -> Integer,
        dob -> Nullable<Binary>,
    }
}

const NAME: &str = "phi_it_life.name";
/// The `note` column's values are bound to a pinned scope.
const NOTE: &str = "life.note";
const DOB: &str = "phi_it_life_nokey.dob";

fn life_tables() -> Vec<ResealTable> {
    vec![
        ResealTable::new("phi_it_life", "owner_id")
            .key_column("id")
            .column("name")
            .column_with_scope("note", NOTE),
        ResealTable::new("phi_it_life_nokey", "owner_id").column("dob"),
    ]
}

fn life_db() -> TestDb {
    let db = TestDb::new();
    create_life_tables(&db);
    db
}

/// The life-cycle test tables in `db`.
fn create_life_tables(db: &TestDb) {
    let mut conn = db.conn();
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_life (id VARCHAR(255) NOT NULL PRIMARY KEY, \
             owner_id VARCHAR(255) NOT NULL, name {BLOB} NULL, note {BLOB} NULL)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_life_nokey (owner_id VARCHAR(255) NOT NULL, \
             seq INTEGER NOT NULL, dob {BLOB} NULL, PRIMARY KEY (owner_id, seq))"
        ),
    ] {
        diesel::sql_query(ddl).execute(&mut conn).expect("life-cycle test tables");
    }
}

fn name_of(owner: &str, i: usize) -> String {
    format!("Patient {i} of {owner}")
}

/// Seals and inserts `n` rows for `owner` (every third note NULL) and one
/// row per three in the key-less table; returns the row ids.
fn seed(db: &TestDb, keyring: &Keyring, owner: &str, n: usize) -> Vec<String> {
    let keys = keyring.keys_for_seal(owner).expect("keys");
    let mut conn = db.conn();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{owner}-{i}");
        let name = keys.seal(&name_of(owner, i), NAME, id.as_bytes()).expect("seal");
        let note = (i % 3 != 0).then(|| keys.seal(&format!("note {i}"), NOTE, id.as_bytes()).expect("seal"));
        diesel::insert_into(phi_it_life::table)
            .values((
                phi_it_life::id.eq(&id),
                phi_it_life::owner_id.eq(owner),
                phi_it_life::name.eq(Some(name.into_bytes())),
                phi_it_life::note.eq(note.map(Encrypted::into_bytes)),
            ))
            .execute(&mut conn)
            .expect("insert");
        if i % 3 == 0 {
            let dob = NaiveDate::from_ymd_opt(1950, 1, 1).expect("date") + chrono::Days::new(i as u64);
            diesel::insert_into(phi_it_life_nokey::table)
                .values((
                    phi_it_life_nokey::owner_id.eq(owner),
                    phi_it_life_nokey::seq.eq(i32::try_from(i).expect("small")),
                    phi_it_life_nokey::dob.eq(Some(keys.seal(&dob, DOB, b"").expect("seal").into_bytes())),
                ))
                .execute(&mut conn)
                .expect("insert");
        }
    }
    ids.extend((0..n).map(|i| format!("{owner}-{i}")));
    ids
}

/// Opens every value of `owner` with `keyring`, checking each plaintext,
/// and returns the key versions seen.
fn check_all_open(db: &TestDb, keyring: &Keyring, owner: &str, n: usize) -> Vec<u32> {
    let mut conn = db.conn();
    type LifeRow = (String, Option<Vec<u8>>, Option<Vec<u8>>);
    let rows: Vec<LifeRow> = phi_it_life::table
        .filter(phi_it_life::owner_id.eq(owner))
        .select((phi_it_life::id, phi_it_life::name, phi_it_life::note))
        .load(&mut conn)
        .expect("rows");
    assert_eq!(rows.len(), n, "every row is still there");
    let mut versions = Vec::new();
    for (id, name, note) in rows {
        let i: usize = id.rsplit('-').next().expect("index").parse().expect("index");
        let name = Encrypted::<String>::from_bytes(name.expect("name is never NULL"));
        versions.extend(name.key_version());
        let opened = keyring
            .open(name, owner, NAME, id.as_bytes())
            .unwrap_or_else(|e| panic!("row {id} name does not open: {e}"));
        assert_eq!(opened, name_of(owner, i));
        match note {
            None => assert_eq!(i % 3, 0, "only the NULL notes are NULL"),
            Some(bytes) => {
                let note = Encrypted::<String>::from_bytes(bytes);
                versions.extend(note.key_version());
                assert_eq!(keyring.open(note, owner, NOTE, id.as_bytes()).expect("note opens"), format!("note {i}"));
            }
        }
    }
    let dobs: Vec<(i32, Option<Vec<u8>>)> = phi_it_life_nokey::table
        .filter(phi_it_life_nokey::owner_id.eq(owner))
        .select((phi_it_life_nokey::seq, phi_it_life_nokey::dob))
        .load(&mut conn)
        .expect("rows");
    assert_eq!(dobs.len(), n.div_ceil(3));
    for (seq, dob) in dobs {
        let dob = Encrypted::<NaiveDate>::from_bytes(dob.expect("dob"));
        versions.extend(dob.key_version());
        let expected = NaiveDate::from_ymd_opt(1950, 1, 1).expect("date") + chrono::Days::new(seq as u64);
        assert_eq!(keyring.open(dob, owner, DOB, b"").expect("dob opens"), expected);
    }
    versions.sort_unstable();
    versions.dedup();
    versions
}

fn key_states(db: &TestDb, owner: &str) -> Vec<(i64, String, String, usize)> {
    let mut conn = db.conn();
    let rows: Vec<(i64, String, String, Vec<u8>)> = user_encryption_keys::table
        .filter(user_encryption_keys::owner_id.eq(owner))
        .order(user_encryption_keys::version)
        .select((
            user_encryption_keys::version,
            user_encryption_keys::state,
            user_encryption_keys::kek_id,
            user_encryption_keys::wrapped_key,
        ))
        .load(&mut conn)
        .expect("key rows");
    rows.into_iter().map(|(v, s, k, w)| (v, s, k, w.len())).collect()
}

fn audit_actions(db: &TestDb, owner: &str) -> Vec<(String, Option<i64>)> {
    let mut conn = db.conn();
    encryption_key_audit::table
        .filter(encryption_key_audit::owner_id.eq(owner))
        .order(encryption_key_audit::id)
        .select((encryption_key_audit::action, encryption_key_audit::key_version))
        .load(&mut conn)
        .expect("audit")
}

#[test]
fn rotation_reseal_and_retirement_end_to_end() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("rotate");
    let other = common::unique_owner("rotate-other");
    seed(&db, &keyring, &owner, 23);
    seed(&db, &keyring, &other, 4);
    let mut conn = db.conn();
    let tables = life_tables();
    let old_copy: Vec<u8> = phi_it_life::table
        .find(format!("{owner}-1"))
        .select(phi_it_life::name)
        .first::<Option<Vec<u8>>>(&mut conn)
        .expect("row")
        .expect("name");

    assert_eq!(lifecycle::rotate(&keyring, &owner).expect("rotate"), 2);
    let fresh = keyring.seal(&"new".to_string(), &owner, NAME, b"x").expect("seal");
    assert_eq!(fresh.key_version(), Some(2), "new writes use the new version");

    // Version 1 is still used: retirement is refused, naming where.
    let err = lifecycle::retire(&mut conn, &keyring, &owner, 1, &tables).expect_err("in use");
    match &err {
        Error::KeyInUse { owner: o, key_version: 1, table, column, rows } => {
            assert_eq!((o.as_str(), table.as_str(), column.as_str(), *rows), (owner.as_str(), "phi_it_life", "name", 23));
        }
        other => panic!("expected KeyInUse, got {other:?}"),
    }
    assert!(err.to_string().contains("phi_it_life.name") && err.to_string().contains(&owner), "{err}");
    // The current version is never retired.
    let err = lifecycle::retire(&mut conn, &keyring, &owner, 2, &tables).expect_err("current");
    assert!(matches!(err, Error::Refused { .. }) && err.to_string().contains("current"), "{err}");

    let mut batches = 0;
    let report = lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &ResealOptions::default().batch_size(5).progress(|_| batches += 1))
        .expect("reseal");
    let notes = (0..23).filter(|i| i % 3 != 0).count() as u64;
    let dobs = (0..23).filter(|i| i % 3 == 0).count() as u64;
    assert_eq!(report.total, 23 + notes + dobs);
    assert_eq!(report.resealed, report.total);
    assert_eq!(report.conflicts, 0);
    assert_eq!(report.current_version, 2);
    assert!(batches >= 5, "worked in batches: {batches}");
    assert_eq!(check_all_open(&db, &db.keyring(), &owner, 23), [2], "every value on version 2");
    // Headers say so without decrypting.
    let usage = lifecycle::usage(&mut conn, &owner, &tables).expect("usage");
    assert!(usage.iter().all(|u| u.key_version == 2), "{usage:?}");
    // Nothing left: a second run does nothing.
    let again = lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &ResealOptions::default().batch_size(5)).expect("reseal");
    assert_eq!((again.total, again.resealed), (0, 0));
    // The other owner was not touched.
    assert_eq!(check_all_open(&db, &keyring, &other, 4), [1]);

    assert!(lifecycle::retire(&mut conn, &keyring, &owner, 1, &tables).expect("retire"));
    assert!(!lifecycle::retire(&mut conn, &keyring, &owner, 1, &tables).expect("idempotent"));
    let states = key_states(&db, &owner);
    assert_eq!(
        states.iter().map(|(v, s, _, _)| (*v, s.as_str())).collect::<Vec<_>>(),
        [(1, "retired"), (2, "active")]
    );
    // A retired version still opens, in this process and a fresh one, and
    // never seals.
    for k in [&keyring, &db.keyring()] {
        let old: String = k.open(Encrypted::from_bytes(old_copy.clone()), &owner, NAME, format!("{owner}-1").as_bytes()).expect("retired opens");
        assert_eq!(old, name_of(&owner, 1));
        assert_eq!(k.seal(&"x".to_string(), &owner, NAME, b"y").expect("seal").key_version(), Some(2));
    }
    let actions = audit_actions(&db, &owner);
    assert!(actions.contains(&("rotate".into(), Some(2))), "{actions:?}");
    assert!(actions.contains(&("retire".into(), Some(1))), "{actions:?}");
    // Rotating again after retirement: version 3 from a fresh process too.
    assert_eq!(lifecycle::rotate(&keyring, &owner).expect("rotate"), 3);
    assert_eq!(db.keyring().seal(&"z".to_string(), &owner, NAME, b"z").expect("seal").key_version(), Some(3));
}

fn rewrap_keks(tag: &str) -> (Arc<LocalKek>, Arc<LocalKek>) {
    (
        Arc::new(LocalKek::new(format!("old-{tag}"), &KeyBytes::new([0x11; 32]))),
        Arc::new(LocalKek::new(format!("new-{tag}"), &KeyBytes::new([0x22; 32]))),
    )
}

fn kek_ids_of(db: &TestDb, owners: &[String]) -> Vec<String> {
    let mut conn = db.conn();
    user_encryption_keys::table
        .filter(user_encryption_keys::owner_id.eq_any(owners))
        .select(user_encryption_keys::kek_id)
        .load(&mut conn)
        .expect("kek ids")
}

/// Seals one value for each of `n` owners under the old KEK; rotates every
/// third so some owners have two versions.
fn seed_rewrap(db: &TestDb, old: &Arc<LocalKek>, tag: &str, n: usize) -> Vec<(String, Encrypted<String>)> {
    let keyring = Keyring::builder(db.store(), old.clone()).build().expect("keyring");
    (0..n)
        .map(|i| {
            let owner = common::unique_owner(&format!("{tag}{i}"));
            if i % 3 == 0 {
                keyring.seal(&"v1".to_string(), &owner, NAME, b"r").expect("seal");
                lifecycle::rotate(&keyring, &owner).expect("rotate");
            }
            let sealed = keyring.seal(&format!("value {i}"), &owner, NAME, b"r").expect("seal");
            (owner, sealed)
        })
        .collect()
}

fn check_rewrapped(db: &TestDb, new: &Arc<LocalKek>, sealed: &[(String, Encrypted<String>)]) {
    let owners: Vec<String> = sealed.iter().map(|(o, _)| o.clone()).collect();
    let keks = kek_ids_of(db, &owners);
    assert!(keks.iter().all(|k| k == new.id()), "every key under the new KEK: {keks:?}");
    // The new KEK alone opens everything.
    let only_new = Keyring::builder(db.store(), new.clone()).build().expect("keyring");
    for (i, (owner, value)) in sealed.iter().enumerate() {
        let opened: String = only_new.open(value.clone(), owner, NAME, b"r").expect("opens under the new KEK");
        assert_eq!(opened, format!("value {i}"));
    }
}

#[test]
fn rewrap_moves_every_key_to_the_new_kek_and_is_audited() {
    let db = life_db();
    let tag = common::unique_owner("rw");
    let (old, new) = rewrap_keks(&tag);
    let sealed = seed_rewrap(&db, &old, "rw", 12);
    let keyring = Keyring::builder(db.store(), new.clone())
        .unwrap_with(old.clone())
        .actor("rotation-test")
        .build()
        .expect("keyring");
    let scope = RewrapOptions::default().from_kek(old.id().to_owned()).batch_size(5);
    let mut seen = Vec::new();
    let report = lifecycle::rewrap(&keyring, &scope.clone().progress(|p| seen.push(p.rewrapped))).expect("rewrap");
    assert_eq!((report.total, report.rewrapped, report.skipped, report.batches), (16, 16, 0, 4));
    assert_eq!(seen, [5, 10, 15, 16]);
    check_rewrapped(&db, &new, &sealed);
    let actions = audit_actions(&db, &sealed[0].0);
    assert_eq!(actions.iter().filter(|(a, _)| a == "rewrap").count(), 2, "{actions:?}");
    // The store's rewrap is a compare-and-set on the old KEK id: a row that
    // changed meanwhile is left alone, without an audit record.
    let (owner, _) = &sealed[0];
    let row = db.store().load_keys(&[owner.as_str()]).expect("keys").remove(0);
    let stale = phi::Rewrap {
        owner_id: owner.clone(),
        version: row.version,
        from_kek: old.id().to_owned(),
        to_kek: "elsewhere".to_owned(),
        wrapped_key: vec![1, 2, 3],
        audit: phi::AuditEvent {
            occurred_at: chrono::Utc::now().naive_utc(),
            owner_id: owner.clone(),
            action: phi::AuditAction::Rewrap,
            key_version: Some(row.version),
            kek_id: Some("elsewhere".to_owned()),
            actor: "stale".to_owned(),
            detail: None,
        },
    };
    let audit_before = audit_actions(&db, owner).len();
    assert_eq!(db.store().rewrap_keys(&[stale]).expect("cas"), [false]);
    assert_eq!(db.store().load_keys(&[owner.as_str()]).expect("keys").remove(0), row, "unchanged");
    assert_eq!(audit_actions(&db, owner).len(), audit_before, "no audit for a change not made");
    // Done: a second run has nothing to do; the old KEK alone no longer unwraps.
    let again = lifecycle::rewrap(&keyring, &scope).expect("rewrap");
    assert_eq!((again.total, again.rewrapped), (0, 0));
    let only_old = Keyring::builder(db.store(), old).build().expect("keyring");
    let err = only_old.open(sealed[1].1.clone(), &sealed[1].0, NAME, b"r").expect_err("old KEK");
    assert!(matches!(err, Error::UnknownKek { .. }), "{err:?}");
}

fn audit_event(owner: &str, action: phi::AuditAction, version: Option<u32>, kek: Option<&str>) -> phi::AuditEvent {
    phi::AuditEvent {
        occurred_at: chrono::Utc::now().naive_utc(),
        owner_id: owner.to_owned(),
        action,
        key_version: version,
        kek_id: kek.map(str::to_owned),
        actor: "another-process".to_owned(),
        detail: None,
    }
}

#[test]
fn rows_changed_between_a_rewrap_batchs_read_and_its_write_are_left_alone_and_counted() {
    let db = life_db();
    let tag = common::unique_owner("rw-race");
    let (old, new) = rewrap_keks(&tag);
    let third = Arc::new(LocalKek::new(format!("third-{tag}"), &KeyBytes::new([0x33; 32])));
    // 6 owners, owners 0 and 3 with two versions: 8 keys, two batches of 5 and 3.
    let sealed = seed_rewrap(&db, &old, "rw-race", 6);
    let owners: Vec<String> = sealed.iter().map(|(o, _)| o.clone()).collect();
    let keyring = Keyring::builder(db.store(), new.clone())
        .unwrap_with(old.clone())
        .actor("race-test")
        .build()
        .expect("keyring");
    let scope = RewrapOptions::default().from_kek(old.id().to_owned()).batch_size(5);

    // After the first batch has read (and rewrapped) its 5 rows and before
    // it writes them, another process rewraps one of them to a third KEK
    // and shreds the owner of another (an owner with one key).
    let mut batches = 0;
    let mut moved: Option<(String, u32, Vec<u8>)> = None;
    let mut shredded: Option<String> = None;
    let report = lifecycle::rewrap_interleaved(&keyring, &scope, &mut |page| {
        batches += 1;
        if batches == 1 {
            assert_eq!(page.len(), 5);
            let store = db.store();
            let a = &page[0];
            let key = old.unwrap(&a.owner_id, a.version, &a.wrapped_key).expect("unwrap");
            let wrapped = third.wrap(&a.owner_id, a.version, &key).expect("wrap");
            let applied = store
                .rewrap_keys(&[phi::Rewrap {
                    owner_id: a.owner_id.clone(),
                    version: a.version,
                    from_kek: old.id().to_owned(),
                    to_kek: third.id().to_owned(),
                    wrapped_key: wrapped.clone(),
                    audit: audit_event(&a.owner_id, phi::AuditAction::Rewrap, Some(a.version), Some(third.id())),
                }])
                .expect("the other process's rewrap");
            assert_eq!(applied, [true]);
            moved = Some((a.owner_id.clone(), a.version, wrapped));
            let b = page[1..]
                .iter()
                .find(|r| {
                    r.owner_id != a.owner_id
                        && store.load_keys(&[r.owner_id.as_str()]).expect("keys").len() == 1
                })
                .expect("an owner with one key in the first batch");
            let destroyed = store
                .destroy_keys(&b.owner_id, None, &audit_event(&b.owner_id, phi::AuditAction::Destroy, None, None))
                .expect("the other process's shred");
            assert_eq!(destroyed, [b.version]);
            shredded = Some(b.owner_id.clone());
        }
        Ok(())
    })
    .expect("rewrap");
    let (moved_owner, moved_version, moved_wrapped) = moved.expect("the first batch ran");
    let shredded = shredded.expect("the first batch ran");
    assert_eq!(batches, 2);
    assert_eq!((report.total, report.rewrapped, report.skipped, report.batches), (8, 6, 2, 2), "{report:?}");

    // The two rows are as the other process left them.
    let rows = db.store().load_keys(&owners.iter().map(String::as_str).collect::<Vec<_>>()).expect("keys");
    assert_eq!(rows.len(), 8);
    for row in &rows {
        if row.owner_id == moved_owner && row.version == moved_version {
            assert_eq!((row.kek_id.as_str(), &row.wrapped_key), (third.id(), &moved_wrapped), "left under the third KEK");
        } else if row.owner_id == shredded {
            assert_eq!(row.state, phi::KeyState::Destroyed, "not brought back");
            assert!(row.wrapped_key.is_empty(), "no wrapped key written over the shred");
        } else {
            assert_eq!(row.kek_id, new.id(), "{}/{} rewrapped", row.owner_id, row.version);
        }
    }
    // One `rewrap` audit record of this run per row it changed, none for the two.
    let mut conn = db.conn();
    let ours: Vec<(String, Option<i64>)> = encryption_key_audit::table
        .filter(encryption_key_audit::owner_id.eq_any(&owners))
        .filter(encryption_key_audit::action.eq("rewrap"))
        .filter(encryption_key_audit::actor.eq("race-test"))
        .select((encryption_key_audit::owner_id, encryption_key_audit::key_version))
        .load(&mut conn)
        .expect("audit");
    assert_eq!(ours.len(), 6, "{ours:?}");
    assert!(!ours.iter().any(|(o, v)| o == &shredded || (o == &moved_owner && *v == Some(i64::from(moved_version)))), "{ours:?}");
    // Every value but the shredded owner's opens under the new and the third KEK.
    let after = Keyring::builder(db.store(), new.clone()).unwrap_with(third.clone()).build().expect("keyring");
    for (i, (owner, value)) in sealed.iter().enumerate() {
        let opened = after.open::<String>(value.clone(), owner, NAME, b"r");
        if *owner == shredded {
            assert!(opened.is_err(), "{owner} was shredded");
        } else {
            assert_eq!(opened.expect("opens"), format!("value {i}"));
        }
    }
}

#[test]
fn rewrap_names_a_kek_that_is_not_configured() {
    let db = life_db();
    let tag = common::unique_owner("rw-missing");
    let (old, new) = rewrap_keks(&tag);
    let sealed = seed_rewrap(&db, &old, "rw-missing", 1);
    let keyring = Keyring::builder(db.store(), new).build().expect("keyring");
    let scope = RewrapOptions::default().from_kek(old.id().to_owned()).batch_size(5);
    let err = lifecycle::rewrap(&keyring, &scope).expect_err("old KEK missing");
    assert!(matches!(err, Error::UnknownKek { ref kek_id, .. } if kek_id == old.id()), "{err:?}");
    assert!(err.to_string().contains(&sealed[0].0));
    assert!(kek_ids_of(&db, &[sealed[0].0.clone()]).iter().all(|k| k == old.id()), "nothing changed");
}

#[test]
fn shredding_destroys_one_owner_and_nothing_else() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("shred");
    let other = common::unique_owner("shred-other");
    seed(&db, &keyring, &owner, 5);
    lifecycle::rotate(&keyring, &owner).expect("rotate");
    seed(&db, &keyring, &other, 5);
    let mut conn = db.conn();
    let report = lifecycle::shred(&mut conn, &keyring, &owner, &life_tables(), 3).expect("shred");
    assert_eq!(report.destroyed_versions, [1, 2]);
    assert!(report.verified(), "{report:?}");
    assert_eq!(report.sampled, 3 + 3 + 2, "three per column, two dobs exist");
    assert_eq!(report.still_open, 0);

    let states = key_states(&db, &owner);
    assert_eq!(states.len(), 2);
    for (_, state, _, wrapped_len) in &states {
        assert_eq!((state.as_str(), *wrapped_len), ("destroyed", 0), "key material erased");
    }
    // Nothing of the owner opens, in this process or a fresh one.
    let name: Vec<u8> = phi_it_life::table
        .find(format!("{owner}-0"))
        .select(phi_it_life::name)
        .first::<Option<Vec<u8>>>(&mut conn)
        .expect("row")
        .expect("name");
    for k in [&keyring, &db.keyring()] {
        let err = k.open(Encrypted::<String>::from_bytes(name.clone()), &owner, NAME, format!("{owner}-0").as_bytes()).expect_err("shredded");
        assert!(matches!(err, Error::Shredded { .. }), "{err:?}");
        // Sealing never creates a fresh key for a shredded owner.
        let err = k.seal(&"x".to_string(), &owner, NAME, b"r").expect_err("no new key");
        assert!(matches!(err, Error::Shredded { .. }), "{err:?}");
    }
    assert_eq!(key_states(&db, &owner).len(), 2, "no key row was added");
    assert!(matches!(lifecycle::rotate(&keyring, &owner), Err(Error::Shredded { .. })));
    // The other owner is untouched.
    assert_eq!(check_all_open(&db, &db.keyring(), &other, 5), [1]);
    let actions = audit_actions(&db, &owner);
    assert!(actions.contains(&("destroy".into(), Some(1))) && actions.contains(&("destroy".into(), Some(2))), "{actions:?}");
    // Shredding again destroys nothing more and still verifies.
    let again = lifecycle::shred(&mut conn, &keyring, &owner, &life_tables(), 3).expect("shred");
    assert!(again.destroyed_versions.is_empty() && again.verified(), "{again:?}");
    assert_eq!((again.key_rows, again.keys_left, again.columns, again.in_clear), (2, 0, 3, 0));
}

fn reasons(report: &lifecycle::ShredReport) -> Vec<UnverifiedReason> {
    match report.outcome() {
        ShredOutcome::NotVerified(reasons) => reasons,
        other => panic!("expected not verified, got {other:?}: {report:?}"),
    }
}

#[test]
fn shredding_a_mistyped_owner_is_not_verified_and_changes_nothing() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("shred-real");
    seed(&db, &keyring, &owner, 3);
    let mistyped = format!("{owner}x");
    let mut conn = db.conn();
    let report = lifecycle::shred(&mut conn, &keyring, &mistyped, &life_tables(), 3).expect("shred");
    assert!(report.destroyed_versions.is_empty() && report.key_rows == 0, "{report:?}");
    assert_eq!(reasons(&report), [UnverifiedReason::NoKeyRows, UnverifiedReason::NoSampledValues]);
    assert!(reasons(&report)[0].to_string().contains("mistyped"));
    assert!(key_states(&db, &mistyped).is_empty(), "no key row was created");
    assert_eq!(check_all_open(&db, &db.keyring(), &owner, 3), [1], "the real owner is untouched");
}

#[test]
fn shredding_without_tables_or_without_sampled_values_is_not_verified() {
    let db = life_db();
    let keyring = db.keyring();
    // Keys destroyed, but no table to check.
    let owner = common::unique_owner("shred-notables");
    seed(&db, &keyring, &owner, 2);
    let mut conn = db.conn();
    let report = lifecycle::shred(&mut conn, &keyring, &owner, &[], 3).expect("shred");
    assert_eq!(report.destroyed_versions, [1]);
    assert_eq!(reasons(&report), [UnverifiedReason::NoTables]);
    assert_eq!(key_states(&db, &owner)[0].1, "destroyed");
    // Tables, but the owner has a key and no stored value in them.
    let owner = common::unique_owner("shred-novalues");
    keyring.keys_for_seal(&owner).expect("a key");
    let report = lifecycle::shred(&mut conn, &keyring, &owner, &life_tables(), 3).expect("shred");
    assert_eq!((report.destroyed_versions.as_slice(), report.columns, report.sampled), (&[1][..], 3, 0));
    assert_eq!(reasons(&report), [UnverifiedReason::NoSampledValues]);
    // A sample of zero checks nothing either.
    let owner = common::unique_owner("shred-sample0");
    seed(&db, &keyring, &owner, 2);
    let report = lifecycle::shred(&mut conn, &keyring, &owner, &life_tables(), 0).expect("shred");
    assert_eq!(reasons(&report), [UnverifiedReason::NoSampledValues]);
}

/// A key store whose destroy does nothing: what a failed shred looks like.
#[derive(Debug)]
struct NoDestroy(Arc<phi::DieselKeyStore<Conn>>);

impl KeyStore for NoDestroy {
    fn load_keys(&self, owners: &[&str]) -> phi::Result<Vec<phi::StoredKey>> {
        self.0.load_keys(owners)
    }
    fn insert_key_if_absent(&self, key: &phi::StoredKey) -> phi::Result<bool> {
        self.0.insert_key_if_absent(key)
    }
    fn append_audit(&self, events: &[phi::AuditEvent]) -> phi::Result<()> {
        self.0.append_audit(events)
    }
    fn owners(&self) -> phi::Result<Vec<String>> {
        self.0.owners()
    }
    fn destroy_keys(&self, _owner: &str, _listed: Option<&[u32]>, _audit: &phi::AuditEvent) -> phi::Result<Vec<u32>> {
        Ok(Vec::new())
    }
    fn kek_check(&self, kek_id: &str) -> phi::Result<Option<phi::KekCheck>> {
        self.0.kek_check(kek_id)
    }
    fn insert_kek_check_if_absent(&self, kek_id: &str, check: &phi::KekCheck) -> phi::Result<bool> {
        self.0.insert_kek_check_if_absent(kek_id, check)
    }
}

#[test]
fn a_shred_whose_keys_survive_is_not_verified() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("shred-survives");
    seed(&db, &keyring, &owner, 4);
    let broken = Keyring::builder(Arc::new(NoDestroy(db.store())), common::local_kek())
        .build()
        .expect("keyring");
    let mut conn = db.conn();
    let report = lifecycle::shred(&mut conn, &broken, &owner, &life_tables(), 2).expect("shred");
    assert_eq!((report.key_rows, report.keys_left), (1, 1), "{report:?}");
    assert_eq!(report.sampled, 2 + 2 + 2);
    assert_eq!(
        reasons(&report),
        [
            UnverifiedReason::KeyMaterialLeft { rows: 1 },
            UnverifiedReason::StillOpen { values: 6, sampled: 6 }
        ]
    );
    assert_eq!(reasons(&report)[1].to_string(), "6 of 6 sampled value(s) still open");
}

/// The live key versions of `owner`, as a listing shows them.
fn listed_versions(db: &TestDb, owner: &str) -> Vec<u32> {
    db.store()
        .load_keys(&[owner])
        .expect("keys")
        .iter()
        .filter(|k| k.state != phi::KeyState::Destroyed)
        .map(|k| k.version)
        .collect()
}

#[test]
fn a_shred_of_what_was_listed_never_destroys_a_key_created_since() {
    let db = life_db();
    let keyring = db.keyring();
    let mut conn = db.conn();
    // Listed with no key at all; a key is created before the shred step.
    let owner = common::unique_owner("shred-listed-none");
    let listed = listed_versions(&db, &owner);
    assert!(listed.is_empty());
    seed(&db, &keyring, &owner, 3);
    let error = lifecycle::shred_listed(&mut conn, &keyring, &owner, &listed, &life_tables(), 3)
        .expect_err("a key created after the listing is refused");
    assert!(
        matches!(&error, Error::Refused { operation, owner: o, .. } if operation == "shred" && *o == owner),
        "{error:?}"
    );
    assert!(error.to_string().contains("[1]") && error.to_string().contains("nothing was destroyed"), "{error}");
    assert_eq!(key_states(&db, &owner)[0].1, "active");
    assert_eq!(check_all_open(&db, &db.keyring(), &owner, 3), [1], "the key created meanwhile still opens");

    // Listed with version 1; version 2 is created before the shred step.
    let listed = listed_versions(&db, &owner);
    assert_eq!(listed, [1]);
    lifecycle::rotate(&keyring, &owner).expect("rotate");
    let error = lifecycle::shred_listed(&mut conn, &keyring, &owner, &listed, &life_tables(), 3)
        .expect_err("version 2 was not listed");
    assert!(matches!(error, Error::Refused { .. }), "{error:?}");
    let states: Vec<String> = key_states(&db, &owner).into_iter().map(|k| k.1).collect();
    assert!(states.iter().all(|s| *s == "active"), "nothing destroyed: {states:?}");

    // What is listed is what is destroyed.
    let listed = listed_versions(&db, &owner);
    let report = lifecycle::shred_listed(&mut conn, &keyring, &owner, &listed, &life_tables(), 3).expect("shred");
    assert_eq!(report.destroyed_versions, [1, 2]);
    assert!(report.verified(), "{report:?}");
}

/// A key store that, right after answering the first listing of `owner`,
/// creates a key for it: the key created between the CLI's listing and its
/// shred step, at a fixed point.
#[derive(Debug)]
struct KeyAfterListing {
    inner: Arc<phi::DieselKeyStore<Conn>>,
    owner: String,
    armed: std::sync::atomic::AtomicBool,
}

impl KeyStore for KeyAfterListing {
    fn load_keys(&self, owners: &[&str]) -> phi::Result<Vec<phi::StoredKey>> {
        let rows = self.inner.load_keys(owners)?;
        if owners == [self.owner.as_str()] && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let other = Keyring::builder(self.inner.clone(), common::local_kek()).build().expect("keyring");
            other.seal(&"created meanwhile".to_string(), &self.owner, NAME, b"r").expect("creates a key");
        }
        Ok(rows)
    }
    fn insert_key_if_absent(&self, key: &phi::StoredKey) -> phi::Result<bool> {
        self.inner.insert_key_if_absent(key)
    }
    fn append_audit(&self, events: &[phi::AuditEvent]) -> phi::Result<()> {
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
    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> phi::Result<Vec<phi::StoredKey>> {
        self.inner.keys_page(wrapped_by, not_wrapped_by, after, limit)
    }
    fn destroy_keys(&self, owner: &str, listed: Option<&[u32]>, audit: &phi::AuditEvent) -> phi::Result<Vec<u32>> {
        self.inner.destroy_keys(owner, listed, audit)
    }
    fn audit(&self, owner: Option<&str>, limit: usize) -> phi::Result<Vec<phi::AuditRecord>> {
        self.inner.audit(owner, limit)
    }
    fn key_events_after(&self, after: i64, limit: usize) -> phi::Result<Vec<phi::feed::FeedEvent>> {
        self.inner.key_events_after(after, limit)
    }
    fn feed_head(&self) -> phi::Result<i64> {
        self.inner.feed_head()
    }
    fn append_key_events(&self, events: &[phi::feed::KeyEvent], audit: &[phi::AuditEvent]) -> phi::Result<i64> {
        self.inner.append_key_events(events, audit)
    }
}

#[test]
fn the_cli_stops_when_it_lists_no_key_and_never_destroys_one_created_since() {
    let db = life_db();
    let owner = common::unique_owner("cli-shred-none");
    let store = Arc::new(KeyAfterListing {
        inner: db.store(),
        owner: owner.clone(),
        armed: std::sync::atomic::AtomicBool::new(true),
    });
    let keyring = Keyring::builder(store.clone(), common::local_kek())
        .actor("cli-test")
        .build()
        .expect("keyring");
    let code = phi::cli::App::new(db.url.clone(), keyring).run_from([
        "phi", "-qq", "--format", "json", "keys", "shred", "--owner", &owner, "--yes",
    ]);
    assert!(!store.armed.load(std::sync::atomic::Ordering::SeqCst), "the owner's keys were listed");
    assert_eq!(code, std::process::ExitCode::from(3), "refused: nothing was listed");
    let states = key_states(&db, &owner);
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].1, "active", "the key created after the listing is not destroyed");
    let opened: String = db
        .keyring()
        .open(
            db.keyring().seal(&"still here".to_string(), &owner, NAME, b"r").expect("seals"),
            &owner,
            NAME,
            b"r",
        )
        .expect("opens");
    assert_eq!(opened, "still here");
}

#[test]
fn values_stored_in_the_clear_are_counted_not_protected() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("shred-clear");
    seed(&db, &keyring, &owner, 3);
    let mut conn = db.conn();
    // Two rows of the owner never sealed (flag off): plain bytes.
    for i in 0..2 {
        diesel::insert_into(phi_it_life::table)
            .values((
                phi_it_life::id.eq(format!("{owner}-plain-{i}")),
                phi_it_life::owner_id.eq(&owner),
                phi_it_life::name.eq(Some(b"Plain Name".to_vec())),
                phi_it_life::note.eq(None::<Vec<u8>>),
            ))
            .execute(&mut conn)
            .expect("plain row");
    }
    let report = lifecycle::shred(&mut conn, &keyring, &owner, &life_tables(), 10).expect("shred");
    assert_eq!(report.in_clear, 2, "{report:?}");
    assert_eq!(report.sampled, 3 + 2 + 1, "plain values are not sampled as sealed ones");
    assert!(report.verified(), "the sealed values are shredded: {report:?}");
}

// --- Crash recovery: a child process is killed in the middle of a job and
// the parent resumes it.

fn child_test_name(name: &str) -> String {
    format!("{}::{name}", module_path!().split_once("::").expect("module path").1)
}

/// Runs the ignored test `name` as a child process, reads its output until
/// it reports `kill_after` committed batches, then kills it (SIGKILL).
/// Returns the progress lines read.
fn run_and_kill(name: &str, envs: &[(&str, String)], kill_after: usize) -> Vec<String> {
    let mut command = std::process::Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", &child_test_name(name), "--ignored", "--nocapture", "--test-threads=1"])
        .stdout(std::process::Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("child starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.expect("child output");
        if line.contains("PHI_BATCH ") {
            lines.push(line);
            if lines.len() == kill_after {
                break;
            }
        } else if line.contains("PHI_DONE") {
            panic!("the child finished before it could be killed: {lines:?}");
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("child exit");
    assert!(!status.success(), "the child was killed, not finished");
    assert_eq!(lines.len(), kill_after, "the child reported progress before it was killed");
    lines
}

#[allow(clippy::print_stdout)]
fn report_batch(n: u64) {
    println!("PHI_BATCH {n}");
    // Slow enough for the parent to kill the process mid-job.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
#[ignore = "run as a child process by a_killed_rewrap_resumes_with_nothing_lost"]
fn life_child_rewraps_slowly() {
    let Ok(url) = std::env::var("PHI_LIFE_URL") else {
        return;
    };
    let tag = std::env::var("PHI_LIFE_TAG").expect("tag");
    let (old, new) = rewrap_keks(&tag);
    let store = Arc::new(phi::DieselKeyStore::<Conn>::builder(&url).run_migrations(true).connect().expect("store"));
    let keyring = Keyring::builder(store, new).unwrap_with(old.clone()).build().expect("keyring");
    let scope = RewrapOptions::default().from_kek(old.id().to_owned()).batch_size(3);
    lifecycle::rewrap(&keyring, &scope.clone().progress(|p| report_batch(p.rewrapped))).expect("rewrap");
    #[allow(clippy::print_stdout)]
    {
        println!("PHI_DONE");
    }
}

#[test]
fn a_killed_rewrap_resumes_with_nothing_lost() {
    let db = life_db();
    let tag = common::unique_owner("rw-kill");
    let (old, new) = rewrap_keks(&tag);
    let sealed = seed_rewrap(&db, &old, "rw-kill", 18);
    let owners: Vec<String> = sealed.iter().map(|(o, _)| o.clone()).collect();
    run_and_kill("life_child_rewraps_slowly", &[("PHI_LIFE_URL", db.url.clone()), ("PHI_LIFE_TAG", tag.clone())], 2);

    // Killed midway: some keys moved, some not, and every value still opens
    // with both KEKs configured.
    let keks = kek_ids_of(&db, &owners);
    let moved = keks.iter().filter(|k| *k == new.id()).count();
    assert!(moved >= 6 && moved < keks.len(), "killed after two batches of three: {moved} of {}", keks.len());
    let both = Keyring::builder(db.store(), new.clone()).unwrap_with(old.clone()).build().expect("keyring");
    for (i, (owner, value)) in sealed.iter().enumerate() {
        assert_eq!(both.open(value.clone(), owner, NAME, b"r").expect("opens mid-rotation"), format!("value {i}"));
    }

    let scope = RewrapOptions::default().from_kek(old.id().to_owned()).batch_size(3);
    let report = lifecycle::rewrap(&both, &scope).expect("resume");
    assert_eq!(report.rewrapped, (keks.len() - moved) as u64, "the resumed run did only what was left");
    check_rewrapped(&db, &new, &sealed);
}

#[test]
#[ignore = "run as a child process by a_killed_reseal_resumes_with_nothing_lost"]
fn life_child_reseals_slowly() {
    let Ok(url) = std::env::var("PHI_LIFE_URL") else {
        return;
    };
    let owner = std::env::var("PHI_LIFE_OWNER").expect("owner");
    let store = Arc::new(phi::DieselKeyStore::<Conn>::builder(&url).run_migrations(true).connect().expect("store"));
    let keyring = Keyring::builder(store, common::local_kek()).build().expect("keyring");
    let mut conn = Conn::establish(&url).expect("connection");
    if server_url().is_none() {
        // Waits for the keyring's background audit writes, as an SQLite
        // application's connection must.
        diesel::sql_query("PRAGMA busy_timeout = 10000").execute(&mut conn).expect("busy timeout");
    }
    lifecycle::reseal(&mut conn, &keyring, &owner, &life_tables(), &ResealOptions::default().batch_size(4).progress(|p| report_batch(p.resealed)))
        .expect("reseal");
    #[allow(clippy::print_stdout)]
    {
        println!("PHI_DONE");
    }
}

#[test]
fn a_killed_reseal_resumes_with_nothing_lost() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("reseal-kill");
    seed(&db, &keyring, &owner, 30);
    assert_eq!(lifecycle::rotate(&keyring, &owner).expect("rotate"), 2);
    run_and_kill("life_child_reseals_slowly", &[("PHI_LIFE_URL", db.url.clone()), ("PHI_LIFE_OWNER", owner.clone())], 2);

    let mut conn = db.conn();
    let tables = life_tables();
    let usage = lifecycle::usage(&mut conn, &owner, &tables).expect("usage");
    let on = |v: u32| usage.iter().filter(|u| u.key_version == v).map(|u| u.values).sum::<u64>();
    let total = 30 + 20 + 10;
    assert_eq!(on(1) + on(2), total, "no value lost or duplicated: {usage:?}");
    assert!(on(2) >= 8 && on(1) > 0, "killed midway: {usage:?}");
    // Mixed versions all open meanwhile.
    assert_eq!(check_all_open(&db, &db.keyring(), &owner, 30), [1, 2]);

    let report = lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &ResealOptions::default().batch_size(4)).expect("resume");
    assert_eq!(report.resealed, on(1), "the resumed run did only what was left");
    assert_eq!(check_all_open(&db, &db.keyring(), &owner, 30), [2]);
    assert!(lifecycle::retire(&mut conn, &keyring, &owner, 1, &tables).expect("retire"));
}

#[test]
fn coverage_of_an_owners_query_and_the_audit_trail() {
    let db = life_db();
    let keyring = db.keyring();
    let prefix = common::unique_owner("cov");
    let (with_key, shredded, without) = (format!("{prefix}-a"), format!("{prefix}-b"), format!("{prefix}-c"));
    seed(&db, &keyring, &with_key, 2);
    seed(&db, &keyring, &shredded, 1);
    let mut conn = db.conn();
    lifecycle::shred(&mut conn, &keyring, &shredded, &life_tables(), 1).expect("shred");
    let store = db.store();
    // Any first column, any name and type: an id column, a literal, a number.
    let query = format!(
        "SELECT owner_id FROM phi_it_life WHERE owner_id LIKE '{prefix}-%' \
         UNION SELECT '{without}' UNION SELECT '{with_key}'"
    );
    let cov = lifecycle::coverage(store.as_ref(), &format!("{query};")).expect("coverage");
    assert_eq!((cov.owners, cov.with_active_key, cov.shredded), (3, 1, 1), "{cov:?}");
    assert_eq!(cov.without_key, std::slice::from_ref(&without));
    assert!(cov.all_retired.is_empty());
    let numbers = store.owners_from_query("SELECT 42 UNION SELECT 7").expect("numbers as text");
    assert_eq!(numbers, ["42", "7"]);
    let err = store.owners_from_query("SELECT 1; DELETE FROM phi_it_life").expect_err("one statement");
    assert!(err.to_string().contains("single SELECT"), "{err}");
    assert!(store.owners_from_query("SELECT no_such_column FROM phi_it_life").is_err());
    // A query that would close the wrapper early behind an unterminated block
    // comment (MariaDB accepts one) and write a file on the database host.
    let outfile = std::env::temp_dir().join(format!("phi-owners-{}.txt", std::process::id()));
    let escape = format!(
        "SELECT 'a') SELECT 'b' FROM phi_owners INTO OUTFILE '{}' /*",
        outfile.display()
    );
    let err = store.owners_from_query(&escape).expect_err("a block comment is refused");
    assert!(err.to_string().contains("block comment"), "{err}");
    let err = store
        .owners_from_query(&format!("SELECT 'b' INTO OUTFILE '{}'", outfile.display()))
        .expect_err("INTO is refused");
    assert!(err.to_string().contains("INTO"), "{err}");
    assert!(!outfile.exists(), "no file was written");
    // A failing query on an application table names table, column and owner.
    let missing = [ResealTable::new("phi_it_no_such_table", "owner_id").column("x")];
    let err = lifecycle::usage(&mut conn, &with_key, &missing).expect_err("no such table");
    assert!(matches!(err, Error::DataTable { .. }), "{err:?}");
    assert!(err.to_string().contains("phi_it_no_such_table.x") && err.to_string().contains(&with_key), "{err}");

    // Generating covers the owner without a key, and only it.
    let created = lifecycle::generate(&keyring, &cov.without_key, &GenerateOptions::default()).expect("generate");
    assert_eq!(created, 1);
    let cov = lifecycle::coverage(store.as_ref(), &query).expect("coverage");
    assert_eq!((cov.with_active_key, cov.without_key.len(), cov.shredded), (2, 0, 1));

    // The audit trail, newest first, of one owner or of all.
    let records = store.audit(Some(&shredded), 10).expect("audit");
    let actions: Vec<String> = records.iter().map(|r| r.event.action.to_string()).collect();
    assert_eq!(actions.first().map(String::as_str), Some("destroy"), "{actions:?}");
    assert_eq!(actions.last().map(String::as_str), Some("generate"), "{actions:?}");
    assert!(records.windows(2).all(|w| w[0].id > w[1].id));
    assert!(records.iter().all(|r| r.event.owner_id == shredded && r.event.actor == "integration-test"));
    assert_eq!(store.audit(None, 2).expect("audit").len(), 2);
    let counts = store.key_counts().expect("counts");
    assert!(counts.iter().any(|c| c.state == phi::KeyState::Destroyed && c.keys >= 1), "{counts:?}");
}

#[test]
fn reseal_moves_a_value_copied_to_two_rows_without_a_row_key() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("reseal-copy");
    let date = NaiveDate::from_ymd_opt(1971, 2, 3).expect("date");
    let bytes = keyring.seal(&date, &owner, DOB, b"").expect("seal").into_bytes();
    let mut conn = db.conn();
    for seq in [1, 2] {
        diesel::insert_into(phi_it_life_nokey::table)
            .values((
                phi_it_life_nokey::owner_id.eq(&owner),
                phi_it_life_nokey::seq.eq(seq),
                phi_it_life_nokey::dob.eq(Some(bytes.clone())),
            ))
            .execute(&mut conn)
            .expect("insert");
    }
    lifecycle::rotate(&keyring, &owner).expect("rotate");
    let tables = [ResealTable::new("phi_it_life_nokey", "owner_id").column("dob")];
    let report = lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &ResealOptions::default().batch_size(10)).expect("reseal");
    assert_eq!((report.total, report.resealed, report.conflicts), (2, 2, 0));
    let stored: Vec<Option<Vec<u8>>> = phi_it_life_nokey::table
        .filter(phi_it_life_nokey::owner_id.eq(&owner))
        .select(phi_it_life_nokey::dob)
        .load(&mut conn)
        .expect("rows");
    for value in stored {
        let value = Encrypted::<NaiveDate>::from_bytes(value.expect("dob"));
        assert_eq!(value.key_version(), Some(2));
        assert_eq!(db.keyring().open(value, &owner, DOB, b"").expect("opens"), date);
    }
}

/// A connection that waits for another's write lock (SQLite) instead of failing.
fn waiting_conn(db: &TestDb) -> Conn {
    let mut conn = db.conn();
    phi::PhiConnection::prepare_key_store(&mut conn).expect("busy timeout");
    conn
}

#[test]
fn reseal_never_overwrites_a_concurrent_write() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("reseal-race");
    let n = 24;
    seed(&db, &keyring, &owner, n);
    lifecycle::rotate(&keyring, &owner).expect("rotate");
    let tables = life_tables();
    let report = std::thread::scope(|s| {
        // The application rewrites every name, from the last row to the first,
        // while the job re-seals from the first to the last.
        s.spawn(|| {
            let mut conn = waiting_conn(&db);
            let keys = keyring.keys_for_seal(&owner).expect("keys");
            for i in (0..n).rev() {
                let id = format!("{owner}-{i}");
                let name = keys.seal(&format!("updated {i}"), NAME, id.as_bytes()).expect("seal");
                diesel::update(phi_it_life::table.find(&id))
                    .set(phi_it_life::name.eq(Some(name.into_bytes())))
                    .execute(&mut conn)
                    .expect("application write");
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        let mut conn = waiting_conn(&db);
        lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &ResealOptions::default().batch_size(2).progress(|_| {
            std::thread::sleep(Duration::from_millis(5));
        }))
        .expect("reseal")
    });
    assert!(report.resealed <= report.total);
    // Every application write survived, and everything is on version 2.
    let mut conn = db.conn();
    let rows: Vec<(String, Option<Vec<u8>>)> = phi_it_life::table
        .filter(phi_it_life::owner_id.eq(&owner))
        .select((phi_it_life::id, phi_it_life::name))
        .load(&mut conn)
        .expect("rows");
    assert_eq!(rows.len(), n);
    let fresh = db.keyring();
    for (id, name) in rows {
        let i = id.rsplit('-').next().expect("index");
        let name = Encrypted::<String>::from_bytes(name.expect("name"));
        assert_eq!(name.key_version(), Some(2));
        assert_eq!(fresh.open(name, &owner, NAME, id.as_bytes()).expect("opens"), format!("updated {i}"));
    }
    let usage = lifecycle::usage(&mut conn, &owner, &tables).expect("usage");
    assert!(usage.iter().all(|u| u.key_version == 2), "{usage:?}");
}

// --- Tables of derived models with integer owners and row keys.

diesel::table! {
    phi_it_visits (id) {
        id -> BigInt,
        user_id -> BigInt,
        reason -> Binary,
        notes -> Nullable<Binary>,
    }
}

use phi::PhiRecord as _;

/// A derived model whose owner and row key are `BIGINT` columns.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(crate = phi, table = phi_it_visits, debug)]
struct Visit {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    user_id: i64,
    #[phi(encrypt)]
    reason: String,
    #[phi(encrypt)]
    notes: Option<String>,
}

diesel::table! {
    phi_it_small_visits (user_id, seq) {
        user_id -> Integer,
        seq -> SmallInt,
        reason -> Binary,
    }
}

/// A derived model whose owner is an `INT` and row key a `SMALLINT` column.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(crate = phi, table = phi_it_small_visits, debug)]
#[diesel(primary_key(user_id, seq))]
struct SmallVisit {
    #[phi(owner)]
    user_id: i32,
    #[phi(row_key)]
    seq: i16,
    #[phi(encrypt)]
    reason: String,
}

/// An integer no other test (or earlier run against the same server) uses.
fn unique_int() -> i64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    i64::try_from(micros * 1000 + u128::from(n % 1000)).expect("fits until 2262")
}

fn visits_db() -> TestDb {
    let db = TestDb::new();
    let mut conn = db.conn();
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_visits (id BIGINT NOT NULL PRIMARY KEY, \
             user_id BIGINT NOT NULL, reason {BLOB} NOT NULL, notes {BLOB} NULL)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_small_visits (user_id INT NOT NULL, \
             seq SMALLINT NOT NULL, reason {BLOB} NOT NULL, PRIMARY KEY (user_id, seq))"
        ),
    ] {
        diesel::sql_query(ddl).execute(&mut conn).expect("integer-keyed test tables");
    }
    db
}

fn visits_table() -> ResealTable {
    ResealTable::parse("phi_it_visits:user_id#i64:id#i64:reason,notes").expect("table description")
}

/// Seals and inserts `n` visits of `owner` (every third note NULL).
fn seed_visits(conn: &mut Conn, keyring: &Keyring, owner: i64, n: usize) -> Vec<Visit> {
    let visits: Vec<Visit> = (0..n)
        .map(|i| Visit {
            id: unique_int(),
            user_id: owner,
            reason: format!("reason {i} of {owner}"),
            notes: (i % 3 != 0).then(|| format!("note {i}")),
        })
        .collect();
    for row in Visit::seal_all(&visits, keyring).expect("seal") {
        diesel::insert_into(phi_it_visits::table).values(&row).execute(conn).expect("insert");
    }
    visits
}

/// Loads `owner`'s visits through the model, checking them against
/// `expected`, and returns the key versions of their stored values.
fn check_visits(conn: &mut Conn, keyring: &Keyring, owner: i64, expected: &[Visit]) -> Vec<u32> {
    let mut loaded = Visit::load(
        phi_it_visits::table.filter(phi_it_visits::user_id.eq(owner)).order(phi_it_visits::id),
        conn,
        keyring,
    )
    .expect("every visit opens");
    let mut expected = expected.to_vec();
    expected.sort_by_key(|v| v.id);
    loaded.sort_by_key(|v| v.id);
    assert!(loaded == expected, "visits of {owner} load unchanged");
    let raw: Vec<(Vec<u8>, Option<Vec<u8>>)> = phi_it_visits::table
        .filter(phi_it_visits::user_id.eq(owner))
        .select((phi_it_visits::reason, phi_it_visits::notes))
        .load(conn)
        .expect("raw columns");
    let mut versions: Vec<u32> = raw
        .into_iter()
        .flat_map(|(reason, notes)| [Some(reason), notes])
        .flatten()
        .map(|bytes| u32::from_be_bytes(bytes[2..6].try_into().expect("header")))
        .collect();
    versions.sort_unstable();
    versions.dedup();
    versions
}

#[test]
fn reseal_and_retire_on_a_derived_model_with_integer_owner_and_row_key() {
    let db = visits_db();
    let keyring = db.keyring();
    let mut conn = db.conn();
    let (owner, other) = (unique_int(), unique_int());
    let mine = seed_visits(&mut conn, &keyring, owner, 11);
    let theirs = seed_visits(&mut conn, &keyring, other, 4);
    let tables = [visits_table()];
    let (owner_id, other_id) = (owner.to_string(), other.to_string());

    assert_eq!(lifecycle::rotate(&keyring, &owner_id).expect("rotate"), 2);
    let err = lifecycle::retire(&mut conn, &keyring, &owner_id, 1, &tables).expect_err("in use");
    assert!(matches!(err, Error::KeyInUse { rows: 11, .. }), "{err:?}");

    let report = lifecycle::reseal(&mut conn, &keyring, &owner_id, &tables, &ResealOptions::default().batch_size(4)).expect("reseal");
    let notes = (0..11).filter(|i| i % 3 != 0).count() as u64;
    assert_eq!((report.total, report.resealed, report.conflicts), (11 + notes, 11 + notes, 0));
    assert!(report.batches >= 4, "worked in batches: {report:?}");
    assert_eq!(check_visits(&mut conn, &db.keyring(), owner, &mine), [2], "every value on version 2");
    let usage = lifecycle::usage(&mut conn, &owner_id, &tables).expect("usage");
    assert!(!usage.is_empty() && usage.iter().all(|u| u.key_version == 2), "{usage:?}");
    let again = lifecycle::reseal(&mut conn, &keyring, &owner_id, &tables, &ResealOptions::default().batch_size(4)).expect("reseal");
    assert_eq!((again.total, again.resealed), (0, 0));

    assert!(lifecycle::retire(&mut conn, &keyring, &owner_id, 1, &tables).expect("retire"));
    assert_eq!(key_states(&db, &owner_id).iter().map(|(v, s, _, _)| (*v, s.clone())).collect::<Vec<_>>(), [
        (1, "retired".to_owned()),
        (2, "active".to_owned())
    ]);
    // The other owner was not touched.
    assert_eq!(check_visits(&mut conn, &db.keyring(), other, &theirs), [1]);
    assert_eq!(key_states(&db, &other_id).len(), 1);

    // An owner id that is no integer is refused, naming table and column.
    let err = lifecycle::usage(&mut conn, "provider-17", &tables).expect_err("not an integer");
    assert!(err.to_string().contains("phi_it_visits.user_id") && err.to_string().contains("provider-17"), "{err}");
}

#[test]
fn reseal_on_int_and_smallint_owner_and_row_key_columns() {
    let db = visits_db();
    let keyring = db.keyring();
    let mut conn = db.conn();
    let owner = i32::try_from(unique_int() % i64::from(i32::MAX)).expect("fits");
    let visits: Vec<SmallVisit> = (0..5i16)
        .map(|seq| SmallVisit { user_id: owner, seq: seq * 300 - 600, reason: format!("visit {seq}") })
        .collect();
    for row in SmallVisit::seal_all(&visits, &keyring).expect("seal") {
        diesel::insert_into(phi_it_small_visits::table).values(&row).execute(&mut conn).expect("insert");
    }
    let owner_id = owner.to_string();
    lifecycle::rotate(&keyring, &owner_id).expect("rotate");
    let tables = [ResealTable::new("phi_it_small_visits", "user_id")
        .owner_column_type(lifecycle::ColumnType::I32)
        .key_column_typed("seq", lifecycle::ColumnType::I16)
        .column("reason")];
    let report = lifecycle::reseal(&mut conn, &keyring, &owner_id, &tables, &ResealOptions::default().batch_size(2)).expect("reseal");
    assert_eq!((report.total, report.resealed), (5, 5));
    let loaded = SmallVisit::load(
        phi_it_small_visits::table.filter(phi_it_small_visits::user_id.eq(owner)).order(phi_it_small_visits::seq),
        &mut conn,
        &db.keyring(),
    )
    .expect("every visit opens");
    assert!(loaded == visits, "visits load unchanged");
    assert!(lifecycle::retire(&mut conn, &keyring, &owner_id, 1, &tables).expect("retire"));
}

#[test]
fn shredding_an_integer_owner_verifies() {
    let db = visits_db();
    let keyring = db.keyring();
    let mut conn = db.conn();
    let (owner, other) = (unique_int(), unique_int());
    seed_visits(&mut conn, &keyring, owner, 5);
    lifecycle::rotate(&keyring, &owner.to_string()).expect("rotate");
    let theirs = seed_visits(&mut conn, &keyring, other, 3);
    let tables = [visits_table()];
    let report = lifecycle::shred(&mut conn, &keyring, &owner.to_string(), &tables, 3).expect("shred");
    assert_eq!(report.destroyed_versions, [1, 2]);
    assert!(report.verified(), "{report:?}");
    assert_eq!(report.sampled, 3 + 3, "three per column");
    let err = Visit::load(phi_it_visits::table.filter(phi_it_visits::user_id.eq(owner)), &mut conn, &db.keyring())
        .expect_err("shredded");
    assert!(err.to_string().contains(&owner.to_string()), "{err}");
    assert_eq!(check_visits(&mut conn, &db.keyring(), other, &theirs), [1]);
}

/// One owner's rows: id, name, note.
type LifeRow = (String, Option<Vec<u8>>, Option<Vec<u8>>);

fn life_rows(conn: &mut Conn, owner: &str) -> Vec<LifeRow> {
    phi_it_life::table
        .filter(phi_it_life::owner_id.eq(owner))
        .order(phi_it_life::id)
        .select((phi_it_life::id, phi_it_life::name, phi_it_life::note))
        .load(conn)
        .expect("rows")
}

#[test]
fn an_owners_query_that_writes_is_refused_and_changes_nothing() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("ro");
    seed(&db, &keyring, &owner, 2);
    let mut conn = db.conn();
    let (keys_before, rows_before) = (key_states(&db, &owner), life_rows(&mut conn, &owner));
    // One pooled connection, so the checks after each refusal run on the
    // very connection the owners query used.
    let pool = diesel::r2d2::Pool::builder()
        .max_size(1)
        .build(diesel::r2d2::ConnectionManager::<Conn>::new(&db.url))
        .expect("pool");
    let store = Arc::new(phi::DieselKeyStore::new(pool));
    let mut writes = vec![
        format!("DELETE FROM user_encryption_keys WHERE owner_id = '{owner}' RETURNING owner_id"),
        format!("UPDATE phi_it_life SET name = NULL WHERE owner_id = '{owner}' RETURNING owner_id"),
        format!("INSERT INTO phi_it_life (id, owner_id) VALUES ('{owner}-new', '{owner}') RETURNING owner_id"),
    ];
    let function = format!("phi_it_ro_{}", std::process::id());
    let mysql = server_url().is_some() && BLOB == "BLOB";
    if mysql {
        // MySQL / MariaDB accept no data-modifying CTE; a function that
        // writes is the way a SELECT can.
        diesel::sql_query(format!("DROP FUNCTION IF EXISTS {function}")).execute(&mut conn).expect("drop");
        diesel::sql_query(format!(
            "CREATE FUNCTION {function}() RETURNS VARCHAR(255) MODIFIES SQL DATA NOT DETERMINISTIC \
             BEGIN DELETE FROM phi_it_life WHERE owner_id = '{owner}'; RETURN '{owner}'; END"
        ))
        .execute(&mut conn)
        .expect("a writing function");
        writes.push(format!("SELECT {function}()"));
    }
    for (i, query) in writes.iter().enumerate() {
        let err = store.owners_from_query(query).expect_err("a writing owners query is refused");
        let text = format!("{err} {:?}", std::error::Error::source(&err));
        assert!(text.contains("owners query"), "{text}");
        if query.starts_with("INSERT") {
            // Refused before it reaches the database: an owners query has no INTO.
            assert!(text.contains("must not contain INTO"), "{text}");
        } else if BLOB == "BYTEA" {
            assert!(text.contains("read-only transaction"), "PostgreSQL refuses it as a write: {text}");
        }
        if mysql && i == writes.len() - 1 {
            assert!(text.contains("READ ONLY"), "MySQL refuses the function's write: {text}");
        }
        assert_eq!(key_states(&db, &owner), keys_before, "{query}: no key row changed");
        assert_eq!(life_rows(&mut conn, &owner), rows_before, "{query}: no data row changed");
        // The connection is read-write again for the key store.
        let fresh = common::unique_owner("ro-after");
        let keyring = Keyring::builder(store.clone(), common::local_kek()).build().expect("keyring");
        keyring.keys_for_seal(&fresh).expect("the key store still writes");
        assert_eq!(key_states(&db, &fresh).len(), 1);
    }
    if mysql {
        diesel::sql_query(format!("DROP FUNCTION {function}")).execute(&mut conn).expect("drop");
    }
    // A reading query still works, and leaves the connection writable.
    let owners = store
        .owners_from_query(&format!("SELECT owner_id FROM phi_it_life WHERE owner_id = '{owner}'"))
        .expect("a reading query");
    assert_eq!(owners, [owner]);
    let fresh = common::unique_owner("ro-after");
    let keyring = Keyring::builder(store, common::local_kek()).build().expect("keyring");
    keyring.keys_for_seal(&fresh).expect("the key store still writes");
}

diesel::table! {
    phi_it_flagged (id) {
        id -> Varchar,
        owner_id -> Varchar,
        payload -> Nullable<Binary>,
        amount -> Binary,
        phi_encrypted -> Bool,
    }
}

/// A gradual roll-out: some rows sealed, some stored plain.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(crate = phi, table = phi_it_flagged, debug)]
struct Flagged {
    #[phi(row_key)]
    id: String,
    #[phi(owner)]
    owner_id: String,
    #[phi(encrypt)]
    payload: Option<Vec<u8>>,
    #[phi(encrypt)]
    amount: i64,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

diesel::table! {
    phi_it_flagged_int (id) {
        id -> BigInt,
        clinic_id -> BigInt,
        payload -> Binary,
        sealed -> SmallInt,
    }
}

/// The same with an integer flag, owner and row key.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(crate = phi, table = phi_it_flagged_int, debug)]
struct FlaggedInt {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    clinic_id: i64,
    #[phi(encrypt)]
    payload: Vec<u8>,
    #[phi(encrypted_flag)]
    sealed: i16,
}

fn flagged_db() -> TestDb {
    let db = TestDb::new();
    let mut conn = db.conn();
    for ddl in [
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_flagged (id VARCHAR(255) NOT NULL PRIMARY KEY, \
             owner_id VARCHAR(255) NOT NULL, payload {BLOB} NULL, amount {BLOB} NOT NULL, \
             phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS phi_it_flagged_int (id BIGINT NOT NULL PRIMARY KEY, \
             clinic_id BIGINT NOT NULL, payload {BLOB} NOT NULL, sealed SMALLINT NOT NULL DEFAULT 0)"
        ),
    ] {
        diesel::sql_query(ddl).execute(&mut conn).expect("flagged test tables");
    }
    db
}

/// Plain bytes that begin like an envelope v1 of key version 1: a 34-byte
/// binary value (an envelope's minimum length) and an integer.
fn envelope_lookalike(tag: u8) -> Vec<u8> {
    let mut bytes = vec![0xF1, 0x01, 0, 0, 0, 1];
    bytes.resize(34, tag);
    bytes
}
const LOOKALIKE_INT: i64 = i64::from_be_bytes([0xF1, 0x01, 0, 0, 0, 1, 0x22, 0x33]);

#[test]
fn reseal_retire_usage_and_shred_leave_rows_with_the_flag_off_alone() {
    let db = flagged_db();
    let keyring = db.keyring();
    let plain = db.keyring();
    plain.set_rollout(phi::Rollout::Nobody);
    let mut conn = db.conn();
    let owner = common::unique_owner("flagged");
    let row = |i: usize, payload: Option<Vec<u8>>, amount: i64| Flagged {
        id: format!("{owner}-{i}"),
        owner_id: owner.clone(),
        payload,
        amount,
        phi_encrypted: false,
    };
    let sealed_rows = [row(0, Some(vec![1, 2, 3]), 10), row(1, None, 20), row(2, Some(envelope_lookalike(7)), 30)];
    let plain_rows = [row(3, Some(envelope_lookalike(9)), LOOKALIKE_INT), row(4, None, LOOKALIKE_INT)];
    for (rows, k) in [(&sealed_rows[..], &keyring), (&plain_rows[..], &plain)] {
        let stored = Flagged::seal_all(rows, k).expect("seal");
        diesel::insert_into(phi_it_flagged::table).values(&stored).execute(&mut conn).expect("insert");
    }
    let raw_plain = |conn: &mut Conn| -> Vec<(Option<Vec<u8>>, Vec<u8>, bool)> {
        phi_it_flagged::table
            .filter(phi_it_flagged::id.eq_any([&plain_rows[0].id, &plain_rows[1].id]))
            .order(phi_it_flagged::id)
            .select((phi_it_flagged::payload, phi_it_flagged::amount, phi_it_flagged::phi_encrypted))
            .load(conn)
            .expect("raw rows")
    };
    let plain_before = raw_plain(&mut conn);
    assert_eq!(plain_before[0].0.as_deref().map(|b| &b[..2]), Some(&[0xF1, 0x01][..]), "a plain value that looks like an envelope");
    assert_eq!(&plain_before[1].1[..2], &[0xF1, 0x01]);

    // The derived model describes its table with the flag, as the CLI
    // description does.
    let table = Flagged::reseal_table().expect("description");
    assert_eq!(table, ResealTable::parse("phi_it_flagged:owner_id:id:payload,amount:phi_encrypted").expect("parses"));
    assert_eq!(table.to_string(), "phi_it_flagged:owner_id:id:payload,amount:phi_encrypted");
    let tables = [table];
    // Without the flag, the plain values pass for version-1 envelopes.
    let blind = [ResealTable::parse("phi_it_flagged:owner_id:id:payload,amount").expect("parses")];
    let count = |usage: &[lifecycle::VersionUsage]| -> u64 { usage.iter().map(|u| u.values).sum() };
    assert_eq!(count(&lifecycle::usage(&mut conn, &owner, &blind).expect("usage")), 2 + 3 + 1 + 2);

    assert_eq!(lifecycle::rotate(&keyring, &owner).expect("rotate"), 2);
    let usage = lifecycle::usage(&mut conn, &owner, &tables).expect("usage");
    assert!(usage.iter().all(|u| u.key_version == 1), "{usage:?}");
    assert_eq!(count(&usage), 2 + 3, "only the sealed rows' values");
    let err = lifecycle::retire(&mut conn, &keyring, &owner, 1, &tables).expect_err("in use");
    assert!(matches!(err, Error::KeyInUse { rows: 2, ref column, .. } if column == "payload"), "{err:?}");

    let report = lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &ResealOptions::default().batch_size(2)).expect("reseal");
    assert_eq!((report.total, report.resealed, report.conflicts), (5, 5, 0), "{report:?}");
    let usage = lifecycle::usage(&mut conn, &owner, &tables).expect("usage");
    assert!(usage.iter().all(|u| u.key_version == 2) && count(&usage) == 5, "{usage:?}");
    assert!(lifecycle::retire(&mut conn, &keyring, &owner, 1, &tables).expect("retire"));

    // The plain rows are untouched and read as they were written.
    assert_eq!(raw_plain(&mut conn), plain_before);
    let loaded = Flagged::load(
        phi_it_flagged::table.filter(phi_it_flagged::owner_id.eq(&owner)).order(phi_it_flagged::id),
        &mut conn,
        &db.keyring(),
    )
    .expect("every row reads");
    let expected: Vec<Flagged> = sealed_rows
        .iter()
        .map(|r| Flagged { phi_encrypted: true, ..r.clone() })
        .chain(plain_rows.iter().cloned())
        .collect();
    assert_eq!(loaded, expected);

    // Shredding samples only sealed values.
    let shred = lifecycle::shred(&mut conn, &keyring, &owner, &tables, 10).expect("shred");
    assert_eq!(shred.sampled, 5, "{shred:?}");
    assert!(shred.verified(), "{shred:?}");
    // The flag-off rows' values are in the clear, envelope-like bytes or not:
    // row 3's payload and amount, row 4's amount.
    assert_eq!(shred.in_clear, 3, "{shred:?}");
}

#[test]
fn reseal_on_an_integer_flag_leaves_plain_rows_alone() {
    let db = flagged_db();
    let keyring = db.keyring();
    let plain = db.keyring();
    plain.set_rollout(phi::Rollout::Nobody);
    let mut conn = db.conn();
    let owner = unique_int();
    let note = |payload: Vec<u8>| FlaggedInt { id: unique_int(), clinic_id: owner, payload, sealed: 0 };
    let sealed_rows = [note(vec![5; 40]), note(envelope_lookalike(1))];
    let plain_rows = [note(envelope_lookalike(2)), note(LOOKALIKE_INT.to_be_bytes().to_vec())];
    for (rows, k) in [(&sealed_rows[..], &keyring), (&plain_rows[..], &plain)] {
        let stored = FlaggedInt::seal_all(rows, k).expect("seal");
        diesel::insert_into(phi_it_flagged_int::table).values(&stored).execute(&mut conn).expect("insert");
    }
    let spec = "phi_it_flagged_int:clinic_id#i64:id#i64:payload:sealed#int";
    let table = ResealTable::parse(spec).expect("parses");
    assert_eq!((table.flag_column.as_deref(), table.flag_type), (Some("sealed"), lifecycle::FlagType::Integer));
    assert_eq!(table, FlaggedInt::reseal_table().expect("description"));
    assert_eq!(table.to_string(), spec);
    let tables = [table];
    let owner_id = owner.to_string();
    lifecycle::rotate(&keyring, &owner_id).expect("rotate");
    let report = lifecycle::reseal(&mut conn, &keyring, &owner_id, &tables, &ResealOptions::default().batch_size(10)).expect("reseal");
    assert_eq!((report.total, report.resealed), (2, 2));
    assert!(lifecycle::retire(&mut conn, &keyring, &owner_id, 1, &tables).expect("retire"));
    let loaded = FlaggedInt::load(
        phi_it_flagged_int::table.filter(phi_it_flagged_int::clinic_id.eq(owner)).order(phi_it_flagged_int::id),
        &mut conn,
        &db.keyring(),
    )
    .expect("every row reads");
    let expected: Vec<FlaggedInt> = sealed_rows
        .iter()
        .map(|r| FlaggedInt { sealed: 1, ..r.clone() })
        .chain(plain_rows.iter().cloned())
        .collect();
    assert_eq!(loaded, expected);
}

diesel::table! {
    phi_it_reseal_schema.phi_it_snotes (id) {
        id -> Varchar,
        owner_id -> Varchar,
        body -> Binary,
        phi_encrypted -> Bool,
    }
}

/// A model on a table outside the connection's default schema.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(crate = phi, table = phi_it_snotes, debug)]
struct SchemaNote {
    #[phi(row_key)]
    id: String,
    #[phi(owner)]
    owner_id: String,
    #[phi(encrypt)]
    body: String,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

/// A connection that sees the schema `phi_it_reseal_schema` with an
/// empty `phi_it_snotes` table: a PostgreSQL schema, a MySQL database, an
/// attached SQLite database.
fn schema_conn(db: &TestDb) -> Conn {
    let mut conn = db.conn();
    let create = match (server_url().is_some(), BLOB) {
        (true, "BYTEA") => vec![
            "DROP SCHEMA IF EXISTS phi_it_reseal_schema CASCADE".to_owned(),
            "CREATE SCHEMA phi_it_reseal_schema".to_owned(),
        ],
        (true, _) => vec![
            "DROP DATABASE IF EXISTS phi_it_reseal_schema".to_owned(),
            "CREATE DATABASE phi_it_reseal_schema".to_owned(),
        ],
        (false, _) => vec![format!("ATTACH DATABASE '{}-schema' AS phi_it_reseal_schema", db.url)],
    };
    for sql in create {
        diesel::sql_query(sql).execute(&mut conn).expect("schema");
    }
    diesel::sql_query(format!(
        "CREATE TABLE phi_it_reseal_schema.phi_it_snotes (id VARCHAR(255) NOT NULL PRIMARY KEY, \
         owner_id VARCHAR(255) NOT NULL, body {BLOB} NOT NULL, phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE)"
    ))
    .execute(&mut conn)
    .expect("table in the schema");
    conn
}

#[test]
fn reseal_of_a_schema_qualified_table_keeps_the_models_scope() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let mut conn = schema_conn(&db);
    let owner = common::unique_owner("schema");
    let notes: Vec<SchemaNote> = (0..4)
        .map(|i| SchemaNote { id: format!("{owner}-{i}"), owner_id: owner.clone(), body: format!("note {i}"), phi_encrypted: true })
        .collect();
    let stored = SchemaNote::seal_all(&notes, &keyring).expect("seal");
    diesel::insert_into(phi_it_snotes::table).values(&stored).execute(&mut conn).expect("insert");

    // The description names the schema; the scope is the model's.
    let spec = "phi_it_reseal_schema.phi_it_snotes:owner_id:id:body:phi_encrypted";
    let table = ResealTable::parse(spec).expect("parses");
    assert_eq!((table.table_name(), table.columns[0].scope.as_str()), ("phi_it_snotes", "phi_it_snotes.body"));
    assert_eq!(SchemaNote::stored_table().columns[0].scope, "phi_it_snotes.body");
    assert_eq!(table, SchemaNote::reseal_table().expect("description").in_schema("phi_it_reseal_schema"));
    assert_eq!(table.to_string(), spec);
    let tables = [table];

    let owner_keys = lifecycle::rotate(&keyring, &owner).expect("rotate");
    assert_eq!(owner_keys, 2);
    let report = lifecycle::reseal(&mut conn, &keyring, &owner, &tables, &ResealOptions::default().batch_size(3)).expect("reseal");
    assert_eq!((report.total, report.resealed), (4, 4));
    let loaded = SchemaNote::load(
        phi_it_snotes::table.filter(phi_it_snotes::owner_id.eq(&owner)).order(phi_it_snotes::id),
        &mut conn,
        &db.keyring(),
    )
    .expect("the model opens every re-sealed value");
    assert_eq!(loaded, notes);
    let usage = lifecycle::usage(&mut conn, &owner, &tables).expect("usage");
    assert_eq!(usage.iter().map(|u| (u.key_version, u.values)).collect::<Vec<_>>(), [(2, 4)]);
    assert!(lifecycle::retire(&mut conn, &keyring, &owner, 1, &tables).expect("retire"));
}
