//! phi's migrations: the key store's and the access log's tables, for
//! each backend. The application owns its schema: no store of phi changes
//! it on connect ([`DieselKeyStore::connect`](crate::DieselKeyStore::connect)
//! [checks](check) phi's tables and names what is missing).
//!
//! Either write them into the application's own Diesel migrations
//! directory, where `diesel migration run` applies them with the
//! application's (and `diesel migration revert` can reach them):
//!
//! ```text
//! phi migrations write --dir migrations/ --backend postgres   # or: write_to("migrations", Backend::Postgres)
//! diesel migration run
//! ```
//!
//! or run them from code, in a deployment step or at start-up:
//!
//! ```
//! # #[cfg(feature = "sqlite")] {
//! use diesel::{Connection, SqliteConnection};
//! let mut conn = SqliteConnection::establish(":memory:")?;
//! phi_types::migrations::run_pending(&mut conn)?;
//! phi_types::migrations::check(&mut conn)?;
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! (also `DieselKeyStore::builder(url).run_migrations(true).connect()`,
//! or `phi migrations run`).
//!
//! They are recorded in Diesel's `__diesel_schema_migrations` table under
//! versions of their own, the same on every backend, so they sit beside an
//! application's migrations:
//!
//! | version | migration | tables |
//! |---|---|---|
//! | `2026-11-25-000001` | `phi_key_tables` | `user_encryption_keys`, `encryption_key_audit` |
//! | `2026-11-27-000001` | `kek_check_values` | `kek_check_values` |
//! | `2026-11-28-000001` | `key_event_feed` | `phi_key_feed`, `phi_key_events`, `phi_rollout`, `phi_rollout_owners` |
//! | `2026-11-28-000002` | `feed_readers` | `phi_feed_readers` |
//! | `2026-12-07-000001` | `owner_ids_byte_exact` | every table with an owner id, KEK id, policy or reader name (MySQL / MariaDB only) |
//! | `2026-12-07-000002` | `open_event_kinds` | `phi_key_events` (`kind` any non-empty text) |
//! | `2026-12-07-000003` | `legacy_values` | `phi_legacy_values` |
//! | `2026-12-07-000004` | `rotation_claims` | `phi_rotation_claims` |
//! | `2026-12-07-000005` | `seal_counts` | `phi_seal_counts` |
//! | `2026-12-07-000006` | `access_log` | `phi_access_chains`, `phi_access_batches`, `phi_access_log` |
//!
//! (Later versions are added at the end of this table; the directories
//! `phi-types/migrations/<backend>/` are the authority.)
//!
//! With a table prefix ([`set_table_prefix`](crate::schema::set_table_prefix),
//! set before they run or are written), every table, index and constraint
//! they create carries it (`phi_user_encryption_keys`), under the same
//! versions; the check looks for the prefixed names. Choose the prefix
//! before phi's migrations first run on a database: Diesel records the
//! versions, not the names, so a later prefix finds the versions applied
//! and its tables missing (the check says which).
//!
//! Run by phi ([`run_pending`]) rather than written out:
//!
//! - `diesel migration run` over the application's directory runs only the
//!   application's migrations, and `diesel migration list` shows only them.
//! - `diesel migration revert` reverts the application's latest migration,
//!   never one of phi's: phi's are not in the application's directory. When
//!   one of phi's was recorded under a later version than every
//!   application migration, Diesel stops with "Unable to find migration
//!   version … to revert" instead; revert phi's tables, if ever, with their
//!   own `down.sql` (in `phi-types/migrations/<backend>/`; with a table
//!   prefix, those [`write_to`] writes, which carry it: the shipped ones
//!   name the unprefixed tables, which are then another system's).
//!
//! Either way:
//!
//! - `diesel print-schema` should leave phi's tables out of the
//!   application's `schema.rs` ([`schema`](crate::schema) has them), in
//!   `diesel.toml`:
//!
//!   ```toml
//!   [print_schema]
//!   file = "src/schema.rs"
//!   filter = { except_tables = ["user_encryption_keys", "encryption_key_audit", "kek_check_values", "phi_.*"] }
//!   ```
//!
//!   (with a prefix, the prefixed names: `phi_user_encryption_keys`, …;
//!   `phi_.*` covers every table phi names `phi_…`: today `phi_key_feed`,
//!   `phi_key_events`, `phi_rollout`, `phi_rollout_owners`,
//!   `phi_feed_readers`, `phi_legacy_values`, `phi_rotation_claims` and `phi_seal_counts`; the entries are regular
//!   expressions.)
//!
//! On MySQL / MariaDB, `2026-12-07-000001_owner_ids_byte_exact` makes
//! every owner id column of phi's tables (and the KEK id, roll-out policy
//! and feed reader columns) `VARBINARY`: compared byte for byte, with no
//! padding, where `utf8mb4_bin` took `'acme'` and `'acme '` as equal. Its
//! SQLite and PostgreSQL versions change nothing (their text equality is
//! byte for byte already). The `ALTER TABLE`s copy each table, the audit
//! trail included: run it where that is acceptable.
//!
//! Written out ([`write_to`]) or run by phi ([`run_pending`]), they are
//! recorded under the same versions: a database where phi ran some takes
//! them as applied when the application's directory holds them later, and
//! the other way round.
//!
//! [`DieselKeyStore::connect`](crate::DieselKeyStore::connect) and
//! [`DieselAccessLogStore::connect`](crate::access_log::DieselAccessLogStore::connect)
//! create nothing: they check the tables they use, in one catalog query
//! ([`check`]), and fail with [`Error::Schema`] naming the first table at
//! fault and the migration of phi that creates it. A table of one of
//! phi's names that is another application's (it lacks phi's columns) is
//! refused the same way, and before any DDL when phi is asked to migrate:
//! keep phi's tables in a database of their own (a store connects to any
//! URL), or on PostgreSQL in a schema of their own (the URL's search
//! path). A database user that may not read the catalog of every table of
//! phi connects with `builder(url).check_schema(false)`; a
//! [`Keyring`](crate::Keyring) never creates a table.

use std::time::Duration;

use crate::connection::PhiConnection;
use crate::error::{Error, Result};

/// Applies phi's pending migrations on `conn`; returns how many ran.
///
/// Several processes may start at once against a fresh database: a run that
/// fails while another process is applying the same migrations waits for
/// that process (up to about five seconds) instead of failing.
///
/// # Errors
/// [`Error::Store`] when a migration fails and is still pending afterwards.
pub fn run_pending<C: PhiConnection>(conn: &mut C) -> Result<usize> {
    const ATTEMPTS: u32 = 50;
    let mut attempt = 0;
    loop {
        let error = match conn.run_pending_migrations(Source(C::BACKEND)) {
            Ok(applied) => return Ok(applied.len()),
            Err(error) => error,
        };
        attempt += 1;
        // Done by another process meanwhile? (The check itself may find the
        // database busy: that counts as not done yet.)
        if let Ok(false) = conn.has_pending_migration(Source(C::BACKEND)) {
            return Ok(0);
        }
        if attempt == ATTEMPTS {
            return Err(Error::store("running phi's migrations", error));
        }
        tracing::debug!(attempt, %error, "phi's migrations are busy; retrying");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub use crate::connection::Backend;

/// phi's migration files of `backend`.
fn files(backend: Backend) -> &'static [MigrationFiles] {
    match backend {
        Backend::Sqlite => SQLITE_FILES,
        Backend::Mysql => MYSQL_FILES,
        Backend::Postgres => POSTGRES_FILES,
    }
}

/// One migration's files, as phi ships them.
struct MigrationFiles {
    /// The directory name, `<version>_<name>`.
    name: &'static str,
    up: &'static str,
    down: &'static str,
}

/// phi's migrations of every backend, in order: one list of directory
/// names, the same on every backend (a unit test compares it with the
/// directories).
macro_rules! migration_files {
    ($($name:literal),+ $(,)?) => {
        /// The directory names of phi's migrations, in order.
        #[cfg(test)]
        const NAMES: &[&str] = &[$($name),+];
        migration_files!(@backend SQLITE_FILES "sqlite" $($name),+);
        migration_files!(@backend MYSQL_FILES "mysql" $($name),+);
        migration_files!(@backend POSTGRES_FILES "postgres" $($name),+);
    };
    (@backend $const:ident $backend:literal $($name:literal),+) => {
        const $const: &[MigrationFiles] = &[$(MigrationFiles {
            name: $name,
            up: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/", $backend, "/", $name, "/up.sql")),
            down: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/", $backend, "/", $name, "/down.sql")),
        }),+];
    };
}

migration_files!(
    "2026-11-25-000001_phi_key_tables",
    "2026-11-27-000001_kek_check_values",
    "2026-11-28-000001_key_event_feed",
    "2026-11-28-000002_feed_readers",
    "2026-12-07-000001_owner_ids_byte_exact",
    "2026-12-07-000002_open_event_kinds",
    "2026-12-07-000003_legacy_values",
    "2026-12-07-000004_rotation_claims",
    "2026-12-07-000005_seal_counts",
    "2026-12-07-000006_access_log",
);

/// phi's migrations of a backend as Diesel runs them: the files phi
/// ships, with the process's table prefix
/// ([`set_table_prefix`](crate::schema::set_table_prefix)) before the name
/// of every table, index and constraint, under the versions of their
/// directory names (the same with or without a prefix).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Source(pub Backend);

/// One of [`Source`]'s migrations: its directory name, version and SQL.
struct SourceMigration {
    name: &'static str,
    version: String,
    up: String,
    down: String,
}

/// phi's migrations run in a transaction where the backend has
/// transactional DDL (Diesel's default).
struct InTransaction;

impl diesel::migration::MigrationMetadata for InTransaction {}

impl<DB: diesel::backend::Backend> diesel::migration::Migration<DB> for SourceMigration {
    fn run(
        &self,
        conn: &mut dyn diesel::connection::BoxableConnection<DB>,
    ) -> diesel::migration::Result<()> {
        conn.batch_execute(&self.up)
            .map_err(|e| format!("phi's migration {}: {e}", self.name))?;
        Ok(())
    }

    fn revert(
        &self,
        conn: &mut dyn diesel::connection::BoxableConnection<DB>,
    ) -> diesel::migration::Result<()> {
        conn.batch_execute(&self.down)
            .map_err(|e| format!("reverting phi's migration {}: {e}", self.name))?;
        Ok(())
    }

    fn metadata(&self) -> &dyn diesel::migration::MigrationMetadata {
        &InTransaction
    }

    fn name(&self) -> &dyn diesel::migration::MigrationName {
        self
    }
}

impl std::fmt::Display for SourceMigration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl diesel::migration::MigrationName for SourceMigration {
    fn version(&self) -> diesel::migration::MigrationVersion<'_> {
        diesel::migration::MigrationVersion::from(self.version.as_str())
    }
}

impl<DB: diesel::backend::Backend> diesel::migration::MigrationSource<DB> for Source {
    fn migrations(
        &self,
    ) -> diesel::migration::Result<Vec<Box<dyn diesel::migration::Migration<DB>>>> {
        Ok(files(self.0)
            .iter()
            .map(|files| {
                Box::new(SourceMigration {
                    name: files.name,
                    version: diesel_version(files.name),
                    up: crate::table_names::prefixed_sql(files.up),
                    down: crate::table_names::prefixed_sql(files.down),
                }) as Box<dyn diesel::migration::Migration<DB>>
            })
            .collect())
    }
}

/// The version Diesel records for a migration directory named `name`:
/// the part before the first `_`, without its `-`s
/// (`2026-11-25-000001_phi_key_tables` is `20261125000001`).
fn diesel_version(name: &str) -> String {
    name.split('_').next().unwrap_or_default().replace('-', "")
}

/// What [`write_to`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Written {
    /// The migration directories written (`2026-12-07-000006_access_log`).
    pub created: Vec<String>,
    /// Those already there with phi's files, left as they were.
    pub unchanged: Vec<String>,
}

