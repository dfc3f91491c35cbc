//! Schema migrations for adopting phi on an existing table, generated from
//! the model and the table as the database describes it.
//!
//! [`migration`] reads the live table ([`SchemaConnection::introspect`]:
//! every column's declared type, nullability and default, every index and
//! unique constraint with the definition that recreates it) and writes the
//! Diesel migration (`up.sql`, `down.sql`) of one [`Strategy`]:
//!
//! - [`Strategy::InPlace`]: the encrypted columns become binary (their text
//!   kept byte for byte: PostgreSQL `convert_to(…, 'UTF8')`, MySQL
//!   `VARBINARY`/`BLOB`, SQLite unchanged), the encrypted flag and the
//!   blind- and lookup-index columns are added with their indexes, and the
//!   plain indexes on encrypted columns are dropped (an index on ciphertext
//!   is useless, a `UNIQUE` one wrong). `down.sql` refuses while a row is
//!   sealed (run `decrypt-back` first), then restores the table exactly.
//! - [`Strategy::Shadow`]: the dual-write phase: a nullable binary shadow
//!   column per encrypted column (`<column>_encrypted` unless the model
//!   names it), the flag and index columns; the plain columns untouched.
//! - [`Strategy::Finalize`]: the end of the dual-write phase: refuses while a
//!   row's flag is off, drops the plain columns and their indexes, renames
//!   each shadow to its column's name, restores `NOT NULL`, and adds the
//!   sealed check ([`legacy::sealed_check`](crate::legacy::sealed_check)).
//! - [`Strategy::Check`]: the sealed check alone, for a table sealed in
//!   place once its backfill is done.
//!
//! Every statement is preceded by a comment stating what it costs on that
//! backend (a table rewrite, the lock it holds). Read them before running a
//! migration on a large table.
//!
//! ```text
//! phi migration generate --model Case --strategy shadow --dir migrations
//! phi backfill --model Case           # seals into the shadow columns
//! phi finalize --model Case --dir migrations
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use diesel::prelude::*;
#[cfg(feature = "postgres")]
use diesel::sql_types::Bool;
#[cfg(feature = "sqlite")]
use diesel::sql_types::Integer;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
use diesel::sql_types::{Nullable, Text};

use crate::error::{Error, Result};
use crate::legacy::Dialect;
use crate::legacy::sql::{table_check, table_record_sql};
use crate::lifecycle::tables::{
    DataConnection, Migratable, StoredColumn, StoredTable, check_identifier,
};

/// The envelope v1 bytes around a value: header (18) and GCM tag (16).
pub const ENVELOPE_OVERHEAD: u64 = 34;

/// The longest identifier every backend takes (PostgreSQL's limit).
const MAX_NAME: usize = 63;

/// Which migration to generate (see the [module](self) documentation).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// The sealed check alone.
    Check,
    /// The end of the dual-write phase: plain columns dropped, shadows
    /// renamed to their names.
    Finalize,
    /// The encrypted columns converted to binary where they are.
    InPlace,
    /// Shadow columns added beside the plain ones (dual write).
    Shadow,
}

impl Strategy {
    /// The name in a migration's directory: `check`, `finalize`,
    /// `in_place`, `shadow`.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Check => "check",
            Strategy::Finalize => "finalize",
            Strategy::InPlace => "in_place",
            Strategy::Shadow => "shadow",
        }
    }
}

/// Options of [`generate`] and [`migration`].
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct Options {
    sealed_check: bool,
    lookup_columns: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sealed_check: true,
            lookup_columns: Vec::new(),
        }
    }
}

impl Options {
    /// Whether `finalize` adds the sealed check (default: yes).
    #[must_use]
    pub fn sealed_check(mut self, on: bool) -> Self {
        self.sealed_check = on;
        self
    }

    /// A lookup-index column to add (with an index) in the `in-place` and
    /// `shadow` migrations, as a [`LookupIndexed`](crate::lookup::LookupIndexed)
    /// model's [`lookup_columns`](crate::lookup::LookupIndexed::lookup_columns)
    /// name them.
    #[must_use]
    pub fn lookup_column(mut self, column: impl Into<String>) -> Self {
        self.lookup_columns.push(column.into());
        self
    }
}

/// A table as the database describes it.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    /// The table's name, as the model gives it.
    pub table: String,
    /// Its columns, in order.
    pub columns: Vec<ColumnInfo>,
    /// Its indexes and unique constraints, by name.
    pub indexes: Vec<IndexInfo>,
}

/// One column of a [`TableSchema`].
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Its name.
    pub name: String,
    /// Its declared type as the database spells it (`character
    /// varying(100)`, `varchar(100)`, `TEXT`).
    pub sql_type: String,
    /// Whether it takes NULL.
    pub nullable: bool,
    /// Its default, as an SQL expression.
    pub default: Option<String>,
    /// MySQL: the character set and collation of a text column.
    pub collation: Option<(String, String)>,
}

/// One index (or unique constraint) of a [`TableSchema`].
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexInfo {
    /// Its name.
    pub name: String,
    /// The columns it covers, in order (expressions left out).
    pub columns: Vec<String>,
    /// Expression parts, as SQL text (PostgreSQL and SQLite), if any.
    pub expressions: Option<String>,
    /// Whether it is unique.
    pub unique: bool,
    /// Whether it is the primary key.
    pub primary: bool,
    /// PostgreSQL: the definition of the constraint it backs
    /// (`UNIQUE (email)`), which recreates it.
    pub constraint: Option<String>,
    /// The statement that recreates it; `None` when no statement can (an
    /// SQLite index made by a `UNIQUE` clause of `CREATE TABLE`).
    pub definition: Option<String>,
}

impl TableSchema {
    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The indexes covering any of `columns` (as a column or inside an
    /// expression).
    pub fn indexes_on(&self, columns: &[&str]) -> Vec<&IndexInfo> {
        self.indexes
            .iter()
            .filter(|i| {
                columns.iter().any(|c| {
                    i.columns.iter().any(|x| x == c)
                        || i.expressions.as_deref().is_some_and(|e| mentions(e, c))
                })
            })
            .collect()
    }
}

/// Whether the SQL text `expr` names the identifier `word`.
fn mentions(expr: &str, word: &str) -> bool {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// A generated migration.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// The strategy it implements.
    pub strategy: Strategy,
    /// The table it changes.
    pub table: String,
    /// `up.sql`.
    pub up: String,
    /// `down.sql`.
    pub down: String,
}

impl Migration {
    /// The directory name Diesel orders migrations by:
    /// `<YYYY-MM-DD-HHMMSS>_phi_<strategy>_<table>`.
    pub fn directory_name(&self, at: chrono::DateTime<chrono::Utc>) -> String {
        format!(
            "{}_phi_{}_{}",
            at.format("%Y-%m-%d-%H%M%S"),
            self.strategy.name(),
            self.table.replace('.', "_")
        )
    }

    /// Writes `up.sql` and `down.sql` into a new directory of `dir` named
    /// by [`directory_name`](Self::directory_name) for now (or one second
    /// after the latest migration already in `dir`, so that Diesel runs it
    /// after that one), and returns it.
    ///
    /// # Errors
    /// [`Error::Config`] when the directory exists (nothing is overwritten)
    /// or cannot be written.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        // Diesel orders migrations, and records them as run, by the
        // version their name starts with: one generated in the same second
        // as the latest in `dir` (or a clock behind it) gets the next one.
        const VERSION: &str = "%Y-%m-%d-%H%M%S";
        let latest = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                chrono::NaiveDateTime::parse_from_str(name.get(..17)?, VERSION).ok()
            })
            .max();
        let mut at = chrono::Utc::now();
        if let Some(latest) = latest.map(|t| t.and_utc())
            && at.format(VERSION).to_string() <= latest.format(VERSION).to_string()
        {
            at = latest + chrono::Duration::seconds(1);
        }
        let path = dir.join(self.directory_name(at));
        let io = |what: &str, e: std::io::Error| {
            Error::Config(format!("{}: cannot {what}: {e}", path.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io("create the parent directory", e))?;
        std::fs::create_dir(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Config(format!(
                    "{}: the migration directory exists; nothing is overwritten",
                    path.display()
                ))
            } else {
                io("create the directory", e)
            }
        })?;
        std::fs::write(path.join("up.sql"), &self.up).map_err(|e| io("write up.sql", e))?;
        std::fs::write(path.join("down.sql"), &self.down).map_err(|e| io("write down.sql", e))?;
        Ok(path)
    }
}

