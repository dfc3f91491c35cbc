//! Derived blind indexes: a keyed tag of a *part* of a value (its first
//! characters, its last digits, the year or month of a date), so that
//! type-ahead, "last four of the member number" and "born in 1980" are an
//! indexed `WHERE` clause within one owner, answered exactly once the
//! candidate rows are opened.
//!
//! A derived index is a [`DerivedIndex`]: a [`Transform`], the
//! [`Normalize`] applied before it, and a tag length in bits. The format
//! is a contract:
//!
//! - key = HKDF-SHA256(ikm = the owner's data key, salt = empty,
//!   info = `"phi-derived-index-v1" ‖ u16be(len scope) ‖ scope ‖ spec`),
//!   32 bytes, where `scope` is `table.column` and `spec` the index's
//!   [canonical description](DerivedIndex::spec), e.g.
//!   `prefix(3)/trim,lowercase/16`;
//! - input = the value's [`PhiValue`](crate::PhiValue) encoding,
//!   normalised (trimmed as [`Normalize`] trims; lower-cased character by
//!   character, each character's full Unicode lower case with no
//!   context rule, so Greek `Σ` is always `σ`), then transformed
//!   ([`DerivedIndex::input`]);
//! - tag = HMAC-SHA256(key, input), its first ⌈bits / 8⌉ bytes, the bits
//!   past `bits` in the last byte set to zero; stored as binary (NULL
//!   while the row is unsealed).
//!
//! Each index has its own key: per owner and data key version (the data
//! key), per column (the scope) and per index (the spec, which names the
//! transformation, the normalisation and the tag length). Equal tags never
//! carry across indexes, owners or columns, and never equal a
//! [full blind index](crate::blind) of the same value.
//!
//! # What each index reveals
//!
//! To anyone who reads the table (not the keys), within one owner's rows
//! (tags of different owners are unrelated):
//!
//! | index | reveals | distinct tags in N rows |
//! |---|---|---|
//! | `whole`, 128 bits | which rows hold equal values: the value frequencies | the number of distinct values |
//! | `prefix(n)`, 128 bits | which rows share their first `n` characters: the sizes of those groups | distinct `n`-character prefixes (≤ 26ⁿ for Latin surnames: 676 for `n` = 2, most of N for `n` ≥ 4) |
//! | `last_digits(n)`, 128 bits | which rows end in the same `n` digits | ≤ min(N, 10ⁿ) |
//! | `year` | which rows fall in the same year: a histogram by year | the years present (about 100 for dates of birth) |
//! | `year_month` | which rows fall in the same month | the months present (≤ 12 a year) |
//! | any, `b` < 128 bits | the above, coarsened: rows whose groups share a `b`-bit tag look alike | ≤ min(2ᵇ, the above) |
//!
//! Nothing reveals the value or its part itself, or an order: tags are
//! keyed hashes. What an observer can do is count, and match counts to
//! public statistics (surname or birth-year frequencies): the fewer rows an
//! owner has and the finer the index, the more a group's size says. A
//! truncated tag mixes groups on purpose (with 16 bits, about 65,536
//! buckets; with 8, 256), so that a bucket's size no longer maps to one
//! prefix; the finder opens the bucket's rows and drops the other groups,
//! so its results stay exact while reading more rows. Pick the coarsest
//! index that keeps the candidate set small: a `prefix(2)` at 16 bits for
//! type-ahead over a few thousand patients, not a `prefix(5)` at 128.
//!
//! ```
//! use phi_types::blind::{DerivedIndex, Normalize};
//!
//! let index = DerivedIndex::prefix(3).normalize(Normalize::TRIM_LOWERCASE).bits(16);
//! assert_eq!(index.spec(), "prefix(3)/trim,lowercase/16");
//! assert_eq!(&*index.input(b" Marchbanks"), b"mar");
//! // A probe shorter than the prefix cannot be looked up.
//! assert!(index.probe(b"ma").is_err());
//! // The exact test the finder applies to the rows a tag selects.
//! assert!(index.matches(b"MARTIN", b"mart"));
//! assert!(!index.matches(b"Marchbanks", b"mart"));
//! ```

