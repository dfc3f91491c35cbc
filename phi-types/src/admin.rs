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
//! (400 bad input, 409 refused by the key's state, 415 or 422 a body that
//! is not the JSON expected, 500 key store or KEK failure); they name
//! owners, versions and KEKs, never key material or stored values.
//!
//! # OpenAPI
//!
//! [`openapi`] and [`probes_openapi`] return the OpenAPI 3.1 documents of
//! [`router`] and [`probes`], generated (with utoipa) from the handlers
//! and the types they serialise: each router and its document are built
//! from one list of handlers, so a route is never served undocumented.
//! An application nests them where it mounts the routers, adds its own
//! routes and security scheme, and serves the result with
//! [`serve_openapi`] at `GET /openapi.json`, outside the guard (the
//! document holds no owner, key or secret). See [`serve_openapi`] for an
//! example.
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
use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

    /// Sets [`Options::access_log`]: the tables by value or an `Arc` of
    /// them ([`IntoShared`](crate::IntoShared)).
    #[must_use]
    pub fn access_log(
        mut self,
        tables: impl crate::IntoShared<dyn crate::access_log::AccessLogStore>,
    ) -> Self {
        self.access_log = Some(tables.into_shared());
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
    let (routes, _) = admin_routes().split_for_parts();
    routes
        .with_state(state)
        .layer(middleware::from_fn_with_state(guarded, admit::<G>))
}

/// The guarded routes and their document, from one list of handlers: a
/// route is served only together with its `#[utoipa::path]`.
fn admin_routes() -> OpenApiRouter<AdminState> {
    use utoipa::OpenApi as _;
    OpenApiRouter::with_openapi(AdminDoc::openapi())
        .routes(routes!(key_status))
        .routes(routes!(generate_key))
        .routes(routes!(rotate))
        .routes(routes!(shred))
        .routes(routes!(audit_log))
        .routes(routes!(clear_cache))
        .routes(routes!(rollout))
        .routes(routes!(access_log))
}

/// The probes and their document (see [`admin_routes`]).
fn probe_routes() -> OpenApiRouter<Keyring> {
    use utoipa::OpenApi as _;
    OpenApiRouter::with_openapi(ProbesDoc::openapi())
        .routes(routes!(live))
        .routes(routes!(ready))
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
    let (routes, _) = probe_routes().split_for_parts();
    routes.with_state(keyring)
}

/// The guarded routes' document: what [`router`] serves, its paths
/// relative to where the application mounts it. Nest it under the same
/// prefix in the application's own document (with
/// [`OpenApi::nest`](utoipa::openapi::OpenApi::nest)), and merge
/// [`probes_openapi`] where the probes are mounted; [`serve_openapi`]
/// serves the result.
///
/// Each route's answer and its errors (`{"error": …}` with 400, 401, 403,
/// 409, 415, 422 or 500) are described by schemas generated from the
/// types the handlers serialise. The guard is the application's: the
/// document names no security scheme (add the application's own).
pub fn openapi() -> utoipa::openapi::OpenApi {
    admin_routes().into_openapi()
}

/// The probes' document: `GET /live` and `GET /ready` as [`probes`]
/// serves them.
pub fn probes_openapi() -> utoipa::openapi::OpenApi {
    probe_routes().into_openapi()
}

/// Serves `document` at `GET /openapi.json`, with that route added to it.
/// Like the probes it is **not** behind a guard: the document describes
/// routes and shapes, and holds no owner, key or secret. Merge it at the
/// root of the application's router.
///
/// ```
/// use std::sync::Arc;
/// use axum::http::request::Parts;
/// use phi_types::admin::{self, Actor, Guard, Rejection};
/// use phi_types::{Keyring, KeyBytes, LocalKek, MemoryKeyStore};
///
/// struct Operators;
/// impl Guard for Operators {
///     async fn admit(&self, _: &Parts) -> Result<Actor, Rejection> {
///         Err(Rejection::unauthorized("no operators today"))
///     }
/// }
///
/// let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
/// let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
/// // The document of what the application mounts: the admin routes under
/// // `/admin`, the probes at the root.
/// let document = admin::probes_openapi().nest("/admin", admin::openapi());
/// assert!(document.paths.paths.contains_key("/admin/rotate"));
/// assert!(document.paths.paths.contains_key("/ready"));
/// let app: axum::Router = axum::Router::new()
///     .nest("/admin", admin::router(keyring.clone(), Operators))
///     .merge(admin::probes(keyring))
///     .merge(admin::serve_openapi(document));
/// # drop(app);
/// # Ok::<(), phi_types::Error>(())
/// ```
pub fn serve_openapi(document: utoipa::openapi::OpenApi) -> Router {
    let (routes, document) = OpenApiRouter::with_openapi(document)
        .routes(routes!(openapi_json))
        .split_for_parts();
    // Serialised once: the document does not change.
    let text = serde_json::to_string(&document).unwrap_or_else(|e| {
        serde_json::to_string(&ErrorBody {
            error: format!("the OpenAPI document does not serialise: {e}"),
            audit_error: None,
        })
        .unwrap_or_default()
    });
    routes.with_state(Arc::<str>::from(text))
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", body = Value))
)]
async fn openapi_json(State(document): State<Arc<str>>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document.to_string(),
    )
        .into_response()
}

