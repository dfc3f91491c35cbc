//! How plain Rust values are encoded inside an envelope.
//!
//! | type | encoding |
//! |---|---|
//! | `String` | UTF-8 |
//! | `Vec<u8>` | raw bytes |
//! | `i8`…`i64`, `u8`…`u64` | big-endian, fixed width |
//! | `bool` | one byte, `0` or `1` |
//! | `chrono::NaiveDate` | ISO-8601 text, `1980-01-15` |
//! | `chrono::NaiveDateTime` | ISO-8601 text, `1980-01-15T08:30:00` (fraction when non-zero) |
//!
//! `Option::None` is not encoded at all: it is stored as SQL `NULL`
//! (`Option<Encrypted<T>>` on a `Nullable<Binary>` column).

use std::io::Write as _;
use std::str::FromStr;

use chrono::{NaiveDate, NaiveDateTime};
use zeroize::Zeroize;

pub use crate::error::DecodeError;

/// A Rust type that `phi` can store encrypted.
///
/// Implement it for a type of your own by choosing a stable byte encoding:
/// stored values must keep decoding after any upgrade.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored encrypted by phi",
    label = "this type does not implement `PhiValue`",
    note = "phi encrypts String, Vec<u8>, integers, bool, chrono::NaiveDate and chrono::NaiveDateTime; use Option<T> for a nullable column, or implement `phi_types::PhiValue` for your type"
)]
pub trait PhiValue: Sized + PartialEq {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Expected length of the encoding, used to size the envelope in one
    /// allocation.
    fn encoded_len(&self) -> usize;

    /// Decodes a value from the plaintext bytes of an envelope. The buffer is
    /// the caller's to reuse (a `String` takes it without copying).
    ///
    /// # Errors
    /// [`DecodeError`] when the bytes are not an encoding of `Self`.
    fn decode(bytes: Vec<u8>) -> Result<Self, DecodeError>;
}

impl PhiValue for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
    fn encoded_len(&self) -> usize {
        self.len()
    }
    fn decode(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        String::from_utf8(bytes).map_err(|e| {
            e.into_bytes().zeroize();
            DecodeError::Utf8
        })
    }
}

impl PhiValue for Vec<u8> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn encoded_len(&self) -> usize {
        self.len()
    }
    fn decode(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        Ok(bytes)
    }
}

macro_rules! fixed_width {
    ($($ty:ty),*) => {$(
        impl PhiValue for $ty {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn encoded_len(&self) -> usize {
                size_of::<$ty>()
            }
            fn decode(mut bytes: Vec<u8>) -> Result<Self, DecodeError> {
                let result = <[u8; size_of::<$ty>()]>::try_from(bytes.as_slice())
                    .map(<$ty>::from_be_bytes)
                    .map_err(|_| DecodeError::Length {
                        ty: stringify!($ty),
                        expected: size_of::<$ty>(),
                        found: bytes.len(),
                    });
                bytes.zeroize();
                result
            }
        }
    )*};
}
fixed_width!(i8, i16, i32, i64, u8, u16, u32, u64);

impl PhiValue for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn encoded_len(&self) -> usize {
        1
    }
    fn decode(mut bytes: Vec<u8>) -> Result<Self, DecodeError> {
        let result = match bytes.as_slice() {
            [0] => Ok(false),
            [1] => Ok(true),
            [_] => Err(DecodeError::Bool),
            other => Err(DecodeError::Length {
                ty: "bool",
                expected: 1,
                found: other.len(),
            }),
        };
        bytes.zeroize();
        result
    }
}

fn decode_text<T: FromStr>(mut bytes: Vec<u8>, what: &'static str) -> Result<T, DecodeError> {
    let result = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(DecodeError::DateTime(what));
    bytes.zeroize();
    result
}

impl PhiValue for NaiveDate {
    fn encode(&self, out: &mut Vec<u8>) {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{self}");
    }
    fn encoded_len(&self) -> usize {
        10
    }
    fn decode(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        decode_text(bytes, "date")
    }
}

