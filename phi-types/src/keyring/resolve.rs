//! The key-resolution core: every decision of resolving owners' data keys,
//! without any IO, driven by the blocking resolution (`Keyring::resolve_each`)
//! and the async one (`Keyring::resolve_each_async`) alike, and by the loom
//! model (`cache/loom_model.rs`), so each rule is written, and checked, once.
//!
//! In the style of rustls' and hyper's protocol cores: a [`Resolution`]
//! says what it needs next ([`Step::Io`]: load these owners' key rows,
//! unwrap these rows with this KEK, generate a key, insert it, record the
//! audit, wait for another caller's flight, resolve an owner again); the
//! driver does it (a blocking call, or an `.await`; a condition variable, or
//! a `Notify`) and hands the outcome back ([`Input`]); the core decides
//! again, until the results are [`Step::Done`].
//!
//! ```text
//! look up each owner ── hit ─────────────────────────────────────────┐
//!   ├─ lead ─► Load ─► Unwrap (per KEK) ─► keys ─┬─► Record ─► publish ├─► Done
//!   │                      sealing, no key: Generate ─► Insert ─┘    │
//!   │                             lost the race: Load ─► Unwrap ─┘    │
//!   └─ wait ─────────────────────────────► Wait ─► (Again) ──────────┘
//! ```
//!
//! Key bytes: a data key that comes back from the KEK (an [`Input`]) is put
//! into its `Arc<OwnerKeys>` by the step that receives it, before the step
//! returns: a driver never holds one across its next call or `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::cache::{Cache, Flight, LeadGuard, Lookup, Shared};
use super::clock::Clock;
use super::{Counters, Deks, OwnerKeys, Purpose, check_owner, live_sorted, usable};
use crate::dek::{Dek, KeyBytes};
use crate::error::{BoxError, Error, Result};
use crate::kek::KeyEncryptionKey;
use crate::store::{AuditAction, AuditEvent, KeyState, StoredKey};
use crate::telemetry::OwnerIdTelemetry;

/// One owner's result.
pub(super) type Resolved = (String, Result<Arc<OwnerKeys>>);

/// What the keyring's resolution reads and counts: the parts of a keyring
/// the core needs, borrowed (the loom model builds them without a key
/// store or an audit writer).
pub(super) struct Core<'k> {
    pub(super) cache: &'k Cache,
    pub(super) primary: &'k Arc<dyn KeyEncryptionKey>,
    pub(super) keks: &'k HashMap<String, Arc<dyn KeyEncryptionKey>>,
    pub(super) counters: &'k Counters,
    pub(super) clock: &'k dyn Clock,
    pub(super) actor: &'k str,
    pub(super) name: &'k str,
    pub(super) owner_telemetry: OwnerIdTelemetry,
    /// [`super::KeyringBuilder::allow_owner_id_whitespace`].
    pub(super) owner_id_whitespace: bool,
    /// The tallies sealing counts into.
    pub(super) seal_counts: &'k super::seals::SealCounts,
}

/// What the driver must do next.
pub(super) enum Io {
    /// Load these owners' key rows ([`crate::KeyStore::load_keys`]); answer
    /// [`Input::Rows`].
    Load(Vec<String>),
    /// Unwrap these `(owner, version, wrapped key)` with this KEK
    /// (`unwrap_many`); answer [`Input::Unwrapped`], one result per
    /// request, in order.
    Unwrap {
        kek: Arc<dyn KeyEncryptionKey>,
        requests: Vec<(String, u32, Vec<u8>)>,
    },
    /// Generate the owner's data key `version` with this KEK
    /// (`generate`); answer [`Input::Generated`].
    Generate {
        kek: Arc<dyn KeyEncryptionKey>,
        owner: String,
        version: u32,
    },
    /// Insert this key row unless one exists, and when it was inserted
    /// write its `generate` record in the same call ([`insert_key`]): an
    /// async caller dropped while the insert runs never leaves a key
    /// without its record. Answer [`Input::Inserted`].
    Insert { row: StoredKey, record: AuditEvent },
    /// Queue the `unwrap` records for the background writer, and write the
    /// `generate` records now (when there are any); answer
    /// [`Input::Recorded`] with the write's outcome.
    Record {
        unwraps: Vec<AuditEvent>,
        generated: Vec<AuditEvent>,
    },
    /// Wait for the flight another caller leads; answer [`Input::Waited`].
    Wait(Arc<Flight>),
    /// Resolve this owner again, from the start (it was resolved for
    /// opening while this caller seals); answer [`Input::Resolved`].
    Again(String),
}

