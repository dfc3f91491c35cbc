//! Application tables that hold sealed values, described at run time, and
//! the SQL the life-cycle jobs run on them.
//!
//! Every query reads the key version from the envelope header at a fixed
//! offset (bytes 3 to 6, SQL `SUBSTR(column, 3, 4)`), so counting and
//! finding values per key version never decrypts. Identifiers are checked
//! and quoted; values are bound.

use std::fmt;

use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Binary, Text};

use crate::connection::PhiConnection;
use crate::envelope::{MAGIC, VERSION_V1};
use crate::error::{BoxError, Error, Result};

/// The longest identifier accepted (MySQL's limit).
const MAX_IDENTIFIER_LEN: usize = 64;

/// One application table whose encrypted columns the life-cycle jobs work
/// on: re-seal moves its values to the owner's current key version,
/// retirement counts the values still under a version, shredding samples
/// them to verify they no longer open.
///
/// ```
/// use phi_types::lifecycle::ResealTable;
/// let cases = ResealTable::new("cases", "user_id")
///     .key_column("case_id")
///     .column("patient_last")
///     .column_with_scope("dob", "cases.date_of_birth");
/// assert_eq!(ResealTable::parse("cases:user_id:case_id:patient_last,dob@cases.date_of_birth")?, cases);
/// # Ok::<(), phi_types::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResealTable {
    /// The table (optionally `schema.table`).
    pub table: String,
    /// The text column holding each row's owner id.
    pub owner_column: String,
    /// The text column whose UTF-8 bytes are bound into each value as its
    /// row key, or `None` when the values were sealed without one.
    pub key_column: Option<String>,
    /// The encrypted (binary, nullable) columns.
    pub columns: Vec<ResealColumn>,
}

/// One encrypted column of a [`ResealTable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResealColumn {
    /// The column.
    pub column: String,
    /// The scope its values are bound to: `table.column` unless pinned.
    pub scope: String,
}

impl ResealTable {
    /// A table whose rows name their owner in `owner_column`, without a row
    /// key and without columns yet.
    pub fn new(table: impl Into<String>, owner_column: impl Into<String>) -> Self {
        ResealTable {
            table: table.into(),
            owner_column: owner_column.into(),
            key_column: None,
            columns: Vec::new(),
        }
    }

    /// The text column bound into every value as its row key.
    #[must_use]
    pub fn key_column(mut self, column: impl Into<String>) -> Self {
        self.key_column = Some(column.into());
        self
    }

    /// An encrypted column whose scope is `table.column`.
    #[must_use]
    pub fn column(self, column: impl Into<String>) -> Self {
        let column = column.into();
        let scope = format!("{}.{column}", self.table);
        self.column_with_scope(column, scope)
    }

    /// An encrypted column whose values are bound to a pinned `scope`.
    #[must_use]
    pub fn column_with_scope(
        mut self,
        column: impl Into<String>,
        scope: impl Into<String>,
    ) -> Self {
        self.columns.push(ResealColumn {
            column: column.into(),
            scope: scope.into(),
        });
        self
    }