use std::borrow::Cow;

use zeroize::Zeroizing;

use super::Normalize;
use crate::dek::Dek;
use crate::keyring::BlindIndexKey;

/// The HKDF `info` prefix of a derived index's key.
pub const DERIVED_INDEX_INFO: &[u8] = b"phi-derived-index-v1";

/// The longest derived tag, in bits (16 bytes, as a full blind index).
pub const MAX_DERIVED_BITS: u16 = 128;

/// What part of a value a derived index keeps, applied to the value's
/// normalised encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transform {
    /// The whole value: an equality index (truncated to its bits).
    Whole,
    /// The first `n` characters (bytes, if the encoding is not UTF-8); a
    /// shorter value whole.
    Prefix(u16),
    /// The last `n` ASCII digits, other characters dropped first (`"(555)
    /// 010-4477"` → `4477`); fewer if the value has fewer.
    LastDigits(u16),
    /// The year of a date (`1980-01-15` → `1980`): the encoding up to its
    /// first `-` after the first character.
    Year,
    /// The year and month of a date (`1980-01-15` → `1980-01`): the
    /// encoding up to its second such `-`.
    YearMonth,
}

impl std::fmt::Display for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transform::Whole => f.write_str("whole"),
            Transform::Prefix(n) => write!(f, "prefix({n})"),
            Transform::LastDigits(n) => write!(f, "last_digits({n})"),
            Transform::Year => f.write_str("year"),
            Transform::YearMonth => f.write_str("year_month"),
        }
    }
}

/// A derived blind index: a [`Transform`], the normalisation before it,
/// and the tag length. See the [module documentation](self) for its format
/// and what it reveals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DerivedIndex {
    transform: Transform,
    normalize: Normalize,
    bits: u16,
}

impl DerivedIndex {
    const fn of(transform: Transform) -> Self {
        DerivedIndex {
            transform,
            normalize: Normalize::NONE,
            bits: MAX_DERIVED_BITS,
        }
    }

    /// An equality index on the whole value (useful truncated).
    pub const fn whole() -> Self {
        Self::of(Transform::Whole)
    }

    /// An index on the first `n` characters.
    pub const fn prefix(n: u16) -> Self {
        Self::of(Transform::Prefix(n))
    }

    /// An index on the last `n` digits.
    pub const fn last_digits(n: u16) -> Self {
        Self::of(Transform::LastDigits(n))
    }

    /// An index on a date's year.
    pub const fn year() -> Self {
        Self::of(Transform::Year)
    }

    /// An index on a date's year and month.
    pub const fn year_month() -> Self {
        Self::of(Transform::YearMonth)
    }

    /// The same index, normalising values first.
    #[must_use]
    pub const fn normalize(mut self, normalize: Normalize) -> Self {
        self.normalize = normalize;
        self
    }

    /// The same index with tags of `bits` bits (1 to 128; checked by
    /// [`check`](Self::check)).
    #[must_use]
    pub const fn bits(mut self, bits: u16) -> Self {
        self.bits = bits;
        self
    }

    /// The transformation.
    pub fn transform(&self) -> Transform {
        self.transform
    }

    /// The normalisation applied before the transformation.
    pub fn normalization(&self) -> Normalize {
        self.normalize
    }

    /// The tag length in bits.
    pub fn tag_bits(&self) -> u16 {
        self.bits
    }

    /// The stored tag length in bytes: ⌈bits / 8⌉.
    pub fn tag_len(&self) -> usize {
        usize::from(self.bits.div_ceil(8))
    }

