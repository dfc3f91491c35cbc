//! The access log: which person (the *accessor*) read or wrote which
//! owner's record, through which operation, touching which fields.
//!
//! The typed API records one [`AccessRecord`] per (accessor, operation,
//! owner, table, row) on a keyring seen [on behalf of](crate::Keyring) an
//! [`Accessor`], and hands the records to the keyring's [`AccessLog`].
//! Records name fields, never their values.

use std::fmt;
use std::sync::Arc;

use chrono::NaiveDateTime;

use crate::error::Result;

/// Who reads or writes PHI, and why: the end user behind a call, not the
/// process (the process is the keyring's actor). A clone (one per access
/// record) shares the text rather than copying it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Accessor {
    user: Arc<str>,
    purpose: Arc<str>,
    request_id: Option<Arc<str>>,
}

impl Accessor {
    /// An accessor: the end user's id (`"dr-smith"`, `"user:42"`) and the
    /// purpose of the access (`"treatment"`, `"billing"`, `"export"`).
    pub fn new(user: impl Into<String>, purpose: impl Into<String>) -> Self {
        Self {
            user: Arc::from(user.into()),
            purpose: Arc::from(purpose.into()),
            request_id: None,
        }
    }

    /// The same accessor, for one request (a request id of the caller's,
    /// so that the log can be joined with the application's own logs).
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(Arc::from(request_id.into()));
        self
    }

    /// The end user's id.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The purpose of the access.
    pub fn purpose(&self) -> &str {
        &self.purpose
    }

    /// The request id, when one was given.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }
}

impl fmt::Debug for Accessor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accessor")
            .field("user", &self.user)
            .field("purpose", &self.purpose)
            .field("request_id", &self.request_id)
            .finish()
    }
}

/// What an access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum AccessOp {
    /// Values opened by a load, `open`, `open_each` or a stream.
    Read,
    /// A row sealed for an insert.
    Insert,
    /// A row's fields sealed again for an update.
    Update,
    /// A row deleted (the application tells phi about it).
    Delete,
    /// Values opened for an export (CSV, a stream out of the application).
    Export,
    /// A blind-index or lookup-index finder run for the owner.
    Lookup,
    /// A job (backfill, verify, decrypt-back, re-seal, rotation) read or
    /// wrote the row.
    Job,
}

impl AccessOp {
    /// Every operation, in the order stored.
    pub const ALL: [Self; 7] = [
        Self::Read,
        Self::Insert,
        Self::Update,
        Self::Delete,
        Self::Export,
        Self::Lookup,
        Self::Job,
    ];

    /// The name stored in the log and shown by `phi audit access`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Export => "export",
            Self::Lookup => "lookup",
            Self::Job => "job",
        }
    }

    /// The operation a stored name stands for.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.as_str() == name)
    }
}

impl fmt::Display for AccessOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One access: one (accessor, operation, owner, table, row). Names the
/// fields touched, never their values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRecord {
    /// When it happened (UTC).
    pub occurred_at: NaiveDateTime,
    /// Who.
    pub accessor: Accessor,
    /// What.
    pub op: AccessOp,
    /// Whose record.
    pub owner_id: String,
    /// Which table.
    pub table: String,
    /// Which row: the row key's text (as the envelope binds it), when the
    /// model has one.
    pub row: Option<String>,
    /// The encrypted fields touched, by column name.
    pub fields: Vec<String>,
}

crate::shared::into_shared!(AccessLog);

/// Where a keyring's access records go.
///
/// [`append`](Self::append) is called on the path of every typed read and
/// write, so it must not wait on a database: queue and write in the
/// background. An implementation that is *fail-closed* returns an error
/// while records cannot be written, and the read or write that made them
/// fails with it.
pub trait AccessLog: Send + Sync + fmt::Debug {
    /// Takes `records` for writing.
    ///
    /// # Errors
    /// When the log refuses the records (fail-closed, and records cannot be
    /// written now): the access that made them must not go ahead.
    fn append(&self, records: Vec<AccessRecord>) -> Result<()>;