    /// Parses `table:owner_column:key_column:col1,col2@scope,...`: the key
    /// column may be empty (no row key); a column's scope is `table.column`
    /// unless given after `@`.
    ///
    /// # Errors
    /// [`Error::Config`] for a malformed description or an identifier that
    /// is not plain (letters, digits, `_`; a table may be `schema.table`).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Config(format!(
                "table description {spec:?}: {why} (expected table:owner_column:key_column:col1,col2@scope)"
            ))
        };
        let parts: Vec<&str> = spec.trim().split(':').collect();
        let [table, owner, key, columns] = parts[..] else {
            return Err(bad("four ':'-separated fields are needed"));
        };
        let mut out = ResealTable::new(table.trim(), owner.trim());
        if !key.trim().is_empty() {
            out = out.key_column(key.trim());
        }
        for column in columns.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            out = match column.split_once('@') {
                Some((column, scope)) => out.column_with_scope(column.trim(), scope.trim()),
                None => out.column(column),
            };
        }
        if out.columns.is_empty() {
            return Err(bad("no encrypted column is named"));
        }
        out.validate()?;
        Ok(out)
    }

    /// Checks every identifier.
    pub(crate) fn validate(&self) -> Result<()> {
        check_identifier("table", &self.table, true)?;
        check_identifier("owner column", &self.owner_column, false)?;
        if let Some(key) = &self.key_column {
            check_identifier("key column", key, false)?;
        }
        if self.columns.is_empty() {
            return Err(Error::Config(format!(
                "table {} names no encrypted column",
                self.table
            )));
        }
        for c in &self.columns {
            check_identifier("column", &c.column, false)?;
            if c.scope.is_empty() {
                return Err(Error::Config(format!(
                    "column {}.{} has an empty scope",
                    self.table, c.column
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for ResealTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:",
            self.table,
            self.owner_column,
            self.key_column.as_deref().unwrap_or("")
        )?;
        for (i, c) in self.columns.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if c.scope == format!("{}.{}", self.table, c.column) {
                f.write_str(&c.column)?;
            } else {
                write!(f, "{}@{}", c.column, c.scope)?;
            }
        }
        Ok(())
    }
}

fn check_identifier(what: &str, name: &str, dotted: bool) -> Result<()> {
    let parts: Vec<&str> = if dotted {
        name.splitn(2, '.').collect()
    } else {
        vec![name]
    };
    let plain = |p: &str| {
        !p.is_empty()
            && p.len() <= MAX_IDENTIFIER_LEN
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    };
    if parts.iter().all(|p| plain(p)) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} {name:?} is not a plain SQL identifier (letters, digits and _, at most {MAX_IDENTIFIER_LEN})"
        )))
    }
}

/// One value read for re-sealing or sampling: its row key's bytes and its
/// stored bytes.
pub(crate) struct StoredValue {
    /// The row key column's text, when the table has one.
    pub(crate) row_key: Option<String>,
    pub(crate) bytes: Vec<u8>,
}

impl StoredValue {
    /// The row key's bytes as bound into the value (empty without one).
    pub(crate) fn row(&self) -> &[u8] {
        self.row_key.as_deref().map_or(&[], str::as_bytes)
    }
}

/// What one re-seal batch did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BatchOutcome {
    /// Values read.
    pub(crate) read: u64,
    /// Rows written back under the current version (a value copied to two
    /// rows of a table without a row key updates both).
    pub(crate) updated: u64,
    /// Values changed by someone else between read and write: left alone.
    pub(crate) conflicts: u64,
}

/// Turns a value's old bytes into its new bytes (open, then seal).
pub(crate) type Reseal<'a> = dyn FnMut(&StoredValue) -> Result<Vec<u8>> + 'a;

/// A connection to the application's database that the life-cycle jobs can
/// run on: `SqliteConnection`, `MysqlConnection` or `PgConnection`, each
/// behind its backend's cargo feature. Its methods are internal.
#[allow(private_interfaces)]
pub trait DataConnection: PhiConnection {
    /// Values of `owner` in `column` per key version: `(version, count)`.
    #[doc(hidden)]
    fn key_versions_in_use(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owner: &str,
    ) -> Result<Vec<(u32, u64)>>;

    /// Re-seals up to `limit` values of `owner` in `column` whose key
    /// version is below `current`, in one transaction, each `UPDATE`
    /// guarded by the bytes read.
    #[doc(hidden)]
    fn reseal_batch(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owner: &str,
        current: u32,
        limit: usize,
        reseal: &mut Reseal<'_>,
    ) -> Result<BatchOutcome>;

    /// Up to `limit` non-NULL values of `owner` in `column`.
    #[doc(hidden)]
    fn sample_values(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<StoredValue>>;
}

#[derive(QueryableByName)]
struct VersionCount {
    #[diesel(sql_type = Binary)]
    version: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct KeyedValue {
    #[diesel(sql_type = Text)]
    row_key: String,
    #[diesel(sql_type = Binary)]
    value: Vec<u8>,
}

#[derive(QueryableByName)]
struct PlainValue {
    #[diesel(sql_type = Binary)]
    value: Vec<u8>,
}

/// The envelope v1 prefix: magic and format version.
const PREFIX: [u8; 2] = [MAGIC, VERSION_V1];

/// How one backend writes placeholders and quotes identifiers.
#[derive(Clone, Copy)]
struct Dialect {
    numbered: bool,
    quote: char,
    lock: &'static str,
}

impl Dialect {
    fn ident(self, name: &str) -> String {
        name.split('.')
            .map(|p| format!("{q}{p}{q}", q = self.quote))
            .collect::<Vec<_>>()
            .join(".")
    }

