//! Searching one provider's cases by encrypted and plaintext fields
//! (`PhiRecord::load` / `load_where`) against the plaintext query on the
//! same rows, on every backend enabled by cargo features, in one run.
//!
//! ```sh
//! cargo bench -p phi-benches --bench search --all-features            # SQLite, MariaDB, PostgreSQL
//! PHI_SEARCH_ROWS=20000 PHI_SEARCH_RUNS=9 cargo bench -p phi-benches --bench search --all-features
//! ```
//!
//! Not a criterion benchmark: each query runs `PHI_SEARCH_RUNS` times
//! (default 5) with a warm key cache, and the median is reported. Per
//! backend it recreates two tables with the same cases of two providers,
//! `PHI_SEARCH_ROWS` each (default 10,000): `phi_bench_search` (last name,
//! date of birth and surgery date sealed; derived indexes on the surname's
//! first 3 characters, 16-bit tags, and on the surgery's year and month,
//! each indexed with the provider) and `phi_bench_search_plain` (all
//! plaintext, with the normalised last name and indexes on `(user_id,
//! patient_last_norm)` and `(user_id, surgery_date)`). Two searches of one
//! provider:
//!
//! - "surgery this month": plaintext `BETWEEN` on the index against phi's
//!   `find_surgery_month_between` (the month's bucket, opened, the range
//!   tested).
//! - "surname starts with MAR": plaintext `LIKE 'mar%'` on the index
//!   against phi's `find_by_last_prefix` (the prefix's bucket, opened,
//!   tested), and against `load_where` over all the provider's rows (no
//!   index: every row opened and tested).
//!
//! The database URLs come from `PHI_TEST_POSTGRES_URL` and
//! `PHI_TEST_MYSQL_URL` (as the tests'); SQLite uses a temporary file.
#![allow(clippy::print_stdout)]

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use phi::{KeyBytes, Keyring, LocalKek, PhiRecord};

type BoxResult<T> = Result<T, Box<dyn Error>>;

mod schema {
    #![allow(missing_docs)]
    diesel::table! {
        phi_bench_search (case_id) {
            case_id -> Text,
            user_id -> Text,
            patient_last -> Binary,
            patient_dob -> Binary,
            surgery_date -> Binary,
            last_prefix -> Nullable<Binary>,
            surgery_month -> Nullable<Binary>,
        }
    }
    diesel::table! {
        phi_bench_search_plain (case_id) {
            case_id -> Text,
            user_id -> Text,
            patient_last -> Text,
            patient_last_norm -> Text,
            patient_dob -> Date,
            surgery_date -> Date,
        }
    }
}
use schema::{
    phi_bench_search, phi_bench_search as sealed, phi_bench_search_plain,
    phi_bench_search_plain as plain,
};

#[derive(PhiRecord, Clone)]
#[phi(table = phi_bench_search, crate = phi)]
#[diesel(primary_key(case_id))]
struct Case {
    #[phi(row_key)]
    case_id: String,
    #[phi(owner)]
    user_id: String,
    #[phi(encrypt, normalize = "trim,lowercase", index(column = last_prefix, prefix = 3, bits = 16))]
    patient_last: String,
    #[phi(encrypt)]
    patient_dob: NaiveDate,
    #[phi(encrypt, index(column = surgery_month, year_month))]
    surgery_date: NaiveDate,
}

#[derive(Queryable, Selectable, Insertable)]
#[diesel(table_name = phi_bench_search_plain)]
struct PlainCase {
    case_id: String,
    user_id: String,
    patient_last: String,
    patient_last_norm: String,
    patient_dob: NaiveDate,
    surgery_date: NaiveDate,
}

const LASTS: [&str; 12] = [
    "Marchbanks",
    "Martin",
    "Okafor",
    "Haddad",
    "Lindqvist",
    "Nakamura",
    "Oyelaran",
    "Smith",
    "Marsh",
    "Doe",
    "Quill",
    "Ibarra",
];

#[path = "common/env.rs"]
mod env;
use env::env_usize;

/// Case `i` of `provider`: names cycle (3 of 12 begin with "mar"),
/// surgeries spread over 2026, births over 1940–1999.
fn case(provider: &str, i: usize) -> Case {
    let day = u32::try_from(i % 365).unwrap_or(0);
    Case {
        case_id: format!("{provider}-{i:06}"),
        user_id: provider.to_owned(),
        patient_last: LASTS[i % LASTS.len()].to_owned(),
        patient_dob: NaiveDate::from_ymd_opt(
            1940 + i32::try_from(i % 60).unwrap_or(0),
            1 + u32::try_from(i % 12).unwrap_or(0),
            1 + u32::try_from(i % 28).unwrap_or(0),
        )
        .expect("a date"),
        surgery_date: NaiveDate::from_yo_opt(2026, 1 + day).expect("a date"),
    }
}

