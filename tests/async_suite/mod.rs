// The async suite. Included once per backend by `tests/async_backends.rs`,
// with `SyncConn`, `AsyncConn`, `BLOB` and `server_url()` in scope. Each test
// has a table of its own (dropped and created again at its start), declared
// by `async_schema!`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::NaiveDate;
use diesel::{Connection as _, ExpressionMethods as _, QueryDsl as _, SelectableHelper as _, TextExpressionMethods as _};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::{AsyncConnection, RunQueryDsl as _, SimpleAsyncConnection as _};
use phi::{BoxError, KeyBytes, KeyEncryptionKey, Keyring, PhiRecord as _, Updated};

/// A database for one test: a fresh SQLite file, or the shared server.
struct TestDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    fn new() -> TestDb {
        match server_url() {
            Some(url) => {
                static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
                READY.get_or_init(|| migrate(&url));
                TestDb { url, _dir: None }
            }
            None => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = dir.path().join("phi-async.db").display().to_string();
                migrate(&url);
                TestDb { url, _dir: Some(dir) }
            }
        }
    }

    fn sync_conn(&self) -> SyncConn {
        let mut conn = SyncConn::establish(&self.url)
            .unwrap_or_else(|e| panic!("cannot connect to the test database {}: {e}", self.url));
        if server_url().is_none() {
            diesel::RunQueryDsl::execute(diesel::sql_query("PRAGMA busy_timeout = 10000"), &mut conn).expect("busy timeout");
        }
        conn
    }

    async fn conn(&self) -> AsyncConn {
        let mut conn = AsyncConn::establish(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test database {}: {e}", self.url));
        if server_url().is_none() {
            // The keyring writes its audit records from a thread of its own.
            conn.batch_execute("PRAGMA busy_timeout = 10000").await.expect("busy timeout");
        }
        conn
    }

    fn store(&self) -> Arc<phi::DieselKeyStore<SyncConn>> {
        Arc::new(phi::DieselKeyStore::<SyncConn>::connect(&self.url).expect("key store connects"))
    }

    async fn keyring_with(&self, kek: Arc<dyn KeyEncryptionKey>) -> Keyring {
        let url = self.url.clone();
        let store = tokio::task::spawn_blocking(move || {
            Arc::new(phi::DieselKeyStore::<SyncConn>::builder(&url).run_migrations(true).connect().expect("key store connects"))
        })
        .await
        .expect("store task");
        Keyring::builder(store, kek)
            .actor("async-test")
            .build_async()
            .await
            .expect("keyring")
    }

    async fn keyring(&self) -> Keyring {
        self.keyring_with(common::local_kek()).await
    }
}

fn migrate(url: &str) {
    let mut conn = SyncConn::establish(url)
        .unwrap_or_else(|e| panic!("cannot connect to the test database {url}: {e}"));
    phi::migrations::run_pending(&mut conn).expect("phi migrations run");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Declares the table `$table` (used as `t`), its model `Case` and `setup`.
macro_rules! async_schema {
    ($table:ident) => {
        diesel::table! {
            $table (case_id) {
                case_id -> Varchar,
                user_id -> Varchar,
                patient_last -> Binary,
                patient_dob -> Binary,
                scan -> Nullable<Binary>,
                status -> Varchar,
                phi_encrypted -> Bool,
                patient_last_bidx -> Nullable<Binary>,
                last_prefix -> Nullable<Binary>,
                dob_year -> Nullable<Binary>,
                patient_match -> Nullable<Binary>,
            }
        }
        #[allow(unused_imports)]
        use self::$table as t;

        #[derive(phi::PhiRecord, Clone, PartialEq)]
        #[phi(
            table = $table,
            crate = phi,
            debug,
            compound_index(column = patient_match, fields(patient_last, patient_dob), bits = 16)
        )]
        #[allow(dead_code)] // Not every test uses every generated method.
        #[diesel(primary_key(case_id))]
        struct Case {
            #[phi(row_key)]
            case_id: String,
            #[phi(owner)]
            user_id: String,
            #[phi(
                encrypt,
                blind_index = patient_last_bidx,
                normalize = "trim,lowercase",
                index(column = last_prefix, prefix = 2, bits = 8)
            )]
            patient_last: String,
            #[phi(encrypt, index(column = dob_year, year))]
            patient_dob: NaiveDate,
            #[phi(encrypt)]
            scan: Option<Vec<u8>>,
            status: String,
            #[phi(encrypted_flag)]
            phi_encrypted: bool,
        }

        const TABLE: &str = stringify!($table);
        // The blocking lookup is covered by tests/backends.rs.
        const _: fn(&Keyring, &str, &str) -> phi::Result<Vec<Vec<u8>>> = Case::patient_last_blind_index;

        /// The table, empty.
        fn setup(db: &TestDb) {
            let mut conn = db.sync_conn();
            let index = if BLOB == "BYTEA" { "BYTEA" } else if server_url().is_some() { "VARBINARY(16)" } else { "BLOB" };
            diesel::RunQueryDsl::execute(diesel::sql_query(format!("DROP TABLE IF EXISTS {TABLE}")), &mut conn).expect("drop");
            diesel::RunQueryDsl::execute(diesel::sql_query(format!(
                "CREATE TABLE {TABLE} (case_id VARCHAR(64) NOT NULL PRIMARY KEY, user_id VARCHAR(255) NOT NULL, \
                 patient_last {BLOB} NOT NULL, patient_dob {BLOB} NOT NULL, scan {BLOB} NULL, \
                 status VARCHAR(32) NOT NULL, phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE, patient_last_bidx {index} NULL, \
                 last_prefix {index} NULL, dob_year {index} NULL, patient_match {index} NULL)"
            )), &mut conn)
            .expect("create");
        }

        fn case(owner: &str, id: &str, last: &str) -> Case {
            Case {
                case_id: id.to_owned(),
                user_id: owner.to_owned(),
                patient_last: last.to_owned(),
                patient_dob: NaiveDate::from_ymd_opt(1980, 1, 15).expect("date"),
                scan: (id.len() % 2 == 0).then(|| vec![0, 1, 255]),
                status: "open".to_owned(),
                phi_encrypted: true,
            }
        }
    };
}