/// A connection whose tables [`migration`] can read: `SqliteConnection`,
/// `MysqlConnection`, `PgConnection`.
pub trait SchemaConnection: DataConnection {
    /// The connection's SQL dialect.
    const DIALECT: Dialect;

    /// Reads `table` (optionally `schema.table`) from the database's
    /// catalog.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown table; [`Error::Database`] when a
    /// catalog query fails.
    fn introspect(&mut self, table: &'static str) -> Result<TableSchema>;
}

/// Introspects `M`'s table on `conn` and generates the migration of
/// `strategy` for `conn`'s backend.
///
/// # Errors
/// As [`SchemaConnection::introspect`] and [`generate`].
pub fn migration<M: Migratable, C: SchemaConnection>(
    conn: &mut C,
    strategy: Strategy,
    options: &Options,
) -> Result<Migration> {
    migration_for(&M::stored_table(), conn, strategy, options)
}

/// [`migration`] for a table description.
///
/// # Errors
/// As [`migration`].
pub fn migration_for<C: SchemaConnection>(
    table: &StoredTable,
    conn: &mut C,
    strategy: Strategy,
    options: &Options,
) -> Result<Migration> {
    let schema = conn.introspect(table.table)?;
    generate(table, &schema, C::DIALECT, strategy, options)
}

fn db_error(table: &'static str) -> impl Fn(diesel::result::Error) -> Error {
    move |source| Error::Database {
        operation: "reading the table's schema",
        table,
        source,
    }
}

fn split(table: &str) -> (Option<&str>, &str) {
    match table.split_once('.') {
        Some((schema, name)) => (Some(schema), name),
        None => (None, table),
    }
}

fn unknown(table: &str) -> Error {
    Error::Config(format!("table {table} does not exist (or has no columns)"))
}

#[cfg(feature = "postgres")]
impl SchemaConnection for diesel::PgConnection {
    const DIALECT: Dialect = Dialect::Postgres;

    fn introspect(&mut self, table: &'static str) -> Result<TableSchema> {
        #[derive(QueryableByName)]
        struct Col {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Text)]
            sql_type: String,
            #[diesel(sql_type = Bool)]
            not_null: bool,
            #[diesel(sql_type = Nullable<Text>)]
            default_expr: Option<String>,
        }
        #[derive(QueryableByName)]
        struct Idx {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Bool)]
            is_unique: bool,
            #[diesel(sql_type = Bool)]
            is_primary: bool,
            #[diesel(sql_type = Text)]
            definition: String,
            #[diesel(sql_type = Nullable<Text>)]
            constraint_def: Option<String>,
            #[diesel(sql_type = Text)]
            columns: String,
            #[diesel(sql_type = Nullable<Text>)]
            expressions: Option<String>,
        }
        check_identifier("table", table, true)?;
        let (schema, name) = split(table);
        let err = db_error(table);
        let cols: Vec<Col> = diesel::sql_query(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type, \
             a.attnotnull AS not_null, pg_get_expr(d.adbin, d.adrelid) AS default_expr \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE c.relname = $1 AND n.nspname = COALESCE($2, current_schema()) \
             AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
        )
        .bind::<Text, _>(name)
        .bind::<Nullable<Text>, _>(schema)
        .load(self)
        .map_err(&err)?;
        if cols.is_empty() {
            return Err(unknown(table));
        }
        let idx: Vec<Idx> = diesel::sql_query(
            "SELECT i.relname::text AS name, ix.indisunique AS is_unique, \
             ix.indisprimary AS is_primary, pg_get_indexdef(ix.indexrelid) AS definition, \
             (SELECT pg_get_constraintdef(con.oid) FROM pg_constraint con \
              WHERE con.conindid = ix.indexrelid AND con.conrelid = t.oid \
              AND con.contype IN ('p', 'u', 'x') LIMIT 1) AS constraint_def, \
             array_to_string(ARRAY(SELECT a.attname::text FROM unnest(ix.indkey::int2[]) \
              WITH ORDINALITY AS k(attnum, ord) JOIN pg_attribute a \
              ON a.attrelid = ix.indrelid AND a.attnum = k.attnum ORDER BY k.ord), ',') AS columns, \
             pg_get_expr(ix.indexprs, ix.indrelid) AS expressions \
             FROM pg_index ix JOIN pg_class i ON i.oid = ix.indexrelid \
             JOIN pg_class t ON t.oid = ix.indrelid \
             JOIN pg_namespace n ON n.oid = t.relnamespace \
             WHERE t.relname = $1 AND n.nspname = COALESCE($2, current_schema()) \
             ORDER BY i.relname",
        )
        .bind::<Text, _>(name)
        .bind::<Nullable<Text>, _>(schema)
        .load(self)
        .map_err(&err)?;
        Ok(TableSchema {
            table: table.to_owned(),
            columns: cols
                .into_iter()
                .map(|c| ColumnInfo {
                    name: c.name,
                    sql_type: c.sql_type,
                    nullable: !c.not_null,
                    default: c.default_expr,
                    collation: None,
                })
                .collect(),
            indexes: idx
                .into_iter()
                .map(|i| IndexInfo {
                    name: i.name,
                    columns: i
                        .columns
                        .split(',')
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned)
                        .collect(),
                    expressions: i.expressions,
                    unique: i.is_unique,
                    primary: i.is_primary,
                    constraint: i.constraint_def,
                    definition: Some(i.definition),
                })
                .collect(),
        })
    }
}

#[cfg(feature = "mysql")]
impl SchemaConnection for diesel::MysqlConnection {
    const DIALECT: Dialect = Dialect::Mysql;

