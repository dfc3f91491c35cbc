// The durable access log: batches chained by a keyed hash, verification that
// names the first break, queries, and pruning with a checkpoint. Included in
// `tests/suite/mod.rs`, so `Conn`, `server_url()` and `TestDb` are in scope.

use phi::access::{AccessLog as _, AccessOp, AccessRecord, Accessor};
use phi::access_log::{
    self, AccessFilter, AccessLogStore, BreakKind, ChainReport, DieselAccessLog,
    DieselAccessLogStore,
};
use phi::schema::{phi_access_batches as ab, phi_access_log as al};

/// Prune deletes old rows of every chain and of the key tables: the tests
/// that write old records or prune run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn tables(db: &TestDb) -> Arc<DieselAccessLogStore<Conn>> {
    Arc::new(DieselAccessLogStore::<Conn>::builder(&db.url).run_migrations(true).connect().expect("access log tables"))
}

fn record(user: &str, op: AccessOp, owner: &str, row: &str, at: NaiveDateTime) -> AccessRecord {
    AccessRecord {
        occurred_at: at,
        accessor: Accessor::new(user, "treatment").with_request_id("req-1"),
        op,
        owner_id: owner.to_owned(),
        table: "cases".to_owned(),
        row: Some(row.to_owned()),
        fields: vec!["patient_last".to_owned(), "diagnosis".to_owned()],
    }
}

fn now() -> NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

/// A chain of three batches (2, 3 and 1 records) for `owner`, written
/// through a `DieselAccessLog`; returns the chain's name.
fn three_batches(db: &TestDb, keyring: &Keyring, owner: &str) -> String {
    let chain = common::unique_owner("chain");
    let log = DieselAccessLog::builder(tables(db))
        .chain(chain.clone())
        .start(keyring)
        .expect("log starts");
    for (i, n) in [2usize, 3, 1].into_iter().enumerate() {
        let records = (0..n)
            .map(|j| record(&format!("dr-{i}-{j}"), AccessOp::Read, owner, &format!("case-{i}-{j}"), now()))
            .collect();
        log.append(records).expect("append");
        log.flush().expect("flush");
    }
    assert_eq!(log.counts().written, 6);
    chain
}

fn verify(db: &TestDb, keyring: &Keyring, chain: &str) -> ChainReport {
    access_log::verify_chain(tables(db).as_ref(), keyring, chain, &mut None).expect("verify runs")
}

fn broken(report: &ChainReport) -> (i64, BreakKind, String) {
    let b = report.broken.clone().unwrap_or_else(|| panic!("the chain verified: {report:?}"));
    (b.batch, b.kind, b.message)
}

#[test]
fn records_are_written_in_chained_batches_and_verify() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-owner");
    let chain = three_batches(&db, &keyring, &owner);
    let report = verify(&db, &keyring, &chain);
    assert!(report.is_intact(), "{report:?}");
    assert_eq!((report.first, report.last, report.batches, report.records), (Some(1), Some(3), 3, 6));

    let found = tables(&db)
        .query(&AccessFilter { owner: Some(owner.clone()), ..AccessFilter::default() })
        .expect("query");
    assert_eq!(found.len(), 6);
    let first = &found[0];
    assert_eq!((first.batch, first.seq, first.op.as_str()), (1, 0, "read"));
    assert_eq!(first.user, "dr-0-0");
    assert_eq!(first.purpose, "treatment");
    assert_eq!(first.request_id.as_deref(), Some("req-1"));
    assert_eq!(first.fields, "patient_last,diagnosis");
    // Every access to one case.
    let case = tables(&db)
        .query(&AccessFilter {
            table: Some("cases".into()),
            row: Some("case-1-2".into()),
            owner: Some(owner.clone()),
            ..AccessFilter::default()
        })
        .expect("query");
    assert_eq!(case.len(), 1);
    assert_eq!(case[0].user, "dr-1-2");
    // Records name fields, never values: nothing else is stored.
    let by_user = tables(&db)
        .query(&AccessFilter { user: Some("dr-1-0".into()), chain: Some(chain.clone()), ..AccessFilter::default() })
        .expect("query");
    assert_eq!(by_user.len(), 1);
}

/// The access log's tables, except that the first read of the heads is
/// followed, before it returns, by a batch `log` appends: a writer that
/// commits between the head `verify` reads and the batches it reads next.
#[derive(Debug)]
struct AppendAfterHeads {
    inner: Arc<DieselAccessLogStore<Conn>>,
    log: std::sync::Mutex<Option<DieselAccessLog>>,
    owner: String,
}

