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
//! | `chrono::DateTime<Utc>` | RFC 3339 text in UTC, always nine fraction digits and `Z`: `2024-03-01T08:30:00.000000000Z` |
//! | `serde_json::Value` (feature `serde_json`) | compact JSON text, UTF-8: `{"allergies":["penicillin"]}` |
//!
//! A `DateTime<Utc>` is text for the same reasons as the other dates (it
//! reads back in any language, and a legacy text column holds it), in UTC
//! so that one instant has one encoding, with nanoseconds (chrono's
//! precision) so that every value round-trips, and with a fixed number of
//! fraction digits so that every instant of years 0000 to 9999 encodes to
//! the same 30 bytes: its length tells nothing about its value. Years
//! outside that range carry a sign (`+10000-01-01T…`), as chrono writes
//! them; a leap second is `:60`. Decoding takes RFC 3339 text ending in
//! `Z` with any number of fraction digits.
//!
//! A `serde_json::Value` is the text `serde_json::to_vec` writes: no
//! whitespace, object keys in the order of serde_json's `Map` (sorted,
//! unless the application enables serde_json's `preserve_order`, which then
//! keeps insertion order; either way the text decodes to an equal value).
//! Decoding takes any JSON text.
//!
//! `Option::None` is not encoded at all: it is stored as SQL `NULL`
//! (`Option<Encrypted<T>>` on a `Nullable<Binary>` column).

use std::io::Write as _;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use zeroize::Zeroize;

pub use crate::error::DecodeError;

