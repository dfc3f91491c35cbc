//! Nothing secret in anything phi says. The clinic's whole life cycle
//! (demo, update, find, export, backfill, verify, rotate, re-seal, shred, and
//! the errors of a tampered value, an undecodable legacy value and a
//! shredded owner) runs with everything captured:
//!
//! - in process, on every backend enabled by cargo features, under a
//!   `tracing` subscriber that records every span and event at TRACE with
//!   all their fields, and a `metrics` recorder that records every metric's
//!   name, labels and description; error messages (`Display` and `Debug`)
//!   and the `Debug` of reports, sealed rows and models are captured too;
//! - as the built binaries (the clinic example and the `phi` CLI) on
//!   SQLite: their standard output and error, with `RUST_LOG=trace`.
//!
//! No patient value, master key or data key may appear in any of it, raw
//! or as hex (lower or upper case, with or without spaces), a Rust byte
//! list, or base64 (standard or URL-safe, at any alignment); no metric label
//! may carry an owner id.
//!
//! Left out on purpose: the clinic's `case get`, `case list` and the
//! command-less overview, whose job is to show patients, and the CSV file
//! `export` writes (its standard output is checked).
#![cfg(feature = "sqlite")]

mod common;

use common::clinic_bin;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

// ---------------------------------------------------------------------------
// Capture: a tracing subscriber and a metrics recorder that keep everything.

mod capture {
    use std::fmt::{self, Write as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, PoisonError};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::subscriber::Interest;
    use tracing::{Event, Subscriber};

    static TEXT: Mutex<String> = Mutex::new(String::new());
    /// Every metric label seen, as (metric, label key, label value).
    static LABELS: Mutex<Vec<(String, String, String)>> = Mutex::new(Vec::new());

    /// Appends `text` to the captured text.
    pub(crate) fn push(text: &str) {
        let mut all = TEXT.lock().unwrap_or_else(PoisonError::into_inner);
        all.push_str(text);
        all.push('\n');
    }

    /// Everything captured so far.
    pub(crate) fn text() -> String {
        TEXT.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every metric label captured so far.
    pub(crate) fn labels() -> Vec<(String, String, String)> {
        LABELS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs the subscriber and the recorder, once per process.
    pub(crate) fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::subscriber::set_global_default(Everything {
                next_span: AtomicU64::new(1),
            })
            .expect("no other subscriber");
            metrics::set_global_recorder(Everything {
                next_span: AtomicU64::new(1),
            })
            .expect("no other recorder");
        });
    }

    struct Everything {
        next_span: AtomicU64,
    }

    /// Writes every field as ` name=value`, by every representation the
    /// field offers.
    struct Fields(String);

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            let _ = write!(self.0, " {}={value} ({value:?})", field.name());
        }
        fn record_bytes(&mut self, field: &Field, value: &[u8]) {
            let _ = write!(
                self.0,
                " {}={} ({value:?})",
                field.name(),
                String::from_utf8_lossy(value)
            );
        }
        fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
            let _ = write!(self.0, " {}={value} ({value:?})", field.name());
            let mut source = value.source();
            while let Some(s) = source {
                let _ = write!(self.0, " caused by {s} ({s:?})");
                source = s.source();
            }
        }
    }

    impl Subscriber for Everything {
        fn register_callsite(&self, _: &'static tracing::Metadata<'static>) -> Interest {
            Interest::always()
        }
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
            Some(tracing::level_filters::LevelFilter::TRACE)
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            let meta = span.metadata();
            let mut fields = Fields(format!(
                "span {} {} {}:",
                meta.level(),
                meta.target(),
                meta.name()
            ));
            span.record(&mut fields);
            push(&fields.0);
            Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
        }
        fn record(&self, span: &Id, values: &Record<'_>) {
            let mut fields = Fields(format!("span {span:?} records:"));
            values.record(&mut fields);
            push(&fields.0);
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let meta = event.metadata();
            let mut fields = Fields(format!("event {} {}:", meta.level(), meta.target()));
            event.record(&mut fields);
            push(&fields.0);
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    impl Everything {
        fn key(&self, kind: &str, key: &Key) {
            let mut line = format!("metric {kind} {}", key.name());
            let mut labels = LABELS.lock().unwrap_or_else(PoisonError::into_inner);
            for label in key.labels() {
                let _ = write!(line, " {}={}", label.key(), label.value());
                labels.push((
                    key.name().to_owned(),
                    label.key().to_owned(),
                    label.value().to_owned(),
                ));
            }
            drop(labels);
            push(&line);
        }
    }

    impl metrics::Recorder for Everything {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            push(&format!("describe counter {key:?} {unit:?} {description}"));
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            push(&format!("describe gauge {key:?} {unit:?} {description}"));
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
            push(&format!(
                "describe histogram {key:?} {unit:?} {description}"
            ));
        }
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.key("counter", key);
            Counter::noop()
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.key("gauge", key);
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.key("histogram", key);
            Histogram::noop()
        }
    }
}

