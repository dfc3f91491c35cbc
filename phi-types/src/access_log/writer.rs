//! The access log's writer thread: a bounded queue, written in batches.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{AccessLogCounts, AccessLogStore, ChainKey, DROPPED_TOTAL, WRITTEN_TOTAL};
use crate::access::AccessRecord;
use crate::error::{Error, Result};

pub(super) struct Config {
    pub(super) store: Arc<dyn AccessLogStore>,
    pub(super) key: ChainKey,
    pub(super) chain: String,
    pub(super) capacity: usize,
    pub(super) batch: usize,
    pub(super) linger: Duration,
    pub(super) fail_closed: bool,
    pub(super) retry: Duration,
}

#[derive(Default)]
struct State {
    queue: VecDeque<AccessRecord>,
    /// Records accepted into the queue, ever.
    accepted: u64,
    /// Of those, the records written or given up on.
    finished: u64,
    written: u64,
    dropped: u64,
    /// Dropped records not yet reported by a flush, and the last reason.
    unreported: u64,
    reason: Option<String>,
    /// Failed write attempts, ever.
    failures: u64,
    /// The last write attempt failed, with this error.
    failing: Option<String>,
    closing: bool,
    stopped: bool,
    /// The writer waits for a first record (on `work`): an append wakes it.
    idle: bool,
    /// The writer waits for a batch to fill (on `work`, at most the
    /// linger time): an append that fills the batch wakes it.
    lingering: bool,
    /// Calls of `flush` waiting: the writer does not linger meanwhile.
    flushing: usize,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    progress: Condvar,
    capacity: usize,
    batch: usize,
    fail_closed: bool,
    chain: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("capacity", &self.shared.capacity)
            .field("fail_closed", &self.shared.fail_closed)
            .field("counts", &self.counts())
            .finish()
    }
}

fn refused(reason: String) -> Error {
    Error::store(
        "writing the access log (fail-closed: the access is refused)",
        reason,
    )
}

impl Writer {
    pub(super) fn start(config: Config) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            progress: Condvar::new(),
            capacity: config.capacity,
            batch: config.batch,
            fail_closed: config.fail_closed,
            chain: config.chain.clone(),
        });
        let thread = std::thread::Builder::new()
            .name("phi-access-log".into())
            .spawn({
                let shared = shared.clone();
                move || run(&shared, config)
            })
            .map_err(|e| {
                Error::Config(format!("cannot start the access log writer thread: {e}"))
            })?;
        Ok(Writer {
            shared,
            thread: Some(thread),
        })
    }

    pub(super) fn push(&self, records: Vec<AccessRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut state = self.shared.lock();
        let room = if state.stopped {
            0
        } else {
            self.shared.capacity.saturating_sub(state.queue.len())
        };
        if self.shared.fail_closed {
            if state.stopped {
                return Err(refused("the access log writer has stopped".into()));
            }
            if let Some(error) = &state.failing {
                return Err(refused(format!(
                    "the last write of the access log failed: {error}"
                )));
            }
            if room < records.len() {
                return Err(refused(format!(
                    "the access log queue is full ({} records)",
                    self.shared.capacity
                )));
            }
        }
        let taken = records.len().min(room);
        let mut records = records.into_iter();
        state.queue.extend(records.by_ref().take(taken));
        state.accepted += taken as u64;
        let lost: Vec<AccessRecord> = records.collect();
        if !lost.is_empty() {
            let reason = if state.stopped {
                "the access log writer has stopped".to_owned()
            } else {
                format!(
                    "the access log queue is full ({} records)",
                    self.shared.capacity
                )
            };
            give_up(&mut state, &lost, reason, &self.shared.chain);
        }
        // Wake the writer only when it waits for this: most appends find
        // it writing or lingering, and make no system call.
        let wake = taken > 0
            && (state.idle || (state.lingering && state.queue.len() >= self.shared.batch));
        if wake {
            state.idle = false;
            state.lingering = false;
        }
        drop(state);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(())
    }

    pub(super) fn flush(&self) -> Result<()> {
        let mut state = self.shared.lock();
        let target = state.accepted;
        let failures = state.failures;
        state.flushing += 1;
        self.shared.work.notify_one();
        while state.finished < target && !state.stopped && state.failures == failures {
            state = self
                .shared
                .progress
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.flushing -= 1;
        if state.finished < target {
            let pending = state.accepted - state.finished;
            let reason = state
                .failing
                .clone()
                .unwrap_or_else(|| "the access log writer has stopped".into());
            return Err(Error::store(
                "writing the access log",
                format!("{pending} record(s) not written yet: {reason}"),
            ));
        }
        let unreported = std::mem::take(&mut state.unreported);
        let reason = state.reason.take();
        if unreported == 0 {
            return Ok(());
        }
        Err(Error::store(
            "writing the access log",
            format!(
                "{unreported} record(s) could not be written: {}",
                reason.as_deref().unwrap_or("unknown reason")
            ),
        ))
    }

    /// The queue's fill.
    pub(super) fn fill(&self) -> crate::access::QueueFill {
        let state = self.shared.lock();
        crate::access::QueueFill::new(
            state.accepted - state.finished,
            self.shared.capacity as u64,
            state.dropped,
        )
    }

    pub(super) fn counts(&self) -> AccessLogCounts {
        let state = self.shared.lock();
        AccessLogCounts {
            written: state.written,
            dropped: state.dropped,
            pending: state.accepted - state.finished,
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_all();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the access log writer thread panicked");
        }
        let state = self.shared.lock();
        if state.unreported > 0 {
            tracing::warn!(
                records = state.unreported,
                reason = state.reason.as_deref().unwrap_or(""),
                "access records could not be written before the access log was dropped"
            );
        }
    }
}

