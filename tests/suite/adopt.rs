// Adopting phi end to end with the generated schema migrations: a legacy
// table with data and indexes goes through each strategy, with the
// application writing (inserts and guarded updates) between the steps, and
// what the application reads is the same at every step. Included in
// `tests/suite/mod.rs`, so `Conn`, `BLOB`, `server_url()` and `TestDb` are
// in scope. Each test owns its table.

use std::collections::BTreeMap;

use diesel::connection::SimpleConnection as _;
use phi::adopt::{self, Options, SchemaConnection, Strategy};
use phi::migrate::{self, MigrateOptions, VerifyOptions};
use phi::{PhiRecord, Rollout, Updated};
use sha2::{Digest, Sha256};

/// What the application sees of a case: (owner, first, last, dob, insurer).
type Seen = (String, String, String, NaiveDate, Option<String>);

/// The legacy table, before phi.
mod before {
    diesel::table! {
        phi_it_adopt_shadow (id) {
            id -> Varchar,
            owner_id -> Varchar,
            first_name -> Varchar,
            last_name -> Varchar,
            dob -> Date,
            insurer -> Nullable<Varchar>,
        }
    }
    diesel::table! {
        phi_it_adopt_inplace (id) {
            id -> Varchar,
            owner_id -> Varchar,
            first_name -> Varchar,
            last_name -> Varchar,
            dob -> Date,
            insurer -> Nullable<Varchar>,
        }
    }
}

/// The dual-write phase of the shadow strategy.
mod dual {
    use super::*;

    diesel::table! {
        phi_it_adopt_shadow (id) {
            id -> Varchar,
            owner_id -> Varchar,
            first_name -> Varchar,
            first_name_encrypted -> Nullable<Binary>,
            last_name -> Varchar,
            last_name_encrypted -> Nullable<Binary>,
            dob -> Date,
            dob_encrypted -> Nullable<Binary>,
            insurer -> Nullable<Varchar>,
            insurer_encrypted -> Nullable<Binary>,
            last_name_bidx -> Nullable<Binary>,
            phi_encrypted -> Bool,
        }
    }

    #[derive(phi::PhiRecord, Clone, PartialEq)]
    #[phi(table = phi_it_adopt_shadow, crate = phi, debug)]
    #[diesel(primary_key(id))]
    pub(super) struct Case {
        #[phi(row_key)]
        pub(super) id: String,
        #[phi(owner)]
        pub(super) owner_id: String,
        #[phi(encrypt, shadow)]
        pub(super) first_name: String,
        #[phi(encrypt, shadow, blind_index = last_name_bidx, normalize = "trim,lowercase")]
        pub(super) last_name: String,
        #[phi(encrypt, shadow)]
        pub(super) dob: NaiveDate,
        #[phi(encrypt, shadow)]
        pub(super) insurer: Option<String>,
        #[phi(encrypted_flag)]
        pub(super) phi_encrypted: bool,
    }
}

/// The table once its PHI columns hold envelopes: after `finalize` (shadow
/// strategy) or the in-place migration.
macro_rules! sealed_model {
    ($module:ident, $table:ident) => {
        mod $module {
            use super::*;

            diesel::table! {
                $table (id) {
                    id -> Varchar,
                    owner_id -> Varchar,
                    first_name -> Binary,
                    last_name -> Binary,
                    dob -> Binary,
                    insurer -> Nullable<Binary>,
                    last_name_bidx -> Nullable<Binary>,
                    phi_encrypted -> Bool,
                }
            }

            #[derive(phi::PhiRecord, Clone, PartialEq)]
            #[phi(table = $table, crate = phi, debug)]
            #[diesel(primary_key(id))]
            pub(super) struct Case {
                #[phi(row_key)]
                pub(super) id: String,
                #[phi(owner)]
                pub(super) owner_id: String,
                #[phi(encrypt)]
                pub(super) first_name: String,
                #[phi(encrypt, blind_index = last_name_bidx, normalize = "trim,lowercase")]
                pub(super) last_name: String,
                #[phi(encrypt)]
                pub(super) dob: NaiveDate,
                #[phi(encrypt)]
                pub(super) insurer: Option<String>,
                #[phi(encrypted_flag)]
                pub(super) phi_encrypted: bool,
            }
        }
    };
}
sealed_model!(finalized, phi_it_adopt_shadow);
sealed_model!(in_place, phi_it_adopt_inplace);

const ADOPT_LAST: [&str; 5] = ["Okonkwo", "Quispe", "Lindahl", "García", "O'Brien"];

fn adopt_seen(i: u32) -> Seen {
    (
        format!("dr-{}", i % 3),
        format!("First{i}"),
        ADOPT_LAST[(i % 5) as usize].to_owned(),
        NaiveDate::from_ymd_opt(1950 + i.cast_signed() % 50, 1 + i % 12, 1 + i % 28).expect("date"),
        (!i.is_multiple_of(4)).then(|| format!("Insurer {}", i % 3)),
    )
}

