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
//!   row's flag is off or NULL, a plain value has no sealed copy or a sealed
//!   copy is not an envelope; drops the plain columns and their indexes,
//!   renames each shadow to its column's name, restores `NOT NULL`, and adds
//!   the sealed check ([`legacy::sealed_check`](crate::legacy::sealed_check)).
//!   No row written while it runs escapes that check: PostgreSQL locks the
//!   table (`ACCESS EXCLUSIVE`) before checking, SQLite takes the database's
//!   write lock, both within the migration's transaction; MySQL/MariaDB
//!   (whose DDL statements commit one by one) install triggers that refuse
//!   flag-off and shadow-less writes, check again, then change the table
//!   in one `ALTER TABLE`, and `up.sql` says how to recover from a failure
//!   at each step.
//! - [`Strategy::Check`]: the sealed check alone, for a table sealed in
//!   place once its backfill is done.
//!
//! Every statement is preceded by a comment stating what it costs on that
//! backend (a table rewrite, the lock it holds). Read them before running a
//! migration on a large table.
//!
//! Identifiers are quoted in every `down.sql`, in `finalize` and wherever
//! a name comes from the catalog (an index, a column of a MySQL index). A
//! column default is copied into `down.sql` only when it is a literal;
//! anything else is refused at generation, naming table, column and
//! default. On MySQL/MariaDB, [`migration`] refuses a server that does not
//! enforce CHECK constraints ([`check_constraints_enforced`]), and the
//! migrations' own guards fail by a duplicate key, not by CHECK.
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
use crate::legacy::sql::{is_envelope, quoted, table_check, table_record_sql};
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
    /// MySQL / MariaDB: the server's `utf8mb4` collation that compares
    /// bytes with no padding (`utf8mb4_nopad_bin` on MariaDB ≥ 10.2,
    /// `utf8mb4_0900_bin` on MySQL ≥ 8.0.17), which the `in_place` and
    /// `shadow` migrations give a text owner column; `None` elsewhere.
    pub byte_exact_collation: Option<String>,
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

    /// The server's version as it reports it (`SELECT VERSION()` on
    /// MySQL/MariaDB, `server_version` on PostgreSQL, `sqlite_version()`).
    ///
    /// # Errors
    /// Diesel's error when the query fails.
    fn server_version(&mut self) -> diesel::QueryResult<String>;
}

/// Refuses a MySQL or MariaDB server that does not enforce CHECK
/// constraints, from its version as `SELECT VERSION()` reports it
/// (`8.0.36`, `5.7.44-log`, `10.11.6-MariaDB-0+deb12u1`). MySQL parses and
/// ignores CHECK before 8.0.16, MariaDB before 10.2.1: the sealed check
/// phi's migrations add would be accepted and never hold. [`migration`]
/// calls it before generating anything for such a server.
///
/// # Errors
/// [`Error::Config`] naming the version and the versions that enforce
/// CHECK, for an older server or a version it cannot read.
pub fn check_constraints_enforced(version: &str) -> Result<()> {
    let mariadb = version.to_ascii_lowercase().contains("mariadb");
    // MariaDB's replication handshake prefix, should a client report it.
    let text = match version.strip_prefix("5.5.5-") {
        Some(rest) if mariadb => rest,
        _ => version,
    };
    let numbers: Vec<u32> = text
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .unwrap_or("")
        .split('.')
        .map_while(|n| n.parse().ok())
        .collect();
    let needed: [u32; 3] = if mariadb { [10, 2, 1] } else { [8, 0, 16] };
    let server = if mariadb { "MariaDB" } else { "MySQL" };
    let wanted = "MySQL ≥ 8.0.16 and MariaDB ≥ 10.2.1 enforce CHECK constraints";
    let &[major, minor, ref rest @ ..] = numbers.as_slice() else {
        return Err(Error::Config(format!(
            "cannot read the server's version {version:?} ({wanted}): phi's migrations need one that does"
        )));
    };
    let patch = rest.first().copied().unwrap_or(0);
    if [major, minor, patch] < needed {
        return Err(Error::Config(format!(
            "{server} {major}.{minor}.{patch} (version {version:?}) parses CHECK constraints and ignores them \
             ({wanted}): the sealed check of phi's migrations would never hold; upgrade the server first"
        )));
    }
    Ok(())
}

/// Introspects `M`'s table on `conn` and generates the migration of
/// `strategy` for `conn`'s backend.
///
/// # Errors
/// As [`SchemaConnection::introspect`] and [`generate`]; on MySQL/MariaDB,
/// as [`check_constraints_enforced`] for the server's version.
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
/// As [`migration`]; on MySQL/MariaDB, as [`check_constraints_enforced`]
/// for the server's version.
pub fn migration_for<C: SchemaConnection>(
    table: &StoredTable,
    conn: &mut C,
    strategy: Strategy,
    options: &Options,
) -> Result<Migration> {
    if C::DIALECT == Dialect::Mysql {
        check_constraints_enforced(&conn.server_version().map_err(db_error(table.table))?)?;
    }
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

/// One row of a version query.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[derive(QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = Text)]
    version: String,
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

    fn server_version(&mut self) -> diesel::QueryResult<String> {
        Ok(
            diesel::sql_query("SELECT current_setting('server_version') AS version")
                .get_result::<VersionRow>(self)?
                .version,
        )
    }

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
            byte_exact_collation: None,
        })
    }
}

#[cfg(feature = "mysql")]
impl SchemaConnection for diesel::MysqlConnection {
    const DIALECT: Dialect = Dialect::Mysql;

    fn server_version(&mut self) -> diesel::QueryResult<String> {
        Ok(diesel::sql_query("SELECT VERSION() AS version")
            .get_result::<VersionRow>(self)?
            .version)
    }

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
        struct Collation {
            #[diesel(sql_type = Nullable<Text>)]
            name: Option<String>,
        }
        check_identifier("table", table, true)?;
        let (schema, name) = split(table);
        let err = db_error(table);
        let mariadb = self.server_version().map_err(&err)?.contains("MariaDB");
        let byte_exact_collation = diesel::sql_query(
            "SELECT CAST(MIN(COLLATION_NAME) AS CHAR) AS name FROM information_schema.COLLATIONS \
             WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin')",
        )
        .get_result::<Collation>(self)
        .map_err(&err)?
        .name;
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
                    // Quoted: the statement goes into down.sql as it is.
                    let name = quoted(Dialect::Mysql, &column);
                    def.push(match &p.sub_part {
                        Some(n) => format!("{name}({n})"),
                        None => name,
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
            let table = quoted(Dialect::Mysql, table);
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
                    quoted(Dialect::Mysql, &index.name),
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
            byte_exact_collation,
        })
    }
}

#[cfg(feature = "sqlite")]
impl SchemaConnection for diesel::SqliteConnection {
    const DIALECT: Dialect = Dialect::Sqlite;

    fn server_version(&mut self) -> diesel::QueryResult<String> {
        Ok(diesel::sql_query("SELECT sqlite_version() AS version")
            .get_result::<VersionRow>(self)?
            .version)
    }

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
            byte_exact_collation: None,
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