fn run(shared: &Shared, config: Config) {
    struct Stopped<'a>(&'a Shared);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            let mut state = self.0.lock();
            state.stopped = true;
            let queued: Vec<AccessRecord> = state.queue.drain(..).collect();
            if !queued.is_empty() {
                state.finished += queued.len() as u64;
                let reason = state
                    .failing
                    .clone()
                    .unwrap_or_else(|| "the access log writer stopped".into());
                give_up(&mut state, &queued, reason, &self.0.chain);
            }
            drop(state);
            self.0.progress.notify_all();
        }
    }
    let _stopped = Stopped(shared);
    loop {
        let batch: Vec<AccessRecord> = {
            let mut state = shared.lock();
            while state.queue.is_empty() && !state.closing {
                state.idle = true;
                state = shared
                    .work
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.idle = false;
            if state.queue.is_empty() {
                return;
            }
            // Linger for a fuller batch: one transaction (and, on SQLite,
            // one turn of the database's single writer lock) for many
            // appends rather than one each.
            let until = Instant::now() + config.linger;
            while state.queue.len() < config.batch && !state.closing && state.flushing == 0 {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                state.lingering = true;
                state = shared
                    .work
                    .wait_timeout(state, until - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            state.lingering = false;
            let n = state.queue.len().min(config.batch);
            state.queue.drain(..n).collect()
        };
        let result = config
            .store
            .append_batch(&config.chain, &config.key, super::now(), &batch);
        let mut state = shared.lock();
        match result {
            Ok(_) => {
                let n = batch.len() as u64;
                state.finished += n;
                state.written += n;
                state.failing = None;
                drop(state);
                metrics::counter!(WRITTEN_TOTAL).increment(n);
                shared.progress.notify_all();
            }
            Err(error) => {
                let text = crate::error::chain_text(&error);
                tracing::warn!(
                    chain = %config.chain,
                    records = batch.len(),
                    error = %text,
                    "writing a batch of the access log failed; it is tried again"
                );
                state.failures += 1;
                state.failing = Some(text);
                for record in batch.into_iter().rev() {
                    state.queue.push_front(record);
                }
                shared.progress.notify_all();
                if state.closing {
                    // Given up on by `Stopped`, counted and logged.
                    return;
                }
                let until = Instant::now() + config.retry;
                loop {
                    let now = Instant::now();
                    if state.closing || now >= until {
                        break;
                    }
                    state = shared
                        .work
                        .wait_timeout(state, until - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                // Closing: one last try below, then give up.
            }
        }
    }
}

fn give_up(state: &mut State, lost: &[AccessRecord], reason: String, chain: &str) {
    let n = lost.len() as u64;
    state.dropped += n;
    state.unreported += n;
    metrics::counter!(DROPPED_TOTAL).increment(n);
    tracing::warn!(
        chain = %chain,
        records = n,
        reason = %reason,
        "access records could not be written and are lost"
    );
    state.reason = Some(reason);
}