/// Creates the legacy table (plain columns, an index on an encrypted
/// column, a DATE, a nullable column) with 30 rows written by raw SQL.
fn adopt_legacy(conn: &mut Conn, table: &str) -> BTreeMap<String, Seen> {
    conn.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (id VARCHAR(64) NOT NULL PRIMARY KEY, owner_id VARCHAR(64) NOT NULL, \
         first_name VARCHAR(100) NOT NULL, last_name VARCHAR(100) NOT NULL, dob DATE NOT NULL, \
         insurer VARCHAR(100) NULL); \
         CREATE INDEX {table}_last ON {table} (owner_id, last_name)"
    ))
    .expect("legacy table");
    let mut expected = BTreeMap::new();
    for i in 1..=30 {
        let seen = adopt_seen(i);
        let id = format!("A-{i:03}");
        let quote = |s: &str| s.replace('\'', "''");
        conn.batch_execute(&format!(
            "INSERT INTO {table} (id, owner_id, first_name, last_name, dob, insurer) VALUES \
             ('{id}', '{}', '{}', '{}', '{}', {})",
            seen.0,
            seen.1,
            quote(&seen.2),
            seen.3,
            seen.4
                .as_deref()
                .map_or("NULL".to_owned(), |v| format!("'{v}'")),
        ))
        .expect("legacy row");
        expected.insert(id, seen);
    }
    expected
}

/// The digest of what the application reads.
fn adopt_digest(rows: impl IntoIterator<Item = (String, Seen)>) -> String {
    let mut hash = Sha256::new();
    for (id, (owner, first, last, dob, insurer)) in rows {
        hash.update(format!("{id}|{owner}|{first}|{last}|{dob}|{insurer:?}\n"));
    }
    hex::encode(hash.finalize())
}

/// The plain columns as the legacy application reads them.
macro_rules! read_before {
    ($name:ident, $table:ident) => {
        fn $name(conn: &mut Conn) -> BTreeMap<String, Seen> {
            use before::$table::dsl::*;
            $table
                .select((id, owner_id, first_name, last_name, dob, insurer))
                .load::<(String, String, String, String, NaiveDate, Option<String>)>(conn)
                .expect("legacy read")
                .into_iter()
                .map(|(k, o, f, l, d, i)| (k, (o, f, l, d, i)))
                .collect()
        }
    };
}
read_before!(read_before_shadow, phi_it_adopt_shadow);
read_before!(read_before_inplace, phi_it_adopt_inplace);

macro_rules! read_model {
    ($name:ident, $module:ident, $table:ident) => {
        fn $name(conn: &mut Conn, keyring: &Keyring) -> BTreeMap<String, Seen> {
            $module::Case::load($module::$table::table, conn, keyring)
                .expect("model read")
                .into_iter()
                .map(|c| {
                    (
                        c.id,
                        (c.owner_id, c.first_name, c.last_name, c.dob, c.insurer),
                    )
                })
                .collect()
        }
    };
}
read_model!(read_dual, dual, phi_it_adopt_shadow);
read_model!(read_finalized, finalized, phi_it_adopt_shadow);
read_model!(read_in_place, in_place, phi_it_adopt_inplace);

