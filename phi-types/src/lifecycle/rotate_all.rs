//! Rotation of many owners at once, by several workers: every owner, the
//! owners due, an owners query or a list, each given a new data key
//! version, its values re-sealed under it, a sample verified, and its
//! older versions retired.
//!
//! The work is shared through the key store's `phi_rotation_claims`: a
//! job (a name) lists its owners; each worker claims a batch of pending
//! owners for a while ([`RotateAllOptions::claim_ttl`]) and works on the
//! batch as a whole: the new versions of its owners are created in one
//! key-store transaction (with their `rotate` audit records and feed
//! events, and recorded in the claims), their rows are re-sealed
//! set-based across the batch (one locked read and one `UPDATE` per
//! batch of rows), a sample is opened, the values left under each older
//! version are counted from the envelope headers, and the older versions
//! are retired in one transaction (with their `retire` records and
//! events). Then the owners are marked done.
//!
//! A worker killed at any point loses nothing: its claims expire and
//! another worker (or a rerun) takes the owners again. An owner whose new
//! version was already created is not rotated twice (the claim records
//! the version, in the transaction that created it), its values are found
//! by the version in their envelope header, and an older version is
//! retired only when no value uses it, so no value is ever left under a
//! retired version by the job, and none under a missing one (nothing is
//! destroyed). A rerun of the same job skips the owners done.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use zeroize::Zeroizing;

pub use crate::store::claims::{
    MAX_JOB_ID_LEN, NewKeyVersion, RotationClaim, RotationCounts, check_job_id,
    skip_locked_supported,
};

use super::tables::{DataConnection, MigrationRow, ResealTable, Resealed, SqlValue};
use super::{DEFAULT_BATCH_SIZE, event_by, is_shredded, kek_error};
use crate::envelope::{MAGIC, VERSION_V1};
use crate::error::{Error, Result};
use crate::feed::{KeyEvent, KeyEventKind};
use crate::keyring::{Keyring, OwnerKeys};
use crate::metrics;
use crate::sql::Encrypted;
use crate::store::claims::claim_end;
use crate::store::{AuditAction, KeyState, StoredKey};

/// Which owners [`rotate_all`] rotates.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RotateOwners {
    /// Every owner with a data key. phi's own keys (`phi:…`) are left out:
    /// the lookup key, which keys the lookup indexes of every owner's rows,
    /// is rotated and its indexes rewritten by
    /// [`lookup::rotate`](crate::lookup::rotate), to run beside an
    /// emergency rotation of every owner (`phi keys rotate --all` runs both).
    All,
    /// The owners due under the keyring's rotation policy
    /// ([`due_owner_ids`](super::due_owner_ids)).
    Due,
    /// The owners an application query returns, run read-only as every
    /// owners query is ([`KeyStore::owners_from_query`](crate::KeyStore::owners_from_query)).
    Query(String),
    /// These owners.
    List(Vec<String>),
}

impl RotateOwners {
    /// The owners, sorted, each once.
    ///
    /// # Errors
    /// Key store errors, a failing owners query, an owner id the keyring
    /// refuses, or [`due_owner_ids`](super::due_owner_ids)'s errors.
    pub fn resolve(&self, keyring: &Keyring) -> Result<Vec<String>> {
        let mut owners = match self {
            RotateOwners::All => keyring
                .store()
                .owners()?
                .into_iter()
                .filter(|o| !o.starts_with(crate::keyring::RESERVED_OWNER_PREFIX))
                .collect(),
            RotateOwners::Due => super::due_owner_ids(keyring)?,
            RotateOwners::Query(sql) => keyring.store().owners_from_query(sql)?,
            RotateOwners::List(list) => {
                for owner in list {
                    keyring.check_owner_id_or_reserved(owner)?;
                }
                list.clone()
            }
        };
        owners.sort_unstable();
        owners.dedup();
        Ok(owners)
    }
}