/// The outcome of an [`Io`].
pub(super) enum Input {
    Rows(Result<Vec<StoredKey>>),
    Unwrapped(Vec<std::result::Result<KeyBytes, BoxError>>),
    Generated(std::result::Result<(KeyBytes, Vec<u8>), BoxError>),
    Inserted(Result<bool>),
    Recorded(Result<()>),
    Waited(Shared),
    Resolved(Result<Arc<OwnerKeys>>),
}

/// What the core says after each step.
pub(super) enum Step {
    /// Do this, then call [`Resolution::step`] with its outcome.
    Io(Io),
    /// Every owner's result (in no particular order).
    Done(Vec<Resolved>),
}

/// One resolution of a batch of owners.
pub(super) struct Resolution<'k, 'o> {
    core: Core<'k>,
    purpose: Purpose,
    /// Until the lead is settled.
    batch: Option<Batch<'k, 'o>>,
    state: State<'o>,
    /// Owners answered (hits, led and waited-for).
    results: Vec<Resolved>,
}

enum State<'o> {
    /// Looked up: lead, or go wait.
    Start,
    /// Loading the led owners' rows.
    Loading {
        owners: Vec<String>,
        fill: u64,
    },
    /// Unwrapping, building and creating the led owners' keys.
    Filling(Box<Fill>),
    /// The audit records of the fill being recorded.
    Recording {
        owners: Vec<String>,
        results: Vec<Resolved>,
    },
    /// Waiting for the flights others lead, one after the other.
    Waiting {
        waits: std::vec::IntoIter<(&'o str, Arc<Flight>)>,
        current: Option<&'o str>,
    },
    Done,
}

impl<'k> Core<'k> {
    /// Starts resolving `owners` for `purpose`: each distinct owner is
    /// checked and looked up in the cache once (a load passes every row's
    /// owner), into a hit, a flight this caller leads, or a flight another
    /// caller leads. Drive it with [`Resolution::step`].
    pub(super) fn start<'o>(
        self,
        owners: impl IntoIterator<Item = &'o str>,
        purpose: Purpose,
        reserved: bool,
    ) -> Resolution<'k, 'o> {
        let now = self.clock.now();
        let mut batch = Batch {
            lead: LeadGuard {
                cache: self.cache,
                flights: HashMap::new(),
            },
            waits: Vec::new(),
            led: false,
            keyring: self.name,
        };
        let mut results = Vec::new();
        let mut seen = HashSet::new();
        let mut hits = 0;
        for owner in owners {
            if !seen.insert(owner) {
                continue;
            }
            if let Err(error) = check_owner(owner, reserved, self.owner_id_whitespace) {
                results.push((owner.to_owned(), Err(error)));
                continue;
            }
            match self.cache.lookup(owner, now, usable(purpose)) {
                Lookup::Hit(keys) => {
                    hits += 1;
                    results.push((owner.to_owned(), Ok(keys)));
                }
                Lookup::Lead(flight) => {
                    batch.lead.flights.insert(owner.to_owned(), flight);
                }
                Lookup::Wait(flight) => batch.waits.push((owner, flight)),
            }
        }
        crate::metrics::cache_lookups(hits, batch.lead.flights.len() + batch.waits.len());
        Resolution {
            core: self,
            purpose,
            batch: Some(batch),
            state: State::Start,
            results,
        }
    }

    fn count_load(&self) {
        self.counters.key_loads.fetch_add(1, Ordering::Relaxed);
        self.count_query();
    }

    fn count_query(&self) {
        self.counters.store_queries.fetch_add(1, Ordering::Relaxed);
    }

    fn event(&self, owner: &str, action: AuditAction, version: u32, kek_id: &str) -> AuditEvent {
        AuditEvent {
            occurred_at: chrono::Utc::now().naive_utc(),
            owner_id: owner.to_owned(),
            action,
            key_version: Some(version),
            kek_id: Some(kek_id.to_owned()),
            actor: self.actor.to_owned(),
            detail: None,
        }
    }

    /// One owner's keys from all its rows, its live rows (sorted by
    /// version) and their unwrap results; the first failure is the owner's
    /// error. Each key is built where it stays (its `Dek` inside the
    /// `Arc`), never moved out of a buffer freed with its bytes.
    fn owner_keys(
        &self,
        owner: &str,
        rows: &[&StoredKey],
        live: &[&StoredKey],
        keys: impl Iterator<Item = Result<KeyBytes>>,
        fill: u64,
        audit: &mut Vec<AuditEvent>,
    ) -> Result<Arc<OwnerKeys>> {
        let single = live.len() == 1;
        let mut deks = Vec::with_capacity(if single { 0 } else { live.len() });
        let mut one = None;
        let mut current = None;
        for (i, (row, key)) in live.iter().zip(keys).enumerate() {
            let key = key?;
            self.counters.unwraps.fetch_add(1, Ordering::Relaxed);
            audit.push(self.event(owner, AuditAction::Unwrap, row.version, &row.kek_id));
            if row.state == KeyState::Active {
                current = Some(i);
            }
            let dek = Dek::new(row.version, key);
            if single {
                one = Some(dek);
            } else {
                deks.push(dek);
            }
        }
        let seals = current.and_then(|i| self.seal_counts.tally(owner, live[i].version));
        Ok(Arc::new(OwnerKeys {
            owner: owner.to_owned(),
            deks: one.map_or(Deks::Many(deks), Deks::One),
            current,
            loaded_at: self.clock.now(),
            fill,
            shredded: shredded(rows),
            blind_keys: Default::default(),
            seals,
        }))
    }

    /// The version of the owner's first data key, 1, when one may be
    /// created. An owner whose versions are all retired gets no new key
    /// here (that is a rotation decision): [`Error::NoKey`]; a shredded
    /// owner (every version destroyed) never gets one: [`Error::Shredded`].
    fn first_version(owner: &str, rows: &[&StoredKey]) -> Result<u32> {
        if rows.is_empty() {
            Ok(1)
        } else if shredded(rows) {
            Err(Error::Shredded {
                owner: owner.to_owned(),
            })
        } else {
            Err(Error::NoKey {
                owner: owner.to_owned(),
            })
        }
    }
}

