//! The admin HTTP API (feature `admin-http`): key status, key generation,
//! rotation, crypto-shredding, cache clears, roll-out and the audit log,
//! as an [axum] [`Router`] the application mounts under a prefix of its
//! choosing, behind an authorization [`Guard`] it supplies.
//!
//! | route | does |
//! | --- | --- |
//! | `GET /key-status` | coverage (overall or `?owner=`), data keys by KEK and state, this process's cache statistics |
//! | `POST /generate-key` | a data key for one owner, or for each owner an owners query returns that has none; `dry_run` |
//! | `POST /rotate` | a new data key version for one owner |
//! | `POST /shred` | crypto-shreds one owner; `confirm` must repeat the owner id |
//! | `GET /audit-log` | `encryption_key_audit`, newest first, by owner, action and time, paged (default limit 100) |
//! | `GET /key-status` (also) | the key-event feed's head, how far this process and every recorded reader (`phi_feed_readers`) have read it, the fleet's roll-out |
//! | `POST /clear-cache` | `{"owner": …}` or `{"all": true}`: in this process at once, in every process following the key-event feed within its interval |
//! | `POST /rollout` | `{"mode": "all" \| "nobody" \| "owners", "owners": […]}`: the fleet's roll-out policy, through the feed |
//!
//! Health probes are a router of their own, [`probes`], **not** behind the
//! guard: a Kubernetes (or load balancer) probe cannot send a token, and
//! neither answer names an owner or holds a secret. Mount it where the
//! orchestrator looks (at the root, say) and keep the guarded router under
//! its prefix:
//!
//! | route | does |
//! | --- | --- |
//! | `GET /live` | 200 `{"live": true}` while the process answers (it checks nothing else: a restart does not help a database outage) |
//! | `GET /ready` | 200 when [`Keyring::readiness`] says ready, else 503; the body is that [`Readiness`](crate::Readiness) as JSON |
//!
//! Every request first goes through the [`Guard`]: a request it refuses
//! gets 401 or 403, changes nothing, and is audited as
//! [`AuditAction::Denied`] (at most [`Options::denied_audit_limit`] per
//! window, each record's detail at most [`MAX_DENIED_DETAIL_BYTES`]; its log
//! line is limited the same way). An admitted request is carried out as the
//! [`Actor`] the guard reports: the life-cycle records and feed events it
//! causes (`rotate`, `destroy`, `clear_cache`, `rollout`) name that actor, and one [`AuditAction::Admin`] record per
//! request names the route and its outcome. That record is written even
//! when the request's future is dropped (a client gone, a timeout): an
//! action, once started, runs on the blocking pool together with the write
//! of its record; a request dropped before its action started is recorded
//! as cancelled. Records not about one owner use the owner id `*`.
//!
//! Bodies are JSON. Errors are `{"error": "..."}` with the status that fits
//! (400 bad input, 409 refused by the key's state, 500 key store or KEK
//! failure); they name owners, versions and KEKs, never key material or
//! stored values.
//!
//! ```
//! use std::sync::Arc;
//! use axum::http::request::Parts;
//! use phi_types::admin::{self, Actor, Guard, Rejection};
//! use phi_types::{Keyring, KeyBytes, LocalKek, MemoryKeyStore};
//!
//! /// Admits requests bearing the operators' token.
//! struct Token(String);
//!
//! impl Guard for Token {
//!     async fn admit(&self, request: &Parts) -> Result<Actor, Rejection> {
//!         let given = request
//!             .headers
//!             .get("authorization")
//!             .and_then(|v| v.to_str().ok())
//!             .and_then(|v| v.strip_prefix("Bearer "));
//!         match given {
//!             None => Err(Rejection::unauthorized("no bearer token")),
//!             Some(t) if t == self.0 => Ok(Actor::new("operator")),
//!             Some(_) => Err(Rejection::forbidden(None, "unknown token")),
//!         }
//!     }
//! }
//!
//! let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
//! let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
//! let app: axum::Router = axum::Router::new()
//!     .nest("/admin", admin::router(keyring, Token("s3cret".into())));
//! # drop(app);
//! # Ok::<(), phi_types::Error>(())
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Query, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::NaiveDateTime;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::Error;
use crate::keyring::Keyring;
use crate::lifecycle;
use crate::record::Rollout;
use crate::store::{AuditAction, AuditEvent, AuditFilter, AuditRecord, KeyState};

/// Default number of records `GET /audit-log` returns.
pub const DEFAULT_AUDIT_LIMIT: usize = 100;
/// Most records one `GET /audit-log` page returns.
pub const MAX_AUDIT_LIMIT: usize = 1_000;
/// Owners listed by name in a coverage or dry-run answer; the counts are
/// always complete.
pub const LISTED_OWNERS: usize = 100;
/// The owner id of audit records not about one owner.
pub const ALL_OWNERS: &str = "*";

/// Who an admitted request acts as: named in every audit record it causes.
#[derive(Clone, PartialEq, Eq)]
pub struct Actor(String);

impl Actor {
    /// An actor named `name` (an operator, a service account).
    pub fn new(name: impl Into<String>) -> Self {
        Actor(name.into())
    }

    /// The actor's name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Actor").field(&self.0).finish()
    }
}

/// Why the [`Guard`] refused a request: 401 (no or invalid credentials) or
/// 403 (known, not allowed). The reason is returned to the client and
/// audited: never put the credential itself in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    actor: Option<String>,
    reason: String,
}

