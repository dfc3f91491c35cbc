//! Whole-run comparison of phi against plaintext Diesel (and the Python
//! design of `peers/py_peer.py`): inserting and loading 100,000 cases.
//!
//! ```sh
//! cargo bench -p phi-benches --bench compare                  # SQLite only
//! cargo bench -p phi-benches --bench compare --all-features   # SQLite, MariaDB, PostgreSQL
//! cargo bench -p phi-benches --bench compare -- --quick       # 10,000 cases, one Python run
//! ```
//!
//! Not a criterion benchmark: each measure times a whole run and the median
//! of 3 runs is reported. For each backend enabled by cargo features it
//! creates (drops and recreates) three tables of its own, `phi_cmp_plain` (4
//! PHI text columns), `phi_cmp_sealed` (the same 4 columns as binary
//! `Encrypted<String>`) and `phi_cmp_em` (the same 4 columns as the JSON
//! text of the `encrypted-message` crate), and measures, for N cases × 4
//! PHI fields over 100 owners:
//!
//! - insert: batches of 1,000 rows, one multi-row `INSERT` in one transaction
//!   per batch; phi inserts the same batches sealed by
//!   `Case::seal_chunks(cases, 1_000, &keyring, …)` for the
//!   `#[derive(PhiRecord)]` model `Case` (every value bound to
//!   `phi_cmp_sealed.<column>` and to its case id; the next batch sealed on
//!   the pool while one is inserted), and, apart, batch by batch what
//!   `Case::seal_all(batch, &keyring)` returns, the owners' keys created or
//!   cached before the timing;
//! - load: one `load` of every row into structs (on PostgreSQL also in
//!   Diesel's row-by-row mode, phi's through `Case::open_iter`); phi's is one
//!   `Case::load(phi_cmp_sealed::table, …)`, on a warm keyring and on a fresh
//!   (cold) one that resolves the 100 owners inside the timing. The warm load
//!   is also timed in its two steps: loading the sealed rows, then
//!   `Case::open_all` (key resolution and opening);
//! - the same insert and load with `encrypted-message` 0.3 (each field
//!   encrypted and decrypted one by one on the calling thread, as that crate
//!   offers).
//!
//! Settings (environment):
//!
//! - `PHI_COMPARE_ROWS`: N (default 100,000; 10,000 with `--quick`);
//! - `PHI_TEST_MYSQL_URL` (default `mysql://root@127.0.0.1:3306/test`) and
//!   `PHI_TEST_POSTGRES_URL` (default
//!   `postgres://postgres@127.0.0.1:5432/test`), with the `mysql` and
//!   `postgres` features;
//! - `PHI_COMPARE_PY_PEER`: the Python baseline script (default
//!   `../shared/peers/py_peer.py` beside the workspace), run as `python3 SCRIPT N` when
//!   `python3` can import `sqlalchemy` and `cryptography`.
//!
//! Results and how to read them: `benches/README.md`.
#![allow(clippy::print_stdout)]

use std::collections::HashSet;
use std::error::Error;
use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use phi::{KeyBytes, KeyStore, Keyring, LocalKek, PhiRecord};

#[path = "common/cmp_model.rs"]
mod cmp_model;
use cmp_model::schema::{phi_cmp_plain, phi_cmp_sealed};
use cmp_model::{Case, CaseSealed, PlainCase};

mod schema {
    //! The table of the `encrypted-message` variant (the other two are in
    //! `common/cmp_model.rs`).
    #![allow(missing_docs)]
    diesel::table! {
        phi_cmp_em (case_id) {
            case_id -> BigInt,
            user_id -> Text,
            patient_first -> Text,
            patient_last -> Text,
            patient_dob -> Text,
            ins_provider -> Text,
            status -> Integer,
        }
    }
}
use schema::phi_cmp_em;

/// The `encrypted-message` crate (0.3) on the same rows: each PHI field an
/// `EncryptedMessage<String, _>` (AES-256-GCM under one application key,
/// random nonce, no associated data), stored as the JSON text its Diesel
/// integration writes (`{"p":…,"h":{"iv":…,"at":…}}`) in a text column.
mod em {
    use encrypted_message::EncryptedMessage;
    use encrypted_message::config::{Config, Secret};
    use encrypted_message::strategy::Randomized;

    use super::{BoxResult, PlainCase, phi_cmp_em};

    #[derive(Debug, Default)]
    pub(super) struct EmConfig;

    impl Config for EmConfig {
        type Strategy = Randomized;

        fn keys(&self) -> Vec<Secret<[u8; 32]>> {
            vec![[0x42u8; 32].into()]
        }
    }

    type Em = EncryptedMessage<String, EmConfig>;

    /// A row of `phi_cmp_em`: the 4 PHI fields as encrypted-message JSON.
    #[derive(diesel::Insertable, diesel::Queryable, diesel::Selectable)]
    #[diesel(table_name = phi_cmp_em)]
    pub(super) struct EmRow {
        case_id: i64,
        user_id: String,
        patient_first: String,
        patient_last: String,
        patient_dob: String,
        ins_provider: String,
        status: i32,
    }

    fn seal(value: &str) -> BoxResult<String> {
        Ok(serde_json::to_string(&Em::encrypt(value.to_owned())?)?)
    }

