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
use phi_types::{DieselKeyStore, Keyring, LocalKek, lifecycle, metrics as names};

/// Every metric by name and labels (`name{k=v}`): counter and gauge values,
/// histogram sample counts.
#[derive(Debug, Default)]
struct Captured {
    values: Mutex<HashMap<String, Arc<Value>>>,
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
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
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
    let store = Arc::new(DieselKeyStore::<diesel::SqliteConnection>::connect(&url).expect("store"));
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
    assert_eq!(captured.get("phi_open_errors_total{kind=decrypt}"), 1);
    assert_eq!(
        captured.get(names::CACHE_MISSES_TOTAL),
        1,
        "one cold resolution"
    );
    assert!(
        captured.get(names::CACHE_HITS_TOTAL) >= 600,
        "every other lookup hit"
    );
    assert_eq!(captured.get(names::CACHE_OWNERS), 1);
    assert!(captured.get("phi_key_store_query_seconds{operation=load_keys}") >= 1);
    assert!(captured.get("phi_key_store_query_seconds{operation=insert_key}") >= 1);

    lifecycle::rotate(&keyring, "owner-1").expect("rotate");
    assert_eq!(captured.get(names::KEYS_ROTATED_TOTAL), 1);
    assert_eq!(
        captured.get(names::CACHE_OWNERS),
        0,
        "the rotated owner left the cache"
    );

    // Both versions unwrapped again: their audit records are written in
    // the background.
    keyring.keys_for_open("owner-1").expect("reload");
    keyring.flush_audit().expect("audit written");
    assert_eq!(captured.get(names::AUDIT_WRITTEN_TOTAL), 2);
    assert_eq!(captured.get(names::AUDIT_DROPPED_TOTAL), 0);
}
