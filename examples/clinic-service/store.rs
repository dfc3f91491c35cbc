//! The two case tables behind one interface: `Sealed` (phi's `service_cases`)
//! and `Plain` (the plaintext twin `service_cases_plain`). The routes are
//! written once, generic over [`CaseStore`], so the twin runs the same code
//! over the same pool and only the table and phi's work differ.

use std::future::Future;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use phi_types::{Keyring, PhiRecord as _};

use crate::App;
use crate::auth::Caller;
use crate::db::with_conn;
use crate::error::{ApiError, CaseError};
use crate::model::{
    Case, CaseOut, CasePatch, CaseSealed, DuplicateQuery, PlainCase, Search, normalize_last,
};
use crate::schema::{service_cases, service_cases_plain};

/// One page of a provider's cases: those that opened, and one error per
/// case that did not (a damaged row fails alone).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Page {
    /// The cases that opened, in id order.
    pub(crate) cases: Vec<CaseOut>,
    /// One error per case that did not open.
    pub(crate) errors: Vec<CaseError>,
    /// The cursor of the next page (`?after=`), when this one was full.
    pub(crate) next: Option<String>,
}

/// A table of cases, as the routes use it.
pub(crate) trait CaseStore: Send + Sync + 'static {
    /// The table's name, for errors.
    const TABLE: &'static str;
    /// Stores a new case (of the caller's provider: the routes set it).
    fn create(
        app: &App,
        who: &Caller,
        case: Case,
    ) -> impl Future<Output = Result<CaseOut, ApiError>> + Send;
    /// One case of the caller's provider; another provider's is not found
    /// (its row is never read, so no key is fetched and nothing opened).
    fn get(
        app: &App,
        who: &Caller,
        id: String,
    ) -> impl Future<Output = Result<CaseOut, ApiError>> + Send;
    /// The caller's provider's cases after `after` in id order, at most
    /// `limit`.
    fn list(
        app: &App,
        who: &Caller,
        after: Option<String>,
        limit: i64,
    ) -> impl Future<Output = Result<Page, ApiError>> + Send;
    /// Changes a case of the caller's provider, if it is still at the
    /// patch's revision.
    fn update(
        app: &App,
        who: &Caller,
        id: String,
        patch: CasePatch,
    ) -> impl Future<Output = Result<CaseOut, ApiError>> + Send;
    /// Deletes a case of the caller's provider.
    fn delete(
        app: &App,
        who: &Caller,
        id: String,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// The caller's provider's cases of this patient (last name and date of
    /// birth).
    fn duplicates(
        app: &App,
        who: &Caller,
        query: DuplicateQuery,
    ) -> impl Future<Output = Result<Vec<String>, ApiError>> + Send;
    /// The caller's provider's cases matching `search`, ordered by last
    /// name (then id).
    fn search(
        app: &App,
        who: &Caller,
        search: Search,
    ) -> impl Future<Output = Result<Vec<CaseOut>, ApiError>> + Send;
}

/// Rows a search reads and opens at a time: memory holds one page and the
/// matches, however many cases the provider has.
const SEARCH_PAGE: i64 = 100;

/// `cases` ordered as a search answers: by normalised last name, then id.
fn by_last_name(cases: &mut [CaseOut]) {
    cases.sort_by(|a, b| {
        normalize_last(&a.patient_last)
            .cmp(&normalize_last(&b.patient_last))
            .then_with(|| a.case_id.cmp(&b.case_id))
    });
}

/// One sealed row opened with phi's async API: the provider's key is
/// resolved without blocking a runtime worker (a cold cache awaits the key
/// store on the blocking pool and the KMS on this runtime).
async fn open_one(keyring: &Keyring, row: CaseSealed) -> Result<Case, ApiError> {
    let mut cases = Case::open_all_async(vec![row], keyring).await?;
    cases
        .pop()
        .ok_or_else(|| ApiError::from(phi_types::Error::Config("opening one row gave none".into())))
}