/// A migration refused by its guard: the error names the guard's reason
/// (PostgreSQL raises it; MySQL and SQLite name the failed CHECK after it).
fn refused(result: diesel::QueryResult<()>, reason: &str) {
    let err = result
        .expect_err("the migration's guard refuses")
        .to_string();
    let words = |s: &str| {
        s.replace(|c: char| !c.is_ascii_alphanumeric(), " ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(
        words(&err).contains(&words(reason)),
        "refused for another reason: {err}"
    );
}

fn apply(conn: &mut Conn, sql: &str, what: &str) {
    conn.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{what} fails: {e}\n{sql}"));
}

/// Asserts what the application reads and returns its digest.
fn same(read: BTreeMap<String, Seen>, expected: &BTreeMap<String, Seen>, step: &str) -> String {
    assert_eq!(
        &read, expected,
        "{step}: the application reads what was written"
    );
    adopt_digest(read)
}

macro_rules! new_case {
    ($module:ident, $id:expr, $i:expr) => {{
        let (owner_id, first_name, last_name, dob, insurer) = adopt_seen($i);
        $module::Case {
            id: $id.to_owned(),
            owner_id,
            first_name,
            last_name,
            dob,
            insurer,
            phi_encrypted: false,
        }
    }};
}

#[test]
fn the_shadow_strategy_from_a_legacy_table_to_finalize_and_back() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let mut expected = adopt_legacy(&mut conn, "phi_it_adopt_shadow");
    let digest0 = same(read_before_shadow(&mut conn), &expected, "legacy");
    let keyring = db.keyring();

    // 1. The shadow migration: the plain columns stay, shadows are added.
    let shadow =
        adopt::migration::<dual::Case, Conn>(&mut conn, Strategy::Shadow, &Options::default())
            .expect("shadow migration");
    apply(&mut conn, &shadow.up, "shadow up");
    assert_eq!(
        same(read_dual(&mut conn, &keyring), &expected, "shadow up"),
        digest0
    );
    assert_eq!(
        read_before_shadow(&mut conn),
        expected,
        "the legacy build still reads the table"
    );

    // 2. Dual writes: an owner outside the roll-out, then everyone.
    keyring.set_rollout(Rollout::Nobody);
    let plain_new = new_case!(dual, "N-001", 101);
    diesel::insert_into(dual::phi_it_adopt_shadow::table)
        .values(plain_new.seal(&keyring).expect("seal"))
        .execute(&mut conn)
        .expect("insert");
    keyring.set_rollout(Rollout::All);
    let sealed_new = new_case!(dual, "N-002", 102);
    diesel::insert_into(dual::phi_it_adopt_shadow::table)
        .values(sealed_new.seal(&keyring).expect("seal"))
        .execute(&mut conn)
        .expect("insert");
    let mut edited = read_dual_case(&mut conn, &keyring, "A-007");
    let old = edited.clone();
    edited.last_name = "Haddad".into();
    edited.insurer = None;
    assert_eq!(
        edited
            .update(&old, &keyring, &mut conn)
            .expect("guarded update"),
        Updated::Applied { sealed: true }
    );
    for c in [&plain_new, &sealed_new, &edited] {
        expected.insert(
            c.id.clone(),
            (
                c.owner_id.clone(),
                c.first_name.clone(),
                c.last_name.clone(),
                c.dob,
                c.insurer.clone(),
            ),
        );
    }
    let digest1 = same(read_dual(&mut conn, &keyring), &expected, "dual writes");
    assert_eq!(
        read_before_shadow(&mut conn),
        expected,
        "the plain columns are written too"
    );

    // Finalize is refused while rows are unsealed: by the command (verify)
    // and by the migration's own guard, which changes nothing.
    let early =
        adopt::migration::<dual::Case, Conn>(&mut conn, Strategy::Finalize, &Options::default())
            .expect("finalize migration");
    refused(
        conn.batch_execute(&early.up),
        "rows are not sealed, run backfill and verify first",
    );
    assert_eq!(
        read_before_shadow(&mut conn),
        expected,
        "a refused finalize changes nothing"
    );

    // 3. Backfill into the shadows, with an application write between
    // batches; verify compares each shadow with its plain column.
    // A-002 is in the first batch: read and locked by it, then changed
    // (and sealed) by the guarded update before the batch writes it.
    let mut between = Some(read_dual_case(&mut conn, &keyring, "A-002"));
    let mut written = None;
    let report = migrate::migrate_interleaved::<dual::Case, Conn>(
        &mut conn,
        &keyring,
        &MigrateOptions::default().batch(8),
        true,
        &mut |conn: &mut Conn| {
            if let Some(old) = between.take() {
                let mut new = old.clone();
                new.first_name = "Renamed".into();
                assert!(matches!(
                    new.update(&old, &keyring, conn).expect("guarded update"),
                    Updated::Applied { .. }
                ));
                written = Some(new);
            }
            Ok(())
        },
    )
    .expect("backfill");
    assert_eq!(report.remaining, 0, "{report}");
    assert_eq!(
        report.skipped, 1,
        "the row the application sealed meanwhile is left alone: {report}"
    );
    let new = written.expect("the application wrote between batches");
    expected.insert(
        new.id.clone(),
        (
            new.owner_id.clone(),
            new.first_name.clone(),
            new.last_name.clone(),
            new.dob,
            new.insurer.clone(),
        ),
    );
    let digest2 = same(read_dual(&mut conn, &keyring), &expected, "backfill");
    assert_eq!(
        read_before_shadow(&mut conn),
        expected,
        "backfill leaves the plain columns"
    );
    let checked = migrate::verify::<dual::Case, Conn>(&mut conn, &keyring, &VerifyOptions::default())
        .expect("verify");
    assert!(checked.is_ok() && checked.unsealed_total == 0, "{checked}");
    assert_ne!(digest1, digest2, "the write between batches changed a name");

    // 4. Finalize: no plain column is left; the sealed build reads the same.
    let finalize =
        adopt::migration::<dual::Case, Conn>(&mut conn, Strategy::Finalize, &Options::default())
            .expect("finalize migration");
    apply(&mut conn, &finalize.up, "finalize up");
    let schema = conn.introspect("phi_it_adopt_shadow").expect("introspect");
    for column in ["first_name", "last_name", "dob", "insurer"] {
        let info = schema.column(column).expect(column);
        let ty = info.sql_type.to_ascii_lowercase();
        assert!(
            ty.contains("bytea") || ty.contains("blob") || ty.contains("binary"),
            "{column} holds envelopes after finalize: {ty}"
        );
        assert!(
            schema.column(&format!("{column}_encrypted")).is_none(),
            "the shadow of {column} is renamed"
        );
    }
    assert!(
        schema
            .indexes
            .iter()
            .all(|i| i.name != "phi_it_adopt_shadow_last"),
        "the plain index is gone: {:?}",
        schema.indexes
    );
    assert_eq!(
        same(read_finalized(&mut conn, &keyring), &expected, "finalize"),
        digest2
    );
    // The sealed build writes as any in-place model.
    let after = new_case!(finalized, "N-003", 103);
    diesel::insert_into(finalized::phi_it_adopt_shadow::table)
        .values(after.seal(&keyring).expect("seal"))
        .execute(&mut conn)
        .expect("insert after finalize");
    let mut renamed = finalized::Case::load(
        finalized::phi_it_adopt_shadow::table.find("A-011".to_owned()),
        &mut conn,
        &keyring,
    )
    .expect("read")
    .pop()
    .expect("row");
    let old = renamed.clone();
    renamed.last_name = "Nwosu".into();
    assert_eq!(
        renamed
            .update(&old, &keyring, &mut conn)
            .expect("guarded update"),
        Updated::Applied { sealed: true }
    );
    for c in [&after, &renamed] {
        expected.insert(
            c.id.clone(),
            (
                c.owner_id.clone(),
                c.first_name.clone(),
                c.last_name.clone(),
                c.dob,
                c.insurer.clone(),
            ),
        );
    }
    let digest3 = same(
        read_finalized(&mut conn, &keyring),
        &expected,
        "writes after finalize",
    );

    // 5. Back: finalize's down brings the plain columns back (empty),
    // decrypt-back refills them, the shadow's down drops the shadows.
    // Until decrypt-back has refilled them, the plain columns are NULL:
    // verify says so for every row, and the dual-write build cannot read
    // the table (a documented window of the rollback).
    apply(&mut conn, &finalize.down, "finalize down");
    let emptied = migrate::verify::<dual::Case, Conn>(&mut conn, &keyring, &VerifyOptions::default())
        .expect("verify");
    assert_eq!(emptied.failed, expected.len() as u64, "{emptied}");
    refused(
        conn.batch_execute(&shadow.down),
        "shadows hold the only copy, run decrypt-back first",
    );
    keyring.set_rollout(Rollout::Nobody);
    let back = migrate::decrypt_back::<dual::Case, Conn>(
        &mut conn,
        &keyring,
        &MigrateOptions::default().batch(8),
    )
    .expect("decrypt-back");
    assert_eq!(back.remaining, 0, "{back}");
    assert_eq!(
        same(read_dual(&mut conn, &keyring), &expected, "decrypt-back"),
        digest3
    );
    let restored = migrate::verify::<dual::Case, Conn>(&mut conn, &keyring, &VerifyOptions::default())
        .expect("verify");
    assert!(restored.is_ok(), "{restored}");
    apply(&mut conn, &shadow.down, "shadow down");
    assert_eq!(
        same(read_before_shadow(&mut conn), &expected, "shadow down"),
        digest3
    );
}