mod round_trip {
    use super::*;
    async_schema!(phi_async_round_trip);

    #[test]
    fn every_round_trip_is_async_on_a_pool() {
        let db = TestDb::new();
        setup(&db);
        runtime().block_on(async {
            let keyring = db.keyring().await;
            let pool: Pool<AsyncConn> = Pool::builder(AsyncDieselConnectionManager::<AsyncConn>::new(&db.url))
                .max_size(4)
                .build()
                .expect("pool");
            let mut conn = pool.get().await.expect("pooled connection");
            if server_url().is_none() {
                conn.batch_execute("PRAGMA busy_timeout = 10000").await.expect("busy timeout");
            }
            let alice = common::unique_owner("async-rt-a");
            let bob = common::unique_owner("async-rt-b");

            // Insert, one by one (the derive's insert_async) ...
            let doe = case(&alice, &format!("{alice}-1"), "Doe");
            let roe = case(&alice, &format!("{alice}-22"), "Roe");
            let other = case(&bob, &format!("{bob}-1"), "Doe");
            for c in [&doe, &roe, &other] {
                assert_eq!(c.insert_async(&keyring, &mut *conn).await.expect("insert_async"), 1);
            }
            // ... and as a batch sealed at once.
            let batch: Vec<Case> = (0..300).map(|i| case(&bob, &format!("{bob}-b{i:03}"), &format!("Name {i}"))).collect();
            let sealed = Case::seal_all_async(&batch, &keyring).await.expect("seal_all_async");
            for row in sealed {
                diesel::insert_into(t::table).values(row).execute(&mut *conn).await.expect("insert sealed");
            }

            // What the database holds: envelopes, never the name.
            let raw: Vec<u8> = t::table
                .filter(t::case_id.eq(&doe.case_id))
                .select(t::patient_last)
                .first(&mut *conn)
                .await
                .expect("raw");
            assert_eq!(&raw[..2], &[0xF1, 0x01]);

            // Load.
            let mine = Case::load_async(
                t::table.filter(t::user_id.eq(&alice)).order(t::case_id.asc()),
                &mut *conn,
                &keyring,
            )
            .await
            .expect("load_async");
            assert!(mine == vec![doe.clone(), roe.clone()], "alice's two cases read back");
            // A batch above the inline limit is opened on the blocking pool.
            assert!(batch.len() >= phi::record::ASYNC_OPEN_INLINE_MAX_ROWS);
            let bobs = Case::load_async(
                t::table.filter(t::user_id.eq(&bob)).filter(t::case_id.like(format!("{bob}-b%"))).order(t::case_id.asc()),
                &mut *conn,
                &keyring,
            )
            .await
            .expect("load_async of a large batch");
            assert!(bobs == batch, "300 cases read back in order");

            // The duplicate check through the blind index.
            let index = Case::patient_last_blind_index_async(&keyring, &alice, " DOE")
                .await
                .expect("blind index");
            let found = Case::load_async(
                t::table.filter(t::user_id.eq(&alice)).filter(t::patient_last_bidx.eq_any(index)),
                &mut *conn,
                &keyring,
            )
            .await
            .expect("lookup");
            assert!(found == vec![doe.clone()], "only alice's Doe, not bob's");

            // Guarded update: applied, then unchanged.
            let mut edited = doe.clone();
            edited.patient_last = "Doe-Smith".into();
            edited.scan = None;
            assert!(edited.changes_async(&doe, &keyring).await.expect("changes").patient_dob.is_none());
            assert_eq!(edited.update_async(&doe, &keyring, &mut *conn).await.expect("update"), Updated::Applied { sealed: true });
            assert_eq!(edited.update_async(&edited, &keyring, &mut *conn).await.expect("update"), Updated::Unchanged);
            let reloaded = Case::load_async(t::table.find(&doe.case_id), &mut *conn, &keyring).await.expect("reload");
            assert!(reloaded == vec![edited.clone()]);

            // open_each_async: one damaged row does not hide the others.
            let mut altered = raw.clone();
            let at = altered.len() - 20;
            altered[at] ^= 1;
            diesel::update(t::table.find(&roe.case_id)).set(t::patient_last.eq(altered)).execute(&mut *conn).await.expect("tamper");
            let rows: Vec<CaseSealed> = t::table
                .filter(t::user_id.eq(&alice))
                .order(t::case_id.asc())
                .select(CaseSealed::as_select())
                .load(&mut *conn)
                .await
                .expect("sealed rows");
            let each = Case::open_each_async(rows, &keyring).await.expect("open_each_async");
            assert!(each[0].as_ref().is_ok_and(|c| *c == edited));
            let err = each[1].as_ref().expect_err("the altered row fails").to_string();
            assert!(err.contains(&alice) && err.contains(&format!("{TABLE}.patient_last")) && !err.contains("Roe"), "{err}");
            let err = Case::load_async(t::table.filter(t::user_id.eq(&alice)), &mut *conn, &keyring).await.expect_err("load fails");
            assert!(matches!(err, phi::Error::Decrypt { .. }), "{err:?}");

            // Delete is plain diesel-async; an update of the deleted row finds nothing.
            diesel::delete(t::table.find(&doe.case_id)).execute(&mut *conn).await.expect("delete");
            let mut again = edited.clone();
            again.status = "closed".into();
            assert_eq!(again.update_async(&edited, &keyring, &mut *conn).await.expect("update"), Updated::NotFound);
            keyring.flush_audit_async().await.expect("audit written");
        });
    }
}