    fn open(stored: &str) -> BoxResult<String> {
        let message: Em = serde_json::from_str(stored)?;
        Ok(message.decrypt()?)
    }

    pub(super) fn seal_row(c: &PlainCase) -> BoxResult<EmRow> {
        Ok(EmRow {
            case_id: c.case_id,
            user_id: c.user_id.clone(),
            patient_first: seal(&c.patient_first)?,
            patient_last: seal(&c.patient_last)?,
            patient_dob: seal(&c.patient_dob)?,
            ins_provider: seal(&c.ins_provider)?,
            status: c.status,
        })
    }

    pub(super) fn open_row(r: EmRow) -> BoxResult<PlainCase> {
        Ok(PlainCase {
            case_id: r.case_id,
            user_id: r.user_id,
            patient_first: open(&r.patient_first)?,
            patient_last: open(&r.patient_last)?,
            patient_dob: open(&r.patient_dob)?,
            ins_provider: open(&r.ins_provider)?,
            status: r.status,
        })
    }

    /// The stored value is not the plaintext.
    pub(super) fn looks_sealed(stored: &str, clear: &str) -> bool {
        stored.starts_with("{\"p\":") && !stored.contains(clear)
    }
}

const DEFAULT_ROWS: usize = 100_000;
const QUICK_ROWS: usize = 10_000;
const OWNERS: usize = 100;
const BATCH_ROWS: usize = 1_000;
const PHI_FIELDS: usize = 4;
const RUNS: usize = 3;
/// The Python peer, beside the workspace (override with `PHI_COMPARE_PY_PEER`).
const DEFAULT_PY_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/peers/py_peer.py");

impl From<&Case> for PlainCase {
    fn from(c: &Case) -> PlainCase {
        PlainCase {
            case_id: c.case_id,
            user_id: c.user_id.clone(),
            patient_first: c.patient_first.clone(),
            patient_last: c.patient_last.clone(),
            patient_dob: c.patient_dob.clone(),
            ins_provider: c.ins_provider.clone(),
            status: c.status,
        }
    }
}

/// The generated cases, in both forms.
struct Data {
    cases: Vec<Case>,
    plain: Vec<PlainCase>,
}

type BoxResult<T> = Result<T, Box<dyn Error>>;

// ---------------------------------------------------------------------------
// Data

const FIRST_NAMES: [&str; 16] = [
    "Margaret", "James", "Aisha", "Wei", "Luis", "Olivia", "Noah", "Fatima", "Dmitri", "Priya",
    "Kwame", "Sofia", "Hiroshi", "Amara", "Elena", "Mohammed",
];
const LAST_NAMES: [&str; 16] = [
    "Johnson",
    "García",
    "Nguyen",
    "Okafor",
    "Smith",
    "Kowalski",
    "Haddad-Ali",
    "Lindqvist",
    "Patel",
    "Rodriguez",
    "Zhang",
    "O'Brien",
    "Schmidt",
    "Nakamura",
    "Williams",
    "Fernández",
];
const INSURERS: [&str; 8] = [
    "Aetna",
    "Blue Cross Blue Shield",
    "UnitedHealthcare",
    "Medicare",
    "Cigna",
    "Kaiser Permanente",
    "Humana",
    "Medicaid",
];

fn owners() -> Vec<String> {
    (0..OWNERS)
        .map(|i| format!("cmp-provider-{i:03}"))
        .collect()
}

/// `rows` cases with ids 1..=rows, spread over the owners round-robin,
/// fields picked by a fixed pseudo-random sequence.
fn cases(rows: usize, owners: &[String]) -> Vec<Case> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: u64| {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    };
    let pick = |list: &[&str], i: u64| list[usize::try_from(i).expect("small index")].to_owned();
    (0..rows)
        .map(|i| Case {
            case_id: i64::try_from(i + 1).expect("row count fits i64"),
            user_id: owners[i % owners.len()].clone(),
            patient_first: pick(&FIRST_NAMES, next(16)),
            patient_last: pick(&LAST_NAMES, next(16)),
            patient_dob: format!(
                "{:04}-{:02}-{:02}",
                1930 + next(80),
                1 + next(12),
                1 + next(28)
            ),
            ins_provider: pick(&INSURERS, next(8)),
            status: i32::try_from(next(4)).expect("small status"),
        })
        .collect()
}