/// The admin API's document: its description and shared schemas (the
/// paths come from [`admin_routes`]).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "phi admin API",
        description = "Key status, key generation, rotation, crypto-shredding, cache clears, \
                       roll-out and the audit logs, mounted by the application behind an \
                       authorization guard of its own. Every request is audited. Errors are \
                       `{\"error\": \"...\"}`; any answer may carry `audit_error` when its \
                       audit record could not be written."
    ),
    components(schemas(ErrorBody)),
    tags((name = "admin", description = "phi's key administration, behind the application's guard"))
)]
struct AdminDoc;

/// The probes' document (paths from [`probe_routes`]).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "phi probes",
        description = "Liveness and readiness, without authentication."
    ),
    tags((name = "probes", description = "Health probes for orchestrators and load balancers"))
)]
struct ProbesDoc;

/// `GET /live`'s answer.
#[derive(Serialize, ToSchema)]
struct Live {
    /// Always `true`: the process answers.
    live: bool,
}

/// Liveness: the process answers (nothing else is checked).
#[utoipa::path(
    get,
    path = "/live",
    tag = "probes",
    responses((status = 200, description = "The process answers.", body = Live))
)]
async fn live() -> axum::Json<Live> {
    axum::Json(Live { live: true })
}

/// Readiness: the key store answers, the KEK opens its check value, the
/// key-event feed (if followed) is fresh enough.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "probes",
    responses(
        (status = 200, description = "Ready to serve.", body = crate::Readiness),
        (status = 503, description = "Not ready: the failed check says why.", body = crate::Readiness),
    )
)]
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
    let body = ErrorBody {
        error: message.to_owned(),
        audit_error: None,
    };
    (status, axum::Json(body)).into_response()
}