/// Captures `value`'s `Debug`, and returns it.
fn debug<T: std::fmt::Debug>(value: T) -> T {
    capture::push(&format!("{value:?}"));
    value
}

/// Captures an error's `Display`, `Debug` and sources.
fn error(e: &dyn std::error::Error) {
    capture::push(&format!("error: {e} ({e:?})"));
    let mut source = e.source();
    while let Some(s) = source {
        capture::push(&format!("caused by: {s} ({s:?})"));
        source = s.source();
    }
}

// ---------------------------------------------------------------------------
// Looking for secrets.

/// A secret and its name (for the failure message, never the value).
struct Secret {
    name: String,
    bytes: Vec<u8>,
}

impl Secret {
    fn new(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Secret {
        Secret {
            name: name.into(),
            bytes: bytes.into(),
        }
    }
}

/// The forms a secret could take in text, by encoding: (encoding, needle).
fn encodings(secret: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Vec<u8>)> = vec![("raw", secret.to_vec())];
    let hex = hex::encode(secret);
    let spaced = |h: &str| {
        h.as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    out.push(("spaced hex", spaced(&hex).into_bytes()));
    out.push(("spaced HEX", spaced(&hex.to_uppercase()).into_bytes()));
    out.push(("HEX", hex.to_uppercase().into_bytes()));
    out.push(("hex", hex.into_bytes()));
    // `{:?}` of a byte slice, without the brackets.
    let list = format!("{secret:?}");
    out.push(("byte list", list.as_bytes()[1..list.len() - 1].to_vec()));
    // base64 of the secret at each of the three alignments it can have in
    // a longer encoded text: the characters that only the secret's bits
    // decide.
    for (name, engine) in [
        ("base64", &STANDARD_NO_PAD),
        ("url-safe base64", &URL_SAFE_NO_PAD),
    ] {
        for pad in 0..3usize {
            let mut input = vec![0u8; pad];
            input.extend_from_slice(secret);
            let encoded = engine.encode(&input);
            let first = (8 * pad).div_ceil(6);
            let end = (8 * (pad + secret.len())) / 6;
            if end > first {
                out.push((name, encoded.as_bytes()[first..end].to_vec()));
            }
        }
    }
    out
}

/// Whether `needle` occurs in `hay`; a raw text needle must stand as a
/// word (not inside a longer word), so that a short name is not found
/// inside some other word.
fn occurs(hay: &[u8], needle: &[u8], word: bool) -> bool {
    if needle.is_empty() || needle.len() > hay.len() {
        return false;
    }
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b >= 0x80);
    (0..=hay.len() - needle.len()).any(|at| {
        hay[at..at + needle.len()] == *needle
            && (!word
                || (!alnum(at.checked_sub(1).and_then(|i| hay.get(i)))
                    && !alnum(hay.get(at + needle.len()))))
    })
}

/// Fails when any secret occurs in `text` (named `what`), in any encoding.
fn assert_no_secret(what: &str, text: &[u8], secrets: &[Secret]) {
    for secret in secrets {
        for (encoding, needle) in encodings(&secret.bytes) {
            // Encodings of very short values (a 4-byte date part, say) are
            // too short to mean anything; raw text is checked at any length.
            if encoding != "raw" && needle.len() < 8 {
                continue;
            }
            let word = encoding == "raw" && std::str::from_utf8(&secret.bytes).is_ok();
            assert!(
                !occurs(text, &needle, word),
                "{} appears ({encoding}) in {what}:\n{}",
                secret.name,
                String::from_utf8_lossy(text)
            );
        }
    }
}