mod single_rows {
    use super::*;
    async_schema!(phi_async_single_rows);

    #[test]
    fn single_row_loads_and_the_duplicate_filter_are_async() {
        let db = TestDb::new();
        setup(&db);
        runtime().block_on(async {
            let keyring = db.keyring().await;
            let mut conn = db.conn().await;
            let alice = common::unique_owner("async-one-a");
            let bob = common::unique_owner("async-one-b");
            for c in [
                case(&alice, &format!("{alice}-1"), " DOE"),
                case(&alice, &format!("{alice}-2"), "Roe"),
                case(&bob, &format!("{bob}-1"), "Doe"),
            ] {
                assert_eq!(c.insert_async(&keyring, &mut conn).await.expect("insert_async"), 1);
            }

            let doe = Case::patient_last_is_async(&keyring, alice.as_str(), "doe").await.expect("filter");
            let found = Case::load_first_async(t::table.filter(doe), &mut conn, &keyring).await.expect("first");
            assert_eq!(found.case_id, format!("{alice}-1"), "alice's Doe, not bob's");
            assert_eq!(found.patient_last, " DOE");

            let last = Case::load_optional_async(
                t::table.filter(t::user_id.eq(&alice)).order(t::case_id.desc()),
                &mut conn,
                &keyring,
            )
            .await
            .expect("optional");
            assert_eq!(last.map(|c| c.case_id), Some(format!("{alice}-2")));

            // A prefix within one owner, tested once opened: alice's two
            // cases, only the one whose last name starts with "do".
            let prefixed = Case::load_where_async(
                t::table.filter(t::user_id.eq(&alice)).order(t::case_id),
                &mut conn,
                &keyring,
                |c| c.patient_last.trim().to_lowercase().starts_with("do"),
            )
            .await
            .expect("load_where_async");
            assert_eq!(prefixed.iter().map(|c| c.case_id.clone()).collect::<Vec<_>>(), [format!("{alice}-1")]);
            // The same through the derived index: its tags, then the exact
            // finder, then the date-range finder by year buckets.
            let tags = Case::last_prefix_tags_async(&keyring, alice.as_str(), "Do").await.expect("tags");
            assert_eq!(tags.len(), 1, "one version, one tag of 8 bits: {tags:?}");
            assert_eq!(tags[0].len(), 1);
            let found = Case::find_by_last_prefix_async(alice.as_str(), "do", &keyring, &mut conn).await.expect("prefix");
            assert_eq!(found.iter().map(|c| c.case_id.clone()).collect::<Vec<_>>(), [format!("{alice}-1")]);
            let short = Case::find_by_last_prefix_async(alice.as_str(), "d", &keyring, &mut conn).await.expect_err("short");
            assert!(matches!(short, phi::Error::InvalidInput { .. }), "{short}");
            let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).expect("date");
            let born = Case::find_dob_year_between_async(alice.as_str(), &day(1979, 6, 1), &day(1980, 1, 15), &keyring, &mut conn)
                .await
                .expect("range");
            assert_eq!(born.len(), 2, "both of alice's cases, born 1980-01-15");
            let none = Case::find_dob_year_between_async(alice.as_str(), &day(1980, 1, 16), &day(1981, 1, 1), &keyring, &mut conn)
                .await
                .expect("range");
            assert!(none.is_empty(), "the 1980 bucket holds them, the range test drops them");
            let in_year = Case::find_by_dob_year_async(alice.as_str(), 1980, &keyring, &mut conn).await.expect("year");
            assert_eq!(in_year.len(), 2);
            // The duplicate check through the compound index: surname and
            // date of birth together.
            let born = day(1980, 1, 15);
            let twins = Case::find_by_patient_match_async(alice.as_str(), "doe", &born, &keyring, &mut conn).await.expect("twins");
            assert_eq!(twins.iter().map(|c| c.case_id.clone()).collect::<Vec<_>>(), [format!("{alice}-1")]);
            let other_day = Case::find_by_patient_match_async(alice.as_str(), "doe", &day(1980, 1, 16), &keyring, &mut conn)
                .await
                .expect("none");
            assert!(other_day.is_empty());
            assert_eq!(Case::patient_match_tags_async(&keyring, alice.as_str(), "Doe", &born).await.expect("tags")[0].len(), 2);

            let poe = Case::patient_last_is_async(&keyring, &alice, "Poe").await.expect("filter");
            assert!(Case::load_optional_async(t::table.filter(poe), &mut conn, &keyring).await.expect("optional").is_none());
            let poe = Case::patient_last_is_async(&keyring, &alice, "Poe").await.expect("filter");
            let err = Case::load_first_async(t::table.filter(poe), &mut conn, &keyring).await.expect_err("no row");
            assert!(matches!(err, phi::Error::NotFound { table: TABLE }), "{err:?}");
            keyring.flush_audit_async().await.expect("audit written");
        });
    }
}

mod guarded {
    use super::*;
    async_schema!(phi_async_guarded);

