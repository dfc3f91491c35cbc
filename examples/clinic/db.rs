//! The database: one Diesel connection type over every backend built in,
//! the clinic's migrations, phi's key store and KEK, and the persisted
//! roll-out.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use diesel::prelude::*;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use phi_types::{
    DieselKeyStore, KeyEncryptionKey, KeyStore, Keyring, LocalKek, Rollout, lifecycle,
};

use crate::Result;
use crate::schema::{cases, deleted_cases};

/// A connection to whichever backend the URL names: typed Diesel queries
/// are written once, against `AnyConnection`.
#[derive(diesel::MultiConnection)]
pub(crate) enum AnyConnection {
    #[cfg(feature = "sqlite")]
    Sqlite(diesel::SqliteConnection),
    #[cfg(feature = "mysql")]
    Mysql(diesel::MysqlConnection),
    #[cfg(feature = "postgres")]
    Postgres(diesel::PgConnection),
}

/// Runs `$body` with `$c` bound to the concrete connection inside
/// `$conn` (an `&mut AnyConnection`), for APIs that take one backend's
/// connection type, such as phi's life-cycle and migration jobs.
macro_rules! on_backend {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            #[cfg(feature = "sqlite")]
            $crate::db::AnyConnection::Sqlite($c) => $body,
            #[cfg(feature = "mysql")]
            $crate::db::AnyConnection::Mysql($c) => $body,
            #[cfg(feature = "postgres")]
            $crate::db::AnyConnection::Postgres($c) => $body,
        }
    };
}
pub(crate) use on_backend;

#[cfg(feature = "sqlite")]
const SQLITE_MIGRATIONS: EmbeddedMigrations =
    embed_migrations!("examples/clinic/migrations/sqlite");
#[cfg(feature = "mysql")]
const MYSQL_MIGRATIONS: EmbeddedMigrations = embed_migrations!("examples/clinic/migrations/mysql");
#[cfg(feature = "postgres")]
const POSTGRES_MIGRATIONS: EmbeddedMigrations =
    embed_migrations!("examples/clinic/migrations/postgres");

/// The backends, chosen by the URL's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Mysql,
    Postgres,
}

/// The backend of `url`, the URL its Diesel connection takes, and how to
/// name the database in output (a SQLite file's path; a server URL without
/// its password). An unknown scheme (`postgress://…`) is refused, never
/// taken for a SQLite file name; text without `://` is a SQLite file path.
pub(crate) fn parse_url(url: &str) -> Result<(Backend, String, String)> {
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        let url = url.replacen("mariadb://", "mysql://", 1);
        Ok((Backend::Mysql, url.clone(), without_password(&url)))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_owned(), without_password(url)))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok((Backend::Sqlite, path.to_owned(), path.to_owned()))
    } else if let Some((scheme, _)) = url.split_once("://") {
        Err(format!(
            "--database-url / DATABASE_URL: unknown scheme {scheme:?}; accepted: sqlite://FILE or a \
             plain file path (feature `sqlite`, on by default), mysql:// or mariadb:// (feature \
             `mysql`), postgres:// or postgresql:// (feature `postgres`)"
        )
        .into())
    } else {
        Ok((Backend::Sqlite, url.to_owned(), url.to_owned()))
    }
}