#[test]
fn encodings_find_secrets_at_any_alignment() {
    let secret = b"Quistgaard".to_vec();
    let found = |text: String| {
        encodings(&secret)
            .iter()
            .any(|(e, n)| occurs(text.as_bytes(), n, *e == "raw"))
    };
    assert!(found("name=Quistgaard,".into()));
    assert!(!found("name=Quistgaarden".into()));
    assert!(found(format!("x{}", hex::encode_upper(&secret))));
    for prefix in [&b""[..], b"a", b"ab", b"abc"] {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&secret);
        input.extend_from_slice(b"tail");
        assert!(found(
            base64::engine::general_purpose::STANDARD.encode(&input)
        ));
        assert!(found(
            base64::engine::general_purpose::URL_SAFE.encode(&input)
        ));
    }
    assert!(found(format!("{:?}", secret.as_slice())));
    assert!(!found("nothing here".into()));
}

// ---------------------------------------------------------------------------
// In process, on every backend.

/// A master key of this run: random, so nothing can match it by accident.
fn master_key() -> phi::KeyBytes {
    phi::KeyBytes::generate().expect("random source")
}

/// The in-process life cycle, on one backend.
macro_rules! life_cycle {
    ($name:ident, $feature:literal, $conn:ty, $blob:literal, $index:literal, $url:expr) => {
        #[cfg(feature = $feature)]
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            type Conn = $conn;
            const BLOB: &str = $blob;
            /// The blind index column type.
            const INDEX: &str = $index;
            fn server_url() -> Option<String> {
                $url
            }
            include!("captured_output/life_cycle.rs");
        }
    };
}