    fn introspect(&mut self, table: &'static str) -> Result<TableSchema> {
        #[derive(QueryableByName)]
        struct Col {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Text)]
            sql_type: String,
            #[diesel(sql_type = Text)]
            nullable: String,
            #[diesel(sql_type = Nullable<Text>)]
            default_expr: Option<String>,
            #[diesel(sql_type = Nullable<Text>)]
            charset: Option<String>,
            #[diesel(sql_type = Nullable<Text>)]
            collation: Option<String>,
            #[diesel(sql_type = Text)]
            extra: String,
        }
        #[derive(QueryableByName)]
        struct Part {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Text)]
            non_unique: String,
            #[diesel(sql_type = Nullable<Text>)]
            column: Option<String>,
            #[diesel(sql_type = Nullable<Text>)]
            sub_part: Option<String>,
            #[diesel(sql_type = Text)]
            index_type: String,
        }
        #[derive(QueryableByName)]
        struct Version {
            #[diesel(sql_type = Text)]
            version: String,
        }
        check_identifier("table", table, true)?;
        let (schema, name) = split(table);
        let err = db_error(table);
        let mariadb = diesel::sql_query("SELECT VERSION() AS version")
            .get_result::<Version>(self)
            .map_err(&err)?
            .version
            .contains("MariaDB");
        let cols: Vec<Col> = diesel::sql_query(
            "SELECT CAST(COLUMN_NAME AS CHAR) AS name, CAST(COLUMN_TYPE AS CHAR) AS sql_type, \
             CAST(IS_NULLABLE AS CHAR) AS nullable, CAST(COLUMN_DEFAULT AS CHAR) AS default_expr, \
             CAST(CHARACTER_SET_NAME AS CHAR) AS charset, CAST(COLLATION_NAME AS CHAR) AS collation, \
             CAST(EXTRA AS CHAR) AS extra \
             FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
        )
        .bind::<Nullable<Text>, _>(schema)
        .bind::<Text, _>(name)
        .load(self)
        .map_err(&err)?;
        if cols.is_empty() {
            return Err(unknown(table));
        }
        let parts: Vec<Part> = diesel::sql_query(
            "SELECT CAST(INDEX_NAME AS CHAR) AS name, CAST(NON_UNIQUE AS CHAR) AS non_unique, \
             CAST(COLUMN_NAME AS CHAR) AS `column`, CAST(SUB_PART AS CHAR) AS sub_part, \
             CAST(INDEX_TYPE AS CHAR) AS index_type \
             FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? \
             ORDER BY INDEX_NAME, SEQ_IN_INDEX",
        )
        .bind::<Nullable<Text>, _>(schema)
        .bind::<Text, _>(name)
        .load(self)
        .map_err(&err)?;
        let mut indexes: Vec<IndexInfo> = Vec::new();
        let mut defs: Vec<Vec<String>> = Vec::new();
        for p in parts {
            if indexes.last().is_none_or(|i| i.name != p.name) {
                indexes.push(IndexInfo {
                    primary: p.name == "PRIMARY",
                    unique: p.non_unique == "0",
                    name: p.name.clone(),
                    columns: Vec::new(),
                    expressions: None,
                    constraint: None,
                    definition: Some(p.index_type.clone()),
                });
                defs.push(Vec::new());
            }
            let (Some(index), Some(def)) = (indexes.last_mut(), defs.last_mut()) else {
                continue;
            };
            match p.column {
                Some(column) => {
                    def.push(match &p.sub_part {
                        Some(n) => format!("{column}({n})"),
                        None => column.clone(),
                    });
                    index.columns.push(column);
                }
                None => index.expressions = Some("(expression)".into()),
            }
        }
        for (index, def) in indexes.iter_mut().zip(defs) {
            let kind = match index.definition.as_deref() {
                Some("FULLTEXT") => "FULLTEXT ",
                Some("SPATIAL") => "SPATIAL ",
                _ if index.unique => "UNIQUE ",
                _ => "",
            };
            index.definition = if index.primary {
                Some(format!(
                    "ALTER TABLE {table} ADD PRIMARY KEY ({})",
                    def.join(", ")
                ))
            } else if index.expressions.is_some() {
                None
            } else {
                Some(format!(
                    "CREATE {kind}INDEX {} ON {table} ({})",
                    index.name,
                    def.join(", ")
                ))
            };
        }
        Ok(TableSchema {
            table: table.to_owned(),
            columns: cols
                .into_iter()
                .map(|c| {
                    let default = match c.default_expr {
                        None => None,
                        Some(d) if mariadb && d == "NULL" => None,
                        Some(d) if mariadb || c.extra.contains("DEFAULT_GENERATED") => Some(d),
                        Some(d) => {
                            Some(format!("'{}'", d.replace('\\', "\\\\").replace('\'', "''")))
                        }
                    };
                    ColumnInfo {
                        name: c.name,
                        sql_type: c.sql_type,
                        nullable: c.nullable == "YES",
                        default,
                        collation: c.charset.zip(c.collation),
                    }
                })
                .collect(),
            indexes,
        })
    }
}

#[cfg(feature = "sqlite")]
impl SchemaConnection for diesel::SqliteConnection {
    const DIALECT: Dialect = Dialect::Sqlite;

    fn introspect(&mut self, table: &'static str) -> Result<TableSchema> {
        #[derive(QueryableByName)]
        struct Col {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Text)]
            sql_type: String,
            #[diesel(sql_type = Integer)]
            not_null: i32,
            #[diesel(sql_type = Nullable<Text>)]
            default_expr: Option<String>,
        }
        #[derive(QueryableByName)]
        struct Idx {
            #[diesel(sql_type = Text)]
            name: String,
            #[diesel(sql_type = Integer)]
            is_unique: i32,
            #[diesel(sql_type = Text)]
            origin: String,
            #[diesel(sql_type = Nullable<Text>)]
            definition: Option<String>,
        }
        #[derive(QueryableByName)]
        struct Part {
            #[diesel(sql_type = Nullable<Text>)]
            name: Option<String>,
        }
        check_identifier("table", table, false)?;
        let err = db_error(table);
        let cols: Vec<Col> = diesel::sql_query(
            "SELECT name, type AS sql_type, \"notnull\" AS not_null, dflt_value AS default_expr \
             FROM pragma_table_info(?) ORDER BY cid",
        )
        .bind::<Text, _>(table)
        .load(self)
        .map_err(&err)?;
        if cols.is_empty() {
            return Err(unknown(table));
        }
        let list: Vec<Idx> = diesel::sql_query(
            "SELECT l.name AS name, l.\"unique\" AS is_unique, l.origin AS origin, m.sql AS definition \
             FROM pragma_index_list(?) l LEFT JOIN sqlite_master m \
             ON m.type = 'index' AND m.name = l.name ORDER BY l.name",
        )
        .bind::<Text, _>(table)
        .load(self)
        .map_err(&err)?;
        let mut indexes = Vec::new();
        for i in list {
            let parts: Vec<Part> =
                diesel::sql_query("SELECT name FROM pragma_index_info(?) ORDER BY seqno")
                    .bind::<Text, _>(&i.name)
                    .load(self)
                    .map_err(&err)?;
            let expression = parts.iter().any(|p| p.name.is_none());
            indexes.push(IndexInfo {
                columns: parts.into_iter().filter_map(|p| p.name).collect(),
                expressions: expression.then(|| i.definition.clone().unwrap_or_default()),
                unique: i.is_unique != 0,
                primary: i.origin == "pk",
                constraint: None,
                definition: i.definition,
                name: i.name,
            });
        }
        Ok(TableSchema {
            table: table.to_owned(),
            columns: cols
                .into_iter()
                .map(|c| ColumnInfo {
                    name: c.name,
                    sql_type: c.sql_type,
                    nullable: c.not_null == 0,
                    default: c.default_expr,
                    collation: None,
                })
                .collect(),
            indexes,
        })
    }
}

/// The SQL text of a migration, one commented statement at a time.
#[derive(Default)]
struct Script(String);

impl Script {
    fn note(&mut self, text: &str) {
        for line in text.lines() {
            let _ = writeln!(self.0, "-- {line}");
        }
    }

    fn stmt(&mut self, cost: &str, sql: impl AsRef<str>) {
        self.note(cost);
        let _ = writeln!(self.0, "{};\n", sql.as_ref());
    }
}

/// What a statement costs, per backend.
mod cost {
    use super::Dialect;

