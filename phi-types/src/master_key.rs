//! A local master key that can be backed up, split and recovered (feature
//! `cli`): what `phi master-key generate | split | combine | verify` run.
//!
//! # Key files
//!
//! A master key file is what `PHI_MASTER_KEY_FILE` names (and what
//! `PHI_MASTER_KEY` holds): the 32 key bytes in standard base64 with
//! padding (44 characters), followed by a newline. [`write_key_file`]
//! creates it with mode `0600` on Unix and never replaces a file that
//! exists.
//!
//! # Share format `phi-share-v1` (interoperable)
//!
//! [`split`] cuts a 32-byte master key into `N` shares of which any `K`
//! rebuild it ([`combine`]) and any `K − 1` tell nothing about it:
//! Shamir's secret sharing over GF(2⁸), byte by byte. Each share is one
//! line of printable ASCII, eight fields separated by `:`:
//!
//! ```text
//! phi-share-v1:<split>:<K>:<N>:<id>:<key check>:<value>:<checksum>
//! ```
//!
//! | field | form | meaning |
//! |---|---|---|
//! | `phi-share-v1` | literal | format and version |
//! | split | 16 hex digits | 8 random bytes drawn once per split, the same in each of its shares: shares of two splits are never combined |
//! | K | decimal `2`–`255` | the threshold: shares needed to rebuild the key |
//! | N | decimal `K`–`255` | shares made by the split |
//! | id | decimal `1`–`N` | the share's x coordinate |
//! | key check | 16 hex digits | `HMAC-SHA256(key = master key, msg = "phi-share-v1" ‖ split bytes)[..8]`: confirms the rebuilt key (one-way; not secret) |
//! | value | 64 hex digits | `y[i] = f_i(id)` for each key byte `i` (0–31) |
//! | checksum | 8 hex digits | `SHA-256(the share's text up to, not including, its last ":")[..4]`, over the lower-case text: catches a mistyped or damaged share |
//!
//! Decimal fields have no sign and no leading zeros. For key byte `i`,
//! `f_i(x) = key[i] + a_{i,1}·x + … + a_{i,K−1}·x^(K−1)` over GF(2⁸) with
//! the AES reduction polynomial `x⁸ + x⁴ + x³ + x + 1` (`0x11b`), the
//! coefficients `a` drawn uniformly from all 256 field elements (zero
//! included) from a ChaCha20 generator seeded by the operating system, and
//! wiped after use. The key is `f_i(0)`, found by Lagrange interpolation
//! at 0 from any `K` shares.
//!
//! Hex digits are written lower-case; a reader accepts either case (the
//! checksum is taken over the lower-cased text) and ignores whitespace
//! around a share. In a file of shares, blank lines and lines beginning
//! with `#` are skipped.
//!
//! A share is secret material: `K` of them are the key. [`MasterKeyShare`]
//! wipes its value on drop, shows no value in `Debug`, and has no
//! `Display`: its text comes from [`MasterKeyShare::to_text`], in a buffer
//! wiped on drop. No error here ever holds a share's value or a key.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20::ChaCha20Rng;
use chacha20::rand_core::SeedableRng as _;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use vsss_rs::{DefaultShare, Gf256, IdentifierGf256, Polynomial as _};
use zeroize::Zeroizing;

use crate::dek::KeyBytes;

/// The first field of every share: the format and its version.
pub const SHARE_FORMAT: &str = "phi-share-v1";

/// Hex digits of a share's split id (8 bytes).
const SPLIT_LEN: usize = 8;
/// Bytes of a share's key check.
const KEY_CHECK_LEN: usize = 8;
/// Bytes of a share's checksum.
const CHECKSUM_LEN: usize = 4;

/// One point of the per-byte polynomials, as `vsss-rs` evaluates them.
type GfPoint = DefaultShare<IdentifierGf256, IdentifierGf256>;