impl Rejection {
    /// 401 Unauthorized: the request carries no (valid) credentials.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Rejection {
            status: StatusCode::UNAUTHORIZED,
            actor: None,
            reason: reason.into(),
        }
    }

    /// 403 Forbidden: the caller (`actor`, when known) may not do this.
    pub fn forbidden(actor: Option<&str>, reason: impl Into<String>) -> Self {
        Rejection {
            status: StatusCode::FORBIDDEN,
            actor: actor.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

/// The application's authorization of admin requests; [`router`] cannot be
/// built without one. It sees each request's method, URI and headers (not
/// its body) before anything is done, and either admits it as an [`Actor`]
/// or refuses it.
pub trait Guard: Send + Sync + 'static {
    /// Admits `request` as an actor, or refuses it.
    fn admit(&self, request: &Parts) -> impl Future<Output = Result<Actor, Rejection>> + Send;
}

impl<G: Guard> Guard for Arc<G> {
    fn admit(&self, request: &Parts) -> impl Future<Output = Result<Actor, Rejection>> + Send {
        self.as_ref().admit(request)
    }
}

/// Options of the admin router; [`router`] uses the defaults.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// The application's owners query (first column an owner id, e.g.
    /// `SELECT DISTINCT user_id FROM cases`), run read-only: what
    /// `GET /key-status` measures coverage against and `POST /generate-key`
    /// uses when a request gives no owner and no query of its own.
    pub owners_query: Option<String>,
    /// Whether `POST /generate-key` accepts an `owners_query` of the
    /// request's own (default `false`). It runs read-only, but it reads any
    /// table the key store's login can read, and a dry run answers with up
    /// to 100 of its first column's values: allow it only when every actor
    /// the guard admits may read the whole database.
    ///
    /// What the owners query (the configured one, or a request's own when
    /// this is allowed) does in each route:
    ///
    /// | route | the query | side effects |
    /// |---|---|---|
    /// | `GET /key-status` | the configured one only; run to measure coverage | none: the query runs in a read-only transaction that is rolled back ([`KeyStore::owners_from_query`](crate::KeyStore::owners_from_query)); one `admin` audit record |
    /// | `POST /generate-key` with `"dry_run": true` | the request's (if allowed) or the configured one | none beyond the query and one `admin` audit record; the answer lists up to 100 owner ids the query returned |
    /// | `POST /generate-key` | the request's (if allowed) or the configured one | a data key is created, wrapped by the primary KEK and audited (`generate`) for **every owner id the query returns that has no key**: one KEK call each (with a KMS, one `GenerateDataKey` each, billed) and one key row each, which stays (a key is never deleted, only retired or shredded) |
    /// | `/rotate`, `/shred`, `/clear-cache`, `/rollout`, `/audit-log` | not used | as documented on each route |
    ///
    /// What an operator should know before allowing it:
    /// - the query is SQL chosen by the caller: it can read (and a dry run
    ///   answers with) any column of any table the key store's login can
    ///   read; it cannot write (a write is refused and rolled back), but it
    ///   can be slow, and it runs on the key store's pool;
    /// - a query that returns more than the application's owners (a column
    ///   of e-mail addresses, a typo) makes `generate-key` create a key for
    ///   each value it returns, and those owner ids are written in clear
    ///   into `user_encryption_keys` and the audit trail: run with
    ///   `"dry_run": true` first and read the count;
    /// - only owners with no key row at all get one: an owner with keys
    ///   (active, retired, or crypto-shredded) is left as it is, so a
    ///   shredded owner never gets a key again through this route; a run
    ///   that fails part-way keeps the keys of the batches done before;
    /// - every request is audited (`admin`, with the actor and the route),
    ///   the keys it creates each with a `generate` record; the query text
    ///   itself is not written to the audit trail.
    pub allow_request_owners_query: bool,
    /// At most this many refused requests are written to the audit trail
    /// per [`denied_audit_window`](Self::denied_audit_window) (default
    /// [`DEFAULT_DENIED_AUDIT_LIMIT`]), so a client hammering the API with
    /// bad credentials cannot fill the audit table or the logs. The
    /// refusals over the limit are neither audited nor logged one by one:
    /// they are counted in `phi_admin_denied_unaudited_total`, one log line
    /// per window says the limit was reached, and the first record (and log
    /// line) written after them says how many were left out.
    pub denied_audit_limit: u32,
    /// The window of [`denied_audit_limit`](Self::denied_audit_limit)
    /// (default one minute).
    pub denied_audit_window: Duration,
    /// The access log's tables: with them, `GET /access-log` answers the
    /// same queries as `phi audit access` (none by default).
    pub access_log: Option<Arc<dyn crate::access_log::AccessLogStore>>,
}

/// [`Options::denied_audit_limit`]'s default: refused requests audited per
/// window.
pub const DEFAULT_DENIED_AUDIT_LIMIT: u32 = 60;

impl Default for Options {
    fn default() -> Self {
        Options {
            owners_query: None,
            allow_request_owners_query: false,
            denied_audit_limit: DEFAULT_DENIED_AUDIT_LIMIT,
            denied_audit_window: Duration::from_secs(60),
            access_log: None,
        }
    }
}

impl Options {
    /// Sets [`Options::denied_audit_limit`] and
    /// [`Options::denied_audit_window`].
    #[must_use]
    pub fn denied_audit_limit(mut self, limit: u32, window: Duration) -> Self {
        self.denied_audit_limit = limit;
        self.denied_audit_window = window;
        self
    }

    /// Sets [`Options::allow_request_owners_query`].
    #[must_use]
    pub fn allow_request_owners_query(mut self, allow: bool) -> Self {
        self.allow_request_owners_query = allow;
        self
    }

    /// Sets [`Options::access_log`].
    #[must_use]
    pub fn access_log(mut self, tables: Arc<dyn crate::access_log::AccessLogStore>) -> Self {
        self.access_log = Some(tables);
        self
    }

    /// Sets [`Options::owners_query`].
    #[must_use]
    pub fn owners_query(mut self, sql: impl Into<String>) -> Self {
        self.owners_query = Some(sql.into());
        self
    }
}

#[derive(Clone)]
struct AdminState {
    keyring: Keyring,
    options: Arc<Options>,
    denied: Arc<DeniedLimit>,
}

/// How many refused requests the current window has audited, and how many
/// it has left out since the last one written.
#[derive(Debug)]
struct DeniedLimit {
    limit: u32,
    window: Duration,
    state: Mutex<DeniedWindow>,
}