    pub(super) fn add_column(d: Dialect, not_null_default: bool) -> &'static str {
        match (d, not_null_default) {
            (Dialect::Postgres, false) => {
                "PostgreSQL: catalog only (no rewrite), a brief ACCESS EXCLUSIVE lock."
            }
            (Dialect::Postgres, true) => {
                "PostgreSQL ≥ 11: catalog only with a constant default (no rewrite), a brief ACCESS EXCLUSIVE lock."
            }
            (Dialect::Mysql, _) => {
                "MariaDB ≥ 10.3 / MySQL ≥ 8.0.12: INSTANT (metadata only); older versions rebuild the table in place."
            }
            (_, _) => "SQLite: schema change only (no rewrite).",
        }
    }

    pub(super) fn convert(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => {
                "PostgreSQL: rewrites the table and its indexes under an ACCESS EXCLUSIVE lock (reads and writes wait)."
            }
            Dialect::Mysql => {
                "MySQL/MariaDB: copies the table (ALGORITHM=COPY); writes wait for the whole copy."
            }
            _ => "SQLite: schema change only.",
        }
    }

    pub(super) fn default(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => "PostgreSQL: catalog only, a brief ACCESS EXCLUSIVE lock.",
            _ => "Metadata only.",
        }
    }

    pub(super) fn create_index(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => {
                "PostgreSQL: builds the index under a SHARE lock: writes wait, reads go on \
                 (CREATE INDEX CONCURRENTLY avoids it, outside a transaction)."
            }
            Dialect::Mysql => {
                "MySQL/MariaDB: built in place (ALGORITHM=INPLACE, LOCK=NONE): reads and writes go on."
            }
            _ => "SQLite: builds the index; the database is write-locked meanwhile.",
        }
    }

    pub(super) fn add_constraint(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => {
                "PostgreSQL: builds the constraint's index under an ACCESS EXCLUSIVE lock."
            }
            _ => create_index(d),
        }
    }

    pub(super) fn drop_index(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => "PostgreSQL: catalog only, a brief ACCESS EXCLUSIVE lock.",
            Dialect::Mysql => "MySQL/MariaDB: metadata only (in place).",
            _ => "SQLite: schema change only.",
        }
    }

    pub(super) fn drop_column(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => {
                "PostgreSQL: catalog only (space is reclaimed by a later rewrite), a brief ACCESS EXCLUSIVE lock."
            }
            Dialect::Mysql => {
                "MariaDB ≥ 10.4 / MySQL ≥ 8.0.29: INSTANT; older versions rebuild the table in place."
            }
            _ => "SQLite: rewrites the table (every row) under the database's write lock.",
        }
    }

    pub(super) fn rename(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => "PostgreSQL: catalog only, a brief ACCESS EXCLUSIVE lock.",
            Dialect::Mysql => "MySQL/MariaDB: metadata only (the type is unchanged).",
            _ => "SQLite: schema change only.",
        }
    }

    pub(super) fn set_not_null(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => {
                "PostgreSQL: scans the table (no rewrite) under an ACCESS EXCLUSIVE lock."
            }
            Dialect::Mysql => "MySQL/MariaDB: rebuilds the table, checking every row.",
            _ => "SQLite: schema change only (triggers).",
        }
    }

    pub(super) fn drop_not_null(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => "PostgreSQL: catalog only, a brief ACCESS EXCLUSIVE lock.",
            Dialect::Mysql => "MySQL/MariaDB: rebuilds the table in place.",
            _ => "SQLite: schema change only (triggers).",
        }
    }

    pub(super) fn check(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => {
                "PostgreSQL: scans the table under an ACCESS EXCLUSIVE lock (NOT VALID, then \
                 VALIDATE CONSTRAINT, shortens the lock on a large table)."
            }
            Dialect::Mysql => "MySQL/MariaDB: copies the table, checking every row.",
            _ => "SQLite: schema change only (triggers check each later write).",
        }
    }

    pub(super) fn guard(_: Dialect) -> &'static str {
        "Reads the table (no lock beyond reads)."
    }
}

fn config(table: &str, message: impl std::fmt::Display) -> Error {
    Error::Config(format!("{table}: {message}"))
}

fn name_fits(table: &str, what: &str, name: &str) -> Result<()> {
    if name.len() > MAX_NAME {
        Err(config(
            table,
            format_args!(
                "the {what} name {name:?} is longer than {MAX_NAME} characters (the limit every backend takes)"
            ),
        ))
    } else {
        Ok(())
    }
}

/// The shadow column of `column`: the model's, else `<column>_encrypted`.
fn shadow_name(column: &StoredColumn) -> String {
    column
        .shadow
        .map_or_else(|| format!("{}_encrypted", column.column), str::to_owned)
}

/// The binary type a text column of `sql_type` becomes on MySQL, sized for
/// its longest value in UTF-8 (4 bytes a character) sealed; `None` when it
/// is binary already.
fn mysql_binary(table: &str, column: &str, sql_type: &str) -> Result<Option<String>> {
    let lower = sql_type.to_ascii_lowercase();
    let base = lower.split('(').next().unwrap_or("").trim();
    let length = || -> Option<u64> {
        lower
            .split_once('(')?
            .1
            .split(')')
            .next()?
            .trim()
            .parse()
            .ok()
    };
    let sized = |chars: u64| {
        let n = chars * 4 + ENVELOPE_OVERHEAD;
        if n <= 65_535 {
            format!("VARBINARY({n})")
        } else if n <= 16_777_215 {
            "MEDIUMBLOB".into()
        } else {
            "LONGBLOB".into()
        }
    };
    Ok(Some(match base {
        "varchar" | "char" => match length() {
            Some(n) => sized(n),
            None => {
                return Err(config(
                    table,
                    format_args!("column {column}: no length in its type {sql_type}"),
                ));
            }
        },
        "tinytext" => "BLOB".into(),
        "text" => "MEDIUMBLOB".into(),
        "mediumtext" | "longtext" => "LONGBLOB".into(),
        "date" => sized(10),
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            return Ok(None);
        }
        _ => {
            return Err(config(
                table,
                format_args!(
                    "column {column} is {sql_type}: only text, character and DATE columns are converted"
                ),
            ));
        }
    }))
}

/// PostgreSQL: the expression converting a column of `sql_type` to its
/// value's bytes; `None` when it is binary already.
fn pg_to_bytes(table: &str, column: &str, sql_type: &str) -> Result<Option<String>> {
    let base = sql_type.split('(').next().unwrap_or("").trim();
    match base {
        "bytea" => Ok(None),
        "date" => Ok(Some(format!(
            "convert_to(to_char({column}, 'YYYY-MM-DD'), 'UTF8')"
        ))),
        "text" | "character varying" | "character" | "citext" | "name" => {
            Ok(Some(format!("convert_to({column}::text, 'UTF8')")))
        }
        _ => Err(config(
            table,
            format_args!(
                "column {column} is {sql_type}: only text, character and date columns are converted"
            ),
        )),
    }
}

/// The type of a new binary column holding sealed values of a column of
/// `sql_type`.
fn sealed_type(d: Dialect, table: &str, column: &str, sql_type: &str) -> Result<String> {
    Ok(match d {
        Dialect::Postgres => "BYTEA".into(),
        Dialect::Mysql => {
            mysql_binary(table, column, sql_type)?.unwrap_or_else(|| sql_type.to_ascii_uppercase())
        }
        _ => "BLOB".into(),
    })
}

fn bin(d: Dialect, len: u32) -> String {
    match d {
        Dialect::Postgres => "BYTEA".into(),
        Dialect::Mysql => format!("VARBINARY({len})"),
        _ => "BLOB".into(),
    }
}

/// A MySQL column definition (`MODIFY` / `ADD COLUMN`).
fn mysql_def(c: &ColumnInfo, sql_type: &str, nullable: bool, default: bool) -> String {
    let mut s = sql_type.to_owned();
    if let Some((charset, collation)) = &c.collation {
        let _ = write!(s, " CHARACTER SET {charset} COLLATE {collation}");
    }
    s.push_str(if nullable { " NULL" } else { " NOT NULL" });
    if default && let Some(d) = &c.default {
        let _ = write!(s, " DEFAULT {d}");
    }
    s
}

/// The statements that drop an index, and recreate it.
fn drop_index(d: Dialect, t: &StoredTable, index: &IndexInfo) -> Result<(String, String, String)> {
    let table = t.table;
    // Index names come from the catalog and go into SQL unquoted: only
    // plain identifiers are taken.
    check_identifier("index", &index.name, false).map_err(|e| {
        config(
            table,
            format_args!("{e}: rename the index or drop it by hand first"),
        )
    })?;
    if index.primary {
        return Err(config(
            table,
            format_args!(
                "the primary key {} covers an encrypted column: phi cannot seal a key column",
                index.name
            ),
        ));
    }
    let (schema, _) = split(table);
    let qualified = match schema {
        Some(s) if d == Dialect::Postgres => format!("{s}.{}", index.name),
        _ => index.name.clone(),
    };
    match d {
        Dialect::Postgres => {
            if let Some(def) = &index.constraint {
                return Ok((
                    format!("ALTER TABLE {table} DROP CONSTRAINT {}", index.name),
                    format!("ALTER TABLE {table} ADD CONSTRAINT {} {def}", index.name),
                    cost::add_constraint(d).into(),
                ));
            }
        }
        Dialect::Sqlite if index.definition.is_none() => {
            return Err(config(
                table,
                format_args!(
                    "the index {} comes from a UNIQUE clause in CREATE TABLE, which SQLite cannot drop \
                     (nor a column it covers): rebuild the table without it first",
                    index.name
                ),
            ));
        }
        _ => {}
    }
    let Some(def) = &index.definition else {
        return Err(config(
            table,
            format_args!(
                "the index {} (on an expression) cannot be recreated from the catalog: drop it by hand first",
                index.name
            ),
        ));
    };
    let drop = match d {
        Dialect::Mysql => format!("DROP INDEX {} ON {table}", index.name),
        _ => format!("DROP INDEX {qualified}"),
    };
    Ok((drop, def.clone(), cost::create_index(d).into()))
}