/// The median of `runs` timings of `f`, which returns the number of cases
/// found (the same every time).
fn median(runs: usize, mut f: impl FnMut() -> BoxResult<usize>) -> BoxResult<(Duration, usize)> {
    let mut times = Vec::with_capacity(runs);
    let mut found = 0;
    for _ in 0..runs {
        let start = Instant::now();
        found = f()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok((times[times.len() / 2], found))
}

macro_rules! run_backend {
    ($name:literal, $conn:ty, $url:expr, $setup:expr, $sealed_ddl:expr, $plain_ddl:expr) => {{
        let url: String = $url;
        let rows = env_usize("PHI_SEARCH_ROWS", 10_000);
        let runs = env_usize("PHI_SEARCH_RUNS", 5).max(1);
        let mut conn = <$conn>::establish(&url)?;
        conn.batch_execute($setup)?;
        phi::migrations::run_pending(&mut conn)?;
        conn.batch_execute("DROP TABLE IF EXISTS phi_bench_search")?;
        conn.batch_execute("DROP TABLE IF EXISTS phi_bench_search_plain")?;
        conn.batch_execute($sealed_ddl)?;
        conn.batch_execute($plain_ddl)?;
        let store = Arc::new(phi::DieselKeyStore::<$conn>::connect(&url)?);
        let kek = Arc::new(LocalKek::new("bench-search", &KeyBytes::new([0x53; 32])));
        let keyring = Keyring::builder(store, kek).actor("phi-bench-search").build()?;
        let run = chrono::Utc::now().timestamp_millis();
        let providers = [format!("search-{run}-a"), format!("search-{run}-b")];
        for provider in &providers {
            let cases: Vec<Case> = (0..rows).map(|i| case(provider, i)).collect();
            for chunk in cases.chunks(1_000) {
                Case::insert_all(chunk, &keyring, &mut conn)?;
                let twins: Vec<PlainCase> = chunk
                    .iter()
                    .map(|c| PlainCase {
                        case_id: c.case_id.clone(),
                        user_id: c.user_id.clone(),
                        patient_last: c.patient_last.clone(),
                        patient_last_norm: c.patient_last.to_lowercase(),
                        patient_dob: c.patient_dob,
                        surgery_date: c.surgery_date,
                    })
                    .collect();
                diesel::insert_into(plain::table).values(&twins).execute(&mut conn)?;
            }
        }
        let provider = providers[0].as_str();
        let (from, to) = (
            NaiveDate::from_ymd_opt(2026, 3, 1).expect("date"),
            NaiveDate::from_ymd_opt(2026, 3, 31).expect("date"),
        );
        // Warm the key cache.
        Case::load(sealed::table.filter(sealed::user_id.eq(provider)).limit(1), &mut conn, &keyring)?;

        let (plain_month, n_plain) = median(runs, || {
            let rows: Vec<PlainCase> = plain::table
                .filter(plain::user_id.eq(provider))
                .filter(plain::surgery_date.between(from, to))
                .select(PlainCase::as_select())
                .load(&mut conn)?;
            Ok(rows.len())
        })?;
        let (phi_month, n_phi) = median(runs, || {
            let cases = Case::find_surgery_month_between(provider, &from, &to, &keyring, &mut conn)?;
            Ok(cases.len())
        })?;
        assert_eq!(n_plain, n_phi, "the same cases this month");

        let (plain_mar, p_mar) = median(runs, || {
            let rows: Vec<PlainCase> = plain::table
                .filter(plain::user_id.eq(provider))
                .filter(plain::patient_last_norm.like("mar%"))
                .select(PlainCase::as_select())
                .load(&mut conn)?;
            Ok(rows.len())
        })?;
        let (phi_bucket, b_mar) = median(runs, || {
            let cases = Case::find_by_last_prefix(provider, "mar", &keyring, &mut conn)?;
            Ok(cases.len())
        })?;
        assert_eq!(p_mar, b_mar, "the same MAR cases");
        let (phi_mar, s_mar) = median(runs, || {
            let cases = Case::load_where(
                sealed::table.filter(sealed::user_id.eq(provider)),
                &mut conn,
                &keyring,
                |c| c.patient_last.to_lowercase().starts_with("mar"),
            )?;
            Ok(cases.len())
        })?;
        assert_eq!(p_mar, s_mar, "the same MAR cases");
        println!(
            "{}: {rows} cases per provider, 2 providers, median of {runs}: \
             surgery this month ({n_plain} cases): plaintext {:.2} ms, phi year-month bucket {:.2} ms ({:.2}x); \
             surname starts with MAR ({p_mar} cases): plaintext {:.2} ms, phi prefix bucket {:.2} ms ({:.2}x), \
             phi load_where over the provider's {rows} rows {:.2} ms ({:.2}x)",
            $name,
            plain_month.as_secs_f64() * 1e3,
            phi_month.as_secs_f64() * 1e3,
            phi_month.as_secs_f64() / plain_month.as_secs_f64(),
            plain_mar.as_secs_f64() * 1e3,
            phi_bucket.as_secs_f64() * 1e3,
            phi_bucket.as_secs_f64() / plain_mar.as_secs_f64(),
            phi_mar.as_secs_f64() * 1e3,
            phi_mar.as_secs_f64() / plain_mar.as_secs_f64(),
        );
    }};
}

fn main() -> BoxResult<()> {
    #[cfg(feature = "postgres")]
    run_backend!(
        "PostgreSQL",
        diesel::PgConnection,
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        "SELECT 1",
        "CREATE TABLE phi_bench_search (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
         patient_last BYTEA NOT NULL, patient_dob BYTEA NOT NULL, surgery_date BYTEA NOT NULL, \
         last_prefix BYTEA NULL, surgery_month BYTEA NULL); \
         CREATE INDEX phi_bench_search_surgery ON phi_bench_search (user_id, surgery_month); \
         CREATE INDEX phi_bench_search_last ON phi_bench_search (user_id, last_prefix)",
        "CREATE TABLE phi_bench_search_plain (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
         patient_last TEXT NOT NULL, patient_last_norm TEXT NOT NULL, patient_dob DATE NOT NULL, surgery_date DATE NOT NULL); \
         CREATE INDEX phi_bench_search_plain_surgery ON phi_bench_search_plain (user_id, surgery_date); \
         CREATE INDEX phi_bench_search_plain_last ON phi_bench_search_plain (user_id, patient_last_norm text_pattern_ops)"
    );
    #[cfg(feature = "mysql")]
    run_backend!(
        "MariaDB",
        diesel::MysqlConnection,
        std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
        "SELECT 1",
        "CREATE TABLE phi_bench_search (case_id VARCHAR(64) PRIMARY KEY, user_id VARCHAR(64) NOT NULL, \
         patient_last BLOB NOT NULL, patient_dob BLOB NOT NULL, surgery_date BLOB NOT NULL, \
         last_prefix VARBINARY(2) NULL, surgery_month VARBINARY(16) NULL, \
         INDEX phi_bench_search_surgery (user_id, surgery_month), INDEX phi_bench_search_last (user_id, last_prefix))",
        "CREATE TABLE phi_bench_search_plain (case_id VARCHAR(64) PRIMARY KEY, user_id VARCHAR(64) NOT NULL, \
         patient_last VARCHAR(100) NOT NULL, patient_last_norm VARCHAR(100) NOT NULL, patient_dob DATE NOT NULL, \
         surgery_date DATE NOT NULL, INDEX phi_bench_search_plain_surgery (user_id, surgery_date), \
         INDEX phi_bench_search_plain_last (user_id, patient_last_norm))"
    );
    #[cfg(feature = "sqlite")]
    {
        let dir = tempfile::tempdir()?;
        let url = dir.path().join("search.db").display().to_string();
        run_backend!(
            "SQLite",
            diesel::SqliteConnection,
            url.clone(),
            "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL",
            "CREATE TABLE phi_bench_search (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
             patient_last BLOB NOT NULL, patient_dob BLOB NOT NULL, surgery_date BLOB NOT NULL, \
             last_prefix BLOB NULL, surgery_month BLOB NULL); \
             CREATE INDEX phi_bench_search_surgery ON phi_bench_search (user_id, surgery_month); \
             CREATE INDEX phi_bench_search_last ON phi_bench_search (user_id, last_prefix)",
            "CREATE TABLE phi_bench_search_plain (case_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, \
             patient_last TEXT NOT NULL, patient_last_norm TEXT NOT NULL, patient_dob DATE NOT NULL, surgery_date DATE NOT NULL); \
             CREATE INDEX phi_bench_search_plain_surgery ON phi_bench_search_plain (user_id, surgery_date); \
             CREATE INDEX phi_bench_search_plain_last ON phi_bench_search_plain (user_id, patient_last_norm)"
        );
    }
    Ok(())
}