impl AccessLogStore for AppendAfterHeads {
    fn append_batch(
        &self,
        chain: &str,
        key: &access_log::ChainKey,
        written_at: NaiveDateTime,
        records: &[AccessRecord],
    ) -> phi::Result<i64> {
        self.inner.append_batch(chain, key, written_at, records)
    }
    fn heads(&self) -> phi::Result<Vec<access_log::ChainHead>> {
        let heads = self.inner.heads()?;
        if let Some(log) = self.log.lock().expect("lock").take() {
            log.append(vec![record("dr-late", AccessOp::Read, &self.owner, "case-late", now())])
                .expect("append");
            log.flush().expect("flush");
        }
        Ok(heads)
    }
    fn chains_with_batches(&self) -> phi::Result<Vec<String>> {
        self.inner.chains_with_batches()
    }
    fn first_batch(&self, chain: &str) -> phi::Result<Option<i64>> {
        self.inner.first_batch(chain)
    }
    fn checkpoint(&self, chain: &str, first: i64) -> phi::Result<Option<access_log::BatchRow>> {
        self.inner.checkpoint(chain, first)
    }
    fn batches(&self, chain: &str, from: i64, limit: usize) -> phi::Result<Vec<access_log::BatchRow>> {
        self.inner.batches(chain, from, limit)
    }
    fn batch_records(&self, chain: &str, from: i64, to: i64) -> phi::Result<Vec<access_log::StoredAccess>> {
        self.inner.batch_records(chain, from, to)
    }
    fn orphan_batch(&self, chain: &str) -> phi::Result<Option<i64>> {
        self.inner.orphan_batch(chain)
    }
    fn query(&self, filter: &AccessFilter) -> phi::Result<Vec<access_log::StoredAccess>> {
        self.inner.query(filter)
    }
    fn prune(
        &self,
        before: NaiveDateTime,
        key: &access_log::ChainKey,
        written_at: NaiveDateTime,
    ) -> phi::Result<access_log::PruneReport> {
        self.inner.prune(before, key, written_at)
    }
}

#[test]
fn a_batch_appended_while_verify_reads_is_not_a_break() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("acl-live");
    let chain = three_batches(&db, &keyring, &owner);
    let log = DieselAccessLog::builder(tables(&db))
        .chain(chain.clone())
        .start(&keyring)
        .expect("log starts");
    let store = AppendAfterHeads {
        inner: tables(&db),
        log: std::sync::Mutex::new(Some(log)),
        owner,
    };
    let report = access_log::verify_chain(&store, &keyring, &chain, &mut None).expect("verify runs");
    assert!(report.broken.is_none(), "a live append is not a break: {report:?}");
    assert_eq!((report.batches, report.records, report.last), (4, 7, Some(4)), "{report:?}");
}

#[test]
fn a_deleted_record_is_named() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let chain = three_batches(&db, &keyring, &common::unique_owner("al-del"));
    let mut conn = db.conn();
    let n = diesel::delete(al::table.filter(al::chain.eq(&chain)).filter(al::batch.eq(2)).filter(al::seq.eq(1)))
        .execute(&mut conn)
        .expect("delete");
    assert_eq!(n, 1);
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (2, BreakKind::Altered), "{message}");
    assert!(message.contains("batch 2"), "{message}");
}

#[test]
fn an_altered_record_is_named() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let chain = three_batches(&db, &keyring, &common::unique_owner("al-alt"));
    let mut conn = db.conn();
    diesel::update(al::table.filter(al::chain.eq(&chain)).filter(al::batch.eq(3)))
        .set(al::user_id.eq("someone-else"))
        .execute(&mut conn)
        .expect("update");
    let report = verify(&db, &keyring, &chain);
    let (batch, kind, message) = broken(&report);
    assert_eq!((batch, kind), (3, BreakKind::Altered), "{message}");
    assert_eq!(report.last, Some(2), "batches 1 and 2 verified");
}

