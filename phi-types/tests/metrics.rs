//! The metrics phi records, seen through a recorder of the test's own (one
//! per process, hence one test in this binary).
#![cfg(feature = "sqlite")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use phi_types::{
    DieselKeyStore, KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord as _, lifecycle,
    metrics as names,
};

/// Every metric by name and labels (`name{k=v}`): counter and gauge values,
/// histogram sample counts; and every description, by name: kind and unit.
#[derive(Debug, Default)]
struct Captured {
    values: Mutex<HashMap<String, Arc<Value>>>,
    described: Mutex<HashMap<String, (&'static str, Option<Unit>)>>,
}

#[derive(Debug, Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::SeqCst);
    }
    fn absolute(&self, n: u64) {
        self.0.store(n, Ordering::SeqCst);
    }
}

impl GaugeFn for Value {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn set(&self, v: f64) {
        self.0.store(v as u64, Ordering::SeqCst);
    }
}

impl HistogramFn for Value {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Captured {
    fn slot(&self, key: &Key) -> Arc<Value> {
        let mut name = key.name().to_owned();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        if !labels.is_empty() {
            name = format!("{name}{{{}}}", labels.join(","));
        }
        self.values
            .lock()
            .expect("lock")
            .entry(name)
            .or_default()
            .clone()
    }

    fn describe(&self, key: KeyName, kind: &'static str, unit: Option<Unit>) {
        self.described
            .lock()
            .expect("lock")
            .insert(key.as_str().to_owned(), (kind, unit));
    }

    fn described(&self, name: &str) -> Option<(&'static str, Option<Unit>)> {
        self.described.lock().expect("lock").get(name).copied()
    }

    /// Every metric name recorded, without labels.
    fn names(&self) -> Vec<String> {
        self.values
            .lock()
            .expect("lock")
            .keys()
            .map(|k| k.split('{').next().unwrap_or(k).to_owned())
            .collect()
    }

