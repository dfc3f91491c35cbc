//! The HTTP API: the case routes (written once, generic over the table),
//! mounted for phi's table at `/` and for the plaintext twin at `/plain`;
//! `/metrics`, `/health`, phi's probes `/live` and `/ready`; and the
//! request log.
//!
//! Every case route takes a [`Caller`] (a verified bearer token): its
//! provider scopes every query, and its keyring (on behalf of the user)
//! makes every phi call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{MatchedPath, Path, Query, RawPathParams, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tracing::Instrument as _;

use crate::App;
use crate::auth::{Caller, RequestId};
use crate::error::{ApiError, CaseError, ServiceError};
use crate::model::{CaseOut, CasePatch, DuplicateQuery, NewCase, SearchQuery};
use crate::store::{CaseStore, Page, Plain, Sealed};

/// Every route, over `app`.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .merge(case_routes::<Sealed>())
        .nest("/plain", case_routes::<Plain>())
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .with_state(app.clone())
        .merge(phi_types::admin::probes(app.keyring.clone()))
        // A fallback of its own, under the request log: routers merged
        // later (the OpenAPI document) keep it, so an unmatched path is
        // still counted and answered 404.
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app, log_request))
}

/// 404 with no body, for a path no route matches.
async fn not_found() -> StatusCode {
    StatusCode::NOT_FOUND
}

fn case_routes<S: CaseStore>() -> Router<Arc<App>> {
    Router::new()
        .route("/cases", post(create::<S>).get(list_own::<S>))
        .route(
            "/cases/{id}",
            get(get_case::<S>).patch(update::<S>).delete(delete::<S>),
        )
        .route("/providers/{provider}/cases", get(list::<S>))
        .route("/providers/{provider}/duplicates", post(duplicates::<S>))
        .route("/providers/{provider}/search", post(search::<S>))
        .route("/providers/{provider}/export.csv", get(export::<S>))
}

/// `ok`: an alias of `/live` kept for older probes.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String))
)]
async fn health() -> &'static str {
    "ok"
}

/// The service's routes: the case routes (phi's table at `/`, the twin's
/// under `/plain`, their operation ids prefixed `plain_`), `/metrics` and
/// `/health`, phi's probes, and phi's admin routes under `/admin` when
/// they are mounted; with the bearer tokens as security schemes. Served
/// at `/openapi.json` (which it also lists).
pub(crate) fn openapi(admin: bool) -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    let mut plain = CaseDoc::openapi();
    for item in plain.paths.paths.values_mut() {
        for operation in operations(item) {
            operation.operation_id = operation
                .operation_id
                .take()
                .map(|id| format!("plain_{id}"));
        }
    }
    let mut document = CaseDoc::openapi()
        .nest("/plain", plain)
        .merge_from(OpsDoc::openapi())
        .merge_from(phi_types::admin::probes_openapi());
    if admin {
        let mut admin = phi_types::admin::openapi();
        for item in admin.paths.paths.values_mut() {
            for operation in operations(item) {
                operation.security = Some(vec![SecurityRequirement::new(
                    "admin_token",
                    Vec::<String>::new(),
                )]);
            }
        }
        document = document.nest("/admin", admin);
    }
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some("A JWT with `sub` (the user), `provider` and `exp`."))
                .build(),
        ),
    );
    if admin {
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The operators' token (PHI_ADMIN_TOKEN)."))
                    .build(),
            ),
        );
    }
    document
}

/// The operations of a path item.
fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// The case routes' document (the routes of [`case_routes`]).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "clinic-service",
        description = "Surgical cases whose patient fields are sealed by phi under each \
                       provider's own data key; the same routes under `/plain` over a \
                       plaintext twin. Errors are `{\"error\": CODE, \"message\": TEXT}`."
    ),
    paths(create, list_own, get_case, update, delete, list, duplicates, search, export),
    components(schemas(ServiceError, CaseError)),
    tags((name = "cases", description = "A provider's cases, scoped by the bearer token"))
)]
struct CaseDoc;

/// `/metrics` and `/health`.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(metrics, health),
    tags((name = "operations", description = "Metrics and the legacy health check"))
)]
struct OpsDoc;

/// A JSON body, parsed with errors that never quote its values.
fn json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::body(&e))
}

/// A new case id: `C-` and 16 random hexadecimal digits (ids are chosen
/// before the insert, as the row key that seals the values must be).
fn new_case_id() -> Result<String, ApiError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|_| ApiError::internal("the random source failed"))?;
    Ok(format!("C-{}", hex::encode(bytes)))
}