    #[test]
    fn a_guarded_update_async_conflicts_with_a_flag_changed_since_the_read() {
        let db = TestDb::new();
        setup(&db);
        runtime().block_on(async {
            let keyring = db.keyring().await;
            let owner = common::unique_owner("async-guard");
            let mut app = db.conn().await;
            let mut other = db.conn().await;
            let stored = case(&owner, &format!("{owner}-1"), "Doe");
            stored.insert_async(&keyring, &mut app).await.expect("insert");

            // 1. The application reads the row (sealed).
            let old = Case::load_async(t::table.find(&stored.case_id), &mut app, &keyring).await.expect("read").remove(0);
            // 2. Another connection commits: a decrypt-back turns the flag off.
            let flipped = diesel::update(t::table.find(&stored.case_id))
                .set((t::phi_encrypted.eq(false), t::status.eq("by-other")))
                .execute(&mut other)
                .await
                .expect("other writer");
            assert_eq!(flipped, 1);
            // 3. The application writes its edit: refused, nothing written.
            let mut edited = old.clone();
            edited.status = "by-app".into();
            edited.patient_last = "Roe".into();
            assert_eq!(edited.update_async(&old, &keyring, &mut app).await.expect("update"), Updated::Conflict);
            let (status, flag, last): (String, bool, Vec<u8>) = t::table
                .find(&stored.case_id)
                .select((t::status, t::phi_encrypted, t::patient_last))
                .first(&mut other)
                .await
                .expect("row");
            assert_eq!((status.as_str(), flag), ("by-other", false), "the other writer's state is kept");
            assert_eq!(&last[..2], &[0xF1, 0x01], "no value of the other kind was written");

            // Read again (the row as it now is) and the edit applies.
            diesel::update(t::table.find(&stored.case_id)).set(t::phi_encrypted.eq(true)).execute(&mut other).await.expect("restore");
            let fresh = Case::load_async(t::table.find(&stored.case_id), &mut app, &keyring).await.expect("reread").remove(0);
            let mut edited = fresh.clone();
            edited.status = "by-app".into();
            assert_eq!(edited.update_async(&fresh, &keyring, &mut app).await.expect("update"), Updated::Applied { sealed: true });
        });
    }
}

/// A KEK whose async unwraps wait at a gate the test opens, and are counted.
#[derive(Debug)]
struct GatedKek {
    inner: Arc<dyn KeyEncryptionKey>,
    gate: tokio::sync::Semaphore,
    calls: AtomicUsize,
    keys: AtomicUsize,
}

impl KeyEncryptionKey for GatedKek {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn wrap(&self, owner: &str, version: u32, key: &KeyBytes) -> Result<Vec<u8>, BoxError> {
        self.inner.wrap(owner, version, key)
    }
    fn unwrap(&self, owner: &str, version: u32, wrapped: &[u8]) -> Result<KeyBytes, BoxError> {
        panic!("the async resolution used the blocking unwrap for {owner} v{version} ({} bytes)", wrapped.len())
    }
    fn check_value(&self) -> Result<phi::KekCheck, BoxError> {
        self.inner.check_value()
    }
    fn verify_check_value(&self, check: &phi::KekCheck) -> Result<bool, BoxError> {
        self.inner.verify_check_value(check)
    }
    fn unwrap_many_async<'a>(
        &'a self,
        keys: Vec<(String, u32, Vec<u8>)>,
    ) -> phi::KekFuture<'a, Vec<Result<KeyBytes, BoxError>>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.keys.fetch_add(keys.len(), Ordering::SeqCst);
            let _permit = self.gate.acquire().await.expect("gate");
            keys.iter().map(|(o, v, w)| self.inner.unwrap(o, *v, w)).collect()
        })
    }
}

#[test]
fn tasks_missing_one_cold_owner_cause_exactly_one_unwrap() {
    const TASKS: u64 = 256;
    let db = TestDb::new();
    let owner = common::unique_owner("async-flight");
    // The owner's key exists (made by another keyring): the cache is cold.
    let maker = Keyring::builder(db.store(), common::local_kek()).build().expect("keyring");
    maker.keys_for_seal(&owner).expect("key created");
    drop(maker);

    // One thread for every task: a waiter that blocked it would hang the test.
    current_thread().block_on(async {
        let kek = Arc::new(GatedKek {
            inner: common::local_kek(),
            gate: tokio::sync::Semaphore::new(0),
            calls: AtomicUsize::new(0),
            keys: AtomicUsize::new(0),
        });
        let keyring = db.keyring_with(kek.clone()).await;
        let before = keyring.stats();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (keyring, owner) = (keyring.clone(), owner.clone());
                tokio::spawn(async move { keyring.keys_for_open_async(&owner).await })
            })
            .collect();
        // Fixed interleaving: the gate opens only once every task has missed
        // the owner (one leads, the others wait for it).
        while keyring.stats().misses - before.misses < TASKS {
            tokio::task::yield_now().await;
        }
        kek.gate.add_permits(1_000);
        let mut resolved = Vec::new();
        for task in tasks {
            resolved.push(task.await.expect("task").expect("keys"));
        }
        assert!(resolved.iter().all(|k| Arc::ptr_eq(k, &resolved[0]) && k.owner() == owner));
        let stats = keyring.stats();
        assert_eq!(AtomicUsize::load(&kek.calls, Ordering::SeqCst), 1, "one unwrap_many_async call");
        assert_eq!(AtomicUsize::load(&kek.keys, Ordering::SeqCst), 1, "one data key unwrapped");
        assert_eq!(stats.unwraps - before.unwraps, 1);
        assert_eq!(stats.key_loads - before.key_loads, 1, "one key-store query");
        // Sealing on the same runtime creates a key for a new owner, async.
        let fresh = common::unique_owner("async-flight-new");
        kek.gate.add_permits(1);
        let keys = keyring.keys_for_seal_async(&fresh).await.expect("created");
        assert_eq!(keys.current_version(), Some(1));
        assert_eq!(keyring.stats().creations - before.creations, 1);
    });
}