/// A Rust type that `phi` can store encrypted.
///
/// Implement it for a type of your own by choosing a stable byte encoding:
/// stored values must keep decoding after any upgrade.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be stored encrypted by phi",
    label = "this type does not implement `PhiValue`",
    note = "phi encrypts String, Vec<u8>, integers, bool, chrono::NaiveDate, chrono::NaiveDateTime, chrono::DateTime<Utc> and (feature `serde_json`) serde_json::Value; use Option<T> for a nullable column, or implement `phi_types::PhiValue` for your type"
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

    /// Overwrites the value's heap memory with zeros, if it has any: called
    /// by phi on plaintexts it decodes for its own use (the migration and
    /// re-index jobs' canonical re-encoding) before it drops them. The
    /// default does nothing, which is right for values without a heap
    /// buffer (integers, dates); `String` and `Vec<u8>` wipe their bytes.
    fn wipe(&mut self) {}
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
    fn wipe(&mut self) {
        self.zeroize();
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
    fn wipe(&mut self) {
        self.zeroize();
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

/// RFC 3339 in UTC with nine fraction digits: 30 bytes for years 0000 to
/// 9999.
const DATE_TIME_UTC_LEN: usize = 30;

impl PhiValue for DateTime<Utc> {
    fn encode(&self, out: &mut Vec<u8>) {
        let naive = self.naive_utc();
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{}", naive.format("%Y-%m-%dT%H:%M:%S%.9fZ"));
    }
    fn encoded_len(&self) -> usize {
        // Exact, so that the envelope's buffer never grows (and never leaves
        // a copy of the plaintext behind): a year outside 0000..=9999 has a
        // sign and may have more than four digits.
        use chrono::Datelike as _;
        let year = self.naive_utc().year();
        if (0..=9999).contains(&year) {
            DATE_TIME_UTC_LEN
        } else {
            let digits = year.unsigned_abs().checked_ilog10().unwrap_or(0) as usize + 1;
            DATE_TIME_UTC_LEN + 1 + digits.max(4) - 4
        }
    }
    fn decode(mut bytes: Vec<u8>) -> Result<Self, DecodeError> {
        let result = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.strip_suffix('Z'))
            .and_then(|s| s.parse::<NaiveDateTime>().ok())
            .map(|naive| naive.and_utc())
            .ok_or(DecodeError::DateTime("UTC timestamp"));
        bytes.zeroize();
        result
    }
}

#[cfg(feature = "serde_json")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde_json")))]
impl PhiValue for serde_json::Value {
    fn encode(&self, out: &mut Vec<u8>) {
        // Serialising a `Value` into a Vec cannot fail: its map keys are
        // strings and its numbers finite.
        let _ = serde_json::to_writer(&mut *out, self);
    }
    fn encoded_len(&self) -> usize {
        // Exact (the text is written once to count it), so that the
        // envelope's buffer never grows and never leaves a copy of the
        // plaintext behind.
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = Count(0);
        let _ = serde_json::to_writer(&mut count, self);
        count.0
    }
    fn decode(mut bytes: Vec<u8>) -> Result<Self, DecodeError> {
        let result = serde_json::from_slice(&bytes).map_err(|_| DecodeError::Json);
        bytes.zeroize();
        result
    }
    fn wipe(&mut self) {
        fn wipe_json(value: &mut serde_json::Value) {
            match value {
                serde_json::Value::String(text) => text.zeroize(),
                serde_json::Value::Array(items) => items.iter_mut().for_each(wipe_json),
                // Object keys cannot be written in place: their values are.
                serde_json::Value::Object(map) => map.values_mut().for_each(wipe_json),
                _ => {}
            }
        }
        wipe_json(self);
        *self = serde_json::Value::Null;
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
    fn a_utc_timestamp_is_rfc_3339_with_nine_fraction_digits() {
        let at = NaiveDate::from_ymd_opt(2024, 3, 1)
            .and_then(|d| d.and_hms_nano_opt(8, 30, 0, 0))
            .expect("time")
            .and_utc();
        assert_eq!(round_trip(at), b"2024-03-01T08:30:00.000000000Z");
        let precise = NaiveDate::from_ymd_opt(1980, 1, 15)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 123_456_789))
            .expect("time")
            .and_utc();
        assert_eq!(round_trip(precise), b"1980-01-15T23:59:59.123456789Z");
        // A leap second, and years outside 0000..=9999.
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("time")
            .and_utc();
        assert_eq!(round_trip(leap), b"2016-12-31T23:59:60.500000000Z");
        assert_eq!(
            round_trip(DateTime::<Utc>::MAX_UTC).len(),
            DateTime::<Utc>::MAX_UTC.encoded_len()
        );
        assert_eq!(
            round_trip(DateTime::<Utc>::MIN_UTC).len(),
            DateTime::<Utc>::MIN_UTC.encoded_len()
        );
        // Any fraction decodes; an offset other than `Z` does not.
        assert_eq!(
            DateTime::<Utc>::decode(b"2024-03-01T08:30:00Z".to_vec()),
            Ok(at)
        );
        for bad in [
            &b"2024-03-01T08:30:00+01:00"[..],
            b"2024-03-01T08:30:00.000000000",
            b"2024-03-01 08:30:00Z",
            b"",
        ] {
            assert_eq!(
                DateTime::<Utc>::decode(bad.to_vec()),
                Err(DecodeError::DateTime("UTC timestamp"))
            );
        }
    }

    #[cfg(feature = "serde_json")]
    #[test]
    fn a_json_value_is_compact_text() {
        let value = serde_json::json!({
            "weight_kg": 72.5,
            "allergies": ["penicillin", "latex"],
            "notes": null,
            "smoker": false,
            "name": "Zoë \"Z\" Ñúñez"
        });
        let out = round_trip(value.clone());
        assert_eq!(out.len(), value.encoded_len());
        assert_eq!(
            String::from_utf8(out).expect("UTF-8"),
            r#"{"allergies":["penicillin","latex"],"name":"Zoë \"Z\" Ñúñez","notes":null,"smoker":false,"weight_kg":72.5}"#
        );
        assert_eq!(round_trip(serde_json::Value::Null), b"null");
        assert_eq!(round_trip(serde_json::json!(-1)), b"-1");
        assert_eq!(round_trip(serde_json::json!([])), b"[]");
        // Whitespace decodes; what is not JSON is a typed error that does
        // not quote the text.
        assert_eq!(
            serde_json::Value::decode(b" { \"a\" : 1 } ".to_vec()),
            Ok(serde_json::json!({"a": 1}))
        );
        let err = serde_json::Value::decode(b"{\"ssn\": 078-05".to_vec()).expect_err("not JSON");
        assert_eq!(err, DecodeError::Json);
        assert!(!err.to_string().contains("078"));
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
            fn utc_date_time_encoding(
                date in date(),
                time in time(),
                bytes in vec(any::<u8>(), 0..40),
            ) {
                let value = date.and_time(time).and_utc();
                let out = round_trips(&value);
                prop_assert_eq!(out.len(), value.encoded_len());
                let text = String::from_utf8(out).expect("RFC 3339 text is UTF-8");
                let (s, nanos) = match time.nanosecond() {
                    n if n >= 1_000_000_000 => (60, n - 1_000_000_000),
                    n => (time.second(), n),
                };
                let expected = format!(
                    "{}T{:02}:{:02}:{s:02}.{nanos:09}Z",
                    encoded_text(&date),
                    time.hour(),
                    time.minute()
                );
                prop_assert_eq!(&text, &expected);
                let _ = decodes_to_a_fixed_point::<DateTime<Utc>>(&bytes);
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