/// How [`rotate_all`] works: the job it belongs to, this worker's name,
/// batch sizes and the claims' lifetime.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RotateAllOptions<'a> {
    /// The job: every worker of one rotation uses the same id, and a rerun
    /// with it skips the owners done (letters, digits, `-`, `_`, `.`, `:`;
    /// at most [`MAX_JOB_ID_LEN`] bytes).
    pub job: String,
    /// This worker's name in the claims (default `host:pid`).
    pub worker: String,
    /// Owners claimed at once (default 100): their keys are created in one
    /// transaction and their rows re-sealed together.
    pub owners_per_claim: usize,
    /// How long a claim lasts (default 15 minutes): a worker that dies
    /// leaves its owners to others once it expires. It must outlast the
    /// work on one claim.
    pub claim_ttl: Duration,
    /// Rows per re-seal transaction (default [`DEFAULT_BATCH_SIZE`]).
    pub batch_size: usize,
    /// Values opened per table and claim to verify the re-seal (default 20).
    pub sample: usize,
    /// The time claims are taken and judged at (default: the clock, in
    /// UTC); fixed in tests.
    pub at: Option<NaiveDateTime>,
    /// Called with the report so far after each claimed batch
    /// ([`progress`](Self::progress)).
    progress: crate::shared::Callback<'a, RotateAllReport>,
}

impl RotateAllOptions<'_> {
    /// The options of job `job` with the defaults.
    pub fn new(job: impl Into<String>) -> Self {
        RotateAllOptions {
            job: job.into(),
            worker: default_worker(),
            owners_per_claim: 100,
            claim_ttl: Duration::from_secs(15 * 60),
            batch_size: DEFAULT_BATCH_SIZE,
            sample: 20,
            at: None,
            progress: crate::shared::Callback::default(),
        }
    }

    /// Calls `f` with the report so far as the job goes (default: no
    /// callback).
    #[must_use]
    pub fn progress<'b>(self, f: impl FnMut(&RotateAllReport) + 'b) -> RotateAllOptions<'b> {
        RotateAllOptions {
            job: self.job,
            worker: self.worker,
            owners_per_claim: self.owners_per_claim,
            claim_ttl: self.claim_ttl,
            batch_size: self.batch_size,
            sample: self.sample,
            at: self.at,
            progress: crate::shared::Callback::new(f),
        }
    }

    /// This worker's name.
    #[must_use]
    pub fn worker(mut self, worker: impl Into<String>) -> Self {
        self.worker = worker.into();
        self
    }

    /// Owners claimed at once.
    #[must_use]
    pub fn owners_per_claim(mut self, n: usize) -> Self {
        self.owners_per_claim = n.max(1);
        self
    }

    /// How long a claim lasts.
    #[must_use]
    pub fn claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl;
        self
    }

    /// Rows per re-seal transaction.
    #[must_use]
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Values opened per table and claim to verify.
    #[must_use]
    pub fn sample(mut self, n: usize) -> Self {
        self.sample = n;
        self
    }

    /// Takes and judges claims at this time instead of the clock's.
    #[must_use]
    pub fn at(mut self, at: NaiveDateTime) -> Self {
        self.at = Some(at);
        self
    }

    fn now(&self) -> NaiveDateTime {
        self.at.unwrap_or_else(|| chrono::Utc::now().naive_utc())
    }
}

/// The default worker name: `host:pid`.
fn default_worker() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let mut name = format!("{host}:{}", std::process::id());
    if name.len() > 255 {
        let cut = name.len() - 255;
        name.drain(..cut);
    }
    name
}

/// What [`rotate_all`] did, after each claim and at the end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RotateAllReport {
    /// The job.
    pub job: String,
    /// Owners of the job, every worker's.
    pub owners: u64,
    /// Owners this call added to the job.
    pub added: u64,
    /// Owners done when this call started (by earlier runs or other
    /// workers).
    pub done_before: u64,
    /// Owners this worker claimed.
    pub claimed: u64,
    /// Data key versions this worker created.
    pub rotated: u64,
    /// Owners skipped: crypto-shredded, or without a data key.
    pub skipped: u64,
    /// Values re-sealed by this worker.
    pub resealed: u64,
    /// Rows written by this worker.
    pub rows: u64,
    /// Rows changed by someone else between read and write (taken again).
    pub conflicts: u64,
    /// Values opened to verify.
    pub sampled: u64,
    /// Data key versions this worker retired.
    pub retired: u64,
    /// Owners this worker finished (skipped ones included).
    pub done: u64,
    /// Owners of the job still pending at the end, free to claim (values
    /// written under an old version meanwhile, say: run the job again).
    pub pending: u64,
    /// Owners of the job claimed by other workers at the end.
    pub claimed_by_others: u64,
}