    /// Whether the index is well formed: a tag of 1 to 128 bits, a prefix
    /// or digit count of at least 1.
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.bits == 0 || self.bits > MAX_DERIVED_BITS {
            return Err(format!(
                "a derived index's tag is 1 to {MAX_DERIVED_BITS} bits, not {}",
                self.bits
            ));
        }
        if let Transform::Prefix(0) | Transform::LastDigits(0) = self.transform {
            return Err(format!("{} keeps nothing: use 1 or more", self.transform));
        }
        Ok(())
    }

    /// The canonical description that enters the key derivation:
    /// `<transform>/<normalisation>/<bits>`, the transform one of `whole`,
    /// `prefix(n)`, `last_digits(n)`, `year`, `year_month`, the
    /// normalisation one of `none`, `trim`, `lowercase`, `trim,lowercase`.
    pub fn spec(&self) -> String {
        format!(
            "{}/{}/{}",
            self.transform,
            normalize_spec(self.normalize),
            self.bits
        )
    }

    /// What is hashed for a value whose [`PhiValue`](crate::PhiValue)
    /// encoding is `encoded`: normalised, then transformed.
    pub fn input(&self, encoded: &[u8]) -> Zeroizing<Vec<u8>> {
        let normalised = self.normalised(encoded);
        let part: &[u8] = match self.transform {
            Transform::Whole => &normalised,
            Transform::Prefix(n) => prefix(&normalised, usize::from(n)),
            Transform::LastDigits(n) => {
                let mut digits = ascii_digits(&normalised);
                let skip = digits.len().saturating_sub(usize::from(n));
                digits.drain(..skip);
                wipe(normalised);
                return digits;
            }
            Transform::Year => date_part(&normalised, 1),
            Transform::YearMonth => date_part(&normalised, 2),
        };
        let out = Zeroizing::new(part.to_vec());
        wipe(normalised);
        out
    }

    /// What is hashed to look up `probe` (an encoding, as a value's):
    /// [`input`](Self::input), refused when the probe is too short to
    /// select one group: a prefix probe with fewer than `n` characters, a
    /// digit probe with fewer than `n` digits.
    ///
    /// # Errors
    /// Why the probe cannot be looked up, in words that name no value.
    pub fn probe(&self, probe: &[u8]) -> std::result::Result<Zeroizing<Vec<u8>>, String> {
        let normalised = self.normalised(probe);
        let short = match self.transform {
            Transform::Prefix(n) => {
                let have = match std::str::from_utf8(&normalised) {
                    Ok(text) => text.chars().count(),
                    Err(_) => normalised.len(),
                };
                (have < usize::from(n)).then(|| format!("{n} characters"))
            }
            Transform::LastDigits(n) => {
                let have = normalised.iter().filter(|b| b.is_ascii_digit()).count();
                (have < usize::from(n)).then(|| format!("{n} digits"))
            }
            Transform::Whole | Transform::Year | Transform::YearMonth => None,
        };
        wipe(normalised);
        match short {
            Some(needed) => Err(format!(
                "an index on {} needs a search term of at least {needed}",
                self.transform
            )),
            None => Ok(self.input(probe)),
        }
    }

    /// Whether a value (its encoding) answers `probe` exactly: starts with
    /// it (`prefix`), ends with its digits (`last_digits`), or has the same
    /// part (`whole`, `year`, `year_month`), after normalisation. The test
    /// a finder applies to the rows a tag selects, dropping those that
    /// share the tag only.
    pub fn matches(&self, value: &[u8], probe: &[u8]) -> bool {
        let (value, probe) = (self.normalised(value), self.normalised(probe));
        let found = match self.transform {
            Transform::Prefix(_) => value.starts_with(&probe),
            Transform::LastDigits(_) => ascii_digits(&value).ends_with(&ascii_digits(&probe)),
            Transform::Whole => value == probe,
            Transform::Year | Transform::YearMonth => {
                let raw = DerivedIndex {
                    normalize: Normalize::NONE,
                    ..*self
                };
                raw.input(&value) == raw.input(&probe)
            }
        };
        wipe(value);
        wipe(probe);
        found
    }

    /// A value's encoding normalised as this index normalises it: trimmed
    /// as [`Normalize`] trims, lower-cased character by character (each
    /// character's full Unicode lower case, with no rule that looks at its
    /// neighbours, so that a prefix lower-cases as the word it begins:
    /// Greek `Σ` is `σ` wherever it stands). Not UTF-8: as it is.
    fn normalised<'v>(&self, encoded: &'v [u8]) -> Cow<'v, [u8]> {
        let Ok(text) = std::str::from_utf8(encoded) else {
            return Cow::Borrowed(encoded);
        };
        let text = if self.normalize.trims() {
            text.trim()
        } else {
            text
        };
        let lower = |c: char| c.to_lowercase();
        if !self.normalize.lowercases() || text.chars().flat_map(lower).eq(text.chars()) {
            return Cow::Borrowed(text.as_bytes());
        }
        // Sized exactly first: a growing buffer would free unwiped copies.
        let len: usize = text.chars().flat_map(lower).map(char::len_utf8).sum();
        let mut out = String::with_capacity(len);
        out.extend(text.chars().flat_map(lower));
        Cow::Owned(out.into_bytes())
    }

    /// The key of this index for `scope` under `dek`.
    pub fn key(&self, dek: &Dek, scope: &str) -> BlindIndexKey {
        index_key(dek, scope, &self.spec())
    }

    /// The tag of an already transformed `input` under `key`.
    pub fn tag(&self, key: &BlindIndexKey, input: &[u8]) -> Vec<u8> {
        truncated_tag(key, input, self.bits)
    }

    /// The key-cache entry of this index for `scope`: a name no plain
    /// blind-index scope (`table.column`) takes.
    pub(crate) fn cache_scope(&self, scope: &str) -> String {
        format!("{scope}\0{}", self.spec())
    }

    /// The probe for a `year` index: the year as a date's encoding writes it
    /// (`1980`, `+10000`).
    pub fn year_probe(year: i32) -> Vec<u8> {
        year_text(year).into_bytes()
    }

    /// The probe for a `year_month` index (`1980-01`).
    pub fn year_month_probe(year: i32, month: u32) -> Vec<u8> {
        format!("{}-{month:02}", year_text(year)).into_bytes()
    }

    /// The probes of every bucket a date range from `from` to `to` (both
    /// `(year, month)`, inclusive) covers: one per year for a `year`
    /// index, one per month for `year_month`, at most `limit`.
    ///
    /// # Errors
    /// Why the range cannot be bucketed: an index that is not on date
    /// parts, a range that ends before it starts, or more than `limit`
    /// buckets (read such a range with `load_where`, or index by year).
    pub fn range_probes(
        &self,
        from: (i32, u32),
        to: (i32, u32),
        limit: usize,
    ) -> std::result::Result<Vec<Vec<u8>>, String> {
        if to < from {
            return Err("the range ends before it starts".to_owned());
        }
        let mut out = Vec::new();
        match self.transform {
            Transform::Year => {
                for year in from.0..=to.0 {
                    if out.len() == limit {
                        return Err(too_many(limit, "years"));
                    }
                    out.push(Self::year_probe(year));
                }
            }
            Transform::YearMonth => {
                let (mut year, mut month) = from;
                while (year, month) <= to {
                    if out.len() == limit {
                        return Err(too_many(limit, "months"));
                    }
                    out.push(Self::year_month_probe(year, month));
                    (year, month) = if month >= 12 {
                        (year + 1, 1)
                    } else {
                        (year, month + 1)
                    };
                }
            }
            other => return Err(format!("an index on {other} does not bucket dates")),
        }
        Ok(out)
    }
}