/// The provider named in a URL: the caller's, or 404 (nothing read).
fn own_provider(who: &Caller, provider: &str) -> Result<(), ApiError> {
    if provider == who.provider {
        Ok(())
    } else {
        Err(ApiError::no_provider())
    }
}

/// Creates a case for the token's provider.
#[utoipa::path(
    post,
    path = "/cases",
    tag = "cases",
    security(("bearer" = [])),
    request_body = NewCase,
    responses(
        (status = 201, description = "Created: the case with its id and revision.", body = CaseOut),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 422, description = "A field is missing or not acceptable.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn create<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    body: Bytes,
) -> Result<(StatusCode, axum::Json<CaseOut>), ApiError> {
    let case = json::<NewCase>(&body)?.into_case(new_case_id()?, &who.provider)?;
    tracing::info!(
        case_id = %case.case_id,
        provider = ?app.keyring.owner_for_telemetry(&case.provider_id).to_string(),
        "create"
    );
    let out = S::create(&app, &who, case).await?;
    Ok((StatusCode::CREATED, axum::Json(out)))
}

/// One case of the token's provider.
#[utoipa::path(
    get,
    path = "/cases/{id}",
    tag = "cases",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The case id.")),
    responses(
        (status = 200, description = "The case.", body = CaseOut),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 404, description = "No such case of the token's provider.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn get_case<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<CaseOut>, ApiError> {
    Ok(axum::Json(S::get(&app, &who, id).await?))
}

/// `?after=CASE&limit=N` (default 50, at most 500).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// The case after which the page starts (the previous page's `next`).
    after: Option<String>,
    /// Cases a page, 1 to 500 (default 50).
    limit: Option<i64>,
}

const MAX_PAGE: i64 = 500;

/// The provider's cases, paged in id order.
#[utoipa::path(
    get,
    path = "/providers/{provider}/cases",
    tag = "cases",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "The token's provider (another is 404)."), ListQuery),
    responses(
        (status = 200, description = "A page: the cases that opened, an error for each that did not.", body = Page),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 404, description = "Not the token's provider.", body = ServiceError),
        (status = 422, description = "A bad limit.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn list<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Path(provider): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Page>, ApiError> {
    own_provider(&who, &provider)?;
    list_own::<S>(State(app), who, Query(query)).await
}

/// `GET /cases`: the caller's provider's cases.
#[utoipa::path(
    get,
    path = "/cases",
    tag = "cases",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page: the cases that opened, an error for each that did not.", body = Page),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 422, description = "A bad limit.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn list_own<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Page>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_PAGE}"),
        ));
    }
    Ok(axum::Json(S::list(&app, &who, query.after, limit).await?))
}

/// Changes fields of a case; the body names the revision it read.
#[utoipa::path(
    patch,
    path = "/cases/{id}",
    tag = "cases",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The case id.")),
    request_body = CasePatch,
    responses(
        (status = 200, description = "The changed case at its new revision.", body = CaseOut),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 404, description = "No such case of the token's provider.", body = ServiceError),
        (status = 409, description = "The case moved on from the revision named.", body = ServiceError),
        (status = 422, description = "A field is not acceptable.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn update<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<axum::Json<CaseOut>, ApiError> {
    let patch = json::<CasePatch>(&body)?;
    Ok(axum::Json(S::update(&app, &who, id, patch).await?))
}

