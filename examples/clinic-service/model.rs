//! The service's cases: the model phi seals (`Case`, stored as `CaseSealed`
//! in `service_cases`), its plaintext twin's row (`PlainCase`, in
//! `service_cases_plain`), and the JSON the API reads and writes.

use chrono::NaiveDate;
use diesel::prelude::*;
use phi_types::PhiRecord;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::schema::{service_cases, service_cases_plain};

/// A surgical case as the application sees it. The patient fields are
/// sealed under the provider's (the owner's) own data key, bound to
/// `service_cases.<column>` and to the case id; the last name and date of
/// birth also as blind indexes for the duplicate check.
#[derive(PhiRecord, Clone)]
#[phi(table = service_cases, debug)]
#[diesel(primary_key(case_id), treat_none_as_default_value = false)]
pub(crate) struct Case {
    #[phi(row_key)]
    pub(crate) case_id: String,
    #[phi(owner)]
    pub(crate) provider_id: String,
    #[phi(encrypt)]
    pub(crate) patient_first: String,
    #[phi(encrypt, blind_index = patient_last_bidx, normalize = "trim,lowercase")]
    pub(crate) patient_last: String,
    #[phi(encrypt, blind_index = patient_dob_bidx)]
    pub(crate) patient_dob: NaiveDate,
    #[phi(encrypt)]
    pub(crate) ins_provider: Option<String>,
    pub(crate) procedure_code: String,
    pub(crate) surgery_date: NaiveDate,
    pub(crate) status: String,
    #[phi(encrypted_flag)]
    pub(crate) phi_encrypted: bool,
}

/// A row of the plaintext twin: the same case, stored in the clear.
#[derive(Clone, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = service_cases_plain, primary_key(case_id), treat_none_as_null = true)]
pub(crate) struct PlainCase {
    pub(crate) case_id: String,
    pub(crate) provider_id: String,
    pub(crate) patient_first: String,
    pub(crate) patient_last: String,
    pub(crate) patient_dob: NaiveDate,
    pub(crate) ins_provider: Option<String>,
    pub(crate) patient_last_norm: String,
    pub(crate) procedure_code: String,
    pub(crate) surgery_date: NaiveDate,
    pub(crate) status: String,
}

/// How the duplicate check compares last names: case and surrounding
/// spaces do not matter (the blind index's `trim,lowercase`).
pub(crate) fn normalize_last(last: &str) -> String {
    last.trim().to_lowercase()
}

impl PlainCase {
    /// The twin's row for `case`.
    pub(crate) fn from_case(case: &Case) -> PlainCase {
        PlainCase {
            case_id: case.case_id.clone(),
            provider_id: case.provider_id.clone(),
            patient_first: case.patient_first.clone(),
            patient_last: case.patient_last.clone(),
            patient_dob: case.patient_dob,
            ins_provider: case.ins_provider.clone(),
            patient_last_norm: normalize_last(&case.patient_last),
            procedure_code: case.procedure_code.clone(),
            surgery_date: case.surgery_date,
            status: case.status.clone(),
        }
    }

    /// The case this row holds.
    pub(crate) fn into_case(self) -> Case {
        Case {
            case_id: self.case_id,
            provider_id: self.provider_id,
            patient_first: self.patient_first,
            patient_last: self.patient_last,
            patient_dob: self.patient_dob,
            ins_provider: self.ins_provider,
            procedure_code: self.procedure_code,
            surgery_date: self.surgery_date,
            status: self.status,
            phi_encrypted: false,
        }
    }
}

/// A case in a response. Its `Debug` shows the case's identity and status,
/// never the patient's fields.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CaseOut {
    pub(crate) case_id: String,
    pub(crate) provider_id: String,
    pub(crate) patient_first: String,
    pub(crate) patient_last: String,
    pub(crate) patient_dob: String,
    pub(crate) ins_provider: Option<String>,
    pub(crate) procedure_code: String,
    pub(crate) surgery_date: String,
    pub(crate) status: String,
    pub(crate) revision: i64,
}

impl std::fmt::Debug for CaseOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaseOut")
            .field("case_id", &self.case_id)
            .field("provider_id", &self.provider_id)
            .field("procedure_code", &self.procedure_code)
            .field("status", &self.status)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

