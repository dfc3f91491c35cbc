//! The schema migrations `phi_types::adopt` generates, applied to a legacy
//! table with data on every backend enabled by cargo features (SQLite, a
//! file per test; MariaDB and PostgreSQL on the servers named by
//! `PHI_TEST_MYSQL_URL` / `PHI_TEST_POSTGRES_URL`, each test with tables of
//! its own). Each migration is applied with `batch_execute`, the table read
//! back from the catalog, and the data checked byte for byte.

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::NaiveDate;
use diesel::connection::SimpleConnection as _;
use diesel::prelude::*;
use diesel::sql_types::{Binary, Date, Nullable, Text};
use phi::adopt::{self, Options, SchemaConnection, Strategy, TableSchema};
use phi::blind::Normalize;
use phi::legacy::Dialect;
use phi::migrate::{StoredColumn, StoredTable, canonical};

/// A table name of its own for each test and process.
fn unique_table(tag: &str) -> &'static str {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "sg_{tag}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    Box::leak(name.into_boxed_str())
}

/// The model of the legacy table: three encrypted columns, a blind index
/// on `last_name`; with `shadow`, every column in the dual-write phase.
fn model(table: &'static str, shadow: bool) -> StoredTable {
    let column = |column: &'static str, shadow_name: &'static str| StoredColumn {
        column,
        scope: column,
        shadow: shadow.then_some(shadow_name),
        blind_index: None,
        derived: &[],
        lookup_index: None,
        canonical: canonical::<String>,
    };
    let mut last = column("last_name", "last_name_encrypted");
    last.blind_index = Some(("last_name_bidx", Normalize::TRIM_LOWERCASE));
    StoredTable {
        table,
        owner_column: "owner_id",
        owner_type: Some(Default::default()),
        key_column: "id",
        key_type: Some(Default::default()),
        flag_column: "phi_encrypted",
        flag_is_bool: true,
        columns: vec![
            last,
            column("email", "email_encrypted"),
            column("dob", "dob_encrypted"),
            column("note", "note_encrypted"),
        ],
        compounds: Vec::new(),
    }
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Plain {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    last_name: String,
    #[diesel(sql_type = Nullable<Text>)]
    email: Option<String>,
    #[diesel(sql_type = Nullable<Date>)]
    dob: Option<NaiveDate>,
    #[diesel(sql_type = Nullable<Text>)]
    note: Option<String>,
}

#[derive(QueryableByName, Debug, PartialEq)]
struct Bytes {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Binary)]
    last_name: Vec<u8>,
    #[diesel(sql_type = Nullable<Binary>)]
    email: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Binary>)]
    dob: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Binary>)]
    note: Option<Vec<u8>>,
}

fn legacy_rows() -> Vec<Plain> {
    vec![
        Plain {
            id: "r1".into(),
            last_name: "Doe-Smith Zoë".into(),
            email: Some("zoe@example.org".into()),
            dob: NaiveDate::from_ymd_opt(1980, 1, 15),
            note: Some("allergic to penicillin".into()),
        },
        Plain {
            id: "r2".into(),
            last_name: "Roe".into(),
            email: None,
            dob: None,
            note: None,
        },
    ]
}

fn legacy_bytes() -> Vec<Bytes> {
    legacy_rows()
        .into_iter()
        .map(|p| Bytes {
            id: p.id,
            last_name: p.last_name.into_bytes(),
            email: p.email.map(String::into_bytes),
            dob: p.dob.map(|d| d.format("%Y-%m-%d").to_string().into_bytes()),
            note: p.note.map(String::into_bytes),
        })
        .collect()
}

/// An envelope-looking value (magic, version, key version 1, then bytes).
fn envelope(tag: u8) -> Vec<u8> {
    let mut v = vec![0xF1, 0x01, 0, 0, 0, 1];
    v.extend([tag; 40]);
    v
}

fn hex_literal(d: Dialect, bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match d {
        Dialect::Postgres => format!("decode('{hex}', 'hex')"),
        _ => format!("X'{hex}'"),
    }
}

macro_rules! suite {
    ($name:ident, $feature:literal, $conn:ty, $url:expr) => {
        #[cfg(feature = $feature)]
        mod $name {
            use super::*;
            type Conn = $conn;
            fn url() -> Option<String> {
                $url
            }
            include!("schema_gen/suite.rs");
        }
    };
}

suite!(sqlite, "sqlite", diesel::SqliteConnection, None);
suite!(
    mysql,
    "mysql",
    diesel::MysqlConnection,
    Some(
        std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
    )
);
suite!(
    postgres,
    "postgres",
    diesel::PgConnection,
    Some(
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    )
);