/// Whether `rows`, all of one owner's, say it was crypto-shredded: it had
/// keys, and every version is destroyed.
fn shredded(rows: &[&StoredKey]) -> bool {
    !rows.is_empty() && rows.iter().all(|r| r.state == KeyState::Destroyed)
}

impl<'o> Resolution<'_, 'o> {
    /// The owners this resolution leads (and so will load), if any; asked
    /// before the first step (a driver opens its tracing span on it).
    pub(super) fn leads(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.lead.flights.len())
    }

    /// Decides the next step, given the outcome of the last one (`None` on
    /// the first call).
    ///
    /// # Panics
    /// When `input` is not the outcome of the [`Io`] last returned (a
    /// driver's bug).
    pub(super) fn step(&mut self, mut input: Option<Input>) -> Step {
        loop {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Start => {
                    let batch = self.batch.as_mut().expect("the lead is not settled yet");
                    if let Some(owners) = batch.leading() {
                        let fill = self.core.counters.fills.fetch_add(1, Ordering::SeqCst) + 1;
                        self.core.count_load();
                        self.state = State::Loading {
                            owners: owners.clone(),
                            fill,
                        };
                        return Step::Io(Io::Load(owners));
                    }
                    self.wait();
                }
                State::Loading { owners, fill } => {
                    let Some(Input::Rows(rows)) = input.take() else {
                        unreachable!("a load is answered with its rows")
                    };
                    match rows {
                        Ok(rows) => {
                            self.state =
                                State::Filling(Box::new(Fill::new(&self.core, owners, fill, rows)));
                        }
                        Err(error) => {
                            self.settle(owners, Err(error));
                            self.wait();
                        }
                    }
                }
                State::Filling(mut fill) => {
                    match fill.advance(&self.core, self.purpose, &mut input) {
                        Some(io) => {
                            self.state = State::Filling(fill);
                            return Step::Io(io);
                        }
                        None => {
                            let Fill {
                                owners,
                                audit,
                                results,
                                ..
                            } = *fill;
                            // A new key's record is written now (sealing is a
                            // write path); the unwrap records go to the
                            // background writer: a read never waits for, or
                            // needs, a write to the key store.
                            let (unwraps, generated): (Vec<_>, Vec<_>) = audit
                                .into_iter()
                                .partition(|e| e.action == AuditAction::Unwrap);
                            if !generated.is_empty() {
                                self.core.count_query();
                            }
                            self.state = State::Recording { owners, results };
                            return Step::Io(Io::Record { unwraps, generated });
                        }
                    }
                }
                State::Recording { owners, results } => {
                    let Some(Input::Recorded(recorded)) = input.take() else {
                        unreachable!("a record is answered with its outcome")
                    };
                    self.settle(owners, recorded.map(|()| results));
                    self.wait();
                }
                State::Waiting { mut waits, current } => {
                    if let Some(owner) = current {
                        match input.take() {
                            Some(Input::Waited(Ok(keys))) if usable(self.purpose)(&keys) => {
                                self.results.push((owner.to_owned(), Ok(keys)));
                            }
                            // Resolved for opening while this caller seals:
                            // resolve again.
                            Some(Input::Waited(Ok(_))) => {
                                self.state = State::Waiting {
                                    waits,
                                    current: Some(owner),
                                };
                                return Step::Io(Io::Again(owner.to_owned()));
                            }
                            // The leader's error, of the leader's kind.
                            Some(Input::Waited(Err(error))) => {
                                self.results
                                    .push((owner.to_owned(), Err(error.for_waiter())));
                            }
                            Some(Input::Resolved(result)) => {
                                self.results.push((owner.to_owned(), result));
                            }
                            _ => unreachable!("a wait is answered with the flight's result"),
                        }
                    }
                    match waits.next() {
                        Some((owner, flight)) => {
                            self.state = State::Waiting {
                                waits,
                                current: Some(owner),
                            };
                            return Step::Io(Io::Wait(flight));
                        }
                        None => return Step::Done(std::mem::take(&mut self.results)),
                    }
                }
                State::Done => unreachable!("a resolution is not stepped after it is done"),
            }
        }
    }

    /// Completes the led flights with the fill of `owners`: each owner's
    /// result, or the fill's error (the first owner gets the error itself,
    /// the others and the waiters copies of it).
    fn settle(&mut self, owners: Vec<String>, filled: Result<Vec<Resolved>>) {
        let batch = self.batch.as_mut().expect("the lead is not settled yet");
        match filled {
            Ok(filled) => {
                for (owner, result) in filled {
                    let shared = match &result {
                        Ok(keys) => Ok(keys.clone()),
                        Err(error) => Err(Arc::new(error.for_waiter())),
                    };
                    batch.lead.complete(&owner, shared);
                    self.results.push((owner, result));
                }
            }
            Err(error) => {
                let shared = Arc::new(error.for_waiter());
                let mut original = Some(error);
                for owner in owners {
                    batch.lead.complete(&owner, Err(shared.clone()));
                    let error = original.take().unwrap_or_else(|| shared.for_waiter());
                    self.results.push((owner, Err(error)));
                }
            }
        }
    }

    /// Ends the lead (any flight not settled is completed with an error)
    /// and goes on to the flights others lead.
    fn wait(&mut self) {
        let waits = self
            .batch
            .take()
            .map(|batch| batch.finish())
            .unwrap_or_default();
        self.state = State::Waiting {
            waits: waits.into_iter(),
            current: None,
        };
    }
}

