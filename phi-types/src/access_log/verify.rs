//! Walking the access log's chains (`phi audit verify`).

use std::fmt;

use super::{AccessLogStore, BatchRow, ChainHead, ChainKeys, StoredAccess};
use crate::error::Result;
use crate::keyring::Keyring;

/// Batches read per query while walking a chain.
const PAGE: usize = 200;

/// What is wrong at the first break of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakKind {
    /// A batch is missing: deleted, or the chain cut short of its head.
    Missing,
    /// A batch does not follow the one before it: batches reordered, or
    /// one rewritten.
    Reordered,
    /// A batch's contents (its records, or the batch itself) do not match
    /// its hash: altered, deleted, added or reordered records.
    Altered,
    /// Records of a batch that is not in the chain.
    Orphaned,
    /// The chain's head row does not match its last batch.
    Head,
    /// The chain key a batch names is not available to this keyring.
    KeyUnavailable,
}

impl BreakKind {
    /// The name shown by `phi audit verify --format json`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakKind::Missing => "missing",
            BreakKind::Reordered => "reordered",
            BreakKind::Altered => "altered",
            BreakKind::Orphaned => "orphaned",
            BreakKind::Head => "head",
            BreakKind::KeyUnavailable => "key_unavailable",
        }
    }
}

/// The first break found in a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    /// The batch it concerns.
    pub batch: i64,
    /// What is wrong.
    pub kind: BreakKind,
    /// For people: what was found.
    pub message: String,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The result of walking one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainReport {
    /// The chain.
    pub chain: String,
    /// The first batch walked (after a checkpoint, the first kept).
    pub first: Option<i64>,
    /// The last batch verified.
    pub last: Option<i64>,
    /// The hash of the last batch verified (keep it elsewhere to detect a
    /// later cut of the chain's tail).
    pub last_hash: Option<Vec<u8>>,
    /// Batches verified.
    pub batches: u64,
    /// Records verified.
    pub records: u64,
    /// The first break, if any.
    pub broken: Option<Break>,
}