    pub(super) fn guard(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => "Reads the table under the lock taken above.",
            _ => "Reads the table (no lock beyond reads).",
        }
    }

    pub(super) fn drop_trigger(_: Dialect) -> &'static str {
        "MySQL/MariaDB: metadata only."
    }

    pub(super) fn finalize_alter(up: bool) -> &'static str {
        if up {
            "MySQL/MariaDB: one statement, so it happens whole or not at all. Copies the table \
             (ALGORITHM=COPY) when it adds NOT NULL or the sealed check: writes wait for the whole copy."
        } else {
            "MySQL/MariaDB: one statement, so it happens whole or not at all; may copy the table \
             (writes wait for the copy)."
        }
    }

    pub(super) fn lock(d: Dialect) -> &'static str {
        match d {
            Dialect::Postgres => {
                "PostgreSQL: takes the ACCESS EXCLUSIVE lock first and holds it until the migration commits: \
                 reads and writes wait, so no row is written between the check below and the changes after \
                 it. LOCK TABLE fails outside a transaction: run the migration in one (Diesel does)."
            }
            Dialect::Mysql => {
                "MySQL/MariaDB: waits for the transactions using the table, then installs the triggers \
                 (metadata only)."
            }
            _ => {
                "SQLite: takes the database's write lock (a write that changes nothing), held until the \
                 migration commits: no other connection writes meanwhile. Run the migration in one \
                 transaction (Diesel does)."
            }
        }
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

/// MySQL / MariaDB: makes a text owner column compare byte for byte, with
/// no padding, unless it does already (a PAD SPACE collation such as
/// `utf8mb4_bin` takes `'acme'` and `'acme '` as one owner, a `_ci` one
/// `'ACME'` and `'acme'`; `CHAR` strips trailing spaces): converted to
/// `VARCHAR` in [`TableSchema::byte_exact_collation`]. Returns the
/// statement of `down.sql` that restores it. Other dialects and non-text
/// columns (integers, binary): nothing.
fn owner_byte_exact(
    up: &mut Script,
    d: Dialect,
    t: &StoredTable,
    schema: &TableSchema,
) -> Result<Option<String>> {
    let table = t.table;
    let owner = t.owner_column;
    let Some(info) = schema.column(owner).filter(|_| d == Dialect::Mysql) else {
        return Ok(None);
    };
    let Some((_, collation)) = &info.collation else {
        return Ok(None);
    };
    let lower = info.sql_type.to_ascii_lowercase();
    let base = lower.split('(').next().unwrap_or("").trim();
    let exact = collation.ends_with("_nopad_bin")
        || collation.ends_with("_0900_bin")
        || collation == "binary";
    let sql_type = match base {
        "char" => format!("varchar{}", &lower[base.len()..]),
        "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" if !exact => lower.clone(),
        _ => return Ok(None),
    };
    let Some(nopad) = &schema.byte_exact_collation else {
        return Err(config(
            table,
            format_args!(
                "the owner column {owner} ({}, {collation}) does not compare byte for byte and this server has \
                 no NO PAD binary collation (MariaDB >= 10.2: utf8mb4_nopad_bin, MySQL >= 8.0.17: \
                 utf8mb4_0900_bin): make it VARBINARY first (Diesel reads it as text all the same)",
                info.sql_type
            ),
        ));
    };
    up.note(&format!(
        "The owner column {owner} compares with {collation}{}: {nopad} compares bytes, so that one owner's \
         rows are never another's (\"acme \" is not \"acme\"). A foreign key on it must be changed with it, by hand.",
        if base == "char" { " and CHAR strips trailing spaces" } else { "" }
    ));
    let exact_info = ColumnInfo {
        collation: Some(("utf8mb4".into(), nopad.clone())),
        ..info.clone()
    };
    up.stmt(
        cost::convert(d),
        format!(
            "ALTER TABLE {table} MODIFY {owner} {}",
            mysql_def(&exact_info, &sql_type, info.nullable, true)
        ),
    );
    Ok(Some(format!(
        "ALTER TABLE {table} MODIFY {owner} {}",
        mysql_def(info, &info.sql_type, info.nullable, true)
    )))
}