#[derive(Debug)]
struct DeniedWindow {
    started: Instant,
    audited: u32,
    left_out: u64,
}

impl DeniedLimit {
    fn new(limit: u32, window: Duration, now: Instant) -> Self {
        DeniedLimit {
            limit,
            window,
            state: Mutex::new(DeniedWindow {
                started: now,
                audited: 0,
                left_out: 0,
            }),
        }
    }

    /// Counts `n` refusals as left out of the audit trail.
    fn left_out(&self, n: u64) {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        w.left_out = w.left_out.saturating_add(n);
    }

    /// Whether a refusal at `now` is audited and logged: `Some(n)` with the
    /// number of refusals left out before it, or `None` when it is over the
    /// limit.
    #[cfg(test)]
    fn admit(&self, now: Instant) -> Option<u64> {
        self.decide(now).audited()
    }

    /// What to do with a refusal at `now`.
    fn decide(&self, now: Instant) -> Denied {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(w.started) >= self.window {
            w.started = now;
            w.audited = 0;
        }
        if w.audited < self.limit {
            w.audited += 1;
            Denied::Audit {
                left_out: std::mem::take(&mut w.left_out),
            }
        } else {
            w.left_out += 1;
            Denied::LeaveOut {
                first: w.audited == self.limit && {
                    // One line per window says the limit was reached.
                    w.audited = self.limit.saturating_add(1);
                    true
                },
            }
        }
    }
}

/// What becomes of one refused request.
#[derive(Debug, PartialEq, Eq)]
enum Denied {
    /// Audited and logged, reporting `left_out` refusals before it that
    /// were neither.
    Audit { left_out: u64 },
    /// Over the limit: counted only (`first`: the window's first such, for
    /// which one line says so).
    LeaveOut { first: bool },
}

impl Denied {
    #[cfg(test)]
    fn audited(&self) -> Option<u64> {
        match self {
            Denied::Audit { left_out } => Some(*left_out),
            Denied::LeaveOut { .. } => None,
        }
    }
}

/// Most bytes of a refused request's audit detail (and of the route and
/// reason in its log line): the route is the client's and the reason the
/// guard's, so neither may make a record or a line as large as it likes.
/// A longer detail is cut at a character boundary and says so.
pub const MAX_DENIED_DETAIL_BYTES: usize = 1_024;

/// `text` cut to at most `max` bytes at a character boundary; a cut text
/// ends with a note of how long it was (the note fits in `max`).
fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(text);
    }
    let note = format!(" [truncated from {} bytes]", text.len());
    let mut end = max.saturating_sub(note.len());
    while end > 0 && !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}{note}", &text[..end]))
}

/// The admin API's routes over `keyring`, each request admitted by `guard`
/// first. Mount it with [`Router::nest`] under a prefix.
pub fn router<G: Guard>(keyring: Keyring, guard: G) -> Router {
    router_with(keyring, guard, Options::default())
}

/// [`router`] with [`Options`].
pub fn router_with<G: Guard>(keyring: Keyring, guard: G, options: Options) -> Router {
    let denied = DeniedLimit::new(
        options.denied_audit_limit,
        options.denied_audit_window,
        Instant::now(),
    );
    let state = AdminState {
        keyring,
        options: Arc::new(options),
        denied: Arc::new(denied),
    };
    let guarded = (Arc::new(guard), state.clone());
    Router::new()
        .route("/key-status", get(key_status))
        .route("/generate-key", post(generate_key))
        .route("/rotate", post(rotate))
        .route("/shred", post(shred))
        .route("/audit-log", get(audit_log))
        .route("/clear-cache", post(clear_cache))
        .route("/rollout", post(rollout))
        .route("/access-log", get(access_log))
        .with_state(state)
        .layer(middleware::from_fn_with_state(guarded, admit::<G>))
}

/// The health probes over `keyring`: `GET /live` and `GET /ready` (see
/// the [module](self) docs), unauthenticated and not audited. Mount it with
/// [`Router::merge`] or [`Router::nest`].
///
/// ```
/// use std::sync::Arc;
/// use phi_types::admin;
/// use phi_types::{Keyring, KeyBytes, LocalKek, MemoryKeyStore};
///
/// let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
/// let app: axum::Router = axum::Router::new().merge(admin::probes(keyring));
/// # drop(app);
/// # Ok::<(), phi_types::Error>(())
/// ```
pub fn probes(keyring: Keyring) -> Router {
    Router::new()
        .route(
            "/live",
            get(|| async { axum::Json(json!({ "live": true })) }),
        )
        .route("/ready", get(ready))
        .with_state(keyring)
}

async fn ready(State(keyring): State<Keyring>) -> Response {
    let readiness = keyring.readiness_async().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness)).into_response()
}