impl RotateAllReport {
    /// Whether every owner of the job is done.
    pub fn finished(&self) -> bool {
        self.pending == 0 && self.claimed_by_others == 0
    }
}

/// Where [`rotate_all_interleaved`] calls its hook.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RotateStage {
    /// After a batch of owners was claimed.
    Claimed,
    /// After their new versions were created.
    Rotated,
    /// After their values were re-sealed, before verifying and retiring.
    Resealed,
}

/// Rotates every owner of `owners` in `tables` as one job shared by any
/// number of workers (see the module docs): per owner a new data key
/// version, every value of the tables re-sealed under it (set-based,
/// across a batch of owners) with its blind index (a column's
/// [`ResealColumn::blind_index`](super::ResealColumn::blind_index))
/// rewritten under it in the same `UPDATE`, a sample opened and its blind
/// indexes checked, and the older versions retired once no value uses
/// them; each change audited and appended to the key-event feed. Lookup
/// indexes are keyed by phi's own key, not the owners': rotate it with
/// [`lookup::rotate`](crate::lookup::rotate). `conn` is the application's connection, outside
/// any transaction; the key store must keep rotation jobs
/// ([`DieselKeyStore`](crate::DieselKeyStore)).
///
/// Every worker resolves `owners` and adds them to the job (idempotent),
/// then claims batches until none is left to claim. An owner whose values
/// were written under an old version after the re-seal (a process whose
/// cache still held the old key) is left pending, its old version active;
/// [`RotateAllReport::pending`] counts them, and running the job again
/// finishes them.
///
/// # Errors
/// The errors of the owners' resolution, key store and KEK errors, a value
/// that does not open (named by scope, owner and version), query errors.
/// The owners of the batch in flight are released for another worker;
/// batches done before stay done.
pub fn rotate_all<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owners: &RotateOwners,
    tables: &[ResealTable],
    options: &RotateAllOptions<'_>,
) -> Result<RotateAllReport> {
    rotate_all_interleaved(conn, keyring, owners, tables, options, &mut |_, _| Ok(()))
}