/// Writes phi's migrations for `backend` into the application's Diesel
/// migrations directory `dir` (created if missing): one directory per
/// migration with its `up.sql` and `down.sql`, so that `diesel migration
/// run` applies them beside the application's own and the application
/// owns the whole schema. What `phi migrations write --dir DIR` does.
///
/// The directories keep the names, and so the versions, that phi records
/// when it runs them itself ([`run_pending`]): on a database where phi
/// already ran some, Diesel takes those as applied and runs only the
/// others. phi's versions all read `YYYY-MM-DD-0000NN` (the
/// `NN`th second after midnight, UTC, of the day the migration was
/// written): `diesel migration generate` names a migration after the
/// current time, so an application's migration could only share a version
/// of phi's if it were generated in those seconds of those days. A
/// migration of the application under the same version as one of phi's is
/// refused here, naming both.
///
/// Idempotent: a directory already holding phi's files is left alone;
/// a file of the same name with other content is never overwritten (the
/// call fails naming it). phi never changes a released migration, so
/// writing again after an upgrade adds the new ones only.
///
/// ```
/// use phi_types::migrations::{self, Backend};
/// let dir = tempfile::tempdir()?;
/// let written = migrations::write_to(dir.path(), Backend::Postgres)?;
/// assert!(written.created.contains(&"2026-11-25-000001_phi_key_tables".to_owned()));
/// assert!(dir.path().join("2026-11-25-000001_phi_key_tables/up.sql").exists());
/// // Again: nothing new.
/// assert!(migrations::write_to(dir.path(), Backend::Postgres)?.created.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::InvalidInput`] (`what` = `migrations directory`) when a file
/// differs from phi's, an application migration has one of phi's versions,
/// or the directory cannot be read or written.
pub fn write_to(dir: impl AsRef<std::path::Path>, backend: Backend) -> Result<Written> {
    let dir = dir.as_ref();
    let refused = |reason: String| Error::InvalidInput {
        what: "migrations directory",
        reason,
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| refused(format!("cannot create {}: {e}", dir.display())))?;
    // The versions the directory already uses, with the names using them.
    let mut existing: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir)
        .map_err(|e| refused(format!("cannot read {}: {e}", dir.display())))?
    {
        let entry = entry.map_err(|e| refused(format!("cannot read {}: {e}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            existing.push(name);
        }
    }
    let mut written = Written::default();
    for files in files(backend) {
        let version = diesel_version(files.name);
        if let Some(other) = existing
            .iter()
            .find(|name| name.as_str() != files.name && diesel_version(name) == version)
        {
            return Err(refused(format!(
                "{} has Diesel version {version}, which phi's migration {} needs: \
                 Diesel would take one for the other; give the application's migration another \
                 version (rename its directory) before writing phi's",
                dir.join(other).display(),
                files.name
            )));
        }
        let target = dir.join(files.name);
        let mut created = false;
        std::fs::create_dir_all(&target)
            .map_err(|e| refused(format!("cannot create {}: {e}", target.display())))?;
        for (file, content) in [("up.sql", files.up), ("down.sql", files.down)] {
            let content = crate::table_names::prefixed_sql(content);
            let path = target.join(file);
            match std::fs::read(&path) {
                Ok(found) if found == content.as_bytes() => {}
                Ok(_) => {
                    return Err(refused(format!(
                        "{} differs from phi's migration {} ({}): phi does not overwrite it; \
                         remove it (and its directory) to write phi's",
                        path.display(),
                        files.name,
                        backend.name()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::write(&path, &content)
                        .map_err(|e| refused(format!("cannot write {}: {e}", path.display())))?;
                    created = true;
                }
                Err(e) => return Err(refused(format!("cannot read {}: {e}", path.display()))),
            }
        }
        if created {
            written.created.push(files.name.to_owned());
        } else {
            written.unchanged.push(files.name.to_owned());
        }
    }
    Ok(written)
}

/// Which of phi's tables a check covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tables {
    /// The key store's ([`DieselKeyStore`](crate::DieselKeyStore)): every
    /// table but the access log's.
    KeyStore,
    /// The access log's
    /// ([`DieselAccessLogStore`](crate::access_log::DieselAccessLogStore)).
    AccessLog,
    /// Every table of phi.
    All,
}

/// A table one of phi's migrations creates, with its columns.
struct Created {
    migration: &'static str,
    table: &'static str,
    columns: &'static [&'static str],
    access_log: bool,
}

/// `Created` for a table of [`crate::schema`], its columns named through
/// Diesel's definitions (so a column renamed there fails to compile here).
macro_rules! created {
    ($migration:literal, $table:ident: $($column:ident),+ $(,)?) => {
        created!(@ $migration, $table, false, $($column),+)
    };
    ($migration:literal, access_log $table:ident: $($column:ident),+ $(,)?) => {
        created!(@ $migration, $table, true, $($column),+)
    };
    (@ $migration:literal, $table:ident, $access_log:literal, $($column:ident),+) => {
        Created {
            migration: $migration,
            table: stringify!($table),
            columns: &[$(stringify!($column)),+],
            access_log: $access_log,
        }
    };
}

/// Every table phi's migrations create, in migration order. A unit test
/// compares it with the tables and columns the migrations leave on SQLite.
const CREATED: &[Created] = &[
    created!("2026-11-25-000001_phi_key_tables", user_encryption_keys:
        owner_id, version, kek_id, wrapped_key, state, created_at, updated_at),
    created!("2026-11-25-000001_phi_key_tables", encryption_key_audit:
        id, occurred_at, owner_id, action, key_version, kek_id, actor, detail),
    created!("2026-11-27-000001_kek_check_values", kek_check_values:
        kek_id, format, check_value, created_at),
    created!("2026-11-28-000001_key_event_feed", phi_key_feed: id, head),
    created!("2026-11-28-000001_key_event_feed", phi_key_events:
        id, occurred_at, kind, owner_id, key_version, actor, detail),
    created!("2026-11-28-000001_key_event_feed", phi_rollout:
        policy, mode, updated_at, updated_by),
    created!("2026-11-28-000001_key_event_feed", phi_rollout_owners: policy, owner_id),
    created!("2026-11-28-000002_feed_readers", phi_feed_readers: reader, position, updated_at),
    created!("2026-12-07-000003_legacy_values", phi_legacy_values:
        table_name, column_name, row_key, owner_id, stored, recorded_at),
    created!("2026-12-07-000004_rotation_claims", phi_rotation_claims:
        job_id, owner_id, state, new_version, claimed_by, claimed_until, updated_at),
    created!("2026-12-07-000005_seal_counts", phi_seal_counts: owner_id, version, seals, updated_at),
    created!("2026-12-07-000006_access_log", access_log phi_access_chains:
        chain, head, head_hash, updated_at),
    created!("2026-12-07-000006_access_log", access_log phi_access_batches:
        chain, id, kind, written_at, last_at, records, key_version, prev_hash, hash,
        pruned_before, pruned_hash, detail),
    created!("2026-12-07-000006_access_log", access_log phi_access_log:
        chain, batch, seq, occurred_at, user_id, purpose, request_id, op, owner_id,
        table_name, row_key, fields),
];

/// The migration that makes identifiers byte-exact on MySQL / MariaDB, and
/// the columns it turns into `VARBINARY` (checked on that backend only:
/// elsewhere it changes nothing).
const BYTE_EXACT: (&str, &[(&str, &str)]) = (
    "2026-12-07-000001_owner_ids_byte_exact",
    &[
        ("user_encryption_keys", "owner_id"),
        ("user_encryption_keys", "kek_id"),
        ("encryption_key_audit", "owner_id"),
        ("kek_check_values", "kek_id"),
        ("phi_key_events", "owner_id"),
        ("phi_rollout", "policy"),
        ("phi_rollout_owners", "policy"),
        ("phi_rollout_owners", "owner_id"),
        ("phi_feed_readers", "reader"),
    ],
);

/// Migrations the check cannot see, and why: each is followed by one it
/// sees, and Diesel applies them in order.
#[cfg(test)]
const UNSEEN: &[&str] = &[
    // Replaces a CHECK constraint of phi_key_events: the catalog query
    // reads columns only (and MySQL before 8.0.16 never stored the CHECK).
    "2026-12-07-000002_open_event_kinds",
];

/// What is wrong with a table.
enum Fault {
    /// Not there, or lacking a column a later migration adds.
    Missing,
    /// There, lacking columns its creating migration defines: not phi's.
    Foreign {
        lacks: Vec<&'static str>,
        has: Vec<String>,
    },
    /// A column of the wrong type (MySQL / MariaDB identifiers not yet
    /// `VARBINARY`).
    NotBinary(&'static str),
}

/// The first fault of phi's `tables` in the database, with its table and
/// migration: a table that is not phi's first, then what is missing, in
/// migration order.
fn first_fault<C: PhiConnection>(
    conn: &mut C,
    tables: Tables,
) -> Result<Option<(String, &'static str, Fault)>> {
    use crate::table_names::sql_name;
    let wanted: Vec<&Created> = CREATED
        .iter()
        .filter(|c| match tables {
            Tables::KeyStore => !c.access_log,
            Tables::AccessLog => c.access_log,
            Tables::All => true,
        })
        .collect();
    let names: Vec<String> = wanted.iter().map(|c| sql_name(c.table)).collect();
    let found = conn
        .catalog_columns(&names.iter().map(String::as_str).collect::<Vec<_>>())
        .map_err(|e| Error::store("reading the catalog for phi's tables", e))?;
    let columns_of = |table: &str| -> Vec<&(String, String, String)> {
        found
            .iter()
            .filter(|(t, _, _)| t.eq_ignore_ascii_case(table))
            .collect()
    };
    let mut missing = None;
    for (created, table) in wanted.iter().zip(names) {
        let has = columns_of(&table);
        if has.is_empty() {
            missing.get_or_insert((table, created.migration, Fault::Missing));
            continue;
        }
        let lacks: Vec<&'static str> = created
            .columns
            .iter()
            .copied()
            .filter(|c| !has.iter().any(|(_, name, _)| name.eq_ignore_ascii_case(c)))
            .collect();
        if !lacks.is_empty() {
            let has = has.iter().map(|(_, name, _)| name.clone()).collect();
            return Ok(Some((
                table,
                created.migration,
                Fault::Foreign { lacks, has },
            )));
        }
    }
    if missing.is_some() {
        return Ok(missing);
    }
    // Byte-exact identifiers: MySQL / MariaDB only (the catalog's type name
    // is `varbinary` there; SQLite and PostgreSQL keep text).
    let (migration, binary) = BYTE_EXACT;
    if C::BINARY_IDENTIFIERS && tables != Tables::AccessLog {
        for &(table, column) in binary {
            let table = sql_name(table);
            let ty = found
                .iter()
                .find(|(t, c, _)| t.eq_ignore_ascii_case(&table) && c.eq_ignore_ascii_case(column));
            if ty.is_some_and(|(_, _, ty)| ty != "varbinary") {
                return Ok(Some((table, migration, Fault::NotBinary(column))));
            }
        }
    }
    Ok(None)
}

/// How to put phi's missing tables in place, for the errors.
const HOW_TO_MIGRATE: &str = "phi changes no schema when a store connects: add phi's migrations to the \
     application's (`phi migrations write --dir migrations/`, then `diesel migration run`), or run them \
     explicitly (`phi migrations run`, `DieselKeyStore::builder(url).run_migrations(true).connect()`, \
     or `phi_types::migrations::run_pending`)";

fn fault_error(table: &str, migration: &str, fault: Fault) -> Error {
    let reason = match fault {
        Fault::Missing => format!(
            "it does not exist: phi's migration {migration} is not applied (nor any later one). \
             {HOW_TO_MIGRATE}. (If it does exist, this login may not see it: MySQL / MariaDB \
             show only the tables a login holds a privilege on.){}",
            if crate::table_names::table_prefix().is_empty() {
                String::new()
            } else {
                format!(
                    " With the table prefix {:?}: if Diesel lists the migration as run, it ran \
                     under another prefix or none (Diesel records versions, not names): use the \
                     prefix phi's tables were created with",
                    crate::table_names::table_prefix()
                )
            }
        ),
        Fault::Foreign { lacks, has } => format!(
            "a table of that name exists but is not phi's: it lacks phi's column(s) {} (it has {}). \
             phi neither uses nor changes it. Give phi's tables a prefix of their own \
             (`phi_types::schema::set_table_prefix(\"phi_\")` at start-up, `PHI_TABLE_PREFIX=phi_` for \
             the `phi` command; then run phi's migrations), or keep them in a database of their own \
             (the key store connects to any URL; on PostgreSQL a schema of their own, through the \
             URL's search path, e.g. `?options=-csearch_path%3Dphi`)",
            lacks.join(", "),
            has.join(", ")
        ),
        Fault::NotBinary(column) => format!(
            "its column {column} is not VARBINARY: phi's migration {migration} is not applied \
             (nor any later one). {HOW_TO_MIGRATE}"
        ),
    };
    Error::Schema {
        table: table.to_owned(),
        migration: migration.to_owned(),
        reason,
    }
}

/// Checks that phi's tables are in place for this build, in one catalog
/// query, and changes nothing: every table phi's migrations create, with
/// its columns (and on MySQL / MariaDB its byte-exact identifier columns).
/// It reads the tables themselves, not Diesel's
/// `__diesel_schema_migrations`: phi's migrations may have been run by
/// phi ([`run_pending`]) or by the application's own `diesel migration run`
/// ([`write_to`]), or by any other tool.
///
/// [`DieselKeyStore::connect`](crate::DieselKeyStore::connect) and
/// [`DieselAccessLogStore::connect`](crate::access_log::DieselAccessLogStore::connect)
/// check the tables they use; this checks them all (a readiness probe).
///
/// ```
/// # #[cfg(feature = "sqlite")] {
/// use diesel::{Connection, SqliteConnection};
/// use phi_types::{migrations, Error};
/// let mut conn = SqliteConnection::establish(":memory:")?;
/// let Err(Error::Schema { table, migration, .. }) = migrations::check(&mut conn) else {
///     panic!("an empty database has none of phi's tables");
/// };
/// assert_eq!((table.as_str(), migration.as_str()),
///            ("user_encryption_keys", "2026-11-25-000001_phi_key_tables"));
/// migrations::run_pending(&mut conn)?;
/// migrations::check(&mut conn)?;
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::Schema`] naming the first table at fault, the migration of
/// phi that creates (or changes) it and what to do: a table of phi's name
/// that is another application's (it lacks phi's columns) first, then the
/// earliest migration not applied; [`Error::Store`] when the catalog
/// cannot be read.
pub fn check<C: PhiConnection>(conn: &mut C) -> Result<()> {
    check_tables(conn, Tables::All)
}

/// [`check`] of some of phi's tables.
pub(crate) fn check_tables<C: PhiConnection>(conn: &mut C, tables: Tables) -> Result<()> {
    match first_fault(conn, tables)? {
        None => Ok(()),
        Some((table, migration, fault)) => Err(fault_error(&table, migration, fault)),
    }
}

/// Runs phi's pending migrations, first refusing a database where a table
/// of phi's name is not phi's (before any DDL), then checks `tables`.
pub(crate) fn migrate_and_check<C: PhiConnection>(conn: &mut C, tables: Tables) -> Result<()> {
    refuse_foreign(conn)?;
    run_pending(conn)?;
    check_tables(conn, tables)
}

/// Refuses a database where a table of phi's name is not phi's (before
/// any migration creates the others).
pub(crate) fn refuse_foreign<C: PhiConnection>(conn: &mut C) -> Result<()> {
    match first_fault(conn, Tables::All)? {
        Some((table, migration, fault @ Fault::Foreign { .. })) => {
            Err(fault_error(&table, migration, fault))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded list of migration names is every backend's directory
    /// listing, in order.
    #[test]
    fn the_migration_list_is_every_backends_directory() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for backend in [Backend::Sqlite, Backend::Mysql, Backend::Postgres] {
            let mut dirs: Vec<String> = std::fs::read_dir(root.join(backend.name()))
                .expect("migrations directory")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            dirs.sort();
            let names: Vec<&str> = files(backend).iter().map(|f| f.name).collect();
            assert_eq!(names, dirs, "{backend:?}");
        }
        let mut sorted = NAMES.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, NAMES, "in order");
    }

    /// Every migration is seen by the check (a table, a column type), or
    /// listed as unseen with its reason; every requirement names one.
    #[test]
    fn the_check_sees_every_migration() {
        for name in NAMES {
            let seen = CREATED.iter().any(|c| c.migration == *name)
                || BYTE_EXACT.0 == *name
                || UNSEEN.contains(name);
            assert!(seen, "the check does not see {name}");
        }
        for created in CREATED {
            assert!(NAMES.contains(&created.migration), "{}", created.migration);
        }
        assert!(NAMES.contains(&BYTE_EXACT.0));
    }

    /// The tables and columns the check expects are exactly those phi's
    /// migrations leave (on SQLite).
    #[cfg(feature = "sqlite")]
    #[test]
    fn the_checked_columns_are_those_the_migrations_create() {
        use diesel::Connection as _;
        let mut conn = diesel::SqliteConnection::establish(":memory:").expect("connect");
        run_pending(&mut conn).expect("migrations");
        let tables: Vec<&str> = CREATED.iter().map(|c| c.table).collect();
        let mut found: Vec<(String, String)> = conn
            .catalog_columns(&tables)
            .expect("catalog")
            .into_iter()
            .map(|(t, c, _)| (t, c))
            .collect();
        found.sort();
        let mut expected: Vec<(String, String)> = CREATED
            .iter()
            .flat_map(|c| {
                c.columns
                    .iter()
                    .map(|col| (c.table.to_owned(), (*col).to_owned()))
            })
            .collect();
        expected.sort();
        assert_eq!(found, expected);
        check(&mut conn).expect("complete");
        // Every phi table of the database is one the check knows.
        #[derive(diesel::QueryableByName)]
        struct Name {
            #[diesel(sql_type = diesel::sql_types::Text)]
            name: String,
        }
        use diesel::RunQueryDsl as _;
        let all: Vec<Name> = diesel::sql_query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_\\_diesel%' ESCAPE '\\' AND name NOT LIKE 'sqlite%'",
        )
        .load(&mut conn)
        .expect("tables");
        for table in all {
            assert!(
                tables.contains(&table.name.as_str()),
                "{} is not checked",
                table.name
            );
        }
    }

    /// The table names the prefix applies to are those the migrations
    /// create, and the longest name the migrations give a table, index or
    /// constraint is the one the prefix's length is checked against.
    #[test]
    fn the_prefixed_names_are_those_of_the_migrations() {
        use crate::table_names::{LONGEST_NAME, TABLES};
        let created: Vec<&str> = CREATED.iter().map(|c| c.table).collect();
        assert_eq!(TABLES, created.as_slice());
        let mut longest = "";
        for backend in [Backend::Sqlite, Backend::Mysql, Backend::Postgres] {
            for f in files(backend) {
                for text in [f.up, f.down] {
                    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                        if TABLES.iter().any(|t| word.starts_with(t)) && word.len() > longest.len()
                        {
                            longest = word;
                        }
                    }
                }
            }
        }
        assert_eq!(longest.len(), LONGEST_NAME, "{longest}");
    }

    #[test]
    fn backends_parse_from_urls_and_names() {
        assert_eq!(
            Backend::from_url("mariadb://u@h/db").expect("url"),
            Backend::Mysql
        );
        assert_eq!(
            Backend::from_url("sqlite://x.db").expect("url"),
            Backend::Sqlite
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").expect("url"),
            Backend::Postgres
        );
        assert!(Backend::from_url("postgress://h/db").is_err());
        assert_eq!("mariadb".parse::<Backend>().expect("name"), Backend::Mysql);
        assert!("oracle".parse::<Backend>().is_err());
        assert_eq!(
            diesel_version("2026-11-25-000001_phi_key_tables"),
            "20261125000001"
        );
    }

    /// The module docs' version table lists every migration directory of
    /// every backend, with its name (so it cannot go stale unseen).
    #[test]
    fn the_version_table_lists_every_migration() {
        let docs = include_str!("migrations.rs");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut checked = 0;
        for backend in ["sqlite", "mysql", "postgres"] {
            for entry in std::fs::read_dir(root.join(backend)).expect("migrations directory") {
                let dir = entry.expect("entry").file_name();
                let dir = dir.to_str().expect("UTF-8 name");
                let (version, name) = dir.split_once('_').expect("<version>_<name>");
                let row = format!("//! | `{version}` | `{name}` |");
                assert!(docs.contains(&row), "the module docs lack the row {row:?}");
                checked += 1;
            }
        }
        assert!(checked >= 12, "{checked} migrations found");
    }
}