async fn admit<G: Guard>(
    State((guard, state)): State<(Arc<G>, AdminState)>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let route = format!("{} {}", parts.method, parts.uri.path());
    match guard.admit(&parts).await {
        Ok(actor) => {
            // Whatever becomes of this request, it gets its `admin` record:
            // written by the handler with the outcome, or, when the request
            // ends (its future dropped: a client gone, a timeout) before
            // the handler took the record over, by this guard on drop.
            let record = RecordDue::default();
            let _unwritten = UnwrittenRecord {
                due: record.clone(),
                keyring: state.keyring.clone(),
                actor: actor.name().to_owned(),
                route: bounded(&route, MAX_DENIED_DETAIL_BYTES).into_owned(),
            };
            let mut request = Request::from_parts(parts, body);
            request.extensions_mut().insert(actor);
            request.extensions_mut().insert(record);
            next.run(request).await
        }
        Err(rejection) => {
            let actor = rejection.actor.clone().unwrap_or_else(|| "unknown".into());
            let route = bounded(&route, MAX_DENIED_DETAIL_BYTES / 2);
            let left_out = match state.denied.decide(Instant::now()) {
                Denied::Audit { left_out } => left_out,
                Denied::LeaveOut { first } => {
                    ::metrics::counter!(crate::metrics::ADMIN_DENIED_UNAUDITED_TOTAL).increment(1);
                    if first {
                        tracing::warn!(
                            limit = state.denied.limit,
                            window_seconds = state.denied.window.as_secs_f64(),
                            "admin requests refused over the limit: the rest of this window's \
                             refusals are neither logged nor audited, only counted \
                             (phi_admin_denied_unaudited_total); the next record says how many"
                        );
                    }
                    return error_body(rejection.status, &rejection.reason);
                }
            };
            let reason = bounded(&rejection.reason, MAX_DENIED_DETAIL_BYTES / 2);
            let actor_shown = bounded(&actor, 255);
            tracing::warn!(
                actor = %actor_shown,
                route = %route,
                status = rejection.status.as_u16(),
                left_out,
                "admin request refused"
            );
            let mut detail = format!("{route} refused ({}): {reason}", rejection.status.as_u16(),);
            if left_out > 0 {
                detail.push_str(&format!(
                    "; {left_out} earlier refusals not audited (over {} per {:?})",
                    state.denied.limit, state.denied.window
                ));
            }
            let detail = bounded(&detail, MAX_DENIED_DETAIL_BYTES).into_owned();
            let event = audit_event(&actor_shown, ALL_OWNERS, AuditAction::Denied, detail);
            let keyring = state.keyring.clone();
            let audited = blocking(move || keyring.store().append_audit(&[event])).await;
            if let Err(e) = audited {
                tracing::error!(error = %e.message, "cannot audit a refused admin request");
                // Neither this refusal nor those it was to report were
                // written: the next record says so.
                state.denied.left_out(left_out + 1);
            }
            error_body(rejection.status, &rejection.reason)
        }
    }
}

/// Whether an admitted request's `admin` record is still to be written by
/// [`UnwrittenRecord`] (until a handler takes it over).
#[derive(Clone, Debug, Default)]
struct RecordDue(Arc<std::sync::atomic::AtomicBool>);

impl RecordDue {
    /// Takes the record over: `true` for the first caller only.
    fn take(&self) -> bool {
        !self.0.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
}

/// Writes an admitted request's `admin` record when dropped before a
/// handler took it over: the request ended before it was carried out.
struct UnwrittenRecord {
    due: RecordDue,
    keyring: Keyring,
    actor: String,
    route: String,
}

impl Drop for UnwrittenRecord {
    fn drop(&mut self) {
        if !self.due.take() {
            return;
        }
        let detail = format!(
            "{}: cancelled (the request ended before it was carried out: nothing was done)",
            self.route
        );
        let event = audit_event(&self.actor, ALL_OWNERS, AuditAction::Admin, detail);
        write_detached(self.keyring.clone(), event);
    }
}

/// Writes `event` on a thread of its own (the blocking pool inside a tokio
/// runtime): from a drop, which cannot wait.
fn write_detached(keyring: Keyring, event: AuditEvent) {
    let write = move || {
        if let Err(error) = keyring.store().append_audit(std::slice::from_ref(&event)) {
            tracing::error!(%error, "cannot write the admin audit record of a cancelled request");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(write)),
        Err(_) => {
            if let Err(error) = std::thread::Builder::new()
                .name("phi-admin-audit".into())
                .spawn(write)
            {
                tracing::error!(%error, "cannot write the admin audit record of a cancelled request");
            }
        }
    }
}

fn audit_event(actor: &str, owner: &str, action: AuditAction, detail: String) -> AuditEvent {
    AuditEvent {
        occurred_at: chrono::Utc::now().naive_utc(),
        owner_id: owner.to_owned(),
        action,
        key_version: None,
        kek_id: None,
        actor: actor.to_owned(),
        detail: Some(detail),
    }
}

fn error_body(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

/// An error answer: status and message (never key material or values).
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn bad_request(message: impl Into<String>) -> Self {
        Failure {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let status = match &error {
            Error::InvalidInput { .. } => StatusCode::BAD_REQUEST,
            Error::Refused { .. }
            | Error::Shredded { .. }
            | Error::NoKey { .. }
            | Error::KeyInUse { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // phi's errors name owners, tables, versions and KEKs, never key
        // bytes or plaintext.
        Failure {
            status,
            message: error.to_string(),
        }
    }
}

impl From<JsonRejection> for Failure {
    fn from(rejection: JsonRejection) -> Self {
        Failure {
            status: rejection.status(),
            message: format!("invalid JSON body: {}", rejection.body_text()),
        }
    }
}

impl From<QueryRejection> for Failure {
    fn from(rejection: QueryRejection) -> Self {
        Failure::bad_request(format!("invalid query string: {}", rejection.body_text()))
    }
}

/// Runs blocking key store work off the async runtime.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(Failure::from),
        Err(_) => Err(Failure {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the admin operation panicked".into(),
        }),
    }
}

/// The request's `admin` audit record of `outcome`.
fn admin_record(
    actor: &str,
    route: &str,
    owner: Option<&str>,
    outcome: &Result<Value, Failure>,
) -> AuditEvent {
    let detail = match outcome {
        Ok(_) => format!("{route}: ok"),
        Err(failure) => format!(
            "{route}: failed ({}): {}",
            failure.status.as_u16(),
            failure.message
        ),
    };
    audit_event(
        actor,
        owner.unwrap_or(ALL_OWNERS),
        AuditAction::Admin,
        detail,
    )
}

/// The answer to `outcome`, noting an `admin` record that could not be
/// written.
fn answer(route: &str, outcome: Result<Value, Failure>, audited: crate::Result<()>) -> Response {
    let (status, mut body) = match outcome {
        Ok(body) => (StatusCode::OK, body),
        Err(failure) => (failure.status, json!({ "error": failure.message })),
    };
    if let Err(e) = audited {
        // The action itself (if any) is done and audited by its own
        // records; say that this request's record is missing.
        tracing::error!(route, error = %e, "cannot write the admin audit record");
        if let Value::Object(map) = &mut body {
            map.insert(
                "audit_error".into(),
                Value::String(format!("the admin audit record was not written: {e}")),
            );
        }
    }
    (status, axum::Json(body)).into_response()
}

/// Writes the request's `admin` audit record of an outcome reached without
/// acting, and answers. The record's write starts before the first await:
/// a request dropped meanwhile still gets it.
async fn finish(
    state: &AdminState,
    actor: &Actor,
    due: &RecordDue,
    route: &'static str,
    owner: Option<&str>,
    outcome: Result<Value, Failure>,
) -> Response {
    due.take();
    let event = admin_record(actor.name(), route, owner, &outcome);
    let keyring = state.keyring.clone();
    let audited = tokio::task::spawn_blocking(move || keyring.store().append_audit(&[event]))
        .await
        .unwrap_or_else(|_| {
            Err(Error::Config(
                "the admin audit record's write panicked".into(),
            ))
        });
    answer(route, outcome, audited)
}

/// Carries out a request's `work` on the blocking pool and writes its
/// `admin` audit record there too, right after: once started, both run to
/// the end even when the request's future is dropped (a client gone, a
/// timeout), so an action is never done without its record.
async fn act(
    state: &AdminState,
    actor: &Actor,
    due: &RecordDue,
    route: &'static str,
    owner: Option<String>,
    work: impl FnOnce() -> crate::Result<Value> + Send + 'static,
) -> Response {
    due.take();
    let keyring = state.keyring.clone();
    let actor = actor.name().to_owned();
    let task = tokio::task::spawn_blocking(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(Error::Config("the admin operation panicked".into())))
            .map_err(Failure::from);
        let event = admin_record(&actor, route, owner.as_deref(), &outcome);
        let audited = keyring.store().append_audit(&[event]);
        (outcome, audited)
    });
    match task.await {
        Ok((outcome, audited)) => answer(route, outcome, audited),
        Err(_) => error_body(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the admin operation panicked",
        ),
    }
}