fn read_dual_case(conn: &mut Conn, keyring: &Keyring, key: &str) -> dual::Case {
    dual::Case::load(
        dual::phi_it_adopt_shadow::table.find(key.to_owned()),
        conn,
        keyring,
    )
    .expect("read")
    .pop()
    .expect("row")
}

#[test]
fn the_in_place_strategy_from_a_legacy_table_to_sealed_and_back() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let mut expected = adopt_legacy(&mut conn, "phi_it_adopt_inplace");
    let digest0 = same(read_before_inplace(&mut conn), &expected, "legacy");
    let keyring = db.keyring();

    let migration =
        adopt::migration::<in_place::Case, Conn>(&mut conn, Strategy::InPlace, &Options::default())
            .expect("in-place migration");
    apply(&mut conn, &migration.up, "in-place up");
    assert_eq!(
        same(read_in_place(&mut conn, &keyring), &expected, "in-place up"),
        digest0
    );

    // Writes outside and inside the roll-out, and a guarded update.
    keyring.set_rollout(Rollout::Nobody);
    let plain_new = new_case!(in_place, "N-001", 101);
    diesel::insert_into(in_place::phi_it_adopt_inplace::table)
        .values(plain_new.seal(&keyring).expect("seal"))
        .execute(&mut conn)
        .expect("insert");
    keyring.set_rollout(Rollout::All);
    let mut edited = in_place::Case::load(
        in_place::phi_it_adopt_inplace::table.find("A-004".to_owned()),
        &mut conn,
        &keyring,
    )
    .expect("read")
    .pop()
    .expect("row");
    let old = edited.clone();
    edited.dob = NaiveDate::from_ymd_opt(1961, 2, 3).expect("date");
    assert_eq!(
        edited
            .update(&old, &keyring, &mut conn)
            .expect("guarded update"),
        Updated::Applied { sealed: true }
    );
    for c in [&plain_new, &edited] {
        expected.insert(
            c.id.clone(),
            (
                c.owner_id.clone(),
                c.first_name.clone(),
                c.last_name.clone(),
                c.dob,
                c.insurer.clone(),
            ),
        );
    }
    let digest1 = same(read_in_place(&mut conn, &keyring), &expected, "writes");

    let report = migrate::backfill::<in_place::Case, Conn>(
        &mut conn,
        &keyring,
        &MigrateOptions::default().batch(8),
    )
    .expect("backfill");
    assert_eq!(report.remaining, 0, "{report}");
    assert_eq!(
        same(read_in_place(&mut conn, &keyring), &expected, "backfill"),
        digest1
    );
    let checked = migrate::verify::<in_place::Case, Conn>(&mut conn, &keyring, &VerifyOptions::default())
        .expect("verify");
    assert!(checked.is_ok() && checked.unsealed_total == 0, "{checked}");

    // The down migration refuses while rows are sealed, and changes nothing.
    refused(
        conn.batch_execute(&migration.down),
        "rows are sealed, run decrypt-back first",
    );
    assert_eq!(
        same(
            read_in_place(&mut conn, &keyring),
            &expected,
            "refused down"
        ),
        digest1
    );

    keyring.set_rollout(Rollout::Nobody);
    migrate::decrypt_back::<in_place::Case, Conn>(
        &mut conn,
        &keyring,
        &MigrateOptions::default().batch(8),
    )
    .expect("decrypt-back");
    apply(&mut conn, &migration.down, "in-place down");
    assert_eq!(
        same(read_before_inplace(&mut conn), &expected, "in-place down"),
        digest1
    );
}

