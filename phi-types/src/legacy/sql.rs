//! The database's own guard: a sealed row's encrypted values are envelopes.

use std::fmt;

use crate::error::{Error, Result};
use crate::lifecycle::tables::{Migratable, StoredTable, check_identifier};

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