/// [`rotate_all`] with `between` called at fixed points of each claimed
/// batch ([`RotateStage`]), for tests of interleavings and failures. Not
/// for applications.
///
/// # Errors
/// As [`rotate_all`], and `between`'s.
#[doc(hidden)]
pub fn rotate_all_interleaved<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owners: &RotateOwners,
    tables: &[ResealTable],
    options: &RotateAllOptions<'_>,
    between: &mut dyn FnMut(RotateStage, &[String]) -> Result<()>,
) -> Result<RotateAllReport> {
    let progress = |r: &RotateAllReport| options.progress.call(r);
    check_job_id(&options.job)?;
    for t in tables {
        t.validate()?;
    }
    super::prepare_connection(conn, tables, "*")?;
    let store = keyring.store().clone();
    let list = owners.resolve(keyring)?;
    let mut report = RotateAllReport {
        job: options.job.clone(),
        ..RotateAllReport::default()
    };
    report.added = store.rotation_enqueue(&options.job, &list)?;
    let counts = store.rotation_counts(&options.job, options.now())?;
    report.owners = counts.total();
    report.done_before = counts.done;
    progress(&report);
    let _span = tracing::info_span!("phi.rotate_all", job = %options.job).entered();
    let mut unfinished_before = std::collections::HashSet::new();
    loop {
        let now = options.now();
        let claims = store.rotation_claim(
            &options.job,
            &options.worker,
            options.owners_per_claim.max(1),
            now,
            claim_end(now, options.claim_ttl),
        )?;
        if claims.is_empty() {
            break;
        }
        let owners: Vec<String> = claims.iter().map(|c| c.owner_id.clone()).collect();
        report.claimed += owners.len() as u64;
        let outcome = rotate_claimed(
            conn,
            keyring,
            tables,
            options,
            &claims,
            &mut report,
            between,
        );
        match outcome {
            Ok(unfinished) => {
                let finished: Vec<String> = owners
                    .iter()
                    .filter(|o| !unfinished.contains(o))
                    .cloned()
                    .collect();
                store.rotation_done(&options.job, &finished)?;
                report.done += finished.len() as u64;
                progress(&report);
                if !unfinished.is_empty() {
                    // Taken again once (by this worker or another); an
                    // owner unfinished twice in this run is left pending.
                    store.rotation_release(&options.job, &options.worker, &unfinished)?;
                    tracing::warn!(
                        owners = unfinished.len(),
                        "values were written under older versions during the re-seal: those owners stay pending"
                    );
                    let twice = unfinished
                        .iter()
                        .any(|o| !unfinished_before.insert(o.clone()));
                    if twice {
                        break;
                    }
                }
            }
            Err(error) => {
                // Best effort: the claims expire anyway.
                if let Err(release) = store.rotation_release(&options.job, &options.worker, &owners)
                {
                    tracing::warn!(%release, "could not release the claims of a failed batch");
                }
                return Err(error);
            }
        }
    }
    let counts = store.rotation_counts(&options.job, options.now())?;
    report.pending = counts.pending;
    report.claimed_by_others = counts.claimed;
    report.owners = counts.total();
    tracing::info!(
        job = %options.job,
        done = report.done,
        rotated = report.rotated,
        resealed = report.resealed,
        retired = report.retired,
        pending = report.pending,
        "rotation worker finished"
    );
    progress(&report);
    Ok(report)
}

/// The envelope v1 prefix.
const PREFIX: [u8; 2] = [MAGIC, VERSION_V1];

/// The key version in a stored envelope's header, if it is one.
fn envelope_version(bytes: &[u8]) -> Option<u32> {
    if bytes.len() < 6 || bytes[..2] != PREFIX {
        return None;
    }
    let v: [u8; 4] = bytes[2..6].try_into().ok()?;
    Some(u32::from_be_bytes(v))
}

