//! phi's embedded migrations on SQLite.
#![cfg(feature = "sqlite")]

use std::sync::Barrier;

use diesel::prelude::*;
use diesel::sql_types::Text;

#[derive(QueryableByName)]
struct Table {
    #[diesel(sql_type = Text)]
    name: String,
}

fn tables(conn: &mut SqliteConnection) -> Vec<String> {
    diesel::sql_query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .load::<Table>(conn)
        .expect("tables")
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// phi's migrations on SQLite.
const MIGRATIONS: usize = 3;

#[test]
fn migrations_create_the_key_tables_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("m.db").display().to_string();
    let mut conn = SqliteConnection::establish(&url).expect("connect");
    // The key tables, the KEK check values, then the key-event feed.
    assert_eq!(
        phi_types::migrations::run_pending(&mut conn).expect("migrate"),
        MIGRATIONS
    );
    assert_eq!(
        phi_types::migrations::run_pending(&mut conn).expect("again"),
        0
    );
    let tables = tables(&mut conn);
    for table in [
        "encryption_key_audit",
        "kek_check_values",
        "phi_key_events",
        "phi_key_feed",
        "phi_rollout",
        "phi_rollout_owners",
        "user_encryption_keys",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
}

#[test]
fn processes_starting_together_all_find_the_tables_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("m.db").display().to_string();
    let barrier = Barrier::new(4);
    let applied: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut conn = SqliteConnection::establish(&url).expect("connect");
                    barrier.wait();
                    phi_types::migrations::run_pending(&mut conn).expect("every starter succeeds")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    assert_eq!(applied, MIGRATIONS, "each migration ran exactly once");
}