/// HMAC-SHA256 of `input` under `key`, its first ⌈bits / 8⌉ bytes, the
/// bits past `bits` zero.
fn truncated_tag(key: &BlindIndexKey, input: &[u8], bits: u16) -> Vec<u8> {
    let full = key.compute(input);
    let mut tag = full[..usize::from(bits.div_ceil(8)).min(full.len())].to_vec();
    let spare = u32::from(bits % 8);
    if spare != 0
        && let Some(last) = tag.last_mut()
    {
        *last &= 0xffu8 << (8 - spare);
    }
    tag
}

/// The key of a derived or compound index: HKDF-SHA256 of `dek` with info
/// `"phi-derived-index-v1" ‖ u16be(len scope) ‖ scope ‖ spec`.
fn index_key(dek: &Dek, scope: &str, spec: &str) -> BlindIndexKey {
    let scope_len = u16::try_from(scope.len()).unwrap_or(u16::MAX).to_be_bytes();
    BlindIndexKey::derive_with_info(
        dek,
        &[
            DERIVED_INDEX_INFO,
            &scope_len,
            scope.as_bytes(),
            spec.as_bytes(),
        ],
    )
}

/// The name of a normalisation in a spec: `none`, `trim`, `lowercase`,
/// `trim,lowercase`.
fn normalize_spec(normalize: Normalize) -> &'static str {
    match (normalize.trims(), normalize.lowercases()) {
        (false, false) => "none",
        (true, false) => "trim",
        (false, true) => "lowercase",
        (true, true) => "trim,lowercase",
    }
}

