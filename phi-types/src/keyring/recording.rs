//! Recording accesses: the records of one call (a load, an insert, an
//! update, a finder, a job's batch), built only when something takes them,
//! emitted on the `phi::access` tracing target and appended to the
//! keyring's [`AccessLog`] once per call.

use std::collections::HashSet;
use std::hash::BuildHasher as _;
use std::sync::Arc;

use chrono::NaiveDateTime;

use super::Keyring;
use crate::access::{
    AccessLog, AccessOp, AccessRecord, Accessor, JOB_PURPOSE, TRACING_TARGET, UNATTRIBUTED_PURPOSE,
};
use crate::error::{Error, Result};

/// A keyring's access-log settings.
#[derive(Clone, Default)]
pub(crate) struct AccessConfig {
    pub(crate) log: Option<Arc<dyn AccessLog>>,
    pub(crate) require_accessor: bool,
}

/// The records of one call, before they are emitted and appended.
pub(crate) struct AccessBatch {
    accessor: Accessor,
    op: AccessOp,
    table: String,
    fields: Vec<String>,
    occurred_at: NaiveDateTime,
    records: Vec<AccessRecord>,
    /// The hashes of the (owner, row) pairs recorded: a pair whose hash
    /// was seen is looked for among the records (no copy of each pair).
    seen: HashSet<u64>,
}

impl AccessBatch {
    /// One (owner, row) of the call, with the batch's fields. A pair
    /// already recorded by this call is not recorded again.
    pub(crate) fn add(&mut self, owner: &str, row: Option<String>) {
        let fields = self.fields.clone();
        self.add_with_fields(owner, row, fields);
    }

    /// One (owner, row) of the call, touching `fields`.
    pub(crate) fn add_with_fields(
        &mut self,
        owner: &str,
        row: Option<String>,
        fields: Vec<String>,
    ) {
        let hash = self.seen.hasher().hash_one((owner, row.as_deref()));
        if !self.seen.insert(hash)
            && self
                .records
                .iter()
                .any(|r| r.owner_id == owner && r.row == row)
        {
            return;
        }
        self.records.push(AccessRecord {
            occurred_at: self.occurred_at,
            accessor: self.accessor.clone(),
            op: self.op,
            owner_id: owner.to_owned(),
            table: self.table.clone(),
            row,
            fields,
        });
    }
}

/// A row key as recorded: its UTF-8 text, else `0x` and hex.
pub(crate) fn row_text(row: &[u8]) -> Option<String> {
    if row.is_empty() {
        return None;
    }
    Some(match std::str::from_utf8(row) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let mut out = String::with_capacity(2 + row.len() * 2);
            out.push_str("0x");
            for b in row {
                out.push_str(&format!("{b:02x}"));
            }
            out
        }
    })
}

impl Keyring {
    /// This keyring, with the typed reads and writes made through it
    /// recorded in the access log as `op` instead of their own operation:
    /// for an application's export (`AccessOp::Export`), whose loads are
    /// then recorded as exports. A cheap clone; the accessor, if any, is
    /// kept.
    #[must_use]
    pub fn for_operation(&self, op: AccessOp) -> Self {
        let mut keyring = self.clone();
        keyring.access_op = Some(op);
        keyring
    }

    /// The operation a typed call whose own operation is `own` is recorded
    /// as ([`for_operation`](Self::for_operation)).
    pub(crate) fn access_op(&self, own: AccessOp) -> AccessOp {
        self.access_op.unwrap_or(own)
    }

    /// Whether strict access logging is on
    /// ([`KeyringBuilder::require_accessor`](super::KeyringBuilder::require_accessor)).
    pub fn requires_accessor(&self) -> bool {
        self.inner.access.require_accessor
    }

    /// Starts the records of one call whose own operation is `own`, on
    /// `table`, touching `fields`. Refuses a call without an accessor in
    /// strict mode (a job never: it is recorded under the keyring's actor);
    /// `None` when nothing would take the records (no access log, tracing
    /// target off).
    ///
    /// # Errors
    /// [`Error::AccessorRequired`] naming the operation, table and
    /// `owner`.
    pub(crate) fn begin_access(
        &self,
        own: AccessOp,
        table: &str,
        fields: &[&str],
        owner: impl FnOnce() -> String,
    ) -> Result<Option<AccessBatch>> {
        self.begin_access_as(self.access_op(own), table, fields, owner)
    }