/// The flights of one resolution ([`Core::start`]): those this caller
/// leads (completed with an error if it is dropped or cancelled before it
/// settles them) and those other callers lead.
struct Batch<'k, 'o> {
    lead: LeadGuard<'k>,
    waits: Vec<(&'o str, Arc<Flight>)>,
    led: bool,
    keyring: &'k str,
}

impl<'o> Batch<'_, 'o> {
    /// The owners this caller must fill, if it leads any, sorted: the same
    /// batch is loaded, unwrapped and published in the same order every
    /// time (which loom's replays of an interleaving rely on).
    fn leading(&mut self) -> Option<Vec<String>> {
        self.led = !self.lead.flights.is_empty();
        self.led.then(|| {
            let mut owners: Vec<String> = self.lead.flights.keys().cloned().collect();
            owners.sort_unstable();
            owners
        })
    }

    /// Ends the lead, and returns the flights still to wait for.
    fn finish(self) -> Vec<(&'o str, Arc<Flight>)> {
        let Batch {
            lead,
            waits,
            led,
            keyring,
        } = self;
        let cache = lead.cache;
        drop(lead);
        if led {
            crate::metrics::cache_owners(keyring, cache.len());
        }
        waits
    }
}

/// The fill of the led owners: one load, then the unwraps of every owner's
/// live rows (one batch per KEK), then every owner's keys built at once
/// (each into its `Arc`), then, when sealing, a key created for each owner
/// that has none, in turn.
struct Fill {
    owners: Vec<String>,
    fill: u64,
    rows: Vec<StoredKey>,
    /// Per owner, in order: its rows, and its live rows by version
    /// (indices into `rows`).
    groups: Vec<(String, Vec<usize>, Vec<usize>)>,
    unwrap: Option<Unwrap>,
    /// Each owner's fate once its keys are built.
    built: std::vec::IntoIter<(String, Built)>,
    creating: Option<Create>,
    audit: Vec<AuditEvent>,
    results: Vec<Resolved>,
}

/// An owner's keys as built from its rows: its result, or a key to create.
enum Built {
    Done(Result<Arc<OwnerKeys>>),
    Create(u32),
}