// `finalize` cannot lose a plain value: no row written while it runs, and
// no row whose flag is NULL, loses its only copy to the drop. The tables
// below are described to phi directly (no derive): the migrations only
// need the description.

use diesel::sql_types::{BigInt, Nullable as NullableSql, Text as TextSql};
use phi::legacy::Dialect;
use phi::migrate::{StoredColumn, StoredTable, canonical};

const LATE: &str = "a late plain value";

/// A dual-write table: `last_name` (NOT NULL) and `note` (nullable), each
/// with its shadow, and a flag column of the application's own that takes
/// NULL.
fn finalize_model(table: &'static str) -> StoredTable {
    let column = |column: &'static str, shadow: &'static str| StoredColumn {
        column,
        scope: column,
        shadow: Some(shadow),
        blind_index: None,
        derived: &[],
        lookup_index: None,
        canonical: canonical::<String>,
    };
    StoredTable {
        table,
        owner_column: "owner_id",
        owner_type: Some(Default::default()),
        key_column: "id",
        key_type: Some(Default::default()),
        flag_column: "phi_encrypted",
        flag_is_bool: true,
        columns: vec![
            column("last_name", "last_name_encrypted"),
            column("note", "note_encrypted"),
        ],
        compounds: Vec::new(),
    }
}

fn dialect() -> Dialect {
    <Conn as SchemaConnection>::DIALECT
}

/// `bytes` as an SQL literal of this backend.
fn bytes_sql(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    match dialect() {
        Dialect::Postgres => format!("'\\x{hex}'::bytea"),
        _ => format!("X'{hex}'"),
    }
}

/// Creates `table` in the dual-write phase (the shadow migration applied)
/// with rows r1, r2, r3, every one sealed: plain values and envelope-like
/// shadows (`F1 01` first), flag on.
fn finalize_table(conn: &mut Conn, table: &'static str) {
    conn.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; \
         CREATE TABLE {table} (id VARCHAR(64) NOT NULL PRIMARY KEY, owner_id VARCHAR(64) NOT NULL, \
         last_name VARCHAR(100) NOT NULL, note VARCHAR(200) NULL, phi_encrypted BOOLEAN NULL); \
         CREATE INDEX {table}_last ON {table} (owner_id, last_name)"
    ))
    .expect("legacy table");
    let shadow = adopt::migration_for(
        &finalize_model(table),
        conn,
        Strategy::Shadow,
        &Options::default(),
    )
    .expect("shadow migration");
    apply(conn, &shadow.up, "shadow up");
    for (i, id) in (0u8..).zip(["r1", "r2", "r3"]) {
        conn.batch_execute(&format!(
            "INSERT INTO {table} (id, owner_id, last_name, note, last_name_encrypted, note_encrypted, \
             phi_encrypted) VALUES ('{id}', 'dr-{i}', 'Name {i}', 'Note {i}', {}, {}, TRUE)",
            bytes_sql(&[0xf1, 0x01, 1, i]),
            bytes_sql(&[0xf1, 0x01, 2, i]),
        ))
        .expect("sealed row");
    }
}