#[cfg(feature = "aws-kms")]
mod kms {
    use super::*;
    use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
    async_schema!(phi_async_kms);

    #[test]
    fn a_cold_load_of_100_owners_through_aws_kms_in_a_current_thread_runtime_makes_100_decrypts() {
        let url = std::env::var("PHI_TEST_KMS_URL").unwrap_or_else(|_| "http://127.0.0.1:4566".into());
        if std::net::TcpStream::connect(url.trim_start_matches("http://").trim_end_matches('/')).is_err() {
            panic!("no KMS-compatible server at {url} (PHI_TEST_KMS_URL): start moto as .ci/run does");
        }
        let db = TestDb::new();
        setup(&db);
        let prefix = common::unique_owner("async-kms");
        let owners: Vec<String> = (0..100).map(|i| format!("{prefix}-{i:03}")).collect();
        current_thread().block_on(async {
            let client = aws_sdk_kms::Client::from_conf(
                aws_sdk_kms::Config::builder()
                    .behavior_version(BehaviorVersion::latest())
                    .region(Region::new("us-east-1"))
                    .endpoint_url(&url)
                    .credentials_provider(Credentials::new("test", "test", None, None, "test"))
                    .build(),
            );
            let key_id = client
                .create_key()
                .description("phi async test")
                .send()
                .await
                .expect("CreateKey")
                .key_metadata()
                .expect("metadata")
                .key_id()
                .to_owned();
            let work = async {
                // Writing: 100 owners, two cases each, keys generated through KMS.
                let writer_kek = Arc::new(phi::AwsKmsKek::from_client(key_id.clone(), client.clone()));
                let writer = db.keyring_with(writer_kek.clone()).await;
                let mut conn = db.conn().await;
                for owner in &owners {
                    for n in 0..2 {
                        case(owner, &format!("{owner}-{n}"), "Doe").insert_async(&writer, &mut conn).await.expect("insert");
                    }
                }
                assert_eq!(writer_kek.stats().generate_data_key, 100);
                drop(writer);

                // A cold keyring (a fresh process) loads all 200 cases.
                let kek = Arc::new(phi::AwsKmsKek::from_sdk_config(
                    key_id.clone(),
                    &aws_config::SdkConfig::builder()
                        .behavior_version(BehaviorVersion::latest())
                        .region(Region::new("us-east-1"))
                        .endpoint_url(&url)
                        .credentials_provider(aws_sdk_kms::config::SharedCredentialsProvider::new(Credentials::new(
                            "test", "test", None, None, "test",
                        )))
                        .build(),
                ));
                let keyring = db.keyring_with(kek.clone()).await;
                // Building checked the KEK (one Decrypt of the check value).
                let before = kek.stats().decrypt;
                let cases = Case::load_async(t::table.filter(t::user_id.eq_any(&owners)), &mut conn, &keyring)
                    .await
                    .expect("cold load");
                assert_eq!(cases.len(), 200);
                assert_eq!(kek.stats().decrypt - before, 100, "one Decrypt per owner");
                let again = Case::load_async(t::table.filter(t::user_id.eq_any(&owners)), &mut conn, &keyring)
                    .await
                    .expect("warm load");
                assert_eq!(again.len(), 200);
                assert_eq!(kek.stats().decrypt - before, 100, "the warm load makes no call");
            };
            tokio::time::timeout(std::time::Duration::from_secs(120), work)
                .await
                .expect("no deadlock: the cold load completes on a current-thread runtime");
        });
    }
}

mod lookup_finder {
    use super::*;

    diesel::table! {
        phi_async_lookup (user_id) {
            user_id -> Varchar,
            tenant_id -> Varchar,
            email -> Binary,
            email_lookup -> Nullable<Binary>,
        }
    }

    #[derive(phi::PhiRecord, Clone, PartialEq)]
    #[phi(table = phi_async_lookup, crate = phi, debug)]
    #[allow(dead_code)] // Not every generated method is used.
    #[diesel(primary_key(user_id))]
    struct User {
        #[phi(row_key)]
        user_id: String,
        #[phi(owner)]
        tenant_id: String,
        #[phi(encrypt, lookup_index = email_lookup, normalize = "trim,lowercase")]
        email: String,
    }