#[test]
fn reordered_records_are_named() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let chain = three_batches(&db, &keyring, &common::unique_owner("al-ro"));
    let mut conn = db.conn();
    // Swap records 0 and 2 of batch 2 (through a free seq).
    let at = |seq: i32| al::table.filter(al::chain.eq(chain.clone())).filter(al::batch.eq(2)).filter(al::seq.eq(seq));
    diesel::update(at(0)).set(al::seq.eq(99)).execute(&mut conn).expect("swap");
    diesel::update(at(2)).set(al::seq.eq(0)).execute(&mut conn).expect("swap");
    diesel::update(at(99)).set(al::seq.eq(2)).execute(&mut conn).expect("swap");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (2, BreakKind::Altered), "{message}");
}

#[test]
fn reordered_batches_are_named() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let chain = three_batches(&db, &keyring, &common::unique_owner("al-rb"));
    let mut conn = db.conn();
    // Swap batches 2 and 3, records and all.
    for (from, to) in [(2i64, 99i64), (3, 2), (99, 3)] {
        diesel::update(ab::table.filter(ab::chain.eq(&chain)).filter(ab::id.eq(from)))
            .set(ab::id.eq(to))
            .execute(&mut conn)
            .expect("swap batch");
        diesel::update(al::table.filter(al::chain.eq(&chain)).filter(al::batch.eq(from)))
            .set(al::batch.eq(to))
            .execute(&mut conn)
            .expect("swap records");
    }
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (2, BreakKind::Reordered), "{message}");
    assert!(message.contains("batch 2 does not follow batch 1"), "{message}");
}

#[test]
fn a_deleted_batch_is_missing() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let chain = three_batches(&db, &keyring, &common::unique_owner("al-miss"));
    let mut conn = db.conn();
    diesel::delete(al::table.filter(al::chain.eq(&chain)).filter(al::batch.eq(2))).execute(&mut conn).expect("delete");
    diesel::delete(ab::table.filter(ab::chain.eq(&chain)).filter(ab::id.eq(2))).execute(&mut conn).expect("delete");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (2, BreakKind::Missing), "{message}");
    assert!(message.contains("batch 2 is missing (batch 3 follows batch 1)"), "{message}");
}

#[test]
fn a_batch_deleted_without_its_records_leaves_orphans() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let chain = three_batches(&db, &keyring, &common::unique_owner("al-orph"));
    let mut conn = db.conn();
    // The first batch's row, as if the chain started at 2 (no checkpoint).
    diesel::delete(ab::table.filter(ab::chain.eq(&chain)).filter(ab::id.eq(1))).execute(&mut conn).expect("delete");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (1, BreakKind::Missing), "{message}");
    assert!(message.contains("no checkpoint"), "{message}");
}

#[test]
fn a_truncated_log_is_named() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-trunc");
    // The tail cut: the last batch and its records gone.
    let chain = three_batches(&db, &keyring, &owner);
    let mut conn = db.conn();
    diesel::delete(al::table.filter(al::chain.eq(&chain)).filter(al::batch.eq(3))).execute(&mut conn).expect("delete");
    diesel::delete(ab::table.filter(ab::chain.eq(&chain)).filter(ab::id.eq(3))).execute(&mut conn).expect("delete");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (3, BreakKind::Missing), "{message}");
    assert!(message.contains("cut after batch 2"), "{message}");

    // Every record of a chain gone (its batches kept).
    let chain = three_batches(&db, &keyring, &owner);
    diesel::delete(al::table.filter(al::chain.eq(&chain))).execute(&mut conn).expect("delete");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (1, BreakKind::Altered), "{message}");

    // Everything gone but the head.
    let chain = three_batches(&db, &keyring, &owner);
    diesel::delete(al::table.filter(al::chain.eq(&chain))).execute(&mut conn).expect("delete");
    diesel::delete(ab::table.filter(ab::chain.eq(&chain))).execute(&mut conn).expect("delete");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (1, BreakKind::Missing), "{message}");
}

#[test]
fn a_batch_rewritten_without_the_key_does_not_verify() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let chain = three_batches(&db, &keyring, &common::unique_owner("al-forge"));
    // A forger recomputes the hash with a key of its own: the batch does
    // not verify under the chain key.
    let store = tables(&db);
    let batches = store.batches(&chain, 2, 1).expect("batches");
    let records = store.batch_records(&chain, 2, 2).expect("records");
    let other = phi::Dek::new(1, phi::KeyBytes::new([9; 32]));
    let forged = access_log::ChainKey::derive(&other).hash(&batches[0], &records);
    let mut conn = db.conn();
    diesel::update(ab::table.filter(ab::chain.eq(&chain)).filter(ab::id.eq(2)))
        .set(ab::hash.eq(forged.to_vec()))
        .execute(&mut conn)
        .expect("forge");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (2, BreakKind::Altered), "{message}");
}