/// Every error answer of the admin API.
#[derive(Serialize, ToSchema)]
struct ErrorBody {
    /// What went wrong, naming owners, versions and KEKs (never key
    /// material or stored values).
    error: String,
    /// Present when the request's `admin` audit record could not be
    /// written (also on a success answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_error: Option<String>,
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
async fn act<T: Serialize + 'static>(
    state: &AdminState,
    actor: &Actor,
    due: &RecordDue,
    route: &'static str,
    owner: Option<String>,
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Response {
    due.take();
    let keyring = state.keyring.clone();
    let actor = actor.name().to_owned();
    let task = tokio::task::spawn_blocking(move || {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| Err(Error::Config("the admin operation panicked".into())))
            .and_then(|answer| {
                serde_json::to_value(answer)
                    .map_err(|e| Error::Config(format!("the admin answer's JSON: {e}")))
            })
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

/// Key coverage against the configured owners query.
#[derive(Serialize, ToSchema)]
struct CoverageOut {
    /// Owners the query returned.
    owners: usize,
    /// Of them, with an active data key.
    with_active_key: usize,
    /// Of them, with no key row at all.
    without_key: usize,
    /// The first 100 of those.
    without_key_owners: Vec<String>,
    /// Of them, with every key retired.
    all_retired: usize,
    /// The first 100 of those.
    all_retired_owners: Vec<String>,
    /// Of them, crypto-shredded.
    shredded: usize,
    /// Percentage with an active key.
    percent: f64,
}

impl From<&lifecycle::Coverage> for CoverageOut {
    fn from(cov: &lifecycle::Coverage) -> Self {
        CoverageOut {
            owners: cov.owners,
            with_active_key: cov.with_active_key,
            without_key: cov.without_key.len(),
            without_key_owners: limited(&cov.without_key).to_vec(),
            all_retired: cov.all_retired.len(),
            all_retired_owners: limited(&cov.all_retired).to_vec(),
            shredded: cov.shredded,
            percent: cov.percent(),
        }
    }
}

// ---------------------------------------------------------------------------
// GET /key-status

/// `GET /key-status?owner=`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct StatusQuery {
    /// One owner's keys (else coverage, when an owners query is configured).
    owner: Option<String>,
}

/// `GET /key-status`'s answer.
#[derive(Serialize, ToSchema)]
struct KeyStatus {
    /// The owner asked about (`?owner=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<OwnerStatus>,
    /// Coverage against the configured owners query (no `?owner=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    coverage: Option<CoverageOut>,
    /// Data keys by KEK and state.
    keys: Vec<KeyCountOut>,
    /// The key-event feed and the roll-out.
    feed: FeedOut,
    /// This process's key cache.
    cache: CacheOut,
}

/// One owner's data keys.
#[derive(Serialize, ToSchema)]
struct OwnerStatus {
    /// The owner id.
    owner: String,
    /// The owner has a key row.
    has_key: bool,
    /// The newest active version.
    current_version: Option<u32>,
    /// Every key of the owner is destroyed.
    shredded: bool,
    /// Each key version, oldest first.
    versions: Vec<KeyVersionOut>,
}

/// One data key version.
#[derive(Serialize, ToSchema)]
struct KeyVersionOut {
    /// The version.
    version: u32,
    /// The KEK that wraps it.
    kek_id: String,
    /// `active`, `retired` or `destroyed`.
    state: String,
    /// Created at (UTC, `YYYY-MM-DDTHH:MM:SS`).
    created_at: String,
}

/// Data keys of one KEK in one state.
#[derive(Serialize, ToSchema)]
struct KeyCountOut {
    /// The KEK.
    kek_id: String,
    /// `active`, `retired` or `destroyed`.
    state: String,
    /// Key rows.
    keys: u64,
    /// Distinct owners.
    owners: u64,
}

/// The key-event feed: its head, the readers, the roll-out.
#[derive(Serialize, ToSchema)]
struct FeedOut {
    /// The newest event's id.
    head: i64,
    /// This process's reading of the feed (null when it does not follow it).
    following: Option<FollowingOut>,
    /// Every recorded reader (`phi_feed_readers`).
    readers: Vec<ReaderOut>,
    /// The roll-out policy's name.
    rollout_policy: String,
    /// The fleet's roll-out (null when never set).
    fleet_rollout: Option<String>,
    /// This process's roll-out.
    this_process_rollout: String,
}

/// This process's reading of the feed.
#[derive(Serialize, ToSchema)]
struct FollowingOut {
    /// The last event applied.
    position: i64,
    /// Milliseconds between two reads.
    interval_ms: u64,
    /// Milliseconds since the last successful read.
    stale_for_ms: u64,
    /// The maximum staleness, in milliseconds.
    max_staleness_ms: u64,
    /// Events applied.
    events_applied: u64,
    /// Reads that failed.
    read_failures: u64,
    /// This reader's name.
    reader: String,
    /// Woken by the store's notifications.
    listening: bool,
}

/// A recorded reader of the feed.
#[derive(Serialize, ToSchema)]
struct ReaderOut {
    /// Its name.
    reader: String,
    /// The last event it applied.
    position: i64,
    /// Events it is behind the head.
    behind: i64,
    /// Milliseconds since it last recorded its position.
    age_ms: u64,
}

/// This process's key cache (`KeyringStats`).
#[derive(Serialize, ToSchema)]
struct CacheOut {
    /// Owners cached.
    cached_owners: usize,
    /// Cache hits.
    hits: u64,
    /// Cache misses.
    misses: u64,
    /// Data keys unwrapped.
    unwraps: u64,
    /// Data keys created.
    creations: u64,
    /// Owners evicted.
    evictions: u64,
    /// Owners expired.
    expirations: u64,
    /// Key store queries.
    store_queries: u64,
    /// Key rows loaded.
    key_loads: u64,
    /// Audit records written.
    audit_written: u64,
    /// Audit records queued.
    audit_pending: u64,
    /// Audit records dropped.
    audit_dropped: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Coverage (overall or one owner's keys), data keys by KEK and state, the
/// key-event feed and the roll-out, this process's cache statistics.
#[utoipa::path(
    get,
    path = "/key-status",
    tag = "admin",
    params(StatusQuery),
    responses(
        (status = 200, description = "The key status.", body = KeyStatus),
        (status = 400, description = "Bad query string or owner id.", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 500, description = "Key store failure.", body = ErrorBody),
    )
)]
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
            let mut owner_status = None;
            let mut coverage = None;
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
                    let versions = rows
                        .iter()
                        .map(|r| KeyVersionOut {
                            version: r.version,
                            kek_id: r.kek_id.clone(),
                            state: r.state.as_str().to_owned(),
                            created_at: r.created_at.format("%Y-%m-%dT%H:%M:%S").to_string(),
                        })
                        .collect();
                    owner_status = Some(OwnerStatus {
                        owner: owner.clone(),
                        has_key: !rows.is_empty(),
                        current_version: current,
                        shredded,
                        versions,
                    });
                }
                None => {
                    if let Some(sql) = &owners_query {
                        let cov = lifecycle::coverage(store.as_ref(), sql)?;
                        coverage = Some(CoverageOut::from(&cov));
                    }
                }
            }
            let keys = store
                .key_counts()?
                .into_iter()
                .map(|c| KeyCountOut {
                    kek_id: c.kek_id,
                    state: c.state.as_str().to_owned(),
                    keys: c.keys,
                    owners: c.owners,
                })
                .collect();
            let head = lifecycle::feed_head(store.as_ref())?;
            let readers = lifecycle::feed_readers(store.as_ref())?
                .into_iter()
                .map(|r| ReaderOut {
                    behind: r.behind(head),
                    age_ms: millis(r.age()),
                    reader: r.reader,
                    position: r.position,
                })
                .collect();
            let fleet = lifecycle::fleet_rollout(store.as_ref(), keyring.rollout_policy())?;
            let following = keyring.feed_status().map(|f| FollowingOut {
                position: f.position,
                interval_ms: millis(f.interval),
                stale_for_ms: millis(f.stale_for),
                max_staleness_ms: millis(f.max_staleness),
                events_applied: f.events_applied,
                read_failures: f.read_failures,
                reader: f.reader,
                listening: f.listening,
            });
            let feed = FeedOut {
                head,
                following,
                readers,
                rollout_policy: keyring.rollout_policy().to_owned(),
                fleet_rollout: fleet.as_ref().map(lifecycle::describe_rollout),
                this_process_rollout: lifecycle::describe_rollout(&keyring.rollout()),
            };
            let s = keyring.stats();
            let cache = CacheOut {
                cached_owners: s.cached_owners,
                hits: s.hits,
                misses: s.misses,
                unwraps: s.unwraps,
                creations: s.creations,
                evictions: s.evictions,
                expirations: s.expirations,
                store_queries: s.store_queries,
                key_loads: s.key_loads,
                audit_written: s.audit_written,
                audit_pending: s.audit_pending,
                audit_dropped: s.audit_dropped,
            };
            Ok(KeyStatus {
                owner: owner_status,
                coverage,
                keys,
                feed,
                cache,
            })
        },
    )
    .await
}