impl Fill {
    fn new(core: &Core<'_>, owners: Vec<String>, fill: u64, rows: Vec<StoredKey>) -> Self {
        let mut by_owner: HashMap<&str, Vec<usize>> = HashMap::new();
        for (index, row) in rows.iter().enumerate() {
            by_owner
                .entry(row.owner_id.as_str())
                .or_default()
                .push(index);
        }
        let groups: Vec<(String, Vec<usize>, Vec<usize>)> = owners
            .iter()
            .map(|owner| {
                let all = by_owner.remove(owner.as_str()).unwrap_or_default();
                let mut live: Vec<usize> = all
                    .iter()
                    .copied()
                    .filter(|&i| rows[i].state != KeyState::Destroyed)
                    .collect();
                live.sort_by_key(|&i| rows[i].version);
                (owner.clone(), all, live)
            })
            .collect();
        // Every owner's keys in one batch: the KEK may unwrap them concurrently.
        let all: Vec<&StoredKey> = groups
            .iter()
            .flat_map(|(_, _, live)| live.iter().map(|&i| &rows[i]))
            .collect();
        let unwrap = Unwrap::new(core, &all);
        Fill {
            owners,
            fill,
            groups,
            unwrap: Some(unwrap),
            built: Vec::new().into_iter(),
            creating: None,
            audit: Vec::new(),
            results: Vec::new(),
            rows,
        }
    }

    /// The next IO of the fill, or `None` once every owner has its result.
    fn advance(
        &mut self,
        core: &Core<'_>,
        purpose: Purpose,
        input: &mut Option<Input>,
    ) -> Option<Io> {
        if let Some(unwrap) = &mut self.unwrap {
            if let Some(Input::Unwrapped(unwrapped)) = input.take() {
                unwrap.answer(unwrapped);
            }
            if let Some(io) = unwrap.ask() {
                return Some(io);
            }
            let unwrap = self.unwrap.take().expect("present");
            self.build(core, purpose, unwrap.finish());
        }
        loop {
            if let Some(create) = &mut self.creating {
                let result = match create.advance(core, self.fill, input, &mut self.audit) {
                    Ok(Created::Io(io)) => return Some(io),
                    Ok(Created::Keys(keys)) => Ok(keys),
                    Err(error) => Err(error),
                };
                let owner = self.creating.take().expect("present").owner;
                self.results.push((owner, result));
                continue;
            }
            match self.built.next()? {
                (owner, Built::Done(result)) => self.results.push((owner, result)),
                (owner, Built::Create(version)) => {
                    self.creating = Some(Create {
                        owner,
                        version,
                        stage: CreateStage::Generate,
                    });
                }
            }
        }
    }

    /// Builds every owner's keys from the unwrapped keys, in the step that
    /// received them: each data key goes into its `Arc` before the driver's
    /// next call (no key is held inline by a driver; an async one's future
    /// is freed unwiped), creations included.
    fn build(&mut self, core: &Core<'_>, purpose: Purpose, unwrapped: Vec<Result<KeyBytes>>) {
        let mut unwrapped = unwrapped.into_iter();
        let mut built = Vec::with_capacity(self.groups.len());
        for (owner, all, live) in std::mem::take(&mut self.groups) {
            let rows: Vec<&StoredKey> = all.iter().map(|&i| &self.rows[i]).collect();
            let live: Vec<&StoredKey> = live.iter().map(|&i| &self.rows[i]).collect();
            // Collected: `owner_keys` stops at an owner's first failure, and
            // the rest of its results must not be left for the next owner.
            let keys: Vec<_> = unwrapped.by_ref().take(live.len()).collect();
            let keys = keys.into_iter();
            let loaded = core.owner_keys(&owner, &rows, &live, keys, self.fill, &mut self.audit);
            let fate = match loaded {
                Ok(keys) if purpose == Purpose::Seal && keys.current.is_none() => {
                    drop(keys);
                    match Core::first_version(&owner, &rows) {
                        Ok(version) => Built::Create(version),
                        Err(error) => Built::Done(Err(error)),
                    }
                }
                other => Built::Done(other),
            };
            built.push((owner, fate));
        }
        self.built = built.into_iter();
    }
}

/// The creation of an owner's first data key. Two processes racing here
/// both insert if absent; the loser reads and unwraps the winner's key, so
/// nothing is ever sealed under a key the store did not keep.
struct Create {
    owner: String,
    version: u32,
    stage: CreateStage,
}

/// What a creation's step came to (an `Io` is moved once, to the driver:
/// boxing it would cost an allocation a step for nothing).
#[allow(clippy::large_enum_variant)]
enum Created {
    Io(Io),
    Keys(Arc<OwnerKeys>),
}