/// Works on one claimed batch: new versions, re-seal, verify, retire.
/// Returns the owners left unfinished (values under an older version
/// after the re-seal).
fn rotate_claimed<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    tables: &[ResealTable],
    options: &RotateAllOptions,
    claims: &[RotationClaim],
    report: &mut RotateAllReport,
    between: &mut dyn FnMut(RotateStage, &[String]) -> Result<()>,
) -> Result<Vec<String>> {
    let store = keyring.store();
    let owners: Vec<String> = claims.iter().map(|c| c.owner_id.clone()).collect();
    between(RotateStage::Claimed, &owners)?;
    let mut by_owner = load_by_owner(keyring, &owners)?;
    // 1. New versions, in one key-store transaction.
    let kek = keyring.primary_kek();
    let actor = keyring.actor();
    let mut target: BTreeMap<String, u32> = BTreeMap::new();
    let mut new = Vec::new();
    for claim in claims {
        let owner = claim.owner_id.as_str();
        let rows = by_owner.get(owner).map_or(&[][..], Vec::as_slice);
        if rows.is_empty() || is_shredded(rows) {
            report.skipped += 1;
            continue;
        }
        if let Some(v) = claim.new_version
            && rows
                .iter()
                .any(|r| r.version == v && r.state == KeyState::Active)
        {
            // Created by this job before (a worker that died, a rerun).
            target.insert(owner.to_owned(), v);
            continue;
        }
        let last = rows.iter().map(|r| r.version).max().unwrap_or(0);
        let version = last.checked_add(1).ok_or_else(|| Error::Refused {
            operation: "rotate".into(),
            owner: owner.to_owned(),
            reason: "the owner has used every key version".into(),
        })?;
        let (key, wrapped) =
            kek.generate(owner, version)
                .map_err(kek_error(kek.as_ref(), owner, version))?;
        drop(key);
        let previous = super::current_version(rows)
            .map(|v| format!("previous current version {v}"))
            .unwrap_or_else(|| "no previous active version".into());
        let detail = format!("rotation job {}; {previous}", options.job);
        let audit = event_by(
            actor,
            owner,
            AuditAction::Rotate,
            Some(version),
            Some(kek.id()),
            Some(detail.clone()),
        );
        let event = KeyEvent::new(KeyEventKind::Rotate, Some(owner), actor)
            .with_version(version)
            .with_detail(detail);
        new.push(NewKeyVersion::new(
            StoredKey::active(owner, version, kek.id(), wrapped),
            audit,
            event,
        ));
    }
    let inserted = store.rotation_add_versions(&options.job, &new)?;
    let mut raced = Vec::new();
    for (v, inserted) in new.iter().zip(inserted) {
        if inserted {
            target.insert(v.key.owner_id.clone(), v.key.version);
            report.rotated += 1;
            metrics::add(metrics::KEYS_ROTATED_TOTAL, 1);
        } else {
            raced.push(v.key.owner_id.clone());
        }
    }
    if !raced.is_empty() {
        // Another process added that version first: rotate to the newest.
        let fresh = load_by_owner(keyring, &raced)?;
        for owner in raced {
            let rows = fresh.get(&owner).map_or(&[][..], Vec::as_slice);
            if let Some(v) = super::current_version(rows) {
                target.insert(owner.clone(), v);
            }
            by_owner.insert(owner, rows.to_vec());
        }
    }
    for owner in &owners {
        keyring.clear(owner);
    }
    let todo: Vec<String> = target.keys().cloned().collect();
    between(RotateStage::Rotated, &todo)?;
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    // 2. Re-seal, set-based across the batch, one group per target version.
    let keys = keyring.keys_for_open_many(todo.iter().map(String::as_str))?;
    let mut groups: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (owner, v) in &target {
        groups.entry(*v).or_default().push(owner.clone());
    }
    for t in tables {
        reseal_table(conn, keyring, t, &groups, &keys, options, report)?;
    }
    between(RotateStage::Resealed, &todo)?;
    // 3. Verify: a sample opens under the new version, and no value is
    // left under an older one.
    let mut unfinished: Vec<String> = Vec::new();
    for t in tables {
        verify_sample(conn, t, &todo, &target, &keys, options.sample, report)?;
        // One query per group of owners for every column at once.
        for (version, owners) in &groups {
            for chunk in owners.chunks(OWNERS_PER_QUERY) {
                for owner in conn.owners_with_older_values(t, chunk, *version)? {
                    if !unfinished.contains(&owner) {
                        unfinished.push(owner);
                    }
                }
            }
        }
    }
    // 4. Retire the older versions of the owners with none left, in one
    // transaction.
    let mut retires = Vec::new();
    for (owner, v) in &target {
        if unfinished.contains(owner) {
            continue;
        }
        let rows = by_owner.get(owner).map_or(&[][..], Vec::as_slice);
        for row in rows {
            if row.version < *v && row.state == KeyState::Active {
                retires.push(event_by(
                    actor,
                    owner,
                    AuditAction::Retire,
                    Some(row.version),
                    Some(&row.kek_id),
                    Some(format!("rotation job {}", options.job)),
                ));
            }
        }
    }
    let retired = store.retire_versions(&retires)?;
    let n = retired.iter().filter(|r| **r).count() as u64;
    report.retired += n;
    metrics::add(metrics::KEYS_RETIRED_TOTAL, n);
    for owner in &todo {
        keyring.clear(owner);
    }
    Ok(unfinished)
}

/// Owners per `IN (…)` list of the verification queries.
const OWNERS_PER_QUERY: usize = 1_000;

/// Row keys one re-seal batch binds at most (with up to
/// [`OWNERS_PER_QUERY`] owners and two per column, under SQLite's 32,766
/// bound parameters), whatever the batch size asked.
const MAX_KEYS_PER_BATCH: usize = 20_000;

/// Consecutive batches with no row written before a re-seal gives up.
const MAX_IDLE_BATCHES: u32 = 20;

