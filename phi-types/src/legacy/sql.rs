//! The database's own guard (a sealed row's encrypted values are
//! envelopes), and the SQL that records legacy values before phi's writers
//! run.

use std::fmt;

use crate::error::{Error, Result};
use crate::lifecycle::tables::{Migratable, StoredColumn, StoredTable, check_identifier};

/// The SQL dialect of [`sealed_check`].
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// MySQL ≥ 8.0.16 and MariaDB ≥ 10.2.1 (CHECK constraints enforced; see
    /// [`adopt::check_constraints_enforced`](crate::adopt::check_constraints_enforced)).
    Mysql,
    /// PostgreSQL.
    Postgres,
    /// SQLite: triggers, since SQLite cannot add a CHECK constraint to an
    /// existing table.
    Sqlite,
}

/// The statements of [`sealed_check`]: `up` adds the guard, `down` removes
/// it. Each is one statement per line-separated entry.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedCheck {
    /// The constraint's (or the triggers' common) name.
    pub name: String,
    /// The condition a row must meet, as an SQL expression on its columns.
    pub condition: String,
    /// The statements that add the guard.
    pub up: Vec<String>,
    /// The statements that remove it.
    pub down: Vec<String>,
}

impl fmt::Display for SealedCheck {
    /// The `up` statements, each ending with `;`, one per line, as a
    /// migration's `up.sql` holds them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for statement in &self.up {
            writeln!(f, "{statement};")?;
        }
        Ok(())
    }
}

/// The SQL that makes the database refuse, from any client, a row of `M`'s
/// table whose encrypted flag is on while one of its encrypted columns
/// holds something other than an envelope v1 (bytes `F1 01` first) or
/// NULL. Rows whose flag is off are not constrained: run it once the
/// backfill has sealed every row, with the table made strict in phi
/// ([`Keyring::set_strict`](crate::Keyring::set_strict)), which refuses
/// those.
///
/// - PostgreSQL: `ALTER TABLE … ADD CONSTRAINT phi_sealed_<table> CHECK (…)`
///   with `substring(col from 1 for 2) = '\xf101'::bytea`. Adding it scans
///   the table under an `ACCESS EXCLUSIVE` lock (add it `NOT VALID` and
///   `VALIDATE CONSTRAINT` later to shorten the lock, if the table is large).
/// - MySQL ≥ 8.0.16, MariaDB ≥ 10.2: the same constraint with
///   `LEFT(col, 2) = X'F101'`; the `ALTER TABLE` copies the table.
/// - SQLite: a `BEFORE INSERT` and a `BEFORE UPDATE` trigger that abort
///   with `substr(col, 1, 2) = X'F101'` as the condition (SQLite adds
///   CHECK constraints only when a table is created:
///   [`SealedCheck::condition`] is the expression for that).
///
/// The statements are meant for a schema migration (`up.sql`, `down.sql`).
/// Every identifier in them is quoted.
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use phi_types::legacy::{self, Dialect};
/// use phi_types::PhiRecord;
///
/// diesel::table! {
///     cases (case_id) {
///         case_id -> Text,
///         user_id -> Text,
///         patient_last -> Binary,
///         phi_encrypted -> Bool,
///     }
/// }
///
/// #[derive(PhiRecord)]
/// #[phi(table = cases)]
/// #[diesel(primary_key(case_id))]
/// struct Case {
///     #[phi(row_key)]
///     case_id: String,
///     #[phi(owner)]
///     user_id: String,
///     #[phi(encrypt)]
///     patient_last: String,
///     #[phi(encrypted_flag)]
///     phi_encrypted: bool,
/// }
///
/// let check = legacy::sealed_check::<Case>(Dialect::Postgres)?;
/// assert_eq!(
///     check.up,
///     [r#"ALTER TABLE "cases" ADD CONSTRAINT "phi_sealed_cases" CHECK (NOT "phi_encrypted" OR "#.to_owned()
///         + r#"("patient_last" IS NULL OR substring("patient_last" from 1 for 2) = '\xf101'::bytea))"#]
/// );
/// assert_eq!(check.down, [r#"ALTER TABLE "cases" DROP CONSTRAINT "phi_sealed_cases""#]);
/// # Ok(())
/// # }
/// # #[cfg(not(feature = "sqlite"))]
/// # fn main() {}
/// ```
///
/// # Errors
/// [`Error::Config`] when an identifier is not plain, or the name would be
/// longer than 63 characters.
pub fn sealed_check<M: Migratable>(dialect: Dialect) -> Result<SealedCheck> {
    table_check(&M::stored_table(), dialect)
}

