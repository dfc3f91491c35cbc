// Rotation of many owners as one job shared by several workers
// (`lifecycle::rotate_all`) on this backend: every owner rotated, re-sealed
// and retired; a failure mid-run and a killed worker resumed; two workers
// sharing a job. Included by `suite/mod.rs` inside `mod lifecycle::rotate_all`,
// with the life-cycle tables and helpers in scope.

use std::collections::HashMap;

use phi::lifecycle::{RotateAllOptions, RotateOwners, RotateStage};

/// `n` fresh owners, each with `rows` rows sealed under version 1.
fn seeded_owners(db: &TestDb, keyring: &Keyring, tag: &str, n: usize, rows: usize) -> Vec<String> {
    let mut owners: Vec<String> = (0..n).map(|_| common::unique_owner(tag)).collect();
    owners.sort();
    for owner in &owners {
        seed(db, keyring, owner, rows);
    }
    owners
}

#[derive(QueryableByName)]
struct OwnerIdRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    #[allow(dead_code)]
    owner_id: String,
}

/// A job id of its own for one test.
fn job_id(tag: &str) -> String {
    let id = common::unique_owner(tag);
    id[id.len().saturating_sub(60)..].to_owned()
}

/// Each owner has exactly versions 1 (retired) and 2 (active), and every
/// value opens under version 2.
fn assert_rotated_once(db: &TestDb, owners: &[String], rows: usize) {
    for owner in owners {
        let states: Vec<(i64, String)> = key_states(db, owner).into_iter().map(|(v, s, _, _)| (v, s)).collect();
        assert_eq!(states, [(1, "retired".to_owned()), (2, "active".to_owned())], "owner {owner}");
        assert_eq!(check_all_open(db, &db.keyring(), owner, rows), [2], "owner {owner}'s values are under version 2");
    }
}

/// `owner`'s feed events in `events` are one rotation to version 2, then
/// version 1 retired.
fn assert_rotated_to_2_then_retired_1(events: &[phi::feed::FeedEvent], owner: &str) {
    let kinds: Vec<(phi::feed::KeyEventKind, Option<u32>)> = events
        .iter()
        .filter(|e| e.event.owner_id.as_deref() == Some(owner))
        .map(|e| (e.event.kind, e.event.key_version))
        .collect();
    assert_eq!(
        kinds,
        [(phi::feed::KeyEventKind::Rotate, Some(2)), (phi::feed::KeyEventKind::Retire, Some(1))],
        "owner {owner}"
    );
}

fn options(job: &str) -> RotateAllOptions<'_> {
    RotateAllOptions::new(job).owners_per_claim(2).batch_size(4).sample(5)
}

#[test]
fn every_owner_is_rotated_resealed_verified_and_retired_with_feed_events() {
    let db = life_db();
    let keyring = db.keyring();
    let owners = seeded_owners(&db, &keyring, "rot-all", 3, 9);
    let shredded = common::unique_owner("rot-all-shred");
    seed(&db, &keyring, &shredded, 3);
    let mut conn = db.conn();
    lifecycle::shred(&mut conn, &keyring, &shredded, &life_tables(), 5).expect("shred");
    let head = lifecycle::feed_head(keyring.store().as_ref()).expect("head");

    let mut list = owners.clone();
    list.push(shredded.clone());
    let job = job_id("job-all");
    let mut seen = Vec::new();
    let report = lifecycle::rotate_all(
        &mut conn,
        &keyring,
        &RotateOwners::List(list.clone()),
        &life_tables(),
        &options(&job).progress(|r| seen.push(r.done)))
    .expect("rotate_all");
    assert_eq!((report.owners, report.added, report.claimed), (4, 4, 4));
    assert_eq!((report.rotated, report.skipped, report.retired, report.done), (3, 1, 3, 4));
    // 9 names + 6 notes per owner in the keyed table, 3 dobs in the other.
    assert_eq!(report.resealed, 3 * (9 + 6 + 3));
    assert!(report.sampled > 0, "a sample was opened: {report:?}");
    assert!(report.finished(), "{report:?}");
    assert!(seen.len() >= 3 && seen.last() == Some(&4), "progress after each claim: {seen:?}");
    assert_rotated_once(&db, &owners, 9);
    assert!(key_states(&db, &shredded).iter().all(|(_, s, _, _)| s == "destroyed"), "a shredded owner is never rotated");

    // Audited, and on the feed: every follower drops the old keys.
    for owner in &owners {
        let actions = audit_actions(&db, owner);
        assert!(actions.contains(&("rotate".to_owned(), Some(2))), "{actions:?}");
        assert!(actions.contains(&("retire".to_owned(), Some(1))), "{actions:?}");
    }
    let events = lifecycle::read_feed(keyring.store().as_ref(), head, 1_000).expect("feed");
    for owner in &owners {
        assert_rotated_to_2_then_retired_1(&events, owner);
    }

    // A rerun of the job does nothing: every owner is done.
    let again = lifecycle::rotate_all(&mut conn, &keyring, &RotateOwners::List(list), &life_tables(), &options(&job))
        .expect("rerun");
    assert_eq!((again.added, again.claimed, again.rotated, again.done_before), (0, 0, 0, 4));
    assert_rotated_once(&db, &owners, 9);
}