/// Deletes a case.
#[utoipa::path(
    delete,
    path = "/cases/{id}",
    tag = "cases",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "The case id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 404, description = "No such case of the token's provider.", body = ServiceError),
        (status = 500, description = "A database failure.", body = ServiceError),
        (status = 503, description = "No database connection.", body = ServiceError),
    )
)]
async fn delete<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    S::delete(&app, &who, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /providers/{provider}/duplicates`'s answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Duplicates {
    /// The provider's cases of that patient.
    case_ids: Vec<String>,
}

/// The provider's cases of one patient (last name and date of birth),
/// found through the blind indexes.
#[utoipa::path(
    post,
    path = "/providers/{provider}/duplicates",
    tag = "cases",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "The token's provider (another is 404).")),
    request_body = DuplicateQuery,
    responses(
        (status = 200, description = "The matching cases' ids.", body = Duplicates),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 404, description = "Not the token's provider.", body = ServiceError),
        (status = 422, description = "A field is missing or not acceptable.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn duplicates<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Path(provider): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Duplicates>, ApiError> {
    own_provider(&who, &provider)?;
    let query = json::<DuplicateQuery>(&body)?;
    let case_ids = S::duplicates(&app, &who, query).await?;
    Ok(axum::Json(Duplicates { case_ids }))
}

/// `POST /providers/{provider}/search`'s answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Found {
    /// The provider's matching cases, by last name, then id.
    cases: Vec<CaseOut>,
}

/// The provider's cases by last-name prefix, year of birth and surgery
/// dates. The criteria are in the body, never in the URL. The last name
/// and date of birth are sealed: the provider's cases (within the surgery
/// dates, which are plaintext) are read and opened a page at a time, each
/// read recorded in the access log, and tested after opening; nothing
/// about the prefix or the year reaches the database.
#[utoipa::path(
    post,
    path = "/providers/{provider}/search",
    tag = "cases",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "The token's provider (another is 404).")),
    request_body = SearchQuery,
    responses(
        (status = 200, description = "The matching cases.", body = Found),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 404, description = "Not the token's provider.", body = ServiceError),
        (status = 422, description = "No criterion, or one that is not acceptable.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn search<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Path(provider): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Found>, ApiError> {
    own_provider(&who, &provider)?;
    let query = json::<SearchQuery>(&body)?.checked()?;
    let cases = S::search(&app, &who, query).await?;
    Ok(axum::Json(Found { cases }))
}

/// The CSV header of an export.
const CSV_HEADER: &str = "case_id,provider_id,patient_first,patient_last,patient_dob,ins_provider,procedure_code,surgery_date,status,error\n";

/// A provider's cases as CSV, streamed a page at a time (memory stays one
/// page however many cases). A case that does not open is a line with its
/// id and the error; an error mid-way ends the stream early.
#[utoipa::path(
    get,
    path = "/providers/{provider}/export.csv",
    tag = "cases",
    security(("bearer" = [])),
    params(("provider" = String, Path, description = "The token's provider (another is 404).")),
    responses(
        (status = 200, description = "The cases as CSV, streamed.", content_type = "text/csv", body = String),
        (status = 401, description = "No valid bearer token.", body = ServiceError),
        (status = 404, description = "Not the token's provider.", body = ServiceError),
        (status = 410, description = "The provider is crypto-shredded.", body = ServiceError),
        (status = 500, description = "A stored value does not open, or a database or service failure.", body = ServiceError),
        (status = 503, description = "No data key to be had (KMS or key store down), or no database connection.", body = ServiceError),
    )
)]
async fn export<S: CaseStore>(
    State(app): State<Arc<App>>,
    who: Caller,
    Path(provider): Path<String>,
) -> Result<Response, ApiError> {
    own_provider(&who, &provider)?;
    // Recorded in the access log as an export, not as reads.
    let who = Caller {
        keyring: who
            .keyring
            .for_operation(phi_types::access::AccessOp::Export),
        ..who
    };
    // The first page before the status is sent: a key or database failure
    // is still an error status, not a truncated file.
    let first = S::list(&app, &who, None, MAX_PAGE).await?;
    let stream = futures_util::stream::unfold(
        (Some(first), app, who, true),
        |(page, app, who, header)| async move {
            let page = page?;
            let mut text = String::new();
            if header {
                text.push_str(CSV_HEADER);
            }
            csv_page(&mut text, &page);
            let next = match page.next {
                Some(after) => match S::list(&app, &who, Some(after), MAX_PAGE).await {
                    Ok(page) => Some(page),
                    Err(error) => {
                        tracing::warn!(status = %error.status(), "export ended early");
                        return Some((
                            Err(std::io::Error::other("export failed")),
                            (None, app, who, false),
                        ));
                    }
                },
                None => None,
            };
            Some((Ok::<_, std::io::Error>(text), (next, app, who, false)))
        },
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        )],
        Body::from_stream(stream),
    )
        .into_response())
}

fn csv_page(out: &mut String, page: &Page) {
    for c in &page.cases {
        let fields = [
            c.case_id.as_str(),
            &c.provider_id,
            &c.patient_first,
            &c.patient_last,
            &c.patient_dob,
            c.ins_provider.as_deref().unwrap_or(""),
            &c.procedure_code,
            &c.surgery_date,
            &c.status,
            "",
        ];
        csv_line(out, &fields);
    }
    for e in &page.errors {
        csv_line(
            out,
            &[&e.case_id, "", "", "", "", "", "", "", "", &e.message],
        );
    }
}

/// One CSV line. A cell that a spreadsheet would take for a formula (it
/// starts with `=`, `+`, `-`, `@`, a tab or a carriage return) is
/// neutralised with a leading `'`, so that opening an export never runs
/// what a patient field holds (CSV injection).
pub(crate) fn csv_line(out: &mut String, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let formula = f.starts_with(['=', '+', '-', '@', '\t', '\r']);
        if formula || f.contains([',', '"', '\n', '\r']) {
            out.push('"');
            if formula {
                out.push('\'');
            }
            out.push_str(&f.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(f);
        }
    }
    out.push('\n');
}

/// Prometheus text: the recorder's metrics, with the keyring's own
/// counters (`KeyringStats`) as `clinic_service_keyring_*_total`: key cache
/// hits and misses, key loads from the store, unwraps and creations. A
/// request that touched no key leaves all of them as they were.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text.", content_type = "text/plain", body = String))
)]
async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let stats = app.keyring.stats();
    for (name, value) in [
        ("clinic_service_keyring_cache_hits_total", stats.hits),
        ("clinic_service_keyring_cache_misses_total", stats.misses),
        ("clinic_service_keyring_key_loads_total", stats.key_loads),
        ("clinic_service_keyring_unwraps_total", stats.unwraps),
        ("clinic_service_keyring_creations_total", stats.creations),
    ] {
        metrics::counter!(name).absolute(value);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// The request's id: 16 random hexadecimal digits, generated here for
/// every request (a client's `x-request-id` is not taken: an id that lands
/// in logs and phi's access log is the service's own). A failed random
/// source falls back to a process-wide counter.
fn new_request_id() -> String {
    static FALLBACK: AtomicU64 = AtomicU64::new(1);
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => hex::encode(bytes),
        Err(_) => format!("n{:015}", FALLBACK.fetch_add(1, Ordering::Relaxed)),
    }
}