fn load_by_owner(keyring: &Keyring, owners: &[String]) -> Result<HashMap<String, Vec<StoredKey>>> {
    let refs: Vec<&str> = owners.iter().map(String::as_str).collect();
    let mut by_owner: HashMap<String, Vec<StoredKey>> = HashMap::new();
    for chunk in refs.chunks(5_000) {
        for row in keyring.store().load_keys(chunk)? {
            by_owner.entry(row.owner_id.clone()).or_default().push(row);
        }
    }
    for rows in by_owner.values_mut() {
        rows.sort_by_key(|r| r.version);
    }
    Ok(by_owner)
}

/// Re-seals the values of every group's owners in `t` under the group's
/// version: whole rows, set-based, when the table has a key column and
/// at most 8 encrypted columns; else column by column, owner by owner
/// ([`reseal`](super::reseal)).
fn reseal_table<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    t: &ResealTable,
    groups: &BTreeMap<u32, Vec<String>>,
    keys: &HashMap<String, Arc<OwnerKeys>>,
    options: &RotateAllOptions,
    report: &mut RotateAllReport,
) -> Result<()> {
    let batch = if options.batch_size == 0 {
        DEFAULT_BATCH_SIZE
    } else {
        options.batch_size
    };
    if !t.whole_rows() {
        for owner in groups.values().flatten() {
            let done = super::reseal(
                conn,
                keyring,
                owner,
                std::slice::from_ref(t),
                &super::ResealOptions::default().batch_size(batch),
            )?;
            report.resealed += done.resealed;
            report.rows += done.resealed;
            report.conflicts += done.conflicts;
        }
        return Ok(());
    }
    for (version, owners) in groups {
        for chunk in owners.chunks(OWNERS_PER_QUERY) {
            let mut idle = 0;
            // The keys of the rows to re-seal are listed once, unlocked, in
            // key order; each batch then locks its rows by key. Without the
            // list, every batch would scan the rows re-sealed before it
            // (and their old versions) again. Rows written under an older
            // version meanwhile are in the next listing; the job ends when
            // a listing is empty.
            let mut listed: Vec<SqlValue> = Vec::new();
            let mut next = 0;
            let mut pass_updated = 0u64;
            loop {
                if next >= listed.len() {
                    if !listed.is_empty() && pass_updated == 0 {
                        // A whole listing found every row changed since.
                        idle += 1;
                    }
                    if idle >= MAX_IDLE_BATCHES {
                        return Err(kept_changing(t, chunk));
                    }
                    listed = conn.owner_row_keys(t, chunk, *version)?;
                    next = 0;
                    pass_updated = 0;
                    if listed.is_empty() {
                        break;
                    }
                }
                let end = (next + batch.min(MAX_KEYS_PER_BATCH)).min(listed.len());
                let batch_keys = &listed[next..end];
                next = end;
                let mut turned = 0u64;
                let mut reseal = |row: &MigrationRow, i: usize| -> Result<Option<Resealed>> {
                    let Some(bytes) = row.values.get(i).and_then(Option::as_ref) else {
                        return Ok(None);
                    };
                    match envelope_version(bytes) {
                        Some(v) if v < *version => {}
                        None if bytes.starts_with(&PREFIX) => {
                            // Selected as under an older version, but too
                            // short to name one: never written, so say so
                            // rather than retry it until "kept changing".
                            return Err(Error::DataTable {
                                operation: "re-sealing rows of owners",
                                table: t.table.clone(),
                                column: t.columns[i].column.clone(),
                                owner: row.owner.clone(),
                                source: format!(
                                    "row {:?}: the value starts as an envelope but is too short to hold its key version",
                                    row.key_text()
                                )
                                .into(),
                            });
                        }
                        _ => return Ok(None),
                    }
                    let owner_keys = keys.get(&row.owner).ok_or_else(|| Error::NoKey {
                        owner: row.owner.clone(),
                    })?;
                    let resealed =
                        super::reseal_value(owner_keys, bytes.clone(), &t.columns[i], &row.row)?;
                    turned += 1;
                    Ok(Some(resealed))
                };
                let outcome = conn.reseal_owner_rows(
                    t,
                    chunk,
                    *version,
                    Some(batch_keys),
                    batch,
                    &mut reseal,
                )?;
                report.resealed += turned;
                report.rows += outcome.updated;
                report.conflicts += outcome.conflicts;
                pass_updated += outcome.updated;
                metrics::add_for_table(metrics::VALUES_RESEALED_TOTAL, &t.table, turned);
                if outcome.updated > 0 {
                    idle = 0;
                } else if outcome.read > 0 {
                    idle += 1;
                    if idle >= MAX_IDLE_BATCHES {
                        return Err(kept_changing(t, chunk));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The error of a re-seal whose rows kept changing under it.
fn kept_changing(t: &ResealTable, owners: &[String]) -> Error {
    Error::DataTable {
        operation: "re-sealing rows of owners",
        table: t.table.clone(),
        column: t.owner_column.clone(),
        owner: owners.first().cloned().unwrap_or_default(),
        source: format!("rows kept changing under {MAX_IDLE_BATCHES} batches in a row").into(),
    }
}

/// Opens up to `sample` values of `owners` in `t`, checks each is under
/// its owner's new version, and that the blind index beside a value under
/// the new version is the one computed under it.
fn verify_sample<C: DataConnection>(
    conn: &mut C,
    t: &ResealTable,
    owners: &[String],
    target: &BTreeMap<String, u32>,
    keys: &HashMap<String, Arc<OwnerKeys>>,
    sample: usize,
    report: &mut RotateAllReport,
) -> Result<()> {
    if sample == 0 || !t.whole_rows() || owners.is_empty() {
        return Ok(());
    }
    let rows = conn.owner_rows(
        t,
        &owners[..owners.len().min(OWNERS_PER_QUERY)],
        None,
        sample,
    )?;
    for row in &rows {
        for (i, c) in t.columns.iter().enumerate() {
            let Some(Some(bytes)) = row.values.get(i) else {
                continue;
            };
            let Some(version) = envelope_version(bytes) else {
                continue;
            };
            let (Some(owner_keys), Some(want)) = (keys.get(&row.owner), target.get(&row.owner))
            else {
                continue;
            };
            let plain = Zeroizing::new(owner_keys.open::<Vec<u8>>(
                Encrypted::from_bytes(bytes.clone()),
                &c.scope,
                &row.row,
            )?);
            report.sampled += 1;
            if version < *want {
                // Written meanwhile under an old version: the count after
                // this sample leaves the owner pending.
                tracing::debug!(version, want, "a sampled value is under an older version");
                continue;
            }
            for (p, index, kind) in t.index_positions(i) {
                let expected = kind.under(owner_keys, version, &c.scope, &plain);
                if expected.is_none()
                    || row.values.get(p).and_then(Option::as_ref) != expected.as_ref()
                {
                    return Err(Error::DataTable {
                        operation: "verifying re-sealed rows",
                        table: t.table.clone(),
                        column: index.to_owned(),
                        owner: row.owner.clone(),
                        source: format!(
                            "row {:?}: the {} is not the one of its value under key version {version}",
                            row.key_text(),
                            kind.kind()
                        )
                        .into(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// What [`rotate_all`] would do: owners, rows, values and KMS calls, and a
/// time estimate from a measured sample ([`plan`]).
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct RotatePlan {
    /// Owners the set names.
    pub owners: u64,
    /// Of those, owners that would be rotated (with a data key, not
    /// shredded).
    pub to_rotate: u64,
    /// Of those, owners already done by the job (a rerun skips them).
    pub done: u64,
    /// Rows of the owners to rotate in the tables.
    pub rows: u64,
    /// Sealed values of the owners to rotate in the tables.
    pub values: u64,
    /// Data key versions that would be retired.
    pub to_retire: u64,
    /// KMS (KEK) calls: one to generate each new version, one unwrap per
    /// version opened (old and new).
    pub kms_calls: u64,
    /// Rows read, opened and sealed in the measured sample (nothing written).
    pub sample_rows: u64,
    /// The estimated time of the whole job for one worker, from the
    /// sample: reading, opening and sealing each row, and the KEK calls,
    /// times 3 for the writes and retirement (seconds).
    pub estimate_seconds: f64,
}

/// Plans [`rotate_all`] without changing anything: counts the owners,
/// rows, values, versions to retire and KMS calls, and measures a sample
/// of up to `sample` rows (read, opened and sealed in memory; nothing is
/// written) and the unwrap of the sampled owners' keys, for an estimate
/// of the whole job.
///
/// # Errors
/// As [`rotate_all`]'s reads.
pub fn plan<C: DataConnection>(
    conn: &mut C,
    keyring: &Keyring,
    owners: &RotateOwners,
    tables: &[ResealTable],
    job: Option<&str>,
    sample: usize,
) -> Result<RotatePlan> {
    for t in tables {
        t.validate()?;
    }
    let list = owners.resolve(keyring)?;
    let by_owner = load_by_owner(keyring, &list)?;
    let mut plan = RotatePlan {
        owners: list.len() as u64,
        ..RotatePlan::default()
    };
    if let Some(job) = job {
        check_job_id(job)?;
        if let Ok(counts) = keyring
            .store()
            .rotation_counts(job, chrono::Utc::now().naive_utc())
        {
            plan.done = counts.done;
        }
    }
    let mut todo = Vec::new();
    for owner in &list {
        let rows = by_owner.get(owner).map_or(&[][..], Vec::as_slice);
        if rows.is_empty() || is_shredded(rows) {
            continue;
        }
        todo.push(owner.clone());
        let live = rows
            .iter()
            .filter(|r| r.state != KeyState::Destroyed)
            .count() as u64;
        plan.to_retire += rows.iter().filter(|r| r.state == KeyState::Active).count() as u64;
        // Generate the new version, unwrap it and every live old one.
        plan.kms_calls += 2 + live;
    }
    plan.to_rotate = todo.len() as u64;
    for t in tables {
        for chunk in todo.chunks(OWNERS_PER_QUERY) {
            plan.rows += conn.count_owner_rows(t, chunk)?;
            for c in &t.columns {
                plan.values += conn
                    .key_versions_in_use_many(t, c, chunk)?
                    .iter()
                    .map(|(_, _, n)| n)
                    .sum::<u64>();
            }
        }
    }
    // The sample: a few owners' keys unwrapped afresh, their rows read,
    // opened and sealed again in memory.
    let sample_owners: Vec<String> = todo.iter().take(10).cloned().collect();
    if sample == 0 || sample_owners.is_empty() {
        return Ok(plan);
    }
    for owner in &sample_owners {
        keyring.clear(owner);
    }
    let started = Instant::now();
    let keys = keyring.keys_for_open_many(sample_owners.iter().map(String::as_str))?;
    let unwrap_time = started.elapsed();
    let unwraps: u64 = keys.values().map(|k| k.versions().count() as u64).sum();
    let started = Instant::now();
    let mut sampled_rows = 0u64;
    for t in tables {
        if !t.whole_rows() {
            continue;
        }
        for row in conn.owner_rows(t, &sample_owners, None, sample)? {
            sampled_rows += 1;
            let Some(owner_keys) = keys.get(&row.owner) else {
                continue;
            };
            for (i, c) in t.columns.iter().enumerate() {
                let Some(Some(bytes)) = row.values.get(i) else {
                    continue;
                };
                if envelope_version(bytes).is_none() {
                    continue;
                }
                drop(super::reseal_value(owner_keys, bytes.clone(), c, &row.row)?);
            }
        }
    }
    let row_time = started.elapsed();
    plan.sample_rows = sampled_rows;
    let per_row = if sampled_rows == 0 {
        0.0
    } else {
        row_time.as_secs_f64() / sampled_rows as f64
    };
    let per_call = if unwraps == 0 {
        0.0
    } else {
        unwrap_time.as_secs_f64() / unwraps as f64
    };
    #[allow(clippy::cast_precision_loss)] // An estimate.
    {
        plan.estimate_seconds =
            3.0 * (per_row * plan.rows as f64) + per_call * plan.kms_calls as f64;
    }
    Ok(plan)
}
