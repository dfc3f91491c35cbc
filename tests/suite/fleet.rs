// The key-event feed and the fleet's roll-out on this backend, in one
// process: every life-cycle change appends its event in its own
// transaction; a following keyring applies them. Included by
// `suite/mod.rs` inside `mod fleet`. The feed is shared with every test
// running against the same server: events are filtered by this test's
// owners, roll-outs use a policy name of the test's own.

use phi::feed::{FeedEvent, KeyEventKind};
use phi::lifecycle;
use phi::Rollout;

/// The events about `owner` after id `after`.
fn events_of(store: &dyn KeyStore, after: i64, owner: &str) -> Vec<FeedEvent> {
    let mut out = Vec::new();
    let mut at = after;
    loop {
        let page = store.key_events_after(at, 500).expect("read the feed");
        let Some(last) = page.last() else { break };
        at = last.id;
        out.extend(page.into_iter().filter(|e| e.event.owner_id.as_deref() == Some(owner)));
    }
    out
}

fn following(db: &TestDb, policy: &str) -> Keyring {
    Keyring::builder(db.store(), common::local_kek())
        .actor("fleet-follower")
        .feed_interval(Duration::from_millis(100))
        .rollout_policy(policy)
        .build()
        .expect("following keyring")
}

/// Waits, up to `deadline`, until `done` holds.
fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + deadline;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_life_cycle_change_appends_its_event() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let store = db.store();
    let owner = common::unique_owner("feed-events");
    let head = lifecycle::feed_head(store.as_ref()).expect("head");
    keyring.seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("first seal");
    assert_eq!(lifecycle::rotate(&keyring, &owner).expect("rotate"), 2);
    let mut conn = db.conn();
    assert!(lifecycle::retire(&mut conn, &keyring, &owner, 1, &[]).expect("retire"));
    lifecycle::clear_cache_fleet(&keyring, Some(&owner)).expect("clear");
    let report = lifecycle::shred(&mut conn, &keyring, &owner, &[], 0).expect("shred");
    assert_eq!(report.destroyed_versions, vec![1, 2]);
    // A second shred destroys nothing and appends nothing.
    lifecycle::shred(&mut conn, &keyring, &owner, &[], 0).expect("shred again");

    let events = events_of(store.as_ref(), head, &owner);
    let kinds: Vec<(KeyEventKind, Option<u32>)> =
        events.iter().map(|e| (e.event.kind, e.event.key_version)).collect();
    assert_eq!(
        kinds,
        [
            (KeyEventKind::Rotate, Some(2)),
            (KeyEventKind::Retire, Some(1)),
            (KeyEventKind::Clear, None),
            (KeyEventKind::Shred, None),
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    assert!(events.iter().all(|e| e.event.actor == "integration-test"));
    assert!(lifecycle::feed_head(store.as_ref()).expect("head") >= events[3].id);
    // The clear is audited beside the key operations.
    let audit = store.audit(Some(&owner), 20).expect("audit");
    assert!(audit.iter().any(|r| r.event.action == phi::AuditAction::ClearCache));
}

#[test]
fn feed_ids_have_no_gaps_under_concurrent_appends() {
    let db = TestDb::new();
    let owner = common::unique_owner("feed-gaps");
    let keyring = db.keyring();
    let head = lifecycle::feed_head(keyring.store().as_ref()).expect("head");
    std::thread::scope(|s| {
        for _ in 0..4 {
            let keyring = db.keyring();
            let owner = owner.clone();
            s.spawn(move || {
                for _ in 0..5 {
                    lifecycle::clear_cache_fleet(&keyring, Some(&owner)).expect("clear");
                }
            });
        }
    });
    let mine = events_of(keyring.store().as_ref(), head, &owner);
    assert_eq!(mine.len(), 20);
    // Every id from the head on is present: nobody's event is skipped by a
    // reader that moves past a later id.
    let all = keyring.store().key_events_after(head, 100_000).expect("read");
    assert!(all.windows(2).all(|w| w[1].id == w[0].id + 1), "ids are consecutive");
    assert_eq!(all.first().map(|e| e.id), Some(head + 1));
}

#[test]
fn a_following_keyring_drops_a_shredded_owner_and_obeys_the_roll_out() {
    let db = TestDb::new();
    let admin = db.keyring();
    let policy = common::unique_owner("policy");
    let policy = &policy[policy.len().saturating_sub(60)..];
    let follower = following(&db, policy);
    let owner = common::unique_owner("feed-follow");
    let other = common::unique_owner("feed-other");
    // The follower caches both owners' keys.
    follower.seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seal");
    follower.seal(&"Roe".to_string(), &other, TEXT, b"r").expect("seal");

    let mut conn = db.conn();
    lifecycle::shred(&mut conn, &admin, &owner, &[], 0).expect("shred");
    let shred_head = lifecycle::feed_head(admin.store().as_ref()).expect("head");
    // Still cached until the follower reads the feed: applied at the next
    // read (sync_feed is the follower thread's read, done now; the thread
    // itself may have been first, woken by its interval or by NOTIFY).
    follower.sync_feed();
    assert!(follower.feed_status().expect("following").position >= shred_head);
    assert!(matches!(
        follower.seal(&"Doe".to_string(), &owner, TEXT, b"r"),
        Err(Error::Shredded { .. })
    ));
    follower.seal(&"Roe".to_string(), &other, TEXT, b"r").expect("another owner seals");

    lifecycle::set_rollout(&{
        Keyring::builder(db.store(), common::local_kek())
            .rollout_policy(policy)
            .build()
            .expect("admin keyring")
    }, &Rollout::owners([other.clone()]))
    .expect("roll-out");
    assert_eq!(
        lifecycle::fleet_rollout(admin.store().as_ref(), policy).expect("read"),
        Some(Rollout::owners([other.clone()]))
    );
    // The follower's own thread applies it within its interval.
    assert!(
        wait_until(Duration::from_secs(5), || follower.rollout() == Rollout::owners([other.clone()])),
        "the follower applies the roll-out"
    );
    assert!(follower.encrypts_for(&other));
    assert!(!follower.encrypts_for(&owner));
    let status = follower.feed_status().expect("following");
    assert!(status.events_applied >= 2);
    assert_eq!(status.read_failures, 0);
    // A keyring built now starts from the stored roll-out.
    assert_eq!(following(&db, policy).rollout(), Rollout::owners([other.clone()]));
}

#[test]
fn a_fleet_wide_clear_unwraps_each_owner_again() {
    let db = TestDb::new();
    let policy = common::unique_owner("policy");
    let policy = &policy[policy.len().saturating_sub(60)..];
    let follower = following(&db, policy);
    let owners: Vec<String> = (0..3).map(|i| common::unique_owner(&format!("feed-clear{i}"))).collect();
    for owner in &owners {
        follower.seal(&"Doe".to_string(), owner, TEXT, b"r").expect("seal");
    }
    let before = follower.stats().unwraps;
    for owner in &owners {
        follower.keys_for_seal(owner).expect("cached");
    }
    assert_eq!(follower.stats().unwraps, before, "cached");
    lifecycle::clear_cache_fleet(&db.keyring(), None).expect("clear all");
    follower.sync_feed();
    for owner in &owners {
        follower.keys_for_seal(owner).expect("keys again");
    }
    assert_eq!(follower.stats().unwraps, before + 3, "one unwrap per owner");
}


#[test]
fn a_following_keyring_records_its_read_position_and_forgets_it_when_dropped() {
    let db = TestDb::new();
    let reader = common::unique_owner("feed-reader");
    let policy = common::unique_owner("policy");
    let policy = &policy[policy.len().saturating_sub(60)..];
    let follower = Keyring::builder(db.store(), common::local_kek())
        .feed_interval(Duration::from_millis(100))
        .feed_reader(reader.as_str())
        .rollout_policy(policy)
        .build()
        .expect("following keyring");
    assert_eq!(follower.feed_status().expect("following").reader, reader);
    let id = lifecycle::clear_cache_fleet(&db.keyring(), Some(&reader)).expect("clear");
    let store = db.store();
    let position = |store: &dyn KeyStore| {
        lifecycle::feed_readers(store)
            .expect("readers")
            .into_iter()
            .find(|r| r.reader == reader)
            .map(|r| r.position)
    };
    // The follower's thread reads the event and records its position.
    assert!(
        wait_until(Duration::from_secs(5), || position(store.as_ref()).is_some_and(|p| p >= id)),
        "the reader's position reaches event #{id}: {:?}",
        position(store.as_ref())
    );
    let recorded = lifecycle::feed_readers(store.as_ref())
        .expect("readers")
        .into_iter()
        .find(|r| r.reader == reader)
        .expect("recorded");
    assert!(recorded.age() < Duration::from_secs(60), "{recorded:?}");
    // Dropped: the thread stops and forgets the reader.
    drop(follower);
    assert!(
        wait_until(Duration::from_secs(5), || position(store.as_ref()).is_none()),
        "a dropped keyring's reader is forgotten"
    );
}

/// Appends an event of kind `kind` (any text) for `owner` as a newer build
/// of phi would: the head first, in one transaction.
fn append_raw(conn: &mut Conn, kind: &str, owner: Option<&str>) -> QueryResult<i64> {
    use phi::schema::{phi_key_events as e, phi_key_feed as f};
    conn.transaction(|conn| {
        diesel::update(f::table.filter(f::id.eq(1))).set(f::head.eq(f::head + 1)).execute(conn)?;
        let id: i64 = f::table.filter(f::id.eq(1)).select(f::head).first(conn)?;
        diesel::insert_into(e::table)
            .values((
                e::id.eq(id),
                e::occurred_at.eq(chrono::Utc::now().naive_utc()),
                e::kind.eq(kind),
                e::owner_id.eq(owner),
                e::actor.eq("a-newer-build"),
            ))
            .execute(conn)?;
        Ok(id)
    })
}

#[test]
fn an_event_of_an_unknown_kind_drops_its_owner_and_the_events_after_it_are_applied() {
    let db = TestDb::new();
    let admin = db.keyring();
    let policy = common::unique_owner("policy");
    let policy = &policy[policy.len().saturating_sub(60)..];
    // Read by hand (`sync_feed`): the thread reads once an hour.
    let follower = Keyring::builder(db.store(), common::local_kek())
        .feed_interval(Duration::from_secs(3_600))
        .rollout_policy(policy)
        .build()
        .expect("following keyring");
    let shredded = common::unique_owner("unknown-shred");
    let named = common::unique_owner("unknown-named");
    let anyone = common::unique_owner("unknown-anyone");
    for owner in [&shredded, &named, &anyone] {
        follower.seal(&"Doe".to_string(), owner, TEXT, b"r").expect("cached");
    }

    // A newer build appends a kind this one does not know, then a shred.
    let mut conn = db.conn();
    let unknown = append_raw(&mut conn, "quarantine", Some(&named)).expect("the schema takes a kind it does not list");
    lifecycle::shred(&mut conn, &admin, &shredded, &[], 0).expect("shred");
    let head = lifecycle::feed_head(admin.store().as_ref()).expect("head");

    // Read back as an unknown kind, its text kept.
    let read = events_of(admin.store().as_ref(), unknown - 1, &named);
    assert_eq!(read.len(), 1, "{read:?}");
    assert_eq!((read[0].id, read[0].event.kind, read[0].stored_kind.as_str()), (unknown, KeyEventKind::Unknown, "quarantine"));

    let before = follower.stats().unwraps;
    follower.sync_feed();
    let status = follower.feed_status().expect("following");
    assert!(status.position >= head, "the position passes the unknown event and the shred: {status:?}");
    assert_eq!(status.read_failures, 0, "the batch did not fail");
    // The shred after it was applied.
    let refused = follower.seal(&"Doe".to_string(), &shredded, TEXT, b"r").expect_err("shredded");
    assert!(matches!(refused, Error::Shredded { .. }), "{refused:?}");
    // The owner it named was dropped: its keys are unwrapped again.
    follower.keys_for_seal(&named).expect("keys again");
    assert_eq!(follower.stats().unwraps, before + 1, "the named owner was dropped and reloaded");
    // No staleness follows: writes go on.
    follower.seal(&"Roe".to_string(), &anyone, TEXT, b"r").expect("seals");

    // An unknown kind naming no owner drops every owner.
    append_raw(&mut conn, "quarantine", None).expect("a fleet-wide unknown event");
    follower.sync_feed();
    let before = follower.stats().unwraps;
    follower.keys_for_seal(&anyone).expect("keys again");
    assert_eq!(follower.stats().unwraps, before + 1, "every owner was dropped");
    assert_eq!(follower.feed_status().expect("following").read_failures, 0);

    // The schema still refuses an empty kind; phi never writes an unknown one.
    assert!(append_raw(&mut conn, "", Some(&named)).is_err(), "an empty kind is refused");
    let refused = admin
        .store()
        .append_key_events(&[phi::feed::KeyEvent::new(KeyEventKind::Unknown, Some(&named), "test")], &[])
        .expect_err("an unknown kind is not written");
    assert!(matches!(refused, Error::InvalidInput { .. }), "{refused:?}");
}

#[test]
fn a_keyring_built_with_no_feed_configuration_follows_the_feed() {
    let db = TestDb::new();
    let admin = db.keyring();
    let owner = common::unique_owner("default-follow");
    // Built with no feed configuration at all.
    let default = Keyring::builder(db.store(), common::local_kek()).build().expect("keyring");
    let opted_out = Keyring::builder(db.store(), common::local_kek()).without_feed().build().expect("keyring");
    assert!(opted_out.feed_status().is_none(), "without_feed opts out");
    let status = default.feed_status().expect("follows by default");
    assert_eq!(status.interval, phi::DEFAULT_FEED_INTERVAL);
    let sealed = default.seal(&"Doe".to_string(), &owner, TEXT, b"r").expect("seals");
    opted_out.keys_for_seal(&owner).expect("cached too");

    let mut conn = db.conn();
    lifecycle::shred(&mut conn, &admin, &owner, &[], 0).expect("shred");
    let head = lifecycle::feed_head(admin.store().as_ref()).expect("head");
    // The keyring's own thread reads the feed within its interval.
    assert!(
        wait_until(Duration::from_secs(20), || default.feed_status().is_some_and(|s| s.position >= head)),
        "the default keyring reads the shred: {:?}",
        default.feed_status()
    );
    let refused = default.seal(&"Roe".to_string(), &owner, TEXT, b"r").expect_err("shredded");
    assert!(matches!(refused, Error::Shredded { .. }), "{refused:?}");
    assert!(default.open::<String>(sealed.clone(), &owner, TEXT, b"r").is_err(), "opens nothing");
    // The opted-out keyring still serves its cached keys (until its TTL).
    assert_eq!(opted_out.open::<String>(sealed, &owner, TEXT, b"r").expect("cached"), "Doe");
}

/// Two changes of one policy's roll-out at once both succeed, the later
/// one standing. The other change (as `set_fleet_rollout` ran it before:
/// the policy's row deleted and inserted again) is held open on a
/// connection of the test's and committed once the server shows the
/// keyring's change waiting for its lock; on PostgreSQL that change used
/// to fail with a duplicate key.
#[test]
fn two_roll_out_changes_at_once_both_succeed() {
    use diesel::connection::SimpleConnection as _;
    use phi::schema::phi_rollout as r;
    let db = TestDb::new();
    let policy = common::unique_owner("race-rollout");
    let keyring = Keyring::builder(db.store(), common::local_kek())
        .rollout_policy(&policy)
        .without_feed()
        .build()
        .expect("keyring");
    lifecycle::set_rollout(&keyring, &Rollout::Nobody).expect("the first roll-out");

    let mut other = db.conn();
    other
        .batch_execute(if server_url().is_none() { "BEGIN IMMEDIATE" } else { "BEGIN" })
        .expect("begin");
    diesel::delete(r::table.filter(r::policy.eq(&policy))).execute(&mut other).expect("delete");
    diesel::insert_into(r::table)
        .values((
            r::policy.eq(&policy),
            r::mode.eq("all"),
            r::updated_at.eq(chrono::Utc::now().naive_utc()),
            r::updated_by.eq("other-process"),
        ))
        .execute(&mut other)
        .expect("insert");
    let changed = std::thread::scope(|s| {
        let change = s.spawn(|| lifecycle::set_rollout(&keyring, &Rollout::owners(["o-1".to_owned()])));
        wait_until_blocked_on(&db, "phi_rollout");
        other.batch_execute("COMMIT").expect("commit");
        change.join().expect("no panic")
    });
    changed.expect("the second change succeeds");
    assert_eq!(
        lifecycle::fleet_rollout(db.store().as_ref(), &policy).expect("read"),
        Some(Rollout::owners(["o-1".to_owned()]))
    );
}