/// Why shares could not be made, read or combined. Each names the share
/// (its id and split, and where it was read from) but never its value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// The text is not a `phi-share-v1` share.
    #[error("{origin}: not a {SHARE_FORMAT} master key share: {reason}")]
    Malformed {
        /// Where the text came from (`FILE line N`).
        origin: String,
        /// What is wrong with it (never its content).
        reason: String,
    },
    /// The share's checksum does not match its text.
    #[error(
        "{origin}: share {id} of split {split} is damaged: its checksum does not match its \
         text (a character mistyped or changed)"
    )]
    Checksum {
        /// Where the share came from.
        origin: String,
        /// The share's id, as written.
        id: String,
        /// The share's split id, as written.
        split: String,
    },
    /// No share was given.
    #[error("no share given: pass share files, or shares on standard input, one a line")]
    NoShares,
    /// The same share id twice.
    #[error("share {id} of split {split} is given twice ({first} and {second})")]
    Duplicate {
        /// The share id.
        id: u8,
        /// The split id.
        split: String,
        /// Where the first copy came from.
        first: String,
        /// Where the second copy came from.
        second: String,
    },
    /// Shares of two different splits.
    #[error(
        "{second} is share {second_id} of split {second_split}, but {first} is share \
         {first_id} of split {first_split}: shares of two splits cannot be combined (use \
         the shares of one split only)"
    )]
    MixedSplits {
        /// Where the first share came from.
        first: String,
        /// Its id.
        first_id: u8,
        /// Its split.
        first_split: String,
        /// Where the share of the other split came from.
        second: String,
        /// Its id.
        second_id: u8,
        /// Its split.
        second_split: String,
    },
    /// A share of the same split states another threshold, share count or
    /// key check than the first share.
    #[error(
        "{origin}: share {id} says {field} {found} where {first} says {expected}, of the \
         same split: one of them is damaged"
    )]
    Inconsistent {
        /// Where the share came from.
        origin: String,
        /// Its id.
        id: u8,
        /// The field (`threshold`, `share count`, `key check`).
        field: &'static str,
        /// What this share says.
        found: String,
        /// Where the first share came from.
        first: String,
        /// What the first share says.
        expected: String,
    },
    /// Fewer shares than the split's threshold.
    #[error(
        "{given} share(s) of split {split} given ({ids}): it needs {threshold}, any \
         {threshold} of its {shares}"
    )]
    TooFew {
        /// Shares given.
        given: usize,
        /// Their ids.
        ids: String,
        /// The split id.
        split: String,
        /// The threshold.
        threshold: u8,
        /// The split's share count.
        shares: u8,
    },
    /// The shares combine to a key that does not match their key check.
    #[error(
        "shares {ids} of split {split} do not rebuild the key they were split from (its key \
         check does not match): one of them was altered and its checksum recomputed, or was \
         not made by that split"
    )]
    KeyCheck {
        /// The shares' ids.
        ids: String,
        /// The split id.
        split: String,
    },
    /// A split asked for impossible numbers.
    #[error("cannot split the master key: {0}")]
    Parameters(String),
    /// The random source or the sharing itself failed.
    #[error("cannot split the master key: {0}")]
    Split(String),
}

/// One share of a split master key (see the [module](self) for its text
/// form). Its value is wiped on drop and never shown by `Debug`.
#[derive(Clone)]
pub struct MasterKeyShare {
    split: [u8; SPLIT_LEN],
    threshold: u8,
    shares: u8,
    id: u8,
    key_check: [u8; KEY_CHECK_LEN],
    value: Zeroizing<[u8; 32]>,
    origin: Option<String>,
}

impl MasterKeyShare {
    /// The share's id (its x coordinate), `1..=shares()`.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Shares needed to rebuild the key.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// Shares the split made.
    pub fn shares(&self) -> u8 {
        self.shares
    }

    /// The split's id, 16 hex digits: the same in every share of a split.
    pub fn split_id(&self) -> String {
        hex::encode(self.split)
    }

    /// Where the share was read from (`FILE line N`), when it was read by
    /// [`parse_shares`].
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// The share as text (one line, no newline), in a buffer wiped on drop.
    pub fn to_text(&self) -> Zeroizing<String> {
        let body = self.body();
        let sum = hex::encode(checksum(&body));
        let mut text = Zeroizing::new(String::with_capacity(body.len() + 1 + sum.len()));
        text.push_str(&body);
        text.push(':');
        text.push_str(&sum);
        text
    }