/// The statements that drop an index, and recreate it.
fn drop_index(d: Dialect, t: &StoredTable, index: &IndexInfo) -> Result<(String, String, String)> {
    let table = t.table;
    // Index names come from the catalog: only plain identifiers are taken,
    // and they go into SQL quoted (a reserved word, or capitals on
    // PostgreSQL, name that index and no other).
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
    let name = quoted(d, &index.name);
    let qualified = match schema {
        Some(s) if d == Dialect::Postgres => format!("{}.{name}", quoted(d, s)),
        _ => name.clone(),
    };
    let table = quoted(d, table);
    match d {
        Dialect::Postgres => {
            if let Some(def) = &index.constraint {
                return Ok((
                    format!("ALTER TABLE {table} DROP CONSTRAINT {name}"),
                    format!("ALTER TABLE {table} ADD CONSTRAINT {name} {def}"),
                    cost::add_constraint(d).into(),
                ));
            }
        }
        Dialect::Sqlite if index.definition.is_none() => {
            return Err(config(
                t.table,
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
            t.table,
            format_args!(
                "the index {} (on an expression) cannot be recreated from the catalog: drop it by hand first",
                index.name
            ),
        ));
    };
    let drop = match d {
        Dialect::Mysql => format!("DROP INDEX {name} ON {table}"),
        _ => format!("DROP INDEX {qualified}"),
    };
    Ok((drop, def.clone(), cost::create_index(d).into()))
}

/// `ALTER TABLE` that sets (`set`) or drops `NOT NULL` on a column of
/// PostgreSQL or MySQL (SQLite has triggers instead).
fn not_null_sql(d: Dialect, table: &str, column: &str, sql_type: &str, set: bool) -> String {
    let (table, column) = (quoted(d, table), quoted(d, column));
    match (d, set) {
        (Dialect::Mysql, true) => {
            format!("ALTER TABLE {table} MODIFY {column} {sql_type} NOT NULL")
        }
        (Dialect::Mysql, false) => format!("ALTER TABLE {table} MODIFY {column} {sql_type} NULL"),
        (_, true) => format!("ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL"),
        (_, false) => format!("ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL"),
    }
}

/// Refuses (aborts the migration) while `condition` holds for any row,
/// with an error naming the table and `message`.
///
/// - PostgreSQL: the table is locked first (`ACCESS EXCLUSIVE`, held until
///   the migration's transaction ends), so no row written after the
///   guard's scan reaches the statements after it unchecked; then a `DO`
///   block raises.
/// - MySQL/MariaDB: a temporary table with a unique key named by the reason
///   gets the table's name, then the name again for a matching row: the
///   duplicate key ("Duplicate entry '<table>' for key '<reason>'") fails
///   the statement whatever the server does with CHECK constraints (MySQL
///   before 8.0.16 parses and ignores them) and whatever its `sql_mode`.
/// - SQLite: the database's write lock first (as PostgreSQL's lock), then
///   a temporary table whose CHECK refuses a count above zero.
fn guard(s: &mut Script, d: Dialect, t: &StoredTable, condition: &str, message: &str) {
    let table = quoted(d, t.table);
    let reason = format!("{}: {message}", t.table);
    // The temporary table's constraint, named by the reason: the error
    // names it.
    let constraint: String = format!(
        "phi_{}",
        message.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
    .chars()
    .take(60)
    .collect();
    match d {
        Dialect::Postgres => {
            s.stmt(
                cost::lock(d),
                format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"),
            );
            s.stmt(
                cost::guard(d),
                format!(
                    "DO $$ BEGIN IF EXISTS (SELECT 1 FROM {table} WHERE {condition}) THEN \
                     RAISE EXCEPTION '{reason}'; END IF; END $$"
                ),
            );
        }
        Dialect::Mysql => {
            s.note(&format!(
                "Refuses unless no row of {} matches: {message} (a duplicate key named by the reason).",
                t.table
            ));
            let temp = "DROP TEMPORARY TABLE IF EXISTS phi_guard";
            s.stmt(cost::guard(d), temp);
            s.stmt(
                cost::guard(d),
                format!(
                    "CREATE TEMPORARY TABLE phi_guard (table_name VARCHAR(250) CHARACTER SET ascii NOT NULL, \
                     CONSTRAINT {constraint} UNIQUE (table_name))"
                ),
            );
            let name = t.table;
            s.stmt(
                cost::guard(d),
                format!("INSERT INTO phi_guard (table_name) VALUES ('{name}')"),
            );
            s.stmt(
                cost::guard(d),
                format!(
                    "INSERT INTO phi_guard (table_name) SELECT '{name}' FROM {table} WHERE {condition} LIMIT 1"
                ),
            );
            s.stmt(cost::guard(d), temp);
        }
        Dialect::Sqlite => {
            let flag = quoted(d, t.flag_column);
            s.stmt(
                cost::lock(d),
                format!("UPDATE {table} SET {flag} = {flag} WHERE 0"),
            );
            // A temporary table whose CHECK refuses a count above zero: the
            // INSERT fails, and the migration with it, naming the check.
            let temp = "DROP TABLE IF EXISTS temp.phi_guard";
            s.note(&format!(
                "Refuses unless no row of {} matches: {message}.",
                t.table
            ));
            s.stmt(cost::guard(d), temp);
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

/// The condition "`t`'s encrypted flag is on" (`on`) or "is off", on
/// `prefix`'s columns (`NEW.` in a trigger). A NULL flag is off: a row
/// whose flag no one set is not taken as sealed.
fn flag_is(d: Dialect, t: &StoredTable, prefix: &str, on: bool) -> String {
    let flag = format!("{prefix}{}", quoted(d, t.flag_column));
    match (t.flag_is_bool && d == Dialect::Postgres, on) {
        (true, true) => format!("{flag} IS TRUE"),
        (true, false) => format!("{flag} IS NOT TRUE"),
        (false, true) => format!("{flag} <> 0"),
        (false, false) => format!("({flag} IS NULL OR {flag} = 0)"),
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
            format!(
                "ALTER TABLE {} DROP COLUMN {}",
                quoted(d, table),
                quoted(d, t.flag_column)
            ),
        )]);
    }
    // Each index column with its length, and whether it is searched within
    // one owner (blind and derived indexes: indexed with the owner column)
    // or across owners (lookup indexes).
    let mut indexed: Vec<(&str, u32, bool)> = t
        .index_columns()
        .map(|(_, i, index)| (i, u32::try_from(index.len()).unwrap_or(16), true))
        .chain(t.compounds.iter().map(|c| {
            (
                c.column,
                u32::try_from(c.index.tag_len()).unwrap_or(16),
                true,
            )
        }))
        .collect();
    indexed.extend(
        options
            .lookup_columns
            .iter()
            .map(|c| (c.as_str(), 20, false)),
    );
    for (column, len, per_owner) in indexed {
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
            let on = if per_owner {
                format!("{}, {column}", t.owner_column)
            } else {
                column.to_owned()
            };
            up.stmt(
                cost::create_index(d),
                format!("CREATE INDEX {name} ON {table} ({on})"),
            );
            let index = quoted(d, &name);
            group.push((
                cost::drop_index(d).to_owned(),
                match d {
                    Dialect::Mysql => format!("DROP INDEX {index} ON {}", quoted(d, table)),
                    _ => match split(table).0 {
                        Some(s) if d == Dialect::Postgres => {
                            format!("DROP INDEX {}.{index}", quoted(d, s))
                        }
                        _ => format!("DROP INDEX {index}"),
                    },
                },
            ));
        }
        if schema.column(column).is_none() {
            group.push((
                cost::drop_column(d).to_owned(),
                format!(
                    "ALTER TABLE {} DROP COLUMN {}",
                    quoted(d, table),
                    quoted(d, column)
                ),
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
/// `schema` is the live table as it is when the recording runs (after any
/// conversion of the plain columns to bytes in `up.sql`).
fn record_legacy(
    up: &mut Script,
    d: Dialect,
    t: &StoredTable,
    text: &dyn Fn(&str) -> bool,
) -> Result<()> {
    up.note(
        "Legacy ciphertexts (Fernet, v1:) are recorded now, before phi's writers run: the backfill decodes \
         only a value recorded in its own row, column and owner, so a token copied in later never decodes.",
    );
    for (i, statement) in table_record_sql(t, d, &|c| text(c.column))?
        .into_iter()
        .enumerate()
    {
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
                // down.sql sets the column's default again: only a literal
                // is copied (an expression could mean something else, or
                // nothing, when down runs).
                if to_bytes.is_some()
                    && let Some(default) = &info.default
                {
                    literal_default(d, table, c.column, default)?;
                }
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
                &flag_is(d, t, "", true),
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
            let owner_back = owner_byte_exact(&mut up, d, t, schema)?;
            let undo = add_phi_columns(&mut up, d, t, schema, options)?;
            // Every plain column is binary by now.
            record_legacy(&mut up, d, t, &|_| false)?;
            for (cost, s) in undo {
                down.stmt(&cost, s);
            }
            for (_, info) in converts.iter().rev() {
                match d {
                    Dialect::Postgres => {
                        down.stmt(
                            cost::convert(d),
                            format!(
                                "ALTER TABLE {} ALTER COLUMN {2} TYPE {1} USING convert_from({2}, 'UTF8')::{1}",
                                quoted(d, table),
                                info.sql_type,
                                quoted(d, &info.name),
                            ),
                        );
                        if let Some(default) = &info.default {
                            down.stmt(
                                cost::default(d),
                                format!(
                                    "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {default}",
                                    quoted(d, table),
                                    quoted(d, &info.name)
                                ),
                            );
                        }
                    }
                    _ => down.stmt(
                        cost::convert(d),
                        format!(
                            "ALTER TABLE {} MODIFY {} {}",
                            quoted(d, table),
                            quoted(d, &info.name),
                            mysql_def(info, &info.sql_type, info.nullable, true)
                        ),
                    ),
                }
            }
            for (_, (_, recreate, cost)) in &dropped {
                down.stmt(cost, recreate);
            }
            if let Some(back) = owner_back {
                down.stmt(cost::convert(d), back);
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
            let owner_back = owner_byte_exact(&mut up, d, t, schema)?;
            let undo = add_phi_columns(&mut up, d, t, schema, options)?;
            // The plain columns keep their types.
            record_legacy(&mut up, d, t, &|column| {
                schema
                    .column(column)
                    .is_none_or(|info| !info.sql_type.eq_ignore_ascii_case("bytea"))
            })?;
            // After finalize's down and before decrypt-back, a shadow holds
            // the only copy of its value: dropping it then loses data.
            let only_copy = t
                .columns
                .iter()
                .map(|c| {
                    format!(
                        "({} IS NULL AND {} IS NOT NULL)",
                        quoted(d, c.column),
                        quoted(d, &shadow_name(c))
                    )
                })
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
                    format!(
                        "ALTER TABLE {} DROP COLUMN {}",
                        quoted(d, table),
                        quoted(d, shadow)
                    ),
                );
            }
            if let Some(back) = owner_back {
                down.stmt(cost::convert(d), back);
            }
        }
        Strategy::Finalize => finalize(&mut up, &mut down, t, schema, d, options)?,
    }
    Ok(Migration {
        strategy,
        table: table.to_owned(),
        up: up.0,
        down: down.0,
    })
}

/// Refuses a column default that is not a literal. `down.sql` sets the
/// default again from the text the catalog gave: a literal (a string, a
/// number, `NULL`, `TRUE`, `FALSE`; on PostgreSQL with `::type` casts, as
/// `'x'::character varying`) means the same then; an expression (a
/// function call, a sequence, a subquery) may not, and is not copied into
/// SQL that runs later.
fn literal_default(d: Dialect, table: &str, column: &str, default: &str) -> Result<()> {
    if is_literal(d, default) {
        Ok(())
    } else {
        Err(config(
            table,
            format_args!(
                "column {column}: its default {default:?} is not a literal (a string, a number, NULL, TRUE or \
                 FALSE), so down.sql cannot set it again: drop the default before generating (ALTER TABLE … \
                 ALTER/MODIFY), and set it again by hand after a down migration"
            ),
        ))
    }
}

/// Whether `text` is one SQL literal of `d`, optionally in parentheses
/// (SQLite keeps `('x')` as written) and, on PostgreSQL, cast (`::type`).
fn is_literal(d: Dialect, text: &str) -> bool {
    let mut s = text.trim();
    while let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        s = inner.trim();
    }
    let Some(mut rest) = literal_token(d, s) else {
        return false;
    };
    if d == Dialect::Postgres {
        while let Some(after) = rest.trim_start().strip_prefix("::") {
            match type_name(after) {
                Some(r) => rest = r,
                None => return false,
            }
        }
    }
    rest.trim().is_empty()
}

/// The text after one literal at the start of `s`, if it starts with one.
fn literal_token(d: Dialect, s: &str) -> Option<&str> {
    let word_end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    let word = &s[..word_end];
    if ["NULL", "TRUE", "FALSE"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
    {
        return Some(&s[word_end..]);
    }
    if let Some(body) = s.strip_prefix('\'') {
        // A string: '' is a quote inside it; on MySQL a backslash escapes
        // the next character (as the server reads it).
        let mut chars = body.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' if d == Dialect::Mysql => {
                    chars.next()?;
                }
                '\'' => {
                    let after = &body[i + 1..];
                    match after.strip_prefix('\'') {
                        Some(_) => {
                            chars.next();
                        }
                        None => return Some(after),
                    }
                }
                _ => {}
            }
        }
        return None;
    }
    // A number: [+-] digits [. digits] [e [+-] digits].
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let mut n = digits(&mut i);
    if b.get(i) == Some(&b'.') {
        i += 1;
        n += digits(&mut i);
    }
    if n == 0 {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return None;
        }
    }
    let rest = &s[i..];
    // `1x` is not a number followed by something else.
    (!rest.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')).then_some(rest)
}

/// The text after a PostgreSQL type name at the start of `s`: a name, the
/// words of the multi-word types (`character varying`, `timestamp without
/// time zone`), `(n)` or `(n,m)` modifiers and `[]`, as `format_type`
/// writes them.
fn type_name(s: &str) -> Option<&str> {
    const WORDS: [&str; 13] = [
        "varying",
        "precision",
        "with",
        "without",
        "time",
        "zone",
        "year",
        "month",
        "day",
        "hour",
        "minute",
        "second",
        "to",
    ];
    let s = s.trim_start();
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        return None;
    }
    let mut first = true;
    let mut rest = s;
    loop {
        let t = rest.trim_start();
        if let Some(r) = t.strip_prefix('(') {
            let close = r.find(')')?;
            if !r[..close]
                .chars()
                .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
            {
                return None;
            }
            rest = &r[close + 1..];
        } else if let Some(r) = t.strip_prefix("[]") {
            rest = r;
        } else if t.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
            let end = t
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(t.len());
            if !first && !WORDS.iter().any(|w| t[..end].eq_ignore_ascii_case(w)) {
                return None;
            }
            first = false;
            rest = &t[end..];
        } else {
            return Some(rest);
        }
    }
}

