//! Errors as HTTP responses: a status and a JSON body naming what went
//! wrong and where (field, case, provider, key version), never a value.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// How owner ids appear in this service's logs: the keyring's setting
/// (`--owner-ids-in-logs`), for the log lines written where no keyring is
/// at hand.
static OWNER_IDS: std::sync::OnceLock<phi_types::OwnerIdTelemetry> = std::sync::OnceLock::new();

/// Sets [`OWNER_IDS`] once, at start-up.
pub(crate) fn set_owner_ids(mode: phi_types::OwnerIdTelemetry) {
    let _ = OWNER_IDS.set(mode);
}

/// An error the API answers with.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

/// An error answer's body (the schema `ServiceError` of `/openapi.json`).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ServiceError {
    /// What kind of error: `invalid_input`, `unauthorized`, `not_found`,
    /// `conflict`, `shredded`, `key_unavailable`, `stored_value_damaged`,
    /// `database`, `database_unavailable`, `internal` or `phi`.
    error: &'static str,
    /// What went wrong and where (field, case, provider, key version),
    /// never a value.
    message: String,
}

/// A case of a page that did not open: its id and its error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct CaseError {
    /// The case.
    pub(crate) case_id: String,
    /// As [`ServiceError`]'s.
    pub(crate) error: &'static str,
    /// As [`ServiceError`]'s.
    pub(crate) message: String,
}

impl ApiError {
    /// 422: `field` is not acceptable, for `reason` (never quoting the value).
    pub(crate) fn invalid(field: &str, reason: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            message: format!("{field}: {reason}"),
        }
    }

    /// 422: the request body is not the JSON expected. serde's own message
    /// is used only when it names a field (missing or unknown); otherwise
    /// it may quote the value, so only the position is given.
    pub(crate) fn body(error: &serde_json::Error) -> ApiError {
        let text = error.to_string();
        let message = if text.starts_with("missing field") || text.starts_with("unknown field") {
            format!("request body: {text}")
        } else if error.is_syntax() || error.is_eof() {
            format!(
                "request body: not valid JSON (line {}, column {})",
                error.line(),
                error.column()
            )
        } else {
            format!(
                "request body: a value has the wrong JSON type (line {}, column {})",
                error.line(),
                error.column()
            )
        };
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            message,
        }
    }

    /// 401: the request carries no valid bearer token, for `reason` (which
    /// never quotes the token).
    pub(crate) fn unauthorized(reason: &str) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: reason.to_owned(),
        }
    }

    /// 404: no case `id`.
    pub(crate) fn not_found(id: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: format!("no case {id}"),
        }
    }

    /// 404: a provider other than the caller's, named in a URL: answered as
    /// an unknown one (the caller learns nothing about it).
    pub(crate) fn no_provider() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no such provider".to_owned(),
        }
    }

    /// 409: case `id` is no longer at the revision the change was made on.
    pub(crate) fn conflict(id: &str, expected: i64, current: Option<i64>) -> ApiError {
        let now = current.map_or_else(
            || "changed meanwhile".to_owned(),
            |c| format!("is at revision {c}"),
        );
        ApiError {
            status: StatusCode::CONFLICT,
            code: "conflict",
            message: format!(
                "case {id} {now}, not revision {expected}: read it again and redo the change"
            ),
        }
    }

    /// 500 or 503 from a database error: the table and the kind of error,
    /// never the driver's message (it can quote a row's values).
    pub(crate) fn database(table: &str, error: &diesel::result::Error) -> ApiError {
        let kind = match error {
            diesel::result::Error::DatabaseError(kind, _) => format!("{kind:?}"),
            other => database_error_kind(other),
        };
        tracing::warn!(table, kind = %kind, "database error");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "database",
            message: format!("database error on table {table} ({kind})"),
        }
    }

    /// 503: no connection from the pool.
    pub(crate) fn pool(error: impl std::fmt::Display) -> ApiError {
        tracing::warn!(%error, "no database connection");
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "database_unavailable",
            message: "no database connection available".to_owned(),
        }
    }

    /// 500: a failure of the service itself.
    pub(crate) fn internal(what: &str) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: what.to_owned(),
        }
    }

    /// The status answered.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON object describing this error (as in an error body).
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.code, "message": self.message })
    }

    /// This error as case `case_id`'s in a page.
    pub(crate) fn for_case(self, case_id: String) -> CaseError {
        CaseError {
            case_id,
            error: self.code,
            message: self.message,
        }
    }
}

fn database_error_kind(error: &diesel::result::Error) -> String {
    use diesel::result::Error as E;
    match error {
        E::NotFound => "not found".into(),
        E::RollbackTransaction => "rolled back".into(),
        E::SerializationError(_) => "serialization".into(),
        E::DeserializationError(_) => "deserialization".into(),
        E::QueryBuilderError(_) => "query builder".into(),
        _ => "driver".into(),
    }
}

/// phi's errors: a key that cannot be had (KMS or key store down) is 503;
/// a stored value that does not open (altered, damaged) is 500 naming the
/// column, owner and key version; bad input is 422. phi's messages carry
/// ids, scopes and key versions only, never values or key bytes.
impl From<phi_types::Error> for ApiError {
    fn from(error: phi_types::Error) -> ApiError {
        use phi_types::Error as E;
        let (status, code) = match &error {
            E::Kek { .. }
            | E::KekCheck { .. }
            | E::KeyUnavailable { .. }
            | E::Store { .. }
            | E::NoKey { .. } => (StatusCode::SERVICE_UNAVAILABLE, "key_unavailable"),
            E::Decrypt { .. }
            | E::Decode { .. }
            | E::Malformed { .. }
            | E::UnknownKeyVersion { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "stored_value_damaged")
            }
            E::Shredded { .. } => (StatusCode::GONE, "shredded"),
            E::InvalidInput { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "phi"),
        };
        // phi's messages name the owner: logged in full only when owner
        // ids may be logged as they are.
        match OWNER_IDS.get().copied().unwrap_or_default() {
            // Quoted and escaped: an owner id or row key cannot forge a line.
            phi_types::OwnerIdTelemetry::Plain => {
                tracing::warn!(error = ?error.to_string(), "phi error");
            }
            _ => tracing::warn!(
                kind = ?error.kind(),
                "phi error (details withheld: owner ids are not logged)"
            ),
        }
        ApiError {
            status,
            code,
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ServiceError {
            error: self.code,
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