#[test]
fn fail_open_drops_and_counts_fail_closed_refuses() {
    // A database without phi's tables: every write fails.
    let dir = tempfile::tempdir().expect("temporary directory");
    let bare = DieselAccessLogStore::<diesel::SqliteConnection>::builder(
        &dir.path().join("bare.db").display().to_string(),
    ).check_schema(false).connect()
    .expect("connects");
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-fail");
    let bare: Arc<dyn AccessLogStore> = Arc::new(bare);
    for fail_closed in [false, true] {
        let log = DieselAccessLog::builder(bare.clone())
            .queue(3)
            .fail_closed(fail_closed)
            .retry_interval(Duration::from_secs(3600))
            .start(&keyring)
            .expect("log starts");
        let three = (0..3).map(|i| record("dr-x", AccessOp::Read, &owner, &format!("r{i}"), now())).collect();
        log.append(three).expect("the queue takes 3");
        // The write fails; the records stay queued for another try.
        let error = log.flush().expect_err("nothing can be written");
        assert!(error.to_string().contains("access log"), "{error}");
        let one = vec![record("dr-x", AccessOp::Read, &owner, "r4", now())];
        if fail_closed {
            let error = log.append(one).expect_err("fail-closed refuses");
            assert!(format!("{error:?}").contains("fail-closed"), "{error:?}");
            assert_eq!(log.counts().dropped, 0);
        } else {
            log.append(one).expect("fail-open takes and drops");
            assert_eq!(log.counts().dropped, 1, "the queue is full");
        }
        assert_eq!(log.counts().pending, 3);
    }
}

/// The records of `chain`'s batches, batch by batch.
fn batch_sizes(db: &TestDb, chain: &str) -> Vec<i64> {
    tables(db).batches(chain, 1, 100).expect("batches").iter().map(|b| b.records).collect()
}

#[test]
fn appends_linger_into_one_batch_until_a_flush() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-linger");
    let chain = common::unique_owner("chain");
    let log = DieselAccessLog::builder(tables(&db))
        .chain(chain.clone())
        .linger(Duration::from_secs(3600))
        .start(&keyring)
        .expect("log starts");
    for i in 0..3 {
        log.append(vec![record("dr-l", AccessOp::Read, &owner, &format!("r{i}"), now())]).expect("append");
    }
    // The writer lingers for more (an hour); the flush does not wait for it.
    log.flush().expect("flush");
    assert_eq!(log.counts().written, 3);
    assert_eq!(batch_sizes(&db, &chain), [3], "three appends, one batch");
    assert_eq!(verify(&db, &keyring, &chain).broken, None);
}

#[test]
fn a_full_batch_is_written_without_lingering_and_the_rest_on_drop() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-full");
    let chain = common::unique_owner("chain");
    let log = DieselAccessLog::builder(tables(&db))
        .chain(chain.clone())
        .batch(2)
        .linger(Duration::from_secs(3600))
        .start(&keyring)
        .expect("log starts");
    for i in 0..2 {
        log.append(vec![record("dr-f", AccessOp::Read, &owner, &format!("r{i}"), now())]).expect("append");
    }
    // Two records fill a batch: written without a flush and long before
    // the hour of lingering is up.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while log.counts().written < 2 {
        assert!(std::time::Instant::now() < deadline, "the full batch lingers: {:?}", log.counts());
        std::thread::yield_now();
    }
    // A third lingers until the log is dropped, which writes it out
    // without waiting.
    log.append(vec![record("dr-f", AccessOp::Read, &owner, "r2", now())]).expect("append");
    drop(log);
    assert_eq!(batch_sizes(&db, &chain), [2, 1]);
    assert_eq!(verify(&db, &keyring, &chain).broken, None);
}

#[test]
fn oversized_fields_are_refused_with_their_name() {
    let db = TestDb::new();
    let keyring = db.keyring();
    let log = DieselAccessLog::builder(tables(&db))
        .chain(common::unique_owner("chain"))
        .start(&keyring)
        .expect("log starts");
    let mut r = record("dr-y", AccessOp::Read, "o", "r", now());
    r.accessor = Accessor::new("u".repeat(300), "treatment");
    let error = log.append(vec![r]).expect_err("refused");
    assert!(error.to_string().contains("user id"), "{error}");
}