impl ChainReport {
    /// Whether the chain verified.
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// Verifies every chain of `store` with the chain keys `keyring` can
/// unwrap.
///
/// # Errors
/// The store's errors; the keyring's when the chain keys cannot be loaded.
pub fn verify(store: &dyn AccessLogStore, keyring: &Keyring) -> Result<Vec<ChainReport>> {
    let mut chains: Vec<String> = store.heads()?.into_iter().map(|h| h.chain).collect();
    for chain in store.chains_with_batches()? {
        if !chains.contains(&chain) {
            chains.push(chain);
        }
    }
    chains.sort();
    let mut keys = None;
    let mut reports = Vec::new();
    for chain in chains {
        reports.push(verify_chain(store, keyring, &chain, &mut keys)?);
    }
    Ok(reports)
}

/// Verifies one chain; `keys` caches the chain keys between calls.
///
/// # Errors
/// The store's errors; the keyring's when the chain keys cannot be loaded.
pub fn verify_chain(
    store: &dyn AccessLogStore,
    keyring: &Keyring,
    chain: &str,
    keys: &mut Option<ChainKeys>,
) -> Result<ChainReport> {
    let read_head = || -> Result<Option<ChainHead>> {
        Ok(store.heads()?.into_iter().find(|h| h.chain == chain))
    };
    let mut head = read_head()?;
    let mut report = ChainReport {
        chain: chain.to_owned(),
        first: None,
        last: None,
        last_hash: None,
        batches: 0,
        records: 0,
        broken: None,
    };
    let broken = |batch: i64, kind: BreakKind, message: String| Break {
        batch,
        kind,
        message,
    };
    let Some(first) = store.first_batch(chain)? else {
        if let Some(head) = head.filter(|h| h.head > 0) {
            report.broken = Some(broken(
                1,
                BreakKind::Missing,
                format!(
                    "chain {chain:?}: batches 1 to {} are missing (the head names batch {}, no batch is stored)",
                    head.head, head.head
                ),
            ));
        } else if let Some(orphan) = store.orphan_batch(chain)? {
            report.broken = Some(broken(
                orphan,
                BreakKind::Orphaned,
                format!("chain {chain:?}: records of batch {orphan}, which is not in the chain"),
            ));
        }
        return Ok(report);
    };
    report.first = Some(first);
    let mut prev: Vec<u8> = if first == 1 {
        vec![0; 32]
    } else {
        match store.checkpoint(chain, first)? {
            Some(checkpoint) => checkpoint.pruned_hash.clone().unwrap_or_default(),
            None => {
                report.broken = Some(broken(
                    first - 1,
                    BreakKind::Missing,
                    format!(
                        "chain {chain:?}: batch {} is missing (batches 1 to {} are gone, and no checkpoint accounts for them)",
                        first - 1,
                        first - 1
                    ),
                ));
                return Ok(report);
            }
        }
    };
    let mut expected = first;
    loop {
        let page = store.batches(chain, expected, PAGE)?;
        let Some(last_in_page) = page.last().map(|b| b.id) else {
            break;
        };
        let records = store.batch_records(chain, expected, last_in_page)?;
        let mut records = records.as_slice();
        for batch in &page {
            if head.as_ref().is_none_or(|h| h.head < batch.id) {
                // Past the head read earlier: appended since (a batch and
                // its head move in one transaction, so a head read now
                // covers every batch already seen), or not in the chain,
                // which the head check below reports.
                head = read_head()?;
            }
            let (mine, rest) = split_batch(records, batch.id);
            records = rest;
            if batch.id != expected {
                report.broken = Some(broken(
                    expected,
                    BreakKind::Missing,
                    format!(
                        "chain {chain:?}: batch {expected} is missing (batch {} follows batch {})",
                        batch.id,
                        expected - 1
                    ),
                ));
                return Ok(report);
            }
            if batch.prev_hash != prev {
                report.broken = Some(broken(
                    batch.id,
                    BreakKind::Reordered,
                    format!(
                        "chain {chain:?}: batch {} does not follow batch {} (reordered, or rewritten)",
                        batch.id,
                        batch.id - 1
                    ),
                ));
                return Ok(report);
            }
            if let Some(problem) = check_batch(batch, mine, keyring, keys)? {
                report.broken = Some(problem);
                return Ok(report);
            }
            report.batches += 1;
            report.records += mine.len() as u64;
            report.last = Some(batch.id);
            report.last_hash = Some(batch.hash.clone());
            prev.clone_from(&batch.hash);
            expected += 1;
        }
    }
    let last = expected - 1;
    match &head {
        Some(head) if head.head > last => {
            report.broken = Some(broken(
                last + 1,
                BreakKind::Missing,
                format!(
                    "chain {chain:?}: batches {} to {} are missing (the log was cut after batch {last})",
                    last + 1,
                    head.head
                ),
            ));
            return Ok(report);
        }
        Some(head) if head.head != last || head.head_hash != prev => {
            report.broken = Some(broken(
                last,
                BreakKind::Head,
                format!(
                    "chain {chain:?}: the head (batch {}) does not match the last batch, {last}",
                    head.head
                ),
            ));
            return Ok(report);
        }
        None => {
            report.broken = Some(broken(
                last,
                BreakKind::Head,
                format!("chain {chain:?}: the chain has batches but no head row"),
            ));
            return Ok(report);
        }
        Some(_) => {}
    }
    if let Some(orphan) = store.orphan_batch(chain)? {
        report.broken = Some(broken(
            orphan,
            BreakKind::Orphaned,
            format!("chain {chain:?}: records of batch {orphan}, which is not in the chain"),
        ));
    }
    Ok(report)
}

/// The records of batch `id` at the front of `records` (sorted by batch),
/// and the rest (records of earlier batches, which belong to none walked,
/// are skipped: the orphan check names them).
fn split_batch(records: &[StoredAccess], id: i64) -> (&[StoredAccess], &[StoredAccess]) {
    let start = records
        .iter()
        .position(|r| r.batch >= id)
        .unwrap_or(records.len());
    let records = &records[start..];
    let end = records
        .iter()
        .position(|r| r.batch != id)
        .unwrap_or(records.len());
    records.split_at(end)
}

fn check_batch(
    batch: &BatchRow,
    records: &[StoredAccess],
    keyring: &Keyring,
    keys: &mut Option<ChainKeys>,
) -> Result<Option<Break>> {
    let chain = &batch.chain;
    let id = batch.id;
    let count_matches = i64::try_from(records.len()).ok() == Some(batch.records);
    let numbered = records
        .iter()
        .enumerate()
        .all(|(i, r)| usize::try_from(r.seq).ok() == Some(i));
    if !count_matches || !numbered {
        return Ok(Some(Break {
            batch: id,
            kind: BreakKind::Altered,
            message: format!(
                "chain {chain:?}: batch {id} holds {} record(s) numbered {}, where {} were written (records deleted, added or renumbered)",
                records.len(),
                if numbered { "in order" } else { "out of order" },
                batch.records
            ),
        }));
    }
    if keys.is_none() {
        *keys = Some(ChainKeys::load(keyring, false)?);
    }
    let key = keys.as_ref().and_then(|k| k.version(batch.key_version));
    let Some(key) = key else {
        return Ok(Some(Break {
            batch: id,
            kind: BreakKind::KeyUnavailable,
            message: format!(
                "chain {chain:?}: batch {id} is hashed under version {} of {:?}, which this keyring cannot unwrap",
                batch.key_version,
                super::ACCESS_LOG_OWNER
            ),
        }));
    };
    if !key.verifies(batch, records) {
        return Ok(Some(Break {
            batch: id,
            kind: BreakKind::Altered,
            message: format!(
                "chain {chain:?}: batch {id} does not match its hash (its records or the batch were altered)"
            ),
        }));
    }
    Ok(None)
}