    /// Everything before the checksum.
    fn body(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{SHARE_FORMAT}:{}:{}:{}:{}:{}:{}",
            hex::encode(self.split),
            self.threshold,
            self.shares,
            self.id,
            hex::encode(self.key_check),
            Zeroizing::new(hex::encode(&self.value[..])).as_str(),
        ))
    }

    /// Reads one share from its text (whitespace around it ignored, hex in
    /// either case). `origin` names it in errors (`FILE line N`).
    ///
    /// # Errors
    /// [`ShareError::Malformed`] when the text is not a share,
    /// [`ShareError::Checksum`] when its checksum does not match.
    pub fn parse(text: &str, origin: &str) -> Result<MasterKeyShare, ShareError> {
        let malformed = |reason: String| ShareError::Malformed {
            origin: origin.to_owned(),
            reason,
        };
        let text = Zeroizing::new(text.trim().to_ascii_lowercase());
        let fields: Vec<&str> = text.split(':').collect();
        if fields.first() != Some(&SHARE_FORMAT) {
            return Err(malformed(format!(
                "it does not begin with \"{SHARE_FORMAT}:\""
            )));
        }
        if fields.len() != 8 {
            return Err(malformed(format!(
                "it has {} \":\"-separated fields, a share has 8 \
                 ({SHARE_FORMAT}:split:threshold:shares:id:key-check:value:checksum)",
                fields.len()
            )));
        }
        let split: [u8; SPLIT_LEN] = hex_field(fields[1], "split id", &malformed)?;
        let split_hex = fields[1].to_owned();
        let threshold = decimal_field(fields[2], "threshold", &malformed)?;
        let shares = decimal_field(fields[3], "share count", &malformed)?;
        let id = decimal_field(fields[4], "share id", &malformed)?;
        let key_check: [u8; KEY_CHECK_LEN] = hex_field(fields[5], "key check", &malformed)?;
        let value = Zeroizing::new(hex_field::<32>(fields[6], "value", &malformed)?);
        let sum: [u8; CHECKSUM_LEN] = hex_field(fields[7], "checksum", &malformed)?;
        let body_len = text.len() - fields[7].len() - 1;
        if checksum(&text[..body_len]) != sum {
            return Err(ShareError::Checksum {
                origin: origin.to_owned(),
                id: fields[4].to_owned(),
                split: split_hex,
            });
        }
        // Checked after the checksum: a share whose checksum matches was
        // written so, not mistyped.
        if threshold < 2 {
            return Err(malformed(format!(
                "threshold {threshold}: at least 2 shares rebuild a key"
            )));
        }
        if shares < threshold {
            return Err(malformed(format!(
                "share count {shares} is below its threshold {threshold}"
            )));
        }
        if id == 0 || id > shares {
            return Err(malformed(format!(
                "share id {id} is not between 1 and its share count {shares}"
            )));
        }
        Ok(MasterKeyShare {
            split,
            threshold,
            shares,
            id,
            key_check,
            value,
            origin: Some(origin.to_owned()),
        })
    }

    /// Where the share came from, else `unknown`.
    fn origin_or(&self, unknown: &str) -> String {
        self.origin.clone().unwrap_or_else(|| unknown.to_owned())
    }

    /// How errors name this share.
    fn named(&self) -> String {
        match &self.origin {
            Some(origin) => format!("{origin} (share {})", self.id),
            None => format!("share {}", self.id),
        }
    }
}

impl fmt::Debug for MasterKeyShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKeyShare")
            .field("split", &self.split_id())
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("id", &self.id)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Lower-case hex of exactly `N` bytes.
fn hex_field<const N: usize>(
    text: &str,
    what: &str,
    malformed: &dyn Fn(String) -> ShareError,
) -> Result<[u8; N], ShareError> {
    let mut out = [0u8; N];
    if text.len() != 2 * N {
        return Err(malformed(format!(
            "its {what} has {} characters, it has {} hex digits",
            text.len(),
            2 * N
        )));
    }
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| malformed(format!("its {what} is not hex")))?;
    Ok(out)
}

/// A decimal `1..=255` without sign or leading zeros.
fn decimal_field(
    text: &str,
    what: &str,
    malformed: &dyn Fn(String) -> ShareError,
) -> Result<u8, ShareError> {
    let plain = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && !(text.len() > 1 && text.starts_with('0'));
    text.parse::<u8>()
        .ok()
        .filter(|_| plain)
        .ok_or_else(|| malformed(format!("its {what} is not a number from 0 to 255")))
}

/// The checksum of a share's text before its last `:`.
fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::digest(body.as_bytes());
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