// ---------------------------------------------------------------------------
// POST /generate-key

/// `POST /generate-key`'s body: `owner`, or `owners_query` (when allowed),
/// or neither (the configured owners query).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    /// One owner.
    owner: Option<String>,
    /// An owners query of the request's own
    /// (`Options::allow_request_owners_query`).
    owners_query: Option<String>,
    /// Only count and list the owners a key would be generated for.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /generate-key`'s answer: a dry run's or a run's.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum GenerateOut {
    /// `"dry_run": true`.
    DryRun(DryRunOut),
    /// Keys generated.
    Generated(GeneratedOut),
}

/// A dry run of `POST /generate-key`.
#[derive(Serialize, ToSchema)]
struct DryRunOut {
    /// `true`.
    dry_run: bool,
    /// Owners a key would be generated for.
    would_generate: usize,
    /// The first 100 of them.
    owners: Vec<String>,
}

/// Keys generated by `POST /generate-key`.
#[derive(Serialize, ToSchema)]
struct GeneratedOut {
    /// `false`.
    dry_run: bool,
    /// Data keys created.
    generated: u64,
    /// The first 100 owners that had none.
    owners: Vec<String>,
}

/// A data key for one owner, or for each owner an owners query returns that
/// has none.
#[utoipa::path(
    post,
    path = "/generate-key",
    tag = "admin",
    request_body = GenerateBody,
    responses(
        (status = 200, description = "Generated (or, in a dry run, counted).", body = GenerateOut),
        (status = 400, description = "Bad input: both or neither of owner and owners_query, an owners query not allowed, bad JSON.", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 409, description = "Refused by the key's state.", body = ErrorBody),
        (status = 415, description = "The body is not sent as `application/json`.", body = ErrorBody),
        (status = 422, description = "The JSON body does not have the fields expected.", body = ErrorBody),
        (status = 500, description = "Key store or KEK failure.", body = ErrorBody),
    )
)]
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
                    return Ok(GenerateOut::DryRun(DryRunOut {
                        dry_run: true,
                        would_generate: todo.len(),
                        owners: limited(&todo).to_vec(),
                    }));
                }
                let created =
                    lifecycle::generate(&keyring, &todo, &lifecycle::GenerateOptions::default())?;
                Ok(GenerateOut::Generated(GeneratedOut {
                    dry_run: false,
                    generated: created,
                    owners: limited(&todo).to_vec(),
                }))
            })
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// POST /rotate

