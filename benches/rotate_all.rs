//! Whole-run timing of the emergency rotation (`lifecycle::rotate_all`:
//! new data key versions, every value re-sealed, a sample verified, the old
//! versions retired) against the plain insert of the same rows, and of two
//! workers against one, on every backend enabled by cargo features.
//!
//! ```sh
//! cargo bench -p phi-benches --bench rotate_all --features postgres      # PostgreSQL (and SQLite)
//! cargo bench -p phi-benches --bench rotate_all --all-features           # SQLite, MariaDB, PostgreSQL
//! PHI_ROTATE_ROWS=20000 PHI_ROTATE_OWNERS=200 cargo bench -p phi-benches --bench rotate_all --all-features
//! PHI_ROTATE_BATCH=2000 PHI_ROTATE_CLAIM=50 cargo bench -p phi-benches --bench rotate_all --all-features
//! PHI_ROTATE_BACKENDS=postgresql,sqlite cargo bench -p phi-benches --bench rotate_all --all-features
//! ```
//!
//! Not a criterion benchmark: each measure times a whole run, once. Per
//! backend it recreates its table `phi_bench_rotate` (a `BIGINT` case id,
//! a text owner, 4 binary PHI columns) and times, in one run:
//!
//! - plain insert: N rows (default 100,000, over `PHI_ROTATE_OWNERS`
//!   owners, default 1,000) of 4 plaintext values of 3–22 bytes, 1,000
//!   rows per multi-row `INSERT`, one transaction each;
//! - then (untimed) the same rows sealed under each owner's version 1;
//! - one worker: `rotate_all` of every owner (job 1: version 2);
//! - two workers: `rotate_all` of every owner by two threads, each with
//!   its own connection and keyring, sharing job 2 (version 3).
//!
//! The database URLs come from `PHI_TEST_POSTGRES_URL` and
//! `PHI_TEST_MYSQL_URL` (as the tests'); SQLite uses a temporary file.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use phi::lifecycle::{self, ResealTable, RotateAllOptions, RotateOwners};
use phi::{KeyBytes, Keyring, LocalKek};

type BoxResult<T> = Result<T, Box<dyn Error>>;

const INSERT_ROWS: usize = 1_000;

#[path = "common/env.rs"]
mod env;
use env::env_usize;

/// The job's options: the defaults, or `PHI_ROTATE_BATCH` rows per
/// re-seal transaction and `PHI_ROTATE_CLAIM` owners per claim.
fn options(job: String) -> RotateAllOptions<'static> {
    let defaults = RotateAllOptions::new(job);
    let batch = env_usize("PHI_ROTATE_BATCH", defaults.batch_size);
    let claim = env_usize("PHI_ROTATE_CLAIM", defaults.owners_per_claim);
    defaults.batch_size(batch).owners_per_claim(claim)
}

fn bench_kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::new("bench-rotate", &KeyBytes::new([0x45; 32])))
}

fn owner(run: i64, i: usize) -> String {
    format!("rot-{run}-{i:05}")
}

/// The 4 plaintext values of row `i`.
fn values(i: usize) -> [String; 4] {
    const FIRST: [&str; 6] = ["Ana", "Bo", "Chiamaka", "Dmitri", "Eun-ji", "Farida"];
    const LAST: [&str; 6] = [
        "Okafor",
        "Haddad",
        "Lindqvist",
        "Nakamura",
        "Oyelaran",
        "Smith",
    ];
    const INSURER: [&str; 4] = [
        "Aetna",
        "Blue Cross Blue Shield",
        "Cigna",
        "Kaiser Permanente",
    ];
    [
        FIRST[i % FIRST.len()].to_owned(),
        format!("{}{}", LAST[i % LAST.len()], i % 97),
        format!("19{:02}-{:02}-{:02}", 40 + i % 60, 1 + i % 12, 1 + i % 28),
        INSURER[i % INSURER.len()].to_owned(),
    ]
}

const COLUMNS: [&str; 4] = [
    "patient_first",
    "patient_last",
    "patient_dob",
    "ins_provider",
];

fn table() -> ResealTable {
    let mut t = ResealTable::new("phi_bench_rotate", "user_id")
        .key_column_typed("case_id", lifecycle::ColumnType::I64);
    for c in COLUMNS {
        t = t.column(c);
    }
    t
}