fn limited(owners: &[String]) -> &[String] {
    &owners[..owners.len().min(LISTED_OWNERS)]
}

fn coverage_json(cov: &lifecycle::Coverage) -> Value {
    json!({
        "owners": cov.owners,
        "with_active_key": cov.with_active_key,
        "without_key": cov.without_key.len(),
        "without_key_owners": limited(&cov.without_key),
        "all_retired": cov.all_retired.len(),
        "all_retired_owners": limited(&cov.all_retired),
        "shredded": cov.shredded,
        "percent": cov.percent(),
    })
}

// ---------------------------------------------------------------------------
// GET /key-status

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    owner: Option<String>,
}

async fn key_status(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    query: Result<Query<StatusQuery>, QueryRejection>,
) -> Response {
    const ROUTE: &str = "GET /key-status";
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    let owner = query.owner.clone();
    let keyring = state.keyring.clone();
    let owners_query = state.options.owners_query.clone();
    act(
        &state,
        &actor,
        &due,
        ROUTE,
        query.owner.clone(),
        move || {
            let store = keyring.store();
            let mut body = serde_json::Map::new();
            match &owner {
                Some(owner) => {
                    keyring.check_owner_id(owner)?;
                    let mut rows = store.load_keys(&[owner.as_str()])?;
                    rows.sort_by_key(|r| r.version);
                    let current = rows
                        .iter()
                        .filter(|r| r.state == KeyState::Active)
                        .map(|r| r.version)
                        .max();
                    let shredded =
                        !rows.is_empty() && rows.iter().all(|r| r.state == KeyState::Destroyed);
                    let versions: Vec<Value> = rows
                        .iter()
                        .map(|r| {
                            json!({
                                "version": r.version,
                                "kek_id": r.kek_id,
                                "state": r.state.as_str(),
                                "created_at": r.created_at.format("%Y-%m-%dT%H:%M:%S").to_string(),
                            })
                        })
                        .collect();
                    body.insert(
                        "owner".into(),
                        json!({
                            "owner": owner,
                            "has_key": !rows.is_empty(),
                            "current_version": current,
                            "shredded": shredded,
                            "versions": versions,
                        }),
                    );
                }
                None => {
                    if let Some(sql) = &owners_query {
                        let cov = lifecycle::coverage(store.as_ref(), sql)?;
                        body.insert("coverage".into(), coverage_json(&cov));
                    }
                }
            }
            let keys: Vec<Value> = store
                .key_counts()?
                .into_iter()
                .map(|c| {
                    json!({
                        "kek_id": c.kek_id,
                        "state": c.state.as_str(),
                        "keys": c.keys,
                        "owners": c.owners,
                    })
                })
                .collect();
            body.insert("keys".into(), Value::Array(keys));
            let head = lifecycle::feed_head(store.as_ref())?;
            let readers: Vec<Value> = lifecycle::feed_readers(store.as_ref())?
                .into_iter()
                .map(|r| {
                    json!({
                        "reader": r.reader,
                        "position": r.position,
                        "behind": r.behind(head),
                        "age_ms": u64::try_from(r.age().as_millis()).unwrap_or(u64::MAX),
                    })
                })
                .collect();
            let fleet = lifecycle::fleet_rollout(store.as_ref(), keyring.rollout_policy())?;
            let follow = keyring.feed_status().map(|f| {
            json!({
                "position": f.position,
                "interval_ms": u64::try_from(f.interval.as_millis()).unwrap_or(u64::MAX),
                "stale_for_ms": u64::try_from(f.stale_for.as_millis()).unwrap_or(u64::MAX),
                "max_staleness_ms": u64::try_from(f.max_staleness.as_millis()).unwrap_or(u64::MAX),
                "events_applied": f.events_applied,
                "read_failures": f.read_failures,
                "reader": f.reader,
                "listening": f.listening,
            })
        });
            body.insert(
                "feed".into(),
                json!({
                    "head": head,
                    "following": follow,
                    "readers": readers,
                    "rollout_policy": keyring.rollout_policy(),
                    "fleet_rollout": fleet.as_ref().map(lifecycle::describe_rollout),
                    "this_process_rollout": lifecycle::describe_rollout(&keyring.rollout()),
                }),
            );
            let s = keyring.stats();
            body.insert(
                "cache".into(),
                json!({
                    "cached_owners": s.cached_owners,
                    "hits": s.hits,
                    "misses": s.misses,
                    "unwraps": s.unwraps,
                    "creations": s.creations,
                    "evictions": s.evictions,
                    "expirations": s.expirations,
                    "store_queries": s.store_queries,
                    "key_loads": s.key_loads,
                    "audit_written": s.audit_written,
                    "audit_pending": s.audit_pending,
                    "audit_dropped": s.audit_dropped,
                }),
            );
            Ok(Value::Object(body))
        },
    )
    .await
}