/// `POST /rotate`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct OwnerBody {
    /// The owner.
    owner: String,
}

/// `POST /rotate`'s answer.
#[derive(Serialize, ToSchema)]
struct Rotated {
    /// The owner.
    owner: String,
    /// The new data key version.
    version: u32,
}

/// A new data key version for one owner.
#[utoipa::path(
    post,
    path = "/rotate",
    tag = "admin",
    request_body = OwnerBody,
    responses(
        (status = 200, description = "Rotated.", body = Rotated),
        (status = 400, description = "Bad input (owner id, JSON).", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 409, description = "Refused by the key's state (shredded, no key).", body = ErrorBody),
        (status = 415, description = "The body is not sent as `application/json`.", body = ErrorBody),
        (status = 422, description = "The JSON body does not have the fields expected.", body = ErrorBody),
        (status = 500, description = "Key store or KEK failure.", body = ErrorBody),
    )
)]
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
        Ok(Rotated { owner, version })
    })
    .await
}

// ---------------------------------------------------------------------------
// POST /shred

/// `POST /shred`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ShredBody {
    /// The owner.
    owner: String,
    /// The owner id again.
    confirm: Option<String>,
}

/// `POST /shred`'s answer.
#[derive(Serialize, ToSchema)]
struct Shredded {
    /// The owner.
    owner: String,
    /// The versions destroyed by this request.
    destroyed_versions: Vec<u32>,
    /// The owner's key rows.
    key_rows: usize,
    /// Of them, not destroyed.
    keys_left: usize,
    /// What happens next (or why nothing was destroyed).
    note: String,
}

/// Crypto-shreds one owner: destroys every one of its data keys.
#[utoipa::path(
    post,
    path = "/shred",
    tag = "admin",
    request_body = ShredBody,
    responses(
        (status = 200, description = "Shredded (or nothing to shred: see `note`).", body = Shredded),
        (status = 400, description = "`confirm` does not repeat the owner id; bad JSON.", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 409, description = "Refused by the key's state.", body = ErrorBody),
        (status = 415, description = "The body is not sent as `application/json`.", body = ErrorBody),
        (status = 422, description = "The JSON body does not have the fields expected.", body = ErrorBody),
        (status = 500, description = "Key store failure.", body = ErrorBody),
    )
)]
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
            Ok(Shredded {
                owner,
                destroyed_versions: report.destroyed_versions,
                key_rows: report.key_rows,
                keys_left: report.keys_left,
                note: note.to_owned(),
            })
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// GET /audit-log

/// `GET /audit-log`'s query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// One owner's records (`*`: those not about one owner).
    owner: Option<String>,
    /// One action: generate, unwrap, rotate, rewrap, retire, destroy,
    /// clear_cache, rollout, admin, denied.
    action: Option<String>,
    /// From (UTC, `YYYY-MM-DDTHH:MM:SS` or `YYYY-MM-DD`).
    since: Option<String>,
    /// Until (UTC, as `since`).
    until: Option<String>,
    /// Records older than this id (the previous page's `next_before_id`).
    before_id: Option<i64>,
    /// Records a page (default 100, at most 1,000).
    limit: Option<usize>,
}

