// Rotation of many owners as one job shared by several workers
// (`lifecycle::rotate_all`) on this backend: every owner rotated, re-sealed
// and retired; a failure mid-run and a killed worker resumed; two workers
// sharing a job. Included by `suite/mod.rs` inside `mod lifecycle::rotate_all`,
// with the life-cycle tables and helpers in scope.

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

fn options(job: &str) -> RotateAllOptions {
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
        &options(&job),
        &mut |r| seen.push(r.done),
    )
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
        let kinds: Vec<(phi::feed::KeyEventKind, Option<u32>)> = events
            .iter()
            .filter(|e| e.event.owner_id.as_deref() == Some(owner.as_str()))
            .map(|e| (e.event.kind, e.event.key_version))
            .collect();
        assert_eq!(
            kinds,
            [(phi::feed::KeyEventKind::Rotate, Some(2)), (phi::feed::KeyEventKind::Retire, Some(1))],
            "owner {owner}"
        );
    }

    // A rerun of the job does nothing: every owner is done.
    let again = lifecycle::rotate_all(&mut conn, &keyring, &RotateOwners::List(list), &life_tables(), &options(&job), &mut |_| {})
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
        &mut |_| {},
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
    let report = lifecycle::rotate_all(&mut conn, &keyring, &RotateOwners::List(owners.clone()), &life_tables(), &options(&job), &mut |_| {})
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
        &mut |_| {},
        &mut |stage, _| {
            if stage == RotateStage::Claimed && report_b.is_none() {
                report_b = Some(
                    lifecycle::rotate_all(&mut conn_b, &keyring_b, &set, &life_tables(), &options(&job).worker("worker-b"), &mut |_| {})
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
    let store = Arc::new(phi::DieselKeyStore::<Conn>::connect(&url).expect("store"));
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
        &mut |_| {},
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
        &options(&job).at(now + chrono::Duration::hours(2)),
        &mut |_| {},
    )
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
    let error = lifecycle::rotate_all(&mut conn, &keyring, &RotateOwners::List(vec![]), &[], &RotateAllOptions::new("no spaces"), &mut |_| {})
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
        &options(&job_id("job-due-none")),
        &mut |_| {},
    )
    .expect("a due rotation");
    assert_eq!((report.owners, report.rotated), (0, 0), "{report:?}");
    for owner in &owners {
        assert_eq!(key_states(&db, owner).len(), 1, "owner {owner} not rotated");
    }
}