/// A compound index: one tag of two or more fields' whole values together
/// (surname and date of birth: the duplicate-patient check as one lookup).
///
/// - scope = the fields' scopes joined by `+`
///   (`cases.patient_last+cases.patient_dob`);
/// - spec = `compound(<normalisation>|<normalisation>…)/<bits>`, one
///   normalisation per field (`compound(trim,lowercase|none)/32`);
/// - input = for each field in order, u32be(length) ‖ its normalised
///   encoding;
/// - key and tag as a [`DerivedIndex`]'s.
///
/// It reveals which of an owner's rows agree on every field at once, and
/// nothing of rows that agree on some: fewer equal tags than any one
/// field's blind index. A row with a NULL field has no tag.
///
/// ```
/// use phi_types::blind::{CompoundIndex, Normalize};
/// const PATIENT: CompoundIndex =
///     CompoundIndex::new(&[Normalize::TRIM_LOWERCASE, Normalize::NONE]).bits(32);
/// assert_eq!(PATIENT.spec(), "compound(trim,lowercase|none)/32");
/// assert!(PATIENT.matches(&[b" Doe", b"1980-01-15"], &[b"doe", b"1980-01-15"]));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompoundIndex {
    parts: &'static [Normalize],
    bits: u16,
}

impl CompoundIndex {
    /// An index on as many fields as `parts` has, each normalised so.
    pub const fn new(parts: &'static [Normalize]) -> Self {
        CompoundIndex {
            parts,
            bits: MAX_DERIVED_BITS,
        }
    }

    /// The same index with tags of `bits` bits (1 to 128).
    #[must_use]
    pub const fn bits(mut self, bits: u16) -> Self {
        self.bits = bits;
        self
    }

    /// Each field's normalisation, in order.
    pub fn parts(&self) -> &'static [Normalize] {
        self.parts
    }

    /// The tag length in bits.
    pub fn tag_bits(&self) -> u16 {
        self.bits
    }

    /// The stored tag length in bytes.
    pub fn tag_len(&self) -> usize {
        usize::from(self.bits.div_ceil(8))
    }

    /// Whether the index is well formed: two fields or more, a tag of 1 to
    /// 128 bits.
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.parts.len() < 2 {
            return Err("a compound index needs two fields or more".to_owned());
        }
        if self.bits == 0 || self.bits > MAX_DERIVED_BITS {
            return Err(format!(
                "a compound index's tag is 1 to {MAX_DERIVED_BITS} bits, not {}",
                self.bits
            ));
        }
        Ok(())
    }

    /// The canonical description that enters the key derivation.
    pub fn spec(&self) -> String {
        let parts: Vec<&str> = self.parts.iter().map(|n| normalize_spec(*n)).collect();
        format!("compound({})/{}", parts.join("|"), self.bits)
    }

    /// What is hashed for the fields' encodings, in order: each one's
    /// length (u32, big-endian) and normalised bytes.
    pub fn input(&self, encoded: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        let normalised: Vec<Cow<'_, [u8]>> = encoded
            .iter()
            .zip(self.parts)
            .map(|(part, normalize)| normalize.apply(part))
            .collect();
        // Sized exactly first: a growing buffer would free unwiped copies.
        let mut out = Zeroizing::new(Vec::with_capacity(
            normalised.iter().map(|p| 4 + p.len()).sum(),
        ));
        for part in normalised {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&part);
            wipe(part);
        }
        out
    }

    /// Whether values (their encodings) equal the probes, field by field,
    /// once normalised.
    pub fn matches(&self, values: &[&[u8]], probes: &[&[u8]]) -> bool {
        values.len() == probes.len() && *self.input(values) == *self.input(probes)
    }

    /// The key of this index for `scope` (the fields' scopes joined by
    /// `+`) under `dek`.
    pub fn key(&self, dek: &Dek, scope: &str) -> BlindIndexKey {
        index_key(dek, scope, &self.spec())
    }

    /// The tag of an already built `input` under `key`.
    pub fn tag(&self, key: &BlindIndexKey, input: &[u8]) -> Vec<u8> {
        truncated_tag(key, input, self.bits)
    }

    /// The key-cache entry of this index for `scope`.
    pub(crate) fn cache_scope(&self, scope: &str) -> String {
        format!("{scope}\0{}", self.spec())
    }
}