// ---------------------------------------------------------------------------
// POST /generate-key

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    owner: Option<String>,
    owners_query: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn generate_key(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    body: Result<axum::Json<GenerateBody>, JsonRejection>,
) -> Response {
    const ROUTE: &str = "POST /generate-key";
    let body = match body {
        Ok(axum::Json(b)) => b,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    let owner = body.owner.clone();
    let refused = match (&body.owner, &body.owners_query) {
        (Some(_), Some(_)) => Err(Failure::bad_request(
            "give either owner or owners_query, not both",
        )),
        (Some(owner), None) if owner.is_empty() => {
            Err(Failure::bad_request("invalid owner: it is empty"))
        }
        (None, Some(_)) if !state.options.allow_request_owners_query => Err(Failure::bad_request(
            "owners_query in a request is not allowed here (Options::allow_request_owners_query); \
                 give owner, or neither to use the configured owners query",
        )),
        (None, None) if state.options.owners_query.is_none() => Err(Failure::bad_request(
            "give owner or owners_query (no default owners query is configured)",
        )),
        _ => Ok(()),
    };
    match refused {
        Err(failure) => finish(&state, &actor, &due, ROUTE, owner.as_deref(), Err(failure)).await,
        Ok(()) => {
            let keyring = state.keyring.clone();
            let query = body
                .owners_query
                .clone()
                .or_else(|| state.options.owners_query.clone());
            let one = body.owner.clone();
            let dry_run = body.dry_run;
            act(&state, &actor, &due, ROUTE, owner, move || {
                let store = keyring.store();
                let todo: Vec<String> = match &one {
                    Some(owner) => {
                        keyring.check_owner_id(owner)?;
                        if store.load_keys(&[owner.as_str()])?.is_empty() {
                            vec![owner.clone()]
                        } else {
                            Vec::new()
                        }
                    }
                    None => {
                        let sql = query.as_deref().unwrap_or_default();
                        lifecycle::coverage(store.as_ref(), sql)?.without_key
                    }
                };
                if dry_run {
                    return Ok(json!({
                        "dry_run": true,
                        "would_generate": todo.len(),
                        "owners": limited(&todo),
                    }));
                }
                let created = lifecycle::generate(&keyring, &todo, 0, &mut |_| {})?;
                Ok(json!({
                    "dry_run": false,
                    "generated": created,
                    "owners": limited(&todo),
                }))
            })
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// POST /rotate

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerBody {
    owner: String,
}

async fn rotate(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    body: Result<axum::Json<OwnerBody>, JsonRejection>,
) -> Response {
    const ROUTE: &str = "POST /rotate";
    let body = match body {
        Ok(axum::Json(b)) => b,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    let keyring = state.keyring.clone();
    let owner = body.owner.clone();
    let by = actor.name().to_owned();
    act(&state, &actor, &due, ROUTE, Some(body.owner), move || {
        let version = lifecycle::rotate_by(&keyring, &owner, &by)?;
        Ok(json!({ "owner": owner, "version": version }))
    })
    .await
}

// ---------------------------------------------------------------------------
// POST /shred

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShredBody {
    owner: String,
    confirm: Option<String>,
}

async fn shred(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    body: Result<axum::Json<ShredBody>, JsonRejection>,
) -> Response {
    const ROUTE: &str = "POST /shred";
    let body = match body {
        Ok(axum::Json(b)) => b,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    if body.confirm.as_deref() != Some(body.owner.as_str()) {
        let refused = Err(Failure::bad_request(format!(
            "shredding owner {:?} destroys every one of its data keys for good: \
             repeat the owner id in the field \"confirm\"; nothing was changed",
            body.owner
        )));
        finish(&state, &actor, &due, ROUTE, Some(&body.owner), refused).await
    } else {
        let keyring = state.keyring.clone();
        let owner = body.owner.clone();
        let by = actor.name().to_owned();
        act(&state, &actor, &due, ROUTE, Some(body.owner), move || {
            let report = lifecycle::shred_keys_by(&keyring, &owner, &by)?;
            let note = if report.key_rows == 0 {
                "the owner has no data key row: nothing was destroyed (is the owner id mistyped?)"
            } else {
                "the owner's keys are destroyed in the key store and dropped from this \
                 process's cache; keyrings following the key-event feed drop them within \
                 their feed interval, others when their cache TTL expires"
            };
            Ok(json!({
                "owner": owner,
                "destroyed_versions": report.destroyed_versions,
                "key_rows": report.key_rows,
                "keys_left": report.keys_left,
                "note": note,
            }))
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// GET /audit-log

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    owner: Option<String>,
    action: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before_id: Option<i64>,
    limit: Option<usize>,
}

fn parse_time(field: &str, text: &str) -> Result<NaiveDateTime, Failure> {
    let text = text.trim_end_matches('Z');
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .or_else(|| {
            chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
        .ok_or_else(|| {
            Failure::bad_request(format!(
                "invalid {field} {text:?}: expected a UTC time as YYYY-MM-DDTHH:MM:SS or a date YYYY-MM-DD"
            ))
        })
}

fn audit_filter(q: &AuditQuery) -> Result<AuditFilter, Failure> {
    let limit = q.limit.unwrap_or(DEFAULT_AUDIT_LIMIT);
    if limit == 0 || limit > MAX_AUDIT_LIMIT {
        return Err(Failure::bad_request(format!(
            "invalid limit {limit}: expected 1 to {MAX_AUDIT_LIMIT}"
        )));
    }
    let mut filter = AuditFilter::new(limit);
    filter.owner.clone_from(&q.owner);
    if let Some(action) = &q.action {
        filter.action = Some(AuditAction::parse(action).ok_or_else(|| {
            Failure::bad_request(format!(
                "invalid action {action:?}: expected one of generate, unwrap, rotate, rewrap, \
                 retire, destroy, clear_cache, rollout, admin, denied"
            ))
        })?);
    }
    filter.since = q
        .since
        .as_deref()
        .map(|t| parse_time("since", t))
        .transpose()?;
    filter.until = q
        .until
        .as_deref()
        .map(|t| parse_time("until", t))
        .transpose()?;
    filter.before_id = q.before_id;
    Ok(filter)
}

fn record_json(r: &AuditRecord) -> Value {
    let e = &r.event;
    json!({
        "id": r.id,
        "occurred_at": e.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        "owner": e.owner_id,
        "action": e.action.as_str(),
        "key_version": e.key_version,
        "kek_id": e.kek_id,
        "actor": e.actor,
        "detail": e.detail,
    })
}

async fn audit_log(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Response {
    const ROUTE: &str = "GET /audit-log";
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    match audit_filter(&query) {
        Err(f) => finish(&state, &actor, &due, ROUTE, query.owner.as_deref(), Err(f)).await,
        Ok(filter) => {
            let keyring = state.keyring.clone();
            act(
                &state,
                &actor,
                &due,
                ROUTE,
                query.owner.clone(),
                move || {
                    let records = keyring.store().audit_page(&filter)?;
                    let next = (records.len() == filter.limit)
                        .then(|| records.last().map(|r| r.id))
                        .flatten();
                    Ok(json!({
                        "records": records.iter().map(record_json).collect::<Vec<_>>(),
                        "next_before_id": next,
                    }))
                },
            )
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// POST /clear-cache

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    owner: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn clear_cache(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    body: Result<axum::Json<ClearBody>, JsonRejection>,
) -> Response {
    const ROUTE: &str = "POST /clear-cache";
    let body = match body {
        Ok(axum::Json(b)) => b,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    let refused = match (&body.owner, body.all) {
        (Some(_), true) => Err(Failure::bad_request(
            "give either owner or \"all\": true, not both; nothing was changed",
        )),
        (None, false) => Err(Failure::bad_request(
            "give owner, or \"all\": true to clear every owner's keys; nothing was changed",
        )),
        _ => Ok(()),
    };
    match refused {
        Err(failure) => {
            finish(
                &state,
                &actor,
                &due,
                ROUTE,
                body.owner.as_deref(),
                Err(failure),
            )
            .await
        }
        Ok(()) => {
            let keyring = state.keyring.clone();
            let owner = body.owner.clone();
            let by = actor.name().to_owned();
            act(&state, &actor, &due, ROUTE, body.owner.clone(), move || {
                let id = lifecycle::clear_cache_fleet_by(&keyring, owner.as_deref(), &by)?;
                Ok(json!({
                    "owner": owner,
                    "all": owner.is_none(),
                    "event_id": id,
                    "note": "cleared in this process; every keyring following the key-event feed \
                             clears it within its feed interval",
                }))
            })
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// POST /rollout

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutBody {
    mode: String,
    #[serde(default)]
    owners: Vec<String>,
}

fn rollout_of(body: &RolloutBody) -> Result<Rollout, Failure> {
    match (body.mode.as_str(), body.owners.is_empty()) {
        ("all", true) => Ok(Rollout::All),
        ("nobody", true) => Ok(Rollout::Nobody),
        ("owners", false) => {
            if body.owners.iter().any(String::is_empty) {
                return Err(Failure::bad_request("invalid owners: an owner id is empty"));
            }
            Ok(Rollout::owners(body.owners.iter().cloned()))
        }
        ("owners", true) => Err(Failure::bad_request(
            "mode \"owners\" needs a non-empty \"owners\" list (use \"nobody\" for none)",
        )),
        ("all" | "nobody", false) => Err(Failure::bad_request(format!(
            "mode {:?} takes no \"owners\" list",
            body.mode
        ))),
        (other, _) => Err(Failure::bad_request(format!(
            "invalid mode {other:?}: expected \"all\", \"nobody\" or \"owners\""
        ))),
    }
}

async fn rollout(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    body: Result<axum::Json<RolloutBody>, JsonRejection>,
) -> Response {
    const ROUTE: &str = "POST /rollout";
    let body = match body {
        Ok(axum::Json(b)) => b,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    match rollout_of(&body) {
        Err(f) => finish(&state, &actor, &due, ROUTE, None, Err(f)).await,
        Ok(policy) => {
            let keyring = state.keyring.clone();
            let by = actor.name().to_owned();
            act(&state, &actor, &due, ROUTE, None, move || {
                let id = lifecycle::set_rollout_by(&keyring, &policy, &by)?;
                Ok(json!({
                    "policy": keyring.rollout_policy(),
                    "rollout": lifecycle::describe_rollout(&policy),
                    "event_id": id,
                    "note": "applied in this process; every keyring following the key-event feed \
                             applies it within its feed interval",
                }))
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_over_the_limit_are_left_out_and_counted_in_the_next_record() {
        let start = Instant::now();
        let limit = DeniedLimit::new(2, Duration::from_secs(60), start);
        assert_eq!(limit.admit(start), Some(0));
        assert_eq!(limit.admit(start + Duration::from_secs(1)), Some(0));
        assert_eq!(limit.admit(start + Duration::from_secs(2)), None);
        assert_eq!(limit.admit(start + Duration::from_secs(59)), None);
        // A new window: audited again, with the two left out reported.
        assert_eq!(limit.admit(start + Duration::from_secs(60)), Some(2));
        assert_eq!(limit.admit(start + Duration::from_secs(61)), Some(0));
        assert_eq!(limit.admit(start + Duration::from_secs(62)), None);
        // A record that could not be written: its refusal and those it
        // carried are reported by the next one.
        limit.left_out(1 + 1);
        assert_eq!(limit.admit(start + Duration::from_secs(120)), Some(3));
    }

    #[test]
    fn refusals_over_the_limit_are_not_logged_one_by_one_and_one_line_per_window_says_so() {
        let start = Instant::now();
        let limit = DeniedLimit::new(1, Duration::from_secs(60), start);
        assert_eq!(limit.decide(start), Denied::Audit { left_out: 0 });
        // Over the limit: neither audited nor logged; the first says so once.
        assert_eq!(limit.decide(start), Denied::LeaveOut { first: true });
        for _ in 0..100 {
            assert_eq!(limit.decide(start), Denied::LeaveOut { first: false });
        }
        // The next window logs and audits again, reporting those left out.
        let next = start + Duration::from_secs(60);
        assert_eq!(limit.decide(next), Denied::Audit { left_out: 101 });
        assert_eq!(limit.decide(next), Denied::LeaveOut { first: true });
    }

    #[test]
    fn a_long_detail_is_cut_at_a_character_boundary_and_says_so() {
        assert_eq!(bounded("short", 64), "short");
        let long = "é".repeat(1_000); // 2,000 bytes
        for max in [64, 65, 1_024] {
            let cut = bounded(&long, max);
            assert!(cut.len() <= max, "{} > {max}", cut.len());
            assert!(cut.ends_with(" [truncated from 2000 bytes]"), "{cut}");
            assert!(cut.starts_with('é'));
        }
    }

    #[test]
    fn an_admitted_request_that_ends_before_acting_is_audited_as_cancelled() {
        use crate::{KeyBytes, LocalKek, MemoryKeyStore};
        let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
        let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek)
            .build()
            .expect("keyring");
        let admin_records = |keyring: &Keyring| {
            keyring
                .store()
                .audit(Some(ALL_OWNERS), 10)
                .expect("audit")
                .into_iter()
                .filter(|r| r.event.action == AuditAction::Admin)
                .collect::<Vec<_>>()
        };
        // Taken over by a handler: the guard writes nothing.
        let due = RecordDue::default();
        assert!(due.take());
        drop(UnwrittenRecord {
            due,
            keyring: keyring.clone(),
            actor: "operator".into(),
            route: "POST /rotate".into(),
        });
        // Dropped first: the guard writes the record (on a thread of its own).
        drop(UnwrittenRecord {
            due: RecordDue::default(),
            keyring: keyring.clone(),
            actor: "operator".into(),
            route: "POST /shred".into(),
        });
        let until = Instant::now() + Duration::from_secs(10);
        while admin_records(&keyring).is_empty() && Instant::now() < until {
            std::thread::yield_now();
        }
        let records = admin_records(&keyring);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].event.actor, "operator");
        assert!(
            records[0]
                .event
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with("POST /shred: cancelled")),
            "{records:?}"
        );
    }

    #[test]
    fn a_zero_limit_audits_no_refusal() {
        let start = Instant::now();
        let limit = DeniedLimit::new(0, Duration::from_secs(60), start);
        assert_eq!(limit.admit(start), None);
        assert_eq!(limit.admit(start + Duration::from_secs(120)), None);
    }
}

// ---------------------------------------------------------------------------
// GET /access-log

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessQuery {
    owner: Option<String>,
    user: Option<String>,
    table: Option<String>,
    row: Option<String>,
    since: Option<String>,
    until: Option<String>,
    chain: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
}

fn access_filter(q: &AccessQuery) -> Result<crate::access_log::AccessFilter, Failure> {
    let limit = q.limit.unwrap_or(DEFAULT_AUDIT_LIMIT);
    if limit == 0 || limit > MAX_AUDIT_LIMIT {
        return Err(Failure::bad_request(format!(
            "invalid limit {limit}: expected 1 to {MAX_AUDIT_LIMIT}"
        )));
    }
    Ok(crate::access_log::AccessFilter {
        owner: q.owner.clone(),
        user: q.user.clone(),
        table: q.table.clone(),
        row: q.row.clone(),
        since: q
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: q
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        chain: q.chain.clone(),
        limit,
        offset: q.offset.unwrap_or(0),
    })
}

/// `GET /access-log?owner=&user=&table=&row=&since=&until=&chain=&offset=&limit=`:
/// access records, oldest first (100 a page, at most 1,000), as `phi audit
/// access --format json` prints them, and the offset of the next page.
async fn access_log(
    State(state): State<AdminState>,
    Extension(actor): Extension<Actor>,
    Extension(due): Extension<RecordDue>,
    query: Result<Query<AccessQuery>, QueryRejection>,
) -> Response {
    const ROUTE: &str = "GET /access-log";
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return finish(&state, &actor, &due, ROUTE, None, Err(e.into())).await,
    };
    let Some(tables) = state.options.access_log.clone() else {
        let failure = Failure::bad_request(
            "no access log is configured on this admin API (Options::access_log)",
        );
        return finish(
            &state,
            &actor,
            &due,
            ROUTE,
            query.owner.as_deref(),
            Err(failure),
        )
        .await;
    };
    match access_filter(&query) {
        Err(f) => finish(&state, &actor, &due, ROUTE, query.owner.as_deref(), Err(f)).await,
        Ok(filter) => {
            act(&state, &actor, &due, ROUTE, query.owner.clone(), move || {
                let records = tables.query(&filter)?;
                let next = (records.len() == filter.limit).then(|| filter.offset + filter.limit);
                Ok(json!({
                    "records": records.iter().map(crate::access_log::record_json).collect::<Vec<_>>(),
                    "next_offset": next,
                }))
            })
            .await
        }
    }
}
