//! `uuid::Uuid` owner ids and row keys (feature `uuid`).

use std::borrow::Cow;
use std::fmt;

use diesel::backend::Backend;
use diesel::deserialize::{self, FromSql, FromSqlRow};
use diesel::expression::AsExpression;
use diesel::serialize::{self, Output, ToSql};
use diesel::sql_types::Binary;

use crate::record::{OwnerId, RowKey, RowKeyBytes};

/// A `uuid::Uuid` stored as its 16 bytes (RFC 9562 byte order) in a binary
/// column: MySQL `BINARY(16)` (what `UUID_TO_BIN` gives), SQLite `BLOB`.
///
/// Diesel maps `uuid::Uuid` itself to PostgreSQL's `uuid` type only: on
/// PostgreSQL a model's owner or row key is a plain `Uuid` in a `uuid`
/// column. MySQL and SQLite have no UUID type, and Diesel cannot map a
/// foreign type to `Binary` from outside; this newtype is that mapping, on
/// the `Binary` column `diesel print-schema` writes for those columns. It
/// dereferences to the `Uuid`, converts both ways, and is an [`OwnerId`]
/// and a [`RowKey`] bound exactly as the `Uuid` it holds: its lowercase
/// hyphenated text. Reading a value that is not 16 bytes is an error naming
/// its length.
///
/// ```
/// use phi_types::BinaryUuid;
///
/// diesel::table! {
///     notes (note_id) {
///         note_id -> Binary,
///         patient_id -> Binary,
///         body -> Binary,
///     }
/// }
///
/// #[derive(phi_types::PhiRecord, Clone, PartialEq)]
/// #[phi(table = notes)]
/// #[diesel(primary_key(note_id))]
/// struct Note {
///     #[phi(row_key)]
///     note_id: BinaryUuid,
///     #[phi(owner)]
///     patient_id: BinaryUuid,
///     #[phi(encrypt)]
///     body: String,
/// }
///
/// let id = uuid::Uuid::from_u128(0x6f1c2a4e_8b5d_4e1f_9a7c_3d2b1e0f4a5c);
/// assert_eq!(
///     phi_types::OwnerId::owner_id(&BinaryUuid::from(id)),
///     "6f1c2a4e-8b5d-4e1f-9a7c-3d2b1e0f4a5c"
/// );
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, AsExpression, FromSqlRow)]
#[diesel(sql_type = Binary)]
pub struct BinaryUuid(pub uuid::Uuid);

impl fmt::Debug for BinaryUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for BinaryUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::ops::Deref for BinaryUuid {
    type Target = uuid::Uuid;

    fn deref(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl From<uuid::Uuid> for BinaryUuid {
    fn from(id: uuid::Uuid) -> Self {
        BinaryUuid(id)
    }
}

impl From<BinaryUuid> for uuid::Uuid {
    fn from(id: BinaryUuid) -> Self {
        id.0
    }
}

impl<DB> ToSql<Binary, DB> for BinaryUuid
where
    DB: Backend,
    [u8]: ToSql<Binary, DB>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, DB>) -> serialize::Result {
        <[u8] as ToSql<Binary, DB>>::to_sql(&self.0.as_bytes()[..], out)
    }
}

impl<DB> FromSql<Binary, DB> for BinaryUuid
where
    DB: Backend,
    Vec<u8>: FromSql<Binary, DB>,
{
    fn from_sql(value: DB::RawValue<'_>) -> deserialize::Result<Self> {
        let bytes = <Vec<u8> as FromSql<Binary, DB>>::from_sql(value)?;
        uuid::Uuid::from_slice(&bytes).map(BinaryUuid).map_err(|_| {
            format!(
                "a UUID column holds 16 bytes, this value has {}",
                bytes.len()
            )
            .into()
        })
    }
}

impl OwnerId for BinaryUuid {
    fn owner_id(&self) -> Cow<'_, str> {
        self.0.owner_id()
    }
}

impl RowKey for BinaryUuid {
    fn row_key(&self) -> RowKeyBytes<'_> {
        self.0.row_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_2a4e_8b5d_4e1f_9a7c_3d2b_1e0f_4a5c);
    const TEXT: &str = "6f1c2a4e-8b5d-4e1f-9a7c-3d2b1e0f4a5c";

    #[test]
    fn a_uuid_binds_its_lowercase_hyphenated_text() {
        assert_eq!(ID.owner_id(), TEXT);
        assert_eq!(&*ID.row_key(), TEXT.as_bytes());
        assert_eq!(BinaryUuid(ID).owner_id(), TEXT);
        assert_eq!(&*BinaryUuid(ID).row_key(), TEXT.as_bytes());
        // The same bytes as a `String` row key holding that text.
        assert_eq!(&*ID.row_key(), &*TEXT.to_owned().row_key());
        let max = uuid::Uuid::max();
        assert_eq!(max.owner_id(), "ffffffff-ffff-ffff-ffff-ffffffffffff");
        assert_eq!(
            &*uuid::Uuid::nil().row_key(),
            b"00000000-0000-0000-0000-000000000000"
        );
    }

    /// Through Diesel on SQLite: the 16 bytes are stored and read back; a
    /// value of another length is an error naming its length.
    #[cfg(feature = "sqlite")]
    #[test]
    fn binary_uuid_columns_hold_the_16_bytes() {
        use diesel::prelude::*;

        diesel::table! {
            keyed (id) {
                id -> Binary,
            }
        }

        let mut conn = SqliteConnection::establish(":memory:").expect("SQLite");
        diesel::sql_query("CREATE TABLE keyed (id BLOB NOT NULL PRIMARY KEY)")
            .execute(&mut conn)
            .expect("table");
        diesel::insert_into(keyed::table)
            .values(keyed::id.eq(BinaryUuid(ID)))
            .execute(&mut conn)
            .expect("insert");
        let raw: Vec<u8> = keyed::table
            .select(diesel::dsl::sql::<Binary>("id"))
            .first(&mut conn)
            .expect("raw");
        assert_eq!(raw, ID.as_bytes());
        let found: BinaryUuid = keyed::table
            .find(BinaryUuid(ID))
            .select(keyed::id)
            .first(&mut conn)
            .expect("found by its UUID");
        assert_eq!(found, BinaryUuid(ID));

        diesel::delete(keyed::table)
            .execute(&mut conn)
            .expect("delete");
        diesel::insert_into(keyed::table)
            .values(keyed::id.eq(&ID.as_bytes()[..15]))
            .execute(&mut conn)
            .expect("insert 15 bytes");
        let err = keyed::table
            .select(keyed::id)
            .first::<BinaryUuid>(&mut conn)
            .expect_err("15 bytes are no UUID");
        let diesel::result::Error::DeserializationError(cause) = err else {
            panic!("expected a deserialization error, got {err:?}");
        };
        let inner = std::error::Error::source(&*cause).map(ToString::to_string);
        assert_eq!(
            inner.as_deref(),
            Some("a UUID column holds 16 bytes, this value has 15"),
            "{cause}"
        );
    }
}
