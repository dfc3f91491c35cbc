//! The access log writer's throughput: records appended as fast as the
//! application would hand them over, written by `DieselAccessLog`'s thread
//! in chained batches, until `flush` returns.
//!
//! ```sh
//! PHI_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/bench \
//!   cargo bench -p phi-benches --features postgres --bench access_log
//! ```
//!
//! `PHI_BENCH_RECORDS` records (default 200,000), each one read of one row
//! by one of 50 users over 1,000 owners, appended 100 at a time (a list
//! page), on a chain of its own; the queue holds them all, so nothing is
//! dropped. Printed: records per second from the first append to the end
//! of `flush`, for each batch size. Results: `benches/README.md`.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use diesel::PgConnection;
use phi::access::{AccessLog as _, AccessOp, AccessRecord, Accessor};
use phi::access_log::{DieselAccessLog, DieselAccessLogStore};
use phi::{DieselKeyStore, Keyring, LocalKek};

fn main() {
    let url = std::env::var("PHI_BENCH_POSTGRES_URL")
        .or_else(|_| std::env::var("PHI_TEST_POSTGRES_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let records: usize = std::env::var("PHI_BENCH_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200_000);
    let store = Arc::new(
        DieselKeyStore::<PgConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("key store"),
    );
    // The integration tests' KEK, so that the bench can share their
    // database (the chain key's reserved owner is one per database).
    let kek = Arc::new(
        LocalKek::from_base64("local-test", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
            .expect("master key"),
    );
    let keyring = Keyring::builder(store, kek).build().expect("keyring");
    let tables = Arc::new(
        DieselAccessLogStore::<PgConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("tables"),
    );
    let users: Vec<Accessor> = (0..50)
        .map(|u| {
            Accessor::new(format!("user-{u}"), "treatment").with_request_id(format!("req-{u}"))
        })
        .collect();
    let at = chrono::Utc::now().naive_utc();
    let all: Vec<AccessRecord> = (0..records)
        .map(|i| AccessRecord {
            occurred_at: at,
            accessor: users[i % users.len()].clone(),
            op: AccessOp::Read,
            owner_id: format!("provider-{}", i % 1_000),
            table: "cases".into(),
            row: Some(format!("case-{i}")),
            fields: vec![
                "patient_last".into(),
                "diagnosis".into(),
                "ins_provider".into(),
            ],
        })
        .collect();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    for batch in [1_000usize, 5_000] {
        let log = DieselAccessLog::builder(tables.clone())
            .chain(format!("bench-{stamp}-{batch}"))
            .queue(records)
            .batch(batch)
            .start(&keyring)
            .expect("log");
        let pages: Vec<Vec<AccessRecord>> = all.chunks(100).map(<[AccessRecord]>::to_vec).collect();
        let start = Instant::now();
        for page in pages {
            log.append(page).expect("append");
        }
        let appended = start.elapsed();
        log.flush().expect("flush");
        let elapsed = start.elapsed();
        let counts = log.counts();
        assert_eq!(counts.written, records as u64);
        assert_eq!(counts.dropped, 0);
        #[allow(clippy::cast_precision_loss)]
        let rate = records as f64 / elapsed.as_secs_f64();
        println!(
            "access_log/postgres batch {batch:>5}: {records} records written in {:.2} s = {rate:.0} records/s \
             (appending took {:.1} ms)",
            elapsed.as_secs_f64(),
            appended.as_secs_f64() * 1e3
        );
    }
}