/// The statements of a generated migration, in order, as Diesel's runner
/// sends them (each ends with `;` and a blank line; a trigger's body is on
/// its statement's line).
fn migration_statements(sql: &str) -> Vec<String> {
    sql.split(";\n\n")
        .map(|s| {
            s.lines()
                .filter(|l| !l.starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .trim()
                .to_owned()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

#[derive(QueryableByName)]
struct SessionId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(QueryableByName)]
struct Waiting {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct NoteRow {
    #[diesel(sql_type = NullableSql<TextSql>)]
    note: Option<String>,
}

/// The server's id of `conn`'s session (0 on SQLite).
fn session_id(conn: &mut Conn) -> i64 {
    let query = match dialect() {
        Dialect::Postgres => "SELECT pg_backend_pid()::bigint AS id",
        Dialect::Mysql => "SELECT CAST(CONNECTION_ID() AS SIGNED) AS id",
        _ => return 0,
    };
    diesel::sql_query(query)
        .get_result::<SessionId>(conn)
        .expect("session id")
        .id
}

/// Whether the server reports session `id` waiting for a lock (never on
/// SQLite, whose writer below does not wait).
fn waiting_for_a_lock(observer: &mut Conn, id: i64) -> bool {
    let query = match dialect() {
        Dialect::Postgres => {
            format!("SELECT COUNT(*) AS n FROM pg_locks WHERE pid = {id} AND NOT granted")
        }
        Dialect::Mysql => format!(
            "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST WHERE ID = {id} AND \
             (STATE LIKE 'Waiting for%' OR ID IN (SELECT trx_mysql_thread_id FROM \
             information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'))"
        ),
        _ => return false,
    };
    diesel::sql_query(query)
        .get_result::<Waiting>(observer)
        .expect("lock waits")
        .n
        > 0
}

/// What became of the write made in the window.
enum Write {
    /// It finished before the migration went on.
    Done(Result<usize, String>),
    /// The server held it (a lock): it finishes once the migration ends.
    Waiting(std::thread::JoinHandle<Result<usize, String>>),
}

/// A flag-off write of r1 (a process outside the roll-out, a stale
/// follower, decrypt-back): the plain `note` changed, its shadow cleared.
/// Run on `writer` in a thread; returns once it has finished or the server
/// reports it waiting for a lock.
fn flag_off_write(table: &str, mut writer: Conn, observer: &mut Conn) -> Write {
    let id = session_id(&mut writer);
    let sql = format!(
        "UPDATE {table} SET phi_encrypted = FALSE, note = '{LATE}', note_encrypted = NULL WHERE id = 'r1'"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let result = diesel::sql_query(sql)
            .execute(&mut writer)
            .map_err(|e| e.to_string());
        let _ = tx.send(());
        result
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        // Wait for the write's result; between waits, ask the server
        // whether the write is held by a lock.
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(()) => return Write::Done(handle.join().expect("writer thread")),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("writer thread: {e}"),
        }
        if waiting_for_a_lock(observer, id) {
            return Write::Waiting(handle);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write neither finished nor waited for a lock"
        );
    }
}

/// r1's plain note, or `None` once the plain column is gone.
fn plain_note(conn: &mut Conn, table: &'static str) -> Option<Option<String>> {
    conn.introspect(table)
        .expect("introspect")
        .column("note_encrypted")?;
    Some(
        diesel::sql_query(format!("SELECT note FROM {table} WHERE id = 'r1'"))
            .get_result::<NoteRow>(conn)
            .expect("r1")
            .note,
    )
}

#[test]
fn a_flag_off_write_while_finalize_runs_is_refused_or_waited_for_never_lost() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let mut observer = db.conn();
    let table = "phi_it_finalize_window";
    finalize_table(&mut conn, table);
    let m = adopt::migration_for(
        &finalize_model(table),
        &mut conn,
        Strategy::Finalize,
        &Options::default(),
    )
    .expect("finalize migration");
    let statements = migration_statements(&m.up);
    // The window: after the guard, before the first statement that drops
    // a plain index or column.
    let window = statements
        .iter()
        .position(|s| s.starts_with("ALTER TABLE") || s.starts_with("DROP INDEX"))
        .expect("a statement changing the table");
    // The write is made before each statement in turn (the window among
    // them), on a table set up afresh each time; the statements run one by
    // one in one transaction, as Diesel's migration runner runs up.sql.
    for point in 0..statements.len() {
        if point > 0 {
            finalize_table(&mut conn, table);
        }
        let mut writer = Some(db.conn());
        if let Some(writer) = &mut writer
            && dialect() == Dialect::Sqlite
        {
            // Refused at once rather than waiting on the busy handler.
            writer
                .batch_execute("PRAGMA busy_timeout = 0")
                .expect("busy timeout");
        }
        let mut write = None;
        let finalized = conn.transaction::<_, diesel::result::Error, _>(|conn| {
            for (i, statement) in statements.iter().enumerate() {
                if let Some(writer) = writer.take_if(|_| i == point) {
                    write = Some(flag_off_write(table, writer, &mut observer));
                }
                conn.batch_execute(statement)?;
            }
            Ok(())
        });
        let (waited, written) = match write.expect("the write was made") {
            Write::Done(result) => (false, result),
            Write::Waiting(handle) => (true, handle.join().expect("writer thread")),
        };
        let at = format!("write before statement {point} ({})", statements[point]);
        let note = plain_note(&mut conn, table);
        match (&written, &note) {
            (Ok(_), Some(plain)) => assert_eq!(
                plain.as_deref(),
                Some(LATE),
                "{at}: the write was accepted and its value must be readable"
            ),
            (Ok(_), None) => panic!(
                "{at}: the flag-off write was accepted, then finalize dropped its only copy \
                 (finalize: {finalized:?})"
            ),
            (Err(_), _) => {}
        }
        if note.is_some() {
            assert!(
                finalized.is_err(),
                "{at}: finalize succeeded but left the plain columns"
            );
        }
        if point == window {
            assert!(
                finalized.is_ok(),
                "{at}: the table was sealed, finalize goes on: {finalized:?}"
            );
            let refusal = written.expect_err("the write in the window is refused");
            match dialect() {
                Dialect::Postgres => {
                    assert!(waited, "{at}: the write waits for the lock: {refusal}");
                }
                Dialect::Mysql => assert!(
                    refusal.contains(table) && refusal.contains("finalize is running"),
                    "{at}: the trigger refuses, naming the table: {refusal}"
                ),
                _ => assert!(refusal.contains("locked"), "{at}: {refusal}"),
            }
        }
    }
}

#[test]
fn finalize_refuses_a_row_whose_flag_is_null() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let table = "phi_it_finalize_null_flag";
    finalize_table(&mut conn, table);
    // An application write that set the flag to NULL and changed the plain
    // value after it was sealed: its sealed copy is stale.
    conn.batch_execute(&format!(
        "UPDATE {table} SET phi_encrypted = NULL, note = '{LATE}' WHERE id = 'r2'"
    ))
    .expect("NULL flag");
    let m = adopt::migration_for(
        &finalize_model(table),
        &mut conn,
        Strategy::Finalize,
        &Options::default(),
    )
    .expect("finalize migration");
    refused(
        conn.batch_execute(&m.up),
        "rows are not sealed, run backfill and verify first",
    );
    let note = diesel::sql_query(format!("SELECT note FROM {table} WHERE id = 'r2'"))
        .get_result::<NoteRow>(&mut conn)
        .expect("r2 keeps its plain column")
        .note;
    assert_eq!(note.as_deref(), Some(LATE), "a refused finalize changes nothing");
}

#[test]
fn finalize_runs_through_diesels_migration_runner_and_down_undoes_it() {
    use diesel_migrations::{FileBasedMigrations, MigrationHarness as _};
    use diesel::migration::MigrationSource as _;

    let db = TestDb::new();
    let mut conn = db.conn();
    let table = "phi_it_finalize_runner";
    finalize_table(&mut conn, table);
    let m = adopt::migration_for(
        &finalize_model(table),
        &mut conn,
        Strategy::Finalize,
        &Options::default(),
    )
    .expect("finalize migration");
    let dir = tempfile::tempdir().expect("directory");
    m.write(dir.path()).expect("written");
    let source = FileBasedMigrations::from_path(dir.path()).expect("migrations");
    let migrations = source.migrations().expect("read");
    let [migration] = migrations.as_slice() else {
        panic!("one migration");
    };
    // The whole up.sql in one batch, as `diesel migration run` does: on
    // MySQL/MariaDB that includes the triggers' BEGIN … END bodies.
    conn.run_migration(&**migration)
        .unwrap_or_else(|e| panic!("up.sql through the runner: {e}\n{}", m.up));
    let schema = conn.introspect(table).expect("introspect");
    assert!(schema.column("note_encrypted").is_none(), "finalized");
    if dialect() == Dialect::Mysql {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let triggers = diesel::sql_query(format!(
            "SELECT COUNT(*) AS n FROM information_schema.TRIGGERS \
             WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = '{table}'"
        ))
        .get_result::<Count>(&mut conn)
        .expect("triggers")
        .n;
        assert_eq!(triggers, 0, "up.sql drops the triggers it installs");
    }
    // The sealed table takes sealed writes.
    conn.batch_execute(&format!(
        "UPDATE {table} SET note = {} WHERE id = 'r1'",
        bytes_sql(&[0xf1, 0x01, 9])
    ))
    .expect("a sealed write after finalize");
    conn.revert_migration(&**migration)
        .unwrap_or_else(|e| panic!("down.sql through the runner: {e}\n{}", m.down));
    let schema = conn.introspect(table).expect("introspect");
    for c in ["last_name", "note", "last_name_encrypted", "note_encrypted"] {
        assert!(schema.column(c).is_some(), "{c} after down: {schema:#?}");
    }
}

#[test]
fn finalize_refuses_a_sealed_copy_that_is_not_an_envelope() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let table = "phi_it_finalize_not_envelope";
    finalize_table(&mut conn, table);
    conn.batch_execute(&format!(
        "UPDATE {table} SET last_name_encrypted = {} WHERE id = 'r3'",
        bytes_sql(b"Name 2")
    ))
    .expect("a shadow holding plain bytes");
    let m = adopt::migration_for(
        &finalize_model(table),
        &mut conn,
        Strategy::Finalize,
        &Options::default(),
    )
    .expect("finalize migration");
    refused(
        conn.batch_execute(&m.up),
        "rows are not sealed, run backfill and verify first",
    );
    finalize_values_readable(&mut conn, table, "a refused finalize");
}