/// The key check of a split: see the [module](self).
fn key_check(key: &KeyBytes, split: &[u8; SPLIT_LEN]) -> [u8; KEY_CHECK_LEN] {
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key.expose())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(SHARE_FORMAT.as_bytes());
    mac.update(split);
    let tag = mac.finalize().into_bytes();
    let mut out = [0u8; KEY_CHECK_LEN];
    out.copy_from_slice(&tag[..KEY_CHECK_LEN]);
    out
}

/// Splits `key` into `shares` shares of which any `threshold` rebuild it.
///
/// # Errors
/// [`ShareError::Parameters`] unless `2 <= threshold <= shares <= 255`;
/// [`ShareError::Split`] when the random source fails.
pub fn split(key: &KeyBytes, threshold: u8, shares: u8) -> Result<Vec<MasterKeyShare>, ShareError> {
    if threshold < 2 {
        return Err(ShareError::Parameters(format!(
            "threshold {threshold}: at least 2 (with 1, every share is the key itself)"
        )));
    }
    if shares < threshold {
        return Err(ShareError::Parameters(format!(
            "{shares} share(s) with threshold {threshold}: there must be at least as many \
             shares as the threshold"
        )));
    }
    let random = |e: getrandom::Error| ShareError::Split(format!("the random source failed: {e}"));
    let mut split = [0u8; SPLIT_LEN];
    getrandom::fill(&mut split).map_err(random)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut seed[..]).map_err(random)?;
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let k = usize::from(threshold);
    // The polynomial of one key byte at a time: its coefficients are the
    // secret's, wiped when done.
    let mut polynomial: Zeroizing<Vec<GfPoint>> =
        Zeroizing::new(<Vec<GfPoint> as vsss_rs::Polynomial<GfPoint>>::create(k));
    let mut values: Vec<Zeroizing<[u8; 32]>> =
        (0..shares).map(|_| Zeroizing::new([0; 32])).collect();
    let mut point = Zeroizing::new(IdentifierGf256::default());
    for (i, byte) in key.expose().iter().enumerate() {
        let secret = Zeroizing::new(IdentifierGf256(Gf256(*byte)));
        polynomial
            .fill(&secret, &mut rng, k)
            .map_err(|e| ShareError::Split(e.to_string()))?;
        for (x, value) in (1..=shares).zip(values.iter_mut()) {
            polynomial.evaluate_in_place(&IdentifierGf256(Gf256(x)), k, &mut point);
            value[i] = point.0.0;
        }
    }
    let check = key_check(key, &split);
    Ok((1..=shares)
        .zip(values)
        .map(|(id, value)| MasterKeyShare {
            split,
            threshold,
            shares,
            id,
            key_check: check,
            value,
            origin: None,
        })
        .collect())
}

