//! The unwrap audit writer: audit records of cache fills, written in the
//! background so that a read never waits on (or writes to) the key store.
//!
//! A cache fill hands its `unwrap` records to a bounded queue and returns; a
//! thread of the keyring's own writes them through the key store (its own
//! connection pool) in batches. Records that do not fit in the queue, or
//! whose write fails, are counted and logged (owner ids and key versions
//! only), never retried forever. The queue is written out by
//! [`Keyring::flush_audit`](super::Keyring::flush_audit) and when the last
//! clone of the keyring is dropped.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::store::{AuditEvent, KeyStore};
use crate::telemetry::OwnerIdTelemetry;

/// Records per `append_audit` call.
const BATCH: usize = 1_000;
/// Owners and versions named in one log line about lost records.
const LOGGED: usize = 10;

/// The counters of the audit writer, for [`KeyringStats`](super::KeyringStats).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct AuditCounts {
    pub(super) written: u64,
    pub(super) pending: u64,
    pub(super) dropped: u64,
}

#[derive(Default)]
struct State {
    queue: VecDeque<AuditEvent>,
    /// Records accepted into the queue, ever.
    accepted: u64,
    /// Of those, the records written or given up on.
    finished: u64,
    written: u64,
    dropped: u64,
    /// Dropped records not yet reported by a flush, and the last reason.
    unreported: u64,
    reason: Option<String>,
    /// The keyring is gone: write what is queued, then stop.
    closing: bool,
    /// The writer thread has stopped.
    stopped: bool,
}

struct Shared {
    owners: OwnerIdTelemetry,
    state: Mutex<State>,
    /// Wakes the writer: records queued, a flush asked for, or closing.
    work: Condvar,
    /// Wakes flushes: records finished, or the writer stopped.
    progress: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes `unwrap` audit records on a thread of its own.
pub(super) struct AuditWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl AuditWriter {
    /// Starts the writer thread over `store`, queueing at most `capacity`
    /// records.
    /// Owner ids in its log events are written as `owners` says.
    pub(super) fn start(
        store: Arc<dyn KeyStore>,
        capacity: usize,
        owners: OwnerIdTelemetry,
    ) -> Result<Self> {
        let shared = Arc::new(Shared {
            owners,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            progress: Condvar::new(),
            capacity,
        });
        let thread = std::thread::Builder::new()
            .name("phi-audit".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared, &*store)
            })
            .map_err(|e| Error::Config(format!("cannot start the audit writer thread: {e}")))?;
        Ok(AuditWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `events` for writing; never waits for the key store. Records
    /// that do not fit are dropped, counted and logged.
    pub(super) fn push(&self, events: Vec<AuditEvent>) {
        if events.is_empty() {
            return;
        }
        let mut state = self.shared.lock();
        let room = if state.stopped {
            0
        } else {
            self.shared.capacity.saturating_sub(state.queue.len())
        };
        let mut events = events.into_iter();
        let taken = events.len().min(room);
        state.queue.extend(events.by_ref().take(taken));
        state.accepted += taken as u64;
        let lost: Vec<AuditEvent> = events.collect();
        if !lost.is_empty() {
            let reason = if state.stopped {
                "the audit writer has stopped".to_owned()
            } else {
                format!("the audit queue is full ({} records)", self.shared.capacity)
            };
            give_up(&mut state, &lost, reason, self.shared.owners);
        }
        drop(state);
        crate::metrics::audit_queued(taken as u64);
        if taken > 0 {
            self.shared.work.notify_one();
        }
    }

    /// Waits until every record queued before this call is written or given
    /// up on.
    ///
    /// # Errors
    /// [`Error::Store`] when records were dropped (queue full, failed
    /// write) since the last flush: how many, and the last reason.
    pub(super) fn flush(&self) -> Result<()> {
        let mut state = self.shared.lock();
        let target = state.accepted;
        self.shared.work.notify_one();
        while state.finished < target && !state.stopped {
            state = self
                .shared
                .progress
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let unreported = std::mem::take(&mut state.unreported);
        let reason = state.reason.take();
        if unreported == 0 {
            return Ok(());
        }
        Err(Error::store(
            "writing unwrap audit records",
            format!(
                "{unreported} record(s) could not be written: {}",
                reason.as_deref().unwrap_or("unknown reason")
            ),
        ))
    }

    /// The queue's fill, for [`Keyring::readiness`](crate::Keyring::readiness).
    pub(super) fn fill(&self) -> crate::QueueFill {
        let state = self.shared.lock();
        crate::QueueFill::new(
            state.accepted - state.finished,
            self.shared.capacity as u64,
            state.dropped,
        )
    }

    pub(super) fn counts(&self) -> AuditCounts {
        let state = self.shared.lock();
        AuditCounts {
            written: state.written,
            pending: state.accepted - state.finished,
            dropped: state.dropped,
        }
    }
}

impl Drop for AuditWriter {
    /// Writes out what is queued, then stops the thread.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the audit writer thread panicked");
        }
        let state = self.shared.lock();
        if state.unreported > 0 {
            tracing::warn!(
                records = state.unreported,
                reason = state.reason.as_deref().unwrap_or(""),
                "unwrap audit records could not be written before the keyring was dropped"
            );
        }
    }
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriter")
            .field("capacity", &self.shared.capacity)
            .field("counts", &self.counts())
            .finish()
    }
}