#[derive(QueryableByName, Debug, PartialEq)]
struct PlainValues {
    #[diesel(sql_type = TextSql)]
    id: String,
    #[diesel(sql_type = TextSql)]
    last_name: String,
    #[diesel(sql_type = NullableSql<TextSql>)]
    note: Option<String>,
}

#[derive(QueryableByName, Debug, PartialEq)]
struct SealedValues {
    #[diesel(sql_type = TextSql)]
    id: String,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    last_name: Vec<u8>,
    #[diesel(sql_type = NullableSql<diesel::sql_types::Binary>)]
    note: Option<Vec<u8>>,
}

/// Every value of `finalize_table`'s rows is readable: in the plain
/// columns while the shadows are there, in the sealed columns once
/// finalize replaced them; a table between the two fails.
fn finalize_values_readable(conn: &mut Conn, table: &'static str, step: &str) {
    let schema = conn.introspect(table).expect("introspect");
    let shadows = ["last_name_encrypted", "note_encrypted"].map(|c| schema.column(c).is_some());
    let rows = || diesel::sql_query(format!("SELECT id, last_name, note FROM {table} ORDER BY id"));
    match shadows {
        [true, true] => {
            let read = rows()
                .load::<PlainValues>(conn)
                .unwrap_or_else(|e| panic!("{step}: the plain columns: {e}"));
            let expected: Vec<_> = (0..3)
                .map(|i| PlainValues {
                    id: format!("r{}", i + 1),
                    last_name: format!("Name {i}"),
                    note: Some(format!("Note {i}")),
                })
                .collect();
            assert_eq!(read, expected, "{step}: the plain values are all there");
        }
        [false, false] => {
            let read = rows()
                .load::<SealedValues>(conn)
                .unwrap_or_else(|e| panic!("{step}: the sealed columns: {e}"));
            let expected: Vec<_> = (0..3u8)
                .map(|i| SealedValues {
                    id: format!("r{}", i + 1),
                    last_name: vec![0xf1, 0x01, 1, i],
                    note: Some(vec![0xf1, 0x01, 2, i]),
                })
                .collect();
            assert_eq!(read, expected, "{step}: the sealed values are all there");
        }
        _ => panic!("{step}: the table is half finalized: {schema:#?}"),
    }
}