/// `scheme://user:secret@host/db` as `scheme://user@host/db`.
fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(name, _)| name);
            format!("{scheme}://{user}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// The application's connection (migrated), and phi's key store on the
/// same database. phi's migrations run first (the store is asked to run
/// them): the clinic's roll-out lives
/// in phi's roll-out table, and a clinic migration moves it there.
pub(crate) fn open(backend: Backend, url: &str) -> Result<(AnyConnection, Arc<dyn KeyStore>)> {
    match backend {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            let store = DieselKeyStore::<diesel::SqliteConnection>::builder(url)
                .run_migrations(true)
                .connect()?;
            // A busy timeout (phi writes to the same file from connections
            // of its own) and WAL (readers do not block the writer).
            let mut conn = phi_types::sqlite::establish(url)?;
            conn.run_pending_migrations(SQLITE_MIGRATIONS)
                .map_err(migration_error)?;
            Ok((AnyConnection::Sqlite(conn), Arc::new(store)))
        }
        #[cfg(feature = "mysql")]
        Backend::Mysql => {
            let store = DieselKeyStore::<diesel::MysqlConnection>::builder(url)
                .run_migrations(true)
                .connect()?;
            let mut conn = diesel::MysqlConnection::establish(url)?;
            conn.run_pending_migrations(MYSQL_MIGRATIONS)
                .map_err(migration_error)?;
            Ok((AnyConnection::Mysql(conn), Arc::new(store)))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let store = DieselKeyStore::<diesel::PgConnection>::builder(url)
                .run_migrations(true)
                .connect()?;
            let mut conn = diesel::PgConnection::establish(url)?;
            conn.run_pending_migrations(POSTGRES_MIGRATIONS)
                .map_err(migration_error)?;
            Ok((AnyConnection::Postgres(conn), Arc::new(store)))
        }
        #[allow(unreachable_patterns)]
        other => {
            let (name, feature) = match other {
                Backend::Sqlite => ("SQLite", "sqlite"),
                Backend::Mysql => ("MySQL / MariaDB", "mysql"),
                Backend::Postgres => ("PostgreSQL", "postgres"),
            };
            Err(format!(
                "this clinic was built without {name} support: rebuild with \
                 `cargo run --example clinic --features {feature} -- …`"
            )
            .into())
        }
    }
}

fn migration_error(error: Box<dyn std::error::Error + Send + Sync>) -> crate::Error {
    format!("running the clinic's migrations: {error}").into()
}

/// The development master key file, created in the current directory on
/// the first run when no master key is configured.
pub(crate) const DEV_KEY_FILE: &str = "clinic-dev-master.key";

/// The KEK id of the development key: its own, never a production id such
/// as `local-1`, so a process that falls back to it cannot pass for one
/// configured with the real key.
pub(crate) const DEV_KEK_ID: &str = "clinic-dev";

/// A configured KEK.
pub(crate) type SharedKek = Arc<dyn KeyEncryptionKey>;

/// The KEK that wraps new data keys, and older ones that still unwrap the
/// keys they wrapped.
///
/// - `--kek aws-kms:KEY` (or `PHI_KEK`; a build with `--features aws-kms`):
///   AWS KMS, configured from the AWS environment; a local master key in
///   `PHI_MASTER_KEY` / `PHI_MASTER_KEY_FILE` still unwraps older keys.
/// - `--kek local:ID`, or no `--kek` with `PHI_MASTER_KEY` /
///   `PHI_MASTER_KEY_FILE` set: that local master key, KEK id `ID`
///   (default `PHI_KEK_ID`, else `local-1`): [`phi_types::KeyringConfig`].
/// - Nothing configured: the development key file (KEK id `clinic-dev`),
///   created (mode 0600) with a warning on the first run; refused when the
///   database holds data keys under another KEK.
pub(crate) fn keks(
    spec: Option<phi_types::KekSpec>,
    store: &dyn KeyStore,
) -> Result<(SharedKek, Vec<SharedKek>)> {
    let config = phi_types::KeyringConfig::from_env_with(spec, None)?;
    if !config.is_configured() {
        return Ok((Arc::new(dev_master_key(store)?), Vec::new()));
    }
    Ok(config.keks()?)
}