/// The writer thread: takes batches off the queue until closing and empty.
fn run(shared: &Shared, store: &dyn KeyStore) {
    /// Marks the writer stopped (also when a write panics), so that flushes
    /// and pushes never wait for it.
    struct Stopped<'a>(&'a Shared);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            let mut state = self.0.lock();
            state.stopped = true;
            let queued: Vec<AuditEvent> = state.queue.drain(..).collect();
            if !queued.is_empty() {
                state.finished += queued.len() as u64;
                crate::metrics::audit_finished(queued.len() as u64);
                give_up(
                    &mut state,
                    &queued,
                    "the audit writer stopped".into(),
                    self.0.owners,
                );
            }
            drop(state);
            self.0.progress.notify_all();
        }
    }
    let _stopped = Stopped(shared);
    loop {
        let batch: Vec<AuditEvent> = {
            let mut state = shared.lock();
            while state.queue.is_empty() && !state.closing {
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.queue.is_empty() {
                return;
            }
            let n = state.queue.len().min(BATCH);
            state.queue.drain(..n).collect()
        };
        let result = store.append_audit(&batch);
        let failed = result.is_err();
        let mut state = shared.lock();
        state.finished += batch.len() as u64;
        match result {
            Ok(()) => {
                state.written += batch.len() as u64;
                crate::metrics::audit_written(batch.len() as u64);
            }
            Err(error) => give_up(
                &mut state,
                &batch,
                crate::error::chain_text(&error),
                shared.owners,
            ),
        }
        // Closing after a failed write: the store is unlikely to take the
        // rest either, and each try could wait out a pool or busy timeout,
        // so the rest is given up (counted and logged by `Stopped`) rather
        // than holding the keyring's drop for minutes.
        let stop = failed && state.closing;
        drop(state);
        crate::metrics::audit_finished(batch.len() as u64);
        shared.progress.notify_all();
        if stop {
            return;
        }
    }
}

/// Counts and logs records that will not be written.
fn give_up(state: &mut State, lost: &[AuditEvent], reason: String, owners: OwnerIdTelemetry) {
    let n = lost.len() as u64;
    state.dropped += n;
    state.unreported += n;
    crate::metrics::audit_dropped(n);
    let named: Vec<String> = lost
        .iter()
        .take(LOGGED)
        .map(|e| match e.key_version {
            Some(v) => format!("{} v{v}", owners.render(&e.owner_id)),
            None => owners.render(&e.owner_id).to_string(),
        })
        .collect();
    tracing::warn!(
        records = n,
        keys = %named.join(", "),
        more = lost.len().saturating_sub(LOGGED),
        reason = %reason,
        "unwrap audit records could not be written"
    );
    state.reason = Some(reason);
}