fn too_many(limit: usize, what: &str) -> String {
    format!("the range covers more than {limit} {what}")
}

/// A year as [`chrono`]'s dates encode it: four digits, or a sign and more.
fn year_text(year: i32) -> String {
    if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else {
        format!("{year:+05}")
    }
}

/// The first `n` characters of UTF-8 text, else the first `n` bytes.
fn prefix(bytes: &[u8], n: usize) -> &[u8] {
    match std::str::from_utf8(bytes) {
        Ok(text) => match text.char_indices().nth(n) {
            Some((end, _)) => &bytes[..end],
            None => bytes,
        },
        Err(_) => &bytes[..n.min(bytes.len())],
    }
}

/// A date encoding up to its `nth` `-` after the first character (a sign
/// or a digit): `1980-01-15` → `1980` (1), `1980-01` (2). The whole
/// encoding when it has fewer.
fn date_part(bytes: &[u8], nth: usize) -> &[u8] {
    bytes
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, b)| **b == b'-')
        .nth(nth - 1)
        .map_or(bytes, |(at, _)| &bytes[..at])
}

/// The ASCII digits of `bytes`, in order, in a buffer sized to hold them
/// all (no growth, so no unwiped copy is freed).
fn ascii_digits(bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len()));
    out.extend(bytes.iter().copied().filter(u8::is_ascii_digit));
    out
}

fn wipe(bytes: Cow<'_, [u8]>) {
    if let std::borrow::Cow::Owned(mut owned) = bytes {
        zeroize::Zeroize::zeroize(&mut owned);
    }
}

/// Dates whose year and month a `year` or `year_month` index keeps, for
/// the range finders.
pub trait DateParts {
    /// The year and month (1 to 12).
    fn year_month(&self) -> (i32, u32);
}

impl DateParts for chrono::NaiveDate {
    fn year_month(&self) -> (i32, u32) {
        use chrono::Datelike as _;
        (self.year(), self.month())
    }
}

impl DateParts for chrono::NaiveDateTime {
    fn year_month(&self) -> (i32, u32) {
        self.date().year_month()
    }
}

impl DateParts for chrono::DateTime<chrono::Utc> {
    fn year_month(&self) -> (i32, u32) {
        self.naive_utc().date().year_month()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PhiValue;
    use crate::dek::KeyBytes;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn encoded<T: PhiValue>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        value.encode(&mut out);
        out
    }

    #[test]
    fn transforms() {
        let name = DerivedIndex::prefix(3).normalize(Normalize::TRIM_LOWERCASE);
        assert_eq!(&*name.input(" Élise ".as_bytes()), "éli".as_bytes());
        assert_eq!(&*name.input(b"Li"), b"li");
        let digits = DerivedIndex::last_digits(4);
        assert_eq!(&*digits.input(b"(555) 010-4477"), b"4477");
        assert_eq!(&*digits.input(b"x12"), b"12");
        let date = chrono::NaiveDate::from_ymd_opt(1980, 1, 15).expect("date");
        assert_eq!(&*DerivedIndex::year().input(&encoded(&date)), b"1980");
        assert_eq!(
            &*DerivedIndex::year_month().input(&encoded(&date)),
            b"1980-01"
        );
        let far = chrono::NaiveDate::from_ymd_opt(-44, 3, 15).expect("date");
        assert_eq!(&*DerivedIndex::year().input(&encoded(&far)), b"-0044");
        assert_eq!(DerivedIndex::year_probe(-44), b"-0044");
        assert_eq!(
            &*DerivedIndex::year_month().input(&encoded(&far)),
            b"-0044-03"
        );
        let stamp = chrono::NaiveDate::from_ymd_opt(2026, 12, 7)
            .and_then(|d| d.and_hms_opt(9, 30, 0))
            .expect("time");
        assert_eq!(
            &*DerivedIndex::year_month().input(&encoded(&stamp)),
            b"2026-12"
        );
        assert_eq!(
            &*DerivedIndex::year_month().input(&DerivedIndex::year_month_probe(2026, 12)),
            b"2026-12"
        );
    }

