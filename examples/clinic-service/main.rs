//! The clinic as an HTTP service: surgical cases whose patient fields are
//! sealed under each provider's own data key, served as JSON by axum on
//! tokio over a diesel-async pool; beside them, under `/plain`, the same
//! routes over a plaintext copy of the table (the twin that measures
//! phi's cost in one process).
//!
//! ```sh
//! cargo run --example clinic-service --features service      # SQLite, ./clinic-service.db
//! cargo run --example clinic-service --features service,postgres -- \
//!     --database-url postgres://app@db/clinic --listen 0.0.0.0:8080
//! ```
//!
//! Configured like the clinic CLI: `--database-url` / `DATABASE_URL`
//! (default `sqlite://clinic-service.db`, created with no setup);
//! `PHI_MASTER_KEY` / `PHI_MASTER_KEY_FILE`, or `--kek aws-kms:KEY`
//! (`--features aws-kms`), else a development key file created on the
//! first run. `RUST_LOG` sets the request log's level (default
//! `info,phi::access=warn`: phi's `phi::access` event per access record is
//! off, the access log's tables hold every record; `RUST_LOG=info` prints
//! them too, at the price of a formatted line per record, fifty for a page
//! of the list).
//!
//! Authentication: every case route (phi's and the twin's) takes
//! `Authorization: Bearer TOKEN`, a JWT with `sub` (the user), `provider`
//! (the one provider whose cases it reaches) and `exp`, verified with
//! `CLINIC_JWT_SECRET` (HS256, at least 32 bytes) or
//! `CLINIC_JWT_PUBLIC_KEY_FILE` (a PEM public key, RS256 or ES256 by
//! `--jwt-algorithm`); `--jwt-issuer` / `--jwt-audience` add checks. There
//! is no default: without either setting the service refuses to start. A
//! missing, wrong, expired or otherwise invalid token is 401 before
//! anything is read. `clinic-service token --user U --provider P` prints an
//! HS256 token for development.
//!
//! Scoping: the provider is the token's, never the body's or the URL's. A
//! case of another provider is 404, found by a query that names the
//! token's provider, so its row is never read, its key never fetched and
//! nothing opened. `POST /cases` creates cases (and a data key) only for
//! the token's provider. Every phi call is made on behalf of the token's
//! user (`Keyring::on_behalf_of`, with the request id), so phi's access
//! log names the person.
//!
//! Routes (each also under `/plain` for the twin):
//!
//! | | |
//! |---|---|
//! | `POST /cases` | create for the token's provider (201, the case with its id and revision); a body's `provider_id`, if given, must be the token's (422 otherwise) |
//! | `GET /cases?after=ID&limit=50` | the token's provider's cases, paged in id order |
//! | `GET /cases/{id}` | one case (404 when it is another provider's) |
//! | `PATCH /cases/{id}` | change fields; the body names the `revision` it read (409 when the case moved on) |
//! | `DELETE /cases/{id}` | delete (204) |
//! | `GET /providers/{p}/cases?after=ID&limit=50` | the same list; `p` must be the token's provider (404 otherwise) |
//! | `POST /providers/{p}/duplicates` | `{"patient_last", "patient_dob"}`: the provider's cases of that patient, through the blind index |
//! | `POST /providers/{p}/search` | any of `{"last_prefix", "dob_year", "surgery_from", "surgery_to"}`: the provider's matching cases by last name, opened a page at a time and tested (nothing of the prefix or year reaches the database) |
//! | `GET /providers/{p}/export.csv` | the provider's cases as CSV, streamed; a cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with `'` (no formula runs when opened in a spreadsheet) |
//! | `GET /metrics` | Prometheus: phi's key cache and KMS metrics, the keyring's counters (`clinic_service_keyring_*_total`), requests by route, method and status (each label of few values: the matched route or `unmatched`, a known method or `other`) |
//! | `GET /live` | liveness (no token): 200 `{"live": true}` while the process answers (`phi_types::admin::probes`) |
//! | `GET /ready` | readiness (no token): 200 or 503 with phi's `Readiness` as JSON: the key store answers, the KEK opens its check value (probed at most every `--kek-probe-interval`), the key-event feed is within `--feed-max-staleness`; the audit and access-log queues' fill and the key store's pool |
//! | `GET /health` | `ok` (no token): an alias of `/live` kept for older probes |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of every route above (no token), generated from the handlers and the types they serialise (utoipa) |
//! | `/admin/...` | phi's admin API (`phi_types::admin::router`: key status, generate-key, rotate, shred, clear-cache, rollout, audit log), only when `PHI_ADMIN_TOKEN` / `--admin-token` is set, behind `Authorization: Bearer TOKEN`; a refused request gets 401, changes nothing and is audited |
//!
//! Each request gets an id of the service's own (16 hexadecimal digits;
//! a client's `x-request-id` is ignored), echoed in the `x-request-id`
//! response header, written in the request log line and given to phi as
//! the accessor's request id. The log line's path and user are quoted and
//! escaped, so an id in a URL cannot forge a line.
//!
//! Errors are JSON `{"error", "message"}`: 401, 404, 409, 422 (bad input, naming
//! the field), 503 when a needed key is unavailable (the KMS or key store
//! down); never a patient value.

