//! `Encrypted<T>`: the stored form of a `T`, as a Diesel `Binary` value.

use std::fmt;
use std::marker::PhantomData;

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Binary;

use crate::envelope::{EnvelopeError, Header};

/// The sealed form of a `T`: envelope bytes, stored in a `Binary` column
/// (`BLOB`, `VARBINARY`, `BYTEA`).
///
/// `Encrypted<T>` implements Diesel's `ToSql` and `FromSql` for `Binary` on
/// every backend, so `diesel print-schema` output is used unchanged and
/// `Option<Encrypted<T>>` maps a `Nullable<Binary>` column (`None` is SQL
/// `NULL`, never encrypted). Neither does I/O or decryption: `FromSql` keeps
/// the bytes and checks the envelope header; opening needs the owner's key,
/// which only [`OwnerKeys::open`](crate::OwnerKeys::open) and
/// [`Keyring::open`](crate::Keyring::open) have. A malformed header is
/// reported when the value is opened, naming table, column and owner, so one
/// bad row does not fail a whole `load`.
///
/// `Debug` shows the format and key version, never the bytes.
#[derive(AsExpression, FromSqlRow)]
#[diesel(sql_type = Binary)]
pub struct Encrypted<T> {
    bytes: Vec<u8>,
    header: Result<Header, EnvelopeError>,
    _value: PhantomData<fn() -> T>,
}

impl<T> Encrypted<T> {
    /// Wraps stored bytes (as read from the column) without decrypting.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let header = Header::parse(&bytes);
        Encrypted {
            bytes,
            header,
            _value: PhantomData,
        }
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The stored bytes, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The envelope header, or why the bytes are not an envelope.
    ///
    /// # Errors
    /// [`EnvelopeError`] when the bytes are not a complete envelope of a
    /// known format.
    pub fn header(&self) -> Result<Header, EnvelopeError> {
        self.header
    }

    /// The data key version the value is sealed under, if the bytes are an
    /// envelope.
    pub fn key_version(&self) -> Option<u32> {
        self.header.ok().map(|h| h.key_version)
    }
}

impl<T: crate::value::PhiValue> Encrypted<T> {
    /// The plain encoding of `value`, unsealed: what a row whose encrypted
    /// flag is off holds in an encrypted column during a gradual roll-out.
    /// Only the derive's roll-out path writes this.
    pub fn unsealed(value: &T) -> Self {
        let mut bytes = Vec::with_capacity(value.encoded_len());
        value.encode(&mut bytes);
        Encrypted::from_bytes(bytes)
    }

    /// Decodes the bytes of a row whose encrypted flag is off as a plain
    /// `T`, without decrypting.
    ///
    /// # Errors
    /// When the bytes are not a `T`'s encoding (an envelope is not).
    pub fn into_unsealed(self) -> Result<T, crate::value::DecodeError> {
        T::decode(self.bytes)
    }
}

impl<T> Clone for Encrypted<T> {
    fn clone(&self) -> Self {
        Encrypted {
            bytes: self.bytes.clone(),
            header: self.header,
            _value: PhantomData,
        }
    }
}

impl<T> PartialEq for Encrypted<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl<T> Eq for Encrypted<T> {}

impl<T> fmt::Debug for Encrypted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.header {
            Ok(header) => write!(
                f,
                "Encrypted(v{}, key version {}, {} bytes)",
                header.format,
                header.key_version,
                self.bytes.len()
            ),
            Err(_) => write!(
                f,
                "Encrypted(<not an envelope>, {} bytes)",
                self.bytes.len()
            ),
        }
    }
}

impl<T, DB> ToSql<Binary, DB> for Encrypted<T>
where
    DB: Backend,
    [u8]: ToSql<Binary, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
        self.bytes.as_slice().to_sql(out)
    }
}

impl<T, DB> FromSql<Binary, DB> for Encrypted<T>
where
    DB: Backend,
    Vec<u8>: FromSql<Binary, DB>,
{
    fn from_sql(bytes: DB::RawValue<'_>) -> deserialize::Result<Self> {
        Vec::<u8>::from_sql(bytes).map(Encrypted::from_bytes)
    }
}
