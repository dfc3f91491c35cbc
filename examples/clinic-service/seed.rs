//! `clinic-service seed`: made-up cases for load tests, stored in both
//! tables (sealed and the plaintext twin) with the same ids and values, so
//! that a route and its twin serve the same data.

use chrono::NaiveDate;
#[cfg(any(feature = "mysql", feature = "postgres"))]
use diesel_async::RunQueryDsl;
use phi_types::PhiRecord as _;

use crate::App;
use crate::db::Pool;
use crate::error::ApiError;
use crate::model::{Case, CaseSealed, PlainCase};
use crate::schema::{service_cases, service_cases_plain};

const FIRST: &[&str] = &[
    "Aiko", "Bongani", "Carmen", "Dmitri", "Esther", "Farid", "Greta", "Hamza",
];
const LAST: &[&str] = &[
    "Abernathy",
    "Bergstrom",
    "Castellanos",
    "Dubois",
    "Eriksen",
    "Gallagher",
    "Iwasaki",
    "Nakamura",
];
const INSURERS: &[&str] = &["Aetna", "Cigna", "Kaiser", "Medicare"];

/// Rows per insert.
const BATCH: usize = 500;

/// The id of case `n` of provider `provider`: `{provider}-{n:06}`, so that a
/// load generator can name any case by pattern.
pub(crate) fn seeded_id(provider: &str, n: u64) -> String {
    format!("{provider}-{n:06}")
}

/// Stores `per_provider` cases for each of `providers` providers named
/// `{prefix}{i:04}` (`i` from 0), in both tables. Returns the rows stored
/// in each.
pub(crate) async fn seed(
    app: &App,
    providers: u64,
    per_provider: u64,
    prefix: &str,
) -> Result<u64, ApiError> {
    let day = |n: u64| {
        NaiveDate::from_ymd_opt(1940, 1, 1).unwrap_or_default()
            + chrono::Days::new(n.wrapping_mul(7919) % 25_000)
    };
    // The seeding job is its own accessor: its inserts are logged as such.
    let keyring = app.keyring.on_behalf_of(&phi_types::access::Accessor::new(
        "clinic-service seed",
        "load-test data",
    ));
    let mut stored = 0u64;
    for p in 0..providers {
        let provider = format!("{prefix}{p:04}");
        let all: Vec<Case> = (0..per_provider)
            .map(|n| {
                let k = p * per_provider + n;
                let pick = |list: &[&str], salt: u64| {
                    list[usize::try_from((k / (salt + 1)) % list.len() as u64).unwrap_or(0)]
                        .to_owned()
                };
                Case {
                    case_id: seeded_id(&provider, n),
                    provider_id: provider.clone(),
                    patient_first: pick(FIRST, 0),
                    patient_last: pick(LAST, 3),
                    patient_dob: day(k),
                    ins_provider: (!k.is_multiple_of(5)).then(|| pick(INSURERS, 1)),
                    procedure_code: format!("{}", 27000 + k % 900),
                    surgery_date: day(k + 3),
                    status: "scheduled".to_owned(),
                    phi_encrypted: true,
                }
            })
            .collect();
        for chunk in all.chunks(BATCH) {
            let sealed = Case::seal_all_async(chunk, &keyring).await?;
            let plain: Vec<PlainCase> = chunk.iter().map(PlainCase::from_case).collect();
            insert(app, sealed, plain).await?;
            stored += chunk.len() as u64;
        }
    }
    Ok(stored)
}

/// Both batch inserts on a server backend's async connection.
#[cfg(any(feature = "mysql", feature = "postgres"))]
macro_rules! server_batch {
    ($conn:ident, $sealed:ident, $plain:ident) => {{
        async {
            diesel::insert_into(service_cases::table)
                .values(&$sealed)
                .execute(&mut *$conn)
                .await?;
            diesel::insert_into(service_cases_plain::table)
                .values(&$plain)
                .execute(&mut *$conn)
                .await?;
            diesel::QueryResult::Ok(())
        }
        .await
    }};
}

/// Inserts one batch into both tables (on SQLite in one transaction).
async fn insert(app: &App, sealed: Vec<CaseSealed>, plain: Vec<PlainCase>) -> Result<(), ApiError> {
    let db = |e: diesel::result::Error| ApiError::database("service_cases", &e);
    match &app.pool {
        // diesel-async has no batch insert for SQLite: Diesel's own (one
        // statement per row) on the wrapped connection.
        #[cfg(feature = "sqlite")]
        Pool::Sqlite(pool) => {
            let mut conn = pool.get().await.map_err(ApiError::pool)?;
            conn.spawn_blocking(move |c| {
                use diesel::Connection as _;
                c.transaction(|c| {
                    diesel::RunQueryDsl::execute(
                        diesel::insert_into(service_cases::table).values(&sealed),
                        c,
                    )?;
                    diesel::RunQueryDsl::execute(
                        diesel::insert_into(service_cases_plain::table).values(&plain),
                        c,
                    )
                })
            })
            .await
            .map_err(db)?;
        }
        #[cfg(feature = "mysql")]
        Pool::Mysql(pool) => {
            let mut conn = pool.get().await.map_err(ApiError::pool)?;
            server_batch!(conn, sealed, plain).map_err(db)?;
        }
        #[cfg(feature = "postgres")]
        Pool::Postgres(pool) => {
            let mut conn = pool.get().await.map_err(ApiError::pool)?;
            server_batch!(conn, sealed, plain).map_err(db)?;
        }
    }
    Ok(())
}