/// phi's cases, sealed under each provider's data key.
#[derive(Debug)]
pub(crate) struct Sealed;

/// The plaintext twin.
#[derive(Debug)]
pub(crate) struct Plain;

fn db(table: &'static str) -> impl Fn(diesel::result::Error) -> ApiError {
    move |e| ApiError::database(table, &e)
}

impl CaseStore for Sealed {
    const TABLE: &'static str = "service_cases";

    async fn create(app: &App, who: &Caller, case: Case) -> Result<CaseOut, ApiError> {
        debug_assert_eq!(case.provider_id, who.provider);
        // Sealed before the write: a new provider's data key commits on
        // the key store's own connection first.
        let sealed = case.seal_async(&who.keyring).await?;
        with_conn!(&app.pool, conn => {
            diesel::insert_into(service_cases::table)
                .values(&sealed)
                .execute(conn)
                .await
                .map_err(db(Self::TABLE))?
        });
        Ok(CaseOut::new(case, 1))
    }

    async fn get(app: &App, who: &Caller, id: String) -> Result<CaseOut, ApiError> {
        let row: Option<(CaseSealed, i64)> = with_conn!(&app.pool, conn => {
            service_cases::table
                .find(&id)
                .filter(service_cases::provider_id.eq(&who.provider))
                .select((CaseSealed::as_select(), service_cases::revision))
                .first(conn)
                .await
                .optional()
                .map_err(db(Self::TABLE))?
        });
        let (row, revision) = row.ok_or_else(|| ApiError::not_found(&id))?;
        let case = open_one(&who.keyring, row).await?;
        Ok(CaseOut::new(case, revision))
    }

    async fn list(
        app: &App,
        who: &Caller,
        after: Option<String>,
        limit: i64,
    ) -> Result<Page, ApiError> {
        let rows: Vec<(CaseSealed, i64)> = with_conn!(&app.pool, conn => {
            let mut query = service_cases::table
                .filter(service_cases::provider_id.eq(&who.provider))
                .select((CaseSealed::as_select(), service_cases::revision))
                .order(service_cases::case_id)
                .limit(limit)
                .into_boxed();
            if let Some(after) = &after {
                query = query.filter(service_cases::case_id.gt(after));
            }
            query.load(conn).await.map_err(db(Self::TABLE))?
        });
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
        let next = if full {
            rows.last().map(|(r, _)| r.case_id.clone())
        } else {
            None
        };
        let ids: Vec<(String, i64)> = rows.iter().map(|(r, v)| (r.case_id.clone(), *v)).collect();
        let sealed: Vec<CaseSealed> = rows.into_iter().map(|(r, _)| r).collect();
        // Each row on its own: a damaged one is reported, the others served.
        let opened = Case::open_each_async(sealed, &who.keyring).await?;
        let mut page = Page {
            cases: Vec::with_capacity(ids.len()),
            errors: Vec::new(),
            next,
        };
        for ((id, revision), result) in ids.into_iter().zip(opened) {
            match result {
                Ok(case) => page.cases.push(CaseOut::new(case, revision)),
                Err(error) => {
                    page.errors.push(ApiError::from(error).for_case(id));
                }
            }
        }
        Ok(page)
    }

