//! Whole-run timing of phi's migration jobs against writing the same rows
//! in plain text: 100,000 legacy cases written unsealed, then `backfill`
//! and `decrypt_back`, on every backend enabled by cargo features.
//!
//! ```sh
//! cargo bench -p phi-benches --bench migrate                  # SQLite only
//! cargo bench -p phi-benches --bench migrate --all-features   # SQLite, MariaDB, PostgreSQL
//! PHI_MIGRATE_ROWS=20000 PHI_MIGRATE_RUNS=1 cargo bench -p phi-benches --bench migrate --all-features
//! ```
//!
//! Not a criterion benchmark: each measure times a whole run; the median of
//! `PHI_MIGRATE_RUNS` runs (default 3) is reported. Per run it drops and
//! recreates its table `phi_bench_migrate` (a `BIGINT` case id, a text
//! owner, 4 binary PHI columns, a boolean encrypted flag) and times:
//!
//! - plain write: N cases (100 owners, 4 PHI text fields of 3–22 bytes)
//!   written by the model under a roll-out of nobody (plain bytes, flag
//!   off), 1,000 rows per multi-row `INSERT`, one transaction each: what the
//!   clinic's `seed-legacy` does;
//! - backfill: `migrate::backfill` of every row, at each batch size of
//!   `PHI_MIGRATE_BATCHES` (default `500,5000`), each followed by
//!   `migrate::decrypt_back` at the same batch size (also timed), so the
//!   next backfill starts from plain rows again;
//! - rewrap (KEK rotation): `lifecycle::rewrap` of every data key in the
//!   store (the 100 owners' and `PHI_MIGRATE_REWRAP_KEYS` more, default
//!   10,000, created once before the timing) from the benchmark's KEK to a
//!   second one, batches of 500 (one set-based `UPDATE` each), then back
//!   (also timed) for the next run.
//!
//! The owners' data keys live in phi's key store on the same database
//! (`LocalKek` over a fixed test key) and are created before the timing.
//! After each job the harness checks the flag of every row and, after the
//! last decrypt-back, that every case reads back exactly as written.
//!
//! Results: `benches/README.md`.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use phi::lifecycle::{self, RewrapOptions};
use phi::migrate::{self, MigrateOptions};
use phi::{KeyBytes, KeyEncryptionKey as _, KeyStore, Keyring, LocalKek, PhiRecord, Rollout};

mod schema {
    //! The table of the benchmark.
    #![allow(missing_docs)]
    diesel::table! {
        phi_bench_migrate (case_id) {
            case_id -> BigInt,
            user_id -> Text,
            patient_first -> Binary,
            patient_last -> Binary,
            patient_dob -> Binary,
            ins_provider -> Binary,
            status -> Integer,
            phi_encrypted -> Bool,
        }
    }
}
use schema::phi_bench_migrate;

type BoxResult<T> = Result<T, Box<dyn Error>>;

const DEFAULT_ROWS: usize = 100_000;
const OWNERS: usize = 100;
const INSERT_ROWS: usize = 1_000;

/// A legacy case: written plain with the flag off, then backfilled.
#[derive(phi::PhiRecord, Clone, PartialEq)]
#[phi(crate = phi, table = phi_bench_migrate)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: i64,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt)]
    patient_first: String,
    #[phi(encrypt)]
    patient_last: String,
    #[phi(encrypt)]
    patient_dob: String,
    #[phi(encrypt)]
    ins_provider: String,
    status: i32,
    #[phi(encrypted_flag)]
    phi_encrypted: bool,
}

fn owners() -> Vec<String> {
    (0..OWNERS)
        .map(|i| format!("mig-provider-{i:03}"))
        .collect()
}

fn cases(rows: usize, owners: &[String]) -> Vec<Case> {
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
    (0..rows)
        .map(|i| Case {
            case_id: i as i64,
            user_id: owners[i % owners.len()].clone(),
            patient_first: FIRST[i % FIRST.len()].to_owned(),
            patient_last: format!("{}{}", LAST[i % LAST.len()], i % 97),
            patient_dob: format!("19{:02}-{:02}-{:02}", 40 + i % 60, 1 + i % 12, 1 + i % 28),
            ins_provider: INSURER[i % INSURER.len()].to_owned(),
            status: i32::try_from(i % 5).expect("small"),
            phi_encrypted: false,
        })
        .collect()
}

