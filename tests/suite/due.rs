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

const DAY: Duration = Duration::from_secs(86_400);

/// The due entries of `owners` only: the servers' databases hold other
/// tests' owners too.
fn due_of(report: &lifecycle::DueReport, owners: &[&str]) -> Vec<(String, u32, u64, Vec<lifecycle::DueReason>)> {
    report
        .due
        .iter()
        .filter(|d| owners.contains(&d.owner_id.as_str()))
        .map(|d| (d.owner_id.clone(), d.version, d.seals, d.reasons.clone()))
        .collect()
}

/// Keys fall due by age on the keyring's injected clock: no waiting.
#[test]
fn keys_fall_due_by_age_on_an_injected_clock() {
    let db = TestDb::new();
    let clock = Arc::new(ManualClock::new());
    let keyring = Keyring::builder(db.store(), common::local_kek())
        .clock(clock.clone())
        .rotation_policy(phi::RotationPolicy { max_key_age: Some(90 * DAY), max_seals_per_key: None })
        .build()
        .expect("keyring");
    assert_eq!(keyring.rotation_policy().max_key_age, Some(90 * DAY));
    let (a, b) = (common::unique_owner("due-age-a"), common::unique_owner("due-age-b"));
    keyring.seal(&"Doe".to_string(), &a, TEXT, b"r").expect("seal");
    keyring.seal(&"Roe".to_string(), &b, TEXT, b"r").expect("seal");
    let owners = [a.as_str(), b.as_str()];

    let report = lifecycle::due_keys(&keyring).expect("due");
    assert!(due_of(&report, &owners).is_empty(), "{report:?}");

    clock.advance(89 * DAY);
    assert!(due_of(&lifecycle::due_keys(&keyring).expect("due"), &owners).is_empty());

    clock.advance(DAY + Duration::from_secs(60));
    let report = lifecycle::due_keys(&keyring).expect("due");
    let mut due = due_of(&report, &owners);
    due.sort();
    let mut expected = vec![
        (a.clone(), 1, 1, vec![lifecycle::DueReason::Age]),
        (b.clone(), 1, 1, vec![lifecycle::DueReason::Age]),
    ];
    expected.sort();
    assert_eq!(due, expected);
    let ours = report.due.iter().find(|d| d.owner_id == a).expect("a");
    assert!(ours.age >= 90 * DAY && ours.age < 91 * DAY, "{ours:?}");
    assert!(report.oldest_key_age.is_some_and(|age| age >= 90 * DAY));
    let ids = lifecycle::due_owner_ids(&keyring).expect("due owners");
    assert!(ids.contains(&a) && ids.contains(&b), "{ids:?}");

    // Shredded: never due again.
    lifecycle::shred_keys_by(&keyring, &a, "test").expect("shred");
    let report = lifecycle::due_keys(&keyring).expect("due");
    assert_eq!(due_of(&report, &owners).len(), 1);
}