#[test]
fn a_job_that_fails_mid_run_resumes_without_a_second_version() {
    let db = life_db();
    let keyring = db.keyring();
    let owners = seeded_owners(&db, &keyring, "rot-fail", 4, 6);
    let job = job_id("job-fail");
    let mut conn = db.conn();
    let mut batches = 0;
    // The second batch fails after its versions were created, before any
    // of its values is re-sealed.
    let error = lifecycle::rotate_all_interleaved(
        &mut conn,
        &keyring,
        &RotateOwners::List(owners.clone()),
        &life_tables(),
        &options(&job),
        &mut |stage, _| {
            if stage == RotateStage::Rotated {
                batches += 1;
                if batches == 2 {
                    return Err(phi::Error::Config("injected failure".into()));
                }
            }
            Ok(())
        },
    )
    .expect_err("the injected failure stops the job");
    assert!(error.to_string().contains("injected failure"), "{error}");

    // The first batch is done; the second has its new version, its values
    // still under version 1, which is still active: nothing is under a
    // retired or missing key.
    assert_rotated_once(&db, &owners[..2], 6);
    for owner in &owners[2..] {
        let states: Vec<(i64, String)> = key_states(&db, owner).into_iter().map(|(v, s, _, _)| (v, s)).collect();
        assert_eq!(states, [(1, "active".to_owned()), (2, "active".to_owned())], "owner {owner}");
        assert_eq!(check_all_open(&db, &db.keyring(), owner, 6), [1]);
    }

    // The rerun finishes the second batch with the versions created before.
    let report = lifecycle::rotate_all(&mut conn, &keyring, &RotateOwners::List(owners.clone()), &life_tables(), &options(&job))
        .expect("rerun");
    assert_eq!((report.done_before, report.claimed, report.rotated, report.retired), (2, 2, 0, 2), "{report:?}");
    assert!(report.finished());
    assert_rotated_once(&db, &owners, 6);
}

#[test]
fn two_workers_share_a_job_with_disjoint_claims() {
    let db = life_db();
    let store = db.store();
    let keyring = db.keyring();
    let owners = seeded_owners(&db, &keyring, "rot-two", 6, 3);
    let job = job_id("job-two");
    let now = chrono::Utc::now().naive_utc();
    let later = now + chrono::Duration::seconds(60);
    assert_eq!(store.rotation_enqueue(&job, &owners).expect("enqueue"), 6);
    assert_eq!(store.rotation_enqueue(&job, &owners).expect("enqueue again"), 0, "each owner once");

    // Worker A is in the middle of claiming (its claim transaction holds
    // the first three rows); worker B skips them rather than waiting.
    let claim_a: Vec<String>;
    let claim_b: Vec<String>;
    if server_url().is_some() {
        let mut a = db.conn();
        let lock = format!(
            "SELECT owner_id FROM phi_rotation_claims WHERE job_id = '{job}' AND owner_id IN ('{}', '{}', '{}') FOR UPDATE",
            owners[0], owners[1], owners[2]
        );
        claim_b = a
            .transaction(|a| -> QueryResult<Vec<String>> {
                let held: Vec<OwnerIdRow> = diesel::sql_query(lock).load(a)?;
                assert_eq!(held.len(), 3);
                let b = store.rotation_claim(&job, "worker-b", 3, now, later).expect("B claims");
                Ok(b.into_iter().map(|c| c.owner_id).collect())
            })
            .expect("A's transaction");
        assert!(claim_b.iter().all(|o| owners[3..].contains(o)), "B never gets a row A holds: {claim_b:?}");
        if server_url().is_some_and(|u| u.starts_with("postgres")) {
            assert_eq!(claim_b, owners[3..], "B got the rows A did not hold");
        }
        claim_a = store
            .rotation_claim(&job, "worker-a", 3, now, later)
            .expect("A claims")
            .into_iter()
            .map(|c| c.owner_id)
            .collect();
        assert_eq!(claim_a, owners[..3], "A gets the rest");
    } else {
        // SQLite: one worker at a time.
        claim_a = store
            .rotation_claim(&job, "worker-a", 3, now, later)
            .expect("A claims")
            .into_iter()
            .map(|c| c.owner_id)
            .collect();
        assert_eq!(claim_a, owners[..3]);
        let b = store.rotation_claim(&job, "worker-b", 3, now, later).expect("B claims");
        assert!(b.is_empty(), "on SQLite a second worker claims nothing while the first holds claims: {b:?}");
        claim_b = Vec::new();
    }
    let counts = store.rotation_counts(&job, now).expect("counts");
    assert_eq!((counts.claimed, counts.done), ((claim_a.len() + claim_b.len()) as u64, 0));
    // Once the claims expire, anyone takes them again.
    let expired = later + chrono::Duration::seconds(1);
    let c = store.rotation_claim(&job, "worker-c", 10, expired, expired).expect("C claims");
    assert_eq!(c.len(), 6, "expired claims are free");
}

