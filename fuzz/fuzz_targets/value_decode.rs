//! Every `PhiValue` decoder, on any plaintext: a value or a typed error,
//! never a panic; and whatever decodes encodes back to the same value.
#![no_main]

use chrono::{NaiveDate, NaiveDateTime};
use libfuzzer_sys::fuzz_target;
use phi_types::PhiValue;

/// Decodes `data` as `T`; a decoded value must survive encode → decode.
/// Returns the value's encoding when it decoded.
fn check<T: PhiValue + std::fmt::Debug>(data: &[u8]) -> Option<Vec<u8>> {
    let value = T::decode(data.to_vec()).ok()?;
    let mut encoded = Vec::new();
    value.encode(&mut encoded);
    let again = T::decode(encoded.clone())
        .unwrap_or_else(|e| panic!("{value:?} encodes to {encoded:?}, which does not decode: {e}"));
    assert_eq!(again, value, "round trip through {encoded:?}");
    Some(encoded)
}

fuzz_target!(|data: &[u8]| {
    // Text and bytes are stored exactly.
    if let Some(e) = check::<String>(data) {
        assert_eq!(e, data);
    }
    assert_eq!(check::<Vec<u8>>(data).as_deref(), Some(data));
    // Fixed width: exactly the width decodes, to the same bytes.
    macro_rules! fixed {
        ($($ty:ty),*) => {$(
            let e = check::<$ty>(data);
            assert_eq!(e.is_some(), data.len() == size_of::<$ty>(), stringify!($ty));
            if let Some(e) = e {
                assert_eq!(e, data);
            }
        )*};
    }
    fixed!(i8, i16, i32, i64, u8, u16, u32, u64);
    let b = check::<bool>(data);
    assert_eq!(b.is_some(), data == [0] || data == [1]);
    // Dates: ISO-8601 text.
    check::<NaiveDate>(data);
    check::<NaiveDateTime>(data);
});
