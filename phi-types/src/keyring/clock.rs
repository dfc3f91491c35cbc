//! Time sources for cache expiry.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the keyring reads the time for TTLs.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;

    /// The current time, UTC, for the ages of data keys (their
    /// `created_at`): the system's wall clock unless the clock says
    /// otherwise (a [`ManualClock`] moves it with its instant).
    fn utc_now(&self) -> chrono::NaiveDateTime {
        chrono::Utc::now().naive_utc()
    }
}

/// The system's monotonic clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to, for testing expiry.
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_utc: chrono::NaiveDateTime,
    offset: Mutex<Duration>,
}

impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> Self {
        ManualClock {
            start: Instant::now(),
            start_utc: chrono::Utc::now().naive_utc(),
            offset: Mutex::new(Duration::ZERO),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut offset = self.offset.lock().unwrap_or_else(|p| p.into_inner());
        *offset += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn utc_now(&self) -> chrono::NaiveDateTime {
        let offset = *self.offset.lock().unwrap_or_else(|p| p.into_inner());
        chrono::TimeDelta::from_std(offset)
            .ok()
            .and_then(|d| self.start_utc.checked_add_signed(d))
            .unwrap_or(chrono::NaiveDateTime::MAX)
    }
}