/// Rebuilds the master key from shares of one split: at least its
/// threshold, each id once. The rebuilt key must match the shares' key
/// check.
///
/// # Errors
/// [`ShareError::NoShares`], [`ShareError::MixedSplits`],
/// [`ShareError::Inconsistent`], [`ShareError::Duplicate`],
/// [`ShareError::TooFew`] or [`ShareError::KeyCheck`], each naming the
/// shares concerned.
pub fn combine(shares: &[MasterKeyShare]) -> Result<KeyBytes, ShareError> {
    let first = shares.first().ok_or(ShareError::NoShares)?;
    for (n, share) in shares.iter().enumerate() {
        if share.split != first.split {
            return Err(ShareError::MixedSplits {
                first: first.origin_or("one"),
                first_id: first.id,
                first_split: first.split_id(),
                second: share.origin_or("another"),
                second_id: share.id,
                second_split: share.split_id(),
            });
        }
        let inconsistent =
            |field: &'static str, found: String, expected: String| ShareError::Inconsistent {
                origin: share.origin.clone().unwrap_or_else(|| "a share".to_owned()),
                id: share.id,
                field,
                found,
                first: first.named(),
                expected,
            };
        if share.threshold != first.threshold {
            return Err(inconsistent(
                "threshold",
                share.threshold.to_string(),
                first.threshold.to_string(),
            ));
        }
        if share.shares != first.shares {
            return Err(inconsistent(
                "share count",
                share.shares.to_string(),
                first.shares.to_string(),
            ));
        }
        if share.key_check != first.key_check {
            return Err(inconsistent(
                "key check",
                hex::encode(share.key_check),
                hex::encode(first.key_check),
            ));
        }
        if let Some(earlier) = shares[..n].iter().find(|s| s.id == share.id) {
            return Err(ShareError::Duplicate {
                id: share.id,
                split: share.split_id(),
                first: earlier
                    .origin
                    .clone()
                    .unwrap_or_else(|| "one copy".to_owned()),
                second: share.origin.clone().unwrap_or_else(|| "another".to_owned()),
            });
        }
    }
    let ids = shares
        .iter()
        .map(|s| s.id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if shares.len() < usize::from(first.threshold) {
        return Err(ShareError::TooFew {
            given: shares.len(),
            ids,
            split: first.split_id(),
            threshold: first.threshold,
            shares: first.shares,
        });
    }
    // `vsss-rs`'s byte form: x, then the 32 values.
    let points: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(
        shares
            .iter()
            .map(|s| {
                let mut point = Vec::with_capacity(33);
                point.push(s.id);
                point.extend_from_slice(&s.value[..]);
                point
            })
            .collect(),
    );
    let bytes = Zeroizing::new(
        Gf256::combine_bytes(points.as_slice())
            .map_err(|e| ShareError::Split(format!("combining failed: {e}")))?,
    );
    let key = KeyBytes::from_slice(&bytes)
        .ok_or_else(|| ShareError::Split(format!("combined {} bytes, not 32", bytes.len())))?;
    if key_check(&key, &first.split) != first.key_check {
        return Err(ShareError::KeyCheck {
            ids,
            split: first.split_id(),
        });
    }
    Ok(key)
}

/// Reads the shares in `text` (one a line; blank lines and lines beginning
/// with `#` skipped), naming each `<source> line N`.
///
/// # Errors
/// The first line that is not a valid share ([`MasterKeyShare::parse`]).
pub fn parse_shares(text: &str, source: &str) -> Result<Vec<MasterKeyShare>, ShareError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with('#')
        })
        .map(|(n, line)| MasterKeyShare::parse(line, &format!("{source} line {}", n + 1)))
        .collect()
}

/// A new random master key from the operating system's random source.
///
/// # Errors
/// The random source failed.
pub fn generate() -> Result<KeyBytes, getrandom::Error> {
    KeyBytes::generate()
}

/// A master key's text form, as a key file holds it and `PHI_MASTER_KEY`
/// takes it: standard base64 (44 characters) and a newline, in a buffer
/// wiped on drop.
pub fn encode(key: &KeyBytes) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(45));
    STANDARD.encode_string(key.expose(), &mut text);
    text.push('\n');
    text
}

/// A master key from its text form (base64 of 32 bytes, whitespace
/// around it ignored).
///
/// # Errors
/// A text that is not base64 of exactly 32 bytes; the reason never holds
/// the text.
pub fn decode(text: &str) -> Result<KeyBytes, String> {
    crate::kek::decode_master_key(text)
}

/// The master key in a key file, refused on Unix unless the file is
/// private to this user (as [`LocalKek::from_file`](crate::LocalKek::from_file)
/// refuses it).
///
/// # Errors
/// The file cannot be read, is not private, or does not hold a key; the
/// reason names the file, never the key.
pub fn read_key_file(path: &Path) -> Result<KeyBytes, String> {
    crate::kek::read_master_key_file(path)
}