enum CreateStage {
    /// Ask the primary KEK for a key.
    Generate,
    /// Generated: waiting for the key.
    Generating,
    /// The key is in its `Arc`; its row is being inserted.
    Inserting(Arc<OwnerKeys>),
    /// Another process won: its rows are being loaded.
    Reloading,
    /// The winner's rows are being unwrapped.
    Unwrapping(Vec<StoredKey>, Unwrap),
    Taken,
}

impl Create {
    /// The next IO, or the owner's keys; an error is the owner's.
    fn advance(
        &mut self,
        core: &Core<'_>,
        fill: u64,
        input: &mut Option<Input>,
        audit: &mut Vec<AuditEvent>,
    ) -> Result<Created> {
        let owner = self.owner.as_str();
        let version = self.version;
        let kek = core.primary;
        loop {
            match std::mem::replace(&mut self.stage, CreateStage::Taken) {
                CreateStage::Generate => {
                    self.stage = CreateStage::Generating;
                    return Ok(Created::Io(Io::Generate {
                        kek: kek.clone(),
                        owner: owner.to_owned(),
                        version,
                    }));
                }
                CreateStage::Generating => {
                    let Some(Input::Generated(generated)) = input.take() else {
                        unreachable!("a generate is answered with the key")
                    };
                    let (key, wrapped) = generated.map_err(|source| Error::Kek {
                        kek_id: kek.id().to_owned(),
                        owner: owner.to_owned(),
                        key_version: version,
                        source,
                    })?;
                    // The new key goes into its `Arc` now, before the
                    // insert: dropped (and wiped) if another process wins.
                    let created = Arc::new(OwnerKeys {
                        owner: owner.to_owned(),
                        deks: Deks::One(Dek::new(version, key)),
                        current: Some(0),
                        loaded_at: core.clock.now(),
                        fill,
                        shredded: false,
                        blind_keys: Default::default(),
                        seals: core.seal_counts.tally(owner, version),
                    });
                    let row = StoredKey::active(owner, version, kek.id(), wrapped);
                    core.count_query();
                    self.stage = CreateStage::Inserting(created);
                    return Ok(Created::Io(Io::Insert {
                        row,
                        record: core.event(owner, AuditAction::Generate, version, kek.id()),
                    }));
                }
                CreateStage::Inserting(created) => {
                    let Some(Input::Inserted(inserted)) = input.take() else {
                        unreachable!("an insert is answered with its outcome")
                    };
                    if inserted? {
                        // Its `generate` record was written with it.
                        core.count_query();
                        core.counters.creations.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            owner = %core.owner_telemetry.render(owner),
                            version,
                            kek = kek.id(),
                            "generated a data key"
                        );
                        return Ok(Created::Keys(created));
                    }
                    // Another process won the race: use its key, never ours.
                    drop(created);
                    core.count_load();
                    self.stage = CreateStage::Reloading;
                    return Ok(Created::Io(Io::Load(vec![owner.to_owned()])));
                }
                CreateStage::Reloading => {
                    let Some(Input::Rows(rows)) = input.take() else {
                        unreachable!("a load is answered with its rows")
                    };
                    let rows = rows?;
                    // The winner's row, byte for byte this owner's: never a
                    // key of another owner that the store took as equal.
                    crate::store::check_key_owners(
                        "loading the data key another process created",
                        &[owner],
                        &rows,
                    )?;
                    let unwrap = Unwrap::new(core, &live_sorted(&rows.iter().collect::<Vec<_>>()));
                    self.stage = CreateStage::Unwrapping(rows, unwrap);
                }
                CreateStage::Unwrapping(rows, mut unwrap) => {
                    if let Some(Input::Unwrapped(unwrapped)) = input.take() {
                        unwrap.answer(unwrapped);
                    }
                    if let Some(io) = unwrap.ask() {
                        self.stage = CreateStage::Unwrapping(rows, unwrap);
                        return Ok(Created::Io(io));
                    }
                    let all: Vec<&StoredKey> = rows.iter().collect();
                    let live = live_sorted(&all);
                    let keys = core.owner_keys(
                        owner,
                        &all,
                        &live,
                        unwrap.finish().into_iter(),
                        fill,
                        audit,
                    )?;
                    if keys.current.is_none() {
                        return Err(Error::NoKey {
                            owner: owner.to_owned(),
                        });
                    }
                    return Ok(Created::Keys(keys));
                }
                CreateStage::Taken => unreachable!("a finished creation is not advanced"),
            }
        }
    }
}

/// One KEK's share of an unwrap: the KEK, its rows' indices, and their
/// `(owner, version, wrapped key)` requests.
type KekBatch = (
    Arc<dyn KeyEncryptionKey>,
    Vec<usize>,
    Vec<(String, u32, Vec<u8>)>,
);

