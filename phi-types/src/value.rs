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

/// Why decrypted bytes do not decode as the expected type. Never carries the
/// bytes themselves.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A `bool` byte other than 0 or 1.
    #[error("invalid bool byte")]
    Bool,
    /// A date or timestamp that is not ISO-8601 text.
    #[error("invalid {0} text")]
    DateTime(&'static str),
    /// A fixed-width integer of the wrong length.
    #[error("expected {expected} bytes for {ty}, found {found}")]
    Length {
        /// Rust type being decoded.
        ty: &'static str,
        /// Width of that type.
        expected: usize,
        /// Length found.
        found: usize,
    },
    /// Text that is not UTF-8.
    #[error("invalid UTF-8 text")]
    Utf8,
}

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
}