pub(crate) fn table_check(t: &StoredTable, dialect: Dialect) -> Result<SealedCheck> {
    check_identifier("table", t.table, true)?;
    check_identifier("encrypted flag column", t.flag_column, false)?;
    for c in &t.columns {
        check_identifier("column", c.column, false)?;
    }
    let bare = t.table.rsplit('.').next().unwrap_or(t.table);
    let name = format!("phi_sealed_{bare}");
    if name.len() > 63 - "_update".len() {
        return Err(Error::Config(format!(
            "{}: the guard's name {name:?} is too long for every backend",
            t.table
        )));
    }
    let q = |name: &str| quoted(dialect, name);
    let envelope = |column: &str| is_envelope(dialect, column);
    let values = |prefix: &str| -> String {
        t.columns
            .iter()
            .map(|c| {
                let column = format!("{prefix}{}", q(c.column));
                format!("({column} IS NULL OR {})", envelope(&column))
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let flag_off = |prefix: &str| -> String {
        let flag = format!("{prefix}{}", q(t.flag_column));
        if t.flag_is_bool && dialect == Dialect::Postgres {
            format!("NOT {flag}")
        } else {
            format!("{flag} = 0")
        }
    };
    let condition = format!("{} OR {}", flag_off(""), values(""));
    let table = q(t.table);
    let constraint = q(&name);
    let (up, down) = match dialect {
        Dialect::Postgres | Dialect::Mysql => (
            vec![format!(
                "ALTER TABLE {table} ADD CONSTRAINT {constraint} CHECK ({condition})"
            )],
            // MariaDB ≥ 10.2 and MySQL ≥ 8.0.19 (MySQL 8.0.16 to 8.0.18:
            // `DROP CHECK`).
            vec![format!("ALTER TABLE {table} DROP CONSTRAINT {constraint}")],
        ),
        Dialect::Sqlite => {
            let refused = format!("NOT ({} OR {})", flag_off("NEW."), values("NEW."));
            let message = format!(
                "{}: a sealed row (flag {} on) must hold envelopes (F1 01) in its encrypted columns",
                t.table, t.flag_column
            );
            let trigger_name = |suffix: &str| q(&format!("{name}_{suffix}"));
            let trigger = |event: &str, suffix: &str| {
                format!(
                    "CREATE TRIGGER {} BEFORE {event} ON {table} FOR EACH ROW WHEN {refused} \
                     BEGIN SELECT RAISE(ABORT, '{message}'); END",
                    trigger_name(suffix)
                )
            };
            (
                vec![trigger("INSERT", "insert"), trigger("UPDATE", "update")],
                vec![
                    format!("DROP TRIGGER {}", trigger_name("insert")),
                    format!("DROP TRIGGER {}", trigger_name("update")),
                ],
            )
        }
    };
    Ok(SealedCheck {
        name,
        condition,
        up,
        down,
    })
}

/// The condition "`column` (an SQL expression) starts with an envelope v1's
/// bytes `F1 01`".
pub(crate) fn is_envelope(dialect: Dialect, column: &str) -> String {
    match dialect {
        Dialect::Postgres => format!("substring({column} from 1 for 2) = '\\xf101'::bytea"),
        Dialect::Mysql => format!("LEFT({column}, 2) = X'F101'"),
        Dialect::Sqlite => format!("substr({column}, 1, 2) = X'F101'"),
    }
}

/// `name` quoted as an identifier of `dialect` (`"name"` on PostgreSQL and
/// SQLite, `` `name` `` on MySQL), each part of a `schema.table` name on
/// its own, the quote character doubled inside. Quoted, a name is taken
/// as it is spelled: a reserved word or (PostgreSQL) a name with capitals
/// names the column or index the catalog reported, not another one.
pub(crate) fn quoted(dialect: Dialect, name: &str) -> String {
    let quote = if dialect == Dialect::Mysql { '`' } else { '"' };
    name.split('.')
        .map(|part| {
            let mut s = String::with_capacity(part.len() + 2);
            s.push(quote);
            for c in part.chars() {
                if c == quote {
                    s.push(quote);
                }
                s.push(c);
            }
            s.push(quote);
            s
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// `phi_legacy_values` (see the [module](super) documentation) as phi's
/// migration `2026-12-07-000003_legacy_values` creates it, per backend;
/// `IF NOT EXISTS`, so that the generated adoption migrations can create
/// it too in an application database that phi's key tables are not in.
pub(crate) fn legacy_values_ddl(dialect: Dialect) -> String {
    let ddl = match dialect {
        Dialect::Postgres => {
            "CREATE TABLE IF NOT EXISTS phi_legacy_values (table_name VARCHAR(128) NOT NULL, \
             column_name VARCHAR(64) NOT NULL, row_key VARCHAR(255) NOT NULL, owner_id VARCHAR(255) NOT NULL, \
             stored BYTEA NOT NULL, recorded_at TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'UTC'), \
             PRIMARY KEY (table_name, column_name, row_key))"
        }
        Dialect::Mysql => {
            "CREATE TABLE IF NOT EXISTS phi_legacy_values (table_name VARCHAR(128) NOT NULL, \
             column_name VARCHAR(64) NOT NULL, row_key VARCHAR(255) NOT NULL, owner_id VARCHAR(255) NOT NULL, \
             stored LONGBLOB NOT NULL, recorded_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
             PRIMARY KEY (table_name, column_name, row_key)) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        }
        Dialect::Sqlite => {
            "CREATE TABLE IF NOT EXISTS phi_legacy_values (table_name VARCHAR(128) NOT NULL, \
             column_name VARCHAR(64) NOT NULL, row_key VARCHAR(255) NOT NULL, owner_id VARCHAR(255) NOT NULL, \
             stored BLOB NOT NULL, recorded_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
             PRIMARY KEY (table_name, column_name, row_key))"
        }
    };
    // With the process's table prefix, if any.
    crate::table_names::prefixed_sql(ddl)
}

/// The SQL that records, in `phi_legacy_values`, every value of `M`'s
/// table whose stored bytes have the shape of a legacy format phi ships
/// (`gAAAAA…`: Fernet; `v…:…:…`: versioned AES-GCM), with its table,
/// column, row key and owner: the statements the generated `in_place` and
/// `shadow` migrations ([`adopt`](crate::adopt)) end with, for an
/// application that writes its adoption migration itself. Run them before
/// any phi writer is deployed, and never again after (see the
/// [module](super) documentation): only values recorded so are ever
/// decoded by the backfill.
///
/// The patterns are broad (case-insensitive on SQLite): a record of a
/// value that is not a legacy token costs nothing but the copy, deleted
/// with its row's backfill. A format of the application's own is recorded
/// by [`migrate::record_legacy`](crate::migrate::record_legacy).
///
/// The first statement creates the table if it does not exist; each
/// record is inserted unless its (table, column, row key) already has one.
/// A value of a column sealed in place is recorded as the column holds it
/// (run it after the column became binary); a column with a shadow column
/// keeps its own type and is recorded as its text's UTF-8 bytes, as the
/// backfill reads it.
///
/// # Errors
/// [`Error::Config`] when an identifier is not plain.
pub fn record_sql<M: Migratable>(dialect: Dialect) -> Result<Vec<String>> {
    // A model with a shadow keeps its plain column's type (text); without
    // one, the column holds bytes.
    table_record_sql(&M::stored_table(), dialect, &|c| c.shadow.is_some())
}

/// The statements recording `t`'s legacy values; `text(c)` says whether
/// `c`'s plain column is a text (or other non-binary) column when they run.
pub(crate) fn table_record_sql(
    t: &StoredTable,
    dialect: Dialect,
    text: &dyn Fn(&StoredColumn) -> bool,
) -> Result<Vec<String>> {
    check_identifier("table", t.table, true)?;
    check_identifier("owner column", t.owner_column, false)?;
    check_identifier("key column", t.key_column, false)?;
    let as_text = |column: &str, integer: bool| -> String {
        match (integer, dialect) {
            (false, _) => column.to_owned(),
            (true, Dialect::Mysql) => format!("CAST({column} AS CHAR)"),
            (true, _) => format!("CAST({column} AS TEXT)"),
        }
    };
    let key = as_text(t.key_column, t.key_type.is_some_and(|k| k.is_integer()));
    let owner = as_text(t.owner_column, t.owner_type.is_some_and(|k| k.is_integer()));
    let mut out = vec![legacy_values_ddl(dialect)];
    for c in &t.columns {
        check_identifier("column", c.column, false)?;
        let column = c.column;
        let value = match (dialect, text(c)) {
            (Dialect::Postgres, true) => format!("convert_to(CAST({column} AS TEXT), 'UTF8')"),
            (Dialect::Postgres, false) => column.to_owned(),
            (Dialect::Mysql, _) => format!("CAST({column} AS BINARY)"),
            (Dialect::Sqlite, _) => format!("CAST({column} AS BLOB)"),
        };
        let conflict = match dialect {
            Dialect::Mysql => " ON DUPLICATE KEY UPDATE recorded_at = recorded_at",
            _ => " ON CONFLICT DO NOTHING",
        };
        out.push(format!(
            "INSERT INTO {legacy} (table_name, column_name, row_key, owner_id, stored) \
             SELECT '{table}', '{column}', {key}, {owner}, {value} FROM {table} \
             WHERE {column} IS NOT NULL AND ({value} LIKE 'gAAAAA%' OR {value} LIKE 'v%:%:%'){conflict}",
            legacy = crate::schema::phi_legacy_values::sql_name(),
            table = t.table,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table the generated migrations create is phi's migration's.
    #[test]
    fn the_recording_creates_the_table_phis_migration_creates() {
        for (dialect, up) in [
            (
                Dialect::Postgres,
                include_str!("../../migrations/postgres/2026-12-07-000003_legacy_values/up.sql"),
            ),
            (
                Dialect::Mysql,
                include_str!("../../migrations/mysql/2026-12-07-000003_legacy_values/up.sql"),
            ),
            (
                Dialect::Sqlite,
                include_str!("../../migrations/sqlite/2026-12-07-000003_legacy_values/up.sql"),
            ),
        ] {
            let statement: String = up
                .lines()
                .filter(|l| !l.starts_with("--"))
                .collect::<Vec<_>>()
                .join(" ");
            assert_eq!(
                statement.trim().trim_end_matches(';'),
                legacy_values_ddl(dialect),
                "{dialect:?}"
            );
        }
    }
}