mod auth;
mod db;
mod error;
mod model;
mod routes;
mod schema;
mod seed;
mod store;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use phi_types::{Keyring, OwnerIdTelemetry, Rollout};

/// The buckets of every histogram on `/metrics`, in seconds: from a
/// single seal (tens of microseconds) to a slow KMS call or request.
const HISTOGRAM_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The service's error type (start-up only: requests answer with `ApiError`).
pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;
/// The service's result type.
pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// The clinic's cases as an HTTP service, sealed by phi, with a plaintext
/// twin under `/plain`.
#[derive(Debug, Parser)]
#[command(name = "clinic-service")]
struct Cli {
    /// Database URL: `sqlite://FILE` (or a file path), `mysql://…`, `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://clinic-service.db",
        hide_env_values = true
    )]
    database_url: String,

    /// The KEK that wraps new data keys: `aws-kms:KEY` or `local:ID` (the
    /// master key in PHI_MASTER_KEY / PHI_MASTER_KEY_FILE). Default: that
    /// master key as `local-1` (or `PHI_KEK_ID`), else a development key file.
    #[arg(long, env = "PHI_KEK")]
    kek: Option<phi_types::KekSpec>,

    /// Address to listen on; port 0 picks a free one (the address is
    /// printed on standard output once listening).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Database connections in the pool.
    #[arg(long, default_value_t = 16)]
    pool_size: usize,

    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,

    /// Writes no access log (by default every read and write of a case is
    /// recorded, with the token's user, in phi's access-log tables of the
    /// service's database: `phi audit access`, `phi audit verify`). For
    /// measuring the log's cost only.
    #[arg(long)]
    no_access_log: bool,

    /// The operators' bearer token for phi's admin routes under `/admin`
    /// (key status, key generation, rotation, shredding, cache clears, the
    /// roll-out, the audit log). No default: without it the admin routes
    /// are not mounted.
    #[arg(long, env = "PHI_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,

    /// The HS256 secret that the patient routes' bearer tokens (JWTs) are
    /// signed with, at least 32 bytes. Prefer the environment variable (a
    /// command line is visible to other users). No default: this or
    /// --jwt-public-key-file must be set, or the service does not start.
    #[arg(long, env = "CLINIC_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,

    /// A PEM public key that verifies the bearer tokens (RS256 or ES256,
    /// see --jwt-algorithm), for tokens issued by an identity provider.
    #[arg(
        long,
        env = "CLINIC_JWT_PUBLIC_KEY_FILE",
        conflicts_with = "jwt_secret"
    )]
    jwt_public_key_file: Option<std::path::PathBuf>,

    /// The algorithm of --jwt-public-key-file's tokens.
    #[arg(long, env = "CLINIC_JWT_ALGORITHM", value_enum, default_value_t = auth::PublicKeyAlgorithm::Rs256)]
    jwt_algorithm: auth::PublicKeyAlgorithm,

    /// The issuer (`iss`) the tokens must name; unchecked when not set.
    #[arg(long, env = "CLINIC_JWT_ISSUER")]
    jwt_issuer: Option<String>,

    /// The audience (`aud`) the tokens must name; unchecked when not set.
    #[arg(long, env = "CLINIC_JWT_AUDIENCE")]
    jwt_audience: Option<String>,

    /// Seconds between two reads of phi's key-event feed (shreds, cache
    /// clears and the roll-out made by other processes reach this one
    /// within it; on PostgreSQL a notification wakes the reader at once).
    #[arg(long, env = "CLINIC_FEED_INTERVAL", value_parser = seconds, default_value = "2")]
    feed_interval: Duration,

    /// Seconds without a successful read of the feed after which sealing
    /// is refused and `/ready` answers 503.
    #[arg(long, env = "CLINIC_FEED_MAX_STALENESS", value_parser = seconds, default_value = "60")]
    feed_max_staleness: Duration,

    /// Seconds between two probes of the KEK by `/ready` (a KMS call for
    /// an `aws-kms` KEK).
    #[arg(long, env = "CLINIC_KEK_PROBE_INTERVAL", value_parser = seconds, default_value = "30")]
    kek_probe_interval: Duration,

    /// How provider ids (the owners) appear in the logs, phi's and the
    /// service's own: `plain`, `hashed` (`sha256:` and 16 hex digits, the
    /// same in every process) or `omitted`.
    #[arg(long, env = "CLINIC_OWNER_IDS_IN_LOGS", value_enum, default_value_t = OwnerIds::Plain)]
    owner_ids_in_logs: OwnerIds,

    #[command(subcommand)]
    command: Option<Command>,
}