#[test]
fn two_rotating_workers_rotate_each_owner_once() {
    let db = life_db();
    let keyring_a = db.keyring();
    let keyring_b = db.keyring();
    let owners = seeded_owners(&db, &keyring_a, "rot-pair", 6, 3);
    let job = job_id("job-pair");
    let set = RotateOwners::List(owners.clone());
    let mut conn_a = db.conn();
    let mut conn_b = db.conn();
    let mut report_b = None;
    // Worker B runs whole while A holds its first claim of two owners.
    let report_a = lifecycle::rotate_all_interleaved(
        &mut conn_a,
        &keyring_a,
        &set,
        &life_tables(),
        &options(&job).worker("worker-a"),
        &mut |stage, _| {
            if stage == RotateStage::Claimed && report_b.is_none() {
                report_b = Some(
                    lifecycle::rotate_all(&mut conn_b, &keyring_b, &set, &life_tables(), &options(&job).worker("worker-b"))
                        .expect("worker B"),
                );
            }
            Ok(())
        },
    )
    .expect("worker A");
    let report_b = report_b.expect("B ran");
    assert_eq!(report_a.claimed + report_b.claimed, 6, "A {report_a:?} B {report_b:?}");
    assert_eq!(report_a.rotated + report_b.rotated, 6);
    if server_url().is_some() {
        assert_eq!((report_a.claimed, report_b.claimed), (2, 4), "B took what A had not claimed");
        assert_eq!(report_b.claimed_by_others, 2, "A's claim was still running when B ended");
    } else {
        assert_eq!((report_a.claimed, report_b.claimed), (6, 0), "SQLite: one worker at a time");
        assert_eq!(report_b.claimed_by_others, 2);
    }
    assert!(report_a.finished());
    assert_rotated_once(&db, &owners, 3);
}

#[test]
#[ignore = "run as a child process by a_killed_rotation_worker_loses_nothing"]
fn rot_child_stops_after_rotating() {
    let Ok(url) = std::env::var("PHI_ROT_URL") else {
        return;
    };
    let owners: Vec<String> = std::env::var("PHI_ROT_OWNERS").expect("owners").split(',').map(str::to_owned).collect();
    let job = std::env::var("PHI_ROT_JOB").expect("job");
    let store = Arc::new(phi::DieselKeyStore::<Conn>::builder(&url).run_migrations(true).connect().expect("store"));
    let keyring = Keyring::builder(store, common::local_kek()).build().expect("keyring");
    let mut conn = Conn::establish(&url).expect("connection");
    if server_url().is_none() {
        diesel::sql_query("PRAGMA busy_timeout = 10000").execute(&mut conn).expect("busy timeout");
    }
    let mut rotated = 0;
    lifecycle::rotate_all_interleaved(
        &mut conn,
        &keyring,
        &RotateOwners::List(owners),
        &life_tables(),
        &options(&job).claim_ttl(Duration::from_secs(3_600)),
        &mut |stage, _| {
            if stage == RotateStage::Rotated {
                rotated += 1;
                if rotated == 2 {
                    // The second batch has its new versions: stop here
                    // until killed.
                    #[allow(clippy::print_stdout)]
                    {
                        println!("PHI_BATCH {rotated}");
                    }
                    loop {
                        std::thread::park();
                    }
                }
            }
            Ok(())
        },
    )
    .expect("rotate_all");
    #[allow(clippy::print_stdout)]
    {
        println!("PHI_DONE");
    }
}

#[test]
fn a_killed_rotation_worker_loses_nothing() {
    let db = life_db();
    let keyring = db.keyring();
    let owners = seeded_owners(&db, &keyring, "rot-kill", 6, 4);
    let job = job_id("job-kill");
    run_and_kill(
        "rotate_all::rot_child_stops_after_rotating",
        &[("PHI_ROT_URL", db.url.clone()), ("PHI_ROT_OWNERS", owners.join(",")), ("PHI_ROT_JOB", job.clone())],
        1,
    );
    // Killed with batch 2's versions created and nothing of it re-sealed:
    // batch 1 is done, the others' values all open, none under a retired key.
    assert_rotated_once(&db, &owners[..2], 4);
    for owner in &owners[2..] {
        assert_eq!(check_all_open(&db, &db.keyring(), owner, 4), [1]);
        assert!(key_states(&db, owner).iter().all(|(_, s, _, _)| s == "active"));
    }
    let store = db.store();
    let now = chrono::Utc::now().naive_utc();
    let counts = store.rotation_counts(&job, now).expect("counts");
    assert_eq!((counts.done, counts.claimed, counts.pending), (2, 2, 2), "the dead worker's claim holds until it expires");

    // A worker running after the claim expired finishes everything, with
    // the version the dead worker created.
    let mut conn = db.conn();
    let report = lifecycle::rotate_all(
        &mut conn,
        &keyring,
        &RotateOwners::List(owners.clone()),
        &life_tables(),
        &options(&job).at(now + chrono::Duration::hours(2)))
    .expect("rerun after expiry");
    assert_eq!((report.claimed, report.rotated, report.retired), (4, 2, 4), "{report:?}");
    assert!(report.finished());
    assert_rotated_once(&db, &owners, 4);
}

