//! The database: which backend a URL names, the service's migrations and
//! phi's key store (set up once, synchronously, before serving), and the
//! diesel-async pool the routes use.

use std::path::Path;
use std::sync::Arc;

use diesel::Connection as _;
#[cfg(feature = "sqlite")]
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use phi_types::{DieselKeyStore, KeyEncryptionKey, KeyStore, LocalKek};

use crate::Result;

/// The routes' connection pool, one variant per backend built in.
#[derive(Clone)]
pub(crate) enum Pool {
    #[cfg(feature = "sqlite")]
    Sqlite(
        diesel_async::pooled_connection::deadpool::Pool<
            diesel_async::sync_connection_wrapper::SyncConnectionWrapper<diesel::SqliteConnection>,
        >,
    ),
    #[cfg(feature = "mysql")]
    Mysql(diesel_async::pooled_connection::deadpool::Pool<diesel_async::AsyncMysqlConnection>),
    #[cfg(feature = "postgres")]
    Postgres(diesel_async::pooled_connection::deadpool::Pool<diesel_async::AsyncPgConnection>),
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

/// Runs `$body` with `$conn` bound to a `&mut` connection from `$pool`, for
/// whichever backend the pool holds: the body is written once and compiled
/// for each. Evaluates to the body's value; a pool error returns early as
/// [`ApiError::pool`](crate::error::ApiError::pool).
macro_rules! with_conn {
    ($pool:expr, $conn:ident => $body:expr) => {
        match $pool {
            #[cfg(feature = "sqlite")]
            $crate::db::Pool::Sqlite(pool) => {
                let mut pooled = pool.get().await.map_err($crate::error::ApiError::pool)?;
                let $conn = &mut *pooled;
                $body
            }
            #[cfg(feature = "mysql")]
            $crate::db::Pool::Mysql(pool) => {
                let mut pooled = pool.get().await.map_err($crate::error::ApiError::pool)?;
                let $conn = &mut *pooled;
                $body
            }
            #[cfg(feature = "postgres")]
            $crate::db::Pool::Postgres(pool) => {
                let mut pooled = pool.get().await.map_err($crate::error::ApiError::pool)?;
                let $conn = &mut *pooled;
                $body
            }
        }
    };
}
pub(crate) use with_conn;

/// The backends, chosen by the URL's scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Mysql,
    Postgres,
}

/// The backend of `url` and the URL its connections take. An unknown
/// scheme is refused; text without `://` is a SQLite file path.
pub(crate) fn parse_url(url: &str) -> Result<(Backend, String)> {
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        Ok((Backend::Mysql, url.replacen("mariadb://", "mysql://", 1)))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_owned()))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok((Backend::Sqlite, path.to_owned()))
    } else if let Some((scheme, _)) = url.split_once("://") {
        Err(format!(
            "--database-url / DATABASE_URL: unknown scheme {scheme:?}; accepted: sqlite://FILE or \
             a file path, mysql:// or mariadb://, postgres:// or postgresql://"
        )
        .into())
    } else {
        Ok((Backend::Sqlite, url.to_owned()))
    }
}

#[cfg(feature = "sqlite")]
const SQLITE_MIGRATIONS: EmbeddedMigrations =
    embed_migrations!("examples/clinic-service/migrations/sqlite");
#[cfg(feature = "mysql")]
const MYSQL_MIGRATIONS: EmbeddedMigrations =
    embed_migrations!("examples/clinic-service/migrations/mysql");
#[cfg(feature = "postgres")]
const POSTGRES_MIGRATIONS: EmbeddedMigrations =
    embed_migrations!("examples/clinic-service/migrations/postgres");

/// SQLite settings of every connection: WAL (readers do not block the
/// writer) and a wait for the write lock rather than an error.
#[cfg(feature = "sqlite")]
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000;";

