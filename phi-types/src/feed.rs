//! The key-event feed: what every process sharing a key store must follow.
//!
//! Every key life-cycle change ([`lifecycle::shred`](crate::lifecycle::shred),
//! [`rotate`](crate::lifecycle::rotate), [`retire`](crate::lifecycle::retire),
//! [`rewrap`](crate::lifecycle::rewrap)), every roll-out change
//! ([`lifecycle::set_rollout`](crate::lifecycle::set_rollout)) and every
//! fleet-wide cache clear ([`lifecycle::clear_cache_fleet`](crate::lifecycle::clear_cache_fleet))
//! appends a [`KeyEvent`] to `phi_key_events`, in the same transaction as
//! the change itself: a change is never committed without its event, nor an
//! event without its change.
//!
//! Ids increase by one per event, in commit order: appending first
//! increments `phi_key_feed.head`, whose row lock orders concurrent
//! appenders, so a reader that has read event `n` has read every event
//! before it (no gaps to wait for).
//!
//! A following keyring (the default over a store with the feed's tables,
//! see [`KeyringBuilder::follow_feed`](crate::KeyringBuilder::follow_feed))
//! reads the events after its position once per interval and applies them:
//! see [`KeyEventKind`] for what each does.
//!
//! Kinds are open: the schema only refuses an empty kind, so that a newer
//! build can add one during a rolling upgrade. An older keyring reads it as
//! [`KeyEventKind::Unknown`] and applies it conservatively (it drops the
//! owner the event names, or every owner), counts it
//! (`phi_feed_unknown_events_total`), logs its id and kind, and reads on:
//! no event ever stops a follower. Stores check the kinds they write
//! ([`check_writable`]).
//!
//! ```
//! use std::sync::Arc;
//! use phi_types::{lifecycle, Keyring, LocalKek, MemoryKeyStore, KeyBytes, Rollout};
//! use phi_types::feed::KeyEventKind;
//!
//! let kek = Arc::new(LocalKek::new("local-1", &KeyBytes::new([7; 32])));
//! let keyring = Keyring::builder(Arc::new(MemoryKeyStore::new()), kek).build()?;
//! let before = lifecycle::feed_head(keyring.store().as_ref())?;
//! lifecycle::set_rollout(&keyring, &Rollout::owners(["provider-17"]))?;
//! lifecycle::clear_cache_fleet(&keyring, Some("provider-17"))?;
//! let events = keyring.store().key_events_after(before, 100)?;
//! let kinds: Vec<KeyEventKind> = events.iter().map(|e| e.event.kind).collect();
//! assert_eq!(kinds, [KeyEventKind::Rollout, KeyEventKind::Clear]);
//! assert_eq!(lifecycle::feed_head(keyring.store().as_ref())?, before + 2);
//! # Ok::<(), phi_types::Error>(())
//! ```

use std::fmt;

use chrono::NaiveDateTime;

/// What happened, as stored in `phi_key_events.kind`, and what a following
/// keyring does about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyEventKind {
    /// An owner was crypto-shredded: followers drop the owner's cached keys,
    /// so their next seal fails with [`Error::Shredded`](crate::Error::Shredded)
    /// and their next open finds no key.
    Shred,
    /// A data key version was added for an owner: followers drop the
    /// owner's cached keys, so the next use loads every version and seals
    /// under the new one.
    Rotate,
    /// A data key version of an owner was retired: followers drop the
    /// owner's cached keys.
    Retire,
    /// A data key was rewrapped under another KEK: followers drop the
    /// owner's cached keys (the key itself is unchanged).
    Rewrap,
    /// The fleet's roll-out policy (`phi_rollout`) changed: followers read
    /// it and apply it.
    Rollout,
    /// A cache clear, for one owner or (no owner) for every owner:
    /// followers drop those cached keys.
    Clear,
    /// A kind this build does not know, read from the feed (written by a
    /// newer build during a rolling upgrade; its text is in
    /// [`FeedEvent::stored_kind`]). Followers apply it conservatively:
    /// they drop the named owner's cached keys, or every owner's when the
    /// event names none, count it (`phi_feed_unknown_events_total`), log
    /// its id and kind, and read on. Never written: a store refuses to
    /// append an event of this kind.
    Unknown,
}

impl KeyEventKind {
    /// The text stored in `phi_key_events.kind`; `"unknown"` for
    /// [`Unknown`](Self::Unknown), which is never stored (the stored text
    /// of an unknown event is [`FeedEvent::stored_kind`]).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyEventKind::Shred => "shred",
            KeyEventKind::Rotate => "rotate",
            KeyEventKind::Retire => "retire",
            KeyEventKind::Rewrap => "rewrap",
            KeyEventKind::Rollout => "rollout",
            KeyEventKind::Clear => "clear",
            KeyEventKind::Unknown => "unknown",
        }
    }

    /// Whether an event of this kind may be appended to the feed: every
    /// kind but [`Unknown`](Self::Unknown). The database accepts any
    /// non-empty kind (so that an older build's schema never stops a newer
    /// build's events); this is the check made when writing.
    pub fn is_writable(self) -> bool {
        !matches!(self, KeyEventKind::Unknown)
    }

    /// Parses the stored text: `None` for a kind this build does not know
    /// (a store reads it as [`Unknown`](Self::Unknown)).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "shred" => KeyEventKind::Shred,
            "rotate" => KeyEventKind::Rotate,
            "retire" => KeyEventKind::Retire,
            "rewrap" => KeyEventKind::Rewrap,
            "rollout" => KeyEventKind::Rollout,
            "clear" => KeyEventKind::Clear,
            _ => return None,
        })
    }
}