    /// Writes everything taken so far; returns once it is written or given
    /// up on.
    ///
    /// # Errors
    /// When records taken could not be written.
    fn flush(&self) -> Result<()>;

    /// The fill of the log's queue, if it has one, for
    /// [`Keyring::readiness`](crate::Keyring::readiness); `None` by default.
    fn queue_fill(&self) -> Option<QueueFill> {
        None
    }
}

/// The `tracing` target of the access events: one `INFO` event per
/// [`AccessRecord`], with the fields `user`, `purpose`, `request_id`, `op`,
/// `owner` (as [`KeyringBuilder::owner_ids_in_telemetry`](crate::KeyringBuilder::owner_ids_in_telemetry)
/// says), `table`, `row` and `fields` (the column names, never values).
/// Records are built only when the keyring has an [`AccessLog`] or this
/// target is enabled, and the events are emitted only when a subscriber
/// enables the target: cheap when nobody listens. When one does, each
/// record costs a formatted event (fifty for a load of fifty rows), so an
/// application that keeps the records in a durable log
/// ([`DieselAccessLog`](crate::access_log::DieselAccessLog)) may filter
/// the target out (`phi::access=warn`), as the clinic service does by
/// default.
pub const TRACING_TARGET: &str = "phi::access";

/// The purpose recorded for a typed access made on a keyring seen on
/// behalf of no one (allowed unless
/// [`KeyringBuilder::require_accessor`](crate::KeyringBuilder::require_accessor)):
/// the user is then the keyring's actor.
pub const UNATTRIBUTED_PURPOSE: &str = "unattributed";

/// The purpose recorded for a job's access (backfill, verify,
/// decrypt-back, re-seal, lookup re-index) made on behalf of no one: the
/// user is then the keyring's actor.
pub const JOB_PURPOSE: &str = "job";

/// An [`AccessLog`] in memory: for tests and examples. It keeps every
/// record appended, counts the calls to [`append`](AccessLog::append), and
/// can be made to refuse appends, as a fail-closed log that cannot write
/// does.
#[derive(Debug, Default)]
pub struct MemoryAccessLog {
    records: std::sync::Mutex<Vec<AccessRecord>>,
    appends: std::sync::atomic::AtomicU64,
    refusing: std::sync::atomic::AtomicBool,
}

impl MemoryAccessLog {
    /// An empty log that takes every record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record taken so far, in order.
    pub fn records(&self) -> Vec<AccessRecord> {
        self.lock().clone()
    }

    /// Every record taken so far, in order, leaving the log empty.
    pub fn take(&self) -> Vec<AccessRecord> {
        std::mem::take(&mut *self.lock())
    }

    /// How many times [`append`](AccessLog::append) was called (refused
    /// calls included).
    pub fn appends(&self) -> u64 {
        self.appends.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// While `refuse` is true, every append fails with
    /// [`Error::AccessLogUnavailable`](crate::Error::AccessLogUnavailable)
    /// and keeps nothing.
    pub fn refuse_appends(&self, refuse: bool) {
        self.refusing
            .store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<AccessRecord>> {
        // A panic while holding the lock leaves a consistent Vec.
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl AccessLog for MemoryAccessLog {
    fn append(&self, records: Vec<AccessRecord>) -> Result<()> {
        self.appends
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.refusing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(crate::Error::AccessLogUnavailable {
                reason: "the in-memory access log refuses appends".into(),
            });
        }
        self.lock().extend(records);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// A bounded writer queue's fill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "admin-http", derive(utoipa::ToSchema))]
#[non_exhaustive]
pub struct QueueFill {
    /// Records queued and not yet written.
    pub queued: u64,
    /// Records the queue holds at most.
    pub capacity: u64,
    /// Records dropped since the writer started.
    pub dropped: u64,
}

impl QueueFill {
    /// A queue holding `queued` of `capacity` records, `dropped` dropped.
    pub fn new(queued: u64, capacity: u64, dropped: u64) -> Self {
        QueueFill {
            queued,
            capacity,
            dropped,
        }
    }
}