impl PhiValue for NaiveDateTime {
    fn encode(&self, out: &mut Vec<u8>) {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{}T{}", self.date(), self.time());
    }
    fn encoded_len(&self) -> usize {
        19
    }
    fn decode(bytes: Vec<u8>) -> Result<Self, DecodeError> {
        decode_text(bytes, "timestamp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: PhiValue + PartialEq + std::fmt::Debug>(value: T) -> Vec<u8> {
        let mut out = Vec::new();
        value.encode(&mut out);
        assert_eq!(T::decode(out.clone()).expect("decodes"), value);
        out
    }

    #[test]
    fn encodings_match_the_documented_table() {
        assert_eq!(round_trip(String::from("Doe")), b"Doe");
        assert_eq!(round_trip(vec![0u8, 255]), vec![0, 255]);
        assert_eq!(round_trip(-2i16), vec![0xFF, 0xFE]);
        assert_eq!(round_trip(0x0102_0304u32), vec![1, 2, 3, 4]);
        assert_eq!(round_trip(i64::MIN), i64::MIN.to_be_bytes());
        assert_eq!(round_trip(true), vec![1]);
        assert_eq!(round_trip(false), vec![0]);
        let dob = NaiveDate::from_ymd_opt(1980, 1, 15).expect("date");
        assert_eq!(round_trip(dob), b"1980-01-15");
        let at = dob.and_hms_opt(8, 30, 0).expect("time");
        assert_eq!(round_trip(at), b"1980-01-15T08:30:00");
        let precise = dob.and_hms_micro_opt(8, 30, 0, 250).expect("time");
        round_trip(precise);
    }

    #[test]
    fn bad_plaintext_gives_typed_errors() {
        assert_eq!(String::decode(vec![0xFF]), Err(DecodeError::Utf8));
        assert_eq!(bool::decode(vec![2]), Err(DecodeError::Bool));
        assert!(matches!(
            u32::decode(vec![1, 2]),
            Err(DecodeError::Length {
                expected: 4,
                found: 2,
                ..
            })
        ));
        assert_eq!(
            NaiveDate::decode(b"15/01/1980".to_vec()),
            Err(DecodeError::DateTime("date"))
        );
    }

    /// Every encoding: round trip, and the canonical form of the table above.
    mod properties {
        use chrono::{Datelike, NaiveTime, Timelike};
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        fn encoded<T: PhiValue>(value: &T) -> Vec<u8> {
            let mut out = Vec::new();
            value.encode(&mut out);
            out
        }

        fn date() -> impl Strategy<Value = NaiveDate> {
            (NaiveDate::MIN.num_days_from_ce()..=NaiveDate::MAX.num_days_from_ce()).prop_map(
                |days| NaiveDate::from_num_days_from_ce_opt(days).expect("a day in range"),
            )
        }

        /// Any time of day, leap seconds (nanoseconds past 10^9 in the 59th
        /// second) included.
        fn time() -> impl Strategy<Value = NaiveTime> {
            prop_oneof![
                (0..86_400u32, 0..1_000_000_000u32),
                (0..86_400u32).prop_map(|s| (s, 0)),
                (0..1440u32, 1_000_000_000..2_000_000_000u32).prop_map(|(m, n)| (m * 60 + 59, n)),
            ]
            .prop_map(|(secs, nanos)| {
                NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos).expect("a valid time")
            })
        }

        fn round_trips<T: PhiValue + Clone + std::fmt::Debug>(value: &T) -> Vec<u8> {
            let bytes = encoded(value);
            assert_eq!(T::decode(bytes.clone()).as_ref(), Ok(value), "{value:?}");
            bytes
        }

        /// Decoding arbitrary bytes never panics, and what decodes is a
        /// fixed point: encoding it again gives bytes that decode to it.
        fn decodes_to_a_fixed_point<T: PhiValue + Clone + std::fmt::Debug>(
            bytes: &[u8],
        ) -> Option<Vec<u8>> {
            let value = T::decode(bytes.to_vec()).ok()?;
            Some(round_trips(&value))
        }

        macro_rules! integers {
            ($($name:ident: $ty:ty),*) => {$(
                proptest! {
                    #![proptest_config(ProptestConfig::with_cases(256))]
                    #[test]
                    fn $name(value in any::<$ty>(), bytes in vec(any::<u8>(), 0..12)) {
                        let out = round_trips(&value);
                        prop_assert_eq!(&out[..], &value.to_be_bytes()[..]);
                        prop_assert_eq!(out.len(), value.encoded_len());
                        // Exactly the big-endian bytes of the width decode.
                        match decodes_to_a_fixed_point::<$ty>(&bytes) {
                            Some(again) => prop_assert_eq!(again, bytes),
                            None => prop_assert_ne!(bytes.len(), size_of::<$ty>()),
                        }
                    }
                }
            )*};
        }
        integers!(
            i8_encoding: i8, i16_encoding: i16, i32_encoding: i32, i64_encoding: i64,
            u8_encoding: u8, u16_encoding: u16, u32_encoding: u32, u64_encoding: u64
        );

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn string_encoding(value in any::<String>(), bytes in vec(any::<u8>(), 0..40)) {
                let out = round_trips(&value);
                prop_assert_eq!(&out[..], value.as_bytes());
                prop_assert_eq!(out.len(), value.encoded_len());
                // Exactly the UTF-8 byte strings decode, to themselves.
                match decodes_to_a_fixed_point::<String>(&bytes) {
                    Some(again) => prop_assert_eq!(again, bytes),
                    None => prop_assert!(std::str::from_utf8(&bytes).is_err()),
                }
            }

            #[test]
            fn bytes_encoding(value in vec(any::<u8>(), 0..200)) {
                let out = round_trips(&value);
                prop_assert_eq!(&out, &value);
                prop_assert_eq!(out.len(), value.encoded_len());
            }

            #[test]
            fn bool_encoding(value in any::<bool>(), bytes in vec(any::<u8>(), 0..3)) {
                let out = round_trips(&value);
                prop_assert_eq!(out, vec![u8::from(value)]);
                prop_assert_eq!(value.encoded_len(), 1);
                match decodes_to_a_fixed_point::<bool>(&bytes) {
                    Some(again) => prop_assert_eq!(again, bytes),
                    None => prop_assert!(bytes != [0] && bytes != [1]),
                }
            }

            #[test]
            fn date_encoding(value in date(), bytes in vec(any::<u8>(), 0..14)) {
                let out = round_trips(&value);
                let text = String::from_utf8(out).expect("ISO-8601 text is UTF-8");
                let (y, m, d) = (value.year(), value.month(), value.day());
                let expected = if (0..=9999).contains(&y) {
                    format!("{y:04}-{m:02}-{d:02}")
                } else {
                    format!("{y:+05}-{m:02}-{d:02}")
                };
                prop_assert_eq!(&text, &expected);
                if (0..=9999).contains(&y) {
                    prop_assert_eq!(text.len(), value.encoded_len());
                }
                let _ = decodes_to_a_fixed_point::<NaiveDate>(&bytes);
            }

            #[test]
            fn date_time_encoding(
                date in date(),
                time in time(),
                bytes in vec(any::<u8>(), 0..40),
            ) {
                let value = date.and_time(time);
                let out = round_trips(&value);
                let text = String::from_utf8(out).expect("ISO-8601 text is UTF-8");
                let (h, m, s) = (time.hour(), time.minute(), time.second());
                let (s, nanos) = match time.nanosecond() {
                    n if n >= 1_000_000_000 => (60, n - 1_000_000_000),
                    n => (s, n),
                };
                let fraction = match nanos {
                    0 => String::new(),
                    n if n % 1_000_000 == 0 => format!(".{:03}", n / 1_000_000),
                    n if n % 1_000 == 0 => format!(".{:06}", n / 1_000),
                    n => format!(".{n:09}"),
                };
                let expected = format!("{}T{h:02}:{m:02}:{s:02}{fraction}", encoded_text(&date));
                prop_assert_eq!(&text, &expected);
                if (0..=9999).contains(&date.year()) && nanos == 0 {
                    prop_assert_eq!(text.len(), value.encoded_len());
                }
                let _ = decodes_to_a_fixed_point::<NaiveDateTime>(&bytes);
            }

            #[test]
            fn date_texts_near_the_canonical_form_never_panic(
                y in 0..10_000u32, m in 0..14u32, d in 0..33u32,
                h in 0..25u32, min in 0..61u32, s in 0..62u32, frac in 0..10_000_000_000u64,
            ) {
                for text in [
                    format!("{y:04}-{m:02}-{d:02}"),
                    format!("{y}-{m}-{d}"),
                    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}"),
                    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{frac}"),
                    format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02}:{s:02}"),
                ] {
                    let _ = decodes_to_a_fixed_point::<NaiveDate>(text.as_bytes());
                    let _ = decodes_to_a_fixed_point::<NaiveDateTime>(text.as_bytes());
                }
            }
        }

        fn encoded_text(date: &NaiveDate) -> String {
            String::from_utf8(encoded(date)).expect("UTF-8")
        }
    }
}