/// The unwraps of rows of any owners, one result per row in order: one
/// `unwrap_many` per KEK, so a remote KEK can send the requests
/// concurrently.
struct Unwrap {
    /// Each row's owner, version and KEK, to name them in errors.
    rows: Vec<(String, u32, String)>,
    results: Vec<Option<Result<KeyBytes>>>,
    /// The KEKs still to ask, with their requests' rows.
    pending: Vec<KekBatch>,
    /// The rows of the request being answered.
    asked: Vec<usize>,
}

impl Unwrap {
    fn new(core: &Core<'_>, rows: &[&StoredKey]) -> Self {
        let mut results: Vec<Option<Result<KeyBytes>>> = rows.iter().map(|_| None).collect();
        let mut by_kek: HashMap<&str, Vec<usize>> = HashMap::new();
        for (index, row) in rows.iter().enumerate() {
            by_kek.entry(row.kek_id.as_str()).or_default().push(index);
        }
        let mut pending = Vec::new();
        for (kek_id, indices) in by_kek {
            let Some(kek) = core.keks.get(kek_id) else {
                for index in indices {
                    let row = rows[index];
                    results[index] = Some(Err(Error::UnknownKek {
                        owner: row.owner_id.clone(),
                        key_version: row.version,
                        kek_id: row.kek_id.clone(),
                    }));
                }
                continue;
            };
            let requests = indices
                .iter()
                .map(|&i| {
                    (
                        rows[i].owner_id.clone(),
                        rows[i].version,
                        rows[i].wrapped_key.clone(),
                    )
                })
                .collect();
            pending.push((kek.clone(), indices, requests));
        }
        Unwrap {
            rows: rows
                .iter()
                .map(|r| (r.owner_id.clone(), r.version, r.kek_id.clone()))
                .collect(),
            results,
            pending,
            asked: Vec::new(),
        }
    }

    /// The next KEK's batch, if any is left.
    fn ask(&mut self) -> Option<Io> {
        let (kek, indices, requests) = self.pending.pop()?;
        self.asked = indices;
        Some(Io::Unwrap { kek, requests })
    }

    /// The answer to the batch last asked.
    fn answer(&mut self, unwrapped: Vec<std::result::Result<KeyBytes, BoxError>>) {
        for (index, result) in std::mem::take(&mut self.asked).into_iter().zip(unwrapped) {
            let (owner, key_version, kek_id) = &self.rows[index];
            self.results[index] = Some(result.map_err(|source| Error::Kek {
                kek_id: kek_id.clone(),
                owner: owner.clone(),
                key_version: *key_version,
                source,
            }));
        }
    }

    fn finish(self) -> Vec<Result<KeyBytes>> {
        self.results
            .into_iter()
            .zip(self.rows)
            .map(|(result, (owner, version, kek_id))| {
                result.unwrap_or_else(|| {
                    Err(Error::KeyUnavailable {
                        owner,
                        reason: format!("KEK {kek_id:?} returned no result for version {version}"),
                    })
                })
            })
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::sync::{Arc, Mutex};

    use crate::dek::KeyBytes;
    use crate::error::{ErrorKind, Result};
    use crate::kek::LocalKek;
    use crate::keyring::Keyring;
    use crate::store::{AuditAction, AuditEvent, KeyStore, MemoryKeyStore, StoredKey};

    /// A key store whose next load, once armed, says it arrived and parks
    /// until the test lets it go: a resolution held at a fixed point.
    #[derive(Debug)]
    struct ParkedStore {
        inner: MemoryKeyStore,
        armed: AtomicBool,
        parked: Mutex<Sender<()>>,
        go: Mutex<Receiver<()>>,
    }

    impl KeyStore for ParkedStore {
        fn load_keys(&self, owners: &[&str]) -> Result<Vec<StoredKey>> {
            if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.parked
                    .lock()
                    .expect("lock")
                    .send(())
                    .expect("the test");
                self.go.lock().expect("lock").recv().expect("the test");
            }
            self.inner.load_keys(owners)
        }
        crate::store::forward_key_store!(inner; insert_key_if_absent, append_audit, owners, kek_check, insert_kek_check_if_absent, keys_page);
    }