    #[test]
    fn the_async_finder_finds_by_value_leaves_out_shredded_owners_and_names_a_tampered_row() {
        let db = TestDb::new();
        {
            let mut conn = db.sync_conn();
            let lookup = if BLOB == "BYTEA" { "BYTEA" } else if server_url().is_some() { "VARBINARY(20)" } else { "BLOB" };
            diesel::RunQueryDsl::execute(diesel::sql_query("DROP TABLE IF EXISTS phi_async_lookup"), &mut conn).expect("drop");
            diesel::RunQueryDsl::execute(diesel::sql_query(format!(
                "CREATE TABLE phi_async_lookup (user_id VARCHAR(64) NOT NULL PRIMARY KEY, \
                 tenant_id VARCHAR(255) NOT NULL, email {BLOB} NOT NULL, email_lookup {lookup} NULL)"
            )), &mut conn)
            .expect("create");
        }
        runtime().block_on(async {
            let keyring = db.keyring().await;
            let run = common::unique_owner("async-lk");
            let (kept, gone) = (format!("{run}-kept"), format!("{run}-gone"));
            let user = |tenant: &str, id: &str, email: &str| User {
                user_id: format!("{run}-{id}"),
                tenant_id: tenant.to_owned(),
                email: email.to_owned(),
            };
            let mut conn = db.conn().await;
            for u in [user(&kept, "a", "Ann@Example.org"), user(&gone, "g", "gus@example.org"), user(&kept, "t", "tom@example.org")] {
                u.insert_async(&keyring, &mut conn).await.expect("insert");
            }
            let shredding = keyring.clone();
            let owner = gone.clone();
            tokio::task::spawn_blocking(move || phi::lifecycle::shred_keys_by(&shredding, &owner, "operator"))
                .await
                .expect("task")
                .expect("shred");

            // A cold keyring, as at a login: no owner is known.
            let cold = db.keyring().await;
            let found = User::find_by_email_async(" ann@EXAMPLE.org", &cold, &mut conn).await.expect("find");
            assert_eq!(found.len(), 1);
            assert_eq!((found[0].tenant_id.as_str(), found[0].email.as_str()), (kept.as_str(), "Ann@Example.org"));
            assert!(User::find_by_email_async("nobody@example.org", &cold, &mut conn).await.expect("find").is_empty());
            // The shredded owner's row matches and is left out.
            assert!(User::find_by_email_async("gus@example.org", &cold, &mut conn).await.expect("find").is_empty());

            // Row t holds row a's sealed address (same owner, another row).
            let sealed: Vec<u8> = phi_async_lookup::table
                .find(format!("{run}-a"))
                .select(phi_async_lookup::email)
                .first(&mut conn)
                .await
                .expect("row a");
            diesel::update(phi_async_lookup::table.find(format!("{run}-t")))
                .set(phi_async_lookup::email.eq(sealed))
                .execute(&mut conn)
                .await
                .expect("tamper");
            let err = User::find_by_email_async("tom@example.org", &cold, &mut conn)
                .await
                .expect_err("a tampered value is an error");
            let text = err.to_string();
            assert!(text.contains("phi_async_lookup.email") && text.contains(&kept), "{text}");
            let source = std::error::Error::source(&err).expect("source").to_string();
            assert!(source.contains(&format!("{run}-t")) && source.contains("authentication failed"), "{source}");
        });
    }
}

/// A key store whose `insert_key_if_absent` tells the test it was entered
/// and then waits until the test releases it: a fixed point at which to
/// drop the future that asked for a new key.
#[derive(Debug)]
struct ParkedInsert {
    inner: Arc<dyn phi::KeyStore>,
    entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: std::sync::Barrier,
}

