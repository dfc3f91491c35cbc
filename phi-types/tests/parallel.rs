//! Where `seal_all` and `open_all` run: a keyring built with
//! `parallel_min_rows(usize::MAX)` keeps every batch on the calling thread;
//! by default a large batch goes to the thread pool and comes back in order.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use phi_types::{DecodeError, KeyBytes, Keyring, LocalKek, MemoryKeyStore, PhiRecord, PhiValue};

mod schema {
    #![allow(missing_docs)]
    diesel::table! {
        probes (id) {
            id -> BigInt,
            owner -> Text,
            value -> Binary,
        }
    }
}
use schema::probes;

/// Threads that encoded or decoded a `Probe`.
static SEEN: Mutex<Vec<ThreadId>> = Mutex::new(Vec::new());

fn seen() {
    SEEN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(std::thread::current().id());
}

fn take_seen() -> HashSet<ThreadId> {
    SEEN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .drain(..)
        .collect()
}

/// A text value that records the thread sealing or opening it.
#[derive(Clone, Debug, PartialEq)]
struct Probe(String);

impl PhiValue for Probe {
    fn encode(&self, out: &mut Vec<u8>) {
        seen();
        out.extend_from_slice(self.0.as_bytes());
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn decode(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        seen();
        String::decode(bytes).map(Probe)
    }
}

#[derive(PhiRecord, Clone, PartialEq)]
#[phi(table = probes)]
struct ProbeRow {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    owner: String,
    #[phi(encrypt)]
    value: Probe,
}

fn keyring(parallel_min_rows: Option<usize>) -> Keyring {
    let kek = LocalKek::new("local-1", &KeyBytes::new([0x42; 32]));
    let mut builder = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek));
    if let Some(rows) = parallel_min_rows {
        builder = builder.parallel_min_rows(rows);
    }
    builder.build().expect("keyring")
}

fn rows(n: usize) -> Vec<ProbeRow> {
    (0..n)
        .map(|i| ProbeRow {
            id: i64::try_from(i).expect("small"),
            owner: format!("owner-{}", i % 7),
            value: Probe(format!("value {i}")),
        })
        .collect()
}

// One test, so the probes of one case are not mixed with another's.
#[test]
fn the_switch_keeps_batches_on_the_calling_thread_and_the_pool_keeps_order() {
    let records = rows(3_000);

    let single = keyring(Some(usize::MAX));
    assert_eq!(single.parallel_min_rows(), usize::MAX);
    take_seen();
    let sealed = ProbeRow::seal_all(&records, &single).expect("seal");
    let opened = ProbeRow::open_all(sealed, &single).expect("open");
    assert!(opened == records, "round trip in order");
    let me = std::thread::current().id();
    assert_eq!(
        take_seen(),
        HashSet::from([me]),
        "only the calling thread worked"
    );

    let pooled = keyring(None);
    assert_eq!(
        pooled.parallel_min_rows(),
        phi_types::record::PARALLEL_MIN_ROWS
    );
    let sealed = ProbeRow::seal_all(&records, &pooled).expect("seal");
    assert!(
        sealed.iter().map(|s| s.id).eq(records.iter().map(|r| r.id)),
        "sealed in input order"
    );
    let opened = ProbeRow::open_all(sealed, &pooled).expect("open");
    assert!(opened == records, "opened in input order");
    // The batch went to the pool: the calling thread, outside it, waited.
    assert!(!take_seen().contains(&me), "the pool sealed and opened");

    // Below the threshold, the calling thread again.
    let small = rows(phi_types::record::PARALLEL_MIN_ROWS - 1);
    let sealed = ProbeRow::seal_all(&small, &pooled).expect("seal");
    let opened = ProbeRow::open_all(sealed, &pooled).expect("open");
    assert!(opened == small);
    assert_eq!(take_seen(), HashSet::from([me]));
}