/// A page of `encryption_key_audit`, newest first.
#[derive(Serialize, ToSchema)]
struct AuditPage {
    /// The records.
    records: Vec<AuditRecordOut>,
    /// `before_id` of the next page (null on the last).
    next_before_id: Option<i64>,
}

/// An audit record.
#[derive(Serialize, ToSchema)]
struct AuditRecordOut {
    /// Its id.
    id: i64,
    /// When (UTC, microseconds).
    occurred_at: String,
    /// The owner (`*`: not about one owner).
    owner: String,
    /// The action.
    action: String,
    /// The key version concerned.
    key_version: Option<u32>,
    /// The KEK concerned.
    kek_id: Option<String>,
    /// Who.
    actor: String,
    /// Details.
    detail: Option<String>,
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

fn record_out(r: &AuditRecord) -> AuditRecordOut {
    let e = &r.event;
    AuditRecordOut {
        id: r.id,
        occurred_at: e.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        owner: e.owner_id.clone(),
        action: e.action.as_str().to_owned(),
        key_version: e.key_version,
        kek_id: e.kek_id.clone(),
        actor: e.actor.clone(),
        detail: e.detail.clone(),
    }
}

/// `encryption_key_audit`, newest first, by owner, action and time, paged.
#[utoipa::path(
    get,
    path = "/audit-log",
    tag = "admin",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of records.", body = AuditPage),
        (status = 400, description = "Bad query: limit, action, time.", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 500, description = "Key store failure.", body = ErrorBody),
    )
)]
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
                    Ok(AuditPage {
                        records: records.iter().map(record_out).collect(),
                        next_before_id: next,
                    })
                },
            )
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// POST /clear-cache

/// `POST /clear-cache`'s body: `owner`, or `"all": true`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ClearBody {
    /// One owner's keys.
    owner: Option<String>,
    /// Every owner's keys.
    #[serde(default)]
    all: bool,
}

/// `POST /clear-cache`'s answer.
#[derive(Serialize, ToSchema)]
struct CacheCleared {
    /// The owner (null with `all`).
    owner: Option<String>,
    /// Every owner's keys.
    all: bool,
    /// The key-event feed's event.
    event_id: i64,
    /// Where it is cleared, when.
    note: String,
}

/// Clears cached keys in this process at once, in every process following
/// the key-event feed within its interval.
#[utoipa::path(
    post,
    path = "/clear-cache",
    tag = "admin",
    request_body = ClearBody,
    responses(
        (status = 200, description = "Cleared and published.", body = CacheCleared),
        (status = 400, description = "Both or neither of owner and all; bad JSON.", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 415, description = "The body is not sent as `application/json`.", body = ErrorBody),
        (status = 422, description = "The JSON body does not have the fields expected.", body = ErrorBody),
        (status = 500, description = "Key store failure.", body = ErrorBody),
    )
)]
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
                Ok(CacheCleared {
                    all: owner.is_none(),
                    owner,
                    event_id: id,
                    note: "cleared in this process; every keyring following the key-event feed \
                           clears it within its feed interval"
                        .into(),
                })
            })
            .await
        }
    }
}

// ---------------------------------------------------------------------------
// POST /rollout

/// `POST /rollout`'s body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RolloutBody {
    /// `all`, `nobody` or `owners`.
    mode: String,
    /// With `owners`: the owners (non-empty).
    #[serde(default)]
    owners: Vec<String>,
}