impl phi::KeyStore for ParkedInsert {
    fn load_keys(&self, owners: &[&str]) -> phi::Result<Vec<phi::StoredKey>> {
        self.inner.load_keys(owners)
    }
    fn insert_key_if_absent(&self, key: &phi::StoredKey) -> phi::Result<bool> {
        let entered = self.entered.lock().expect("lock").take();
        if let Some(entered) = entered {
            entered.send(()).expect("the test waits");
            self.release.wait();
        }
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
    fn keys_page(
        &self,
        wrapped_by: Option<&str>,
        not_wrapped_by: Option<&str>,
        after: Option<(&str, u32)>,
        limit: usize,
    ) -> phi::Result<Vec<phi::StoredKey>> {
        self.inner.keys_page(wrapped_by, not_wrapped_by, after, limit)
    }
}

#[test]
fn a_key_created_by_a_dropped_future_still_gets_its_generate_record() {
    use phi::KeyStore as _;
    let db = TestDb::new();
    let owner = common::unique_owner("async-dropped");
    let (entered, inserting) = std::sync::mpsc::channel();
    let store = Arc::new(ParkedInsert {
        inner: db.store(),
        entered: std::sync::Mutex::new(Some(entered)),
        release: std::sync::Barrier::new(2),
    });
    let keyring = Keyring::builder(store.clone(), common::local_kek()).actor("async-dropped").build().expect("keyring");
    // Kept until the end: dropping a runtime waits for its blocking tasks.
    let runtime = runtime();
    runtime.block_on(async {
        let task = {
            let (keyring, owner) = (keyring.clone(), owner.clone());
            tokio::spawn(async move { keyring.keys_for_seal_async(&owner).await.map(drop) })
        };
        // Fixed point: the key's insert has started (on the blocking pool).
        tokio::task::spawn_blocking(move || inserting.recv().expect("the insert is entered")).await.expect("wait");
        // The request is cancelled there.
        task.abort();
        assert!(task.await.expect_err("aborted").is_cancelled());
    });
    // The insert goes on and the key is stored ...
    store.release.wait();
    let stored = db.store();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let generated = loop {
        let records: Vec<phi::AuditRecord> = stored
            .audit(Some(&owner), 10)
            .expect("audit")
            .into_iter()
            .filter(|r| r.event.action == phi::AuditAction::Generate)
            .collect();
        if !records.is_empty() || std::time::Instant::now() > until {
            break records;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // ... and never without its record.
    assert_eq!(stored.load_keys(&[owner.as_str()]).expect("keys").len(), 1, "the key was stored");
    assert_eq!(generated.len(), 1, "the stored key's generate record was written: {generated:?}");
    assert_eq!(generated[0].event.actor, "async-dropped");
}

/// The access log on the async paths: inserts, loads (inline and on the
/// blocking pool), `open_each_async`, guarded updates, blind-index lookups,
/// strict mode.
mod access {
    use super::*;
    use phi::access::{AccessOp, Accessor, MemoryAccessLog};
    async_schema!(phi_async_access);

    #[test]
    fn async_paths_record_their_accesses_under_the_accessor() {
        let db = TestDb::new();
        setup(&db);
        runtime().block_on(async {
            let log = Arc::new(MemoryAccessLog::new());
            let url = db.url.clone();
            let store = tokio::task::spawn_blocking(move || {
                Arc::new(phi::DieselKeyStore::<SyncConn>::builder(&url).run_migrations(true).connect().expect("key store connects"))
            })
            .await
            .expect("store task");
            let strict = Keyring::builder(store, common::local_kek())
                .actor("async-test")
                .access_log(log.clone())
                .require_accessor(true)
                .build_async()
                .await
                .expect("keyring");
            let smith = Accessor::new("dr-smith", "treatment").with_request_id("req-7");
            let keyring = strict.on_behalf_of(&smith);
            let mut conn = db.conn().await;
            let owner = common::unique_owner("async-acc");
            let doe = case(&owner, &format!("{owner}-1"), "Doe");
            let roe = case(&owner, &format!("{owner}-22"), "Roe");
            let batch: Vec<Case> = (0..20).map(|i| case(&owner, &format!("{owner}-b{i:02}"), "Name")).collect();
            let ops = |log: &MemoryAccessLog| -> Vec<(AccessOp, Option<String>, Vec<String>)> {
                let records = log.take();
                assert!(records.iter().all(|r| r.accessor == smith && r.owner_id == owner && r.table == TABLE), "{records:?}");
                records.into_iter().map(|r| (r.op, r.row, r.fields)).collect()
            };
            let all = || vec!["patient_last".to_owned(), "patient_dob".to_owned(), "scan".to_owned()];

            for c in [&doe, &roe] {
                assert_eq!(c.insert_async(&keyring, &mut conn).await.expect("insert_async"), 1);
            }
            for row in Case::seal_all_async(&batch, &keyring).await.expect("seal_all_async") {
                diesel::insert_into(t::table).values(row).execute(&mut conn).await.expect("insert");
            }
            let mut inserted = vec![(AccessOp::Insert, Some(doe.case_id.clone()), all()), (AccessOp::Insert, Some(roe.case_id.clone()), all())];
            inserted.extend(batch.iter().map(|c| (AccessOp::Insert, Some(c.case_id.clone()), all())));
            assert_eq!(ops(&log), inserted);

            // Loads: two rows inline, twenty on the blocking pool; one append each.
            let appends = log.appends();
            let mine = Case::load_async(t::table.filter(t::case_id.eq_any([&doe.case_id, &roe.case_id])).order(t::case_id.asc()), &mut conn, &keyring)
                .await
                .expect("load_async");
            assert!(mine == vec![doe.clone(), roe.clone()]);
            assert_eq!(ops(&log), vec![(AccessOp::Read, Some(doe.case_id.clone()), all()), (AccessOp::Read, Some(roe.case_id.clone()), all())]);
            let many = Case::load_async(t::table.filter(t::case_id.like(format!("{owner}-b%"))).order(t::case_id.asc()), &mut conn, &keyring)
                .await
                .expect("load_async on the pool");
            assert!(many == batch);
            assert_eq!(ops(&log), batch.iter().map(|c| (AccessOp::Read, Some(c.case_id.clone()), all())).collect::<Vec<_>>());
            assert_eq!(log.appends(), appends + 2);

            // open_each_async, a guarded update, a blind-index lookup.
            let rows: Vec<CaseSealed> = t::table.find(&doe.case_id).select(CaseSealed::as_select()).load(&mut conn).await.expect("rows");
            assert!(Case::open_each_async(rows, &keyring).await.expect("open_each_async")[0].is_ok());
            assert_eq!(ops(&log), vec![(AccessOp::Read, Some(doe.case_id.clone()), all())]);
            let mut edited = doe.clone();
            edited.patient_last = "Doe-Smith".into();
            assert_eq!(edited.update_async(&doe, &keyring, &mut conn).await.expect("update"), Updated::Applied { sealed: true });
            assert_eq!(ops(&log), vec![(AccessOp::Update, Some(doe.case_id.clone()), vec!["patient_last".to_owned()])]);
            Case::patient_last_blind_index_async(&keyring, &owner, "Roe").await.expect("blind index");
            assert_eq!(ops(&log), vec![(AccessOp::Lookup, None, vec!["patient_last".to_owned()])]);

            // Strict: refused without an accessor, nothing recorded.
            let err = Case::load_async(t::table.filter(t::user_id.eq(&owner)), &mut conn, &strict).await.expect_err("refused");
            assert!(matches!(err, phi::Error::AccessorRequired { operation: "read", .. }), "{err:?}");
            let err = roe.insert_async(&strict, &mut conn).await.expect_err("refused");
            assert!(matches!(err, phi::Error::AccessorRequired { operation: "insert", .. }), "{err:?}");
            assert!(log.take().is_empty());
        });
    }
}

/// `load_async` with the Fernet decoder on the keyring: recorded values
/// read as the plaintext Python encrypted before the backfill, and the
/// same once it has sealed them; a token pasted after the recording
/// reads as its text; a recorded token that does not open fails the load
/// naming the table, column, row and owner.
#[cfg(feature = "legacy-fernet")]
#[allow(dead_code)] // `case`: these rows are written as the old application wrote them.
mod legacy_reads {
    use super::*;
    async_schema!(phi_async_legacy_reads);

    fn fixture(name: &str) -> (Vec<u8>, Option<String>) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/legacy.json");
        let all: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixtures")).expect("fixture JSON");
        let item = all["fernet"].as_array().expect("a list").iter().find(|i| i["name"] == name).expect("a fixture").clone();
        (item["stored"].as_str().expect("stored").as_bytes().to_vec(), item["plain"].as_str().map(str::to_owned))
    }

    fn decoder() -> Arc<dyn phi::legacy::LegacyDecoder> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/legacy.json");
        let all: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("fixtures")).expect("fixture JSON");
        let keys = &all["fernet_keys"];
        Arc::new(
            phi::legacy::FernetDecoder::new(keys["primary"].as_str().expect("key"))
                .and_then(|d| d.fallback(keys["fallback"].as_str().expect("key")))
                .expect("Fernet keys"),
        )
    }