    /// A keyring over a [`ParkedStore`] in which `owner` was shredded, its
    /// cache empty; the store's receiver of arrivals and sender of
    /// releases.
    fn shredded_owner(owner: &str) -> (Keyring, Arc<ParkedStore>, Receiver<()>, Sender<()>) {
        let (parked, arrivals) = channel();
        let (release, go) = channel();
        let store = Arc::new(ParkedStore {
            inner: MemoryKeyStore::new(),
            armed: AtomicBool::new(false),
            parked: Mutex::new(parked),
            go: Mutex::new(go),
        });
        let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
        let keyring = Keyring::builder(store.clone(), kek)
            .build()
            .expect("keyring");
        keyring.keys_for_seal(owner).expect("a key");
        let destroy = AuditEvent {
            occurred_at: chrono::Utc::now().naive_utc(),
            owner_id: owner.to_owned(),
            action: AuditAction::Destroy,
            key_version: None,
            kek_id: None,
            actor: "test".to_owned(),
            detail: None,
        };
        store
            .inner
            .destroy_keys(owner, None, &destroy)
            .expect("shredded");
        keyring.clear(owner);
        store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        (keyring, store, arrivals, release)
    }

    /// Returns once a second caller waits on the flight resolving `owner`
    /// (the cache, the leader and the waiter hold it).
    fn until_a_waiter_joins(keyring: &Keyring, owner: &str) {
        while keyring.inner.cache.flight_holders(owner) < 3 {
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_waiter_gets_the_error_kind_of_the_resolution_it_waited_for() {
        let (keyring, _store, arrivals, release) = shredded_owner("gone");
        std::thread::scope(|s| {
            let leader = s.spawn(|| keyring.keys_for_seal("gone"));
            // The leader is loading the owner's rows, its flight in the cache.
            arrivals.recv().expect("the leader's load");
            let waiter = s.spawn(|| keyring.keys_for_seal("gone"));
            until_a_waiter_joins(&keyring, "gone");
            release.send(()).expect("the leader");
            let leader = leader.join().expect("no panic").expect_err("shredded");
            let waiter = waiter.join().expect("no panic").expect_err("shredded");
            assert_eq!(leader.kind(), ErrorKind::Shredded, "{leader}");
            assert_eq!(waiter.kind(), ErrorKind::Shredded, "{waiter}");
            assert!(!waiter.is_retryable());
            assert_eq!(waiter.to_string(), leader.to_string());
        });
    }

    #[cfg(feature = "async")]
    #[test]
    fn an_async_waiter_gets_the_error_kind_of_the_resolution_it_waited_for() {
        let (keyring, _store, arrivals, release) = shredded_owner("gone");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let leader = {
            let keyring = keyring.clone();
            runtime.spawn(async move { keyring.keys_for_seal_async("gone").await })
        };
        arrivals.recv().expect("the leader's load");
        let waiter = {
            let keyring = keyring.clone();
            runtime.spawn(async move { keyring.keys_for_seal_async("gone").await })
        };
        until_a_waiter_joins(&keyring, "gone");
        release.send(()).expect("the leader");
        let leader = runtime
            .block_on(leader)
            .expect("no panic")
            .expect_err("shredded");
        let waiter = runtime
            .block_on(waiter)
            .expect("no panic")
            .expect_err("shredded");
        assert_eq!(leader.kind(), ErrorKind::Shredded, "{leader}");
        assert_eq!(waiter.kind(), ErrorKind::Shredded, "{waiter}");
        assert!(!waiter.is_retryable());
    }

    #[cfg(feature = "async")]
    #[test]
    fn a_cancelled_leader_leaves_its_waiter_a_retryable_error() {
        let (keyring, _store, arrivals, release) = shredded_owner("gone");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let leader = {
            let keyring = keyring.clone();
            runtime.spawn(async move { keyring.keys_for_seal_async("gone").await })
        };
        arrivals.recv().expect("the leader's load");
        let waiter = {
            let keyring = keyring.clone();
            runtime.spawn(async move { keyring.keys_for_seal_async("gone").await })
        };
        until_a_waiter_joins(&keyring, "gone");
        leader.abort();
        let waiter = runtime
            .block_on(waiter)
            .expect("no panic")
            .expect_err("abandoned");
        assert_eq!(waiter.kind(), ErrorKind::Unavailable, "{waiter}");
        assert!(waiter.is_retryable());
        release.send(()).expect("the parked load");
    }
}
/// Inserts a new data key row unless one exists and, when this call
/// inserted it, writes its `generate` record: the one IO both drivers run
/// for [`Io::Insert`] (the async one on a blocking task that runs to its
/// end even when its caller is dropped).
pub(super) fn insert_key(
    store: &dyn crate::KeyStore,
    row: &StoredKey,
    record: &AuditEvent,
) -> Result<bool> {
    let inserted = store.insert_key_if_absent(row)?;
    if inserted {
        store.append_audit(std::slice::from_ref(record))?;
    }
    Ok(inserted)
}