#[test]
fn a_bad_job_id_is_refused_naming_it() {
    let db = life_db();
    let keyring = db.keyring();
    let mut conn = db.conn();
    let error = lifecycle::rotate_all(&mut conn, &keyring, &RotateOwners::List(vec![]), &[], &RotateAllOptions::new("no spaces"))
        .expect_err("refused");
    assert!(error.to_string().contains("no spaces"), "{error}");
}

#[test]
fn due_with_nothing_due_rotates_nothing() {
    let db = life_db();
    let keyring = db.keyring();
    let owners = seeded_owners(&db, &keyring, "rot-due-none", 2, 2);
    // The default policy: no age limit, 2^30 seals per key; nothing here
    // comes near it.
    let mut conn = db.conn();
    let report = lifecycle::rotate_all(
        &mut conn,
        &keyring,
        &RotateOwners::Due,
        &life_tables(),
        &options(&job_id("job-due-none")))
    .expect("a due rotation");
    assert_eq!((report.owners, report.rotated), (0, 0), "{report:?}");
    for owner in &owners {
        assert_eq!(key_states(&db, owner).len(), 1, "owner {owner} not rotated");
    }
}

diesel::table! {
    phi_rot_people (id) {
        id -> Varchar,
        owner_id -> Varchar,
        last_name -> Binary,
        last_bidx -> Nullable<Binary>,
        email -> Binary,
        email_lookup -> Nullable<Binary>,
        note -> Nullable<Binary>,
        phi_encrypted -> Bool,
    }
}

/// A derived model with a blind index (found per owner), a lookup index
/// (found across owners) and an encrypted column without either.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(table = phi_rot_people, crate = phi, debug)]
#[diesel(primary_key(id))]
struct Person {
    #[phi(row_key)]
    id: String,
    #[phi(owner)]
    owner_id: String,
    #[phi(encrypt, blind_index = last_bidx, normalize = "trim,lowercase")]
    last_name: String,
    #[phi(encrypt, lookup_index = email_lookup, normalize = "trim,lowercase")]
    email: String,
    #[phi(encrypt)]
    note: Option<String>,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

const LAST_SCOPE: &str = "phi_rot_people.last_name";

/// The tests of `phi_rot_people` run one at a time, and never beside a
/// rotation of the lookup key by another test: one of them rotates it and
/// re-indexes the whole table, which must not meet a row whose owner's
/// older version another test is destroying.
fn people_serial() -> std::sync::MutexGuard<'static, ()> {
    super::super::lookup::serial()
}

fn people_db() -> TestDb {
    let db = life_db();
    let index_type = match BLOB {
        "BYTEA" => "BYTEA",
        _ if server_url().is_some() => "VARBINARY(20)",
        _ => "BLOB",
    };
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS phi_rot_people (id VARCHAR(255) NOT NULL PRIMARY KEY, \
         owner_id VARCHAR(255) NOT NULL, last_name {BLOB} NOT NULL, last_bidx {index_type} NULL, \
         email {BLOB} NOT NULL, email_lookup {index_type} NULL, note {BLOB} NULL, phi_encrypted BOOLEAN NOT NULL)"
    );
    diesel::sql_query(ddl).execute(&mut db.conn()).expect("people table");
    db
}

fn last_name_of(i: usize) -> String {
    format!(" Smith-{i} ")
}

/// `rows` sealed people for each owner (through the model), and one row of
/// the first owner stored unsealed (its flag off, its blind index NULL).
/// Returns the ids of the sealed rows per owner, and the unsealed row's id.
fn seed_people(db: &TestDb, keyring: &Keyring, owners: &[String], rows: usize) -> (Vec<(String, usize, String)>, String) {
    let mut conn = db.conn();
    let mut people = Vec::new();
    for owner in owners {
        for i in 0..rows {
            people.push(Person {
                id: format!("{owner}-{i}"),
                owner_id: owner.clone(),
                last_name: last_name_of(i),
                email: format!("p{i}.{owner}@example.org"),
                note: (i % 2 == 0).then(|| format!("note {i}")),
                phi_encrypted: true,
            });
        }
    }
    let sealed = Person::seal_all(&people, keyring).expect("seal");
    for row in &sealed {
        diesel::insert_into(phi_rot_people::table).values(row).execute(&mut conn).expect("insert");
    }
    let plain = format!("{}-plain", owners[0]);
    diesel::insert_into(phi_rot_people::table)
        .values((
            phi_rot_people::id.eq(&plain),
            phi_rot_people::owner_id.eq(&owners[0]),
            phi_rot_people::last_name.eq(b" Plain ".to_vec()),
            phi_rot_people::last_bidx.eq(None::<Vec<u8>>),
            phi_rot_people::email.eq(format!("plain.{}@example.org", owners[0]).into_bytes()),
            phi_rot_people::email_lookup.eq(None::<Vec<u8>>),
            phi_rot_people::note.eq(None::<Vec<u8>>),
            phi_rot_people::phi_encrypted.eq(false),
        ))
        .execute(&mut conn)
        .expect("insert the unsealed row");
    let ids = people.iter().enumerate().map(|(n, p)| (p.owner_id.clone(), n % rows, p.id.clone())).collect();
    (ids, plain)
}