life_cycle!(
    sqlite,
    "sqlite",
    diesel::SqliteConnection,
    "BLOB",
    "BLOB",
    None
);
life_cycle!(
    mysql,
    "mysql",
    diesel::MysqlConnection,
    "BLOB",
    "VARBINARY(16)",
    Some(
        std::env::var("PHI_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
    )
);
life_cycle!(
    postgres,
    "postgres",
    diesel::PgConnection,
    "BYTEA",
    "BYTEA",
    Some(
        std::env::var("PHI_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    )
);

/// With owner ids hashed or omitted (`KeyringBuilder::owner_ids_in_telemetry`),
/// no span or event names the owner in clear: a key generated, values
/// sealed and opened, a rotation, a fleet-wide cache clear, a shred and a
/// warm that fails for the shredded owner. A third owner under the default
/// setting shows that the same operations do write the owner id.
#[test]
fn owner_ids_hashed_or_omitted_stay_out_of_spans_and_logs() {
    use sha2::Digest as _;
    capture::install();
    // Owner ids of this test alone: other tests capture concurrently.
    let hashed = "tele-owner-5b1e0c";
    let omitted = "tele-owner-9d7a44";
    let plain = "tele-owner-c3f812";
    let hash = format!("sha256:{}", hex::encode(&sha2::Sha256::digest(hashed)[..8]));
    for (mode, owner) in [
        (phi::OwnerIdTelemetry::Hashed, hashed),
        (phi::OwnerIdTelemetry::Omitted, omitted),
        (phi::OwnerIdTelemetry::Plain, plain),
    ] {
        let kek = Arc::new(phi::LocalKek::new("telemetry", &master_key()));
        let keyring = phi::Keyring::builder(Arc::new(phi::MemoryKeyStore::new()), kek)
            .owner_ids_in_telemetry(mode)
            .build()
            .expect("keyring");
        let sealed = keyring
            .seal(&"x".to_owned(), owner, "t.c", b"r")
            .expect("seal");
        let _: String = keyring.open(sealed, owner, "t.c", b"r").expect("open");
        phi::lifecycle::rotate(&keyring, owner).expect("rotate");
        phi::lifecycle::clear_cache_fleet(&keyring, Some(owner)).expect("clear");
        phi::lifecycle::shred_keys_by(&keyring, owner, "test").expect("shred");
        let _ = keyring.warm_all();
        keyring.flush_audit().expect("audit written");
    }
    let text = capture::text();
    assert!(
        text.contains(&format!("owner={hash}")),
        "the hashed owner id was not captured:\n{text}"
    );
    assert!(text.contains("owner=<omitted>"), "{text}");
    assert!(
        text.contains(&format!("owner={plain}")),
        "the plain owner id was not captured:\n{text}"
    );
    for owner in [hashed, omitted] {
        assert!(
            !text.contains(owner),
            "owner id {owner} appears in the captured telemetry:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// The binaries, on SQLite.

/// The clinic's KEK in this test (not its default, so that the test does
/// not depend on it).
const CLINIC_KEK: &str = "captured-clinic";
const CLINIC_TABLES: &str =
    "cases:user_id:case_id:patient_first,patient_last,patient_dob,ins_provider";

/// A clinic database in a temporary directory, and every output so far.
struct Binaries {
    dir: tempfile::TempDir,
    master_b64: String,
    outputs: Vec<(String, Vec<u8>)>,
}

impl Binaries {
    fn run(&mut self, mut command: Command, name: &str, args: &[&str], master_b64: &str) -> Output {
        command
            .args(args)
            .current_dir(self.dir.path())
            .env("DATABASE_URL", "sqlite://clinic.db")
            .env("PHI_MASTER_KEY", master_b64)
            .env("RUST_LOG", "trace")
            .env("RUST_BACKTRACE", "0")
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_NEW_MASTER_KEY")
            .env_remove("PHI_OWNERS_QUERY")
            .stdin(Stdio::null());
        let out = command.output().expect("the binary runs");
        let what = format!("{name} {args:?}");
        self.outputs
            .push((format!("standard output of {what}"), out.stdout.clone()));
        self.outputs
            .push((format!("standard error of {what}"), out.stderr.clone()));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{what} panicked"
        );
        out
    }

    fn clinic_with(&mut self, args: &[&str], master_b64: &str) -> Output {
        let mut command = Command::new(clinic_bin());
        command
            .env("PHI_KEK", format!("local:{CLINIC_KEK}"))
            .env_remove("DATABASE_URL");
        self.run(command, "clinic", args, master_b64)
    }

    /// Runs the clinic; it must succeed. Its standard output.
    fn clinic(&mut self, args: &[&str]) -> String {
        let master = self.master_b64.clone();
        let out = self.clinic_with(args, &master);
        assert!(
            out.status.success(),
            "clinic {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn phi_with(&mut self, args: &[&str], master_b64: &str) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_phi"));
        command
            .env("PHI_KEK_ID", CLINIC_KEK)
            .env("PHI_TABLES", CLINIC_TABLES)
            .env_remove("PHI_KEK")
            .env_remove("PHI_ACTOR");
        self.run(command, "phi", args, master_b64)
    }

    /// Runs the `phi` CLI; it must succeed. Its standard output.
    fn phi(&mut self, args: &[&str]) -> String {
        let master = self.master_b64.clone();
        let out = self.phi_with(args, &master);
        assert!(
            out.status.success(),
            "phi {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn url(&self) -> String {
        self.dir.path().join("clinic.db").display().to_string()
    }

    fn keyring(&self, master: &phi::KeyBytes) -> (phi::Keyring, std::sync::Arc<phi::LocalKek>) {
        let kek = std::sync::Arc::new(phi::LocalKek::new(CLINIC_KEK, master));
        let store = std::sync::Arc::new(
            phi::DieselKeyStore::<diesel::SqliteConnection>::builder(&self.url())
                .run_migrations(true)
                .connect()
                .expect("store"),
        );
        let keyring = phi::Keyring::builder(store, kek.clone())
            .build()
            .expect("keyring");
        (keyring, kek)
    }
}

#[derive(diesel::QueryableByName)]
struct IdAndValue {
    #[diesel(sql_type = diesel::sql_types::Text)]
    case_id: String,
    #[diesel(sql_type = diesel::sql_types::Binary, column_name = patient_last)]
    value: Vec<u8>,
}

#[derive(diesel::QueryableByName)]
struct StoredCase {
    #[diesel(sql_type = diesel::sql_types::Text)]
    case_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    user_id: String,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    patient_first: Vec<u8>,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    patient_last: Vec<u8>,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    patient_dob: Vec<u8>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Binary>)]
    ins_provider: Option<Vec<u8>>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    phi_encrypted: bool,
}

/// Every patient value the clinic's database holds, decrypted, and every
/// data key, unwrapped.
fn clinic_secrets(b: &Binaries, master: &phi::KeyBytes) -> Vec<Secret> {
    use diesel::prelude::*;
    use phi::KeyEncryptionKey as _;
    let mut conn = diesel::SqliteConnection::establish(&b.url()).expect("database");
    let rows: Vec<StoredCase> = diesel::sql_query(
        "SELECT case_id, user_id, patient_first, patient_last, patient_dob, ins_provider, \
         phi_encrypted FROM cases",
    )
    .load(&mut conn)
    .expect("cases");
    let (keyring, kek) = b.keyring(master);
    let mut secrets = Vec::new();
    let mut owners = std::collections::BTreeSet::new();
    for row in rows {
        owners.insert(row.user_id.clone());
        for (column, bytes) in [
            ("patient_first", Some(row.patient_first)),
            ("patient_last", Some(row.patient_last)),
            ("patient_dob", Some(row.patient_dob)),
            ("ins_provider", row.ins_provider),
        ] {
            let Some(bytes) = bytes else { continue };
            let plain = if row.phi_encrypted {
                keyring
                    .open::<Vec<u8>>(
                        phi::Encrypted::from_bytes(bytes),
                        &row.user_id,
                        &format!("cases.{column}"),
                        row.case_id.as_bytes(),
                    )
                    .expect("opens")
            } else {
                bytes
            };
            secrets.push(Secret::new(format!("{column} of {}", row.case_id), plain));
        }
    }
    let owners: Vec<&str> = owners.iter().map(String::as_str).collect();
    for key in keyring.store().load_keys(&owners).expect("keys") {
        let dek = kek
            .unwrap(&key.owner_id, key.version, &key.wrapped_key)
            .expect("unwraps");
        secrets.push(Secret::new(
            format!("data key {} of {}", key.version, key.owner_id),
            dek.expose().to_vec(),
        ));
    }
    secrets
}

#[test]
fn the_binaries_print_no_secret() {
    let master = master_key();
    let master_b64 = base64::engine::general_purpose::STANDARD.encode(master.expose());
    let mut b = Binaries {
        dir: tempfile::tempdir().expect("temporary directory"),
        master_b64: master_b64.clone(),
        outputs: Vec::new(),
    };
    let mut secrets = vec![
        Secret::new("the master key", master.expose().to_vec()),
        Secret::new("the master key's base64", master_b64.clone().into_bytes()),
    ];
    // Values this test chooses, as well as the demo's made-up ones.
    let known = [
        "Wilhelmina",
        "Quistgaard-Ølund",
        "1953-04-27",
        "Zenith Mutual Health",
        "Featherstonehaugh",
        "Halcyon Assurance",
    ];
    secrets.extend(
        known
            .iter()
            .map(|v| Secret::new(format!("known value {v:?}"), *v)),
    );

    let out = b.clinic(&["demo", "--owners", "2", "--cases-per-owner", "3"]);
    assert!(out.contains("Stored 6 case(s)"), "{out}");
    let id = b
        .clinic(&[
            "case",
            "create",
            "--owner",
            "provider-001",
            "--first",
            "Wilhelmina",
            "--last",
            "Quistgaard-Ølund",
            "--dob",
            "1953-04-27",
            "--insurer",
            "Zenith Mutual Health",
            "--procedure",
            "27447",
            "--surgery-date",
            "2026-12-24",
        ])
        .trim()
        .to_owned();
    let out = b.clinic(&[
        "case",
        "find",
        "--owner",
        "provider-001",
        "--last",
        " quistgaard-ølund ",
        "--dob",
        "1953-04-27",
    ]);
    assert!(out.contains(&id), "{out}");
    b.clinic(&[
        "case",
        "update",
        &id,
        "--last",
        "Featherstonehaugh",
        "--insurer",
        "Halcyon Assurance",
    ]);
    let out = b.clinic(&[
        "case",
        "find",
        "--owner",
        "provider-001",
        "--last",
        "FEATHERSTONEHAUGH",
        "--dob",
        "1953-04-27",
    ]);
    assert!(out.contains(&id), "{out}");
    let out = b.clinic(&["export", "--owner", "provider-001", "--csv", "export.csv"]);
    assert!(out.contains("Exported"), "{out}");
    let csv = std::fs::read_to_string(b.dir.path().join("export.csv")).expect("export");
    assert!(
        csv.contains("Featherstonehaugh"),
        "the export holds the values"
    );
    b.clinic(&["seed-legacy", "--cases", "4", "--owners", "2"]);
    let out = b.clinic(&["backfill", "--batch", "2"]);
    assert!(out.contains("sealed"), "{out}");
    b.clinic(&["verify"]);
    b.clinic(&["digest"]);

    b.phi(&["keys", "status"]);
    b.phi(&["keys", "rotate", "--owner", "provider-001"]);
    b.phi(&[
        "keys",
        "reseal",
        "--owner",
        "provider-001",
        "--batch-size",
        "2",
    ]);
    b.phi(&["keys", "status", "--owner", "provider-001"]);
    b.phi(&[
        "keys",
        "retire",
        "--owner",
        "provider-001",
        "--version",
        "1",
    ]);

    // Every value and key there is, before the shred destroys some.
    secrets.extend(clinic_secrets(&b, &master));
    assert!(secrets.len() > 40, "{} secrets", secrets.len());

    // Errors: a tampered value, another master key.
    {
        use diesel::prelude::*;
        let mut conn = diesel::SqliteConnection::establish(&b.url()).expect("database");
        diesel::sql_query("UPDATE cases SET patient_first = X'F101000000020000' WHERE case_id = ?")
            .bind::<diesel::sql_types::Text, _>(&id)
            .execute(&mut conn)
            .expect("tamper");
        // And a changed tag on another case's last name.
        let (other, mut last): (String, Vec<u8>) = diesel::sql_query(
            "SELECT case_id, patient_last FROM cases WHERE case_id <> ? AND user_id = 'provider-001' \
             ORDER BY case_id LIMIT 1",
        )
        .bind::<diesel::sql_types::Text, _>(&id)
        .get_result::<IdAndValue>(&mut conn)
        .map(|r| (r.case_id, r.value))
        .expect("another case");
        let end = last.len() - 1;
        last[end] ^= 0x80;
        diesel::sql_query("UPDATE cases SET patient_last = ? WHERE case_id = ?")
            .bind::<diesel::sql_types::Binary, _>(&last)
            .bind::<diesel::sql_types::Text, _>(&other)
            .execute(&mut conn)
            .expect("tamper");
    }
    let out = b.clinic_with(&["verify"], &master_b64);
    assert!(!out.status.success());
    let out = b.clinic_with(&["digest"], &master_b64);
    assert!(!out.status.success());
    let wrong = base64::engine::general_purpose::STANDARD.encode([0x42u8; 32]);
    secrets.push(Secret::new(
        "the wrong master key",
        wrong.clone().into_bytes(),
    ));
    let out = b.clinic_with(
        &[
            "case",
            "find",
            "--owner",
            "provider-002",
            "--last",
            "x",
            "--dob",
            "1953-04-27",
        ],
        &wrong,
    );
    assert!(!out.status.success());
    let out = b.phi_with(&["keys", "reseal", "--owner", "provider-001"], &wrong);
    assert!(!out.status.success());

    let out = b.phi(&["keys", "shred", "--owner", "provider-002", "--yes"]);
    assert!(out.contains("verified"), "{out}");
    let out = b.clinic_with(
        &[
            "case",
            "create",
            "--owner",
            "provider-002",
            "--first",
            "Wilhelmina",
            "--last",
            "Quistgaard-Ølund",
            "--dob",
            "1953-04-27",
            "--procedure",
            "1",
            "--surgery-date",
            "2026-12-24",
        ],
        &master_b64,
    );
    assert!(!out.status.success(), "a shredded owner seals nothing");
    b.phi(&["audit", "--limit", "200"]);

    for (what, text) in &b.outputs {
        assert_no_secret(what, text, &secrets);
    }
}

/// `phi master-key`: generated and rebuilt keys go to files, never to the
/// output; shares go to files, and no report or error (damaged, too few,
/// mixed shares; a key that does not verify) shows a key or a share's
/// value, with `RUST_LOG=trace`.
#[test]
fn master_key_commands_print_no_secret() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("keys.db").display().to_string();
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut phi = |args: &[&str], expected: i32| {
        let out = Command::new(env!("CARGO_BIN_EXE_phi"))
            .args(args)
            .current_dir(dir.path())
            .env("DATABASE_URL", &db)
            .env("PHI_KEK_ID", "captured-master")
            .env("RUST_LOG", "trace")
            .env("RUST_BACKTRACE", "0")
            .env_remove("PHI_MASTER_KEY")
            .env_remove("PHI_MASTER_KEY_FILE")
            .env_remove("PHI_KEK")
            .stdin(Stdio::null())
            .output()
            .expect("phi runs");
        let what = format!("phi {args:?}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("panicked"),
            "{what} panicked"
        );
        assert_eq!(
            out.status.code(),
            Some(expected),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push((format!("standard output of {what}"), out.stdout));
        outputs.push((format!("standard error of {what}"), out.stderr));
    };
    phi(&["master-key", "generate", "--out", "master.key"], 0);
    phi(&["master-key", "generate", "--out", "master.key"], 3);
    phi(&["master-key", "generate", "--out", "other.key"], 0);
    let key_of =
        |name: &str| phi::master_key::read_key_file(&dir.path().join(name)).expect("a key file");
    let (master, other) = (key_of("master.key"), key_of("other.key"));
    // The database knows master.key as KEK captured-master.
    let store = Arc::new(
        phi::DieselKeyStore::<diesel::SqliteConnection>::builder(&db)
            .run_migrations(true)
            .connect()
            .expect("store"),
    );
    phi::Keyring::builder(
        store,
        Arc::new(phi::LocalKek::new("captured-master", &master)),
    )
    .build()
    .expect("keyring");

    for (key, out_dir) in [("master.key", "a"), ("other.key", "b")] {
        phi(
            &[
                "master-key",
                "split",
                "--shares",
                "5",
                "--threshold",
                "3",
                "--key-file",
                key,
                "--out-dir",
                out_dir,
            ],
            0,
        );
    }
    let shares = |out_dir: &str| -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(dir.path().join(out_dir))
            .expect("shares")
            .map(|e| {
                format!(
                    "{out_dir}/{}",
                    e.expect("entry").file_name().to_string_lossy()
                )
            })
            .collect();
        files.sort();
        files
    };
    let (a, b) = (shares("a"), shares("b"));
    let mut secrets = vec![
        Secret::new("the master key", master.expose().to_vec()),
        Secret::new(
            "the master key's base64",
            phi::master_key::encode(&master).trim().as_bytes().to_vec(),
        ),
        Secret::new("the other key", other.expose().to_vec()),
    ];
    for file in a.iter().chain(&b) {
        let text = std::fs::read_to_string(dir.path().join(file)).expect("share file");
        let line = text
            .lines()
            .find(|l| l.starts_with("phi-share-v1:"))
            .expect("a share");
        let value = hex::decode(line.split(':').nth(6).expect("value")).expect("hex");
        secrets.push(Secret::new(format!("the value of {file}"), value));
        secrets.push(Secret::new(
            format!("the text of {file}"),
            line.as_bytes().to_vec(),
        ));
    }
    // A damaged copy of a share.
    let first = std::fs::read_to_string(dir.path().join(&a[0])).expect("share");
    let damaged = first.replace(":3:5:1:", ":3:5:2:");
    std::fs::write(dir.path().join("damaged.txt"), damaged).expect("write");

    phi(
        &[
            "master-key",
            "combine",
            "--out",
            "rebuilt.key",
            &a[0],
            &a[2],
            &a[4],
        ],
        0,
    );
    assert_eq!(key_of("rebuilt.key").expose(), master.expose());
    phi(
        &["master-key", "combine", "--out", "x.key", &a[0], &a[2]],
        1,
    );
    phi(
        &[
            "master-key",
            "combine",
            "--out",
            "x.key",
            &a[0],
            &b[1],
            &a[2],
        ],
        1,
    );
    phi(
        &[
            "master-key",
            "combine",
            "--out",
            "x.key",
            "damaged.txt",
            &a[1],
            &a[2],
        ],
        1,
    );
    phi(
        &[
            "master-key",
            "combine",
            "--out",
            "x.key",
            &a[1],
            &a[1],
            &a[2],
        ],
        1,
    );
    phi(&["master-key", "verify", "--key-file", "master.key"], 0);
    phi(&["master-key", "verify", "--key-file", "other.key"], 4);
    phi(
        &["master-key", "verify", "--shares", &a[1], &a[3], &a[4]],
        0,
    );
    phi(
        &["master-key", "verify", "--shares", &b[0], &b[1], &b[2]],
        4,
    );
    phi(
        &[
            "master-key",
            "verify",
            "--format",
            "json",
            "--shares",
            &b[0],
            &b[1],
            &b[2],
        ],
        4,
    );
    phi(
        &[
            "master-key",
            "verify",
            "--kek-id",
            "unknown",
            "--key-file",
            "other.key",
        ],
        4,
    );
    phi(&["master-key", "verify", "--key-file", "damaged.txt"], 1);

    assert!(!dir.path().join("x.key").exists());
    for (what, text) in &outputs {
        assert_no_secret(what, text, &secrets);
    }
}