    /// [`begin_access`](Self::begin_access) as `op`, whatever
    /// [`for_operation`](Self::for_operation) says.
    pub(crate) fn begin_access_as(
        &self,
        op: AccessOp,
        table: &str,
        fields: &[&str],
        owner: impl FnOnce() -> String,
    ) -> Result<Option<AccessBatch>> {
        if self.accessor.is_none() && op != AccessOp::Job && self.inner.access.require_accessor {
            return Err(Error::AccessorRequired {
                operation: op.as_str(),
                table: table.to_owned(),
                owner: owner(),
            });
        }
        if self.inner.access.log.is_none()
            && !tracing::enabled!(target: TRACING_TARGET, tracing::Level::INFO)
        {
            return Ok(None);
        }
        let accessor = match &self.accessor {
            Some(accessor) => (**accessor).clone(),
            None if op == AccessOp::Job => Accessor::new(self.actor(), JOB_PURPOSE),
            None => Accessor::new(self.actor(), UNATTRIBUTED_PURPOSE),
        };
        Ok(Some(AccessBatch {
            accessor,
            op,
            table: table.to_owned(),
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            occurred_at: chrono::Utc::now().naive_utc(),
            records: Vec::new(),
            seen: HashSet::new(),
        }))
    }

    /// [`begin_access`](Self::begin_access) for one value of `scope`
    /// (`table.column`) and row, with its record added.
    pub(crate) fn begin_scoped_access(
        &self,
        own: AccessOp,
        owner: &str,
        scope: &str,
        row: &[u8],
    ) -> Result<Option<AccessBatch>> {
        let (table, column) = scope.rsplit_once('.').unwrap_or((scope, scope));
        let mut batch = self.begin_access(own, table, &[column], || owner.to_owned())?;
        if let Some(batch) = &mut batch {
            batch.add(owner, row_text(row));
        }
        Ok(batch)
    }

    /// Emits the records of a call on the tracing target and appends them
    /// to the access log, in one `append`.
    ///
    /// # Errors
    /// The log's error when it refuses them: the call must fail.
    pub(crate) fn finish_access(&self, batch: Option<AccessBatch>) -> Result<()> {
        let Some(batch) = batch else {
            return Ok(());
        };
        if batch.records.is_empty() {
            return Ok(());
        }
        if tracing::enabled!(target: TRACING_TARGET, tracing::Level::INFO) {
            for record in &batch.records {
                tracing::info!(
                    target: TRACING_TARGET,
                    user = record.accessor.user(),
                    purpose = record.accessor.purpose(),
                    request_id = record.accessor.request_id(),
                    op = record.op.as_str(),
                    owner = %self.owner_for_telemetry(&record.owner_id),
                    table = %record.table,
                    row = record.row.as_deref(),
                    fields = ?record.fields,
                    "access"
                );
            }
        }
        match &self.inner.access.log {
            Some(log) => log.append(batch.records),
            None => Ok(()),
        }
    }

    /// Records one batch of a job (backfill, verify, decrypt-back, re-seal,
    /// lookup re-index): `job` records of `table`'s `rows` (owner, row key),
    /// touching `fields`, under the keyring's accessor, else its actor.
    /// Never refused for want of an accessor.
    ///
    /// # Errors
    /// The access log's error when it refuses the records: the job stops.
    pub(crate) fn record_job<'r>(
        &self,
        table: &str,
        fields: &[&str],
        rows: impl IntoIterator<Item = (&'r str, Option<String>)>,
    ) -> Result<()> {
        let mut batch = self.begin_access_as(AccessOp::Job, table, fields, String::new)?;
        if let Some(batch) = &mut batch {
            for (owner, row) in rows {
                batch.add(owner, row);
            }
        }
        self.finish_access(batch)
    }

    /// Records accesses made outside phi's typed API, as phi records its
    /// own: `op` on `table`, touching `fields`, one record per (owner,
    /// row) of `rows`, under this keyring's accessor. For the application's
    /// deletes (see also `PhiRecord::record_delete`), exports it writes
    /// itself, or values opened through [`OwnerKeys`](super::OwnerKeys).
    ///
    /// # Errors
    /// [`Error::AccessorRequired`] in strict mode without an accessor; the
    /// access log's error when it refuses the records.
    pub fn record_access<'r>(
        &self,
        op: AccessOp,
        table: &str,
        fields: &[&str],
        rows: impl IntoIterator<Item = (&'r str, Option<&'r str>)>,
    ) -> Result<()> {
        let mut rows = rows.into_iter().peekable();
        let first = rows.peek().map(|(owner, _)| (*owner).to_owned());
        let mut batch = self.begin_access_as(op, table, fields, || first.unwrap_or_default())?;
        if let Some(batch) = &mut batch {
            for (owner, row) in rows {
                batch.add(owner, row.map(str::to_owned));
            }
        }
        self.finish_access(batch)
    }
}