/// Each row's stored blind index, flag and the key version of its name.
fn stored_people(db: &TestDb, id: &str) -> (Option<Vec<u8>>, bool, Option<u32>) {
    let (last, bidx, flag): (Vec<u8>, Option<Vec<u8>>, bool) = phi_rot_people::table
        .filter(phi_rot_people::id.eq(id))
        .select((phi_rot_people::last_name, phi_rot_people::last_bidx, phi_rot_people::phi_encrypted))
        .first(&mut db.conn())
        .expect("person row");
    let version = flag.then(|| Encrypted::<String>::from_bytes(last).key_version()).flatten();
    (bidx, flag, version)
}

/// The people of `owner` the blind-index finder finds for `last`, with
/// `keyring`.
fn find_by_last(db: &TestDb, keyring: &Keyring, owner: &str, last: &str) -> Vec<Person> {
    let wanted = Person::last_name_blind_index(keyring, owner, last).expect("index values");
    Person::load(
        phi_rot_people::table
            .filter(phi_rot_people::owner_id.eq(owner))
            .filter(phi_rot_people::last_bidx.eq_any(wanted)),
        &mut db.conn(),
        keyring,
    )
    .expect("find")
}

/// After a rotation to version 2 and the re-seal: every sealed row's blind
/// index is the one computed under version 2 (not the one under version 1
/// it held before), the finder finds each row, and still does once version
/// 1 is destroyed; the unsealed row is as it was.
fn assert_people_rekeyed(db: &TestDb, people: &[(String, usize, String)], before: &HashMap<String, Vec<u8>>, plain: &str) {
    for (owner, i, id) in people {
        let (bidx, flag, version) = stored_people(db, id);
        assert!(flag, "row {id} is sealed");
        assert_eq!(version, Some(2), "row {id} is re-sealed under version 2");
        let keys = db.keyring().keys_for_open(owner).expect("keys");
        let under_2 = keys
            .blind_index(LAST_SCOPE, &last_name_of(*i), phi::blind::Normalize::TRIM_LOWERCASE)
            .expect("index under the current version");
        let bidx = bidx.expect("a sealed row has a blind index");
        assert_eq!(bidx, under_2, "row {id}'s blind index is under version 2");
        assert_ne!(Some(&bidx), before.get(id), "row {id}'s blind index changed");
        let found = find_by_last(db, &db.keyring(), owner, &format!("smith-{i}"));
        assert_eq!(found.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    }
    assert_eq!(stored_people(db, plain), (None, false, None), "the unsealed row is left alone");

    // Version 1 destroyed: the lookups compute version 2's values only.
    let store = db.store();
    let mut owners: Vec<&String> = people.iter().map(|(o, _, _)| o).collect();
    owners.dedup();
    for owner in owners {
        let destroyed = store
            .set_key_state(owner, 1, phi::KeyState::Retired, phi::KeyState::Destroyed, &audit_event(owner, phi::AuditAction::Destroy, Some(1), None))
            .expect("destroy version 1");
        assert!(destroyed, "owner {owner}'s version 1 was retired");
    }
    let cold = db.keyring();
    for (owner, i, id) in people {
        assert_eq!(
            Person::last_name_blind_index(&cold, owner, &last_name_of(*i)).expect("index").len(),
            1,
            "only version 2 is left to look up with"
        );
        let found = find_by_last(db, &cold, owner, &format!("SMITH-{i}"));
        assert_eq!(found.len(), 1, "row {id} is found with version 1 destroyed");
        assert_eq!(found[0].last_name, last_name_of(*i));
    }
}

fn blind_indexes_before(db: &TestDb, people: &[(String, usize, String)]) -> HashMap<String, Vec<u8>> {
    people
        .iter()
        .map(|(owner, i, id)| {
            let (bidx, _, version) = stored_people(db, id);
            assert_eq!(version, Some(1));
            let bidx = bidx.expect("sealed with a blind index");
            let keys = db.keyring().keys_for_open(owner).expect("keys");
            let under_1 = keys.blind_index(LAST_SCOPE, &last_name_of(*i), phi::blind::Normalize::TRIM_LOWERCASE).expect("index");
            assert_eq!(bidx, under_1);
            (id.clone(), bidx)
        })
        .collect()
}

#[test]
fn rotate_all_rekeys_blind_indexes_in_the_same_update() {
    let _serial = people_serial();
    let db = people_db();
    let keyring = db.keyring();
    let mut owners = vec![common::unique_owner("rot-bidx"), common::unique_owner("rot-bidx")];
    owners.sort();
    let (people, plain) = seed_people(&db, &keyring, &owners, 3);
    let before = blind_indexes_before(&db, &people);
    let table = Person::reseal_table().expect("the model's table");
    assert_eq!(
        table.columns[0].blind_index,
        Some(("last_bidx".to_owned(), phi::blind::Normalize::TRIM_LOWERCASE)),
        "the model's blind index is carried to the jobs: {table}"
    );
    let mut conn = db.conn();
    let report = lifecycle::rotate_all(
        &mut conn,
        &keyring,
        &RotateOwners::List(owners.clone()),
        &[table],
        &options(&job_id("job-bidx")))
    .expect("rotate_all");
    // 3 names, 3 e-mail addresses and 2 notes per owner.
    assert_eq!((report.rotated, report.retired, report.resealed), (2, 2, 2 * 8), "{report:?}");
    assert!(report.sampled > 0 && report.finished(), "{report:?}");
    assert_people_rekeyed(&db, &people, &before, &plain);
}

#[test]
fn a_reseal_owner_by_owner_rekeys_blind_indexes_too() {
    let _serial = people_serial();
    let db = people_db();
    let keyring = db.keyring();
    let owners = [common::unique_owner("rot-bidx-one")];
    let (people, plain) = seed_people(&db, &keyring, &owners, 4);
    let before = blind_indexes_before(&db, &people);
    let tables = [Person::reseal_table().expect("the model's table")];
    let mut conn = db.conn();
    assert_eq!(lifecycle::rotate(&keyring, &owners[0]).expect("rotate"), 2);
    let report = lifecycle::reseal(&mut conn, &keyring, &owners[0], &tables, &lifecycle::ResealOptions::default().batch_size(3)).expect("reseal");
    assert_eq!(report.resealed, 4 + 4 + 2, "{report:?}");
    assert!(lifecycle::retire(&mut conn, &keyring, &owners[0], 1, &tables).expect("retire"));
    assert_people_rekeyed(&db, &people, &before, &plain);
}

#[test]
fn an_emergency_rotation_rotates_the_lookup_key_and_rewrites_every_lookup_value() {
    use phi::lookup::{LOOKUP_OWNER, LookupTable, ReindexOptions};
    let _serial = people_serial();
    let db = people_db();
    let keyring = db.keyring();
    let mut owners = vec![common::unique_owner("rot-lookup"), common::unique_owner("rot-lookup")];
    owners.sort();
    let (people, plain) = seed_people(&db, &keyring, &owners, 2);
    let old = keyring.lookup_keys().expect("lookup keys").current_version().expect("a version");
    let lookup_of = |id: &str| -> Vec<u8> {
        phi_rot_people::table
            .filter(phi_rot_people::id.eq(id))
            .select(phi_rot_people::email_lookup)
            .first::<Option<Vec<u8>>>(&mut db.conn())
            .expect("row")
            .expect("a lookup value")
    };
    let before: HashMap<&str, Vec<u8>> = people.iter().map(|(_, _, id)| (id.as_str(), lookup_of(id))).collect();
    for value in before.values() {
        assert_eq!(value[..4], old.to_be_bytes(), "written under the lookup key's version {old}");
    }

    let mut conn = db.conn();
    let report = lifecycle::rotate_all(
        &mut conn,
        &keyring,
        &RotateOwners::List(owners.clone()),
        &[Person::reseal_table().expect("table")],
        &options(&job_id("job-lookup")))
    .expect("rotate_all");
    assert!(report.finished(), "{report:?}");
    let tables = [LookupTable::from_stored(Person::stored_table()).expect("the model has a lookup index")];
    assert_eq!(tables[0].columns().len(), LookupTable::of::<Person>().columns().len());
    let rotation = phi::lookup::rotate(&mut conn, &keyring, &tables, &ReindexOptions::default().batch(3))
        .expect("the lookup key's rotation");
    assert!(rotation.version > old, "{rotation}");
    assert!(rotation.retired.contains(&old), "{rotation}");
    // Every sealed row of these owners, and the unsealed one.
    let rows = people.len() as u64 + 1;
    assert!(rotation.reindexed[0].rewritten >= rows, "{rotation}");
    let states: HashMap<i64, String> = key_states(&db, LOOKUP_OWNER).into_iter().map(|(v, s, _, _)| (v, s)).collect();
    assert_eq!(states.get(&i64::from(old)).map(String::as_str), Some("retired"), "{states:?}");
    assert_eq!(states.get(&i64::from(rotation.version)).map(String::as_str), Some("active"), "{states:?}");

    // Every lookup value, the unsealed row's too, is the one computed
    // under the new version, and the finder finds each person.
    let cold = db.keyring();
    for (owner, i, id) in &people {
        let email = format!("p{i}.{owner}@example.org");
        let stored = lookup_of(id);
        let expected = cold
            .lookup_index("phi_rot_people.email", &email, phi::blind::Normalize::TRIM_LOWERCASE)
            .expect("the current lookup value");
        assert_eq!(stored, expected, "row {id}");
        assert_eq!(stored[..4], rotation.version.to_be_bytes(), "row {id}");
        assert_ne!(Some(&stored), before.get(id.as_str()), "row {id}");
        let found = Person::find_by_email(&format!(" P{i}.{owner}@Example.org"), &cold, &mut conn).expect("find");
        assert_eq!(found.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    }
    assert_eq!(lookup_of(&plain)[..4], rotation.version.to_be_bytes(), "unsealed rows are re-indexed too");
}

#[test]
fn a_truncated_envelope_stops_the_rotation_naming_it_and_nothing_is_retired() {
    let db = life_db();
    let keyring = db.keyring();
    let owner = common::unique_owner("rot-short");
    let ids = seed(&db, &keyring, &owner, 3);
    // The envelope's magic and format, then two bytes: not a key version.
    diesel::update(phi_it_life::table.filter(phi_it_life::id.eq(&ids[1])))
        .set(phi_it_life::name.eq(Some(vec![0xF1, 0x01, 0x00, 0x00])))
        .execute(&mut db.conn())
        .expect("truncated");
    let error = lifecycle::rotate_all(
        &mut db.conn(),
        &keyring,
        &RotateOwners::List(vec![owner.clone()]),
        &life_tables(),
        &options(&job_id("job-short")))
    .expect_err("a value that names no key version");
    let source = std::error::Error::source(&error).map(ToString::to_string).unwrap_or_default();
    let text = format!("{error}: {source}");
    assert!(
        text.contains("phi_it_life.name") && text.contains(&owner) && source.contains("too short"),
        "{text}"
    );
    assert!(!text.contains("kept changing"), "{text}");
    assert!(
        key_states(&db, &owner).iter().any(|(v, s, _, _)| *v == 1 && s == "active"),
        "version 1 is not retired: {:?}",
        key_states(&db, &owner)
    );
}

#[test]
fn a_lookup_version_still_holding_values_stays_active_until_they_are_gone() {
    use phi::lookup::{LOOKUP_OWNER, LookupTable, ReindexOptions};
    let _serial = people_serial();
    let db = people_db();
    let keyring = db.keyring();
    let live = common::unique_owner("rot-lookup-live");
    let gone = common::unique_owner("rot-lookup-gone");
    let (_, plain) = seed_people(&db, &keyring, &[live.clone(), gone.clone()], 2);
    let tables = [LookupTable::of::<Person>()];
    let mut conn = db.conn();
    let state_of = |version: u32| -> Option<String> {
        key_states(&db, LOOKUP_OWNER)
            .into_iter()
            .find(|(v, ..)| *v == i64::from(version))
            .map(|(_, s, _, _)| s)
    };
    // Every lookup value of the table under one version.
    let first = phi::lookup::rotate(&mut conn, &keyring, &tables, &ReindexOptions::default()).expect("rotation");
    assert!(first.finished(), "{first}");

    // A crypto-shredded owner's rows keep their lookup values: the re-index
    // cannot open them, so the version they are under is counted, not
    // retired.
    lifecycle::shred(&mut conn, &keyring, &gone, &[Person::reseal_table().expect("table")], 5).expect("shred");
    let second = phi::lookup::rotate(&mut conn, &keyring, &tables, &ReindexOptions::default()).expect("rotation");
    assert_eq!(second.pending, [(first.version, 2)], "{second}");
    assert!(!second.finished() && !second.retired.contains(&first.version), "{second}");
    assert_eq!(second.reindexed[0].shredded, 2, "{second}");
    assert!(second.to_string().contains(&format!("version {} left active: 2 lookup value(s)", first.version)), "{second}");
    assert_eq!(state_of(first.version).as_deref(), Some("active"));

    // The documented remedy: the shredded owner's lookup values set to
    // NULL. The next rotation retires both older versions.
    diesel::update(phi_rot_people::table.filter(phi_rot_people::owner_id.eq(&gone)))
        .set(phi_rot_people::email_lookup.eq(None::<Vec<u8>>))
        .execute(&mut conn)
        .expect("lookup values cleared");
    let third = phi::lookup::rotate(&mut conn, &keyring, &tables, &ReindexOptions::default()).expect("rotation");
    assert!(third.finished(), "{third}");
    assert!(third.retired.contains(&first.version) && third.retired.contains(&second.version), "{third}");
    assert_eq!(state_of(first.version).as_deref(), Some("retired"));
    assert_eq!(state_of(third.version).as_deref(), Some("active"));

    // The table shared with the other tests keeps no row that blocks them.
    diesel::delete(phi_rot_people::table.filter(phi_rot_people::owner_id.eq_any([&live, &gone])))
        .execute(&mut conn)
        .expect("rows removed");
    let _ = plain;
}

#[test]
fn rotate_due_from_two_processes_at_once_rotates_each_due_owner_once() {
    // A database of its own: `--due` looks at every owner of the database.
    let empty = super::super::key_store::EmptyDatabase::new();
    let db = TestDb { url: empty.url.clone(), _dir: None };
    prepare(&db.url);
    create_life_tables(&db);
    let keyring = db.keyring();
    // Three owners past a budget of 5 seals (12 each), one under it (2).
    let mut due = vec![common::unique_owner("due2"), common::unique_owner("due2"), common::unique_owner("due2")];
    due.sort();
    for owner in &due {
        seed(&db, &keyring, owner, 6);
    }
    let calm = common::unique_owner("due2-calm");
    seed(&db, &keyring, &calm, 1);
    keyring.flush_seal_counts().expect("seal counts written");
    let head = lifecycle::feed_head(keyring.store().as_ref()).expect("head");

    let dir = tempfile::tempdir().expect("temporary directory");
    let marker = dir.path().join("claimed");
    let tables: Vec<String> = life_tables().iter().map(ToString::to_string).collect();
    let phi = |pause: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_phi"));
        command
            .args(["--format", "json", "keys", "rotate", "--due", "--max-seals-per-key", "5", "--owners-per-claim", "1"])
            .env("DATABASE_URL", &db.url)
            .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
            .env("PHI_KEK_ID", "local-test")
            .env("PHI_TABLES", tables.join(";"))
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_MAX_KEY_AGE")
            .env_remove("PHI_MAX_SEALS_PER_KEY")
            .env_remove("PHI_TEST_PAUSE_AFTER_CLAIM")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(file) = pause {
            command.env("PHI_TEST_PAUSE_AFTER_CLAIM", file);
        }
        command
    };
    let report = |out: std::process::Output| -> (Option<i32>, serde_json::Value) {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
        });
        (out.status.code(), json)
    };

    // Process A claims the first due owner and stops there; process B runs
    // the same (default) job whole meanwhile; then A goes on.
    let mut a = phi(Some(&marker)).spawn().expect("process A runs");
    while !marker.exists() {
        assert!(a.try_wait().expect("A").is_none(), "A ended before it claimed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (b_code, b) = report(phi(None).output().expect("process B runs"));
    std::fs::write(marker.with_extension("go"), b"").expect("let A go on");
    let (a_code, a) = report(a.wait_with_output().expect("A ends"));
    assert_eq!(a["job"], b["job"], "one job: A {a} B {b}");
    assert_eq!(a_code, Some(0), "A {a}");
    let field = |r: &serde_json::Value, f: &str| r[f].as_u64().unwrap_or_else(|| panic!("{f} in {r}"));
    if server_url().is_some() {
        // B took the owners A had not claimed, and ended while A held its one.
        assert_eq!(b_code, Some(0), "B {b}");
        assert_eq!((field(&a, "claimed"), field(&a, "rotated")), (1, 1), "A {a}");
        assert_eq!((field(&b, "claimed"), field(&b, "rotated"), field(&b, "claimed_by_others")), (2, 2, 1), "B {b}");
    } else {
        // SQLite: one worker at a time. B claims nothing while A holds a
        // claim, changes nothing, and says the owners are not done; A does
        // every owner.
        assert_eq!((field(&b, "claimed"), field(&b, "rotated"), field(&b, "retired")), (0, 0, 0), "B {b}");
        assert_eq!(field(&b, "claimed_by_others"), 1, "B {b}");
        assert_eq!((field(&a, "claimed"), field(&a, "rotated")), (3, 3), "A {a}");
    }
    assert_eq!(field(&a, "rotated") + field(&b, "rotated"), 3, "A {a} B {b}");
    assert_eq!(field(&a, "pending"), 0, "A {a}");

    // Each due owner rotated exactly once: one new version, one `rotate`
    // audit record, one `rotate` event; the other owner left alone.
    assert_rotated_once(&db, &due, 6);
    let events = lifecycle::read_feed(keyring.store().as_ref(), head, 1_000).expect("feed");
    for owner in &due {
        let rotates: Vec<Option<i64>> =
            audit_actions(&db, owner).into_iter().filter(|(a, _)| a == "rotate").map(|(_, v)| v).collect();
        assert_eq!(rotates, [Some(2)], "owner {owner}");
        assert_rotated_to_2_then_retired_1(&events, owner);
    }
    assert_eq!(key_states(&db, &calm).len(), 1, "an owner not due is not rotated");
    assert!(audit_actions(&db, &calm).iter().all(|(a, _)| a != "rotate"));
}

#[test]
fn the_verification_sample_names_a_blind_index_left_under_the_old_version() {
    let _serial = people_serial();
    let db = people_db();
    let keyring = db.keyring();
    let owners = vec![common::unique_owner("rot-bidx-bad")];
    let (people, _) = seed_people(&db, &keyring, &owners, 2);
    let tampered = people[0].2.clone();
    let old_index = stored_people(&db, &tampered).0.expect("an index");
    let mut conn = db.conn();
    let mut other = db.conn();
    let error = lifecycle::rotate_all_interleaved(
        &mut conn,
        &keyring,
        &RotateOwners::List(owners.clone()),
        &[Person::reseal_table().expect("table")],
        &options(&job_id("job-bidx-bad")).sample(50),
        &mut |stage, _| {
            if stage == RotateStage::Resealed {
                // The value re-sealed, its index put back as it was.
                diesel::update(phi_rot_people::table.filter(phi_rot_people::id.eq(&tampered)))
                    .set(phi_rot_people::last_bidx.eq(&old_index))
                    .execute(&mut other)
                    .expect("the index put back");
            }
            Ok(())
        },
    )
    .expect_err("the sample finds the stale index");
    let text = error.to_string();
    assert!(text.contains("phi_rot_people.last_bidx") && text.contains(&owners[0]), "{text}");
    let source = std::error::Error::source(&error).map(ToString::to_string).unwrap_or_default();
    assert!(source.contains(&tampered) && source.contains("key version 2"), "{source}");
    assert!(!source.contains("Smith") && !text.contains("Smith"), "no plaintext: {text}: {source}");
    // Nothing was retired: the owner's old version still opens and finds.
    let states: Vec<String> = key_states(&db, &owners[0]).into_iter().map(|(_, s, _, _)| s).collect();
    assert_eq!(states, ["active", "active"]);
}