impl CaseOut {
    /// The response for `case` at `revision`.
    pub(crate) fn new(case: Case, revision: i64) -> CaseOut {
        CaseOut {
            case_id: case.case_id,
            provider_id: case.provider_id,
            patient_first: case.patient_first,
            patient_last: case.patient_last,
            patient_dob: case.patient_dob.to_string(),
            ins_provider: case.ins_provider,
            procedure_code: case.procedure_code,
            surgery_date: case.surgery_date.to_string(),
            status: case.status,
            revision,
        }
    }
}

/// The body of `POST /cases`. The provider is the caller's (the token's);
/// `provider_id` may be left out, and when given must be that one.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewCase {
    #[serde(default)]
    provider_id: Option<String>,
    patient_first: String,
    patient_last: String,
    patient_dob: String,
    #[serde(default)]
    ins_provider: Option<String>,
    procedure_code: String,
    surgery_date: String,
    #[serde(default)]
    status: Option<String>,
}

/// The body of `PATCH /cases/{id}`: the revision the change was made on,
/// and the fields to change (`ins_provider: null` removes it).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CasePatch {
    pub(crate) revision: i64,
    #[serde(default)]
    patient_first: Option<String>,
    #[serde(default)]
    patient_last: Option<String>,
    #[serde(default)]
    patient_dob: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    ins_provider: Option<Option<String>>,
    #[serde(default)]
    procedure_code: Option<String>,
    #[serde(default)]
    surgery_date: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

/// A field that may be given as `null`: `Some(None)`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// The body of `POST /providers/{provider}/duplicates`: the patient's last
/// name and date of birth (in the body, never in a URL that proxies log).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DuplicateQuery {
    pub(crate) patient_last: String,
    patient_dob: String,
}

impl DuplicateQuery {
    /// The date of birth.
    pub(crate) fn dob(&self) -> Result<NaiveDate, ApiError> {
        date("patient_dob", &self.patient_dob)
    }
}

/// The body of `POST /providers/{provider}/search`: any of a last-name
/// prefix, a year of birth and a range of surgery dates (in the body,
/// never in a URL that proxies log), all of which a case must match.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchQuery {
    /// The last name begins with this (ignoring case and surrounding
    /// spaces).
    last_prefix: Option<String>,
    /// The year of birth.
    dob_year: Option<i32>,
    /// Surgery on or after this date (`YYYY-MM-DD`).
    surgery_from: Option<String>,
    /// Surgery on or before this date (`YYYY-MM-DD`).
    surgery_to: Option<String>,
}

/// A [`SearchQuery`], checked: what the stores filter on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Search {
    /// The normalised last-name prefix.
    pub(crate) last_prefix: Option<String>,
    /// The dates of birth of `dob_year`: its first and last day.
    pub(crate) dob: Option<(NaiveDate, NaiveDate)>,
    /// The surgery dates, inclusive.
    pub(crate) surgery_from: Option<NaiveDate>,
    pub(crate) surgery_to: Option<NaiveDate>,
}

impl SearchQuery {
    /// The search, or a 422 naming the field at fault: at least one
    /// criterion; a prefix of 1 to 100 bytes; a year from 1900 to 2100; a
    /// range that is not backwards.
    pub(crate) fn checked(self) -> Result<Search, ApiError> {
        let last_prefix = match self.last_prefix {
            Some(prefix) => {
                text("last_prefix", &prefix, 100)?;
                Some(normalize_last(&prefix))
            }
            None => None,
        };
        let dob = match self.dob_year {
            Some(year) => {
                let first = (1900..=2100)
                    .contains(&year)
                    .then(|| NaiveDate::from_ymd_opt(year, 1, 1))
                    .flatten()
                    .ok_or_else(|| ApiError::invalid("dob_year", "not a year from 1900 to 2100"))?;
                let last = NaiveDate::from_ymd_opt(year, 12, 31)
                    .ok_or_else(|| ApiError::invalid("dob_year", "not a year from 1900 to 2100"))?;
                Some((first, last))
            }
            None => None,
        };
        let surgery_from = self
            .surgery_from
            .as_deref()
            .map(|d| date("surgery_from", d))
            .transpose()?;
        let surgery_to = self
            .surgery_to
            .as_deref()
            .map(|d| date("surgery_to", d))
            .transpose()?;
        if let (Some(from), Some(to)) = (surgery_from, surgery_to)
            && from > to
        {
            return Err(ApiError::invalid("surgery_to", "before surgery_from"));
        }
        if last_prefix.is_none() && dob.is_none() && surgery_from.is_none() && surgery_to.is_none()
        {
            return Err(ApiError::invalid(
                "last_prefix",
                "give at least one of last_prefix, dob_year, surgery_from, surgery_to",
            ));
        }
        Ok(Search {
            last_prefix,
            dob,
            surgery_from,
            surgery_to,
        })
    }
}