/// The triggers finalize installs on MySQL/MariaDB (0 elsewhere).
fn finalize_triggers(conn: &mut Conn, table: &str) -> i64 {
    if dialect() != Dialect::Mysql {
        return 0;
    }
    diesel::sql_query(format!(
        "SELECT COUNT(*) AS n FROM information_schema.TRIGGERS \
         WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = '{table}'"
    ))
    .get_result::<Waiting>(conn)
    .expect("triggers")
    .n
}

#[test]
fn finalize_stopped_after_any_statement_leaves_every_value_readable_and_its_recovery_works() {
    let db = TestDb::new();
    let mut conn = db.conn();
    let table = "phi_it_finalize_stopped";
    finalize_table(&mut conn, table);
    let m = adopt::migration_for(
        &finalize_model(table),
        &mut conn,
        Strategy::Finalize,
        &Options::default(),
    )
    .expect("finalize migration");
    let statements = migration_statements(&m.up);
    // The migration stops after `done` statements (the connection lost, the
    // process killed): its transaction is rolled back, which undoes nothing
    // on MySQL/MariaDB, where each DDL statement has committed.
    for done in 0..=statements.len() {
        if done > 0 {
            finalize_table(&mut conn, table);
        }
        let stopped = conn.transaction::<(), diesel::result::Error, _>(|conn| {
            for statement in &statements[..done] {
                conn.batch_execute(statement)?;
            }
            Err(diesel::result::Error::RollbackTransaction)
        });
        assert!(stopped.is_err());
        let step = format!("stopped after {done} statements");
        finalize_values_readable(&mut conn, table, &step);
        // The recovery the migration's comments give: run it again. Once
        // the table is finalized (MySQL/MariaDB, after its ALTER TABLE),
        // that drops the triggers left behind and fails at its first
        // check, changing nothing else.
        let finalized = conn
            .introspect(table)
            .expect("introspect")
            .column("note_encrypted")
            .is_none();
        let again = conn.batch_execute(&m.up);
        assert_eq!(
            again.is_err(),
            finalized,
            "{step}: running it again: {again:?}"
        );
        finalize_values_readable(&mut conn, table, &format!("{step}, then run again"));
        assert!(
            conn.introspect(table)
                .expect("introspect")
                .column("note_encrypted")
                .is_none(),
            "{step}: finalized after running it again"
        );
        assert_eq!(
            finalize_triggers(&mut conn, table),
            0,
            "{step}: no trigger left behind"
        );
    }
}