    async fn update(
        app: &App,
        who: &Caller,
        id: String,
        patch: CasePatch,
    ) -> Result<CaseOut, ApiError> {
        with_conn!(&app.pool, conn => {
            let row: Option<(CaseSealed, i64)> = service_cases::table
                .find(&id)
                .filter(service_cases::provider_id.eq(&who.provider))
                .select((CaseSealed::as_select(), service_cases::revision))
                .first(conn)
                .await
                .optional()
                .map_err(db(Self::TABLE))?;
            let (row, revision) = row.ok_or_else(|| ApiError::not_found(&id))?;
            if revision != patch.revision {
                return Err(ApiError::conflict(&id, patch.revision, Some(revision)));
            }
            let old = open_one(&who.keyring, row).await?;
            let new = patch.apply(&old)?;
            // Sealed whole again: recorded as the update it is.
            let sealed = new
                .seal_async(&who.keyring.for_operation(phi_types::access::AccessOp::Update))
                .await?;
            // Guarded: only while the row is still the one read (its
            // revision, owner and encrypted flag).
            let target = || {
                service_cases::table
                    .filter(service_cases::case_id.eq(&id))
                    .filter(service_cases::provider_id.eq(&old.provider_id))
                    .filter(service_cases::phi_encrypted.eq(old.phi_encrypted))
                    .filter(service_cases::revision.eq(revision))
            };
            let next = service_cases::revision.eq(revision + 1);
            // A changeset skips a `None` field: a removed insurer is set
            // to NULL explicitly.
            let written = if sealed.ins_provider.is_some() {
                diesel::update(target()).set((&sealed, next)).execute(conn).await
            } else {
                let none: Option<phi_types::Encrypted<String>> = None;
                diesel::update(target())
                    .set((&sealed, service_cases::ins_provider.eq(none), next))
                    .execute(conn)
                    .await
            }
            .map_err(db(Self::TABLE))?;
            if written == 0 {
                return Err(ApiError::conflict(&id, patch.revision, None));
            }
            Ok(CaseOut::new(new, revision + 1))
        })
    }

    async fn delete(app: &App, who: &Caller, id: String) -> Result<(), ApiError> {
        let removed = with_conn!(&app.pool, conn => {
            diesel::delete(
                service_cases::table
                    .find(&id)
                    .filter(service_cases::provider_id.eq(&who.provider)),
            )
                .execute(conn)
                .await
                .map_err(db(Self::TABLE))?
        });
        if removed == 0 {
            return Err(ApiError::not_found(&id));
        }
        // The delete is the application's: phi records it in the access log.
        who.keyring.record_access(
            phi_types::access::AccessOp::Delete,
            Self::TABLE,
            Case::ENCRYPTED_COLUMNS,
            [(who.provider.as_str(), Some(id.as_str()))],
        )?;
        Ok(())
    }

    async fn duplicates(
        app: &App,
        who: &Caller,
        query: DuplicateQuery,
    ) -> Result<Vec<String>, ApiError> {
        let dob = query.dob()?;
        let last = query.patient_last;
        let last_index =
            Case::patient_last_blind_index_async(&who.keyring, &who.provider, &last).await?;
        let dob_index =
            Case::patient_dob_blind_index_async(&who.keyring, &who.provider, &dob).await?;
        if last_index.is_empty() || dob_index.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<CaseSealed> = with_conn!(&app.pool, conn => {
            service_cases::table
                .filter(service_cases::provider_id.eq(&who.provider))
                .filter(service_cases::patient_last_bidx.eq_any(last_index))
                .filter(service_cases::patient_dob_bidx.eq_any(dob_index))
                .select(CaseSealed::as_select())
                .order(service_cases::case_id)
                .load(conn)
                .await
                .map_err(db(Self::TABLE))?
        });
        // A 16-byte index could in principle collide: confirm on the values.
        let wanted = normalize_last(&last);
        let cases = Case::open_all_async(rows, &who.keyring).await?;
        Ok(cases
            .into_iter()
            .filter(|c| normalize_last(&c.patient_last) == wanted && c.patient_dob == dob)
            .map(|c| c.case_id)
            .collect())
    }
    async fn search(app: &App, who: &Caller, search: Search) -> Result<Vec<CaseOut>, ApiError> {
        // The surgery date is plaintext: SQL narrows on it. The last name
        // and date of birth are sealed: each page of the provider's rows is
        // opened (every row read is in the access log) and tested.
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let rows: Vec<(CaseSealed, i64)> = with_conn!(&app.pool, conn => {
                let mut query = service_cases::table
                    .filter(service_cases::provider_id.eq(&who.provider))
                    .select((CaseSealed::as_select(), service_cases::revision))
                    .order(service_cases::case_id)
                    .limit(SEARCH_PAGE)
                    .into_boxed();
                if let Some(after) = &after {
                    query = query.filter(service_cases::case_id.gt(after));
                }
                if let Some(from) = search.surgery_from {
                    query = query.filter(service_cases::surgery_date.ge(from));
                }
                if let Some(to) = search.surgery_to {
                    query = query.filter(service_cases::surgery_date.le(to));
                }
                query.load(conn).await.map_err(db(Self::TABLE))?
            });
            let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= SEARCH_PAGE;
            after = rows.last().map(|(r, _)| r.case_id.clone());
            let revisions: Vec<i64> = rows.iter().map(|(_, v)| *v).collect();
            let sealed: Vec<CaseSealed> = rows.into_iter().map(|(r, _)| r).collect();
            let opened = Case::open_all_async(sealed, &who.keyring).await?;
            found.extend(
                opened
                    .into_iter()
                    .zip(revisions)
                    .filter(|(case, _)| search.matches_sealed_fields(case))
                    .map(|(case, revision)| CaseOut::new(case, revision)),
            );
            if !full {
                break;
            }
        }
        by_last_name(&mut found);
        Ok(found)
    }
}