    #[test]
    fn a_prefix_lower_cases_as_the_word_it_begins() {
        // `str::to_lowercase` writes a word-final `Σ` as `ς`: the probe
        // "ΟΔΥΣ" would become "οδυς" while "ΟΔΥΣΣΕΑΣ" begins "οδυσ". A
        // derived index lower-cases character by character.
        let name = DerivedIndex::prefix(4).normalize(Normalize::TRIM_LOWERCASE);
        let stored = "ΟΔΥΣΣΕΑΣ".as_bytes();
        assert_eq!(&*name.input(stored), "οδυσ".as_bytes());
        assert_eq!(
            &*name.probe("ΟΔΥΣ".as_bytes()).expect("probe"),
            "οδυσ".as_bytes()
        );
        assert!(name.matches(stored, "Οδυσ".as_bytes()));
        assert!(name.matches(stored, "ΟΔΥΣ".as_bytes()));
        // Unchanged text is not copied.
        assert!(matches!(name.normalised(b"doe"), Cow::Borrowed(_)));
    }

    #[test]
    fn probes_and_exact_matches() {
        let name = DerivedIndex::prefix(3).normalize(Normalize::TRIM_LOWERCASE);
        let err = name.probe(b"Ma").expect_err("short");
        assert_eq!(
            err,
            "an index on prefix(3) needs a search term of at least 3 characters"
        );
        assert_eq!(&*name.probe(b"MARCH").expect("probe"), b"mar");
        assert!(name.matches(b"Marchbanks", b"march"));
        assert!(!name.matches(b"Martin", b"march"));
        let digits = DerivedIndex::last_digits(4);
        assert!(digits.probe(b"447").is_err());
        assert!(digits.matches(b"555-010-4477", b"04477"));
        assert!(!digits.matches(b"555-010-4477", b"14477"));
        let year = DerivedIndex::year();
        let date = chrono::NaiveDate::from_ymd_opt(1980, 1, 15).expect("date");
        assert!(year.matches(&encoded(&date), &DerivedIndex::year_probe(1980)));
        assert!(!year.matches(&encoded(&date), &DerivedIndex::year_probe(1981)));
    }

    #[test]
    fn checks_refuse_empty_indexes_and_bad_tag_lengths() {
        assert!(DerivedIndex::prefix(0).check().is_err());
        assert!(DerivedIndex::last_digits(0).check().is_err());
        assert!(DerivedIndex::year().bits(0).check().is_err());
        assert!(DerivedIndex::year().bits(129).check().is_err());
        assert!(DerivedIndex::year().bits(1).check().is_ok());
        assert_eq!(DerivedIndex::year().bits(12).tag_len(), 2);
    }

    #[test]
    fn range_probes_cover_each_bucket_once() {
        let months = DerivedIndex::year_month()
            .range_probes((2025, 11), (2026, 2), 100)
            .expect("range");
        let months: Vec<String> = months
            .into_iter()
            .map(|p| String::from_utf8(p).expect("text"))
            .collect();
        assert_eq!(months, ["2025-11", "2025-12", "2026-01", "2026-02"]);
        assert!(
            DerivedIndex::year_month()
                .range_probes((2000, 1), (2026, 1), 100)
                .is_err()
        );
        assert_eq!(
            DerivedIndex::year()
                .range_probes((1979, 5), (1981, 1), 10)
                .expect("years")
                .len(),
            3
        );
        assert!(
            DerivedIndex::prefix(2)
                .range_probes((1, 1), (1, 1), 10)
                .is_err()
        );
        assert!(
            DerivedIndex::year()
                .range_probes((2001, 1), (2000, 1), 10)
                .is_err()
        );
    }

