//! Envelope v1 header parsing, and `Encrypted<T>` built from the bytes a
//! database column returns (what `FromSql` does): total on any input, and
//! consistent with the documented layout.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_types::Encrypted;
use phi_types::envelope::{EnvelopeError, Header, MAGIC, OVERHEAD, VERSION_V1};

fuzz_target!(|data: &[u8]| {
    let parsed = Header::parse(data);
    match parsed {
        Ok(header) => {
            assert!(data.len() >= OVERHEAD);
            assert_eq!(header.format, VERSION_V1);
            assert_eq!(header.to_bytes()[..], data[..6]);
        }
        Err(EnvelopeError::Empty) => assert!(data.is_empty()),
        Err(EnvelopeError::BadMagic(b)) => assert!(b != MAGIC && data[0] == b),
        Err(EnvelopeError::Truncated { len, min }) => {
            assert_eq!(len, data.len());
            assert!(len < min);
        }
        Err(EnvelopeError::UnsupportedVersion(v)) => assert!(v != VERSION_V1 && data[1] == v),
        Err(other) => panic!("unexpected error {other:?}"),
    }

    // `FromSql` for `Encrypted<T>` keeps the column's bytes and this parse.
    let value = Encrypted::<String>::from_bytes(data.to_vec());
    assert_eq!(value.header(), parsed);
    assert_eq!(value.key_version(), parsed.ok().map(|h| h.key_version));
    assert_eq!(value.as_bytes(), data);
    // Debug shows the format, key version and length only.
    let shown = format!("{value:?}");
    let expected = match parsed {
        Ok(h) => format!(
            "Encrypted(v{}, key version {}, {} bytes)",
            h.format,
            h.key_version,
            data.len()
        ),
        Err(_) => format!("Encrypted(<not an envelope>, {} bytes)", data.len()),
    };
    assert_eq!(shown, expected);
    // A row stored unsealed decodes as its type or fails cleanly.
    if let Ok(text) = value.clone().into_unsealed() {
        assert_eq!(text.as_bytes(), data);
    }
    let _ = Encrypted::<chrono::NaiveDate>::from_bytes(data.to_vec()).into_unsealed();
    assert_eq!(value.into_bytes(), data);
});