    fn p(self, n: usize) -> String {
        if self.numbered {
            format!("${n}")
        } else {
            "?".to_owned()
        }
    }

    /// `WHERE` clause selecting `owner`'s envelope values in `column`
    /// (placeholders 1 and 2: owner, prefix).
    fn owned_envelopes(self, t: &ResealTable, column: &str) -> String {
        let c = self.ident(column);
        format!(
            "{owner} = {p1} AND {c} IS NOT NULL AND SUBSTR({c}, 1, 2) = {p2}",
            owner = self.ident(&t.owner_column),
            p1 = self.p(1),
            p2 = self.p(2),
        )
    }

    fn select_values(self, t: &ResealTable, column: &str, extra: &str, limit: usize) -> String {
        let key = match &t.key_column {
            Some(k) => format!("{} AS row_key, ", self.ident(k)),
            None => String::new(),
        };
        let order = match &t.key_column {
            Some(k) => format!(" ORDER BY {}", self.ident(k)),
            None => String::new(),
        };
        format!(
            "SELECT {key}{c} AS value FROM {table} WHERE {w}{extra}{order} LIMIT {limit}",
            c = self.ident(column),
            table = self.ident(&t.table),
            w = self.owned_envelopes(t, column),
        )
    }
}

fn data_error(
    operation: &'static str,
    t: &ResealTable,
    c: &ResealColumn,
    owner: &str,
    e: impl Into<BoxError>,
) -> Error {
    Error::DataTable {
        operation,
        table: t.table.clone(),
        column: c.column.clone(),
        owner: owner.to_owned(),
        source: e.into(),
    }
}

/// A failure inside a re-seal transaction: the database's, or phi's.
enum TxError {
    Db(DieselError),
    Phi(Error),
}

impl From<DieselError> for TxError {
    fn from(e: DieselError) -> Self {
        TxError::Db(e)
    }
}

macro_rules! data_connection {
    ($($feature:literal => $conn:ty, $transaction:ident, $dialect:expr);* $(;)?) => {$(
        #[cfg(feature = $feature)]
        #[allow(private_interfaces)]
        impl DataConnection for $conn {
            fn key_versions_in_use(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owner: &str,
            ) -> Result<Vec<(u32, u64)>> {
                table.validate()?;
                let d: Dialect = $dialect;
                let c = d.ident(&column.column);
                let sql = format!(
                    "SELECT SUBSTR({c}, 3, 4) AS version, COUNT(*) AS n FROM {table} WHERE {w} GROUP BY SUBSTR({c}, 3, 4)",
                    table = d.ident(&table.table),
                    w = d.owned_envelopes(table, &column.column),
                );
                let rows: Vec<VersionCount> = diesel::sql_query(sql)
                    .bind::<Text, _>(owner)
                    .bind::<Binary, _>(&PREFIX[..])
                    .load(self)
                    .map_err(|e| data_error("counting values per key version", table, column, owner, e))?;
                let mut counts: Vec<(u32, u64)> = rows
                    .into_iter()
                    .filter_map(|r| {
                        let v: [u8; 4] = r.version.as_slice().try_into().ok()?;
                        Some((u32::from_be_bytes(v), u64::try_from(r.n).unwrap_or(0)))
                    })
                    .collect();
                counts.sort_unstable();
                Ok(counts)
            }

            fn reseal_batch(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owner: &str,
                current: u32,
                limit: usize,
                reseal: &mut Reseal<'_>,
            ) -> Result<BatchOutcome> {
                table.validate()?;
                let d: Dialect = $dialect;
                let c = d.ident(&column.column);
                // Big-endian versions compare as bytes in numeric order, so
                // `< current` finds older versions and never touches a newer
                // one written meanwhile.
                let select = d.select_values(
                    table,
                    &column.column,
                    &format!(" AND SUBSTR({c}, 3, 4) < {}", d.p(3)),
                    limit,
                ) + d.lock;
                let mut update = format!(
                    "UPDATE {t} SET {c} = {p1} WHERE {o} = {p2} AND {c} = {p3}",
                    t = d.ident(&table.table),
                    o = d.ident(&table.owner_column),
                    p1 = d.p(1),
                    p2 = d.p(2),
                    p3 = d.p(3),
                );
                if let Some(k) = &table.key_column {
                    update += &format!(" AND {} = {}", d.ident(k), d.p(4));
                }
                let current_bytes = current.to_be_bytes();
                let outcome = self.$transaction(|conn| -> std::result::Result<BatchOutcome, TxError> {
                    let base = diesel::sql_query(select.as_str())
                        .bind::<Text, _>(owner)
                        .bind::<Binary, _>(&PREFIX[..])
                        .bind::<Binary, _>(&current_bytes[..]);
                    let values: Vec<StoredValue> = if table.key_column.is_some() {
                        base.load::<KeyedValue>(conn)?
                            .into_iter()
                            .map(|r| StoredValue { row_key: Some(r.row_key), bytes: r.value })
                            .collect()
                    } else {
                        base.load::<PlainValue>(conn)?
                            .into_iter()
                            .map(|r| StoredValue { row_key: None, bytes: r.value })
                            .collect()
                    };
                    let mut outcome = BatchOutcome { read: values.len() as u64, ..BatchOutcome::default() };
                    // A value copied to several rows (no row key) is updated
                    // in all of them by its first UPDATE.
                    let mut done = std::collections::HashSet::new();
                    for value in &values {
                        if !done.insert((value.row_key.as_deref(), value.bytes.as_slice())) {
                            continue;
                        }
                        let new = reseal(value).map_err(TxError::Phi)?;
                        let query = diesel::sql_query(update.as_str())
                            .bind::<Binary, _>(&new)
                            .bind::<Text, _>(owner)
                            .bind::<Binary, _>(&value.bytes);
                        let n = match &value.row_key {
                            Some(key) => query.bind::<Text, _>(key).execute(conn)?,
                            None => query.execute(conn)?,
                        };
                        outcome.updated += n as u64;
                        if n == 0 {
                            outcome.conflicts += 1;
                        }
                    }
                    Ok(outcome)
                });
                match outcome {
                    Ok(outcome) => Ok(outcome),
                    Err(TxError::Phi(e)) => Err(e),
                    Err(TxError::Db(e)) => Err(data_error("re-sealing a batch", table, column, owner, e)),
                }
            }

            fn sample_values(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owner: &str,
                limit: usize,
            ) -> Result<Vec<StoredValue>> {
                table.validate()?;
                let d: Dialect = $dialect;
                let sql = d.select_values(table, &column.column, "", limit);
                let base = diesel::sql_query(sql)
                    .bind::<Text, _>(owner)
                    .bind::<Binary, _>(&PREFIX[..]);
                let fail = |e| data_error("sampling values", table, column, owner, e);
                Ok(if table.key_column.is_some() {
                    base.load::<KeyedValue>(self)
                        .map_err(fail)?
                        .into_iter()
                        .map(|r| StoredValue { row_key: Some(r.row_key), bytes: r.value })
                        .collect()
                } else {
                    base.load::<PlainValue>(self)
                        .map_err(fail)?
                        .into_iter()
                        .map(|r| StoredValue { row_key: None, bytes: r.value })
                        .collect()
                })
            }
        }
    )*};
}

data_connection! {
    "sqlite" => diesel::SqliteConnection, immediate_transaction,
        Dialect { numbered: false, quote: '"', lock: "" };
    "mysql" => diesel::MysqlConnection, transaction,
        Dialect { numbered: false, quote: '`', lock: " FOR UPDATE" };
    "postgres" => diesel::PgConnection, transaction,
        Dialect { numbered: true, quote: '"', lock: " FOR UPDATE" };
}