/// The HTTP methods the routes answer, as the metrics' `method` label;
/// any other method is `other` (the label's values stay few whatever
/// clients send).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The metrics' `status` label: the status answered, one of the few the
/// service sends (it writes them itself), `other` outside 100..=599.
fn status_label(status: StatusCode) -> &'static str {
    const LABELS: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    match status.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        409 => "409",
        410 => "410",
        413 => "413",
        415 => "415",
        422 => "422",
        500 => "500",
        503 => "503",
        code @ 100..=599 => LABELS[usize::from(code / 100 - 1)],
        _ => "other",
    }
}

/// The request log: one line per request with its id (generated here,
/// echoed in the `x-request-id` response header and given to phi as the
/// accessor's request id), method, route and the ids in its path (a
/// provider id, the owner, as `--owner-ids-in-logs` says), the
/// authenticated user, status and duration; never a body, a query string
/// or a token. The path and user are written quoted and escaped (`"…"`):
/// an id in a URL cannot end the line or forge another. Also counts
/// requests and times them for `/metrics`, with labels of bounded values
/// (the matched route or `unmatched`, the method or `other`, the status).
async fn log_request(
    State(app): State<Arc<App>>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    mut request: Request,
    next: Next,
) -> Response {
    let id = new_request_id();
    let route = matched
        .as_ref()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    // The path holds ids only (case, provider): the route with its
    // parameters filled in, the provider's as the keyring writes owner ids.
    // An unmatched path may hold anything, so it is not logged.
    let path = match (&matched, &params) {
        (Some(_), Ok(params)) => {
            let mut path = route.clone();
            for (name, value) in params {
                let value = if name == "provider" {
                    app.keyring.owner_for_telemetry(value).to_string()
                } else {
                    value.to_owned()
                };
                path = path.replace(&format!("{{{name}}}"), &value);
            }
            path
        }
        _ => String::new(),
    };
    let method = method_label(request.method());
    let span = tracing::info_span!(
        "request",
        id = %id,
        method,
        path = ?path,
        user = tracing::field::Empty,
    );
    request
        .extensions_mut()
        .insert(RequestId(Arc::from(id.as_str())));
    let start = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed = start.elapsed();
    let status = response.status();
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            "served"
        );
    });
    metrics::counter!(
        "clinic_service_requests_total",
        "route" => route.clone(),
        "method" => method,
        "status" => status_label(status)
    )
    .increment(1);
    metrics::histogram!("clinic_service_request_seconds", "route" => route)
        .record(elapsed.as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
