//! The clinic's `case update` (separate processes of the built example)
//! racing its `backfill` on PostgreSQL, in a database of its own
//! (`phi_clinic_races`, created afresh on the server named by
//! `PHI_TEST_POSTGRES_URL`): afterwards every row opens, every updated row
//! holds the value written last, and no row's values disagree with its
//! encrypted flag. The deterministic interleavings behind it, on every
//! backend, are in `tests/suite/guarded.rs`.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

mod common;

use common::clinic_bin;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Bool, Text};
use phi::{Encrypted, Keyring, LocalKek};

/// Legacy rows the backfill seals.
const ROWS: u64 = 8_000;
/// Application updates, each a `clinic case update` process.
const UPDATES: usize = 320;
/// Processes updating at once; worker `w` updates only rows whose number
/// is `w` modulo this, one at a time, so each row's last write is known.
const WORKERS: u64 = 8;
/// Providers of the legacy rows, and how many of them are rolled out
/// (their updates seal a plain row whole; the others' stay plain).
const OWNERS: u64 = 40;
const ROLLED_OUT: u64 = 8;

fn clinic(url: &str, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(clinic_bin());
    cmd.current_dir(dir)
        .args(args)
        .env("DATABASE_URL", url)
        .env("PHI_MASTER_KEY", common::MASTER_KEY_B64)
        .env_remove("PHI_MASTER_KEY_FILE")
        .env_remove("PHI_KEK")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs a clinic command that must succeed; its standard output.
fn ok(url: &str, dir: &Path, args: &[&str]) -> String {
    let out = clinic(url, dir, args).output().expect("the clinic runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "clinic {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// A small xorshift generator, seeded differently on every run.
struct Rng(u64);

impl Rng {
    fn new(stream: u64) -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        Rng((u64::try_from(nanos % u128::from(u64::MAX)).expect("fits")
            ^ (stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = Text)]
    case_id: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Stored {
    #[diesel(sql_type = Text)]
    user_id: String,
    #[diesel(sql_type = Bool)]
    phi_encrypted: bool,
    #[diesel(sql_type = Binary)]
    patient_last: Vec<u8>,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(conn)
        .expect(sql)
        .n
}

/// One worker's updates: half on rows just ahead of the backfill (where a
/// conflict is likely), half anywhere. Returns (id, value) in write order,
/// the conflicts retried, and the updates that ended while the backfill ran.
fn worker(
    url: &str,
    dir: &Path,
    w: u64,
    n: usize,
    first: u64,
    backfilling: &AtomicBool,
) -> (Vec<(String, String)>, u64, u64) {
    let mut rng = Rng::new(w);
    let mut conn = PgConnection::establish(url).expect("postgres");
    let mut written = Vec::new();
    let (mut retried, mut during) = (0, 0);
    for k in 0..n {
        let mut id = None;
        if k % 2 == 0 {
            // A random row among the next unsealed ones of this worker.
            let ahead: Vec<Id> = diesel::sql_query(format!(
                "SELECT case_id FROM cases WHERE NOT phi_encrypted AND case_id LIKE 'L-%' \
                 AND CAST(SUBSTRING(case_id FROM 3) AS BIGINT) % {WORKERS} = {w} ORDER BY case_id LIMIT 100"
            ))
            .load(&mut conn)
            .expect("rows ahead");
            if !ahead.is_empty() {
                let pick = usize::try_from(rng.below(ahead.len() as u64)).expect("index");
                id = Some(ahead[pick].case_id.clone());
            }
        }
        let id = id.unwrap_or_else(|| {
            let slot = rng.below(ROWS / WORKERS);
            format!(
                "L-{:06}",
                first + (slot * WORKERS + (w + WORKERS - first % WORKERS) % WORKERS)
            )
        });
        let value = format!("Upd{w}x{k}");
        let out = ok(url, dir, &["case", "update", &id, "--last", &value]);
        assert!(out.contains(&format!("{id}: updated")), "{out}");
        if let Some((_, rest)) = out.split_once(" after ") {
            retried += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .expect("retry count");
        }
        if backfilling.load(Ordering::SeqCst) {
            during += 1;
        }
        written.push((id, value));
    }
    (written, retried, during)
}

#[test]
fn case_updates_racing_a_backfill_leave_every_row_consistent() {
    let test_url = std::env::var("PHI_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (base, _) = test_url.rsplit_once('/').expect("URL with a database");
    let url = format!("{base}/phi_clinic_races");
    {
        let mut admin = PgConnection::establish(&test_url)
            .unwrap_or_else(|e| panic!("PostgreSQL at {test_url} is needed: {e}"));
        diesel::sql_query("DROP DATABASE IF EXISTS phi_clinic_races WITH (FORCE)")
            .execute(&mut admin)
            .expect("drop database");
        diesel::sql_query("CREATE DATABASE phi_clinic_races")
            .execute(&mut admin)
            .expect("create database");
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let dir = dir.path();
    let started = Instant::now();

    let seeded = ok(
        &url,
        dir,
        &[
            "seed-legacy",
            "--cases",
            &ROWS.to_string(),
            "--owners",
            &OWNERS.to_string(),
        ],
    );
    assert!(
        seeded.contains(&format!("Wrote {ROWS} legacy case(s)")),
        "{seeded}"
    );
    let first: u64 = seeded
        .split_once("legacy case(s) in plain text (flag off), L-")
        .and_then(|(_, rest)| rest.get(..6))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("first case number in {seeded}"));
    for o in 1..=ROLLED_OUT {
        ok(
            &url,
            dir,
            &["rollout", "enable", "--owner", &format!("provider-{o:03}")],
        );
    }
    let mut conn = PgConnection::establish(&url).expect("postgres");
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) AS n FROM cases WHERE NOT phi_encrypted"
        ),
        i64::try_from(ROWS).expect("fits")
    );

    // The backfill, small batches; the updates, from WORKERS threads each
    // running one clinic process at a time.
    let backfilling = Arc::new(AtomicBool::new(true));
    let backfill = clinic(&url, dir, &["backfill", "--batch", "200"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("backfill starts");
    let results = Mutex::new(Vec::new());
    let backfill_out = std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (url, results, backfilling) = (&url, &results, &backfilling);
            s.spawn(move || {
                let n = UPDATES / usize::try_from(WORKERS).expect("small");
                let r = worker(url, dir, w, n, first, backfilling);
                results.lock().expect("results").push(r);
            });
        }
        let out = backfill.wait_with_output().expect("backfill ends");
        backfilling.store(false, Ordering::SeqCst);
        out
    });
    let backfill_stdout = String::from_utf8_lossy(&backfill_out.stdout).into_owned();
    assert!(
        backfill_out.status.success(),
        "backfill failed:\n{backfill_stdout}\n{}",
        String::from_utf8_lossy(&backfill_out.stderr)
    );
    let results = results.into_inner().expect("results");
    let updates: usize = results.iter().map(|r| r.0.len()).sum();
    let retried: u64 = results.iter().map(|r| r.1).sum();
    let during: u64 = results.iter().map(|r| r.2).sum();
    let mut last: HashMap<String, String> = HashMap::new();
    for (written, _, _) in &results {
        for (id, value) in written {
            last.insert(id.clone(), value.clone());
        }
    }

    // Every row sealed, its values envelopes; no plain value under the
    // flag, no envelope without it.
    let columns = [
        "patient_first",
        "patient_last",
        "patient_dob",
        "ins_provider",
    ];
    let envelope = |c: &str| format!("SUBSTRING({c} FROM 1 FOR 2) = '\\xf101'::bytea");
    let sealed_plain = columns
        .iter()
        .map(|c| format!("({c} IS NOT NULL AND NOT {})", envelope(c)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let plain_sealed = columns
        .iter()
        .map(|c| format!("({c} IS NOT NULL AND {})", envelope(c)))
        .collect::<Vec<_>>()
        .join(" OR ");
    assert_eq!(
        count(
            &mut conn,
            &format!("SELECT COUNT(*) AS n FROM cases WHERE phi_encrypted AND ({sealed_plain})")
        ),
        0
    );
    assert_eq!(
        count(
            &mut conn,
            &format!(
                "SELECT COUNT(*) AS n FROM cases WHERE NOT phi_encrypted AND ({plain_sealed})"
            )
        ),
        0
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) AS n FROM cases WHERE NOT phi_encrypted"
        ),
        0,
        "{backfill_stdout}"
    );
    let total = count(&mut conn, "SELECT COUNT(*) AS n FROM cases");
    assert_eq!(total, i64::try_from(ROWS).expect("fits"));

    // Every row opens (and its blind indexes match) ...
    let verified = ok(&url, dir, &["verify"]);
    assert!(
        verified.contains("all pass") && !verified.contains("FAIL"),
        "{verified}"
    );

    // ... and every updated row holds the value written last.
    let store = Arc::new(
        phi::DieselKeyStore::<PgConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("key store"),
    );
    let kek =
        Arc::new(LocalKek::from_base64("local-1", common::MASTER_KEY_B64).expect("master key"));
    let keyring = Keyring::builder(store, kek).build().expect("keyring");
    for (id, value) in &last {
        let row: Stored = diesel::sql_query(
            "SELECT user_id, phi_encrypted, patient_last FROM cases WHERE case_id = $1",
        )
        .bind::<Text, _>(id)
        .get_result(&mut conn)
        .expect("updated row");
        assert!(row.phi_encrypted, "{id}");
        let opened: String = keyring
            .open(
                Encrypted::from_bytes(row.patient_last),
                &row.user_id,
                "cases.patient_last",
                id.as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(&opened, value, "{id} holds the value written last");
    }
    assert!(
        updates >= 300 && during > 0,
        "{updates} updates, {during} while the backfill ran"
    );
    eprintln!(
        "clinic races: {ROWS} rows backfilled in batches of 200 while {updates} `case update` processes ran \
         ({during} ended while the backfill ran, {retried} conflict(s) retried); {} distinct rows updated, \
         each holding its last value; {total} rows checked for flag/value agreement; verify: all pass; {:.1} s",
        last.len(),
        started.elapsed().as_secs_f64()
    );
}