    /// The published vectors: DEK 32 × `0x01`, scope `cases.patient_last`
    /// (or `cases.dob`), computed independently with Python's `hmac` and
    /// `hashlib` (HKDF written out from RFC 5869).
    #[test]
    fn matches_the_published_construction() {
        let dek = Dek::new(1, KeyBytes::new([1; 32]));
        let cases: [(DerivedIndex, &str, &[u8], &str); 5] = [
            (
                DerivedIndex::prefix(3)
                    .normalize(Normalize::TRIM_LOWERCASE)
                    .bits(16),
                "cases.patient_last",
                b" Marchbanks",
                "fa05",
            ),
            (
                DerivedIndex::last_digits(4).bits(32),
                "cases.member_id",
                b"MBR-555-010-4477",
                "44fd4b48",
            ),
            (
                DerivedIndex::year(),
                "cases.patient_dob",
                b"1980-01-15",
                "47300af18669f965e221aef09f2b941a",
            ),
            (
                DerivedIndex::year_month().bits(20),
                "cases.surgery_date",
                b"2026-12-07",
                "b9a6e0",
            ),
            (
                DerivedIndex::whole()
                    .normalize(Normalize::TRIM_LOWERCASE)
                    .bits(24),
                "cases.patient_last",
                b"Doe",
                "c908b5",
            ),
        ];
        for (index, scope, value, expected) in cases {
            let key = index.key(&dek, scope);
            let tag = index.tag(&key, &index.input(value));
            assert_eq!(hex(&tag), expected, "{}", index.spec());
            assert_eq!(tag.len(), index.tag_len());
        }
    }

    /// DEK 32 × `0x01`, scope `cases.patient_last+cases.patient_dob`,
    /// ` Doe` and `1980-01-15`, computed independently as the other vectors.
    #[test]
    fn compound_matches_the_published_construction() {
        const PATIENT: CompoundIndex =
            CompoundIndex::new(&[Normalize::TRIM_LOWERCASE, Normalize::NONE]).bits(32);
        let dek = Dek::new(1, KeyBytes::new([1; 32]));
        let scope = "cases.patient_last+cases.patient_dob";
        let input = PATIENT.input(&[b" Doe", b"1980-01-15"]);
        assert_eq!(&input[..], b"\0\0\0\x03doe\0\0\0\x0a1980-01-15");
        let tag = PATIENT.tag(&PATIENT.key(&dek, scope), &input);
        assert_eq!(hex(&tag), "be2445bc");
        // Field boundaries are part of the input: ("do", "e…") differs.
        assert_ne!(
            *PATIENT.input(&[b"do", b"e1980-01-15"]),
            *PATIENT.input(&[b"doe", b"1980-01-15"])
        );
        assert!(CompoundIndex::new(&[Normalize::NONE]).check().is_err());
        assert!(PATIENT.check().is_ok());
    }

    #[test]
    fn indexes_never_share_tags() {
        let dek = Dek::new(1, KeyBytes::new([1; 32]));
        let whole = DerivedIndex::whole();
        let value = b"doe";
        let tag = |index: DerivedIndex, scope: &str| index.tag(&index.key(&dek, scope), value);
        let base = tag(whole, "cases.patient_last");
        assert_ne!(base, tag(whole, "cases.patient_first"));
        assert_ne!(
            base,
            tag(whole.normalize(Normalize::TRIM), "cases.patient_last")
        );
        assert_ne!(base, tag(DerivedIndex::prefix(3), "cases.patient_last"));
        assert_ne!(
            base[..2],
            tag(whole.bits(16), "cases.patient_last")[..],
            "a truncated tag is not a prefix of the full one"
        );
        let blind = BlindIndexKey::derive(&dek, "cases.patient_last").compute(value);
        assert_ne!(base[..], blind[..], "nor a full blind index");
        let other = Dek::new(1, KeyBytes::new([2; 32]));
        assert_ne!(
            base,
            whole.tag(&whole.key(&other, "cases.patient_last"), value)
        );
    }
}