    /// Every label key recorded.
    fn label_keys(&self) -> Vec<String> {
        self.values
            .lock()
            .expect("lock")
            .keys()
            .filter_map(|k| k.split_once('{'))
            .flat_map(|(_, labels)| {
                labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn get(&self, name: &str) -> u64 {
        self.values
            .lock()
            .expect("lock")
            .get(name)
            .map_or(0, |v| v.0.load(Ordering::SeqCst))
    }
}

struct Shared(Arc<Captured>);

impl Recorder for Shared {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.0.describe(key, "counter", unit);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.0.describe(key, "gauge", unit);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
        self.0.describe(key, "histogram", unit);
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.slot(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.slot(key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.0.slot(key))
    }
}

#[test]
fn seal_open_cache_key_store_and_life_cycle_metrics() {
    let captured = Arc::new(Captured::default());
    metrics::set_global_recorder(Shared(captured.clone())).expect("first recorder");

    let dir = tempfile::tempdir().expect("temporary directory");
    let url = dir.path().join("metrics.db").display().to_string();
    let store = Arc::new(
        DieselKeyStore::<diesel::SqliteConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("store"),
    );
    let kek = LocalKek::from_base64("local-1", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        .expect("kek");
    let keyring = Keyring::builder(store, Arc::new(kek))
        .build()
        .expect("keyring");

    let mut sealed = Vec::new();
    for i in 0..300 {
        sealed.push(
            keyring
                .seal(&format!("value {i}"), "owner-1", "t.c", b"r")
                .expect("seal"),
        );
    }
    // Handed over in blocks of 256 until flushed.
    assert_eq!(captured.get(names::SEAL_TOTAL), 256);
    for value in &sealed {
        let _: String = keyring
            .open(value.clone(), "owner-1", "t.c", b"r")
            .expect("open");
    }
    let err = keyring.open(sealed[0].clone(), "owner-1", "t.other", b"r");
    assert!(err.is_err());
    names::flush();
    assert_eq!(captured.get(names::SEAL_TOTAL), 300);
    assert_eq!(captured.get(names::OPEN_TOTAL), 300);
    assert_eq!(captured.get("phi_open_errors_total{outcome=decrypt}"), 1);
    assert_eq!(
        captured.get(names::CACHE_MISSES_TOTAL),
        1,
        "one cold resolution"
    );
    assert!(
        captured.get(names::CACHE_HITS_TOTAL) >= 600,
        "every other lookup hit"
    );
    assert_eq!(captured.get("phi_cache_owners{keyring=default}"), 1);
    assert!(captured.get("phi_key_store_query_duration_seconds{operation=load_keys}") >= 1);
    assert!(captured.get("phi_key_store_query_duration_seconds{operation=insert_key}") >= 1);

    lifecycle::rotate(&keyring, "owner-1").expect("rotate");
    assert_eq!(captured.get(names::KEYS_ROTATED_TOTAL), 1);
    assert_eq!(
        captured.get("phi_cache_owners{keyring=default}"),
        0,
        "the rotated owner left the cache"
    );

    // Both versions unwrapped again: their audit records are written in
    // the background.
    keyring.keys_for_open("owner-1").expect("reload");
    keyring.flush_audit().expect("audit written");
    assert_eq!(captured.get(names::AUDIT_WRITTEN_TOTAL), 2);
    assert_eq!(captured.get(names::AUDIT_DROPPED_TOTAL), 0);

    // Two keyrings in one process, each with its own cache gauge.
    let named = |name: &str| {
        Keyring::builder(
            Arc::new(MemoryKeyStore::new()),
            Arc::new(LocalKek::new(name, &KeyBytes::new([7; 32]))),
        )
        .name(name)
        .build()
        .expect("keyring")
    };
    let clinic = named("clinic");
    let billing = named("billing");
    for owner in ["owner-a", "owner-b"] {
        clinic.keys_for_seal(owner).expect("keys");
    }
    billing.keys_for_seal("owner-c").expect("keys");
    assert_eq!(captured.get("phi_cache_owners{keyring=clinic}"), 2);
    assert_eq!(captured.get("phi_cache_owners{keyring=billing}"), 1);
    billing.clear_all();
    assert_eq!(captured.get("phi_cache_owners{keyring=billing}"), 0);
    assert_eq!(
        captured.get("phi_cache_owners{keyring=clinic}"),
        2,
        "another keyring's clear leaves this one's gauge alone"
    );
    assert!(
        Keyring::builder(
            Arc::new(MemoryKeyStore::new()),
            Arc::new(LocalKek::new("x", &KeyBytes::new([7; 32])))
        )
        .name("")
        .build()
        .is_err(),
        "an empty keyring name is refused"
    );

    // Seal and open durations, once per batch of records.
    let rows: Vec<Note> = (0..3)
        .map(|i| Note {
            id: i,
            owner: "owner-a".into(),
            text: format!("note {i}"),
        })
        .collect();
    let sealed = Note::seal_all(&rows, &clinic).expect("seal_all");
    assert_eq!(captured.get(names::SEAL_DURATION_SECONDS), 1);
    let opened = Note::open_all(sealed, &clinic).expect("open_all");
    assert!(opened == rows, "the notes open as sealed");
    assert_eq!(captured.get(names::OPEN_DURATION_SECONDS), 1);

    // Every metric recorded is described, durations in seconds; only the
    // shared label vocabulary is used.
    for name in captured.names() {
        let (kind, unit) = captured
            .described(&name)
            .unwrap_or_else(|| panic!("{name} is not described"));
        if name.ends_with("_seconds") {
            assert_eq!(unit, Some(Unit::Seconds), "{name}");
        } else if name.ends_with("_total") {
            assert_eq!((kind, unit), ("counter", Some(Unit::Count)), "{name}");
        }
    }
    for key in captured.label_keys() {
        assert!(
            ["operation", "outcome", "keyring", "table"].contains(&key.as_str()),
            "label {key} is outside the vocabulary"
        );
    }
    for name in [
        names::KEY_STORE_QUERY_DURATION_SECONDS,
        names::KMS_CALL_DURATION_SECONDS,
        names::SEAL_DURATION_SECONDS,
        names::OPEN_DURATION_SECONDS,
    ] {
        assert_eq!(
            captured.described(name),
            Some(("histogram", Some(Unit::Seconds))),
            "{name}"
        );
    }
}

mod schema {
    #![allow(missing_docs)]
    diesel::table! {
        notes (id) {
            id -> Integer,
            owner -> Text,
            text -> Binary,
        }
    }
}
use schema::notes;

/// A model of this test's own, sealed and opened in memory only.
#[derive(phi_types::PhiRecord, Clone, PartialEq)]
#[phi(table = notes)]
struct Note {
    id: i32,
    #[phi(owner)]
    owner: String,
    #[phi(encrypt)]
    text: String,
}