#[test]
fn prune_leaves_a_verifiable_chain_from_its_checkpoint() {
    let _serial = serial();
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-prune");
    let chain = common::unique_owner("chain");
    let old = NaiveDate::from_ymd_opt(2001, 3, 1).expect("date").and_hms_opt(9, 0, 0).expect("time");
    let log = DieselAccessLog::builder(tables(&db)).chain(chain.clone()).start(&keyring).expect("log");
    for (i, at) in [old, old, now(), now()].into_iter().enumerate() {
        log.append(vec![record("dr-p", AccessOp::Read, &owner, &format!("r{i}"), at)]).expect("append");
        log.flush().expect("flush");
    }
    drop(log);
    // An old key audit record and an old key event (below every reader's
    // position), which prune removes too.
    let store = db.store();
    store
        .append_audit(&[phi::AuditEvent {
            occurred_at: old,
            owner_id: owner.clone(),
            action: phi::AuditAction::Admin,
            key_version: None,
            kek_id: None,
            actor: "test".into(),
            detail: None,
        }])
        .expect("old audit record");
    let event_id = -i64::from(std::process::id()) * 1000 - 7;
    let mut conn = db.conn();
    diesel::insert_into(phi::schema::phi_key_events::table)
        .values((
            phi::schema::phi_key_events::id.eq(event_id),
            phi::schema::phi_key_events::occurred_at.eq(old),
            phi::schema::phi_key_events::kind.eq("clear"),
            phi::schema::phi_key_events::owner_id.eq(Some(owner.clone())),
            phi::schema::phi_key_events::actor.eq("test"),
        ))
        .execute(&mut conn)
        .expect("old key event");

    let before = NaiveDate::from_ymd_opt(2002, 1, 1).expect("date").and_hms_opt(0, 0, 0).expect("time");
    let report = access_log::prune(tables(&db).as_ref(), &keyring, before).expect("prune");
    assert!(report.checkpoints.contains(&(chain.clone(), 5)), "{report:?}");
    assert!(report.access_batches >= 2 && report.access_records >= 2, "{report:?}");
    assert!(report.key_audit_records >= 1 && report.feed_events >= 1, "{report:?}");
    let audit_left: i64 = encryption_key_audit::table
        .filter(encryption_key_audit::owner_id.eq(&owner))
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(audit_left, 0);

    let verified = verify(&db, &keyring, &chain);
    assert!(verified.is_intact(), "{verified:?}");
    assert_eq!((verified.first, verified.last, verified.records), (Some(3), Some(5), 2));
    let left = tables(&db)
        .query(&AccessFilter { chain: Some(chain.clone()), ..AccessFilter::default() })
        .expect("query");
    assert_eq!(left.len(), 2);

    // Writing goes on after the checkpoint, and still verifies.
    let log = DieselAccessLog::builder(tables(&db)).chain(chain.clone()).start(&keyring).expect("log");
    log.append(vec![record("dr-p", AccessOp::Update, &owner, "r9", now())]).expect("append");
    log.flush().expect("flush");
    let verified = verify(&db, &keyring, &chain);
    assert!(verified.is_intact(), "{verified:?}");
    assert_eq!(verified.last, Some(6));

    // A forged checkpoint (claiming more was pruned) does not verify.
    let fourth: Vec<u8> = ab::table
        .filter(ab::chain.eq(&chain))
        .filter(ab::id.eq(4))
        .select(ab::prev_hash)
        .first(&mut conn)
        .expect("batch 4");
    diesel::update(ab::table.filter(ab::chain.eq(&chain)).filter(ab::id.eq(5)))
        .set((ab::pruned_before.eq(Some(4i64)), ab::pruned_hash.eq(Some(fourth))))
        .execute(&mut conn)
        .expect("forge");
    diesel::delete(ab::table.filter(ab::chain.eq(&chain)).filter(ab::id.eq(3))).execute(&mut conn).expect("delete");
    diesel::delete(al::table.filter(al::chain.eq(&chain)).filter(al::batch.eq(3))).execute(&mut conn).expect("delete");
    let (batch, kind, message) = broken(&verify(&db, &keyring, &chain));
    assert_eq!((batch, kind), (5, BreakKind::Altered), "{message}");
}

