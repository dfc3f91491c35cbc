//! Following the key-event feed is the default over a store that has one,
//! and the default follower's thread ends with its keyring: dropping never
//! waits for it, and no thread is left behind (on a SQLite database of the
//! test's own; Linux, where a thread's name is in `/proc`).
#![cfg(all(feature = "sqlite", target_os = "linux"))]

use std::sync::Arc;
use std::time::{Duration, Instant};

use phi_types::{DieselKeyStore, KeyBytes, Keyring, LocalKek, MemoryKeyStore};

/// Threads of this process named `phi-feed`.
fn feed_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "phi-feed")
        .count()
}

/// Waits (up to 10 s) until `n` threads are named `phi-feed`: a thread
/// names itself once it runs. Returns how many there are.
fn feed_threads_reach(n: usize) -> usize {
    let until = Instant::now() + Duration::from_secs(10);
    while feed_threads() != n && Instant::now() < until {
        std::thread::yield_now();
    }
    feed_threads()
}

#[test]
fn default_followers_start_one_thread_each_and_leave_none_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = dir.path().join("feed.db").display().to_string();
    let store = Arc::new(
        DieselKeyStore::<diesel::SqliteConnection>::builder(&url)
            .run_migrations(true)
            .connect()
            .expect("store"),
    );
    let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));

    // A memory store has no shared feed: no thread, as before.
    let memory = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek.clone())
        .build()
        .expect("keyring");
    assert!(memory.feed_status().is_none());
    assert_eq!(feed_threads(), 0);

    let keyrings: Vec<Keyring> = (0..8)
        .map(|_| {
            Keyring::builder(store.clone(), kek.clone())
                .build()
                .expect("keyring")
        })
        .collect();
    assert!(
        keyrings.iter().all(|k| k.feed_status().is_some()),
        "each follows by default"
    );
    assert_eq!(feed_threads_reach(8), 8);
    let opted_out = Keyring::builder(store.clone(), kek.clone())
        .without_feed()
        .build()
        .expect("keyring");
    assert!(opted_out.feed_status().is_none());
    assert_eq!(feed_threads(), 8, "without_feed starts no thread");

    // Dropping returns at once (the interval is 2 s: a drop that waited
    // for the thread's next read would take that long) ...
    let dropping = Instant::now();
    drop(keyrings);
    assert!(
        dropping.elapsed() < Duration::from_secs(1),
        "{:?}",
        dropping.elapsed()
    );
    // ... and every thread ends.
    assert_eq!(
        feed_threads_reach(0),
        0,
        "no follower thread is left behind"
    );
}