    /// Every row but L-4 through `load_async`, after checking that L-4's
    /// recorded token, which does not open, fails the load.
    async fn read(db: &TestDb, keyring: &Keyring, owner: &str, tampered: &[u8], dob: NaiveDate) -> Vec<(String, String)> {
        let mut conn = db.conn().await;
        let err = Case::load_async(t::table.order(t::case_id.asc()), &mut conn, keyring).await.expect_err("L-4");
        assert!(matches!(&err, phi::Error::Legacy { table, column, row, owner: o, .. }
            if table == TABLE && column == "patient_last" && row == "L-4" && o == owner), "{err:?}");
        assert!(!err.to_string().contains(std::str::from_utf8(tampered).expect("text")), "{err}");
        let loaded = Case::load_async(t::table.filter(t::case_id.ne("L-4")).order(t::case_id.asc()), &mut conn, keyring)
            .await
            .expect("load_async");
        assert!(loaded.iter().all(|c| c.patient_dob == dob && c.scan.is_none()));
        loaded.into_iter().map(|c| (c.case_id, c.patient_last)).collect()
    }

    #[test]
    fn recorded_fernet_values_read_the_same_before_and_after_their_backfill() {
        let db = TestDb::new();
        setup(&db);
        let (a, b) = (common::unique_owner("async-lg-a"), common::unique_owner("async-lg-b"));
        let (doe_token, doe) = fixture("primary");
        let (date_token, date) = fixture("primary_date");
        let (garcia_token, garcia) = fixture("fallback");
        let (tampered, _) = fixture("tampered");
        let dob = NaiveDate::parse_from_str(&date.expect("plain"), "%Y-%m-%d").expect("date");
        let insert = |conn: &mut SyncConn, id: &str, owner: &str, last: &[u8], dob: &[u8]| {
            diesel::RunQueryDsl::execute(
                diesel::insert_into(t::table).values((
                    t::case_id.eq(id),
                    t::user_id.eq(owner),
                    t::patient_last.eq(last.to_vec()),
                    t::patient_dob.eq(dob.to_vec()),
                    t::status.eq("open"),
                    t::phi_encrypted.eq(false),
                )),
                conn,
            )
            .expect("legacy row");
        };
        let mut sync = db.sync_conn();
        // Records of an earlier run's table of that name.
        use phi::schema::phi_legacy_values as lv;
        diesel::RunQueryDsl::execute(diesel::delete(lv::table.filter(lv::table_name.eq(TABLE))), &mut sync).expect("old records");
        insert(&mut sync, "L-1", &a, &doe_token, &date_token);
        insert(&mut sync, "L-2", &b, &garcia_token, &date_token);
        insert(&mut sync, "L-4", &a, &tampered, &date_token);
        let decoder = decoder();
        let recorded = phi::migrate::record_legacy::<Case, _>(&mut sync, &*decoder).expect("record");
        assert_eq!(recorded.recorded, 6, "{recorded}");
        // After the recording: B's row with a copy of A's token.
        insert(&mut sync, "L-3", &b, &doe_token, b"1980-01-15");

        let expected = vec![
            ("L-1".to_owned(), doe.clone().expect("plain")),
            ("L-2".to_owned(), garcia.expect("plain")),
            ("L-3".to_owned(), String::from_utf8(doe_token.clone()).expect("text")),
        ];
        let (before, keyring) = runtime().block_on(async {
            let url = db.url.clone();
            let store = tokio::task::spawn_blocking(move || {
                Arc::new(phi::DieselKeyStore::<SyncConn>::builder(&url).run_migrations(true).connect().expect("key store connects"))
            })
            .await
            .expect("store task");
            let keyring =
                Keyring::builder(store, common::local_kek()).legacy(decoder.clone()).build_async().await.expect("keyring");
            (read(&db, &keyring, &a, &tampered, dob).await, keyring)
        });
        assert_eq!(before, expected);

        // The backfill (the keyring's decoder) stops at L-4 with L-1 to L-3
        // sealed; the application replaces L-4's value; it completes.
        let options = phi::migrate::MigrateOptions::default().batch(3);
        let err = phi::migrate::backfill::<Case, _>(&mut sync, &keyring, &options).expect_err("L-4");
        assert!(matches!(&err, phi::Error::Legacy { row, .. } if row == "L-4"), "{err:?}");
        let flags: Vec<bool> =
            diesel::RunQueryDsl::load(t::table.order(t::case_id.asc()).select(t::phi_encrypted), &mut sync).expect("flags");
        assert_eq!(flags, [true, true, true, false]);
        let after = runtime().block_on(read(&db, &keyring, &a, &tampered, dob));
        assert_eq!(after, expected, "the same plaintext, read sealed");
    }
}