/// `ALTER TABLE` that sets (`set`) or drops `NOT NULL` on a column of
/// PostgreSQL or MySQL (SQLite has triggers instead).
fn not_null_sql(d: Dialect, table: &str, column: &str, sql_type: &str, set: bool) -> String {
    match (d, set) {
        (Dialect::Mysql, true) => {
            format!("ALTER TABLE {table} MODIFY {column} {sql_type} NOT NULL")
        }
        (Dialect::Mysql, false) => format!("ALTER TABLE {table} MODIFY {column} {sql_type} NULL"),
        (_, true) => format!("ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL"),
        (_, false) => format!("ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL"),
    }
}

/// Refuses (aborts the migration) while `condition` holds for any row.
fn guard(s: &mut Script, d: Dialect, t: &StoredTable, condition: &str, message: &str) {
    let table = t.table;
    match d {
        Dialect::Postgres => s.stmt(
            cost::guard(d),
            format!(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM {table} WHERE {condition}) THEN \
                 RAISE EXCEPTION '{table}: {message}'; END IF; END $$"
            ),
        ),
        _ => {
            // A temporary table whose CHECK refuses a count above zero: the
            // INSERT fails, and the migration with it, naming the check.
            let temp = if d == Dialect::Mysql {
                "DROP TEMPORARY TABLE IF EXISTS phi_guard"
            } else {
                "DROP TABLE IF EXISTS temp.phi_guard"
            };
            s.note(&format!(
                "Refuses unless no row of {table} matches: {message}."
            ));
            s.stmt(cost::guard(d), temp);
            let constraint: String = format!(
                "phi_{}",
                message.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            )
            .chars()
            .take(60)
            .collect();
            s.stmt(
                cost::guard(d),
                format!(
                    "CREATE TEMPORARY TABLE phi_guard (n INTEGER NOT NULL, CONSTRAINT {constraint} CHECK (n = 0))"
                ),
            );
            s.stmt(
                cost::guard(d),
                format!("INSERT INTO phi_guard (n) SELECT COUNT(*) FROM {table} WHERE {condition}"),
            );
            s.stmt(cost::guard(d), temp);
        }
    }
}

fn flag_is(d: Dialect, t: &StoredTable, on: bool) -> String {
    let flag = t.flag_column;
    match (t.flag_is_bool && d == Dialect::Postgres, on) {
        (true, true) => flag.to_owned(),
        (true, false) => format!("NOT {flag}"),
        (false, true) => format!("{flag} <> 0"),
        (false, false) => format!("{flag} = 0"),
    }
}

/// Adds the flag, blind- and lookup-index columns and their indexes, unless
/// present; returns the statements that undo it (in order).
fn add_phi_columns(
    up: &mut Script,
    d: Dialect,
    t: &StoredTable,
    schema: &TableSchema,
    options: &Options,
) -> Result<Vec<(String, String)>> {
    let table = t.table;
    let bare = split(table).1;
    let mut groups = Vec::new();
    if schema.column(t.flag_column).is_none() {
        let ty = match (d, t.flag_is_bool) {
            (Dialect::Postgres, true) => "BOOLEAN NOT NULL DEFAULT FALSE",
            (Dialect::Mysql, true) => "BOOLEAN NOT NULL DEFAULT FALSE",
            (_, true) => "BOOLEAN NOT NULL DEFAULT 0",
            (_, false) => "SMALLINT NOT NULL DEFAULT 0",
        };
        up.stmt(
            cost::add_column(d, true),
            format!("ALTER TABLE {table} ADD COLUMN {} {ty}", t.flag_column),
        );
        groups.push(vec![(
            cost::drop_column(d).to_owned(),
            format!("ALTER TABLE {table} DROP COLUMN {}", t.flag_column),
        )]);
    }
    let mut indexed: Vec<(&str, u32)> = t
        .columns
        .iter()
        .filter_map(|c| c.blind_index.map(|(i, _)| (i, 16)))
        .collect();
    indexed.extend(options.lookup_columns.iter().map(|c| (c.as_str(), 20)));
    for (column, len) in indexed {
        let mut group = Vec::new();
        check_identifier("index column", column, false)?;
        if schema.column(column).is_none() {
            up.stmt(
                cost::add_column(d, false),
                format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {} NULL",
                    bin(d, len)
                ),
            );
        }
        let name = format!("phi_{bare}_{column}");
        name_fits(table, "index", &name)?;
        if schema.indexes.iter().all(|i| i.name != name) {
            let on = if len == 16 {
                format!("{}, {column}", t.owner_column)
            } else {
                column.to_owned()
            };
            up.stmt(
                cost::create_index(d),
                format!("CREATE INDEX {name} ON {table} ({on})"),
            );
            group.push((
                cost::drop_index(d).to_owned(),
                match d {
                    Dialect::Mysql => format!("DROP INDEX {name} ON {table}"),
                    _ => match split(table).0 {
                        Some(s) if d == Dialect::Postgres => format!("DROP INDEX {s}.{name}"),
                        _ => format!("DROP INDEX {name}"),
                    },
                },
            ));
        }
        if schema.column(column).is_none() {
            group.push((
                cost::drop_column(d).to_owned(),
                format!("ALTER TABLE {table} DROP COLUMN {column}"),
            ));
        }
        groups.push(group);
    }
    // Undone in reverse, each index before the column it covers.
    groups.reverse();
    Ok(groups.into_iter().flatten().collect())
}

/// Records the values that look like legacy ciphertexts, as the table
/// holds them before any phi writer runs: the only ones the backfill will
/// decode ([`legacy::record_sql`](crate::legacy::record_sql)). `down.sql`
/// leaves the records: applying `up.sql` again once phi's writers have run
/// must not record what they wrote.
fn record_legacy(up: &mut Script, d: Dialect, t: &StoredTable) -> Result<()> {
    up.note(
        "Legacy ciphertexts (Fernet, v1:) are recorded now, before phi's writers run: the backfill decodes \
         only a value recorded in its own row, column and owner, so a token copied in later never decodes.",
    );
    for (i, statement) in table_record_sql(t, d)?.into_iter().enumerate() {
        let cost = if i == 0 {
            "Creates phi_legacy_values unless it exists (phi's migrations create it too)."
        } else {
            "Reads the whole table once; inserts one row per value that looks legacy."
        };
        up.stmt(cost, statement);
    }
    Ok(())
}

fn header(s: &mut Script, t: &StoredTable, d: Dialect, strategy: Strategy, what: &str) {
    s.note(&format!(
        "phi: {} migration of {} ({d:?}), generated from the model and the live table.\n{what}",
        strategy.name(),
        t.table
    ));
    s.0.push('\n');
}