fn bench_kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::new("bench-migrate", &KeyBytes::new([0x43; 32])))
}

/// The KEK the rewrap measure rotates to (and back from).
fn second_kek() -> Arc<LocalKek> {
    Arc::new(LocalKek::new("bench-migrate-2", &KeyBytes::new([0x44; 32])))
}

fn new_keyring(store: &Arc<dyn KeyStore>) -> phi::Result<Keyring> {
    Keyring::builder(Arc::clone(store), bench_kek())
        .actor("phi-bench-migrate")
        .build()
}

/// Rewraps every key from `from` to `to`; the keys moved and the time.
fn rewrap_all(
    store: &Arc<dyn KeyStore>,
    from: Arc<LocalKek>,
    to: Arc<LocalKek>,
) -> BoxResult<(u64, Duration)> {
    let from_id = from.id().to_owned();
    let keyring = Keyring::builder(Arc::clone(store), to)
        .unwrap_with(from)
        .actor("phi-bench-migrate")
        .build()?;
    let scope = RewrapOptions::default().from_kek(from_id).batch_size(500);
    let start = Instant::now();
    let report = lifecycle::rewrap(&keyring, &scope)?;
    let took = start.elapsed();
    if report.rewrapped != report.total || report.skipped != 0 {
        return Err(format!("rewrap: {report:?}").into());
    }
    Ok((report.rewrapped, took))
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s[s.len() / 2]
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn thousands(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

struct Backend {
    name: &'static str,
    url: String,
    setup: &'static str,
    table: &'static str,
}

#[derive(Default)]
struct Samples {
    plain: Vec<Duration>,
    /// Per batch size: backfill and decrypt-back times.
    backfill: Vec<Vec<Duration>>,
    decrypt: Vec<Vec<Duration>>,
    /// Keys rewrapped per run, and the rewrap there and back.
    rewrapped: u64,
    rewrap: Vec<Duration>,
    rewrap_back: Vec<Duration>,
}

macro_rules! backend_run {
    ($module:ident, $feature:literal, $conn:ty) => {
        #[cfg(feature = $feature)]
        mod $module {
            use diesel::connection::SimpleConnection;

            use super::*;

            type Conn = $conn;

            fn count(conn: &mut Conn, sealed: bool) -> BoxResult<i64> {
                Ok(phi_bench_migrate::table
                    .filter(phi_bench_migrate::phi_encrypted.eq(sealed))
                    .count()
                    .get_result(conn)?)
            }

            pub(super) fn run(
                b: &Backend,
                cases: &[Case],
                owners: &[String],
                batches: &[usize],
                runs: usize,
                rewrap_keys: usize,
            ) -> BoxResult<Samples> {
                let mut conn = Conn::establish(&b.url)?;
                conn.batch_execute(b.setup)?;
                let store: Arc<dyn KeyStore> = Arc::new(
                    phi::DieselKeyStore::<Conn>::builder(&b.url)
                        .run_migrations(true)
                        .connect()?,
                );
                let keyring = new_keyring(&store)?;
                keyring.keys_for_seal_many(owners.iter().map(String::as_str))?;
                let extra: Vec<String> = (0..rewrap_keys)
                    .map(|i| format!("bench-rewrap-{i:06}"))
                    .collect();
                for chunk in extra.chunks(1_000) {
                    keyring.keys_for_seal_many(chunk.iter().map(String::as_str))?;
                }
                let plain = new_keyring(&store)?;
                plain.set_rollout(Rollout::Nobody);
                let n = cases.len() as i64;
                let mut s = Samples {
                    backfill: vec![Vec::new(); batches.len()],
                    decrypt: vec![Vec::new(); batches.len()],
                    ..Samples::default()
                };
                for run in 0..runs {
                    eprintln!("{}: run {}/{runs}", b.name, run + 1);
                    conn.batch_execute(b.table)?;
                    let start = Instant::now();
                    for chunk in cases.chunks(INSERT_ROWS) {
                        let rows = Case::seal_all(chunk, &plain)?;
                        conn.transaction::<_, diesel::result::Error, _>(|conn| {
                            diesel::insert_into(phi_bench_migrate::table)
                                .values(&rows)
                                .execute(conn)
                        })?;
                    }
                    s.plain.push(start.elapsed());
                    if count(&mut conn, false)? != n {
                        return Err("the plain write left rows out".into());
                    }
                    for (i, &batch) in batches.iter().enumerate() {
                        let options = MigrateOptions::default().batch(batch);
                        let start = Instant::now();
                        let report = migrate::backfill::<Case, _>(&mut conn, &keyring, &options)?;
                        s.backfill[i].push(start.elapsed());
                        if report.rows != n as u64 || count(&mut conn, true)? != n {
                            return Err(format!("backfill: {report}").into());
                        }
                        let start = Instant::now();
                        let report =
                            migrate::decrypt_back::<Case, _>(&mut conn, &keyring, &options)?;
                        s.decrypt[i].push(start.elapsed());
                        if report.rows != n as u64 || count(&mut conn, false)? != n {
                            return Err(format!("decrypt-back: {report}").into());
                        }
                    }
                    let (moved, took) = rewrap_all(&store, bench_kek(), second_kek())?;
                    s.rewrap.push(took);
                    let (back, took) = rewrap_all(&store, second_kek(), bench_kek())?;
                    s.rewrap_back.push(took);
                    if moved != back || moved < (owners.len() + rewrap_keys) as u64 {
                        return Err(format!("rewrap moved {moved} keys and {back} back").into());
                    }
                    s.rewrapped = moved;
                }
                let back = Case::load(
                    phi_bench_migrate::table.order(phi_bench_migrate::case_id),
                    &mut conn,
                    &keyring,
                )?;
                if back != cases {
                    return Err("the cases read back differ from those written".into());
                }
                Ok(s)
            }
        }
    };
}

backend_run!(sqlite_run, "sqlite", diesel::SqliteConnection);
backend_run!(mysql_run, "mysql", diesel::MysqlConnection);
backend_run!(postgres_run, "postgres", diesel::PgConnection);

// One `push` per backend enabled by cargo features.
#[allow(clippy::vec_init_then_push)]
fn backends() -> Vec<Backend> {
    let mut list = Vec::new();
    #[cfg(feature = "sqlite")]
    list.push(Backend {
        name: "SQLite",
        url: String::new(), // a temporary file, set in `main`
        setup: "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000;",
        table: "DROP TABLE IF EXISTS phi_bench_migrate;
            CREATE TABLE phi_bench_migrate (
                case_id       INTEGER PRIMARY KEY NOT NULL,
                user_id       TEXT    NOT NULL,
                patient_first BLOB    NOT NULL,
                patient_last  BLOB    NOT NULL,
                patient_dob   BLOB    NOT NULL,
                ins_provider  BLOB    NOT NULL,
                status        INTEGER NOT NULL,
                phi_encrypted BOOLEAN NOT NULL DEFAULT 0
            );",
    });
    #[cfg(feature = "mysql")]
    list.push(Backend {
        name: "MariaDB",
        url: std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
        setup: "SELECT 1;",
        table: "DROP TABLE IF EXISTS phi_bench_migrate;
            CREATE TABLE phi_bench_migrate (
                case_id       BIGINT         NOT NULL PRIMARY KEY,
                user_id       VARCHAR(64)    NOT NULL,
                patient_first VARBINARY(255) NOT NULL,
                patient_last  VARBINARY(255) NOT NULL,
                patient_dob   VARBINARY(255) NOT NULL,
                ins_provider  VARBINARY(255) NOT NULL,
                status        INT            NOT NULL,
                phi_encrypted BOOLEAN        NOT NULL DEFAULT FALSE
            ) ENGINE = InnoDB CHARACTER SET utf8mb4;",
    });
    #[cfg(feature = "postgres")]
    list.push(Backend {
        name: "PostgreSQL",
        url: std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        setup: "SELECT 1;",
        table: "DROP TABLE IF EXISTS phi_bench_migrate;
            CREATE TABLE phi_bench_migrate (
                case_id       BIGINT  NOT NULL PRIMARY KEY,
                user_id       TEXT    NOT NULL,
                patient_first BYTEA   NOT NULL,
                patient_last  BYTEA   NOT NULL,
                patient_dob   BYTEA   NOT NULL,
                ins_provider  BYTEA   NOT NULL,
                status        INTEGER NOT NULL,
                phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE
            );",
    });
    list
}

fn run_backend(
    b: &Backend,
    cases: &[Case],
    owners: &[String],
    batches: &[usize],
    runs: usize,
    rewrap_keys: usize,
) -> BoxResult<Samples> {
    match b.name {
        #[cfg(feature = "sqlite")]
        "SQLite" => sqlite_run::run(b, cases, owners, batches, runs, rewrap_keys),
        #[cfg(feature = "mysql")]
        "MariaDB" => mysql_run::run(b, cases, owners, batches, runs, rewrap_keys),
        #[cfg(feature = "postgres")]
        "PostgreSQL" => postgres_run::run(b, cases, owners, batches, runs, rewrap_keys),
        other => Err(format!("no runner for {other}").into()),
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| {
        v.replace(['_', ','], "")
            .parse()
            .unwrap_or_else(|_| panic!("{name} is a number"))
    })
}

fn main() {
    let rows = env_number("PHI_MIGRATE_ROWS", DEFAULT_ROWS).max(1);
    let runs = env_number("PHI_MIGRATE_RUNS", 3).max(1);
    let rewrap_keys = env_number("PHI_MIGRATE_REWRAP_KEYS", 10_000);
    let batches: Vec<usize> = std::env::var("PHI_MIGRATE_BATCHES")
        .unwrap_or_else(|_| "500,5000".into())
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .expect("PHI_MIGRATE_BATCHES is a list of numbers")
        })
        .collect();
    let owners = owners();
    let cases = cases(rows, &owners);
    let dir = tempfile::tempdir().expect("temporary directory");
    println!(
        "## phi migration jobs, {} ({} cases × 4 PHI fields, {} owners, median of {runs}, {} cores)",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        thousands(rows as f64),
        OWNERS,
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!();
    println!("| database | job | batch | time | rows/s | × plain write |");
    println!("|---|---|---|---|---|---|");
    let mut failed = false;
    for mut backend in backends() {
        if backend.name == "SQLite" {
            let path = dir.path().join("migrate.db");
            backend.url = path.to_str().expect("UTF-8 temporary path").to_owned();
        }
        match run_backend(&backend, &cases, &owners, &batches, runs, rewrap_keys) {
            Ok(s) => {
                let plain = median(&s.plain);
                let rate = |d: Duration| thousands(rows as f64 / d.as_secs_f64());
                let line = |job: &str, batch: String, d: Duration| {
                    println!(
                        "| {} | {job} | {batch} | {:.2} s | {} | {:.2}× |",
                        backend.name,
                        d.as_secs_f64(),
                        rate(d),
                        d.as_secs_f64() / plain.as_secs_f64()
                    );
                };
                line(
                    "plain write (`seed-legacy`)",
                    "1,000 / INSERT".into(),
                    plain,
                );
                for (i, batch) in batches.iter().enumerate() {
                    line("backfill", thousands(*batch as f64), median(&s.backfill[i]));
                    line(
                        "decrypt-back",
                        thousands(*batch as f64),
                        median(&s.decrypt[i]),
                    );
                }
                for (job, samples) in [
                    ("rewrap (KEK rotation)", &s.rewrap),
                    ("rewrap back", &s.rewrap_back),
                ] {
                    let d = median(samples);
                    println!(
                        "| {} | {job}, {} keys | 500 | {:.2} s | {} keys/s | |",
                        backend.name,
                        thousands(s.rewrapped as f64),
                        d.as_secs_f64(),
                        thousands(s.rewrapped as f64 / d.as_secs_f64()),
                    );
                }
            }
            Err(e) => {
                failed = true;
                println!("| {} | FAILED: {e} | | | | |", backend.name);
            }
        }
    }
    println!();
    if failed {
        std::process::exit(1);
    }
}