/// Two keyrings over two connection pools (two processes' worth) count
/// their seals apart; flushed, the counts add up in `phi_seal_counts`,
/// concurrent flushes included, and never go backwards.
#[test]
fn seal_counts_of_two_keyrings_add_up_and_never_go_backwards() {
    let db = TestDb::new();
    let owner = common::unique_owner("due-seals");
    let first = db.keyring();
    let second = db.keyring();
    let store = db.store();
    let recorded = || -> u64 {
        store
            .seal_counts(&[&owner])
            .expect("counts")
            .iter()
            .filter(|c| c.owner_id == owner && c.version == 1)
            .map(|c| c.seals)
            .sum()
    };
    let mut seen = Vec::new();
    for i in 0..5 {
        first.seal(&format!("v{i}"), &owner, TEXT, b"r").expect("seal");
    }
    for i in 0..7_i64 {
        second.seal(&i, &owner, "phi_it_values.v_i64", b"r").expect("seal");
    }
    assert_eq!(
        first.unflushed_seal_counts(),
        vec![phi::SealCount::new(owner.clone(), 1, 5)]
    );
    seen.push(recorded());
    assert_eq!(seen[0], 0, "nothing recorded before a flush");

    // Both flush at once.
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for keyring in [&first, &second] {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                keyring.flush_seal_counts().expect("flush")
            });
        }
    });
    seen.push(recorded());
    assert_eq!(seen[1], 12);
    assert!(first.unflushed_seal_counts().is_empty());
    assert_eq!(first.flush_seal_counts().expect("flush"), 0, "each seal is recorded once");

    // A batch of records counts each value.
    for i in 0..3 {
        first.seal(&format!("w{i}"), &owner, TEXT, b"r").expect("seal");
    }
    first.flush_seal_counts().expect("flush");
    seen.push(recorded());
    // The last clone's drop flushes.
    second.seal(&"x".to_string(), &owner, TEXT, b"r").expect("seal");
    second.seal(&"y".to_string(), &owner, TEXT, b"r").expect("seal");
    drop(second);
    seen.push(recorded());
    assert_eq!(seen, [0, 12, 15, 17]);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "never backwards: {seen:?}");

    // Due by seals at the budget, not below it.
    first
        .set_rotation_policy(phi::RotationPolicy { max_key_age: None, max_seals_per_key: Some(17) })
        .expect("policy");
    let report = lifecycle::due_keys(&first).expect("due");
    assert_eq!(due_of(&report, &[&owner]), vec![(owner.clone(), 1, 17, vec![lifecycle::DueReason::Seals])]);
    first
        .set_rotation_policy(phi::RotationPolicy { max_key_age: None, max_seals_per_key: Some(18) })
        .expect("policy");
    assert!(due_of(&lifecycle::due_keys(&first).expect("due"), &[&owner]).is_empty());
    let err = first
        .set_rotation_policy(phi::RotationPolicy { max_key_age: None, max_seals_per_key: Some(phi::NONCE_BUDGET + 1) })
        .expect_err("above the nonce budget");
    assert!(err.to_string().contains("nonce budget"), "{err}");

    // Rotated: the new version counts from zero; the old one's count stays.
    lifecycle::rotate(&first, &owner).expect("rotate");
    first.seal(&"z".to_string(), &owner, TEXT, b"r").expect("seal");
    first.flush_seal_counts().expect("flush");
    let counts = store.seal_counts(&[&owner]).expect("counts");
    assert_eq!(
        counts,
        vec![phi::SealCount::new(owner.clone(), 1, 17), phi::SealCount::new(owner.clone(), 2, 1)]
    );
}

/// `phi keys due`, text and JSON: an owner past the seal budget, and one
/// whose key was created 100 days ago.
#[test]
fn phi_keys_due_lists_owners_with_age_seals_and_reason() {
    let db = TestDb::new();
    let busy = common::unique_owner("due-cli-busy");
    let old = common::unique_owner("due-cli-old");
    let keyring = db.keyring();
    for i in 0..4 {
        keyring.seal(&format!("v{i}"), &busy, TEXT, b"r").expect("seal");
    }
    keyring.seal(&"v".to_string(), &old, TEXT, b"r").expect("seal");
    keyring.flush_seal_counts().expect("flush");
    let mut conn = db.conn();
    let created: NaiveDateTime = user_encryption_keys::table
        .filter(user_encryption_keys::owner_id.eq(&old))
        .select(user_encryption_keys::created_at)
        .first(&mut conn)
        .expect("created_at");
    diesel::update(user_encryption_keys::table.filter(user_encryption_keys::owner_id.eq(&old)))
        .set(user_encryption_keys::created_at.eq(created - chrono::TimeDelta::days(100)))
        .execute(&mut conn)
        .expect("age the key");

    let phi = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_phi"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
            .env("PHI_KEK_ID", "local-test")
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_MAX_KEY_AGE")
            .env_remove("PHI_MAX_SEALS_PER_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("phi runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "phi {args:?}:\n{stdout}\n{stderr}");
        assert!(!stdout.contains(common::MASTER_KEY_B64) && !stderr.contains(common::MASTER_KEY_B64));
        stdout
    };

    let json: serde_json::Value = serde_json::from_str(&phi(&[
        "keys", "due", "--max-key-age", "90d", "--max-seals-per-key", "4", "--format", "json",
    ]))
    .expect("one JSON document");
    assert_eq!(json["command"], "keys due");
    assert_eq!(json["policy"]["max_key_age_seconds"], 90 * 86_400);
    assert_eq!(json["policy"]["max_seals_per_key"], 4);
    assert_eq!(json["policy"]["nonce_budget"], 4_294_967_296_u64);
    let due = json["due"].as_array().expect("due array");
    let entry = |owner: &str| due.iter().find(|d| d["owner"] == owner).unwrap_or_else(|| panic!("{owner} in {json}"));
    assert_eq!(entry(&busy)["reasons"], serde_json::json!(["seals"]));
    assert_eq!(entry(&busy)["seals"], 4);
    assert_eq!(entry(&busy)["version"], 1);
    assert_eq!(entry(&old)["reasons"], serde_json::json!(["age"]));
    let age = entry(&old)["age_seconds"].as_u64().expect("age");
    assert!((100 * 86_400..101 * 86_400).contains(&age), "{age}");

    // Below the budget, and younger than the limit: neither is listed.
    let json: serde_json::Value = serde_json::from_str(&phi(&[
        "keys", "due", "--max-key-age", "101d", "--max-seals-per-key", "5", "--format", "json",
    ]))
    .expect("JSON");
    let listed = json["due"].as_array().expect("due").iter().any(|d| d["owner"] == busy.as_str() || d["owner"] == old.as_str());
    assert!(!listed, "{json}");

    let text = phi(&["keys", "due", "--max-key-age", "90d", "--max-seals-per-key", "4"]);
    assert!(text.starts_with("Rotation policy: max key age 90d, max seals per key 4;"), "{text}");
    assert!(text.contains("OWNER") && text.contains("REASON"), "{text}");
    let line = |owner: &str| text.lines().find(|l| l.starts_with(owner)).unwrap_or_else(|| panic!("{owner} in {text}")).to_owned();
    assert!(line(&busy).ends_with("  seals"), "{text}");
    assert!(line(&old).contains("100d") && line(&old).ends_with("  age"), "{text}");
}