/// phi's access-log tables in the service's database.
pub(crate) fn access_log_tables(
    backend: Backend,
    url: &str,
) -> Result<Arc<dyn phi_types::access_log::AccessLogStore>> {
    use phi_types::access_log::DieselAccessLogStore;
    match backend {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => Ok(Arc::new(
            DieselAccessLogStore::<diesel::SqliteConnection>::builder(url)
                .run_migrations(true)
                .connect()?,
        )),
        #[cfg(feature = "mysql")]
        Backend::Mysql => Ok(Arc::new(
            DieselAccessLogStore::<diesel::MysqlConnection>::builder(url)
                .run_migrations(true)
                .connect()?,
        )),
        #[cfg(feature = "postgres")]
        Backend::Postgres => Ok(Arc::new(
            DieselAccessLogStore::<diesel::PgConnection>::builder(url)
                .run_migrations(true)
                .connect()?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(format!("this service was built without {other:?} support").into()),
    }
}

/// Runs the service's migrations and opens phi's key store, running
/// phi's own (asked for explicitly), before anything is served.
pub(crate) fn prepare(backend: Backend, url: &str) -> Result<Arc<dyn KeyStore>> {
    fn migrated<C>(conn: &mut C, migrations: EmbeddedMigrations) -> Result<()>
    where
        C: MigrationHarness<C::Backend> + diesel::Connection,
    {
        conn.run_pending_migrations(migrations)
            .map_err(|e| format!("running the service's migrations: {e}"))?;
        Ok(())
    }
    match backend {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            let mut conn = phi_types::sqlite::establish(url)?;
            migrated(&mut conn, SQLITE_MIGRATIONS)?;
            Ok(Arc::new(
                DieselKeyStore::<diesel::SqliteConnection>::builder(url)
                    .run_migrations(true)
                    .connect()?,
            ))
        }
        #[cfg(feature = "mysql")]
        Backend::Mysql => {
            let mut conn = diesel::MysqlConnection::establish(url)?;
            migrated(&mut conn, MYSQL_MIGRATIONS)?;
            Ok(Arc::new(
                DieselKeyStore::<diesel::MysqlConnection>::builder(url)
                    .run_migrations(true)
                    .connect()?,
            ))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let mut conn = diesel::PgConnection::establish(url)?;
            migrated(&mut conn, POSTGRES_MIGRATIONS)?;
            Ok(Arc::new(
                DieselKeyStore::<diesel::PgConnection>::builder(url)
                    .run_migrations(true)
                    .connect()?,
            ))
        }
        #[allow(unreachable_patterns)]
        other => Err(format!(
            "this service was built without {other:?} support: rebuild with \
             `--features {}`",
            format!("{other:?}").to_lowercase()
        )
        .into()),
    }
}

/// The routes' pool of `size` connections.
pub(crate) fn pool(backend: Backend, url: &str, size: usize) -> Result<Pool> {
    use diesel_async::pooled_connection::AsyncDieselConnectionManager;
    use diesel_async::pooled_connection::deadpool::Pool as Deadpool;
    match backend {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            use diesel_async::SimpleAsyncConnection as _;
            use diesel_async::pooled_connection::ManagerConfig;
            use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
            type Conn = SyncConnectionWrapper<diesel::SqliteConnection>;
            let mut config = ManagerConfig::<Conn>::default();
            config.custom_setup = Box::new(|url| {
                Box::pin(async move {
                    let mut conn = <Conn as diesel_async::AsyncConnection>::establish(url).await?;
                    conn.batch_execute(SQLITE_PRAGMAS)
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                    Ok(conn)
                })
            });
            let manager = AsyncDieselConnectionManager::<Conn>::new_with_config(url, config);
            Ok(Pool::Sqlite(
                Deadpool::builder(manager).max_size(size).build()?,
            ))
        }
        #[cfg(feature = "mysql")]
        Backend::Mysql => {
            let manager = AsyncDieselConnectionManager::new(url);
            Ok(Pool::Mysql(
                Deadpool::builder(manager).max_size(size).build()?,
            ))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let manager = AsyncDieselConnectionManager::new(url);
            Ok(Pool::Postgres(
                Deadpool::builder(manager).max_size(size).build()?,
            ))
        }
        #[allow(unreachable_patterns)]
        other => Err(format!("this service was built without {other:?} support").into()),
    }
}

/// The development master key file, created in the current directory on
/// the first run when no master key is configured (as the clinic does).
pub(crate) const DEV_KEY_FILE: &str = "clinic-service-dev-master.key";

/// The development key's KEK id: never a production id such as `local-1`.
pub(crate) const DEV_KEK_ID: &str = "clinic-service-dev";

/// The KEK that wraps new data keys, and older KEKs that still unwrap.
pub(crate) type Keks = (Arc<dyn KeyEncryptionKey>, Vec<Arc<dyn KeyEncryptionKey>>);

/// The KEK that wraps new data keys, configured as the clinic CLI's is:
/// `--kek aws-kms:KEY` (AWS KMS from the AWS environment), `--kek local:ID`
/// or `PHI_MASTER_KEY` / `PHI_MASTER_KEY_FILE` (a local master key, id
/// `PHI_KEK_ID` or `local-1`; [`phi_types::KeyringConfig`]), else a development key file created beside the
/// database on the first run and refused on a database holding keys of
/// another KEK. Also returns older KEKs that still unwrap.
pub(crate) fn keks(spec: Option<phi_types::KekSpec>, store: &dyn KeyStore) -> Result<Keks> {
    let config = phi_types::KeyringConfig::from_env_with(spec, None)?;
    if !config.is_configured() {
        return Ok((Arc::new(dev_master_key(store)?), Vec::new()));
    }
    Ok(config.keks()?)
}

/// The development key file's KEK, creating the file on the first run;
/// refused when the database holds data keys under another KEK.
fn dev_master_key(store: &dyn KeyStore) -> Result<LocalKek> {
    let mut others: Vec<String> = store
        .key_counts()?
        .into_iter()
        .filter(|c| c.state != phi_types::KeyState::Destroyed && c.kek_id != DEV_KEK_ID)
        .map(|c| c.kek_id)
        .collect();
    others.sort();
    others.dedup();
    if !others.is_empty() {
        return Err(format!(
            "no master key is configured, and this database holds data keys wrapped by KEK(s) \
             {}: configure the key that wrapped them (PHI_MASTER_KEY or PHI_MASTER_KEY_FILE, \
             with --kek local:ID when its id is not local-1, or --kek aws-kms:KEY); the \
             development key ({DEV_KEY_FILE}) is for a database of its own",
            others.join(", ")
        )
        .into());
    }
    let path = Path::new(DEV_KEY_FILE);
    if !path.exists() {
        let key = LocalKek::generate_master_key_base64()?;
        write_private(path, key.as_bytes())?;
        tracing::warn!(
            file = DEV_KEY_FILE,
            "created a master key for development only; production reads it from \
             PHI_MASTER_KEY / PHI_MASTER_KEY_FILE or uses AWS KMS (--kek aws-kms:KEY)"
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