impl fmt::Display for KeyEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One event to append to the feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEvent {
    /// When it happened (UTC).
    pub occurred_at: NaiveDateTime,
    /// What happened.
    pub kind: KeyEventKind,
    /// Whose keys; `None` for every owner (a fleet-wide clear, a roll-out
    /// change).
    pub owner_id: Option<String>,
    /// Which data key version, if one.
    pub key_version: Option<u32>,
    /// Who did it (service name, operator).
    pub actor: String,
    /// Free text for the operator; never key bytes or plaintext.
    pub detail: Option<String>,
}

impl KeyEvent {
    /// An event of `kind` for `owner` (or every owner), happening now.
    pub fn new(kind: KeyEventKind, owner_id: Option<&str>, actor: impl Into<String>) -> Self {
        KeyEvent {
            occurred_at: chrono::Utc::now().naive_utc(),
            kind,
            owner_id: owner_id.map(str::to_owned),
            key_version: None,
            actor: actor.into(),
            detail: None,
        }
    }

    /// The same event naming data key version `version`.
    #[must_use]
    pub fn with_version(mut self, version: u32) -> Self {
        self.key_version = Some(version);
        self
    }

    /// The same event with operator text `detail`.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// One stored event, from [`KeyStore::key_events_after`](crate::KeyStore::key_events_after).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedEvent {
    /// `phi_key_events.id`: 1, 2, 3, ... in commit order.
    pub id: i64,
    /// The event. Its kind is [`KeyEventKind::Unknown`] when the stored
    /// kind is not one this build knows.
    pub event: KeyEvent,
    /// The text stored in `phi_key_events.kind`: the kind's
    /// [`as_str`](KeyEventKind::as_str), or for an unknown kind the text as
    /// stored.
    pub stored_kind: String,
}

impl FeedEvent {
    /// Event `id`, as stored from `event` (its kind's text as the stored
    /// kind).
    pub fn new(id: i64, event: KeyEvent) -> Self {
        let stored_kind = event.kind.as_str().to_owned();
        FeedEvent {
            id,
            event,
            stored_kind,
        }
    }

    /// Event `id` as read from a store whose `kind` column holds
    /// `stored_kind`: parsed, or [`KeyEventKind::Unknown`] when this build
    /// does not know it (`event.kind` is then replaced).
    pub fn read(id: i64, mut event: KeyEvent, stored_kind: String) -> Self {
        event.kind = KeyEventKind::parse(&stored_kind).unwrap_or(KeyEventKind::Unknown);
        FeedEvent {
            id,
            event,
            stored_kind,
        }
    }
}

/// Refuses to append `events` when one of them is of a kind that cannot be
/// written ([`KeyEventKind::Unknown`]). Every store calls it before writing.
///
/// # Errors
/// [`Error::InvalidInput`](crate::Error::InvalidInput) naming the event.
pub fn check_writable(events: &[KeyEvent]) -> crate::Result<()> {
    match events.iter().find(|e| !e.kind.is_writable()) {
        None => Ok(()),
        Some(e) => Err(crate::Error::InvalidInput {
            what: "key event",
            reason: format!(
                "an event of kind {} (for owner {:?}) cannot be appended to the key-event feed: \
                 only the kinds this build knows are written",
                e.kind,
                e.owner_id.as_deref().unwrap_or("*")
            ),
        }),
    }
}

pub use crate::connection::{FEED_CHANNEL, FeedListener, feed_channel};

/// How far one following keyring has read the feed, from
/// [`KeyStore::feed_readers`](crate::KeyStore::feed_readers)
/// (`phi_feed_readers`). Written by the keyring at most once per interval.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedReader {
    /// The reader's name: [`KeyringBuilder::feed_reader`](crate::KeyringBuilder::feed_reader),
    /// by default `host:pid`.
    pub reader: String,
    /// The id of the last event it had applied.
    pub position: i64,
    /// When it recorded that (UTC).
    pub updated_at: NaiveDateTime,
}

impl FeedReader {
    /// A reader at `position`, recorded at `updated_at`.
    pub fn new(reader: impl Into<String>, position: i64, updated_at: NaiveDateTime) -> Self {
        FeedReader {
            reader: reader.into(),
            position,
            updated_at,
        }
    }

    /// How many events the reader is behind the feed's `head` (zero when
    /// it is at or past it).
    pub fn behind(&self, head: i64) -> i64 {
        head.saturating_sub(self.position).max(0)
    }

    /// Time since the reader recorded its position (zero for a record
    /// stamped in the future by a clock ahead of this one).
    pub fn age(&self) -> std::time::Duration {
        (chrono::Utc::now().naive_utc() - self.updated_at)
            .to_std()
            .unwrap_or_default()
    }
}