/// Every loaded case is the one generated with its id, and all are there.
fn verify<T: PartialEq>(
    loaded: &[T],
    cases: &[T],
    case_id: impl Fn(&T) -> i64,
    what: &str,
) -> BoxResult<()> {
    if loaded.len() != cases.len() {
        return Err(format!(
            "{what}: loaded {} rows, expected {}",
            loaded.len(),
            cases.len()
        )
        .into());
    }
    for case in loaded {
        let id = case_id(case);
        let index = usize::try_from(id - 1)?;
        if cases.get(index) != Some(case) {
            return Err(format!("{what}: case {id} differs from what was inserted").into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// phi

fn new_keyring(store: &Arc<dyn KeyStore>) -> phi::Result<Keyring> {
    // A fixed test master key: keys created by an earlier run on the same
    // server unwrap again.
    let kek = LocalKek::new("bench-compare", &KeyBytes::new([0x42; 32]));
    Keyring::builder(Arc::clone(store), Arc::new(kek))
        .actor("phi-bench-compare")
        .build()
}

/// `keys_for_open_many` over every row's owner on `keyring`, and (`distinct`)
/// over the distinct owners collected first into a `HashSet<&str>`
/// (collection included).
fn owner_resolution(
    rows: &[CaseSealed],
    keyring: &Keyring,
    distinct: bool,
) -> phi::Result<Duration> {
    let start = Instant::now();
    if distinct {
        let owners: HashSet<&str> = rows.iter().map(|r| r.user_id.as_str()).collect();
        black_box(keyring.keys_for_open_many(owners)?);
    } else {
        black_box(keyring.keys_for_open_many(rows.iter().map(|r| r.user_id.as_str()))?);
    }
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------
// Backends

/// One database to measure on.
struct Backend {
    name: &'static str,
    url: String,
    /// Connection settings, run once on the application's connection.
    setup: &'static str,
    /// `DROP` and `CREATE` of each table.
    plain_table: &'static str,
    sealed_table: &'static str,
    version_sql: &'static str,
    /// The targets of `peers/README.md`: phi's time over plaintext's.
    load_target: f64,
    insert_target: f64,
}

/// The samples of one backend, `RUNS` of each.
#[derive(Default)]
struct Samples {
    plain_insert: Vec<Duration>,
    phi_insert: Vec<Duration>,
    /// The insert through `Case::seal_chunks`.
    phi_insert_chunks: Vec<Duration>,
    phi_seal: Vec<Duration>,
    plain_load: Vec<Duration>,
    /// `Case::load`, warm and cold keyring.
    warm: Vec<Duration>,
    cold: Vec<Duration>,
    /// The warm load in two steps: the sealed rows, then `Case::open_all`.
    warm_rows: Vec<Duration>,
    warm_open: Vec<Duration>,
    /// `keys_for_open_many` alone over every row's owner: warm, cold.
    warm_keys: Vec<Duration>,
    cold_keys: Vec<Duration>,
    /// The same, warm, over the distinct owners collected first.
    keys_distinct: Vec<Duration>,
    /// The `encrypted-message` variant: insert (sealing included), load
    /// (opening included).
    em_insert: Vec<Duration>,
    em_load: Vec<Duration>,
    /// PostgreSQL only: both loads in Diesel's row-by-row mode, phi's
    /// through `Case::open_iter`.
    plain_streamed: Vec<Duration>,
    streamed: Vec<Duration>,
}

/// What one backend measured (medians).
struct Report {
    name: &'static str,
    version: String,
    load_target: f64,
    insert_target: f64,
    rows: usize,
    plain_insert: Duration,
    phi_insert: Duration,
    phi_insert_chunks: Duration,
    phi_seal: Duration,
    plain_load: Duration,
    warm: Duration,
    cold: Duration,
    warm_rows: Duration,
    warm_open: Duration,
    warm_keys: Duration,
    cold_keys: Duration,
    keys_distinct: Duration,
    em_insert: Duration,
    em_load: Duration,
    plain_streamed: Option<Duration>,
    streamed: Option<Duration>,
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

impl Report {
    fn new(backend: &Backend, version: String, rows: usize, s: &Samples) -> Report {
        Report {
            name: backend.name,
            version,
            load_target: backend.load_target,
            insert_target: backend.insert_target,
            rows,
            plain_insert: median(&s.plain_insert),
            phi_insert: median(&s.phi_insert),
            phi_insert_chunks: median(&s.phi_insert_chunks),
            phi_seal: median(&s.phi_seal),
            plain_load: median(&s.plain_load),
            warm: median(&s.warm),
            cold: median(&s.cold),
            warm_rows: median(&s.warm_rows),
            warm_open: median(&s.warm_open),
            warm_keys: median(&s.warm_keys),
            cold_keys: median(&s.cold_keys),
            keys_distinct: median(&s.keys_distinct),
            em_insert: median(&s.em_insert),
            em_load: median(&s.em_load),
            plain_streamed: (!s.plain_streamed.is_empty()).then(|| median(&s.plain_streamed)),
            streamed: (!s.streamed.is_empty()).then(|| median(&s.streamed)),
        }
    }

    fn rate(&self, d: Duration) -> f64 {
        self.rows as f64 / d.as_secs_f64()
    }

    fn per_field_ns(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e9 / (self.rows * PHI_FIELDS) as f64
    }

    fn print(&self) {
        let insert_x = ratio(self.phi_insert_chunks, self.plain_insert);
        let load_x = ratio(self.warm, self.plain_load);
        println!("### {} ({})", self.name, self.version);
        println!();
        println!(
            "{} cases × {PHI_FIELDS} PHI text fields, {OWNERS} owners; medians of {RUNS}; \
             × = time against plaintext",
            thousands(self.rows as f64),
        );
        println!();
        println!("| variant | insert rows/s | × | load rows/s | × |");
        println!("|---|---|---|---|---|");
        println!(
            "| plaintext | {} | 1.00 | {} | 1.00 |",
            thousands(self.rate(self.plain_insert)),
            thousands(self.rate(self.plain_load)),
        );
        println!(
            "| phi, warm keyring (insert: `seal_chunks`) | {} | {insert_x:.2} | {} | {load_x:.2} |",
            thousands(self.rate(self.phi_insert_chunks)),
            thousands(self.rate(self.warm)),
        );
        println!(
            "| phi, insert: `seal_all` then `INSERT`, batch by batch | {} | {:.2} | | |",
            thousands(self.rate(self.phi_insert)),
            ratio(self.phi_insert, self.plain_insert),
        );
        println!(
            "| phi, cold keyring ({OWNERS} owners resolved in the load) | | | {} | {:.2} |",
            thousands(self.rate(self.cold)),
            ratio(self.cold, self.plain_load),
        );
        println!(
            "| phi, sealed rows loaded, not opened (the first step of `Case::load`) | | | {} | {:.2} |",
            thousands(self.rate(self.warm_rows)),
            ratio(self.warm_rows, self.plain_load),
        );
        println!(
            "| encrypted-message 0.3 (JSON text columns) | {} | {:.2} | {} | {:.2} |",
            thousands(self.rate(self.em_insert)),
            ratio(self.em_insert, self.plain_insert),
            thousands(self.rate(self.em_load)),
            ratio(self.em_load, self.plain_load),
        );
        if let (Some(plain), Some(phi)) = (self.plain_streamed, self.streamed) {
            println!(
                "| plaintext, row-by-row mode | | | {} | {:.2} |",
                thousands(self.rate(plain)),
                ratio(plain, self.plain_load),
            );
            println!(
                "| phi, row-by-row mode (`Case::open_iter`), warm keyring | | | {} | {:.2} |",
                thousands(self.rate(phi)),
                ratio(phi, self.plain_load),
            );
        }
        println!();
        println!(
            "- phi's warm load against encrypted-message's: {:.1}× faster (target ≥ 4×: {}); \
             insert {:.1}× faster",
            ratio(self.em_load, self.warm),
            met(ratio(self.em_load, self.warm) >= 4.0),
            ratio(self.em_insert, self.phi_insert_chunks),
        );
        println!(
            "- per field, wall clock: seal {:.0} ns (`seal_all` {:.1} ms in all for {} fields), \
             open {:.0} ns (`open_all` {:.1} ms, warm, key resolution included)",
            self.per_field_ns(self.phi_seal),
            ms(self.phi_seal),
            thousands((self.rows * PHI_FIELDS) as f64),
            self.per_field_ns(self.warm_open),
            ms(self.warm_open),
        );
        println!(
            "- per field against plaintext: insert +{:.0} ns, warm load +{:.0} ns",
            self.per_field_ns(self.phi_insert_chunks.saturating_sub(self.plain_insert)),
            self.per_field_ns(self.warm.saturating_sub(self.plain_load)),
        );
        println!(
            "- `keys_for_open_many` alone over the {} rows' owners: warm {:.2} ms, cold {:.2} ms; \
             the {OWNERS} distinct owners collected first (`HashSet<&str>`, included, warm) {:.2} ms",
            thousands(self.rows as f64),
            ms(self.warm_keys),
            ms(self.cold_keys),
            ms(self.keys_distinct),
        );
        println!(
            "- targets: load ≤ {:.1}×: {} ({load_x:.2}×); insert ≤ {:.1}×: {} ({insert_x:.2}×)",
            self.load_target,
            met(load_x <= self.load_target),
            self.insert_target,
            met(insert_x <= self.insert_target),
        );
        println!();
    }
}

fn ratio(phi: Duration, plain: Duration) -> f64 {
    phi.as_secs_f64() / plain.as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// `1234567.8` as `1,234,568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The measurement on one Diesel connection type; a macro because Diesel's
/// batch `INSERT` and `load` are bounded per backend.
macro_rules! backend_run {
    ($module:ident, $feature:literal, $conn:ty) => {
        #[cfg(feature = $feature)]
        mod $module {
            use diesel::connection::SimpleConnection;
            use diesel::dsl::sql;
            use diesel::sql_types::Text;

            use super::*;

            type Conn = $conn;

            pub(super) fn run(b: &Backend, data: &Data, owners: &[String]) -> BoxResult<Report> {
                let mut conn = Conn::establish(&b.url)?;
                conn.batch_execute(b.setup)?;
                let version: String =
                    diesel::select(sql::<Text>(b.version_sql)).get_result(&mut conn)?;
                let store: Arc<dyn KeyStore> = Arc::new(
                    phi::DieselKeyStore::<Conn>::builder(&b.url)
                        .run_migrations(true)
                        .connect()?,
                );
                let keyring = new_keyring(&store)?;
                // Created (first run on this database) or unwrapped here,
                // before any timing; the cache stays warm for the inserts
                // and the loads.
                keyring.keys_for_seal_many(owners.iter().map(String::as_str))?;

                let mut s = Samples::default();
                for run in 0..RUNS {
                    eprintln!("{}: insert run {}/{RUNS}", b.name, run + 1);
                    conn.batch_execute(b.plain_table)?;
                    s.plain_insert.push(insert_plain(&mut conn, &data.plain)?);
                    conn.batch_execute(b.sealed_table)?;
                    let (total, sealing) = insert_phi(&mut conn, &data.cases, &keyring)?;
                    s.phi_insert.push(total);
                    s.phi_seal.push(sealing);
                    conn.batch_execute(b.sealed_table)?;
                    s.phi_insert_chunks
                        .push(insert_phi_chunks(&mut conn, &data.cases, &keyring)?);
                    conn.batch_execute(&em_table(b))?;
                    s.em_insert.push(insert_em(&mut conn, &data.plain)?);
                }
                check_stored(&mut conn, data)?;

                // One untimed load of each table first (PostgreSQL sets hint
                // bits on the first read after the insert).
                black_box(load_plain(&mut conn)?);
                black_box(load_sealed(&mut conn)?);
                black_box(load_em(&mut conn)?);
                for run in 0..RUNS {
                    eprintln!("{}: load run {}/{RUNS}", b.name, run + 1);
                    let start = Instant::now();
                    let plain = load_plain(&mut conn)?;
                    s.plain_load.push(start.elapsed());
                    if run == 0 {
                        verify(&plain, &data.plain, |c| c.case_id, "plaintext load")?;
                    }
                    drop(black_box(plain));

                    let start = Instant::now();
                    let warm = Case::load(phi_cmp_sealed::table, &mut conn, &keyring)?;
                    s.warm.push(start.elapsed());
                    if run == 0 {
                        verify(&warm, &data.cases, |c| c.case_id, "phi load")?;
                    }
                    drop(black_box(warm));

                    let fresh = new_keyring(&store)?;
                    let start = Instant::now();
                    let cold = Case::load(phi_cmp_sealed::table, &mut conn, &fresh)?;
                    s.cold.push(start.elapsed());
                    if run == 0 {
                        verify(&cold, &data.cases, |c| c.case_id, "phi load, cold keyring")?;
                    }
                    drop(black_box(cold));

                    let start = Instant::now();
                    let rows = load_sealed(&mut conn)?;
                    let loaded = Instant::now();
                    let opened = Case::open_all(rows, &keyring)?;
                    s.warm_open.push(loaded.elapsed());
                    s.warm_rows.push(loaded - start);
                    drop(black_box(opened));

                    let start = Instant::now();
                    if let Some(plain) = Streamed::plain(&mut conn) {
                        let plain = plain?;
                        s.plain_streamed.push(start.elapsed());
                        if run == 0 {
                            verify(
                                &plain,
                                &data.plain,
                                |c| c.case_id,
                                "plaintext load, row by row",
                            )?;
                        }
                        drop(black_box(plain));
                        let start = Instant::now();
                        let opened = Streamed::phi(&mut conn, &keyring).expect("streams")?;
                        s.streamed.push(start.elapsed());
                        if run == 0 {
                            verify(&opened, &data.cases, |c| c.case_id, "phi load, row by row")?;
                        }
                        drop(black_box(opened));
                    }

                    let start = Instant::now();
                    let em: Vec<PlainCase> = load_em(&mut conn)?
                        .into_iter()
                        .map(em::open_row)
                        .collect::<BoxResult<_>>()?;
                    s.em_load.push(start.elapsed());
                    if run == 0 {
                        verify(&em, &data.plain, |c| c.case_id, "encrypted-message load")?;
                    }
                    drop(black_box(em));
                }
                let sealed = load_sealed(&mut conn)?;
                for _ in 0..RUNS {
                    s.warm_keys
                        .push(owner_resolution(&sealed, &keyring, false)?);
                    s.keys_distinct
                        .push(owner_resolution(&sealed, &keyring, true)?);
                    let fresh = new_keyring(&store)?;
                    s.cold_keys.push(owner_resolution(&sealed, &fresh, false)?);
                }
                Ok(Report::new(b, version, data.cases.len(), &s))
            }

            fn insert_em(conn: &mut Conn, cases: &[PlainCase]) -> BoxResult<Duration> {
                let start = Instant::now();
                for batch in cases.chunks(BATCH_ROWS) {
                    let rows = batch
                        .iter()
                        .map(em::seal_row)
                        .collect::<BoxResult<Vec<_>>>()?;
                    conn.transaction::<_, diesel::result::Error, _>(|conn| {
                        diesel::insert_into(phi_cmp_em::table)
                            .values(&rows)
                            .execute(conn)
                    })?;
                }
                Ok(start.elapsed())
            }

            fn load_em(conn: &mut Conn) -> QueryResult<Vec<em::EmRow>> {
                phi_cmp_em::table.select(em::EmRow::as_select()).load(conn)
            }

            fn insert_plain(conn: &mut Conn, cases: &[PlainCase]) -> BoxResult<Duration> {
                let start = Instant::now();
                for batch in cases.chunks(BATCH_ROWS) {
                    conn.transaction::<_, diesel::result::Error, _>(|conn| {
                        diesel::insert_into(phi_cmp_plain::table)
                            .values(batch)
                            .execute(conn)
                    })?;
                }
                Ok(start.elapsed())
            }

            /// The whole insert, and the part of it spent in `seal_all`.
            fn insert_phi(
                conn: &mut Conn,
                cases: &[Case],
                keyring: &Keyring,
            ) -> BoxResult<(Duration, Duration)> {
                let mut sealing = Duration::ZERO;
                let start = Instant::now();
                for batch in cases.chunks(BATCH_ROWS) {
                    let sealed_at = Instant::now();
                    let rows = Case::seal_all(batch, keyring)?;
                    sealing += sealed_at.elapsed();
                    conn.transaction::<_, diesel::result::Error, _>(|conn| {
                        diesel::insert_into(phi_cmp_sealed::table)
                            .values(&rows)
                            .execute(conn)
                    })?;
                }
                Ok((start.elapsed(), sealing))
            }

            /// The same batches through `Case::seal_chunks`: each batch
            /// inserted in its transaction while the next is sealed.
            fn insert_phi_chunks(
                conn: &mut Conn,
                cases: &[Case],
                keyring: &Keyring,
            ) -> BoxResult<Duration> {
                let start = Instant::now();
                Case::seal_chunks(cases, BATCH_ROWS, keyring, |rows| {
                    conn.transaction::<_, diesel::result::Error, _>(|conn| {
                        diesel::insert_into(phi_cmp_sealed::table)
                            .values(&rows)
                            .execute(conn)
                    })?;
                    Ok::<_, Box<dyn std::error::Error>>(())
                })?;
                Ok(start.elapsed())
            }

            /// Both tables hold every case, and the sealed one holds
            /// envelopes, not the plaintext.
            fn check_stored(conn: &mut Conn, data: &Data) -> BoxResult<()> {
                let plain: i64 = phi_cmp_plain::table.count().get_result(conn)?;
                let sealed: i64 = phi_cmp_sealed::table.count().get_result(conn)?;
                let expected = i64::try_from(data.cases.len())?;
                if plain != expected || sealed != expected {
                    return Err(format!(
                        "tables hold {plain} and {sealed} rows, expected {expected}"
                    )
                    .into());
                }
                let (id, raw): (i64, Vec<u8>) = phi_cmp_sealed::table
                    .select((phi_cmp_sealed::case_id, phi_cmp_sealed::patient_last))
                    .order(phi_cmp_sealed::case_id)
                    .first(conn)?;
                let clear = &data.cases[usize::try_from(id - 1)?].patient_last;
                if raw.get(..2) != Some(&[0xF1, 0x01][..])
                    || raw.windows(clear.len()).any(|w| w == clear.as_bytes())
                {
                    return Err("the sealed table does not hold envelope v1 values".into());
                }
                let em_rows: i64 = phi_cmp_em::table.count().get_result(conn)?;
                let (id, stored): (i64, String) = phi_cmp_em::table
                    .select((phi_cmp_em::case_id, phi_cmp_em::patient_last))
                    .order(phi_cmp_em::case_id)
                    .first(conn)?;
                let clear = &data.cases[usize::try_from(id - 1)?].patient_last;
                if em_rows != expected || !em::looks_sealed(&stored, clear) {
                    return Err("the encrypted-message table does not hold its sealed rows".into());
                }
                Ok(())
            }

            fn load_plain(conn: &mut Conn) -> QueryResult<Vec<PlainCase>> {
                phi_cmp_plain::table
                    .select(PlainCase::as_select())
                    .load(conn)
            }

            fn load_sealed(conn: &mut Conn) -> QueryResult<Vec<CaseSealed>> {
                phi_cmp_sealed::table
                    .select(CaseSealed::as_select())
                    .load(conn)
            }
        }
    };
}

/// Loads in a backend's streaming mode, where it has one that `load` does
/// not use: PostgreSQL's row-by-row mode.
trait Streamed: Sized {
    fn plain(_conn: &mut Self) -> Option<BoxResult<Vec<PlainCase>>> {
        None
    }
    fn phi(_conn: &mut Self, _keyring: &Keyring) -> Option<BoxResult<Vec<Case>>> {
        None
    }
}

#[cfg(feature = "sqlite")]
impl Streamed for diesel::SqliteConnection {}
#[cfg(feature = "mysql")]
impl Streamed for diesel::MysqlConnection {}
#[cfg(feature = "postgres")]
impl Streamed for diesel::PgConnection {
    fn plain(conn: &mut Self) -> Option<BoxResult<Vec<PlainCase>>> {
        use diesel::pg::PgRowByRowLoadingMode;
        Some((|| {
            Ok(phi_cmp_plain::table
                .select(PlainCase::as_select())
                .load_iter::<PlainCase, PgRowByRowLoadingMode>(conn)?
                .collect::<QueryResult<Vec<_>>>()?)
        })())
    }
    fn phi(conn: &mut Self, keyring: &Keyring) -> Option<BoxResult<Vec<Case>>> {
        use diesel::pg::PgRowByRowLoadingMode;
        Some((|| {
            let rows = phi_cmp_sealed::table
                .select(CaseSealed::as_select())
                .load_iter::<CaseSealed, PgRowByRowLoadingMode>(conn)?;
            Ok(Case::open_iter(rows, keyring)?)
        })())
    }
}

backend_run!(sqlite_run, "sqlite", diesel::SqliteConnection);
backend_run!(mysql_run, "mysql", diesel::MysqlConnection);
backend_run!(postgres_run, "postgres", diesel::PgConnection);

// ---------------------------------------------------------------------------
// The Python baseline

/// Load rates of the Python peer (medians over its runs).
struct PyReport {
    runs: usize,
    plain_load: f64,
    encrypted_load: f64,
}

/// `load rows/s: plain 95,694  encrypted 51,626` → (95694, 51626).
fn parse_py_load(line: &str) -> Option<(f64, f64)> {
    let rest = line.strip_prefix("load rows/s:")?;
    let mut words = rest.split_whitespace();
    let mut number = |label: &str| -> Option<f64> {
        if words.next()? != label {
            return None;
        }
        words.next()?.replace(',', "").parse().ok()
    };
    Some((number("plain")?, number("encrypted")?))
}

fn python_peer(rows: usize, runs: usize) -> Result<PyReport, String> {
    let script = std::env::var("PHI_COMPARE_PY_PEER").unwrap_or_else(|_| DEFAULT_PY_PEER.into());
    if !std::path::Path::new(&script).is_file() {
        return Err(format!("{script} not found (set PHI_COMPARE_PY_PEER)"));
    }
    let importable = Command::new("python3")
        .args(["-c", "import sqlalchemy, cryptography"])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !importable.status.success() {
        return Err(format!(
            "python3 cannot import sqlalchemy and cryptography: {}",
            String::from_utf8_lossy(&importable.stderr).trim()
        ));
    }
    let mut plain = Vec::new();
    let mut encrypted = Vec::new();
    for run in 0..runs {
        eprintln!("python: run {}/{runs}", run + 1);
        let out = Command::new("python3")
            .arg(&script)
            .arg(rows.to_string())
            .output()
            .map_err(|e| format!("cannot run python3 {script}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "python3 {script} {rows} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        for line in stdout.lines() {
            println!("    python run {}: {line}", run + 1);
        }
        let (p, e) = stdout
            .lines()
            .find_map(parse_py_load)
            .ok_or_else(|| format!("no `load rows/s:` line in the output of {script}"))?;
        plain.push(p);
        encrypted.push(e);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(PyReport {
        runs,
        plain_load: median(&mut plain),
        encrypted_load: median(&mut encrypted),
    })
}

// ---------------------------------------------------------------------------

// One `push` per backend enabled by cargo features.
#[allow(clippy::vec_init_then_push)]
fn backends() -> Vec<Backend> {
    let mut list = Vec::new();
    #[cfg(feature = "sqlite")]
    list.push(Backend {
        name: "SQLite",
        url: String::new(), // a temporary file, set in `main`
        setup: "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
        plain_table: "DROP TABLE IF EXISTS phi_cmp_plain;
            CREATE TABLE phi_cmp_plain (
                case_id       INTEGER PRIMARY KEY NOT NULL,
                user_id       TEXT    NOT NULL,
                patient_first TEXT    NOT NULL,
                patient_last  TEXT    NOT NULL,
                patient_dob   TEXT    NOT NULL,
                ins_provider  TEXT    NOT NULL,
                status        INTEGER NOT NULL
            );",
        sealed_table: "DROP TABLE IF EXISTS phi_cmp_sealed;
            CREATE TABLE phi_cmp_sealed (
                case_id       INTEGER PRIMARY KEY NOT NULL,
                user_id       TEXT    NOT NULL,
                patient_first BLOB    NOT NULL,
                patient_last  BLOB    NOT NULL,
                patient_dob   BLOB    NOT NULL,
                ins_provider  BLOB    NOT NULL,
                status        INTEGER NOT NULL
            );",
        version_sql: "'bundled ' || sqlite_version() || ', temporary file, WAL, synchronous = NORMAL'",
        load_target: 1.8,
        insert_target: 1.3,
    });
    #[cfg(feature = "mysql")]
    list.push(Backend {
        name: "MariaDB",
        url: std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
        setup: "SELECT 1;",
        plain_table: "DROP TABLE IF EXISTS phi_cmp_plain;
            CREATE TABLE phi_cmp_plain (
                case_id       BIGINT       NOT NULL PRIMARY KEY,
                user_id       VARCHAR(64)  NOT NULL,
                patient_first VARCHAR(255) NOT NULL,
                patient_last  VARCHAR(255) NOT NULL,
                patient_dob   VARCHAR(255) NOT NULL,
                ins_provider  VARCHAR(255) NOT NULL,
                status        INT          NOT NULL
            ) ENGINE = InnoDB CHARACTER SET utf8mb4;",
        sealed_table: "DROP TABLE IF EXISTS phi_cmp_sealed;
            CREATE TABLE phi_cmp_sealed (
                case_id       BIGINT         NOT NULL PRIMARY KEY,
                user_id       VARCHAR(64)    NOT NULL,
                patient_first VARBINARY(255) NOT NULL,
                patient_last  VARBINARY(255) NOT NULL,
                patient_dob   VARBINARY(255) NOT NULL,
                ins_provider  VARBINARY(255) NOT NULL,
                status        INT            NOT NULL
            ) ENGINE = InnoDB CHARACTER SET utf8mb4;",
        version_sql: "version()",
        load_target: 1.5,
        insert_target: 1.2,
    });
    #[cfg(feature = "postgres")]
    list.push(Backend {
        name: "PostgreSQL",
        url: std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        setup: "SELECT 1;",
        plain_table: "DROP TABLE IF EXISTS phi_cmp_plain;
            CREATE TABLE phi_cmp_plain (
                case_id       BIGINT  NOT NULL PRIMARY KEY,
                user_id       TEXT    NOT NULL,
                patient_first TEXT    NOT NULL,
                patient_last  TEXT    NOT NULL,
                patient_dob   TEXT    NOT NULL,
                ins_provider  TEXT    NOT NULL,
                status        INTEGER NOT NULL
            );",
        sealed_table: "DROP TABLE IF EXISTS phi_cmp_sealed;
            CREATE TABLE phi_cmp_sealed (
                case_id       BIGINT  NOT NULL PRIMARY KEY,
                user_id       TEXT    NOT NULL,
                patient_first BYTEA   NOT NULL,
                patient_last  BYTEA   NOT NULL,
                patient_dob   BYTEA   NOT NULL,
                ins_provider  BYTEA   NOT NULL,
                status        INTEGER NOT NULL
            );",
        version_sql: "split_part(version(), ' on ', 1)",
        load_target: 1.5,
        insert_target: 1.2,
    });
    list
}

/// `DROP` and `CREATE` of the encrypted-message variant's table: the
/// plaintext table's columns, wide enough for the JSON.
fn em_table(b: &Backend) -> String {
    b.plain_table
        .replace("phi_cmp_plain", "phi_cmp_em")
        .replace("VARCHAR(255)", "VARCHAR(1024)")
}

fn run_backend(b: &Backend, data: &Data, owners: &[String]) -> BoxResult<Report> {
    match b.name {
        #[cfg(feature = "sqlite")]
        "SQLite" => sqlite_run::run(b, data, owners),
        #[cfg(feature = "mysql")]
        "MariaDB" => mysql_run::run(b, data, owners),
        #[cfg(feature = "postgres")]
        "PostgreSQL" => postgres_run::run(b, data, owners),
        other => Err(format!("no runner for {other}").into()),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rows = match std::env::var("PHI_COMPARE_ROWS") {
        Ok(v) => v
            .replace(['_', ','], "")
            .parse()
            .expect("PHI_COMPARE_ROWS is a number of rows"),
        Err(_) if quick => QUICK_ROWS,
        Err(_) => DEFAULT_ROWS,
    };
    assert!(rows > 0, "PHI_COMPARE_ROWS must be positive");
    let owners = owners();
    let cases = cases(rows, &owners);
    let plain = cases.iter().map(PlainCase::from).collect();
    let data = Data { cases, plain };
    // Kept until the end of `main`: the SQLite database lives in it.
    let dir = tempfile::tempdir().expect("temporary directory");

    println!(
        "## phi comparison, {} ({} cases, {} cores{})",
        chrono::Utc::now().format("%Y-%m-%d"),
        thousands(rows as f64),
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model().map(|m| format!(", {m}")).unwrap_or_default(),
    );
    println!();

    let mut reports = Vec::new();
    let mut failed = false;
    for mut backend in backends() {
        if backend.name == "SQLite" {
            let path = dir.path().join("compare.db");
            backend.url = path.to_str().expect("UTF-8 temporary path").to_owned();
        }
        match run_backend(&backend, &data, &owners) {
            Ok(report) => {
                report.print();
                reports.push(report);
            }
            Err(e) => {
                failed = true;
                println!("### {}: FAILED: {e}", backend.name);
                println!();
            }
        }
    }

    let py_runs = if quick { 1 } else { RUNS };
    println!(
        "### Python baseline (`py_peer.py {rows}`: SQLAlchemy + cryptography, SQLite, median of {py_runs})"
    );
    println!();
    match python_peer(rows, py_runs) {
        Ok(py) => {
            println!();
            println!(
                "| load | rows/s |\n|---|---|\n| Python plaintext | {} |\n| Python encrypted | {} |",
                thousands(py.plain_load),
                thousands(py.encrypted_load),
            );
            match reports.iter().find(|r| r.name == "SQLite") {
                Some(sqlite) => {
                    let phi = sqlite.rate(sqlite.warm);
                    let cold = sqlite.rate(sqlite.cold);
                    let x = phi / py.encrypted_load;
                    println!(
                        "| phi, SQLite, warm keyring | {} |\n| phi, SQLite, cold keyring | {} |",
                        thousands(phi),
                        thousands(cold),
                    );
                    println!();
                    println!(
                        "- phi's encrypted SQLite load is {x:.1}× the Python encrypted load \
                         (cold keyring: {:.1}×); target ≥ 20×: {}",
                        cold / py.encrypted_load,
                        met(x >= 20.0),
                    );
                    println!(
                        "- Python's own encrypted load is {:.2}× its plaintext load \
                         (medians of {} run{})",
                        py.plain_load / py.encrypted_load,
                        py.runs,
                        if py.runs == 1 { "" } else { "s" },
                    );
                }
                None => println!("\n- no SQLite result of phi to compare with"),
            }
        }
        Err(why) => println!("- the Python baseline could not run: {why}"),
    }
    println!();
    if failed {
        std::process::exit(1);
    }
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
}
