//! Normalisation of blind-index input: text is trimmed and lower-cased as
//! documented, and is idempotent, so a value and its normalised form find
//! each other; anything else is hashed as it is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_types::blind::Normalize;

fuzz_target!(|data: &[u8]| {
    for n in [
        Normalize::NONE,
        Normalize::TRIM,
        Normalize::LOWERCASE,
        Normalize::TRIM_LOWERCASE,
    ] {
        let out = n.apply(data);
        let Ok(text) = std::str::from_utf8(data) else {
            assert_eq!(
                &*out, data,
                "bytes that are not UTF-8 are hashed as they are"
            );
            continue;
        };
        let mut expected = if n.trims() { text.trim() } else { text }.to_owned();
        if n.lowercases() {
            expected = expected.to_lowercase();
        }
        assert_eq!(&*out, expected.as_bytes(), "{n:?} of {text:?}");
        assert_eq!(&*n.apply(&out), &*out, "{n:?} is idempotent on {text:?}");
    }
});