#[derive(QueryableByName)]
struct Waiting {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// The other order: a rotation that locked the owner's rows first and
/// inserted its version, not yet committed, while a shred begins. The shred
/// waits for the rotation's lock and then destroys the new version too: no
/// version of the owner survives. The rotation's transaction is held open
/// on a connection of the test's (as `add_key_version` runs it: the rows
/// locked, then the insert), and committed once the server shows the shred
/// waiting for a lock. SQLite runs one write transaction at a time, so
/// there the shred simply begins after the rotation.
#[test]
fn a_shred_waiting_for_a_rotation_destroys_its_new_version_too() {
    use diesel::connection::SimpleConnection as _;
    let db = TestDb::new();
    let owner = common::unique_owner("race-rotate");
    db.keyring().seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("first key");

    let mut rotation = db.conn();
    let sqlite = server_url().is_none();
    rotation.batch_execute(if sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" }).expect("begin");
    let locked: Vec<Waiting> = diesel::sql_query(format!(
        "SELECT version AS n FROM user_encryption_keys WHERE owner_id = '{owner}'{}",
        if sqlite { "" } else { " FOR UPDATE" }
    ))
    .load(&mut rotation)
    .expect("lock the owner's rows");
    let locked: Vec<i64> = locked.into_iter().map(|w| w.n).collect();
    assert_eq!(locked, [1]);
    let (_key, wrapped) = common::local_kek().generate(&owner, 2).expect("key");
    let at = chrono::Utc::now().naive_utc();
    diesel::insert_into(user_encryption_keys::table)
        .values((
            user_encryption_keys::owner_id.eq(&owner),
            user_encryption_keys::version.eq(2_i64),
            user_encryption_keys::kek_id.eq("local-test"),
            user_encryption_keys::wrapped_key.eq(wrapped),
            user_encryption_keys::state.eq("active"),
            user_encryption_keys::created_at.eq(at),
            user_encryption_keys::updated_at.eq(at),
        ))
        .execute(&mut rotation)
        .expect("the rotation's insert");

    let report = std::thread::scope(|s| {
        let shred = s.spawn(|| {
            let keyring = Keyring::builder(db.store(), common::local_kek()).without_feed().build().expect("keyring");
            lifecycle::shred_keys_by(&keyring, &owner, "other-process").expect("shred")
        });
        // The server shows the shred waiting for the rotation's lock.
        wait_until_blocked_on(&db, "user_encryption_keys");
        rotation.batch_execute("COMMIT").expect("commit");
        shred.join().expect("no panic")
    });
    assert_eq!(report.destroyed_versions, vec![1, 2], "{report:?}");
    assert_eq!(report.keys_left, 0, "{report:?}");
    let rows = db.store().load_keys(&[&owner]).expect("rows");
    assert!(rows.iter().all(|r| r.state == phi::KeyState::Destroyed), "{rows:?}");
}
