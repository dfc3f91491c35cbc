//! Envelope v1 through the public API, over arbitrary owners, scopes, rows
//! and values of every `PhiValue` type: what is sealed opens to itself, in
//! its own context only, and no altered byte opens.

use std::fmt::Debug;
use std::sync::{Arc, LazyLock};

use chrono::{Datelike, NaiveDate, NaiveDateTime};
use proptest::collection::vec;
use proptest::prelude::*;

use phi_types::envelope::{HEADER_LEN, OVERHEAD};
use phi_types::{
    Encrypted, Error, KeyBytes, Keyring, LocalKek, MAX_OWNER_LEN, MemoryKeyStore, PhiValue,
};

/// One keyring for every case: each new owner gets a data key on first seal.
static KEYRING: LazyLock<Keyring> = LazyLock::new(|| {
    let kek = LocalKek::new("local-1", &KeyBytes::new([0x42; 32]));
    Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(kek))
        .build()
        .expect("keyring")
});

/// An owner id phi takes (1 to 255 bytes; no control character, no
/// whitespace at either end, not one of phi's reserved `phi:` owners), a
/// scope and a row key.
fn context() -> impl Strategy<Value = (String, String, Vec<u8>)> {
    (
        vec(
            any::<char>().prop_filter("no control character", |c| !c.is_control()),
            1..64,
        )
        .prop_map(String::from_iter)
        .prop_filter("fits the key tables", |o| o.len() <= MAX_OWNER_LEN)
        .prop_filter("no whitespace at either end", |o| o.trim() == o)
        .prop_filter("not a reserved owner", |o| !o.starts_with("phi:")),
        vec(any::<char>(), 0..64).prop_map(String::from_iter),
        vec(any::<u8>(), 0..64),
    )
}

fn date() -> impl Strategy<Value = NaiveDate> {
    (NaiveDate::MIN.num_days_from_ce()..=NaiveDate::MAX.num_days_from_ce())
        .prop_map(|days| NaiveDate::from_num_days_from_ce_opt(days).expect("a day in range"))
}

fn date_time() -> impl Strategy<Value = NaiveDateTime> {
    (date(), 0..86_400u32, 0..1_000_000_000u32).prop_map(|(date, secs, nanos)| {
        date.and_time(
            chrono::NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos).expect("a time"),
        )
    })
}

/// Seals `value`, checks it opens to itself, and that it opens nowhere else
/// and not once altered.
fn check<T: PhiValue + Debug>(
    value: &T,
    (owner, scope, row): &(String, String, Vec<u8>),
    at: usize,
    flip: u8,
) -> Result<(), TestCaseError> {
    let sealed: Encrypted<T> = KEYRING.seal(value, owner, scope, row).expect("seals");
    let bytes = sealed.as_bytes().to_vec();
    prop_assert!(bytes.len() >= OVERHEAD);
    let keys = KEYRING.keys_for_open(owner).expect("keys");
    prop_assert_eq!(&keys.open(sealed, scope, row).expect("opens"), value);

    let open = |bytes: &[u8], owner: &str, scope: &str, row: &[u8]| {
        KEYRING.open::<T>(Encrypted::from_bytes(bytes.to_vec()), owner, scope, row)
    };
    // Elsewhere: another owner, scope or row.
    let other_owner = if owner.len() < MAX_OWNER_LEN {
        format!("{owner}x")
    } else {
        // As long or shorter: the first character replaced by another.
        let first = if owner.starts_with('x') { 'y' } else { 'x' };
        std::iter::once(first)
            .chain(owner.chars().skip(1))
            .collect()
    };
    // The other owner has a data key of the same version, of its own.
    KEYRING.keys_for_seal(&other_owner).expect("keys");
    let mut other_row = row.clone();
    other_row.push(flip);
    for (o, s, r) in [
        (other_owner.as_str(), scope.as_str(), row.as_slice()),
        (owner, &format!("{scope}x"), row),
        (owner, scope, &other_row),
    ] {
        let result = open(&bytes, o, s, r);
        prop_assert!(
            matches!(result, Err(Error::Decrypt { .. })),
            "opened in another context: {:?}",
            result.err()
        );
    }
    // Altered: one byte anywhere.
    let mut altered = bytes.clone();
    let at = at % altered.len();
    altered[at] ^= flip;
    let result = open(&altered, owner, scope, row);
    prop_assert!(
        match &result {
            Err(Error::Malformed { .. }) => at < 2,
            Err(Error::UnknownKeyVersion { .. }) => (2..HEADER_LEN).contains(&at),
            Err(Error::Decrypt { .. }) => true,
            _ => false,
        },
        "byte {} altered: {:?}",
        at,
        result.err()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn strings(value in any::<String>(), ctx in context(), at in any::<usize>(), flip in 1..=255u8) {
        check(&value, &ctx, at, flip)?;
    }

    #[test]
    fn bytes(value in vec(any::<u8>(), 0..256), ctx in context(), at in any::<usize>(), flip in 1..=255u8) {
        check(&value, &ctx, at, flip)?;
    }

    #[test]
    fn integers(
        values in (any::<i8>(), any::<i16>(), any::<i32>(), any::<i64>()),
        unsigned in (any::<u8>(), any::<u16>(), any::<u32>(), any::<u64>()),
        ctx in context(),
        at in any::<usize>(),
        flip in 1..=255u8,
    ) {
        check(&values.0, &ctx, at, flip)?;
        check(&values.1, &ctx, at, flip)?;
        check(&values.2, &ctx, at, flip)?;
        check(&values.3, &ctx, at, flip)?;
        check(&unsigned.0, &ctx, at, flip)?;
        check(&unsigned.1, &ctx, at, flip)?;
        check(&unsigned.2, &ctx, at, flip)?;
        check(&unsigned.3, &ctx, at, flip)?;
    }

    #[test]
    fn bools_and_dates(
        value in any::<bool>(),
        date in date(),
        at_time in date_time(),
        ctx in context(),
        at in any::<usize>(),
        flip in 1..=255u8,
    ) {
        check(&value, &ctx, at, flip)?;
        check(&date, &ctx, at, flip)?;
        check(&at_time, &ctx, at, flip)?;
    }

    #[test]
    fn arbitrary_stored_bytes_fail_to_open_without_panicking(
        bytes in vec(any::<u8>(), 0..100),
        (owner, scope, row) in context(),
    ) {
        // Nothing to open with: the owner's keys exist (sealing made them).
        KEYRING.keys_for_seal(&owner).expect("keys");
        let result = KEYRING.open::<String>(Encrypted::from_bytes(bytes), &owner, &scope, &row);
        prop_assert!(
            matches!(
                result,
                Err(Error::Malformed { .. } | Error::UnknownKeyVersion { .. } | Error::Decrypt { .. })
            ),
            "{:?}",
            result.err()
        );
    }
}
