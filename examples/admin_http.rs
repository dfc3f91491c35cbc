//! A minimal service mounting phi's admin HTTP API under `/admin`, behind a
//! bearer-token guard.
//!
//! ```text
//! PHI_MASTER_KEY=$(head -c32 /dev/urandom | base64) PHI_ADMIN_TOKEN=s3cret \
//!     cargo run --features admin-http --example admin_http
//! curl -s -H 'Authorization: Bearer s3cret' localhost:3000/admin/key-status
//! ```
//!
//! Environment: `PHI_MASTER_KEY` or `PHI_MASTER_KEY_FILE` (the local KEK),
//! `PHI_ADMIN_TOKEN` (operators' token), `PHI_ADMIN_DB` (SQLite file,
//! default `phi-admin-example.db`), `PHI_ADMIN_ADDR` (default
//! `127.0.0.1:3000`), `PHI_ADMIN_OWNERS_QUERY` (optional owners query for
//! coverage).

use std::process::ExitCode;

use axum::Router;
use axum::http::request::Parts;
use phi_types::admin::{self, Actor, Guard, Options, Rejection};
use phi_types::{DieselKeyStore, KeyringConfig};
use sha2::{Digest, Sha256};

/// Admits requests whose bearer token is the configured one, as actor
/// `operator`. A real service checks its own identities (an SSO session, a
/// client certificate) and reports the person as the actor.
struct BearerToken {
    /// SHA-256 of the token: compared digest to digest, so the comparison's
    /// time says nothing about the token.
    digest: [u8; 32],
}

impl Guard for BearerToken {
    async fn admit(&self, request: &Parts) -> Result<Actor, Rejection> {
        let Some(value) = request.headers.get("authorization") else {
            return Err(Rejection::unauthorized(
                "missing Authorization: Bearer header",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Rejection::unauthorized("the Authorization header is not a bearer token")
            })?;
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if given == self.digest {
            Ok(Actor::new("operator"))
        } else {
            Err(Rejection::unauthorized("unknown bearer token"))
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("admin_http: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let token = std::env::var("PHI_ADMIN_TOKEN")
        .map_err(|_| "set PHI_ADMIN_TOKEN to the operators' bearer token")?;
    let db = std::env::var("PHI_ADMIN_DB").unwrap_or_else(|_| "phi-admin-example.db".into());
    let addr = std::env::var("PHI_ADMIN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());

    let store = DieselKeyStore::<diesel::SqliteConnection>::builder(&db)
        .run_migrations(true)
        .connect()?;
    // The KEK as PHI_KEK / PHI_KEK_ID / PHI_MASTER_KEY(_FILE) configure it.
    let keyring = KeyringConfig::from_env()?
        .builder(store)?
        .actor("admin-example")
        .build()?;
    let mut options = Options::default();
    if let Ok(sql) = std::env::var("PHI_ADMIN_OWNERS_QUERY") {
        options = options.owners_query(sql);
    }
    let guard = BearerToken {
        digest: Sha256::digest(token.as_bytes()).into(),
    };
    let app = Router::new().nest("/admin", admin::router_with(keyring, guard, options));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("phi admin API on http://{addr}/admin");
        axum::serve(listener, app).await?;
        Ok(())
    })
}