/// The development key file's KEK, creating the file on the first run.
/// Refused when the database holds data keys under another KEK: those were
/// wrapped by a key that is configured elsewhere, and must stay its to
/// open, not be mixed with a throwaway key's.
fn dev_master_key(store: &dyn KeyStore) -> Result<LocalKek> {
    let mut others: Vec<String> = store
        .key_counts()?
        .into_iter()
        .filter(|c| c.state != phi_types::KeyState::Destroyed && c.kek_id != DEV_KEK_ID)
        .map(|c| c.kek_id)
        .collect();
    others.dedup();
    if !others.is_empty() {
        return Err(format!(
            "no master key is configured, and this database holds data keys wrapped by KEK(s) \
             {}: the development key ({DEV_KEY_FILE}, KEK id {DEV_KEK_ID}) is for a database of \
             its own and is neither created nor used here. Configure the key that wrapped them: \
             PHI_MASTER_KEY or PHI_MASTER_KEY_FILE (with --kek local:ID when its id is not \
             local-1), or --kek aws-kms:KEY. (A development database from before the \
             development key had an id of its own opens with \
             PHI_MASTER_KEY_FILE={DEV_KEY_FILE}.)",
            others.join(", ")
        )
        .into());
    }
    let path = Path::new(DEV_KEY_FILE);
    if !path.exists() {
        let key = LocalKek::generate_master_key_base64()?;
        write_private(path, key.as_bytes())?;
        eprintln!(
            "warning: created {DEV_KEY_FILE}, a master key for development only; production \
             reads it from PHI_MASTER_KEY / PHI_MASTER_KEY_FILE or uses AWS KMS (--kek aws-kms:KEY)"
        );
    }
    Ok(LocalKek::from_file(DEV_KEK_ID, path)?)
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// The name of the clinic's roll-out policy in phi's roll-out table
/// (`phi_rollout`).
pub(crate) const ROLLOUT_POLICY: &str = "clinic";

/// The persisted roll-out: phi's policy `clinic`; every owner's when it
/// was never set.
pub(crate) fn load_rollout(store: &dyn KeyStore) -> Result<Rollout> {
    Ok(lifecycle::fleet_rollout(store, ROLLOUT_POLICY)?.unwrap_or(Rollout::All))
}

/// How a roll-out reads in output.
pub(crate) fn describe_rollout(rollout: &Rollout) -> String {
    match rollout {
        Rollout::All => "every owner's new rows are sealed".to_owned(),
        Rollout::Owners(owners) => {
            let mut owners: Vec<&str> = owners.iter().map(String::as_str).collect();
            owners.sort_unstable();
            const SHOWN: usize = 10;
            let more = owners.len().saturating_sub(SHOWN);
            let mut list = owners
                .iter()
                .take(SHOWN)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if more > 0 {
                list.push_str(&format!(" and {more} more"));
            }
            format!("new rows of {} owner(s) are sealed: {list}", owners.len())
        }
        _ => "no new row is sealed (rows already sealed stay sealed)".to_owned(),
    }
}

/// The owners of the clinic's cases.
pub(crate) fn owners(conn: &mut AnyConnection) -> Result<HashSet<String>> {
    let owners: Vec<String> = cases::table.select(cases::user_id).distinct().load(conn)?;
    Ok(owners.into_iter().collect())
}

/// The next case number for ids with `prefix`, past every id used in
/// `cases` and `deleted_cases`.
pub(crate) fn next_case_number(conn: &mut AnyConnection, prefix: &str) -> Result<u64> {
    let pattern = format!("{prefix}%");
    let live: Option<String> = cases::table
        .filter(cases::case_id.like(&pattern))
        .select(diesel::dsl::max(cases::case_id))
        .first(conn)?;
    let deleted: Option<String> = deleted_cases::table
        .filter(deleted_cases::case_id.like(&pattern))
        .select(diesel::dsl::max(deleted_cases::case_id))
        .first(conn)?;
    let last = [live, deleted]
        .iter()
        .flatten()
        .filter_map(|id| crate::model::case_number(prefix, id))
        .max()
        .unwrap_or(0);
    Ok(last + 1)
}

/// A keyring over `store` and the configured KEKs, with the roll-out given.
/// `follow`: it follows the key-event feed (phi's default), and with it the
/// persisted roll-out, which replaces `rollout` once one was stored; a
/// keyring whose roll-out must stay `rollout` (the writes that must not
/// follow the persisted one) does not follow it.
pub(crate) fn keyring(
    store: &Arc<dyn KeyStore>,
    kek: &Arc<dyn KeyEncryptionKey>,
    older: &[Arc<dyn KeyEncryptionKey>],
    rollout: Rollout,
    follow: bool,
) -> Result<Keyring> {
    let mut builder = Keyring::builder(store.clone(), kek.clone());
    for k in older {
        builder = builder.unwrap_with(k.clone());
    }
    if !follow {
        builder = builder.without_feed();
    }
    Ok(builder
        .actor("clinic")
        .rollout_policy(ROLLOUT_POLICY)
        .rollout(rollout)
        .build()?)
}