/// Generates the migration of `strategy` for the table `t` whose live
/// schema is `schema`, in `dialect`.
///
/// # Errors
/// [`Error::Config`] naming the table and column: a column missing, a
/// shadow column already present (shadow) or missing (finalize), a type
/// that cannot be converted, an index that cannot be dropped or recreated
/// (an SQLite `UNIQUE` clause of `CREATE TABLE`, a primary key on an
/// encrypted column), a name too long, or finalize for a model without
/// shadow columns.
pub fn generate(
    t: &StoredTable,
    schema: &TableSchema,
    d: Dialect,
    strategy: Strategy,
    options: &Options,
) -> Result<Migration> {
    check_identifier("table", t.table, true)?;
    check_identifier("owner column", t.owner_column, false)?;
    check_identifier("encrypted flag column", t.flag_column, false)?;
    let table = t.table;
    let column = |name: &str| -> Result<&ColumnInfo> {
        schema
            .column(name)
            .ok_or_else(|| config(table, format_args!("column {name} does not exist")))
    };
    let mut up = Script::default();
    let mut down = Script::default();
    match strategy {
        Strategy::Check | Strategy::InPlace if t.has_shadow() => {
            return Err(config(
                table,
                format_args!(
                    "the model has shadow columns (#[phi(encrypt, shadow)]): the {} migration is for a model sealed \
                     in place; generate shadow, then finalize",
                    strategy.name()
                ),
            ));
        }
        Strategy::Check => {
            header(
                &mut up,
                t,
                d,
                strategy,
                "Adds the sealed check: a sealed row holds envelopes only.",
            );
            header(&mut down, t, d, strategy, "Removes the sealed check.");
            for c in &t.columns {
                column(c.column)?;
            }
            column(t.flag_column)?;
            let check = table_check(t, d)?;
            for s in &check.up {
                up.stmt(cost::check(d), s);
            }
            for s in &check.down {
                down.stmt(cost::drop_index(d), s);
            }
        }
        Strategy::InPlace => {
            header(
                &mut up,
                t,
                d,
                strategy,
                "Encrypted columns become binary (values kept byte for byte); phi's columns and indexes added.",
            );
            header(
                &mut down,
                t,
                d,
                strategy,
                "Restores the table as it was; refused while a row is sealed (run decrypt-back first).",
            );
            let names: Vec<&str> = t.columns.iter().map(|c| c.column).collect();
            let mut converts = Vec::new();
            for c in &t.columns {
                check_identifier("column", c.column, false)?;
                let info = column(c.column)?;
                let to_bytes = match d {
                    Dialect::Postgres => pg_to_bytes(table, c.column, &info.sql_type)?
                        .map(|using| (format!("TYPE BYTEA USING {using}"), info)),
                    Dialect::Mysql => {
                        mysql_binary(table, c.column, &info.sql_type)?.map(|ty| (ty, info))
                    }
                    _ => None,
                };
                converts.extend(to_bytes);
            }
            let dropped: Vec<_> = schema
                .indexes_on(&names)
                .into_iter()
                .map(|i| drop_index(d, t, i).map(|s| (i, s)))
                .collect::<Result<_>>()?;
            guard(
                &mut down,
                d,
                t,
                &flag_is(d, t, true),
                "rows are sealed, run decrypt-back first",
            );
            for (index, (drop, _, _)) in &dropped {
                up.note(&format!(
                    "{} covers an encrypted column: an index on ciphertext is useless{}.",
                    index.name,
                    if index.unique {
                        ", and UNIQUE would be wrong"
                    } else {
                        ""
                    }
                ));
                up.stmt(cost::drop_index(d), drop);
            }
            for (ty, info) in &converts {
                match d {
                    Dialect::Postgres => {
                        if info.default.is_some() {
                            up.stmt(
                                cost::default(d),
                                format!(
                                    "ALTER TABLE {table} ALTER COLUMN {} DROP DEFAULT",
                                    info.name
                                ),
                            );
                        }
                        up.stmt(
                            cost::convert(d),
                            format!("ALTER TABLE {table} ALTER COLUMN {} {ty}", info.name),
                        );
                    }
                    _ => up.stmt(
                        cost::convert(d),
                        format!(
                            "ALTER TABLE {table} MODIFY {} {}",
                            info.name,
                            mysql_def(
                                &ColumnInfo {
                                    collation: None,
                                    ..(*info).clone()
                                },
                                ty,
                                info.nullable,
                                false
                            )
                        ),
                    ),
                }
            }
            let undo = add_phi_columns(&mut up, d, t, schema, options)?;
            record_legacy(&mut up, d, t)?;
            for (cost, s) in undo {
                down.stmt(&cost, s);
            }
            for (_, info) in converts.iter().rev() {
                match d {
                    Dialect::Postgres => {
                        down.stmt(
                            cost::convert(d),
                            format!(
                                "ALTER TABLE {table} ALTER COLUMN {0} TYPE {1} USING convert_from({0}, 'UTF8')::{1}",
                                info.name, info.sql_type
                            ),
                        );
                        if let Some(default) = &info.default {
                            down.stmt(
                                cost::default(d),
                                format!(
                                    "ALTER TABLE {table} ALTER COLUMN {} SET DEFAULT {default}",
                                    info.name
                                ),
                            );
                        }
                    }
                    _ => down.stmt(
                        cost::convert(d),
                        format!(
                            "ALTER TABLE {table} MODIFY {} {}",
                            info.name,
                            mysql_def(info, &info.sql_type, info.nullable, true)
                        ),
                    ),
                }
            }
            for (_, (_, recreate, cost)) in &dropped {
                down.stmt(cost, recreate);
            }
        }
        Strategy::Shadow => {
            header(
                &mut up,
                t,
                d,
                strategy,
                "Adds a nullable shadow column per encrypted column (the dual-write phase), with phi's columns \
                 and indexes; the plain columns and their indexes are untouched.",
            );
            header(&mut down, t, d, strategy, "Drops what up.sql added.");
            let mut drops = Vec::new();
            for c in &t.columns {
                check_identifier("column", c.column, false)?;
                let info = column(c.column)?;
                let shadow = shadow_name(c);
                check_identifier("shadow column", &shadow, false)?;
                name_fits(table, "shadow column", &shadow)?;
                if schema.column(&shadow).is_some() {
                    return Err(config(
                        table,
                        format_args!("the shadow column {shadow} of {} already exists", c.column),
                    ));
                }
                let ty = sealed_type(d, table, c.column, &info.sql_type)?;
                up.stmt(
                    cost::add_column(d, false),
                    format!("ALTER TABLE {table} ADD COLUMN {shadow} {ty} NULL"),
                );
                drops.push(shadow);
            }
            let undo = add_phi_columns(&mut up, d, t, schema, options)?;
            record_legacy(&mut up, d, t)?;
            // After finalize's down and before decrypt-back, a shadow holds
            // the only copy of its value: dropping it then loses data.
            let only_copy = t
                .columns
                .iter()
                .map(|c| format!("({} IS NULL AND {} IS NOT NULL)", c.column, shadow_name(c)))
                .collect::<Vec<_>>()
                .join(" OR ");
            guard(
                &mut down,
                d,
                t,
                &only_copy,
                "shadows hold the only copy, run decrypt-back first",
            );
            for (cost, s) in undo {
                down.stmt(&cost, s);
            }
            for shadow in drops.iter().rev() {
                down.stmt(
                    cost::drop_column(d),
                    format!("ALTER TABLE {table} DROP COLUMN {shadow}"),
                );
            }
        }
        Strategy::Finalize => {
            if !t.has_shadow() {
                return Err(config(
                    table,
                    "the model has no shadow column (#[phi(encrypt, shadow)]): nothing to finalize",
                ));
            }
            header(
                &mut up,
                t,
                d,
                strategy,
                "Ends the dual-write phase: refused while a row's flag is off; drops the plain columns and their \
                 indexes, renames each shadow to its column's name, restores NOT NULL, adds the sealed check.",
            );
            header(
                &mut down,
                t,
                d,
                strategy,
                "Re-adds the plain columns (nullable, empty: `decrypt-back` refills them) beside the sealed ones, \
                 renamed back to their shadow names.",
            );
            column(t.flag_column)?;
            let shadowed: Vec<_> = t.columns.iter().filter(|c| c.shadow.is_some()).collect();
            let mut pairs = Vec::new();
            for c in &shadowed {
                check_identifier("column", c.column, false)?;
                let plain = column(c.column)?;
                let shadow = shadow_name(c);
                check_identifier("shadow column", &shadow, false)?;
                let sealed = column(&shadow)?;
                pairs.push((*c, plain, shadow, sealed));
            }
            let names: Vec<&str> = shadowed.iter().map(|c| c.column).collect();
            let dropped: Vec<_> = schema
                .indexes_on(&names)
                .into_iter()
                .map(|i| drop_index(d, t, i).map(|s| (i, s)))
                .collect::<Result<_>>()?;
            let mut checked = t.clone();
            checked.columns.iter_mut().for_each(|c| c.shadow = None);
            let check = options
                .sealed_check
                .then(|| table_check(&checked, d))
                .transpose()?;
            // A row left unsealed, or sealed with a shadow missing where its
            // plain column holds a value, would lose that value.
            let unsealed = std::iter::once(flag_is(d, t, false))
                .chain(pairs.iter().map(|(c, _, shadow, _)| {
                    format!("({} IS NOT NULL AND {shadow} IS NULL)", c.column)
                }))
                .collect::<Vec<_>>()
                .join(" OR ");
            guard(
                &mut up,
                d,
                t,
                &unsealed,
                "rows are not sealed, run backfill and verify first",
            );
            for (_, (drop, _, _)) in &dropped {
                up.stmt(cost::drop_index(d), drop);
            }
            for (c, _, _, _) in &pairs {
                up.stmt(
                    cost::drop_column(d),
                    format!("ALTER TABLE {table} DROP COLUMN {}", c.column),
                );
            }
            for (c, _, shadow, _) in &pairs {
                up.stmt(
                    cost::rename(d),
                    format!("ALTER TABLE {table} RENAME COLUMN {shadow} TO {}", c.column),
                );
            }
            let required: Vec<_> = pairs.iter().filter(|(_, p, _, _)| !p.nullable).collect();
            let bare = split(table).1;
            let not_null = format!("phi_not_null_{bare}");
            name_fits(table, "trigger", &format!("{not_null}_update"))?;
            if !required.is_empty() {
                if d == Dialect::Sqlite {
                    up.note(
                        "SQLite cannot add NOT NULL to a column: triggers refuse NULL instead.",
                    );
                    let cols: Vec<&str> = required.iter().map(|(c, _, _, _)| c.column).collect();
                    let when = cols
                        .iter()
                        .map(|c| format!("NEW.{c} IS NULL"))
                        .collect::<Vec<_>>()
                        .join(" OR ");
                    for (event, suffix) in [("INSERT", "insert"), ("UPDATE", "update")] {
                        up.stmt(
                            cost::set_not_null(d),
                            format!(
                                "CREATE TRIGGER {not_null}_{suffix} BEFORE {event} ON {table} FOR EACH ROW \
                                 WHEN {when} BEGIN SELECT RAISE(ABORT, '{table}: {} must not be NULL'); END",
                                cols.join(", ")
                            ),
                        );
                    }
                } else {
                    for (c, _, _, s) in &required {
                        up.stmt(
                            cost::set_not_null(d),
                            not_null_sql(d, table, c.column, &s.sql_type, true),
                        );
                    }
                }
            }
            if let Some(check) = &check {
                for s in &check.up {
                    up.stmt(cost::check(d), s);
                }
                for s in &check.down {
                    down.stmt(cost::drop_index(d), s);
                }
            } else {
                up.note("No sealed check (--no-check).");
            }
            if !required.is_empty() {
                if d == Dialect::Sqlite {
                    for suffix in ["insert", "update"] {
                        down.stmt(
                            cost::drop_not_null(d),
                            format!("DROP TRIGGER {not_null}_{suffix}"),
                        );
                    }
                } else {
                    for (c, _, _, s) in &required {
                        down.stmt(
                            cost::drop_not_null(d),
                            not_null_sql(d, table, c.column, &s.sql_type, false),
                        );
                    }
                }
            }
            for (c, _, shadow, _) in pairs.iter().rev() {
                down.stmt(
                    cost::rename(d),
                    format!("ALTER TABLE {table} RENAME COLUMN {} TO {shadow}", c.column),
                );
            }
            down.note("The plain columns come back empty: `decrypt-back` refills them from the sealed values.");
            for (c, plain, _, _) in &pairs {
                let ty = match d {
                    Dialect::Mysql => mysql_def(plain, &plain.sql_type, true, false),
                    _ => format!("{} NULL", plain.sql_type),
                };
                down.stmt(
                    cost::add_column(d, false),
                    format!("ALTER TABLE {table} ADD COLUMN {} {ty}", c.column),
                );
            }
            for (_, (_, recreate, cost)) in &dropped {
                down.stmt(cost, recreate);
            }
        }
    }
    Ok(Migration {
        strategy,
        table: table.to_owned(),
        up: up.0,
        down: down.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blind::Normalize;
    use crate::lifecycle::tables::ColumnType;

    fn model(shadow: bool) -> StoredTable {
        let column = |column: &'static str, s: &'static str| StoredColumn {
            column,
            scope: column,
            shadow: shadow.then_some(s),
            blind_index: None,
            canonical: crate::migrate::canonical::<String>,
        };
        let mut last = column("last_name", "last_name_encrypted");
        last.blind_index = Some(("last_name_bidx", Normalize::TRIM_LOWERCASE));
        StoredTable {
            table: "cases",
            owner_column: "user_id",
            owner_type: Some(ColumnType::Text),
            key_column: "case_id",
            key_type: Some(ColumnType::Text),
            flag_column: "phi_encrypted",
            flag_is_bool: true,
            columns: vec![last, column("dob", "dob_encrypted")],
        }
    }

    fn col(name: &str, sql_type: &str, nullable: bool, default: Option<&str>) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            sql_type: sql_type.into(),
            nullable,
            default: default.map(str::to_owned),
            collation: None,
        }
    }

    fn index(name: &str, columns: &[&str], unique: bool, definition: Option<&str>) -> IndexInfo {
        IndexInfo {
            name: name.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            expressions: None,
            unique,
            primary: false,
            constraint: None,
            definition: definition.map(str::to_owned),
        }
    }

    fn schema(d: Dialect) -> TableSchema {
        let (text, date) = match d {
            Dialect::Postgres => ("character varying(100)", "date"),
            Dialect::Mysql => ("varchar(100)", "date"),
            _ => ("VARCHAR(100)", "DATE"),
        };
        TableSchema {
            table: "cases".into(),
            columns: vec![
                col("case_id", text, false, None),
                col("user_id", text, false, None),
                col("last_name", text, false, Some("'x'")),
                col("dob", date, true, None),
            ],
            indexes: vec![
                index(
                    "cases_last",
                    &["user_id", "last_name"],
                    false,
                    Some("CREATE INDEX cases_last ON cases (user_id, last_name)"),
                ),
                index(
                    "cases_dob",
                    &["dob"],
                    true,
                    Some("CREATE UNIQUE INDEX cases_dob ON cases (dob)"),
                ),
            ],
        }
    }

    fn statements(sql: &str) -> Vec<&str> {
        sql.split(";\n")
            .map(|s| {
                s.lines()
                    .filter(|l| !l.starts_with("--") && !l.trim().is_empty())
                    .collect::<Vec<_>>()
            })
            .filter(|l| !l.is_empty())
            .map(|l| l[0])
            .collect()
    }

    #[test]
    fn in_place_on_postgres_converts_with_using_and_back() {
        let m = generate(
            &model(false),
            &schema(Dialect::Postgres),
            Dialect::Postgres,
            Strategy::InPlace,
            &Options::default(),
        )
        .expect("migration");
        let up = statements(&m.up);
        assert!(
            up.contains(&"ALTER TABLE cases ALTER COLUMN last_name DROP DEFAULT"),
            "{up:#?}"
        );
        assert!(up.contains(&"ALTER TABLE cases ALTER COLUMN last_name TYPE BYTEA USING convert_to(last_name::text, 'UTF8')"));
        assert!(up.contains(&"ALTER TABLE cases ALTER COLUMN dob TYPE BYTEA USING convert_to(to_char(dob, 'YYYY-MM-DD'), 'UTF8')"));
        assert!(up.contains(
            &"ALTER TABLE cases ADD COLUMN phi_encrypted BOOLEAN NOT NULL DEFAULT FALSE"
        ));
        assert!(up.contains(&"ALTER TABLE cases ADD COLUMN last_name_bidx BYTEA NULL"));
        assert!(
            up.contains(
                &"CREATE INDEX phi_cases_last_name_bidx ON cases (user_id, last_name_bidx)"
            )
        );
        assert!(up.contains(&"DROP INDEX cases_last") && up.contains(&"DROP INDEX cases_dob"));
        assert!(m.up.contains("rewrites the table and its indexes under an ACCESS EXCLUSIVE lock"));
        let down = statements(&m.down);
        assert!(
            down[0].starts_with("DO $$ BEGIN IF EXISTS (SELECT 1 FROM cases WHERE phi_encrypted)"),
            "{down:#?}"
        );
        assert!(down.contains(&"ALTER TABLE cases ALTER COLUMN last_name TYPE character varying(100) USING convert_from(last_name, 'UTF8')::character varying(100)"));
        assert!(down.contains(
            &"ALTER TABLE cases ALTER COLUMN dob TYPE date USING convert_from(dob, 'UTF8')::date"
        ));
        assert!(down.contains(&"ALTER TABLE cases ALTER COLUMN last_name SET DEFAULT 'x'"));
        assert!(down.contains(&"CREATE UNIQUE INDEX cases_dob ON cases (dob)"));
        let drop_index = down
            .iter()
            .position(|s| *s == "DROP INDEX phi_cases_last_name_bidx");
        let drop_column = down
            .iter()
            .position(|s| *s == "ALTER TABLE cases DROP COLUMN last_name_bidx");
        assert!(drop_index < drop_column && drop_index.is_some());
    }

    #[test]
    fn in_place_on_mysql_sizes_varbinary_from_the_declared_length() {
        let mut s = schema(Dialect::Mysql);
        s.columns[2].collation = Some(("utf8mb4".into(), "utf8mb4_bin".into()));
        let m = generate(
            &model(false),
            &s,
            Dialect::Mysql,
            Strategy::InPlace,
            &Options::default(),
        )
        .expect("migration");
        let up = statements(&m.up);
        assert!(
            up.contains(&"ALTER TABLE cases MODIFY last_name VARBINARY(434) NOT NULL"),
            "{up:#?}"
        );
        assert!(up.contains(&"ALTER TABLE cases MODIFY dob VARBINARY(74) NULL"));
        assert!(up.contains(&"DROP INDEX cases_dob ON cases"));
        let down = statements(&m.down);
        assert!(down.contains(&"CREATE TEMPORARY TABLE phi_guard (n INTEGER NOT NULL, CONSTRAINT phi_rows_are_sealed__run_decrypt_back_first CHECK (n = 0))"), "{down:#?}");
        assert!(down.contains(&"ALTER TABLE cases MODIFY last_name varchar(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL DEFAULT 'x'"));
        assert_eq!(
            mysql_binary("t", "c", "text").expect("text"),
            Some("MEDIUMBLOB".into())
        );
        assert_eq!(
            mysql_binary("t", "c", "varchar(20000)").expect("long"),
            Some("MEDIUMBLOB".into())
        );
        assert_eq!(mysql_binary("t", "c", "blob").expect("blob"), None);
        let e = mysql_binary("cases", "age", "int(11)").expect_err("an integer");
        assert!(
            e.to_string().contains("cases") && e.to_string().contains("age"),
            "{e}"
        );
    }

    #[test]
    fn shadow_and_finalize_on_sqlite() {
        let d = Dialect::Sqlite;
        let m = generate(
            &model(true),
            &schema(d),
            d,
            Strategy::Shadow,
            &Options::default().lookup_column("email_lookup"),
        )
        .expect("shadow");
        let up = statements(&m.up);
        assert!(
            up.contains(&"ALTER TABLE cases ADD COLUMN last_name_encrypted BLOB NULL"),
            "{up:#?}"
        );
        assert!(up.contains(&"CREATE INDEX phi_cases_email_lookup ON cases (email_lookup)"));
        assert!(
            !up.iter().any(|s| s.starts_with("DROP INDEX")),
            "plain indexes kept"
        );

        let mut after = schema(d);
        for c in ["last_name_encrypted", "dob_encrypted"] {
            after.columns.push(col(c, "BLOB", true, None));
        }
        after
            .columns
            .push(col("phi_encrypted", "BOOLEAN", false, Some("0")));
        let m = generate(
            &model(true),
            &after,
            d,
            Strategy::Finalize,
            &Options::default(),
        )
        .expect("finalize");
        let up = statements(&m.up);
        assert_eq!(up[0], "DROP TABLE IF EXISTS temp.phi_guard", "{up:#?}");
        assert!(
            up.contains(
                &"INSERT INTO phi_guard (n) SELECT COUNT(*) FROM cases WHERE phi_encrypted = 0 \
                  OR (last_name IS NOT NULL AND last_name_encrypted IS NULL) \
                  OR (dob IS NOT NULL AND dob_encrypted IS NULL)"
            ),
            "{up:#?}"
        );
        assert!(up.contains(&"ALTER TABLE cases DROP COLUMN last_name"));
        assert!(up.contains(&"ALTER TABLE cases RENAME COLUMN last_name_encrypted TO last_name"));
        assert!(
            up.iter()
                .any(|s| s.starts_with("CREATE TRIGGER phi_not_null_cases_insert"))
        );
        assert!(
            up.iter()
                .any(|s| s.starts_with("CREATE TRIGGER phi_sealed_cases_update"))
        );
        assert!(m.up.contains("SQLite: rewrites the table (every row)"));
        let down = statements(&m.down);
        assert!(
            down.contains(&"ALTER TABLE cases ADD COLUMN last_name VARCHAR(100) NULL"),
            "{down:#?}"
        );
        assert!(down.contains(&"CREATE INDEX cases_last ON cases (user_id, last_name)"));
        assert!(m.down.contains("decrypt-back"));

        let no_check = generate(
            &model(true),
            &after,
            d,
            Strategy::Finalize,
            &Options::default().sealed_check(false),
        )
        .expect("finalize");
        assert!(!no_check.up.contains("phi_sealed_cases"));
        let e = generate(
            &model(false),
            &after,
            d,
            Strategy::Finalize,
            &Options::default(),
        )
        .expect_err("no shadow");
        assert!(
            e.to_string().contains("cases") && e.to_string().contains("shadow"),
            "{e}"
        );
    }

    #[test]
    fn indexes_sqlite_cannot_drop_and_long_names_are_errors() {
        let d = Dialect::Sqlite;
        let mut s = schema(d);
        s.indexes.push(index(
            "sqlite_autoindex_cases_1",
            &["last_name"],
            true,
            None,
        ));
        let e = generate(&model(false), &s, d, Strategy::InPlace, &Options::default())
            .expect_err("autoindex");
        assert!(
            e.to_string().contains("sqlite_autoindex_cases_1") && e.to_string().contains("cases"),
            "{e}"
        );

        let long = "x".repeat(60);
        let e = generate(
            &model(false),
            &schema(d),
            d,
            Strategy::InPlace,
            &Options::default().lookup_column(long.clone()),
        )
        .expect_err("too long");
        assert!(e.to_string().contains("longer than 63"), "{e}");
    }

    #[test]
    fn directory_names_sort_as_diesel_orders_them() {
        let m = Migration {
            strategy: Strategy::InPlace,
            table: "app.cases".into(),
            up: String::new(),
            down: String::new(),
        };
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-28T04:05:06Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(
            m.directory_name(at),
            "2026-11-28-040506_phi_in_place_app_cases"
        );
    }
}