/// `POST /rollout`'s answer.
#[derive(Serialize, ToSchema)]
struct RolloutSet {
    /// The policy's name.
    policy: String,
    /// The roll-out set.
    rollout: String,
    /// The key-event feed's event.
    event_id: i64,
    /// Where it applies, when.
    note: String,
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

/// Sets the fleet's roll-out policy, through the key-event feed.
#[utoipa::path(
    post,
    path = "/rollout",
    tag = "admin",
    request_body = RolloutBody,
    responses(
        (status = 200, description = "Set and published.", body = RolloutSet),
        (status = 400, description = "Bad mode or owners; bad JSON.", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 415, description = "The body is not sent as `application/json`.", body = ErrorBody),
        (status = 422, description = "The JSON body does not have the fields expected.", body = ErrorBody),
        (status = 500, description = "Key store failure.", body = ErrorBody),
    )
)]
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
                Ok(RolloutSet {
                    policy: keyring.rollout_policy().to_owned(),
                    rollout: lifecycle::describe_rollout(&policy),
                    event_id: id,
                    note: "applied in this process; every keyring following the key-event feed \
                           applies it within its feed interval"
                        .into(),
                })
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

    /// Admits every request, as `test`.
    struct AdmitAll;

    impl Guard for AdmitAll {
        async fn admit(&self, _: &Parts) -> Result<Actor, Rejection> {
            Ok(Actor::new("test"))
        }
    }

    /// The routes a document lists, as `(METHOD, path)`.
    fn documented(doc: &utoipa::openapi::OpenApi) -> Vec<(String, String)> {
        let json = serde_json::to_value(doc).expect("the document as JSON");
        let mut routes = Vec::new();
        for (path, item) in json["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                routes.push((method.to_uppercase(), path.clone()));
            }
        }
        routes.sort();
        routes
    }

    #[test]
    fn the_documents_list_every_route_the_routers_serve_and_no_other() {
        use tower::ServiceExt as _;
        let admin = documented(&openapi());
        let expected = [
            ("GET", "/access-log"),
            ("GET", "/audit-log"),
            ("GET", "/key-status"),
            ("POST", "/clear-cache"),
            ("POST", "/generate-key"),
            ("POST", "/rollout"),
            ("POST", "/rotate"),
            ("POST", "/shred"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        assert_eq!(admin, expected);
        assert_eq!(
            documented(&probes_openapi()),
            [
                ("GET".to_owned(), "/live".to_owned()),
                ("GET".to_owned(), "/ready".to_owned())
            ]
        );
        // Every route is added with its documentation (`routes!`): none
        // with a bare axum route call, which would go undocumented.
        let bare = concat!(".rou", "te(");
        assert!(
            !include_str!("admin.rs").contains(bare),
            "admin.rs adds a route without its #[utoipa::path]: use routes!(handler)"
        );

        // Each documented route reaches its handler; another method on it
        // is 405, a path not documented is 404.
        let kek = Arc::new(crate::LocalKek::new(
            "local-1",
            &crate::KeyBytes::new([7; 32]),
        ));
        let keyring = Keyring::builder(Arc::new(crate::MemoryKeyStore::new()), kek)
            .build()
            .expect("keyring");
        let app = router(keyring.clone(), AdmitAll).merge(probes(keyring));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let status = |method: &str, path: &str| {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", "application/json")
                .body(axum::body::Body::from("{}"))
                .expect("request");
            runtime
                .block_on(app.clone().oneshot(request))
                .expect("infallible")
                .status()
        };
        for (method, path) in admin.iter().chain(&documented(&probes_openapi())) {
            let got = status(method, path);
            assert!(
                got != StatusCode::NOT_FOUND && got != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {got}"
            );
            let other = if method == "GET" { "DELETE" } else { "GET" };
            assert_eq!(
                status(other, path),
                StatusCode::METHOD_NOT_ALLOWED,
                "{other} {path}"
            );
        }
        assert_eq!(status("GET", "/not-documented"), StatusCode::NOT_FOUND);
    }

    #[test]
    fn served_openapi_json_documents_itself_and_the_mounted_routes() {
        use tower::ServiceExt as _;
        let document = probes_openapi().nest("/admin", openapi());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let request = axum::http::Request::builder()
            .uri("/openapi.json")
            .body(axum::body::Body::empty())
            .expect("request");
        let response = runtime
            .block_on(serve_openapi(document).oneshot(request))
            .expect("infallible");
        assert_eq!(response.status(), StatusCode::OK);
        let body = runtime
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
            .expect("body");
        let json: Value = serde_json::from_slice(&body).expect("JSON");
        assert!(
            json["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3."))
        );
        for path in [
            "/openapi.json",
            "/live",
            "/ready",
            "/admin/key-status",
            "/admin/shred",
        ] {
            assert!(json["paths"].get(path).is_some(), "{path} in {json}");
        }
        assert!(json["components"]["schemas"].get("ErrorBody").is_some());
        assert!(json["components"]["schemas"].get("Readiness").is_some());
    }

    #[test]
    fn access_records_answer_as_the_cli_prints_them() {
        let record = crate::access_log::StoredAccess {
            chain: "c-1".into(),
            batch: 3,
            seq: 2,
            occurred_at: chrono::NaiveDate::from_ymd_opt(2026, 1, 2)
                .and_then(|d| d.and_hms_micro_opt(3, 4, 5, 6))
                .expect("a time"),
            user: "dr-a".into(),
            purpose: "treatment".into(),
            request_id: Some("r-1".into()),
            op: "read".into(),
            owner_id: "p-1".into(),
            table: "cases".into(),
            row: Some("C-1".into()),
            fields: "patient_first,patient_last".into(),
        };
        assert_eq!(
            serde_json::to_value(AccessRecordOut::from(&record)).expect("JSON"),
            crate::access_log::record_json(&record)
        );
        let empty = crate::access_log::StoredAccess {
            fields: String::new(),
            row: None,
            request_id: None,
            ..record
        };
        assert_eq!(
            serde_json::to_value(AccessRecordOut::from(&empty)).expect("JSON"),
            crate::access_log::record_json(&empty)
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

/// `GET /access-log`'s query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AccessQuery {
    /// One owner's records.
    owner: Option<String>,
    /// One accessor's.
    user: Option<String>,
    /// One table's.
    table: Option<String>,
    /// One row's (its row key).
    row: Option<String>,
    /// From (UTC, `YYYY-MM-DDTHH:MM:SS` or `YYYY-MM-DD`).
    since: Option<String>,
    /// Until (UTC, as `since`).
    until: Option<String>,
    /// One chain's.
    chain: Option<String>,
    /// Records skipped (the previous page's `next_offset`).
    offset: Option<usize>,
    /// Records a page (default 100, at most 1,000).
    limit: Option<usize>,
}

/// A page of the access log, oldest first.
#[derive(Serialize, ToSchema)]
struct AccessPage {
    /// The records, as `phi audit access --format json` prints them.
    records: Vec<AccessRecordOut>,
    /// `offset` of the next page (null on the last).
    next_offset: Option<usize>,
}

/// An access record ([`access_log::record_json`](crate::access_log::record_json)'s shape).
#[derive(Serialize, ToSchema)]
struct AccessRecordOut {
    /// When (UTC, microseconds, `Z`).
    occurred_at: String,
    /// The accessor.
    user: String,
    /// The purpose of the access.
    purpose: String,
    /// The request's id.
    request_id: Option<String>,
    /// What was done: read, write, export...
    op: String,
    /// The owner of the row.
    owner: String,
    /// The table.
    table: String,
    /// The row key.
    row: Option<String>,
    /// The columns.
    fields: Vec<String>,
    /// The chain the record belongs to.
    chain: String,
    /// The batch within the chain.
    batch: i64,
    /// The record within the batch.
    seq: u32,
}

impl From<&crate::access_log::StoredAccess> for AccessRecordOut {
    fn from(r: &crate::access_log::StoredAccess) -> Self {
        AccessRecordOut {
            occurred_at: r.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            user: r.user.clone(),
            purpose: r.purpose.clone(),
            request_id: r.request_id.clone(),
            op: r.op.clone(),
            owner: r.owner_id.clone(),
            table: r.table.clone(),
            row: r.row.clone(),
            fields: if r.fields.is_empty() {
                Vec::new()
            } else {
                r.fields.split(',').map(str::to_owned).collect()
            },
            chain: r.chain.clone(),
            batch: r.batch,
            seq: r.seq,
        }
    }
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
#[utoipa::path(
    get,
    path = "/access-log",
    tag = "admin",
    params(AccessQuery),
    responses(
        (status = 200, description = "A page of access records.", body = AccessPage),
        (status = 400, description = "Bad query; no access log configured (`Options::access_log`).", body = ErrorBody),
        (status = 401, description = "Refused by the guard: no (valid) credentials.", body = ErrorBody),
        (status = 403, description = "Refused by the guard: not allowed.", body = ErrorBody),
        (status = 500, description = "Access log failure.", body = ErrorBody),
    )
)]
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
            act(
                &state,
                &actor,
                &due,
                ROUTE,
                query.owner.clone(),
                move || {
                    let records = tables.query(&filter)?;
                    let next =
                        (records.len() == filter.limit).then(|| filter.offset + filter.limit);
                    Ok(AccessPage {
                        records: records.iter().map(AccessRecordOut::from).collect(),
                        next_offset: next,
                    })
                },
            )
            .await
        }
    }
}