/// Inserts rows `(case_id, owner, 4 values)` 1,000 per statement, one
/// transaction each, as `INSERT … VALUES (…), (…)` with hex literals.
fn insert_rows<C>(conn: &mut C, rows: &[(i64, String, [Vec<u8>; 4])]) -> BoxResult<()>
where
    C: diesel::Connection,
{
    for chunk in rows.chunks(INSERT_ROWS) {
        let placeholders: Vec<String> = chunk
            .iter()
            .map(|(id, owner, v)| {
                let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                format!(
                    "({id}, '{owner}', {}, {}, {}, {})",
                    blob(&hex(&v[0])),
                    blob(&hex(&v[1])),
                    blob(&hex(&v[2])),
                    blob(&hex(&v[3]))
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO phi_bench_rotate (case_id, user_id, patient_first, patient_last, patient_dob, ins_provider) VALUES {}",
            placeholders.join(", ")
        );
        conn.transaction(|c| -> QueryResult<()> { c.batch_execute(&sql) })?;
    }
    Ok(())
}

thread_local! {
    static BLOB_STYLE: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// A hex literal in the backend's syntax.
fn blob(hex: &str) -> String {
    match BLOB_STYLE.with(std::cell::Cell::get) {
        1 => format!("'\\x{hex}'::bytea"),
        _ => format!("X'{hex}'"),
    }
}

macro_rules! run_backend {
    ($name:literal, $conn:ty, $url:expr, $blob_style:expr, $setup:expr, $ddl:expr) => {{
        let url: String = $url;
        BLOB_STYLE.with(|s| s.set($blob_style));
        let rows = env_usize("PHI_ROTATE_ROWS", 100_000);
        let owners_n = env_usize("PHI_ROTATE_OWNERS", 1_000);
        let mut conn = <$conn>::establish(&url)?;
        conn.batch_execute($setup)?;
        phi::migrations::run_pending(&mut conn)?;
        conn.batch_execute("DROP TABLE IF EXISTS phi_bench_rotate")?;
        conn.batch_execute($ddl)?;
        diesel::sql_query("DELETE FROM phi_rotation_claims WHERE job_id LIKE 'bench-%'")
            .execute(&mut conn)?;
        let store: Arc<dyn phi::KeyStore> = Arc::new(
            phi::DieselKeyStore::<$conn>::builder(&url)
                .run_migrations(true)
                .connect()?,
        );
        let keyring = Keyring::builder(store.clone(), bench_kek())
            .actor("phi-bench-rotate")
            .build()?;
        // Owners of this run only, each starting with its version 1 (as in
        // an emergency: one live version per owner). Reusing the owners of
        // an earlier run would give each more versions per rerun, every one
        // of them unwrapped by the rotation.
        let run = chrono::Utc::now().timestamp_millis();
        let owners: Vec<String> = (0..owners_n).map(|i| owner(run, i)).collect();
        keyring.keys_for_seal_many(owners.iter().map(String::as_str))?;

        // Plain insert of the rows.
        let plain: Vec<(i64, String, [Vec<u8>; 4])> = (0..rows)
            .map(|i| {
                (
                    i as i64,
                    owners[i % owners_n].clone(),
                    values(i).map(String::into_bytes),
                )
            })
            .collect();
        let start = Instant::now();
        insert_rows(&mut conn, &plain)?;
        let insert = start.elapsed();
        diesel::sql_query("DELETE FROM phi_bench_rotate").execute(&mut conn)?;

        // The same rows sealed (untimed).
        let keys = keyring.keys_for_seal_many(owners.iter().map(String::as_str))?;
        let sealed: Vec<(i64, String, [Vec<u8>; 4])> = (0..rows)
            .map(|i| {
                let owner = &owners[i % owners_n];
                let k = &keys[owner];
                let row = (i as i64).to_be_bytes();
                let v = values(i);
                let seal = |j: usize| {
                    k.seal(&v[j], &format!("phi_bench_rotate.{}", COLUMNS[j]), &row)
                        .map(phi::Encrypted::into_bytes)
                };
                Ok::<_, phi::Error>((
                    i as i64,
                    owner.clone(),
                    [seal(0)?, seal(1)?, seal(2)?, seal(3)?],
                ))
            })
            .collect::<Result<_, _>>()?;
        insert_rows(&mut conn, &sealed)?;

        let stamp = chrono::Utc::now().timestamp();
        let set = RotateOwners::List(owners.clone());
        let tables = [table()];
        let start = Instant::now();
        let one = lifecycle::rotate_all(
            &mut conn,
            &keyring,
            &set,
            &tables,
            &options(format!("bench-{stamp}-1")),
        )?;
        let one_time = start.elapsed();
        assert!(one.finished() && one.resealed == 4 * rows as u64, "{one:?}");

        let job2 = format!("bench-{stamp}-2");
        let start = Instant::now();
        let reports: Vec<Result<lifecycle::RotateAllReport, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|w| {
                    let (url, store, set, tables, job2) = (&url, &store, &set, &tables, &job2);
                    s.spawn(move || -> Result<lifecycle::RotateAllReport, String> {
                        let text = |e: &dyn std::fmt::Display| e.to_string();
                        let mut conn = <$conn>::establish(url).map_err(|e| text(&e))?;
                        conn.batch_execute($setup).map_err(|e| text(&e))?;
                        let keyring = Keyring::builder(store.clone(), bench_kek())
                            .actor("phi-bench-rotate")
                            .build()
                            .map_err(|e| text(&e))?;
                        lifecycle::rotate_all(
                            &mut conn,
                            &keyring,
                            set,
                            tables,
                            &options(job2.clone()).worker(format!("bench-worker-{w}")),
                        )
                        .map_err(|e| text(&e))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("worker thread"))
                .collect()
        });
        let two_time = start.elapsed();
        let mut resealed = 0;
        let mut claimed = Vec::new();
        for r in reports {
            let r = r?;
            resealed += r.resealed;
            claimed.push(r.claimed);
        }
        assert_eq!(resealed, 4 * rows as u64);
        report($name, rows, owners_n, insert, one_time, two_time, &claimed);
    }};
}

fn report(
    name: &str,
    rows: usize,
    owners: usize,
    insert: Duration,
    one: Duration,
    two: Duration,
    claimed: &[u64],
) {
    println!(
        "{name}: {rows} rows x 4 fields over {owners} owners: plain insert {:.2} s; rotate_all one worker {:.2} s \
         ({:.2}x the insert, {:.0} values/s); two workers {:.2} s ({:.2}x one worker; owners claimed {claimed:?})",
        insert.as_secs_f64(),
        one.as_secs_f64(),
        one.as_secs_f64() / insert.as_secs_f64(),
        (4 * rows) as f64 / one.as_secs_f64(),
        two.as_secs_f64(),
        two.as_secs_f64() / one.as_secs_f64(),
    );
}

/// Whether `PHI_ROTATE_BACKENDS` (a comma-separated list; default all)
/// names `backend`.
fn wanted(backend: &str) -> bool {
    std::env::var("PHI_ROTATE_BACKENDS").map_or(true, |only| {
        only.split(',')
            .any(|b| b.trim().eq_ignore_ascii_case(backend))
    })
}

fn main() -> BoxResult<()> {
    #[cfg(feature = "postgres")]
    if wanted("PostgreSQL") {
        run_backend!(
            "PostgreSQL",
            diesel::PgConnection,
            std::env::var("PHI_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            1,
            "SELECT 1",
            "CREATE TABLE phi_bench_rotate (case_id BIGINT PRIMARY KEY, user_id VARCHAR(64) NOT NULL, \
         patient_first BYTEA, patient_last BYTEA, patient_dob BYTEA, ins_provider BYTEA); \
         CREATE INDEX phi_bench_rotate_owner ON phi_bench_rotate (user_id)"
        );
    }
    #[cfg(feature = "mysql")]
    if wanted("MariaDB") {
        run_backend!(
            "MariaDB",
            diesel::MysqlConnection,
            std::env::var("PHI_TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
            0,
            "SELECT 1",
            "CREATE TABLE phi_bench_rotate (case_id BIGINT PRIMARY KEY, user_id VARCHAR(64) NOT NULL, \
         patient_first BLOB, patient_last BLOB, patient_dob BLOB, ins_provider BLOB, INDEX phi_bench_rotate_owner (user_id))"
        );
    }
    #[cfg(feature = "sqlite")]
    if wanted("SQLite") {
        let dir = tempfile::tempdir()?;
        let url = dir.path().join("rotate.db").display().to_string();
        run_backend!(
            "SQLite",
            diesel::SqliteConnection,
            url.clone(),
            0,
            "PRAGMA busy_timeout = 10000",
            "CREATE TABLE phi_bench_rotate (case_id BIGINT PRIMARY KEY, user_id VARCHAR(64) NOT NULL, \
             patient_first BLOB, patient_last BLOB, patient_dob BLOB, ins_provider BLOB); \
             CREATE INDEX phi_bench_rotate_owner ON phi_bench_rotate (user_id)"
        );
    }
    Ok(())
}