/// The reason the finalize guard gives.
const NOT_SEALED: &str = "rows are not sealed, run backfill and verify first";

/// One column finalize replaces: the model's column, the plain column and
/// the shadow (its name and catalog entry).
type Pair<'a> = (&'a StoredColumn, &'a ColumnInfo, String, &'a ColumnInfo);

/// The finalize migration ([`Strategy::Finalize`]) of `t` into `up` and
/// `down`.
///
/// No flag-off (or NULL-flag) row, no row whose plain value has no sealed
/// copy, and no row whose sealed copy is not an envelope can lose its
/// value to the drop: the guard that refuses them runs where no such row
/// can be written until the plain columns are gone.
///
/// - PostgreSQL: one transaction (Diesel runs each migration in one) that
///   locks the table first, then checks, then changes it.
/// - SQLite: the same, with the database's write lock.
/// - MySQL/MariaDB, where each DDL statement commits on its own: the
///   check, then triggers that refuse flag-off and shadow-less writes, the
///   check again (rows written before the triggers), then one `ALTER TABLE`
///   that drops the plain columns and puts each shadow in its place (whole
///   or not at all), then the triggers dropped. The migration's comments
///   say how to recover from a failure at each step.
fn finalize(
    up: &mut Script,
    down: &mut Script,
    t: &StoredTable,
    schema: &TableSchema,
    d: Dialect,
    options: &Options,
) -> Result<()> {
    let table = t.table;
    let column = |name: &str| -> Result<&ColumnInfo> {
        schema
            .column(name)
            .ok_or_else(|| config(table, format_args!("column {name} does not exist")))
    };
    if !t.has_shadow() {
        return Err(config(
            table,
            "the model has no shadow column (#[phi(encrypt, shadow)]): nothing to finalize",
        ));
    }
    header(
        up,
        t,
        d,
        Strategy::Finalize,
        "Ends the dual-write phase: refused while a row's flag is off (or NULL) or a plain value has no sealed \
         copy; drops the plain columns and their indexes, renames each shadow to its column's name, restores \
         NOT NULL, adds the sealed check.",
    );
    header(
        down,
        t,
        d,
        Strategy::Finalize,
        "Re-adds the plain columns (nullable, empty: `decrypt-back` refills them) beside the sealed ones, \
         renamed back to their shadow names.",
    );
    column(t.flag_column)?;
    let shadowed: Vec<_> = t.columns.iter().filter(|c| c.shadow.is_some()).collect();
    let mut pairs: Vec<Pair<'_>> = Vec::new();
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
    // A row left unsealed (its flag off or NULL), or sealed with a shadow
    // missing where its plain column holds a value, or a shadow holding
    // something other than an envelope, would lose its value.
    let unsealed = std::iter::once(flag_is(d, t, "", false))
        .chain(pairs.iter().flat_map(|(c, _, shadow, _)| {
            let (plain, shadow) = (quoted(d, c.column), quoted(d, shadow));
            [
                format!("({plain} IS NOT NULL AND {shadow} IS NULL)"),
                format!("({shadow} IS NOT NULL AND NOT {})", is_envelope(d, &shadow)),
            ]
        }))
        .collect::<Vec<_>>()
        .join(" OR ");
    if d == Dialect::Mysql {
        return finalize_mysql(up, down, t, &pairs, &dropped, check.as_ref(), &unsealed);
    }
    let q = |name: &str| quoted(d, name);
    let qt = q(table);
    guard(up, d, t, &unsealed, NOT_SEALED);
    for (_, (drop, _, _)) in &dropped {
        up.stmt(cost::drop_index(d), drop);
    }
    for (c, _, _, _) in &pairs {
        up.stmt(
            cost::drop_column(d),
            format!("ALTER TABLE {qt} DROP COLUMN {}", q(c.column)),
        );
    }
    for (c, _, shadow, _) in &pairs {
        up.stmt(
            cost::rename(d),
            format!(
                "ALTER TABLE {qt} RENAME COLUMN {} TO {}",
                q(shadow),
                q(c.column)
            ),
        );
    }
    let required: Vec<_> = pairs.iter().filter(|(_, p, _, _)| !p.nullable).collect();
    let bare = split(table).1;
    let not_null = format!("phi_not_null_{bare}");
    name_fits(table, "trigger", &format!("{not_null}_update"))?;
    if !required.is_empty() {
        if d == Dialect::Sqlite {
            up.note("SQLite cannot add NOT NULL to a column: triggers refuse NULL instead.");
            let cols: Vec<&str> = required.iter().map(|(c, _, _, _)| c.column).collect();
            let when = cols
                .iter()
                .map(|c| format!("NEW.{} IS NULL", q(c)))
                .collect::<Vec<_>>()
                .join(" OR ");
            for (event, suffix) in [("INSERT", "insert"), ("UPDATE", "update")] {
                up.stmt(
                    cost::set_not_null(d),
                    format!(
                        "CREATE TRIGGER {} BEFORE {event} ON {qt} FOR EACH ROW \
                         WHEN {when} BEGIN SELECT RAISE(ABORT, '{table}: {} must not be NULL'); END",
                        q(&format!("{not_null}_{suffix}")),
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
                    format!("DROP TRIGGER {}", q(&format!("{not_null}_{suffix}"))),
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
            format!(
                "ALTER TABLE {qt} RENAME COLUMN {} TO {}",
                q(c.column),
                q(shadow)
            ),
        );
    }
    down.note(
        "The plain columns come back empty: `decrypt-back` refills them from the sealed values.",
    );
    for (c, plain, _, _) in &pairs {
        down.stmt(
            cost::add_column(d, false),
            format!(
                "ALTER TABLE {qt} ADD COLUMN {} {} NULL",
                q(c.column),
                plain.sql_type
            ),
        );
    }
    for (_, (_, recreate, cost)) in &dropped {
        down.stmt(cost, recreate);
    }
    Ok(())
}

/// [`finalize`] on MySQL/MariaDB, where every DDL statement commits on its
/// own: see the recovery notes it writes into `up.sql`.
fn finalize_mysql(
    up: &mut Script,
    down: &mut Script,
    t: &StoredTable,
    pairs: &[Pair<'_>],
    dropped: &[(&IndexInfo, (String, String, String))],
    check: Option<&crate::legacy::SealedCheck>,
    unsealed: &str,
) -> Result<()> {
    let d = Dialect::Mysql;
    let table = t.table;
    let q = |name: &str| quoted(d, name);
    let qt = q(table);
    let (schema, bare) = split(table);
    let trigger = |suffix: &str| {
        let name = q(&format!("phi_finalize_{bare}_{suffix}"));
        match schema {
            Some(s) => format!("{}.{name}", q(s)),
            None => name,
        }
    };
    name_fits(table, "trigger", &format!("phi_finalize_{bare}_update"))?;
    let (insert, update) = (trigger("insert"), trigger("update"));
    up.note(&format!(
        "MySQL/MariaDB commit each DDL statement on its own. The steps, and what a failure at each leaves:\n\
         1. Triggers of a failed earlier run dropped; the check. Refused: nothing changed. Run backfill and \
         verify, then this again.\n\
         2. Triggers installed that refuse every write of a flag-off (or NULL) row or of a plain value \
         without its sealed copy, until step 5. A failure: at most the triggers exist; run this again, or \
         go back to dual writes with DROP TRIGGER IF EXISTS {insert}; DROP TRIGGER IF EXISTS {update};\n\
         3. The check again, for rows written before the triggers. Refused: the table is unchanged and the \
         triggers stay (flag-off writes are refused): backfill and run this again, or drop the triggers as in 2.\n\
         4. One ALTER TABLE drops the plain columns and their indexes and puts each shadow in its column's \
         place (NOT NULL, sealed check): it happens whole or not at all. A failure (a NULL sealed value in a \
         NOT NULL column, the sealed check, a lock timeout) leaves the table unchanged and every value \
         readable: as 3.\n\
         5. The triggers dropped. A failure here: the table is finalized, and the triggers (which name the \
         dropped columns) fail every write until dropped: drop them as in 2, then record this migration as \
         run (Diesel has not): INSERT INTO __diesel_schema_migrations (version) VALUES ('<this directory's \
         version>'). Running this again instead drops them and then fails at its first check, changing \
         nothing else."
    ));
    up.0.push('\n');
    for name in [&insert, &update] {
        up.stmt(
            cost::drop_trigger(d),
            format!("DROP TRIGGER IF EXISTS {name}"),
        );
    }
    guard(up, d, t, unsealed, NOT_SEALED);
    let signal = |text: String| {
        // MESSAGE_TEXT holds 128 characters; the table's name comes first.
        let text: String = text.chars().take(128).collect();
        format!("SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = '{text}'")
    };
    let mut body = format!(
        "IF {} THEN {}",
        flag_is(d, t, "NEW.", false),
        signal(format!(
            "{table}: finalize is running: a row with {} off or NULL is refused",
            t.flag_column
        ))
    );
    for (c, _, shadow, _) in pairs {
        let (plain, sealed) = (format!("NEW.{}", q(c.column)), format!("NEW.{}", q(shadow)));
        let _ = write!(
            body,
            "; ELSEIF {plain} IS NOT NULL AND {sealed} IS NULL THEN {}; ELSEIF {sealed} IS NOT NULL AND NOT {} THEN {}",
            signal(format!(
                "{table}: finalize is running: {} without its sealed copy in {shadow} is refused",
                c.column
            )),
            is_envelope(d, &sealed),
            signal(format!(
                "{table}: finalize is running: {shadow} must hold an envelope"
            ))
        );
    }
    for (name, event) in [(&insert, "INSERT"), (&update, "UPDATE")] {
        up.stmt(
            cost::lock(d),
            format!("CREATE TRIGGER {name} BEFORE {event} ON {qt} FOR EACH ROW BEGIN {body}; END IF; END"),
        );
    }
    up.note("The check again: rows written before the triggers were installed.");
    up.0.push('\n');
    guard(up, d, t, unsealed, NOT_SEALED);
    let mut clauses: Vec<String> = dropped
        .iter()
        .map(|(index, _)| format!("DROP INDEX {}", q(&index.name)))
        .collect();
    for (c, plain, shadow, sealed) in pairs {
        clauses.push(format!("DROP COLUMN {}", q(c.column)));
        clauses.push(format!(
            "CHANGE COLUMN {} {} {}",
            q(shadow),
            q(c.column),
            mysql_def(sealed, &sealed.sql_type, plain.nullable, false)
        ));
    }
    if let Some(check) = check {
        clauses.push(format!(
            "ADD CONSTRAINT {} CHECK ({})",
            q(&check.name),
            check.condition
        ));
    } else {
        up.note("No sealed check (--no-check).");
    }
    up.stmt(
        cost::finalize_alter(true),
        format!("ALTER TABLE {qt} {}", clauses.join(", ")),
    );
    for name in [&insert, &update] {
        up.stmt(cost::drop_trigger(d), format!("DROP TRIGGER {name}"));
    }

    // down: whatever a failed up left installed, then one ALTER TABLE.
    for name in [&insert, &update] {
        down.stmt(
            cost::drop_trigger(d),
            format!("DROP TRIGGER IF EXISTS {name}"),
        );
    }
    down.note(
        "The plain columns come back empty: `decrypt-back` refills them from the sealed values.",
    );
    let mut clauses = Vec::new();
    if let Some(check) = check {
        clauses.push(format!("DROP CONSTRAINT {}", q(&check.name)));
    }
    for (c, plain, shadow, sealed) in pairs {
        clauses.push(format!(
            "CHANGE COLUMN {} {} {}",
            q(c.column),
            q(shadow),
            mysql_def(sealed, &sealed.sql_type, true, false)
        ));
        clauses.push(format!(
            "ADD COLUMN {} {}",
            q(c.column),
            mysql_def(plain, &plain.sql_type, true, false)
        ));
    }
    down.stmt(
        cost::finalize_alter(false),
        format!("ALTER TABLE {qt} {}", clauses.join(", ")),
    );
    for (_, (_, recreate, cost)) in dropped {
        down.stmt(cost, recreate);
    }
    Ok(())
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
            derived: &[],
            lookup_index: None,
            canonical: crate::migrate::canonical::<String>,
        };
        let mut last = column("last_name", "last_name_encrypted");
        last.blind_index = Some(("last_name_bidx", Normalize::TRIM_LOWERCASE));
        let mut dob = column("dob", "dob_encrypted");
        dob.derived = const { &[("dob_year", crate::blind::DerivedIndex::year().bits(12))] };
        StoredTable {
            table: "cases",
            owner_column: "user_id",
            owner_type: Some(ColumnType::Text),
            key_column: "case_id",
            key_type: Some(ColumnType::Text),
            flag_column: "phi_encrypted",
            flag_is_bool: true,
            columns: vec![last, dob],
            compounds: Vec::new(),
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
            byte_exact_collation: (d == Dialect::Mysql).then(|| "utf8mb4_nopad_bin".into()),
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
        assert!(
            up.contains(&r#"DROP INDEX "cases_last""#) && up.contains(&r#"DROP INDEX "cases_dob""#)
        );
        assert!(m.up.contains("rewrites the table and its indexes under an ACCESS EXCLUSIVE lock"));
        let down = statements(&m.down);
        assert_eq!(
            down[0], r#"LOCK TABLE "cases" IN ACCESS EXCLUSIVE MODE"#,
            "{down:#?}"
        );
        assert!(
            down[1].starts_with(
                r#"DO $$ BEGIN IF EXISTS (SELECT 1 FROM "cases" WHERE "phi_encrypted" IS TRUE)"#
            ),
            "{down:#?}"
        );
        assert!(down.contains(&r#"ALTER TABLE "cases" ALTER COLUMN "last_name" TYPE character varying(100) USING convert_from("last_name", 'UTF8')::character varying(100)"#));
        assert!(down.contains(
            &r#"ALTER TABLE "cases" ALTER COLUMN "dob" TYPE date USING convert_from("dob", 'UTF8')::date"#
        ));
        assert!(down.contains(&r#"ALTER TABLE "cases" ALTER COLUMN "last_name" SET DEFAULT 'x'"#));
        assert!(down.contains(&"CREATE UNIQUE INDEX cases_dob ON cases (dob)"));
        let drop_index = down
            .iter()
            .position(|s| *s == r#"DROP INDEX "phi_cases_last_name_bidx""#);
        let drop_column = down
            .iter()
            .position(|s| *s == r#"ALTER TABLE "cases" DROP COLUMN "last_name_bidx""#);
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
        assert!(up.contains(&"DROP INDEX `cases_dob` ON `cases`"));
        // Each index column sized to its tags (a derived 12-bit tag: 2
        // bytes), indexed with the owner.
        assert!(
            up.contains(&"ALTER TABLE cases ADD COLUMN last_name_bidx VARBINARY(16) NULL"),
            "{up:#?}"
        );
        assert!(up.contains(&"ALTER TABLE cases ADD COLUMN dob_year VARBINARY(2) NULL"));
        assert!(
            up.contains(&"CREATE INDEX phi_cases_dob_year ON cases (user_id, dob_year)"),
            "{up:#?}"
        );
        let down = statements(&m.down);
        // The guard fails by a duplicate key, not a CHECK constraint
        // (which MySQL before 8.0.16 ignores).
        assert!(
            !m.down.contains("CHECK"),
            "the guard does not rely on CHECK: {down:#?}"
        );
        assert!(down.contains(&"CREATE TEMPORARY TABLE phi_guard (table_name VARCHAR(250) CHARACTER SET ascii NOT NULL, CONSTRAINT phi_rows_are_sealed__run_decrypt_back_first UNIQUE (table_name))"), "{down:#?}");
        assert!(
            down.contains(&"INSERT INTO phi_guard (table_name) VALUES ('cases')"),
            "{down:#?}"
        );
        assert!(down.contains(&"INSERT INTO phi_guard (table_name) SELECT 'cases' FROM `cases` WHERE `phi_encrypted` <> 0 LIMIT 1"), "{down:#?}");
        assert!(down.contains(&"ALTER TABLE `cases` MODIFY `last_name` varchar(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL DEFAULT 'x'"));
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
        // The write lock first, then the guard (a NULL flag is off).
        assert_eq!(
            up[0], r#"UPDATE "cases" SET "phi_encrypted" = "phi_encrypted" WHERE 0"#,
            "{up:#?}"
        );
        assert_eq!(up[1], "DROP TABLE IF EXISTS temp.phi_guard", "{up:#?}");
        assert!(
            up.contains(
                &r#"INSERT INTO phi_guard (n) SELECT COUNT(*) FROM "cases" WHERE ("phi_encrypted" IS NULL OR "phi_encrypted" = 0) OR ("last_name" IS NOT NULL AND "last_name_encrypted" IS NULL) OR ("last_name_encrypted" IS NOT NULL AND NOT substr("last_name_encrypted", 1, 2) = X'F101') OR ("dob" IS NOT NULL AND "dob_encrypted" IS NULL) OR ("dob_encrypted" IS NOT NULL AND NOT substr("dob_encrypted", 1, 2) = X'F101')"#
            ),
            "{up:#?}"
        );
        assert!(up.contains(&r#"ALTER TABLE "cases" DROP COLUMN "last_name""#));
        assert!(up.contains(
            &r#"ALTER TABLE "cases" RENAME COLUMN "last_name_encrypted" TO "last_name""#
        ));
        assert!(
            up.iter()
                .any(|s| s.starts_with(r#"CREATE TRIGGER "phi_not_null_cases_insert""#))
        );
        assert!(
            up.iter()
                .any(|s| s.starts_with(r#"CREATE TRIGGER "phi_sealed_cases_update""#))
        );
        assert!(m.up.contains("SQLite: rewrites the table (every row)"));
        let down = statements(&m.down);
        assert!(
            down.contains(&r#"ALTER TABLE "cases" ADD COLUMN "last_name" VARCHAR(100) NULL"#),
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

    /// `schema(d)` after the shadow migration: shadows and the flag.
    fn shadowed(d: Dialect) -> TableSchema {
        let mut after = schema(d);
        let (last, dob, flag) = match d {
            Dialect::Postgres => ("bytea", "bytea", "boolean"),
            Dialect::Mysql => ("varbinary(434)", "varbinary(74)", "tinyint(1)"),
            _ => ("BLOB", "BLOB", "BOOLEAN"),
        };
        after
            .columns
            .push(col("last_name_encrypted", last, true, None));
        after.columns.push(col("dob_encrypted", dob, true, None));
        after.columns.push(col("phi_encrypted", flag, false, None));
        after
    }

    #[test]
    fn finalize_on_postgres_locks_the_table_before_its_guard() {
        let d = Dialect::Postgres;
        let m = generate(
            &model(true),
            &shadowed(d),
            d,
            Strategy::Finalize,
            &Options::default(),
        )
        .expect("finalize");
        let up = statements(&m.up);
        assert_eq!(
            up[0], r#"LOCK TABLE "cases" IN ACCESS EXCLUSIVE MODE"#,
            "{up:#?}"
        );
        assert_eq!(
            up[1],
            r#"DO $$ BEGIN IF EXISTS (SELECT 1 FROM "cases" WHERE "phi_encrypted" IS NOT TRUE OR ("last_name" IS NOT NULL AND "last_name_encrypted" IS NULL) OR ("last_name_encrypted" IS NOT NULL AND NOT substring("last_name_encrypted" from 1 for 2) = '\xf101'::bytea) OR ("dob" IS NOT NULL AND "dob_encrypted" IS NULL) OR ("dob_encrypted" IS NOT NULL AND NOT substring("dob_encrypted" from 1 for 2) = '\xf101'::bytea)) THEN RAISE EXCEPTION 'cases: rows are not sealed, run backfill and verify first'; END IF; END $$"#
        );
        assert_eq!(up[2], r#"DROP INDEX "cases_last""#);
        assert!(up.contains(&r#"ALTER TABLE "cases" DROP COLUMN "last_name""#));
        assert!(up.contains(&r#"ALTER TABLE "cases" ALTER COLUMN "last_name" SET NOT NULL"#));
        let down = statements(&m.down);
        assert_eq!(
            down[0],
            r#"ALTER TABLE "cases" DROP CONSTRAINT "phi_sealed_cases""#
        );
        assert!(down.contains(&r#"ALTER TABLE "cases" RENAME COLUMN "dob" TO "dob_encrypted""#));
        assert!(down.contains(
            &r#"ALTER TABLE "cases" ADD COLUMN "last_name" character varying(100) NULL"#
        ));
    }

    #[test]
    fn finalize_on_mysql_refuses_late_writes_by_trigger_and_changes_the_table_in_one_statement() {
        let d = Dialect::Mysql;
        let m = generate(
            &model(true),
            &shadowed(d),
            d,
            Strategy::Finalize,
            &Options::default(),
        )
        .expect("finalize");
        let up = statements(&m.up);
        let at = |prefix: &str| {
            up.iter()
                .enumerate()
                .filter(|(_, s)| s.starts_with(prefix))
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        let drops_first = at("DROP TRIGGER IF EXISTS");
        let guards = at("INSERT INTO phi_guard (table_name) SELECT");
        let triggers = at("CREATE TRIGGER");
        let alters = at("ALTER TABLE");
        let drops_last = at("DROP TRIGGER `");
        assert_eq!(drops_first, [0, 1], "{up:#?}");
        assert_eq!(guards.len(), 2, "{up:#?}");
        assert_eq!(triggers.len(), 2, "{up:#?}");
        assert_eq!(alters.len(), 1, "one ALTER TABLE: {up:#?}");
        assert!(
            guards[0] < triggers[0] && triggers[1] < guards[1] && guards[1] < alters[0],
            "check, triggers, check again, then the change: {up:#?}"
        );
        assert_eq!(drops_last, [alters[0] + 1, alters[0] + 2], "{up:#?}");
        assert!(
            !up.iter().any(|s| s.starts_with("DROP INDEX")),
            "no statement but the ALTER changes the table: {up:#?}"
        );
        assert_eq!(
            up[guards[0]],
            "INSERT INTO phi_guard (table_name) SELECT 'cases' FROM `cases` WHERE (`phi_encrypted` IS NULL OR \
             `phi_encrypted` = 0) OR (`last_name` IS NOT NULL AND `last_name_encrypted` IS NULL) OR \
             (`last_name_encrypted` IS NOT NULL AND NOT LEFT(`last_name_encrypted`, 2) = X'F101') OR (`dob` IS NOT \
             NULL AND `dob_encrypted` IS NULL) OR (`dob_encrypted` IS NOT NULL AND NOT LEFT(`dob_encrypted`, 2) = \
             X'F101') LIMIT 1"
        );
        assert_eq!(
            up[triggers[0]],
            "CREATE TRIGGER `phi_finalize_cases_insert` BEFORE INSERT ON `cases` FOR EACH ROW BEGIN \
             IF (NEW.`phi_encrypted` IS NULL OR NEW.`phi_encrypted` = 0) THEN SIGNAL SQLSTATE '45000' SET \
             MESSAGE_TEXT = 'cases: finalize is running: a row with phi_encrypted off or NULL is refused'; \
             ELSEIF NEW.`last_name` IS NOT NULL AND NEW.`last_name_encrypted` IS NULL THEN SIGNAL SQLSTATE \
             '45000' SET MESSAGE_TEXT = 'cases: finalize is running: last_name without its sealed copy in \
             last_name_encrypted is refused'; ELSEIF NEW.`last_name_encrypted` IS NOT NULL AND NOT \
             LEFT(NEW.`last_name_encrypted`, 2) = X'F101' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = \
             'cases: finalize is running: last_name_encrypted must hold an envelope'; ELSEIF NEW.`dob` IS NOT \
             NULL AND NEW.`dob_encrypted` IS NULL THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'cases: \
             finalize is running: dob without its sealed copy in dob_encrypted is refused'; ELSEIF \
             NEW.`dob_encrypted` IS NOT NULL AND NOT LEFT(NEW.`dob_encrypted`, 2) = X'F101' THEN SIGNAL SQLSTATE \
             '45000' SET MESSAGE_TEXT = 'cases: finalize is running: dob_encrypted must hold an envelope'; END \
             IF; END"
        );
        assert!(up[triggers[1]].contains("BEFORE UPDATE ON `cases`"));
        assert_eq!(
            up[alters[0]],
            "ALTER TABLE `cases` DROP INDEX `cases_last`, DROP INDEX `cases_dob`, DROP COLUMN `last_name`, \
             CHANGE COLUMN `last_name_encrypted` `last_name` varbinary(434) NOT NULL, DROP COLUMN `dob`, \
             CHANGE COLUMN `dob_encrypted` `dob` varbinary(74) NULL, ADD CONSTRAINT `phi_sealed_cases` CHECK \
             (`phi_encrypted` = 0 OR (`last_name` IS NULL OR LEFT(`last_name`, 2) = X'F101') AND (`dob` IS NULL \
             OR LEFT(`dob`, 2) = X'F101'))"
        );
        // The guard fails by a duplicate key: no CHECK constraint of its own.
        assert!(
            up.iter().any(|s| s.starts_with(
                "CREATE TEMPORARY TABLE phi_guard (table_name VARCHAR(250) CHARACTER SET ascii NOT NULL, \
                 CONSTRAINT phi_rows_are_not_sealed__run_backfill_and_verify_first UNIQUE (table_name))"
            )) && !m.up.contains("CHECK (n = 0)")
        );
        for step in [
            "1. ",
            "2. ",
            "3. ",
            "4. ",
            "5. ",
            "__diesel_schema_migrations",
        ] {
            assert!(m.up.contains(step), "recovery for {step}: {}", m.up);
        }

        let down = statements(&m.down);
        assert_eq!(
            &down[..2],
            [
                "DROP TRIGGER IF EXISTS `phi_finalize_cases_insert`",
                "DROP TRIGGER IF EXISTS `phi_finalize_cases_update`"
            ],
            "{down:#?}"
        );
        assert_eq!(
            down[2],
            "ALTER TABLE `cases` DROP CONSTRAINT `phi_sealed_cases`, CHANGE COLUMN `last_name` \
             `last_name_encrypted` varbinary(434) NULL, ADD COLUMN `last_name` varchar(100) NULL, CHANGE COLUMN \
             `dob` `dob_encrypted` varbinary(74) NULL, ADD COLUMN `dob` date NULL"
        );
        assert_eq!(
            &down[3..],
            [
                "CREATE INDEX cases_last ON cases (user_id, last_name)",
                "CREATE UNIQUE INDEX cases_dob ON cases (dob)"
            ]
        );
    }

    #[test]
    fn check_constraints_are_enforced_from_mysql_8_0_16_and_mariadb_10_2_1() {
        for old in [
            "8.0.15",
            "8.0.15-6",
            "5.7.44-log",
            "5.6.51",
            "5.7.25-TiDB-v7.1.0",
            "10.2.0-MariaDB",
            "10.1.48-MariaDB-0+deb9u2",
            "5.5.5-10.1.48-MariaDB",
        ] {
            let e = check_constraints_enforced(old).expect_err(old);
            let message = e.to_string();
            assert!(
                message.contains(old) && message.contains("8.0.16") && message.contains("10.2.1"),
                "{message}"
            );
            assert!(message.contains("ignores"), "{message}");
        }
        for new in [
            "8.0.16",
            "8.0.36-0ubuntu0.22.04.1",
            "8.4.3",
            "9.1.0-commercial",
            "10.2.1-MariaDB",
            "10.11.6-MariaDB-0+deb12u1",
            "11.4.2-MariaDB-log",
            "5.5.5-10.6.1-MariaDB",
        ] {
            check_constraints_enforced(new).unwrap_or_else(|e| panic!("{new}: {e}"));
        }
        for unreadable in ["", "MySQL", "8", "eight.zero"] {
            let e = check_constraints_enforced(unreadable).expect_err(unreadable);
            assert!(e.to_string().contains("cannot read"), "{e}");
        }
    }

    #[test]
    fn only_literal_defaults_are_copied_into_down() {
        for (d, literal) in [
            (Dialect::Postgres, "'x'::character varying"),
            (Dialect::Postgres, "NULL::character varying"),
            (Dialect::Postgres, "'1970-01-01'::date"),
            (Dialect::Postgres, "'it''s'::text"),
            (Dialect::Postgres, "'0'::numeric(10,2)"),
            (Dialect::Postgres, "'{}'::text[]"),
            (Dialect::Postgres, "'12:00'::time without time zone"),
            (Dialect::Postgres, "(-1)"),
            (Dialect::Mysql, "'x'"),
            (Dialect::Mysql, r"'a\'b\\'"),
            (Dialect::Mysql, "NULL"),
            (Dialect::Mysql, "-1.5e3"),
            (Dialect::Sqlite, "('x')"),
            (Dialect::Sqlite, "0"),
            (Dialect::Sqlite, "TRUE"),
        ] {
            assert!(is_literal(d, literal), "{d:?} {literal}");
        }
        for (d, expression) in [
            (Dialect::Postgres, "now()"),
            (Dialect::Postgres, "(now())::text"),
            (Dialect::Postgres, "nextval('cases_id_seq'::regclass)"),
            (Dialect::Postgres, "'x'::text || 'y'::text"),
            (Dialect::Postgres, "'x'::text OR true"),
            (Dialect::Postgres, "'x'::text)"),
            (Dialect::Postgres, r"'a\'b'"),
            (Dialect::Postgres, "CURRENT_DATE"),
            (Dialect::Mysql, "curdate()"),
            (Dialect::Mysql, "concat('a','b')"),
            (Dialect::Mysql, "_utf8mb4'x'"),
            (Dialect::Mysql, r"'a\'"),
            (Dialect::Mysql, "'x'; DROP TABLE cases; --"),
            (Dialect::Sqlite, "CURRENT_TIMESTAMP"),
            (Dialect::Sqlite, "(lower('X'))"),
            (Dialect::Sqlite, "1x"),
            (Dialect::Sqlite, "(select 1)"),
            (Dialect::Sqlite, "'unterminated"),
        ] {
            assert!(!is_literal(d, expression), "{d:?} {expression}");
        }

        let d = Dialect::Postgres;
        let mut s = schema(d);
        s.columns[2].default = Some("upper(current_user)::character varying".into());
        let e = generate(&model(false), &s, d, Strategy::InPlace, &Options::default())
            .expect_err("an expression default");
        let message = e.to_string();
        assert!(
            message.contains("cases")
                && message.contains("last_name")
                && message.contains("upper(current_user)::character varying")
                && message.contains("not a literal"),
            "{message}"
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
    fn in_place_and_shadow_on_mysql_make_a_padding_owner_column_compare_bytes() {
        let d = Dialect::Mysql;
        for (shadow, strategy) in [(false, Strategy::InPlace), (true, Strategy::Shadow)] {
            let mut s = schema(d);
            s.columns[1].collation = Some(("utf8mb4".into(), "utf8mb4_bin".into()));
            let m =
                generate(&model(shadow), &s, d, strategy, &Options::default()).expect("migration");
            let up = statements(&m.up);
            let exact = "ALTER TABLE cases MODIFY user_id varchar(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL";
            let at = up.iter().position(|s| *s == exact);
            let index = up
                .iter()
                .position(|s| s.starts_with("CREATE INDEX phi_cases_last_name_bidx"));
            assert!(
                at.is_some() && at < index,
                "{strategy:?}: before the (owner, index) index: {up:#?}"
            );
            let down = statements(&m.down);
            assert_eq!(
                down.last(),
                Some(
                    &"ALTER TABLE cases MODIFY user_id varchar(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
                ),
                "{strategy:?}: restored last: {down:#?}"
            );

            // Already byte for byte: nothing.
            s.columns[1].collation = Some(("utf8mb4".into(), "utf8mb4_0900_bin".into()));
            let m =
                generate(&model(shadow), &s, d, strategy, &Options::default()).expect("migration");
            assert!(!m.up.contains("MODIFY user_id"), "{}", m.up);

            // CHAR strips trailing spaces whatever its collation.
            s.columns[1].sql_type = "char(36)".into();
            let m =
                generate(&model(shadow), &s, d, strategy, &Options::default()).expect("migration");
            assert!(m.up.contains("ALTER TABLE cases MODIFY user_id varchar(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL"), "{}", m.up);
            assert!(m.down.contains("ALTER TABLE cases MODIFY user_id char(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_0900_bin NOT NULL"), "{}", m.down);

            // A server with no NO PAD collation: refused, naming the column.
            s.columns[1].sql_type = "varchar(100)".into();
            s.columns[1].collation = Some(("utf8mb4".into(), "utf8mb4_general_ci".into()));
            s.byte_exact_collation = None;
            let e = generate(&model(shadow), &s, d, strategy, &Options::default())
                .expect_err("no NO PAD collation");
            assert!(
                e.to_string().contains("user_id") && e.to_string().contains("VARBINARY"),
                "{e}"
            );
        }
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