impl CaseStore for Plain {
    const TABLE: &'static str = "service_cases_plain";

    async fn create(app: &App, who: &Caller, case: Case) -> Result<CaseOut, ApiError> {
        debug_assert_eq!(case.provider_id, who.provider);
        let row = PlainCase::from_case(&case);
        with_conn!(&app.pool, conn => {
            diesel::insert_into(service_cases_plain::table)
                .values(&row)
                .execute(conn)
                .await
                .map_err(db(Self::TABLE))?
        });
        Ok(CaseOut::new(case, 1))
    }

    async fn get(app: &App, who: &Caller, id: String) -> Result<CaseOut, ApiError> {
        let row: Option<(PlainCase, i64)> = with_conn!(&app.pool, conn => {
            service_cases_plain::table
                .find(&id)
                .filter(service_cases_plain::provider_id.eq(&who.provider))
                .select((PlainCase::as_select(), service_cases_plain::revision))
                .first(conn)
                .await
                .optional()
                .map_err(db(Self::TABLE))?
        });
        let (row, revision) = row.ok_or_else(|| ApiError::not_found(&id))?;
        Ok(CaseOut::new(row.into_case(), revision))
    }

    async fn list(
        app: &App,
        who: &Caller,
        after: Option<String>,
        limit: i64,
    ) -> Result<Page, ApiError> {
        let rows: Vec<(PlainCase, i64)> = with_conn!(&app.pool, conn => {
            let mut query = service_cases_plain::table
                .filter(service_cases_plain::provider_id.eq(&who.provider))
                .select((PlainCase::as_select(), service_cases_plain::revision))
                .order(service_cases_plain::case_id)
                .limit(limit)
                .into_boxed();
            if let Some(after) = &after {
                query = query.filter(service_cases_plain::case_id.gt(after));
            }
            query.load(conn).await.map_err(db(Self::TABLE))?
        });
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
        let next = if full {
            rows.last().map(|(r, _)| r.case_id.clone())
        } else {
            None
        };
        Ok(Page {
            cases: rows
                .into_iter()
                .map(|(r, v)| CaseOut::new(r.into_case(), v))
                .collect(),
            errors: Vec::new(),
            next,
        })
    }