#[test]
fn prune_past_a_feed_readers_position_is_refused() {
    let _serial = serial();
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-reader");
    let old = NaiveDate::from_ymd_opt(2001, 3, 1).expect("date").and_hms_opt(9, 0, 0).expect("time");
    let mut conn = db.conn();
    let event_id = -i64::from(std::process::id()) * 1000 - 11;
    diesel::insert_into(phi::schema::phi_key_events::table)
        .values((
            phi::schema::phi_key_events::id.eq(event_id),
            phi::schema::phi_key_events::occurred_at.eq(old),
            phi::schema::phi_key_events::kind.eq("clear"),
            phi::schema::phi_key_events::owner_id.eq(Some(owner.clone())),
            phi::schema::phi_key_events::actor.eq("test"),
        ))
        .execute(&mut conn)
        .expect("old key event");
    let reader = common::unique_owner("reader");
    diesel::insert_into(phi::schema::phi_feed_readers::table)
        .values((
            phi::schema::phi_feed_readers::reader.eq(&reader),
            phi::schema::phi_feed_readers::position.eq(event_id - 1),
            phi::schema::phi_feed_readers::updated_at.eq(now()),
        ))
        .execute(&mut conn)
        .expect("reader");
    let before = NaiveDate::from_ymd_opt(2002, 1, 1).expect("date").and_hms_opt(0, 0, 0).expect("time");
    let error = access_log::prune(tables(&db).as_ref(), &keyring, before).expect_err("refused");
    assert_eq!(error.kind(), phi::ErrorKind::Refused, "{error}");
    assert!(error.to_string().contains(&reader), "{error}");
    let left: i64 = phi::schema::phi_key_events::table
        .filter(phi::schema::phi_key_events::id.eq(event_id))
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(left, 1, "nothing deleted");
    // Once the reader has gone, the event goes.
    diesel::delete(phi::schema::phi_feed_readers::table.filter(phi::schema::phi_feed_readers::reader.eq(&reader)))
        .execute(&mut conn)
        .expect("reader gone");
    access_log::prune(tables(&db).as_ref(), &keyring, before).expect("prune");
    let left: i64 = phi::schema::phi_key_events::table
        .filter(phi::schema::phi_key_events::id.eq(event_id))
        .count()
        .get_result(&mut conn)
        .expect("count");
    assert_eq!(left, 0);
}

/// `GET /access-log` on the admin API: the same query as `phi audit
/// access`, a page at a time.
#[cfg(feature = "admin-http")]
#[test]
fn the_admin_api_answers_access_log_queries() {
    use axum::body::Body;
    use axum::http::request::Parts;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use phi::admin::{self, Actor, Guard, Options, Rejection};
    use tower::ServiceExt as _;

    struct Token;
    impl Guard for Token {
        async fn admit(&self, request: &Parts) -> Result<Actor, Rejection> {
            match request.headers.get("authorization").and_then(|v| v.to_str().ok()) {
                Some("Bearer auditor") => Ok(Actor::new("auditor")),
                _ => Err(Rejection::unauthorized("no valid token")),
            }
        }
    }
    let db = TestDb::new();
    let keyring = db.keyring();
    let owner = common::unique_owner("al-admin");
    three_batches(&db, &keyring, &owner);
    let store: Arc<dyn AccessLogStore> = tables(&db);
    let app = admin::router_with(keyring.clone(), Token, Options::default().access_log(store));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let call = |uri: String, token: Option<&str>| -> (StatusCode, serde_json::Value) {
        let mut request = Request::builder().method("GET").uri(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Body::empty()).expect("request");
        runtime.block_on(async {
            let response = app.clone().oneshot(request).await.expect("answers");
            let status = response.status();
            let bytes = response.into_body().collect().await.expect("body").to_bytes();
            (status, serde_json::from_slice(&bytes).expect("JSON"))
        })
    };
    let (status, body) = call(format!("/access-log?owner={owner}&limit=4"), Some("auditor"));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["records"].as_array().expect("records").len(), 4);
    assert_eq!(body["records"][0]["user"], "dr-0-0");
    assert_eq!(body["next_offset"], 4);
    let (status, body) = call(format!("/access-log?owner={owner}&limit=4&offset=4"), Some("auditor"));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["records"].as_array().expect("records").len(), 2);
    assert!(body["next_offset"].is_null());
    let (status, body) = call(format!("/access-log?owner={owner}&table=cases&row=case-1-2"), Some("auditor"));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["records"][0]["user"], "dr-1-2");
    let (status, _) = call(format!("/access-log?owner={owner}&since=yesterday"), Some("auditor"));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(format!("/access-log?owner={owner}"), None);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