impl Search {
    /// Whether `case` matches the criteria on its encrypted fields (the
    /// surgery dates are plaintext, filtered in SQL).
    pub(crate) fn matches_sealed_fields(&self, case: &Case) -> bool {
        self.last_prefix
            .as_deref()
            .is_none_or(|p| normalize_last(&case.patient_last).starts_with(p))
            && self
                .dob
                .is_none_or(|(first, last)| (first..=last).contains(&case.patient_dob))
    }
}

/// The statuses a case can have.
const STATUSES: &[&str] = &["scheduled", "completed", "cancelled"];

fn date(field: &'static str, text: &str) -> Result<NaiveDate, ApiError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| ApiError::invalid(field, "not a date (expected YYYY-MM-DD)"))
}

fn text(field: &'static str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(ApiError::invalid(field, format!("longer than {max} bytes")));
    }
    Ok(())
}

fn status(value: &str) -> Result<(), ApiError> {
    if STATUSES.contains(&value) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "status",
            format!("must be one of {}", STATUSES.join(", ")),
        ))
    }
}

/// The longest patient field accepted (its envelope fits every backend's column).
const MAX_PHI_TEXT: usize = 512;

impl NewCase {
    /// The case to create under `case_id` for `provider` (the caller's),
    /// checked. A body naming another provider is refused before anything
    /// is sealed (no data key is created for it).
    pub(crate) fn into_case(self, case_id: String, provider: &str) -> Result<Case, ApiError> {
        if self.provider_id.as_deref().is_some_and(|p| p != provider) {
            return Err(ApiError::invalid(
                "provider_id",
                "not the provider of the bearer token (leave it out: cases are created for \
                 the token's provider)",
            ));
        }
        text("provider_id", provider, 255)?;
        text("patient_first", &self.patient_first, MAX_PHI_TEXT)?;
        text("patient_last", &self.patient_last, MAX_PHI_TEXT)?;
        if let Some(ins) = &self.ins_provider {
            text("ins_provider", ins, MAX_PHI_TEXT)?;
        }
        text("procedure_code", &self.procedure_code, 16)?;
        let status_value = self.status.unwrap_or_else(|| "scheduled".to_owned());
        status(&status_value)?;
        Ok(Case {
            case_id,
            provider_id: provider.to_owned(),
            patient_first: self.patient_first,
            patient_last: self.patient_last,
            patient_dob: date("patient_dob", &self.patient_dob)?,
            ins_provider: self.ins_provider,
            procedure_code: self.procedure_code,
            surgery_date: date("surgery_date", &self.surgery_date)?,
            status: status_value,
            phi_encrypted: true,
        })
    }
}

impl CasePatch {
    /// `case` with this patch's changes, checked.
    pub(crate) fn apply(&self, case: &Case) -> Result<Case, ApiError> {
        let mut new = case.clone();
        if let Some(v) = &self.patient_first {
            text("patient_first", v, MAX_PHI_TEXT)?;
            new.patient_first.clone_from(v);
        }
        if let Some(v) = &self.patient_last {
            text("patient_last", v, MAX_PHI_TEXT)?;
            new.patient_last.clone_from(v);
        }
        if let Some(v) = &self.patient_dob {
            new.patient_dob = date("patient_dob", v)?;
        }
        if let Some(v) = &self.ins_provider {
            if let Some(ins) = v {
                text("ins_provider", ins, MAX_PHI_TEXT)?;
            }
            new.ins_provider.clone_from(v);
        }
        if let Some(v) = &self.procedure_code {
            text("procedure_code", v, 16)?;
            new.procedure_code.clone_from(v);
        }
        if let Some(v) = &self.surgery_date {
            new.surgery_date = date("surgery_date", v)?;
        }
        if let Some(v) = &self.status {
            status(v)?;
            new.status.clone_from(v);
        }
        Ok(new)
    }
}