    async fn update(
        app: &App,
        who: &Caller,
        id: String,
        patch: CasePatch,
    ) -> Result<CaseOut, ApiError> {
        with_conn!(&app.pool, conn => {
            let row: Option<(PlainCase, i64)> = service_cases_plain::table
                .find(&id)
                .filter(service_cases_plain::provider_id.eq(&who.provider))
                .select((PlainCase::as_select(), service_cases_plain::revision))
                .first(conn)
                .await
                .optional()
                .map_err(db(Self::TABLE))?;
            let (row, revision) = row.ok_or_else(|| ApiError::not_found(&id))?;
            if revision != patch.revision {
                return Err(ApiError::conflict(&id, patch.revision, Some(revision)));
            }
            let old = row.into_case();
            let new = patch.apply(&old)?;
            let row = PlainCase::from_case(&new);
            let written = diesel::update(
                service_cases_plain::table
                    .filter(service_cases_plain::case_id.eq(&id))
                    .filter(service_cases_plain::provider_id.eq(&old.provider_id))
                    .filter(service_cases_plain::revision.eq(revision)),
            )
            .set((&row, service_cases_plain::revision.eq(revision + 1)))
            .execute(conn)
            .await
            .map_err(db(Self::TABLE))?;
            if written == 0 {
                return Err(ApiError::conflict(&id, patch.revision, None));
            }
            Ok(CaseOut::new(new, revision + 1))
        })
    }

    async fn delete(app: &App, who: &Caller, id: String) -> Result<(), ApiError> {
        let removed = with_conn!(&app.pool, conn => {
            diesel::delete(
                service_cases_plain::table
                    .find(&id)
                    .filter(service_cases_plain::provider_id.eq(&who.provider)),
            )
                .execute(conn)
                .await
                .map_err(db(Self::TABLE))?
        });
        if removed == 0 {
            return Err(ApiError::not_found(&id));
        }
        Ok(())
    }

    async fn duplicates(
        app: &App,
        who: &Caller,
        query: DuplicateQuery,
    ) -> Result<Vec<String>, ApiError> {
        let dob = query.dob()?;
        let wanted = normalize_last(&query.patient_last);
        with_conn!(&app.pool, conn => {
            service_cases_plain::table
                .filter(service_cases_plain::provider_id.eq(&who.provider))
                .filter(service_cases_plain::patient_last_norm.eq(&wanted))
                .filter(service_cases_plain::patient_dob.eq(dob))
                .select(service_cases_plain::case_id)
                .order(service_cases_plain::case_id)
                .load(conn)
                .await
                .map_err(db(Self::TABLE))
        })
    }

    async fn search(app: &App, who: &Caller, search: Search) -> Result<Vec<CaseOut>, ApiError> {
        let rows: Vec<(PlainCase, i64)> = with_conn!(&app.pool, conn => {
            let mut query = service_cases_plain::table
                .filter(service_cases_plain::provider_id.eq(&who.provider))
                .select((PlainCase::as_select(), service_cases_plain::revision))
                .into_boxed();
            if let Some(prefix) = &search.last_prefix {
                // LIKE with `\`, `%` and `_` escaped: the prefix as typed.
                let escaped: String = prefix
                    .chars()
                    .flat_map(|c| match c {
                        '\\' | '%' | '_' => vec!['\\', c],
                        c => vec![c],
                    })
                    .collect();
                query = query.filter(service_cases_plain::patient_last_norm.like(format!("{escaped}%")).escape('\\'));
            }
            if let Some((first, last)) = search.dob {
                query = query.filter(service_cases_plain::patient_dob.between(first, last));
            }
            if let Some(from) = search.surgery_from {
                query = query.filter(service_cases_plain::surgery_date.ge(from));
            }
            if let Some(to) = search.surgery_to {
                query = query.filter(service_cases_plain::surgery_date.le(to));
            }
            query.load(conn).await.map_err(db(Self::TABLE))?
        });
        let mut found: Vec<CaseOut> = rows
            .into_iter()
            .map(|(row, revision)| CaseOut::new(row.into_case(), revision))
            .collect();
        by_last_name(&mut found);
        Ok(found)
    }
}