/// A duration given in (possibly fractional) seconds.
fn seconds(text: &str) -> Result<Duration, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(value).map_err(|e| format!("{text:?} seconds: {e}"))
}

/// `--owner-ids-in-logs`: phi's [`OwnerIdTelemetry`] settings.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OwnerIds {
    Plain,
    Hashed,
    Omitted,
}

impl From<OwnerIds> for OwnerIdTelemetry {
    fn from(mode: OwnerIds) -> OwnerIdTelemetry {
        match mode {
            OwnerIds::Plain => OwnerIdTelemetry::Plain,
            OwnerIds::Hashed => OwnerIdTelemetry::Hashed,
            OwnerIds::Omitted => OwnerIdTelemetry::Omitted,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Stores made-up cases in both tables (sealed and the plaintext twin,
    /// same ids and values) for load tests, then exits. Case ids are
    /// `{provider}-{n:06}`; providers are `{prefix}{i:04}`.
    Seed {
        /// How many providers.
        #[arg(long, default_value_t = 100)]
        providers: u64,
        /// Cases for each provider.
        #[arg(long, default_value_t = 1000)]
        cases_per_provider: u64,
        /// The providers' name prefix.
        #[arg(long, default_value = "provider-")]
        prefix: String,
    },
    /// Prints a bearer token (an HS256 JWT signed with CLINIC_JWT_SECRET)
    /// for one user of one provider, then exits: for development, tests
    /// and load tests. Production tokens come from the identity provider.
    Token {
        /// The user (`sub`): the accessor phi's access log names.
        #[arg(long)]
        user: String,
        /// The provider whose cases the token reaches.
        #[arg(long)]
        provider: String,
        /// The purpose of the accesses (default `treatment`).
        #[arg(long)]
        purpose: Option<String>,
        /// Seconds the token is valid for.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

/// What the routes share.
pub(crate) struct App {
    pub(crate) pool: db::Pool,
    pub(crate) keyring: Keyring,
    pub(crate) metrics: PrometheusHandle,
    /// Verifies the patient routes' bearer tokens (always set when serving).
    pub(crate) verifier: Option<auth::Verifier>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,phi::access=warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "clinic-service stopped");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let auth = auth::AuthConfig {
        secret: cli.jwt_secret.as_deref(),
        public_key_file: cli.jwt_public_key_file.as_deref(),
        algorithm: cli.jwt_algorithm,
        issuer: cli.jwt_issuer.as_deref(),
        audience: cli.jwt_audience.as_deref(),
    };
    if let Some(Command::Token {
        user,
        provider,
        purpose,
        ttl,
    }) = &cli.command
    {
        let token = auth::mint(&auth, user, provider, purpose.as_deref(), *ttl)?;
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), "{token}")?;
        return Ok(());
    }
    // Serving needs token verification: checked before anything else.
    let verifier = match cli.command {
        Some(Command::Seed { .. }) => None,
        _ => Some(auth::Verifier::new(&auth)?),
    };
    // Histograms as Prometheus histograms (buckets, for
    // `histogram_quantile` in alerts and dashboards), not summaries.
    let metrics = PrometheusBuilder::new()
        .set_buckets(HISTOGRAM_BUCKETS)
        .map_err(|e| format!("configuring the Prometheus recorder's buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("installing the Prometheus recorder: {e}"))?;
    let (backend, url) = db::parse_url(&cli.database_url)?;
    // Migrations, key store, KEK check: synchronous, before the runtime
    // starts (a KMS client of phi's sync API runs its own runtime).
    let store = db::prepare(backend, &url)?;
    let (kek, older) = db::keks(cli.kek.clone(), store.as_ref())?;
    // The access log: chained under a key that derives from the KEK
    // (through phi's own owner `phi:access-log`), so it is started with a
    // keyring of the same store and KEKs that logs nothing itself.
    let access_log = if cli.no_access_log {
        None
    } else {
        let mut plain = Keyring::builder(store.clone(), kek.clone()).without_feed();
        for k in &older {
            plain = plain.unwrap_with(k.clone());
        }
        let tables = db::access_log_tables(backend, &url)?;
        Some(phi_types::access_log::DieselAccessLog::builder(tables).start(&plain.build()?)?)
    };
    let mut builder = Keyring::builder(store, kek);
    for k in older {
        builder = builder.unwrap_with(k);
    }
    if let Some(log) = access_log {
        builder = builder.access_log(Arc::new(log));
    }
    error::set_owner_ids(cli.owner_ids_in_logs.into());
    let keyring = builder
        .owner_ids_in_telemetry(cli.owner_ids_in_logs.into())
        .actor("clinic-service")
        .name("clinic-service")
        .rollout(Rollout::All)
        .follow_feed()
        .feed_interval(cli.feed_interval)
        .feed_max_staleness(cli.feed_max_staleness)
        .kek_probe_interval(cli.kek_probe_interval)
        .build()?;

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = cli.workers {
        runtime.worker_threads(workers);
    }
    let runtime = runtime.enable_all().build()?;
    let result = runtime.block_on(async {
        let pool = db::pool(backend, &url, cli.pool_size)?;
        let app = Arc::new(App {
            pool,
            keyring: keyring.clone(),
            metrics: metrics.clone(),
            verifier,
        });
        if let Some(Command::Seed {
            providers,
            cases_per_provider,
            prefix,
        }) = &cli.command
        {
            let started = std::time::Instant::now();
            let stored = seed::seed(&app, *providers, *cases_per_provider, prefix)
                .await
                .map_err(|e| format!("seeding: {}", e.to_json()))?;
            use std::io::Write as _;
            writeln!(
                std::io::stdout().lock(),
                "seeded {stored} case(s) in each table in {:.1} s",
                started.elapsed().as_secs_f64()
            )?;
            return Ok(());
        }
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                metrics.run_upkeep();
            }
        });
        let listener = tokio::net::TcpListener::bind(cli.listen).await?;
        let address = listener.local_addr()?;
        tracing::info!(%address, ?backend, "listening");
        {
            use std::io::Write as _;
            // The harness and scripts read the address from here.
            let mut out = std::io::stdout().lock();
            writeln!(out, "listening on http://{address}")?;
            out.flush()?;
        }
        let mut router = routes::router(app);
        let admin = match cli.admin_token.as_deref() {
            Some(token) if !token.is_empty() => {
                let guard = AdminToken::new(token);
                router = router.nest("/admin", phi_types::admin::router(keyring.clone(), guard));
                tracing::info!("phi's admin routes are mounted under /admin (bearer token)");
                true
            }
            _ => {
                tracing::warn!(
                    "PHI_ADMIN_TOKEN is not set: phi's admin routes (/admin/...) are not mounted"
                );
                false
            }
        };
        // The document of the routes served (the admin routes only when
        // mounted), without a token.
        let router = router.merge(phi_types::admin::serve_openapi(routes::openapi(admin)));
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        upkeep.abort();
        tracing::info!("stopped accepting requests; in-flight requests finished");
        Ok::<_, Error>(())
    });
    // Drop the runtime (and with it every task) before flushing.
    runtime.shutdown_timeout(Duration::from_secs(10));
    keyring.flush_audit()?;
    result
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
/// The admin routes' guard: a bearer token, compared as SHA-256 digests
/// (so the comparison's time says nothing about the token). The actor is
/// `operator`.
struct AdminToken {
    digest: [u8; 32],
}

impl AdminToken {
    fn new(token: &str) -> Self {
        use sha2::Digest as _;
        AdminToken {
            digest: sha2::Sha256::digest(token.as_bytes()).into(),
        }
    }
}

impl phi_types::admin::Guard for AdminToken {
    async fn admit(
        &self,
        request: &axum::http::request::Parts,
    ) -> Result<phi_types::admin::Actor, phi_types::admin::Rejection> {
        use phi_types::admin::Rejection;
        use sha2::Digest as _;
        let token = request
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| Rejection::unauthorized("missing Authorization: Bearer header"))?
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Rejection::unauthorized("the Authorization header is not a bearer token")
            })?;
        let given: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if given == self.digest {
            Ok(phi_types::admin::Actor::new("operator"))
        } else {
            Err(Rejection::unauthorized("unknown bearer token"))
        }
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