/// Writes `text` to a new file at `path`: mode `0600` on Unix, never
/// replacing a file that exists (nor following a link there); removed
/// again if it cannot be written whole.
///
/// # Errors
/// The file exists ([`std::io::ErrorKind::AlreadyExists`]) or cannot be
/// created or written.
pub fn write_new_private_file(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let written = file.write_all(text).and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// Writes `key` to a new key file at `path` (see
/// [`write_new_private_file`]), in the form [`encode`] gives.
///
/// # Errors
/// As [`write_new_private_file`].
pub fn write_key_file(path: &Path, key: &KeyBytes) -> std::io::Result<()> {
    write_new_private_file(path, encode(key).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> KeyBytes {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = byte.wrapping_add(u8::try_from(i).expect("small"));
        }
        KeyBytes::new(bytes)
    }

    fn parsed(share: &MasterKeyShare, origin: &str) -> MasterKeyShare {
        MasterKeyShare::parse(&share.to_text(), origin).expect("parses")
    }

    /// Every `k`-subset of `0..n`.
    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        if k == 0 {
            return vec![Vec::new()];
        }
        if n < k {
            return Vec::new();
        }
        let mut with_last = subsets(n - 1, k - 1);
        for s in &mut with_last {
            s.push(n - 1);
        }
        let mut all = subsets(n - 1, k);
        all.extend(with_last);
        all
    }

    #[test]
    fn every_k_subset_rebuilds_the_key_and_fewer_do_not() {
        for (k, n) in [(2u8, 2u8), (2, 3), (3, 5), (4, 7), (5, 5)] {
            let master = key(k * 31 + n);
            let shares = split(&master, k, n).expect("split");
            assert_eq!(shares.len(), usize::from(n));
            let texts: Vec<_> = shares.iter().map(|s| parsed(s, "t")).collect();
            let all = subsets(usize::from(n), usize::from(k));
            assert!(!all.is_empty());
            for subset in &all {
                let chosen: Vec<_> = subset.iter().map(|&i| texts[i].clone()).collect();
                let rebuilt = combine(&chosen).expect("any K rebuild");
                assert_eq!(rebuilt.expose(), master.expose(), "{k} of {n}: {subset:?}");
                // In another order too.
                let reversed: Vec<_> = chosen.iter().rev().cloned().collect();
                assert_eq!(
                    combine(&reversed).expect("any order").expose(),
                    master.expose()
                );
            }
            // All N work as well.
            assert_eq!(combine(&texts).expect("all").expose(), master.expose());
            for subset in subsets(usize::from(n), usize::from(k) - 1) {
                let chosen: Vec<_> = subset.iter().map(|&i| texts[i].clone()).collect();
                let err = combine(&chosen).expect_err("fewer than K");
                assert!(
                    matches!(err, ShareError::TooFew { .. } | ShareError::NoShares),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn three_of_five_has_ten_subsets_each_rebuilding() {
        let master = key(7);
        let shares = split(&master, 3, 5).expect("split");
        let all = subsets(5, 3);
        assert_eq!(all.len(), 10);
        for subset in all {
            let chosen: Vec<_> = subset.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(
                combine(&chosen).expect("rebuilds").expose(),
                master.expose()
            );
        }
        let err = combine(&shares[..2]).expect_err("two of three");
        assert_eq!(
            err.to_string(),
            format!(
                "2 share(s) of split {} given (1, 2): it needs 3, any 3 of its 5",
                shares[0].split_id()
            )
        );
    }

    #[test]
    fn the_text_form_matches_the_format() {
        let master = key(3);
        let shares = split(&master, 3, 5).expect("split");
        let text = shares[1].to_text();
        let fields: Vec<&str> = text.split(':').collect();
        assert_eq!(fields.len(), 8);
        assert_eq!(fields[0], "phi-share-v1");
        assert_eq!(fields[1].len(), 16);
        assert_eq!(&fields[2..5], &["3", "5", "2"]);
        assert_eq!(fields[6].len(), 64);
        assert_eq!(fields[7].len(), 8);
        // The key check and checksum, by hand.
        let split_bytes = hex::decode(fields[1]).expect("hex");
        let mut mac =
            <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(master.expose()).expect("hmac");
        mac.update(b"phi-share-v1");
        mac.update(&split_bytes);
        assert_eq!(fields[5], hex::encode(&mac.finalize().into_bytes()[..8]));
        let body = &text[..text.rfind(':').expect("colon")];
        assert_eq!(
            fields[7],
            hex::encode(&Sha256::digest(body.as_bytes())[..4])
        );
        // Every share of a split has the same split id and key check.
        for s in &shares {
            let t = s.to_text();
            let f: Vec<&str> = t.split(':').collect();
            assert_eq!((f[1], f[5]), (fields[1], fields[5]));
        }
        // Upper case and surrounding whitespace are read the same.
        let upper = format!(
            "  {}\n",
            text.to_ascii_uppercase()
                .replace("PHI-SHARE-V1", "phi-share-v1")
        );
        let again = MasterKeyShare::parse(&upper, "upper").expect("upper case");
        assert_eq!(again.to_text().as_str(), text.as_str());
    }

    #[test]
    fn a_value_computed_by_hand_from_two_shares() {
        // Lagrange at 0 over GF(2^8) with 0x11b, for K = 2: key = (y1·x2 +
        // y2·x1) / (x1 + x2), byte by byte, written out here apart from
        // the crate.
        fn mul(mut a: u8, mut b: u8) -> u8 {
            let mut r = 0u8;
            while b != 0 {
                if b & 1 != 0 {
                    r ^= a;
                }
                let carry = a & 0x80 != 0;
                a <<= 1;
                if carry {
                    a ^= 0x1b;
                }
                b >>= 1;
            }
            r
        }
        fn inv(a: u8) -> u8 {
            (1..=255u8).find(|&b| mul(a, b) == 1).expect("inverse")
        }
        let master = key(9);
        let shares = split(&master, 2, 4).expect("split");
        let (s1, s3) = (&shares[0], &shares[2]);
        let (x1, x3) = (s1.id, s3.id);
        let denominator = inv(x1 ^ x3);
        for i in 0..32 {
            let numerator = mul(s1.value[i], x3) ^ mul(s3.value[i], x1);
            assert_eq!(mul(numerator, denominator), master.expose()[i], "byte {i}");
        }
    }

    /// Changes one character of field `field` of a share's text.
    fn tamper(text: &str, field: usize) -> String {
        let mut fields: Vec<String> = text.split(':').map(str::to_owned).collect();
        let f = &mut fields[field];
        let last = f.pop().expect("non-empty");
        let replacement = match last {
            '0' => '1',
            '1'..='8' => char::from(u8::try_from(u32::from(last) + 1).expect("ascii")),
            '9' => '0',
            'a'..='e' => char::from(u8::try_from(u32::from(last) + 1).expect("ascii")),
            'f' => 'a',
            other => other,
        };
        f.push(replacement);
        fields.join(":")
    }

    #[test]
    fn a_tampered_share_is_refused_field_by_field() {
        let master = key(5);
        let shares = split(&master, 3, 5).expect("split");
        let text = shares[0].to_text();
        // Fields 1..=7: split, threshold, shares, id, key check, value,
        // checksum. Each change is caught by the checksum.
        for field in 1..=7 {
            let bad = tamper(&text, field);
            assert_ne!(bad, *text);
            let err = MasterKeyShare::parse(&bad, "share-a.txt line 1")
                .expect_err(&format!("field {field} changed"));
            let shown = err.to_string();
            assert!(shown.contains("share-a.txt line 1"), "{shown}");
            assert!(
                matches!(
                    err,
                    ShareError::Checksum { .. } | ShareError::Malformed { .. }
                ),
                "{shown}"
            );
            assert!(
                !shown.contains(&text.split(':').nth(6).expect("value")[..16]),
                "{shown}"
            );
        }
        let err = MasterKeyShare::parse(&tamper(&text, 6), "b line 2").expect_err("value");
        assert!(matches!(err, ShareError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("share 1 of split"), "{err}");
        // The prefix, a missing field, a field too long.
        for bad in [
            text.replacen("phi-share-v1", "phi-share-v2", 1),
            text.rsplit_once(':').expect("colon").0.to_owned(),
            format!("{}0", text.as_str()),
            String::new(),
            "hello".to_owned(),
        ] {
            let err = MasterKeyShare::parse(&bad, "x").expect_err("malformed");
            assert!(matches!(err, ShareError::Malformed { .. }), "{err}");
        }
    }

    /// A share whose value was changed and its checksum recomputed.
    fn forged(share: &MasterKeyShare) -> MasterKeyShare {
        let mut forged = share.clone();
        forged.value[0] ^= 1;
        parsed(&forged, "forged.txt line 1")
    }

    #[test]
    fn a_share_altered_with_its_checksum_recomputed_fails_the_key_check() {
        let master = key(11);
        let shares = split(&master, 3, 5).expect("split");
        let chosen = vec![shares[0].clone(), forged(&shares[1]), shares[4].clone()];
        let err = combine(&chosen).expect_err("forged");
        assert!(matches!(err, ShareError::KeyCheck { .. }), "{err}");
        assert!(err.to_string().contains("1, 2, 5"), "{err}");
        // With one share more than needed, the forgery still shows.
        let chosen = vec![
            shares[0].clone(),
            forged(&shares[1]),
            shares[3].clone(),
            shares[4].clone(),
        ];
        assert!(matches!(combine(&chosen), Err(ShareError::KeyCheck { .. })));
    }

    #[test]
    fn shares_of_two_splits_duplicates_and_inconsistent_shares_are_refused() {
        let master = key(13);
        let a: Vec<_> = split(&master, 2, 3)
            .expect("split")
            .iter()
            .map(|s| parsed(s, &format!("a{}.txt line 1", s.id)))
            .collect();
        let b: Vec<_> = split(&master, 2, 3)
            .expect("split")
            .iter()
            .map(|s| parsed(s, &format!("b{}.txt line 1", s.id)))
            .collect();
        assert_ne!(a[0].split_id(), b[0].split_id());
        let err = combine(&[a[0].clone(), b[1].clone()]).expect_err("two splits");
        assert!(matches!(err, ShareError::MixedSplits { .. }), "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("a1.txt line 1") && shown.contains("b2.txt line 1"),
            "{shown}"
        );
        assert!(shown.contains(&a[0].split_id()) && shown.contains(&b[0].split_id()));

        let err = combine(&[a[0].clone(), a[0].clone()]).expect_err("duplicate");
        assert!(matches!(err, ShareError::Duplicate { id: 1, .. }), "{err}");

        // A share of the same split claiming another threshold.
        let mut other = a[1].clone();
        other.threshold = 3;
        let other = parsed(&other, "c.txt line 4");
        let err = combine(&[a[0].clone(), other]).expect_err("inconsistent");
        assert!(
            matches!(
                err,
                ShareError::Inconsistent {
                    field: "threshold",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("c.txt line 4"), "{err}");

        assert!(matches!(combine(&[]), Err(ShareError::NoShares)));
    }

    #[test]
    fn bad_parameters_are_refused() {
        let master = key(1);
        assert!(matches!(
            split(&master, 1, 3),
            Err(ShareError::Parameters(_))
        ));
        assert!(matches!(
            split(&master, 0, 3),
            Err(ShareError::Parameters(_))
        ));
        assert!(matches!(
            split(&master, 4, 3),
            Err(ShareError::Parameters(_))
        ));
        let shares = split(&master, 255, 255).expect("the largest split");
        assert_eq!(combine(&shares).expect("all").expose(), master.expose());
    }

    #[test]
    fn parse_shares_skips_comments_and_names_lines() {
        let master = key(17);
        let shares = split(&master, 2, 2).expect("split");
        let text = format!(
            "# share 1\n\n{}\n  # share 2\n{}\n",
            shares[0].to_text().as_str(),
            shares[1].to_text().as_str()
        );
        let read = parse_shares(&text, "both.txt").expect("parses");
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].origin(), Some("both.txt line 3"));
        assert_eq!(read[1].origin(), Some("both.txt line 5"));
        assert_eq!(combine(&read).expect("rebuilds").expose(), master.expose());
        let err = parse_shares("# only\nnot a share\n", "bad.txt").expect_err("bad");
        assert!(
            err.to_string()
                .starts_with("bad.txt line 2: not a phi-share-v1"),
            "{err}"
        );
    }

    #[test]
    fn debug_shows_no_value() {
        let master = key(19);
        let share = split(&master, 2, 2).expect("split").remove(0);
        let shown = format!("{share:?}");
        let value = hex::encode(&share.value[..]);
        assert!(!shown.contains(&value[..16]), "{shown}");
        assert!(shown.contains("MasterKeyShare"), "{shown}");
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private_new_and_read_back() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("master.key");
        let master = generate().expect("random");
        write_key_file(&path, &master).expect("written");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.len(), 45);
        assert!(text.ends_with('\n'));
        assert_eq!(
            read_key_file(&path).expect("reads").expose(),
            master.expose()
        );
        crate::LocalKek::from_file("k", &path).expect("LocalKek reads it");
        let err = write_key_file(&path, &key(1)).expect_err("exists");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(
            read_key_file(&path).expect("unchanged").expose(),
            master.expose()
        );
        // A link to elsewhere is not followed.
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).expect("symlink");
        assert!(write_key_file(&link, &master).is_err());
        assert!(!dir.path().join("elsewhere").exists());
        assert_eq!(
            decode(&encode(&master)).expect("decodes").expose(),
            master.expose()
        );
    }
}
