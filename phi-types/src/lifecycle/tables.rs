//! Application tables that hold sealed values, described at run time, and
//! the SQL the life-cycle jobs run on them.
//!
//! Every query reads the key version from the envelope header at a fixed
//! offset (bytes 3 to 6, SQL `SUBSTR(column, 3, 4)`), so counting and
//! finding values per key version never decrypts. Identifiers are checked,
//! then quoted by Diesel for the backend; values are bound by Diesel, owner
//! ids and row keys as their column's [`ColumnType`] (text, or integers read
//! as 64-bit signed integers).

use std::borrow::Cow;
use std::fmt;

use diesel::backend::Backend;
use diesel::expression::KnownCastSqlTypeName;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::Error as DieselError;
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, Binary, Bool, HasSqlType, Nullable, Text, Untyped};

use zeroize::Zeroizing;

use crate::blind::{DerivedIndex, Normalize};
use crate::connection::PhiConnection;
use crate::envelope::{MAGIC, VERSION_V1};
use crate::error::{BoxError, DecodeError, Error, Result};
use crate::keyring::OwnerKeys;
use crate::set_shape::SetShape;

/// The longest identifier accepted (MySQL's limit).
const MAX_IDENTIFIER_LEN: usize = 64;

/// The SQL type of a [`ResealTable`]'s owner column or row key column, and
/// so how the owner id is bound and which bytes a row key binds into each
/// value. The integer types match the `#[phi(owner)]` and `#[phi(row_key)]`
/// fields of a `#[derive(PhiRecord)]` model ([`OwnerId`](crate::OwnerId),
/// [`RowKey`](crate::RowKey)): an integer owner's id is its decimal text,
/// an integer row key binds its big-endian bytes (2 for `I16`/`U16`, 4 for
/// `I32`/`U32`, 8 for `I64`/`U64`).
///
/// Integer columns of any SQL integer type (`SMALLINT`, `INT`, `BIGINT`)
/// are read as 64-bit signed integers: `U64` values above `i64::MAX` are not
/// supported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// A text column (`VARCHAR`, `TEXT`): the owner id is the text; a row
    /// key binds its UTF-8 bytes. The default.
    #[default]
    Text,
    /// A signed 16-bit integer (`i16`): 2 big-endian bytes as a row key.
    I16,
    /// A signed 32-bit integer (`i32`): 4 big-endian bytes as a row key.
    I32,
    /// A signed 64-bit integer (`i64`): 8 big-endian bytes as a row key.
    I64,
    /// An unsigned 16-bit integer (`u16`): 2 big-endian bytes as a row key.
    U16,
    /// An unsigned 32-bit integer (`u32`): 4 big-endian bytes as a row key.
    U32,
    /// An unsigned 64-bit integer (`u64`, at most `i64::MAX` here): 8
    /// big-endian bytes as a row key.
    U64,
}

impl ColumnType {
    /// Every type, in the order of their spec names.
    const ALL: [ColumnType; 7] = [
        ColumnType::Text,
        ColumnType::I16,
        ColumnType::I32,
        ColumnType::I64,
        ColumnType::U16,
        ColumnType::U32,
        ColumnType::U64,
    ];

    /// The name used after `#` in a table description: `text`, `i16`,
    /// `i32`, `i64`, `u16`, `u32` or `u64`.
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::I16 => "i16",
            ColumnType::I32 => "i32",
            ColumnType::I64 => "i64",
            ColumnType::U16 => "u16",
            ColumnType::U32 => "u32",
            ColumnType::U64 => "u64",
        }
    }

    /// The type named `name` (see [`ColumnType::name`]), case-insensitive.
    pub fn from_name(name: &str) -> Option<ColumnType> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether the column holds integers.
    pub fn is_integer(self) -> bool {
        self != ColumnType::Text
    }

    /// `value` as this integer type's big-endian bytes, or why it does not
    /// fit. Never called for [`ColumnType::Text`].
    pub(crate) fn int_bytes(self, value: i64) -> std::result::Result<Vec<u8>, String> {
        let range = |_| format!("{value} is out of the range of {}", self.name());
        Ok(match self {
            ColumnType::Text | ColumnType::I64 => value.to_be_bytes().to_vec(),
            ColumnType::I16 => i16::try_from(value).map_err(range)?.to_be_bytes().to_vec(),
            ColumnType::I32 => i32::try_from(value).map_err(range)?.to_be_bytes().to_vec(),
            ColumnType::U16 => u16::try_from(value).map_err(range)?.to_be_bytes().to_vec(),
            ColumnType::U32 => u32::try_from(value).map_err(range)?.to_be_bytes().to_vec(),
            ColumnType::U64 => u64::try_from(value).map_err(range)?.to_be_bytes().to_vec(),
        })
    }

    /// Parses an owner id as this integer type: only its canonical decimal
    /// text (what [`OwnerId`](crate::OwnerId) produces) is accepted.
    fn parse_int(self, text: &str) -> std::result::Result<i64, String> {
        let parsed: Option<i64> = match self {
            ColumnType::Text | ColumnType::I64 => text.parse::<i64>().ok(),
            ColumnType::I16 => text.parse::<i16>().ok().map(i64::from),
            ColumnType::I32 => text.parse::<i32>().ok().map(i64::from),
            ColumnType::U16 => text.parse::<u16>().ok().map(i64::from),
            ColumnType::U32 => text.parse::<u32>().ok().map(i64::from),
            ColumnType::U64 => text.parse::<u64>().ok().and_then(|v| i64::try_from(v).ok()),
        };
        match parsed {
            Some(v) if v.to_string() == text => Ok(v),
            _ => Err(format!(
                "the owner id {text:?} is not the decimal text of a value of type {}{}",
                self.name(),
                if self == ColumnType::U64 {
                    " at most i64::MAX"
                } else {
                    ""
                }
            )),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The SQL type of a [`ResealTable`]'s encrypted flag column, as the
/// `#[phi(encrypted_flag)]` field of a derived model stores it
/// ([`EncryptedFlag`](crate::EncryptedFlag)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FlagType {
    /// A SQL boolean (`BOOLEAN`; `TINYINT(1)` on MySQL), a `bool` field:
    /// on when true. The default.
    #[default]
    Bool,
    /// An integer column, an integer field: on when not 0.
    Integer,
}

impl FlagType {
    /// The name used after `#` in a table description: `bool` or `int`.
    pub fn name(self) -> &'static str {
        match self {
            FlagType::Bool => "bool",
            FlagType::Integer => "int",
        }
    }

    /// The type named `name` (see [`FlagType::name`]), case-insensitive.
    pub fn from_name(name: &str) -> Option<FlagType> {
        [FlagType::Bool, FlagType::Integer]
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name.trim()))
    }
}

impl fmt::Display for FlagType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One application table whose encrypted columns the life-cycle jobs work
/// on: re-seal moves its values to the owner's current key version,
/// retirement counts the values still under a version, shredding samples
/// them to verify they no longer open.
///
/// ```
/// use phi_types::lifecycle::ResealTable;
/// let cases = ResealTable::new("cases", "user_id")
///     .key_column("case_id")
///     .column("patient_last")
///     .column_with_scope("dob", "cases.date_of_birth");
/// assert_eq!(ResealTable::parse("cases:user_id:case_id:patient_last,dob@cases.date_of_birth")?, cases);
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// The owner and row key columns are text unless typed otherwise: a model
/// with `#[phi(owner)] user_id: i64` and `#[phi(row_key)] id: i64` (both
/// `BIGINT` columns) is described with [`ColumnType::I64`], or `#i64` after
/// the column names in a description. Such a table's owner ids are the
/// integers' decimal text, and each value is bound to its row key's
/// big-endian bytes, exactly as the derived model seals them.
///
/// ```
/// use phi_types::lifecycle::{ColumnType, ResealTable};
/// let visits = ResealTable::new("visits", "user_id")
///     .owner_column_type(ColumnType::I64)
///     .key_column_typed("id", ColumnType::I64)
///     .column("reason")
///     .column("notes");
/// assert_eq!(ResealTable::parse("visits:user_id#i64:id#i64:reason,notes")?, visits);
/// assert_eq!(visits.to_string(), "visits:user_id#i64:id#i64:reason,notes");
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// A table with an encrypted flag (`#[phi(encrypted_flag)]`, for a
/// gradual roll-out) names it, so that the jobs only look at rows whose
/// flag is on: a value stored unsealed is plain data even when its bytes
/// happen to begin like an envelope (a binary value, some integers). In a
/// description it is a fifth field, a boolean unless typed `#int`; a
/// derived model with a flag and a row key gives its own description
/// ([`Migratable::reseal_table`](crate::migrate::Migratable::reseal_table)).
///
/// ```
/// use phi_types::lifecycle::{FlagType, ResealTable};
/// let cases = ResealTable::new("cases", "user_id")
///     .key_column("case_id")
///     .column("patient_last")
///     .flag_column("phi_encrypted");
/// assert_eq!(ResealTable::parse("cases:user_id:case_id:patient_last:phi_encrypted")?, cases);
/// let notes = ResealTable::parse("notes:clinic_id#i32:id#i64:body:sealed#int")?;
/// assert_eq!((notes.flag_column.as_deref(), notes.flag_type), (Some("sealed"), FlagType::Integer));
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// A table may be named with its schema (`clinic.cases`); the scope of a
/// column is still `cases.column`, as the derived model seals it: the
/// schema says where the table is, not what its values are bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResealTable {
    /// The table (optionally `schema.table`).
    pub table: String,
    /// The column holding each row's owner id.
    pub owner_column: String,
    /// The owner column's type: [`ColumnType::Text`] unless set with
    /// [`ResealTable::owner_column_type`].
    pub owner_type: ColumnType,
    /// The column whose bytes are bound into each value as its row key, or
    /// `None` when the values were sealed without one.
    pub key_column: Option<String>,
    /// The key column's type, which decides the row key's bytes:
    /// [`ColumnType::Text`] (UTF-8) unless set with
    /// [`ResealTable::key_column_typed`].
    pub key_type: ColumnType,
    /// The encrypted (binary, nullable) columns.
    pub columns: Vec<ResealColumn>,
    /// The encrypted flag column, when the table has one: rows whose flag
    /// is off hold plain values, which the jobs leave alone and do not
    /// count.
    pub flag_column: Option<String>,
    /// The flag column's type: [`FlagType::Bool`] unless set with
    /// [`ResealTable::flag_column_typed`].
    pub flag_type: FlagType,
}

/// One encrypted column of a [`ResealTable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResealColumn {
    /// The column.
    pub column: String,
    /// The scope its values are bound to: `table.column` unless pinned.
    pub scope: String,
    /// The blind index column kept beside it (`#[phi(encrypt, blind_index
    /// = …)]`) and how values are normalised before they are hashed: a
    /// re-seal writes each value's index under the version it seals the
    /// value with, in the same `UPDATE`. `None`: no blind index.
    pub blind_index: Option<(String, Normalize)>,
    /// The derived index columns kept beside it (`#[phi(encrypt,
    /// index(…))]`, see [`crate::blind::derived`]), rewritten with each
    /// re-sealed value as the blind index is.
    pub derived: Vec<(String, DerivedIndex)>,
}

impl ResealColumn {
    /// Its index columns, in the order the jobs read them: the blind index,
    /// then the derived indexes.
    pub(crate) fn indexes(&self) -> impl Iterator<Item = (&str, ColumnIndex)> {
        self.blind_index
            .iter()
            .map(|(name, n)| (name.as_str(), ColumnIndex::Blind(*n)))
            .chain(
                self.derived
                    .iter()
                    .map(|(name, d)| (name.as_str(), ColumnIndex::Derived(*d))),
            )
    }
}

/// An index column kept beside an encrypted column: its blind index or one
/// of its derived indexes. The jobs that seal or re-seal a value write its
/// indexes in the same `UPDATE`, computed from the plaintext under the
/// version the value is sealed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ColumnIndex {
    /// The [blind index](crate::blind), with its normalisation.
    Blind(Normalize),
    /// A [derived index](crate::blind::derived).
    Derived(DerivedIndex),
}

impl ColumnIndex {
    /// The index value of `plain` (a value's encoding) under the owner's
    /// current version.
    pub(crate) fn current(&self, keys: &OwnerKeys, scope: &str, plain: &[u8]) -> Result<Vec<u8>> {
        match self {
            ColumnIndex::Blind(normalize) => keys.blind_index_encoded(scope, plain, *normalize),
            ColumnIndex::Derived(index) => keys.derived_index_encoded(scope, plain, index),
        }
    }

    /// The index value of `plain` under `version`, if the owner holds it.
    pub(crate) fn under(
        &self,
        keys: &OwnerKeys,
        version: u32,
        scope: &str,
        plain: &[u8],
    ) -> Option<Vec<u8>> {
        match self {
            ColumnIndex::Blind(normalize) => {
                keys.blind_index_encoded_under(version, scope, plain, *normalize)
            }
            ColumnIndex::Derived(index) => keys.derived_index_under(version, scope, plain, index),
        }
    }

    /// The index values of `plain` under every version the owner holds.
    pub(crate) fn any_version(&self, keys: &OwnerKeys, scope: &str, plain: &[u8]) -> Vec<Vec<u8>> {
        keys.versions()
            .filter_map(|v| self.under(keys, v, scope, plain))
            .collect()
    }

    /// The stored length of an index value, in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            ColumnIndex::Blind(_) => crate::blind::BLIND_INDEX_LEN,
            ColumnIndex::Derived(index) => index.tag_len(),
        }
    }

    /// What it is, in messages: `blind index` or `derived index`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            ColumnIndex::Blind(_) => "blind index",
            ColumnIndex::Derived(_) => "derived index",
        }
    }
}

impl ResealTable {
    /// A table whose rows name their owner in `owner_column`, without a row
    /// key and without columns yet.
    pub fn new(table: impl Into<String>, owner_column: impl Into<String>) -> Self {
        ResealTable {
            table: table.into(),
            owner_column: owner_column.into(),
            owner_type: ColumnType::Text,
            key_column: None,
            key_type: ColumnType::Text,
            columns: Vec::new(),
            flag_column: None,
            flag_type: FlagType::Bool,
        }
    }

    /// The table's name without its schema (`cases` for `clinic.cases`):
    /// the first part of a column's default scope.
    pub fn table_name(&self) -> &str {
        self.table.rsplit('.').next().unwrap_or(&self.table)
    }

    /// The same table in `schema` (`clinic.cases`), for a table outside
    /// the connection's default schema; the columns' scopes are unchanged.
    #[must_use]
    pub fn in_schema(mut self, schema: &str) -> Self {
        self.table = format!("{schema}.{}", self.table_name());
        self
    }

    /// The boolean encrypted flag column (`#[phi(encrypted_flag)]` on a
    /// `bool` field): only rows whose flag is on are looked at.
    #[must_use]
    pub fn flag_column(self, column: impl Into<String>) -> Self {
        self.flag_column_typed(column, FlagType::Bool)
    }

    /// The encrypted flag column, of type `flag_type`: only rows whose
    /// flag is on are looked at.
    #[must_use]
    pub fn flag_column_typed(mut self, column: impl Into<String>, flag_type: FlagType) -> Self {
        self.flag_column = Some(column.into());
        self.flag_type = flag_type;
        self
    }

    /// The type of the owner column (default [`ColumnType::Text`]): with
    /// an integer type, the owner id given to a job must be an integer's
    /// decimal text, bound as an integer.
    #[must_use]
    pub fn owner_column_type(mut self, column_type: ColumnType) -> Self {
        self.owner_type = column_type;
        self
    }

    /// The text column bound into every value as its row key (its UTF-8
    /// bytes).
    #[must_use]
    pub fn key_column(self, column: impl Into<String>) -> Self {
        self.key_column_typed(column, ColumnType::Text)
    }

    /// The column bound into every value as its row key, of type
    /// `column_type`: text binds its UTF-8 bytes, an integer its big-endian
    /// bytes of the type's width.
    #[must_use]
    pub fn key_column_typed(mut self, column: impl Into<String>, column_type: ColumnType) -> Self {
        self.key_column = Some(column.into());
        self.key_type = column_type;
        self
    }

    /// An encrypted column whose scope is `table.column`, the table named
    /// without its schema ([`ResealTable::table_name`]), as the derived
    /// model seals it.
    #[must_use]
    pub fn column(self, column: impl Into<String>) -> Self {
        let column = column.into();
        let scope = self.default_scope(&column);
        self.column_with_scope(column, scope)
    }

    /// The scope of `column` unless pinned: `table.column`.
    fn default_scope(&self, column: &str) -> String {
        format!("{}.{column}", self.table_name())
    }

    /// An encrypted column whose values are bound to a pinned `scope`.
    #[must_use]
    pub fn column_with_scope(
        mut self,
        column: impl Into<String>,
        scope: impl Into<String>,
    ) -> Self {
        self.columns.push(ResealColumn {
            column: column.into(),
            scope: scope.into(),
            blind_index: None,
            derived: Vec::new(),
        });
        self
    }

    /// Gives the encrypted column added last its blind index column
    /// (`#[phi(encrypt, blind_index = index_column, normalize = …)]`): the
    /// jobs that re-seal its values write each one's index, recomputed from
    /// the plaintext under the version the value is sealed with, in the
    /// same `UPDATE` as the new ciphertext (a lookup then no longer needs
    /// the older versions' keys).
    ///
    /// ```
    /// use phi_types::blind::Normalize;
    /// use phi_types::lifecycle::ResealTable;
    /// let cases = ResealTable::new("cases", "user_id")
    ///     .key_column("case_id")
    ///     .column("patient_last")
    ///     .blind_index("patient_last_bidx", Normalize::TRIM_LOWERCASE);
    /// let spec = "cases:user_id:case_id:patient_last/patient_last_bidx#trim+lowercase";
    /// assert_eq!(ResealTable::parse(spec)?, cases);
    /// assert_eq!(cases.to_string(), spec);
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    ///
    /// Called before any column, it names no column: [`ResealTable::parse`]
    /// and the jobs refuse the table.
    #[must_use]
    pub fn blind_index(mut self, index_column: impl Into<String>, normalize: Normalize) -> Self {
        let index = Some((index_column.into(), normalize));
        match self.columns.last_mut() {
            Some(last) => last.blind_index = index,
            None => self.columns.push(ResealColumn {
                column: String::new(),
                scope: String::new(),
                blind_index: index,
                derived: Vec::new(),
            }),
        }
        self
    }

    /// Gives the encrypted column added last a derived index column
    /// (`#[phi(encrypt, index(column = index_column, …))]`), rewritten
    /// with each re-sealed value as the blind index is. In a description
    /// ([`parse`](Self::parse)): `/index_column=prefix(3)#trim+lowercase#16`,
    /// the transformation, then the normalisation and the tag bits.
    ///
    /// ```
    /// use phi_types::blind::{DerivedIndex, Normalize};
    /// use phi_types::lifecycle::ResealTable;
    /// let cases = ResealTable::new("cases", "user_id")
    ///     .key_column("case_id")
    ///     .column("patient_last")
    ///     .derived_index("last_prefix", DerivedIndex::prefix(3).normalize(Normalize::TRIM_LOWERCASE).bits(16));
    /// let spec = "cases:user_id:case_id:patient_last/last_prefix=prefix(3)#trim+lowercase#16";
    /// assert_eq!(ResealTable::parse(spec)?, cases);
    /// assert_eq!(cases.to_string(), spec);
    /// # Ok::<(), phi_types::Error>(())
    /// ```
    ///
    /// Called before any column, it names no column: the jobs refuse the
    /// table.
    #[must_use]
    pub fn derived_index(mut self, index_column: impl Into<String>, index: DerivedIndex) -> Self {
        let entry = (index_column.into(), index);
        match self.columns.last_mut() {
            Some(last) => last.derived.push(entry),
            None => self.columns.push(ResealColumn {
                column: String::new(),
                scope: String::new(),
                blind_index: None,
                derived: vec![entry],
            }),
        }
        self
    }

    /// The columns the whole-row jobs read, in [`MigrationRow::values`]'
    /// order: the encrypted columns, then each one's index columns (its
    /// blind index, then its derived indexes).
    pub(crate) fn read_columns(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.column.as_str()).chain(
            self.columns
                .iter()
                .flat_map(|c| c.indexes().map(|(i, _)| i)),
        )
    }

    /// Where the index columns of `self.columns[i]` sit among the
    /// [`read_columns`](Self::read_columns), with their names and kinds.
    pub(crate) fn index_positions(
        &self,
        i: usize,
    ) -> impl Iterator<Item = (usize, &str, ColumnIndex)> {
        let before: usize = self.columns[..i.min(self.columns.len())]
            .iter()
            .map(|c| c.indexes().count())
            .sum();
        let start = self.columns.len() + before;
        self.columns
            .get(i)
            .into_iter()
            .flat_map(ResealColumn::indexes)
            .enumerate()
            .map(move |(k, (name, index))| (start + k, name, index))
    }

    /// Whether the set-based jobs read and write this table's rows whole
    /// (several owners at once): it has a key column, and its encrypted and
    /// blind index columns fit one read ([`MAX_ROW_COLUMNS`]). Others are
    /// worked on column by column, owner by owner.
    pub(crate) fn whole_rows(&self) -> bool {
        self.key_column.is_some()
            && !self.columns.is_empty()
            && self.read_columns().count() <= MAX_ROW_COLUMNS
    }

    /// Parses `table:owner_column:key_column:col1,col2@scope,...[:flag]`:
    /// the key column may be empty (no row key); a column's scope is
    /// `table.column` (the table without its schema) unless given after
    /// `@`. A column with a blind index names it after `/`, before any
    /// scope, with its normalisation after `#` (`trim`, `lowercase`,
    /// `trim+lowercase`; none when left out):
    /// `cases:user_id:case_id:patient_last/patient_last_bidx#trim+lowercase`. The owner and key columns are text unless followed by `#` and
    /// a [`ColumnType`] name (`text`, `i16`, `i32`, `i64`, `u16`, `u32`,
    /// `u64`): `cases:user_id#i64:id#i64:notes`. The optional fifth field
    /// names the encrypted flag column, a boolean unless followed by
    /// `#int` ([`FlagType`]): `cases:user_id:case_id:notes:phi_encrypted`.
    ///
    /// # Errors
    /// [`Error::Config`] for a malformed description, an unknown type or an
    /// identifier that is not plain (letters, digits, `_`; a table may be
    /// `schema.table`).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Config(format!(
                "table description {spec:?}: {why} (expected table:owner_column[#type]:key_column[#type]:col1[/index[#normalisation]][@scope],col2[:flag_column[#bool|#int]])"
            ))
        };
        let typed = |field: &str| -> Result<(String, ColumnType)> {
            match field.split_once('#') {
                None => Ok((field.trim().to_owned(), ColumnType::Text)),
                Some((name, ty)) => {
                    let ty = ColumnType::from_name(ty).ok_or_else(|| {
                        bad(&format!(
                            "unknown column type {:?} (text, i16, i32, i64, u16, u32 or u64)",
                            ty.trim()
                        ))
                    })?;
                    Ok((name.trim().to_owned(), ty))
                }
            }
        };
        let parts: Vec<&str> = spec.trim().split(':').collect();
        let (table, owner, key, columns, flag) = match parts[..] {
            [table, owner, key, columns] => (table, owner, key, columns, None),
            [table, owner, key, columns, flag] => (table, owner, key, columns, Some(flag)),
            _ => return Err(bad("four or five ':'-separated fields are needed")),
        };
        let (owner, owner_type) = typed(owner)?;
        let mut out = ResealTable::new(table.trim(), owner).owner_column_type(owner_type);
        let (key, key_type) = typed(key)?;
        if !key.is_empty() {
            out = out.key_column_typed(key, key_type);
        } else if key_type != ColumnType::Text {
            return Err(bad("a key column type is given without a key column"));
        }
        for column in columns.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let (column, scope) = match column.split_once('@') {
                Some((column, scope)) => (column, Some(scope.trim())),
                None => (column, None),
            };
            // `column/index#normalisation/derived=transform#…`: the indexes
            // are named before any scope, which may hold any character.
            let mut segments = column.split('/');
            let column = segments.next().unwrap_or_default().trim();
            out = match scope {
                Some(scope) => out.column_with_scope(column, scope),
                None => out.column(column),
            };
            for index in segments {
                if let Some((name, spec)) = index.split_once('=') {
                    let derived = parse_derived(spec).map_err(|why| bad(&why))?;
                    if name.trim().is_empty() {
                        return Err(bad(&format!(
                            "column {column:?} names an empty derived index column"
                        )));
                    }
                    out = out.derived_index(name.trim(), derived);
                    continue;
                }
                let (index, normalize) = match index.split_once('#') {
                    None => (index.trim(), Normalize::NONE),
                    Some((index, names)) => (
                        index.trim(),
                        normalize_from_names(names).ok_or_else(|| {
                            bad(&format!(
                                "unknown normalisation {:?} (none, trim, lowercase or trim+lowercase)",
                                names.trim()
                            ))
                        })?,
                    ),
                };
                if index.is_empty() {
                    return Err(bad(&format!(
                        "column {column:?} names an empty blind index column"
                    )));
                }
                if out.columns.last().is_some_and(|c| c.blind_index.is_some()) {
                    return Err(bad(&format!(
                        "column {column:?} names two blind index columns (a derived index is `name=transform`)"
                    )));
                }
                out = out.blind_index(index, normalize);
            }
        }
        if out.columns.is_empty() {
            return Err(bad("no encrypted column is named"));
        }
        if let Some(flag) = flag {
            let (column, flag_type) = match flag.split_once('#') {
                None => (flag.trim(), FlagType::Bool),
                Some((column, ty)) => (
                    column.trim(),
                    FlagType::from_name(ty).ok_or_else(|| {
                        bad(&format!(
                            "unknown flag column type {:?} (bool or int)",
                            ty.trim()
                        ))
                    })?,
                ),
            };
            if column.is_empty() {
                return Err(bad("the fifth field names no flag column"));
            }
            out = out.flag_column_typed(column, flag_type);
        }
        out.validate()?;
        Ok(out)
    }

    /// Checks every identifier.
    pub(crate) fn validate(&self) -> Result<()> {
        check_identifier("table", &self.table, true)?;
        check_identifier("owner column", &self.owner_column, false)?;
        if let Some(key) = &self.key_column {
            check_identifier("key column", key, false)?;
        }
        if let Some(flag) = &self.flag_column {
            check_identifier("encrypted flag column", flag, false)?;
        }
        if self.columns.is_empty() {
            return Err(Error::Config(format!(
                "table {} names no encrypted column",
                self.table
            )));
        }
        for c in &self.columns {
            if let (true, Some((index, _))) = (c.column.is_empty(), c.indexes().next()) {
                return Err(Error::Config(format!(
                    "table {}: the index column {index:?} is given before any encrypted column",
                    self.table
                )));
            }
            check_identifier("column", &c.column, false)?;
            if c.scope.is_empty() {
                return Err(Error::Config(format!(
                    "column {}.{} has an empty scope",
                    self.table, c.column
                )));
            }
            if let Some((index, _)) = &c.blind_index {
                check_identifier("blind index column", index, false)?;
            }
            for (index, derived) in &c.derived {
                check_identifier("derived index column", index, false)?;
                derived.check().map_err(|why| {
                    Error::Config(format!("derived index {}.{index}: {why}", self.table))
                })?;
            }
        }
        Ok(())
    }
}

/// A derived index in a table description: `prefix(3)`, `last_digits(4)`,
/// `year`, `year_month` or `whole`, then `#`-separated a normalisation
/// (`trim+lowercase`) and the tag bits (`16`), each optional.
fn parse_derived(spec: &str) -> std::result::Result<DerivedIndex, String> {
    let mut parts = spec.split('#').map(str::trim);
    let transform = parts.next().unwrap_or_default().to_ascii_lowercase();
    let counted = |name: &str| -> Option<std::result::Result<u16, String>> {
        let inner = transform
            .strip_prefix(name)?
            .strip_prefix('(')?
            .strip_suffix(')')?;
        Some(
            inner
                .trim()
                .parse::<u16>()
                .map_err(|_| format!("{name}(…) takes a count, not {inner:?}")),
        )
    };
    let mut index = match transform.as_str() {
        "whole" => DerivedIndex::whole(),
        "year" => DerivedIndex::year(),
        "year_month" => DerivedIndex::year_month(),
        _ => match (counted("prefix"), counted("last_digits")) {
            (Some(n), _) => DerivedIndex::prefix(n?),
            (_, Some(n)) => DerivedIndex::last_digits(n?),
            _ => {
                return Err(format!(
                    "unknown derived index {transform:?} (whole, prefix(n), last_digits(n), year or year_month)"
                ));
            }
        },
    };
    for part in parts {
        if let Ok(bits) = part.parse::<u16>() {
            index = index.bits(bits);
        } else {
            index = index.normalize(normalize_from_names(part).ok_or_else(|| {
                format!("unknown normalisation {part:?} (none, trim, lowercase or trim+lowercase)")
            })?);
        }
    }
    index.check()?;
    Ok(index)
}

/// The name of a normalisation in a table description: `none`, `trim`,
/// `lowercase` or `trim+lowercase`.
fn normalize_name(normalize: Normalize) -> &'static str {
    match (normalize.trims(), normalize.lowercases()) {
        (false, false) => "none",
        (true, false) => "trim",
        (false, true) => "lowercase",
        (true, true) => "trim+lowercase",
    }
}

/// The normalisation `names` names (`trim`, `lowercase`, both joined by
/// `+` in any order, or `none`), case-insensitive.
fn normalize_from_names(names: &str) -> Option<Normalize> {
    let (mut trim, mut lowercase) = (false, false);
    for name in names.split('+').map(str::trim) {
        match name.to_ascii_lowercase().as_str() {
            "trim" => trim = true,
            "lowercase" => lowercase = true,
            "none" => {}
            _ => return None,
        }
    }
    Some(match (trim, lowercase) {
        (false, false) => Normalize::NONE,
        (true, false) => Normalize::TRIM,
        (false, true) => Normalize::LOWERCASE,
        (true, true) => Normalize::TRIM_LOWERCASE,
    })
}

impl fmt::Display for ResealTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.table, self.owner_column)?;
        if self.owner_type != ColumnType::Text {
            write!(f, "#{}", self.owner_type)?;
        }
        f.write_str(":")?;
        if let Some(key) = &self.key_column {
            f.write_str(key)?;
            if self.key_type != ColumnType::Text {
                write!(f, "#{}", self.key_type)?;
            }
        }
        f.write_str(":")?;
        for (i, c) in self.columns.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&c.column)?;
            if let Some((index, normalize)) = &c.blind_index {
                write!(f, "/{index}")?;
                if *normalize != Normalize::NONE {
                    write!(f, "#{}", normalize_name(*normalize))?;
                }
            }
            for (index, derived) in &c.derived {
                write!(f, "/{index}={}", derived.transform())?;
                if derived.normalization() != Normalize::NONE {
                    write!(f, "#{}", normalize_name(derived.normalization()))?;
                }
                if derived.tag_bits() != crate::blind::derived::MAX_DERIVED_BITS {
                    write!(f, "#{}", derived.tag_bits())?;
                }
            }
            if c.scope != self.default_scope(&c.column) {
                write!(f, "@{}", c.scope)?;
            }
        }
        if let Some(flag) = &self.flag_column {
            write!(f, ":{flag}")?;
            if self.flag_type != FlagType::Bool {
                write!(f, "#{}", self.flag_type)?;
            }
        }
        Ok(())
    }
}

/// How a [`Migratable`](crate::migrate::Migratable) model is stored, as
/// `#[derive(PhiRecord)]` describes it.
#[derive(Clone, Debug)]
pub struct StoredTable {
    /// The table's SQL name.
    pub table: &'static str,
    /// The owner column.
    pub owner_column: &'static str,
    /// The owner column's type; `None` for a type the jobs cannot bind.
    pub owner_type: Option<ColumnType>,
    /// The row key column, which orders the batches and guards each write.
    pub key_column: &'static str,
    /// The row key column's type; `None` for a type the jobs cannot bind
    /// (a byte-string key).
    pub key_type: Option<ColumnType>,
    /// The encrypted flag's column.
    pub flag_column: &'static str,
    /// Whether the flag is a SQL boolean (else an integer, 1 on, 0 off).
    pub flag_is_bool: bool,
    /// The encrypted columns.
    pub columns: Vec<StoredColumn>,
    /// The compound indexes over several encrypted columns
    /// (`#[phi(compound_index(…))]`).
    pub compounds: Vec<StoredCompound>,
}

/// A compound index of a [`StoredTable`]: one tag of several encrypted
/// columns' values together ([`CompoundIndex`](crate::blind::CompoundIndex)).
/// The writes, the backfill and `migrate::verify` keep it; a re-seal and
/// `rotate_all` leave it as it is, valid under the key version that wrote
/// it, which the finders try as they try every version the owner holds.
#[derive(Clone, Debug)]
pub struct StoredCompound {
    /// The index column.
    pub column: &'static str,
    /// The scope: the columns' scopes joined by `+`.
    pub scope: &'static str,
    /// The columns it is over, as positions in [`StoredTable::columns`],
    /// in the index's order.
    pub parts: &'static [usize],
    /// The index.
    pub index: crate::blind::CompoundIndex,
}

impl StoredCompound {
    /// The encodings of its columns among a row's `values` (one per
    /// encrypted column, in the table's order), in the index's order;
    /// `None` when one is NULL (the row then has no tag).
    pub(crate) fn parts_of<'v>(
        &self,
        values: &'v [Option<Zeroizing<Vec<u8>>>],
    ) -> Option<Vec<&'v [u8]>> {
        self.parts
            .iter()
            .map(|&p| values.get(p).and_then(Option::as_deref).map(Vec::as_slice))
            .collect()
    }
}

/// One encrypted column of a [`StoredTable`].
#[derive(Clone)]
pub struct StoredColumn {
    /// The column's SQL name.
    pub column: &'static str,
    /// The scope its values are bound to.
    pub scope: &'static str,
    /// The shadow column of the dual-write phase (`#[phi(encrypt, shadow)]`):
    /// sealed values go there while `column` keeps the plain value, until
    /// `finalize` drops `column` and renames the shadow to it. `None`: the
    /// column is sealed in place.
    pub shadow: Option<&'static str>,
    /// The blind index column computed from it, and its normalisation.
    pub blind_index: Option<(&'static str, Normalize)>,
    /// The derived index columns computed from it (`#[phi(encrypt,
    /// index(…))]`, see [`crate::blind::derived`]), and their indexes.
    pub derived: &'static [(&'static str, crate::blind::DerivedIndex)],
    /// The lookup index column computed from it (`#[phi(encrypt,
    /// lookup_index = …)]`, see [`crate::lookup`]), and its normalisation.
    pub lookup_index: Option<(&'static str, Normalize)>,
    /// Decodes plain bytes as the field's type and encodes the value
    /// again: the canonical encoding, which the model seals and indexes
    /// ([`canonical`](crate::migrate::canonical)).
    pub canonical: CanonicalFn,
}

/// [`StoredColumn::canonical`]: plain bytes to their canonical encoding.
pub type CanonicalFn = fn(Vec<u8>) -> std::result::Result<Zeroizing<Vec<u8>>, DecodeError>;

impl fmt::Debug for StoredColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredColumn")
            .field("column", &self.column)
            .field("scope", &self.scope)
            .field("shadow", &self.shadow)
            .field("blind_index", &self.blind_index)
            .field("derived", &self.derived)
            .field("lookup_index", &self.lookup_index)
            .finish_non_exhaustive()
    }
}

impl StoredColumn {
    /// Its index columns, in the order the jobs read them: the blind index,
    /// then the derived indexes.
    pub(crate) fn indexes(&self) -> impl Iterator<Item = (&'static str, ColumnIndex)> {
        self.blind_index
            .map(|(name, n)| (name, ColumnIndex::Blind(n)))
            .into_iter()
            .chain(
                self.derived
                    .iter()
                    .map(|(name, d)| (*name, ColumnIndex::Derived(*d))),
            )
    }

    /// The column sealed values are stored in: the shadow column during
    /// the dual-write phase, else the column itself.
    pub fn sealed_column(&self) -> &'static str {
        self.shadow.unwrap_or(self.column)
    }
}

impl StoredTable {
    /// Whether any column is in the dual-write phase (has a shadow column).
    pub fn has_shadow(&self) -> bool {
        self.columns.iter().any(|c| c.shadow.is_some())
    }

    /// The columns the jobs read: the encrypted columns (during the
    /// dual-write phase, the plaintext columns, read as text), then the
    /// blind index columns, then the shadow columns.
    pub fn read_columns(&self) -> Vec<&'static str> {
        self.columns
            .iter()
            .map(|c| c.column)
            .chain(
                self.columns
                    .iter()
                    .flat_map(|c| c.indexes().map(|(i, _)| i)),
            )
            .chain(self.compounds.iter().map(|c| c.column))
            .chain(self.columns.iter().filter_map(|c| c.shadow))
            .collect()
    }

    /// Every index column the jobs write beside the values, in read order:
    /// each encrypted column's, then the compound indexes'.
    pub(crate) fn all_index_columns(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.index_columns()
            .map(|(_, i, _)| i)
            .chain(self.compounds.iter().map(|c| c.column))
    }

    /// The index columns of every encrypted column, in read order, each
    /// with the position of its encrypted column.
    pub(crate) fn index_columns(&self) -> impl Iterator<Item = (usize, &'static str, ColumnIndex)> {
        self.columns
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.indexes().map(move |(name, index)| (i, name, index)))
    }

    /// Where the sealed value of `self.columns[i]` sits among the
    /// [`read_columns`](Self::read_columns): the column itself, or its
    /// shadow column.
    pub(crate) fn sealed_position(&self, i: usize) -> usize {
        if self.columns[i].shadow.is_none() {
            return i;
        }
        let indexes = self.all_index_columns().count();
        let shadows_before = self.columns[..i]
            .iter()
            .filter(|c| c.shadow.is_some())
            .count();
        self.columns.len() + indexes + shadows_before
    }

    /// The same table as the life-cycle jobs (re-seal, retire, usage,
    /// shred) take it: owner and row key columns with their types, the
    /// encrypted flag (so rows stored unsealed are left alone), and each
    /// column with the scope the model seals it under. The table is named
    /// without a schema, as the model names it; for a table outside the
    /// connection's default schema, add it with [`ResealTable::in_schema`]
    /// (the scopes stay the model's).
    ///
    /// # Errors
    /// [`Error::Config`] when the owner or row key type cannot be bound, or
    /// an identifier is not plain.
    pub fn reseal_table(&self) -> Result<ResealTable> {
        self.validate()?;
        let flag_type = if self.flag_is_bool {
            FlagType::Bool
        } else {
            FlagType::Integer
        };
        let mut out = ResealTable::new(self.table, self.owner_column)
            .owner_column_type(self.owner_type.unwrap_or_default())
            .key_column_typed(self.key_column, self.key_type.unwrap_or_default())
            .flag_column_typed(self.flag_column, flag_type);
        for c in &self.columns {
            out = out.column_with_scope(c.sealed_column(), c.scope);
            if let Some((index, normalize)) = c.blind_index {
                out = out.blind_index(index, normalize);
            }
            for (index, derived) in c.derived {
                out = out.derived_index(*index, *derived);
            }
        }
        Ok(out)
    }

    /// Checks identifiers and that the owner and key types can be bound.
    pub(crate) fn validate(&self) -> Result<()> {
        check_identifier("table", self.table, true)?;
        check_identifier("owner column", self.owner_column, false)?;
        check_identifier("key column", self.key_column, false)?;
        check_identifier("encrypted flag column", self.flag_column, false)?;
        for c in &self.columns {
            check_identifier("column", c.column, false)?;
            if let Some(shadow) = c.shadow {
                check_identifier("shadow column", shadow, false)?;
            }
            if let Some((index, _)) = c.blind_index {
                check_identifier("blind index column", index, false)?;
            }
            for (index, derived) in c.derived {
                check_identifier("derived index column", index, false)?;
                derived.check().map_err(|why| {
                    Error::Config(format!("derived index {}.{index}: {why}", self.table))
                })?;
            }
            if let Some((lookup, _)) = c.lookup_index {
                check_identifier("lookup column", lookup, false)?;
            }
        }
        for c in &self.compounds {
            check_identifier("compound index column", c.column, false)?;
            c.index.check().map_err(|why| {
                Error::Config(format!("compound index {}.{}: {why}", self.table, c.column))
            })?;
            if c.parts.len() != c.index.parts().len()
                || c.parts.iter().any(|&p| p >= self.columns.len())
            {
                return Err(Error::Config(format!(
                    "compound index {}.{}: its parts name no encrypted column of the table",
                    self.table, c.column
                )));
            }
        }
        let unsupported = |what: &str, column: &str| {
            Error::Config(format!(
                "{what} {}.{column} is not text or an integer: the migration jobs cannot bind it",
                self.table
            ))
        };
        if self.owner_type.is_none() {
            return Err(unsupported("owner column", self.owner_column));
        }
        if self.key_type.is_none() {
            return Err(unsupported("row key column", self.key_column));
        }
        Ok(())
    }
}

pub(crate) fn check_identifier(what: &str, name: &str, dotted: bool) -> Result<()> {
    let parts: Vec<&str> = if dotted {
        name.splitn(2, '.').collect()
    } else {
        vec![name]
    };
    let plain = |p: &str| {
        !p.is_empty()
            && p.len() <= MAX_IDENTIFIER_LEN
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    };
    if parts.iter().all(|p| plain(p)) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} {name:?} is not a plain SQL identifier (letters, digits and _, at most {MAX_IDENTIFIER_LEN})"
        )))
    }
}

/// A value bound into a query on an application table: an owner id or a
/// row key, as its column's SQL type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SqlValue {
    Text(String),
    Int(i64),
}

/// One value read for re-sealing or sampling: its row key and the key's
/// bytes, and its stored bytes.
pub(crate) struct StoredValue {
    /// The key column's value as read, which guards the write back (`None`
    /// without a key column).
    key: Option<SqlValue>,
    /// The row key's bytes as bound into the value (empty without one).
    row: Vec<u8>,
    pub(crate) bytes: Vec<u8>,
}

impl StoredValue {
    /// The row key's bytes as bound into the value (empty without one).
    pub(crate) fn row(&self) -> &[u8] {
        &self.row
    }
}

/// What one re-seal batch did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BatchOutcome {
    /// Values read.
    pub(crate) read: u64,
    /// Rows written back under the current version (a value copied to two
    /// rows of a table without a row key updates both).
    pub(crate) updated: u64,
    /// Values changed by someone else between read and write: left alone.
    pub(crate) conflicts: u64,
}

/// A value re-sealed: its new bytes, and its column's indexes
/// ([`ResealColumn::indexes`], in order) recomputed under the version it is
/// now sealed with.
pub(crate) struct Resealed {
    pub(crate) value: Vec<u8>,
    pub(crate) indexes: Vec<Vec<u8>>,
}

/// Turns a value's old bytes into its new bytes (open, then seal).
pub(crate) type Reseal<'a> = dyn FnMut(&StoredValue) -> Result<Resealed> + 'a;

/// Turns the value of column `i` of a row into its new bytes (`None`:
/// leave it, and its blind index, as they are).
pub(crate) type ResealRow<'a> = dyn FnMut(&MigrationRow, usize) -> Result<Option<Resealed>> + 'a;

/// Most encrypted columns a table may have for the jobs that read whole
/// rows of several owners at once ([`DataConnection::owner_rows`]).
pub(crate) const MAX_ROW_COLUMNS: usize = VALUE_SLOTS;

/// A connection to the application's database that the life-cycle jobs can
/// run on: `SqliteConnection`, `MysqlConnection` or `PgConnection`, each
/// behind its backend's cargo feature. Its methods are internal.
#[allow(private_interfaces)]
pub trait DataConnection: PhiConnection {
    /// Values of `owner` in `column` per key version: `(version, count)`.
    #[doc(hidden)]
    fn key_versions_in_use(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owner: &str,
    ) -> Result<Vec<(u32, u64)>>;

    /// Re-seals up to `limit` values of `owner` in `column` whose key
    /// version is below `current`, in one transaction, each `UPDATE`
    /// guarded by the bytes read.
    #[doc(hidden)]
    fn reseal_batch(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owner: &str,
        current: u32,
        limit: usize,
        reseal: &mut Reseal<'_>,
    ) -> Result<BatchOutcome>;

    /// Up to `limit` non-NULL values of `owner` in `column`.
    #[doc(hidden)]
    fn sample_values(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owner: &str,
        limit: usize,
    ) -> Result<Vec<StoredValue>>;

    /// Non-NULL values of `owner` in `column` that are not envelopes
    /// (stored in the clear).
    #[doc(hidden)]
    fn count_clear_values(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owner: &str,
    ) -> Result<u64>;

    /// Values of each of `owners` in `column` per key version: `(owner,
    /// version, count)`.
    #[doc(hidden)]
    fn key_versions_in_use_many(
        &mut self,
        table: &ResealTable,
        column: &ResealColumn,
        owners: &[String],
    ) -> Result<Vec<(String, u32, u64)>>;

    /// Rows of `owners` (whose flag is on, with a flag).
    #[doc(hidden)]
    fn count_owner_rows(&mut self, table: &ResealTable, owners: &[String]) -> Result<u64>;

    /// Up to `limit` rows of `owners` (whose flag is on, with a flag),
    /// read without locking, with their values in the table's column
    /// order; with `older_than`, only rows holding a value under an older
    /// version. Needs a key column and at most 8 columns.
    #[doc(hidden)]
    fn owner_rows(
        &mut self,
        table: &ResealTable,
        owners: &[String],
        older_than: Option<u32>,
        limit: usize,
    ) -> Result<Vec<MigrationRow>>;

    /// Those of `owners` with a value (on a row whose flag is on, with a
    /// flag) under a version older than `current`, in one query.
    #[doc(hidden)]
    fn owners_with_older_values(
        &mut self,
        table: &ResealTable,
        owners: &[String],
        current: u32,
    ) -> Result<Vec<String>>;

    /// The keys of the rows of `owners` (whose flag is on, with a flag)
    /// holding a value under a version older than `current`, in key order,
    /// read without locking. Needs a key column.
    #[doc(hidden)]
    fn owner_row_keys(
        &mut self,
        table: &ResealTable,
        owners: &[String],
        current: u32,
    ) -> Result<Vec<SqlValue>>;

    /// In one transaction: locks up to `limit` rows of `owners` holding a
    /// value under a version older than `current` (with `keys`, only rows
    /// of those keys), turns each value with `reseal` (`None`: keep it),
    /// and writes the rows back with one set-based `UPDATE`, each row
    /// matched by its key and owner (and its flag still on).
    #[doc(hidden)]
    fn reseal_owner_rows(
        &mut self,
        table: &ResealTable,
        owners: &[String],
        current: u32,
        keys: Option<&[SqlValue]>,
        limit: usize,
        reseal: &mut ResealRow<'_>,
    ) -> Result<BatchOutcome>;

    /// Rows of a migratable table whose flag is `sealed`.
    #[doc(hidden)]
    fn migration_count(&mut self, table: &StoredTable, sealed: bool) -> Result<u64>;

    /// Rows of a migratable table, read without locking: their keys and
    /// owners, and with `values` their encrypted columns.
    #[doc(hidden)]
    fn migration_rows(
        &mut self,
        table: &StoredTable,
        query: &RowsQuery<'_>,
        values: bool,
    ) -> Result<Vec<MigrationRow>>;

    /// In one write transaction: locks the first `limit` rows (in key
    /// order, after the key `after` when given) whose flag is `sealed`,
    /// calls `prepare` on the transaction's connection with them, turns
    /// each with `transform`, calls
    /// `before_write` on the transaction's connection, and writes the
    /// results with the flag flipped in one set-based `UPDATE` (more only
    /// past the backend's bind limit), each row guarded by its key and its
    /// flag still being `sealed`.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    fn migration_batch(
        &mut self,
        table: &StoredTable,
        sealed: bool,
        limit: usize,
        after: Option<&SqlValue>,
        prepare: &mut Prepare<'_, Self>,
        transform: &mut Transform<'_>,
        before_write: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<ApplyOutcome>;

    /// Whether `phi_legacy_values` exists in this database, and then how
    /// many records it holds for `table`.
    #[doc(hidden)]
    fn count_legacy_records(&mut self, table: &'static str) -> Result<Option<u64>>;

    /// The records of `table` in `phi_legacy_values` whose row key is one
    /// of `keys`.
    #[doc(hidden)]
    fn legacy_records(&mut self, table: &'static str, keys: &[String])
    -> Result<Vec<LegacyRecord>>;

    /// Deletes the records of `table` whose row key is one of `keys`.
    #[doc(hidden)]
    fn delete_legacy_records(&mut self, table: &'static str, keys: &[String]) -> Result<u64>;

    /// Inserts each record unless its (table, column, row key) has one;
    /// returns how many were inserted.
    #[doc(hidden)]
    fn insert_legacy_records(
        &mut self,
        table: &'static str,
        records: &[LegacyRecord],
    ) -> Result<u64>;

    /// Lookup values of `lookup_column` per key version (the value's
    /// first four bytes, `u32be`): `(version, count)`, NULLs not counted.
    #[doc(hidden)]
    fn lookup_versions_in_use(
        &mut self,
        table: &'static str,
        lookup_column: &'static str,
    ) -> Result<Vec<(u32, u64)>>;

    /// `UPDATE table SET lookup = value WHERE key = ? AND column = stored
    /// AND (lookup IS NULL OR lookup <> value)`: writes one row's lookup
    /// value unless the row changed since `stored` was read or already
    /// holds it. The rows written.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    fn write_lookup(
        &mut self,
        table: &'static str,
        key_column: &str,
        key: &SqlValue,
        column: &str,
        stored: &[u8],
        lookup_column: &str,
        value: &[u8],
    ) -> Result<usize>;

    /// `UPDATE table SET index = value, … WHERE key = ? AND flag on AND
    /// each sealed column = its bytes as read (or IS NULL)`: writes one
    /// sealed row's index columns unless the row changed since `row` was
    /// read. The rows written.
    ///
    /// # Errors
    /// [`Error::Database`] when the statement fails.
    fn write_indexes(
        &mut self,
        table: &StoredTable,
        row: &MigrationRow,
        sets: &[(&'static str, Option<Vec<u8>>)],
    ) -> Result<usize>;
}

/// Which rows [`DataConnection::migration_rows`] reads.
pub(crate) struct RowsQuery<'a> {
    /// The flag value of the rows.
    pub(crate) sealed: bool,
    /// Only rows whose key is above this one (keyset pagination).
    pub(crate) after: Option<&'a SqlValue>,
    /// At most this many rows.
    pub(crate) limit: usize,
    /// In random order instead of key order (sampling).
    pub(crate) random: bool,
}

/// One row of a migratable table.
pub(crate) struct MigrationRow {
    /// The key column's value as read, which guards the write back.
    pub(crate) key: SqlValue,
    /// The row key's bytes as bound into the values.
    pub(crate) row: Vec<u8>,
    /// The owner id (an integer owner as its decimal text).
    pub(crate) owner: String,
    /// The encrypted columns' stored bytes, in the table's column order,
    /// then its blind index columns' ([`StoredTable::read_columns`]; empty
    /// when values were not asked for).
    pub(crate) values: Vec<Option<Vec<u8>>>,
}

impl MigrationRow {
    /// The row key as text, for messages (a case id, an integer).
    pub(crate) fn key_text(&self) -> String {
        match &self.key {
            SqlValue::Text(t) => t.clone(),
            SqlValue::Int(n) => n.to_string(),
        }
    }
}

impl Drop for MigrationRow {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        for v in self.values.iter_mut().flatten() {
            v.zeroize();
        }
    }
}

/// What a row becomes: its encrypted columns' new bytes, then its blind
/// index columns' (in the table's column order).
pub(crate) struct RowWrite {
    pub(crate) values: Vec<Option<Vec<u8>>>,
    pub(crate) indexes: Vec<Option<Vec<u8>>>,
}

impl Drop for RowWrite {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        for v in self.values.iter_mut().flatten() {
            v.zeroize();
        }
    }
}

/// A value recorded in `phi_legacy_values` (see [`crate::legacy`]): where it
/// was, whose, and its exact stored bytes.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct LegacyRecord {
    pub(crate) column: String,
    pub(crate) row_key: String,
    pub(crate) owner: String,
    pub(crate) stored: Vec<u8>,
}

impl Drop for LegacyRecord {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        self.stored.zeroize();
    }
}

/// Called with a migration batch's rows, in its transaction, before they
/// are turned.
pub(crate) type Prepare<'a, C> = dyn FnMut(&mut C, &[MigrationRow]) -> Result<()> + 'a;

/// Turns one row (`None`: leave it for a later batch).
pub(crate) type Transform<'a> = dyn FnMut(&MigrationRow) -> Result<Option<RowWrite>> + 'a;

/// What one migration batch did.
#[derive(Debug, Default, Clone)]
pub(crate) struct ApplyOutcome {
    /// Rows locked and read.
    pub(crate) read: u64,
    /// Rows written with the flag flipped.
    pub(crate) updated: u64,
    /// Rows whose flag another writer flipped first: left alone.
    pub(crate) conflicts: u64,
    /// Rows the transform left for a later batch.
    pub(crate) deferred: u64,
    /// The key of the last row read: where the next batch starts.
    pub(crate) last: Option<SqlValue>,
}

/// Stored values a migration batch reads in the statement that reads (and
/// locks) its rows; a table with more encrypted, blind index and shadow
/// columns reads the rest with one `SELECT … WHERE key IN (…)` per column.
/// A read of keys and owners alone selects `NULL` in every slot.
const VALUE_SLOTS: usize = 8;

/// A migration row's key and owner with its first [`VALUE_SLOTS`] stored
/// values, read in one statement.
macro_rules! head_with_values {
    ($name:ident, $key:ty, $rust:ty) => {
        #[derive(QueryableByName)]
        struct $name {
            #[diesel(sql_type = $key)]
            row_key: $rust,
            #[diesel(sql_type = Text)]
            owner: String,
            #[diesel(sql_type = Nullable<Binary>)]
            v0: Option<Vec<u8>>,
            #[diesel(sql_type = Nullable<Binary>)]
            v1: Option<Vec<u8>>,
            #[diesel(sql_type = Nullable<Binary>)]
            v2: Option<Vec<u8>>,
            #[diesel(sql_type = Nullable<Binary>)]
            v3: Option<Vec<u8>>,
            #[diesel(sql_type = Nullable<Binary>)]
            v4: Option<Vec<u8>>,
            #[diesel(sql_type = Nullable<Binary>)]
            v5: Option<Vec<u8>>,
            #[diesel(sql_type = Nullable<Binary>)]
            v6: Option<Vec<u8>>,
            #[diesel(sql_type = Nullable<Binary>)]
            v7: Option<Vec<u8>>,
        }

        impl $name {
            /// The first `columns` values (moved, not copied: the plain
            /// values a backfill reads are zeroized by [`MigrationRow`])
            /// followed by `None` up to `total`.
            fn values(
                mut self,
                columns: usize,
                total: usize,
            ) -> (Vec<Option<Vec<u8>>>, $rust, String) {
                let mut values: Vec<Option<Vec<u8>>> = self.slots()[..columns]
                    .iter_mut()
                    .map(|v| v.take())
                    .collect();
                values.resize(total, None);
                (
                    values,
                    std::mem::take(&mut self.row_key),
                    std::mem::take(&mut self.owner),
                )
            }

            fn slots(&mut self) -> [&mut Option<Vec<u8>>; VALUE_SLOTS] {
                [
                    &mut self.v0,
                    &mut self.v1,
                    &mut self.v2,
                    &mut self.v3,
                    &mut self.v4,
                    &mut self.v5,
                    &mut self.v6,
                    &mut self.v7,
                ]
            }
        }

        /// A row dropped before its values were taken (an error part way
        /// through a batch) wipes them: they may be plaintext.
        impl Drop for $name {
            fn drop(&mut self) {
                use zeroize::Zeroize as _;
                for v in self.slots().into_iter().flatten() {
                    v.zeroize();
                }
            }
        }
    };
}
head_with_values!(IntHeadValues, BigInt, i64);
head_with_values!(TextHeadValues, Text, String);

#[derive(QueryableByName)]
struct TextKeyedOpt {
    #[diesel(sql_type = Text)]
    row_key: String,
    #[diesel(sql_type = Nullable<Binary>)]
    value: Option<Vec<u8>>,
}

#[derive(QueryableByName)]
struct IntKeyedOpt {
    #[diesel(sql_type = BigInt)]
    row_key: i64,
    #[diesel(sql_type = Nullable<Binary>)]
    value: Option<Vec<u8>>,
}

#[derive(QueryableByName)]
struct OwnerName {
    #[diesel(sql_type = Text)]
    owner: String,
}

#[derive(QueryableByName)]
struct IntRowKey {
    #[diesel(sql_type = BigInt)]
    row_key: i64,
}

#[derive(QueryableByName)]
struct TextRowKey {
    #[diesel(sql_type = Text)]
    row_key: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct OwnerVersionCount {
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = Binary)]
    version: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct VersionCount {
    #[diesel(sql_type = Binary)]
    version: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct TextKeyedValue {
    #[diesel(sql_type = Text)]
    row_key: String,
    #[diesel(sql_type = Binary)]
    value: Vec<u8>,
}

#[derive(QueryableByName)]
struct IntKeyedValue {
    #[diesel(sql_type = BigInt)]
    row_key: i64,
    #[diesel(sql_type = Binary)]
    value: Vec<u8>,
}

#[derive(QueryableByName)]
struct PlainValue {
    #[diesel(sql_type = Binary)]
    value: Vec<u8>,
}

/// The envelope v1 prefix: magic and format version.
const PREFIX: [u8; 2] = [MAGIC, VERSION_V1];

/// What differs between the backends beyond quoting, placeholders and
/// cast type names (which Diesel writes, see [`Statement`]).
///
/// These stay SQL text chosen per backend: the tables and columns are
/// named at run time, and Diesel's row locks (`for_update`) belong to its
/// typed `SELECT` DSL (and do not exist on SQLite), as do its set-based
/// updates; nor has it a function ordering rows at random on every backend.
#[derive(Clone, Copy)]
struct Dialect {
    /// Locks the rows a `SELECT` read until the transaction ends.
    lock: &'static str,
    /// The function that orders rows at random.
    random: &'static str,
    /// How a set-based `UPDATE` joins the rows it writes.
    shape: SetShape,
    /// The most bind parameters one statement may carry.
    max_binds: usize,
    /// `SELECT … AS n`: 1 when `phi_legacy_values` exists, else 0.
    legacy_table: &'static str,
}

/// One statement on an application table, written through Diesel's query
/// builder ([`AstPass`]): each identifier is quoted by the backend
/// (`push_identifier`) and each value bound as a parameter
/// (`push_bind_param`), so Diesel writes every quote and placeholder
/// (`"…"` or `` `…` ``, `$n` or `?`) and a value always lands where its
/// placeholder is; a cast names its type as Diesel's own `CAST` does for
/// the backend ([`KnownCastSqlTypeName`]). The SQL text between them is
/// the same on every backend but for what a [`Dialect`] names.
#[derive(Default)]
struct Statement<'a> {
    parts: Vec<Part<'a>>,
}

enum Part<'a> {
    /// SQL text.
    Sql(Cow<'a, str>),
    /// An identifier; a `schema.table` is quoted part by part.
    Ident(&'a str),
    /// `CAST(column AS BIGINT)` (`true`) or `CAST(column AS TEXT)`, in the
    /// backend's type names.
    Cast(&'a str, bool),
    /// An owner id or row key, as its column's type.
    Key(&'a SqlValue),
    /// An encrypted flag, as its column's type.
    Flag(FlagValue),
    /// Bytes (a stored value, the envelope prefix, a key version).
    Bytes(Cow<'a, [u8]>),
}

impl<'a> Statement<'a> {
    fn sql(&mut self, sql: impl Into<Cow<'a, str>>) -> &mut Self {
        self.parts.push(Part::Sql(sql.into()));
        self
    }

    fn ident(&mut self, name: &'a str) -> &mut Self {
        self.parts.push(Part::Ident(name));
        self
    }

    fn key(&mut self, value: &'a SqlValue) -> &mut Self {
        self.parts.push(Part::Key(value));
        self
    }

    /// ` IN (v1, v2, …)` of bound values.
    fn in_list(&mut self, values: impl IntoIterator<Item = &'a SqlValue>) -> &mut Self {
        self.sql(" IN (");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql(", ");
            }
            self.key(value);
        }
        self.sql(")")
    }

    fn flag(&mut self, is_bool: bool, on: bool) -> &mut Self {
        self.parts.push(Part::Flag(FlagValue::new(is_bool, on)));
        self
    }

    fn bytes(&mut self, bytes: impl Into<Cow<'a, [u8]>>) -> &mut Self {
        self.parts.push(Part::Bytes(bytes.into()));
        self
    }

    /// `column`, cast to a 64-bit integer when `integer`.
    fn bigint(&mut self, column: &'a str, integer: bool) -> &mut Self {
        if integer {
            self.parts.push(Part::Cast(column, true));
            self
        } else {
            self.ident(column)
        }
    }

    /// `column`, cast to text when `integer`.
    fn text(&mut self, column: &'a str, integer: bool) -> &mut Self {
        if integer {
            self.parts.push(Part::Cast(column, false));
            self
        } else {
            self.ident(column)
        }
    }

    /// `flag = TRUE` (or `<> 0`): the row's flag is on.
    fn flag_on(&mut self, flag: &'a str, flag_type: FlagType) -> &mut Self {
        self.ident(flag).sql(match flag_type {
            FlagType::Bool => " = TRUE",
            FlagType::Integer => " <> 0",
        })
    }

    /// `owner = ? AND column IS NOT NULL AND SUBSTR(column, 1, 2) = ?`, and
    /// ` AND flag on` for a table with an encrypted flag: `owner`'s
    /// envelope values in `column` (a row whose flag is off holds plain
    /// values, whatever their bytes).
    fn owned_envelopes(
        &mut self,
        t: &'a ResealTable,
        column: &'a str,
        owner: &'a SqlValue,
    ) -> &mut Self {
        self.ident(&t.owner_column)
            .sql(" = ")
            .key(owner)
            .sql(" AND ")
            .ident(column)
            .sql(" IS NOT NULL AND SUBSTR(")
            .ident(column)
            .sql(", 1, 2) = ")
            .bytes(&PREFIX[..]);
        if let Some(flag) = &t.flag_column {
            self.sql(" AND ").flag_on(flag, t.flag_type);
        }
        self
    }
}

impl<DB> QueryFragment<DB> for Statement<'_>
where
    DB: Backend + HasSqlType<Binary> + HasSqlType<Bool> + HasSqlType<BigInt> + HasSqlType<Text>,
    [u8]: ToSql<Binary, DB>,
    bool: ToSql<Bool, DB>,
    i64: ToSql<BigInt, DB>,
    String: ToSql<Text, DB>,
    BigInt: KnownCastSqlTypeName<DB>,
    Text: KnownCastSqlTypeName<DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        // The text varies with the number of keys and the limit: keep it
        // out of the prepared statement cache, as `sql_query` does.
        out.unsafe_to_cache_prepared();
        for part in &self.parts {
            match part {
                Part::Sql(sql) => out.push_sql(sql),
                Part::Ident(name) => push_table(&mut out, name)?,
                Part::Cast(column, bigint) => {
                    out.push_sql("CAST(");
                    out.push_identifier(column)?;
                    out.push_sql(" AS ");
                    out.push_sql(if *bigint {
                        <BigInt as KnownCastSqlTypeName<DB>>::SQL_TYPE_NAME
                    } else {
                        <Text as KnownCastSqlTypeName<DB>>::SQL_TYPE_NAME
                    });
                    out.push_sql(")");
                }
                Part::Key(SqlValue::Text(t)) => out.push_bind_param::<Text, String>(t)?,
                Part::Key(SqlValue::Int(n)) => out.push_bind_param::<BigInt, i64>(n)?,
                Part::Flag(flag) => push_flag(&mut out, flag)?,
                Part::Bytes(bytes) => out.push_bind_param::<Binary, [u8]>(bytes)?,
            }
        }
        Ok(())
    }
}

impl QueryId for Statement<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

/// Rows are read by column name ([`QueryableByName`]).
impl Query for Statement<'_> {
    type SqlType = Untyped;
}

impl<Conn> RunQueryDsl<Conn> for Statement<'_> {}

/// A possibly schema-qualified name, each part quoted by the backend.
fn push_table<DB: Backend>(out: &mut AstPass<'_, '_, DB>, name: &str) -> QueryResult<()> {
    for (i, part) in name.split('.').enumerate() {
        if i > 0 {
            out.push_sql(".");
        }
        out.push_identifier(part)?;
    }
    Ok(())
}

/// A flag value bound as its column's type.
fn push_flag<'b, DB>(out: &mut AstPass<'_, 'b, DB>, flag: &'b FlagValue) -> QueryResult<()>
where
    DB: Backend + HasSqlType<Bool> + HasSqlType<BigInt>,
    bool: ToSql<Bool, DB>,
    i64: ToSql<BigInt, DB>,
{
    if flag.is_bool {
        out.push_bind_param::<Bool, bool>(&flag.on)
    } else {
        out.push_bind_param::<BigInt, i64>(&flag.int)
    }
}

impl Dialect {
    /// `SELECT row_key, v0, …, owner FROM t WHERE owner IN (…) [AND flag
    /// on] [AND (<column under a version below older_than> OR …)] LIMIT n
    /// [lock]`.
    fn owner_rows<'a>(
        self,
        t: &'a ResealTable,
        owners: &'a [SqlValue],
        older_than: Option<&'a [u8; 4]>,
        keys: Option<&'a [SqlValue]>,
        limit: usize,
        lock: bool,
    ) -> Statement<'a> {
        let mut s = Statement::default();
        s.sql("SELECT ");
        if let Some(k) = &t.key_column {
            s.bigint(k, t.key_type.is_integer()).sql(" AS row_key, ");
        }
        let read: Vec<&str> = t.read_columns().collect();
        for slot in 0..VALUE_SLOTS {
            match read.get(slot) {
                Some(&column) => s.ident(column),
                None => s.sql("NULL"),
            };
            s.sql(format!(" AS v{slot}, "));
        }
        s.text(&t.owner_column, t.owner_type.is_integer())
            .sql(" AS owner FROM ")
            .ident(&t.table);
        self.owners_where(&mut s, t, owners, older_than);
        if let (Some(keys), Some(k)) = (keys, &t.key_column) {
            s.sql(" AND ").ident(k).in_list(keys);
        }
        s.sql(format!(" LIMIT {}", limit.max(1)));
        if lock {
            s.sql(self.lock);
        }
        s
    }

    /// `SELECT row_key FROM t WHERE owner IN (…) [AND flag] AND <a value
    /// under a version older than `older_than`> ORDER BY key`.
    fn owner_row_keys<'a>(
        self,
        t: &'a ResealTable,
        key_column: &'a str,
        owners: &'a [SqlValue],
        older_than: &'a [u8; 4],
    ) -> Statement<'a> {
        let mut s = Statement::default();
        s.sql("SELECT ")
            .bigint(key_column, t.key_type.is_integer())
            .sql(" AS row_key FROM ")
            .ident(&t.table);
        self.owners_where(&mut s, t, owners, Some(older_than));
        s.sql(" ORDER BY ").ident(key_column);
        s
    }

    /// ` WHERE owner IN (…) [AND flag] [AND <a value under a version older
    /// than `older_than`>]`.
    fn owners_where<'a>(
        self,
        s: &mut Statement<'a>,
        t: &'a ResealTable,
        owners: &'a [SqlValue],
        older_than: Option<&'a [u8; 4]>,
    ) {
        s.sql(" WHERE ").ident(&t.owner_column).in_list(owners);
        if let Some(flag) = &t.flag_column {
            s.sql(" AND ").flag_on(flag, t.flag_type);
        }
        if let Some(current) = older_than {
            s.sql(" AND (");
            for (i, c) in t.columns.iter().enumerate() {
                if i > 0 {
                    s.sql(" OR ");
                }
                s.sql("(")
                    .ident(&c.column)
                    .sql(" IS NOT NULL AND SUBSTR(")
                    .ident(&c.column)
                    .sql(", 1, 2) = ")
                    .bytes(&PREFIX[..])
                    .sql(" AND SUBSTR(")
                    .ident(&c.column)
                    .sql(", 3, 4) < ")
                    .bytes(&current[..])
                    .sql(")");
            }
            s.sql(")");
        }
    }

    /// `SELECT [row_key, ]value FROM t WHERE <owned envelopes><extra>
    /// [ORDER BY key] LIMIT n`.
    fn select_values<'a>(
        self,
        t: &'a ResealTable,
        column: &'a str,
        owner: &'a SqlValue,
        extra: impl FnOnce(&mut Statement<'a>),
        limit: usize,
    ) -> Statement<'a> {
        let mut s = Statement::default();
        s.sql("SELECT ");
        if let Some(k) = &t.key_column {
            s.bigint(k, t.key_type.is_integer()).sql(" AS row_key, ");
        }
        s.ident(column)
            .sql(" AS value FROM ")
            .ident(&t.table)
            .sql(" WHERE ")
            .owned_envelopes(t, column, owner);
        extra(&mut s);
        if let Some(k) = &t.key_column {
            s.sql(" ORDER BY ").ident(k);
        }
        s.sql(format!(" LIMIT {limit}"));
        s
    }

    /// `SELECT row_key, v0, …, owner … WHERE flag = ? [AND key > ?] ORDER BY
    /// … LIMIT n`: `v0`, `v1`, … hold the columns of `values` (at most
    /// [`VALUE_SLOTS`], each cast to text when its flag says so) and `NULL`
    /// in the slots past them.
    fn migration_heads<'a>(
        self,
        t: &'a StoredTable,
        q: &RowsQuery<'a>,
        lock: bool,
        values: &[(&'a str, bool)],
    ) -> Statement<'a> {
        let mut s = Statement::default();
        s.sql("SELECT ")
            .bigint(t.key_column, t.key_type.is_some_and(ColumnType::is_integer))
            .sql(" AS row_key, ");
        for slot in 0..VALUE_SLOTS {
            match values.get(slot) {
                Some(&(column, as_text)) => s.text(column, as_text),
                None => s.sql("NULL"),
            };
            s.sql(format!(" AS v{slot}, "));
        }
        s.text(
            t.owner_column,
            t.owner_type.is_some_and(ColumnType::is_integer),
        )
        .sql(" AS owner FROM ")
        .ident(t.table)
        .sql(" WHERE ")
        .ident(t.flag_column)
        .sql(" = ")
        .flag(t.flag_is_bool, q.sealed);
        if let Some(after) = q.after {
            s.sql(" AND ").ident(t.key_column).sql(" > ").key(after);
        }
        s.sql(" ORDER BY ");
        if q.random {
            s.sql(self.random);
        } else {
            s.ident(t.key_column);
        }
        s.sql(format!(" LIMIT {}", q.limit.max(1)));
        if lock {
            s.sql(self.lock);
        }
        s
    }

    /// `SELECT row_key, value … WHERE flag = ? AND key IN (?, …)`; the
    /// value cast to text when `as_text` (a plaintext column of the
    /// dual-write phase, in its own SQL type).
    fn migration_values<'a>(
        self,
        t: &'a StoredTable,
        column: &'a str,
        as_text: bool,
        sealed: bool,
        keys: impl IntoIterator<Item = &'a SqlValue>,
    ) -> Statement<'a> {
        let mut s = Statement::default();
        s.sql("SELECT ")
            .bigint(t.key_column, t.key_type.is_some_and(ColumnType::is_integer))
            .sql(" AS row_key, ")
            .text(column, as_text)
            .sql(" AS value FROM ")
            .ident(t.table)
            .sql(" WHERE ")
            .ident(t.flag_column)
            .sql(" = ")
            .flag(t.flag_is_bool, sealed)
            .sql(" AND ")
            .ident(t.key_column)
            .in_list(keys);
        s
    }
}

/// Bytes of bound values one set-based statement carries at most, under
/// MySQL's default `max_allowed_packet` (16 MiB, 4 MiB on old servers)
/// with room to spare.
const MAX_STATEMENT_BYTES: usize = 3 << 20;

/// One value bound into a set-based `UPDATE`.
enum SetValue<'a> {
    /// An owner id or row key, as its column's type.
    Key(&'a SqlValue),
    /// Stored bytes (or NULL).
    Bytes(Option<&'a [u8]>),
    /// A plain value as text (or NULL), for a plaintext column of the
    /// dual-write phase, which the backend converts to the column's type.
    Text(Option<&'a str>),
}

impl SetValue<'_> {
    fn len(&self) -> usize {
        match self {
            SetValue::Key(SqlValue::Text(t)) => t.len(),
            SetValue::Key(SqlValue::Int(_)) => 8,
            SetValue::Bytes(b) => b.map_or(0, <[u8]>::len),
            SetValue::Text(t) => t.map_or(0, str::len),
        }
    }
}

/// A bound flag value, as its column's type.
#[derive(Clone, Copy)]
struct FlagValue {
    is_bool: bool,
    on: bool,
    int: i64,
}

impl FlagValue {
    fn new(is_bool: bool, on: bool) -> Self {
        FlagValue {
            is_bool,
            on,
            int: i64::from(on),
        }
    }
}

/// A set-based `UPDATE`, built with Diesel's [`AstPass`] (identifiers
/// quoted by the backend, every value a bind parameter): Diesel's
/// `update()` DSL cannot join a list of bound rows, so the statement's
/// shape is written here, per backend ([`SetShape`]).
///
/// ```text
/// UPDATE table AS phi_t SET set_i = phi_v.value_i, …[, extra = ?]
///   <rows as phi_v>
/// WHERE phi_t.match_j = phi_v.match_j AND … [AND guard = ?] [AND owner = ?]
/// ```
///
/// Each row of `rows` binds the `matches` values first, then the `sets`
/// values. A row is updated only when every match holds and the guard
/// (the flag, or the owner) still has the value read: the number of rows
/// the statement reports is the number actually written.
struct SetUpdate<'a> {
    shape: SetShape,
    table: &'a str,
    /// Columns compared with each row's first values.
    matches: Vec<&'a str>,
    /// Columns set from each row's remaining values.
    sets: Vec<&'a str>,
    /// Which of `sets` take text ([`SetValue::Text`]) converted to the
    /// column's own SQL type (a plaintext column of the dual-write phase).
    text_sets: Vec<bool>,
    /// A column set to one bound value for every row (the flag flipped).
    extra: Option<(&'a str, FlagValue)>,
    /// A column compared with one bound flag value (the flag as read).
    guard_flag: Option<(&'a str, FlagValue)>,
    /// A column compared with one bound key value (the owner).
    guard_key: Option<(&'a str, &'a SqlValue)>,
    /// A flag of the table that must be on (`phi_t.flag = TRUE`).
    guard_on: Option<(&'a str, FlagType)>,
    rows: Vec<Vec<SetValue<'a>>>,
}

impl SetUpdate<'_> {
    /// Bind parameters per row, and besides the rows.
    fn binds_per_row(&self) -> usize {
        self.matches.len() + self.sets.len()
    }

    fn fixed_binds(&self) -> usize {
        usize::from(self.extra.is_some())
            + usize::from(self.guard_flag.is_some())
            + usize::from(self.guard_key.is_some())
    }
}

impl<DB> QueryFragment<DB> for SetUpdate<'_>
where
    DB: Backend + HasSqlType<Binary> + HasSqlType<Bool> + HasSqlType<BigInt> + HasSqlType<Text>,
    Option<&'static [u8]>: ToSql<Nullable<Binary>, DB>,
    Option<&'static str>: ToSql<Nullable<Text>, DB>,
    str: ToSql<Text, DB>,
    [u8]: ToSql<Binary, DB>,
    bool: ToSql<Bool, DB>,
    i64: ToSql<BigInt, DB>,
    String: ToSql<Text, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        fn push_qualified<DB: Backend>(
            out: &mut AstPass<'_, '_, DB>,
            alias: &str,
            column: &str,
        ) -> QueryResult<()> {
            out.push_identifier(alias)?;
            out.push_sql(".");
            out.push_identifier(column)
        }
        fn push_value<'b, DB>(
            out: &mut AstPass<'_, 'b, DB>,
            value: &'b SetValue<'_>,
        ) -> QueryResult<()>
        where
            DB: Backend + HasSqlType<Binary> + HasSqlType<BigInt> + HasSqlType<Text>,
            Option<&'static [u8]>: ToSql<Nullable<Binary>, DB>,
            Option<&'static str>: ToSql<Nullable<Text>, DB>,
            str: ToSql<Text, DB>,
            [u8]: ToSql<Binary, DB>,
            i64: ToSql<BigInt, DB>,
            String: ToSql<Text, DB>,
        {
            match value {
                SetValue::Key(SqlValue::Text(t)) => out.push_bind_param::<Text, String>(t),
                SetValue::Key(SqlValue::Int(n)) => out.push_bind_param::<BigInt, i64>(n),
                SetValue::Bytes(Some(b)) => out.push_bind_param::<Binary, [u8]>(b),
                // A typed NULL: PostgreSQL takes the parameter's type from
                // its bind, so a NULL in the first row of `VALUES` does not
                // make the column untyped.
                SetValue::Bytes(None) => {
                    out.push_bind_param::<Nullable<Binary>, Option<&[u8]>>(&None)
                }
                SetValue::Text(Some(t)) => out.push_bind_param::<Text, str>(t),
                SetValue::Text(None) => out.push_bind_param::<Nullable<Text>, Option<&str>>(&None),
            }
        }

        let columns = self.binds_per_row();
        let set_value = |out: &mut AstPass<'_, 'b, DB>, i: usize| -> QueryResult<()> {
            let column = self.sets[i];
            if self.shape == SetShape::Join {
                push_qualified(out, "phi_t", column)?;
            } else {
                out.push_identifier(column)?;
            }
            out.push_sql(" = ");
            let value = self.shape.value_column(self.matches.len() + i);
            if self.shape == SetShape::Values && self.text_sets.get(i).copied().unwrap_or(false) {
                // PostgreSQL converts text to a column's type (a date, say)
                // only when told which: the table's row type tells it,
                // through the type's own input function.
                out.push_sql("(json_populate_record(CAST(NULL AS ");
                push_table(out, self.table)?;
                out.push_sql("), json_build_object('");
                // A checked plain identifier (letters, digits and `_`).
                out.push_sql(column);
                out.push_sql("', ");
                push_qualified(out, "phi_v", &value)?;
                out.push_sql("))).");
                out.push_identifier(column)
            } else {
                push_qualified(out, "phi_v", &value)
            }
        };
        if self.shape == SetShape::Values {
            // A cached statement gets PostgreSQL's generic plan after five
            // runs: blind to the batch's keys, it joins the `VALUES` list by
            // a sequential scan of the whole table (milliseconds a batch on
            // 100,000 rows, growing with the table). Uncached, each batch
            // is planned for its own keys: an index lookup per row.
            out.unsafe_to_cache_prepared();
        }
        out.push_sql("UPDATE ");
        push_table(&mut out, self.table)?;
        out.push_sql(" AS ");
        out.push_identifier("phi_t")?;
        if self.shape == SetShape::Join {
            out.push_sql(" JOIN (");
            for (r, row) in self.rows.iter().enumerate() {
                out.push_sql(if r == 0 {
                    "SELECT "
                } else {
                    " UNION ALL SELECT "
                });
                for (i, value) in row.iter().enumerate() {
                    if i > 0 {
                        out.push_sql(", ");
                    }
                    push_value(&mut out, value)?;
                    if r == 0 {
                        out.push_sql(" AS ");
                        out.push_identifier(&self.shape.value_column(i))?;
                    }
                }
            }
            out.push_sql(") AS ");
            out.push_identifier("phi_v")?;
            out.push_sql(" ON ");
            for (i, column) in self.matches.iter().enumerate() {
                if i > 0 {
                    out.push_sql(" AND ");
                }
                push_qualified(&mut out, "phi_t", column)?;
                out.push_sql(" = ");
                push_qualified(&mut out, "phi_v", &self.shape.value_column(i))?;
            }
        }
        out.push_sql(" SET ");
        for i in 0..self.sets.len() {
            if i > 0 {
                out.push_sql(", ");
            }
            set_value(&mut out, i)?;
        }
        if let Some((column, flag)) = &self.extra {
            out.push_sql(", ");
            if self.shape == SetShape::Join {
                push_qualified(&mut out, "phi_t", column)?;
            } else {
                out.push_identifier(column)?;
            }
            out.push_sql(" = ");
            push_flag(&mut out, flag)?;
        }
        let mut first = true;
        let mut and = |out: &mut AstPass<'_, 'b, DB>| {
            out.push_sql(if first { " WHERE " } else { " AND " });
            first = false;
        };
        if self.shape != SetShape::Join {
            out.push_sql(" FROM (VALUES ");
            for (r, row) in self.rows.iter().enumerate() {
                out.push_sql(if r == 0 { "(" } else { ", (" });
                for (i, value) in row.iter().enumerate() {
                    if i > 0 {
                        out.push_sql(", ");
                    }
                    push_value(&mut out, value)?;
                }
                out.push_sql(")");
            }
            out.push_sql(") AS ");
            out.push_identifier("phi_v")?;
            if self.shape == SetShape::Values {
                out.push_sql(" (");
                for i in 0..columns {
                    if i > 0 {
                        out.push_sql(", ");
                    }
                    out.push_identifier(&self.shape.value_column(i))?;
                }
                out.push_sql(")");
            }
            for (i, column) in self.matches.iter().enumerate() {
                and(&mut out);
                push_qualified(&mut out, "phi_t", column)?;
                out.push_sql(" = ");
                push_qualified(&mut out, "phi_v", &self.shape.value_column(i))?;
            }
        }
        if let Some((column, flag)) = &self.guard_flag {
            and(&mut out);
            push_qualified(&mut out, "phi_t", column)?;
            out.push_sql(" = ");
            push_flag(&mut out, flag)?;
        }
        if let Some((column, key)) = &self.guard_key {
            and(&mut out);
            push_qualified(&mut out, "phi_t", column)?;
            out.push_sql(" = ");
            match key {
                SqlValue::Text(t) => out.push_bind_param::<Text, String>(t)?,
                SqlValue::Int(n) => out.push_bind_param::<BigInt, i64>(n)?,
            }
        }
        if let Some((column, flag_type)) = &self.guard_on {
            and(&mut out);
            push_qualified(&mut out, "phi_t", column)?;
            out.push_sql(match flag_type {
                FlagType::Bool => " = TRUE",
                FlagType::Integer => " <> 0",
            });
        }
        Ok(())
    }
}

impl QueryId for SetUpdate<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Conn> RunQueryDsl<Conn> for SetUpdate<'_> {}

/// Runs `update` over `rows` in as few statements as the backend's bind
/// limit and [`MAX_STATEMENT_BYTES`] allow; returns the rows written.
fn run_set_update<'a, C>(
    conn: &mut C,
    d: Dialect,
    update: SetUpdate<'a>,
    rows: Vec<Vec<SetValue<'a>>>,
) -> QueryResult<u64>
where
    C: diesel::Connection,
    C::Backend: HasSqlType<Binary> + HasSqlType<Bool> + HasSqlType<BigInt> + HasSqlType<Text>,
    Option<&'static [u8]>: ToSql<Nullable<Binary>, C::Backend>,
    Option<&'static str>: ToSql<Nullable<Text>, C::Backend>,
    str: ToSql<Text, C::Backend>,
    [u8]: ToSql<Binary, C::Backend>,
    bool: ToSql<Bool, C::Backend>,
    i64: ToSql<BigInt, C::Backend>,
    String: ToSql<Text, C::Backend>,
    SetUpdate<'a>: diesel::query_dsl::methods::ExecuteDsl<C>,
{
    let per_row = update.binds_per_row().max(1);
    let max_rows = (d.max_binds - update.fixed_binds()) / per_row;
    let mut written = 0u64;
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.peek() {
            let size: usize = row.iter().map(SetValue::len).sum();
            if !chunk.is_empty() && (chunk.len() >= max_rows || bytes + size > MAX_STATEMENT_BYTES)
            {
                break;
            }
            bytes += size;
            chunk.extend(rows.next());
        }
        let statement = SetUpdate {
            matches: update.matches.clone(),
            sets: update.sets.clone(),
            text_sets: update.text_sets.clone(),
            guard_on: update.guard_on,
            rows: chunk,
            shape: update.shape,
            table: update.table,
            extra: update.extra,
            guard_flag: update.guard_flag,
            guard_key: update.guard_key,
        };
        written += statement.execute(conn)? as u64;
    }
    Ok(written)
}

/// Reads the rows a [`RowsQuery`] selects, and with `values` their
/// encrypted columns (rows whose flag changed between the queries are
/// dropped).
macro_rules! load_rows {
    ($conn:expr, $dialect:expr, $table:expr, $query:expr, $values:expr, $lock:expr) => {{
        let (d, t, q): (Dialect, &StoredTable, &RowsQuery<'_>) = ($dialect, $table, $query);
        (|| -> std::result::Result<Vec<MigrationRow>, TxError> {
            let read = if $values {
                t.read_columns()
            } else {
                Vec::new()
            };
            // A plaintext column of the dual-write phase holds its own SQL
            // type (text, a date): read as its text.
            let as_text = |ci: usize| t.columns.get(ci).is_some_and(|c| c.shadow.is_some());
            let first: Vec<(&str, bool)> = read
                .iter()
                .take(VALUE_SLOTS)
                .enumerate()
                .map(|(ci, column)| (*column, as_text(ci)))
                .collect();
            let query = d.migration_heads(t, q, $lock, &first);
            let int_key = t.key_type.is_some_and(ColumnType::is_integer);
            let key_type = t.key_type.unwrap_or_default();
            let int_row = |key: i64| {
                key_type.int_bytes(key).map_err(|why| Error::DataTable {
                    operation: "reading a row key",
                    table: t.table.to_owned(),
                    column: t.key_column.to_owned(),
                    owner: String::new(),
                    source: why.into(),
                })
            };
            let mut rows: Vec<MigrationRow> = if int_key {
                query
                    .load::<IntHeadValues>(&mut *$conn)?
                    .into_iter()
                    .map(|h| {
                        let (values, key, owner) = h.values(first.len(), read.len());
                        Ok(MigrationRow {
                            row: int_row(key)?,
                            key: SqlValue::Int(key),
                            owner,
                            values,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            } else {
                query
                    .load::<TextHeadValues>(&mut *$conn)?
                    .into_iter()
                    .map(|h| {
                        let (values, key, owner) = h.values(first.len(), read.len());
                        MigrationRow {
                            row: key.as_bytes().to_vec(),
                            key: SqlValue::Text(key),
                            owner,
                            values,
                        }
                    })
                    .collect()
            };
            if read.len() <= VALUE_SLOTS || rows.is_empty() {
                return Ok(rows);
            }
            let position: std::collections::HashMap<SqlValue, usize> = rows
                .iter()
                .enumerate()
                .map(|(i, r)| (r.key.clone(), i))
                .collect();
            let mut seen = vec![0usize; rows.len()];
            for (ci, column) in read.iter().enumerate().skip(VALUE_SLOTS) {
                let keys: Vec<SqlValue> = rows.iter().map(|r| r.key.clone()).collect();
                let query = d.migration_values(t, column, as_text(ci), q.sealed, &keys);
                let found: Vec<(SqlValue, Option<Vec<u8>>)> = if int_key {
                    query
                        .load::<IntKeyedOpt>(&mut *$conn)?
                        .into_iter()
                        .map(|r| (SqlValue::Int(r.row_key), r.value))
                        .collect()
                } else {
                    query
                        .load::<TextKeyedOpt>(&mut *$conn)?
                        .into_iter()
                        .map(|r| (SqlValue::Text(r.row_key), r.value))
                        .collect()
                };
                for (key, value) in found {
                    if let Some(&i) = position.get(&key) {
                        rows[i].values[ci] = value;
                        seen[i] += 1;
                    }
                }
            }
            let columns = read.len() - VALUE_SLOTS;
            let mut seen = seen.into_iter();
            rows.retain(|_| seen.next() == Some(columns));
            Ok(rows)
        })()
    }};
}

fn data_error(
    operation: &'static str,
    t: &ResealTable,
    c: &ResealColumn,
    owner: &str,
    e: impl Into<BoxError>,
) -> Error {
    Error::DataTable {
        operation,
        table: t.table.clone(),
        column: c.column.clone(),
        owner: owner.to_owned(),
        source: e.into(),
    }
}

/// `owner` as its column's SQL value: an integer owner column needs an
/// integer's decimal text.
fn owner_value(t: &ResealTable, owner: &str) -> Result<SqlValue> {
    if !t.owner_type.is_integer() {
        return Ok(SqlValue::Text(owner.to_owned()));
    }
    t.owner_type
        .parse_int(owner)
        .map(SqlValue::Int)
        .map_err(|why| Error::DataTable {
            operation: "binding the owner id",
            table: t.table.clone(),
            column: t.owner_column.clone(),
            owner: owner.to_owned(),
            source: why.into(),
        })
}

/// `owners` as their column's SQL values.
fn owner_values(t: &ResealTable, owners: &[String]) -> Result<Vec<SqlValue>> {
    owners.iter().map(|o| owner_value(t, o)).collect()
}

/// A table the whole-row jobs can work on: a key column, and at most
/// [`MAX_ROW_COLUMNS`] encrypted columns.
fn check_row_table(t: &ResealTable) -> Result<()> {
    t.validate()?;
    if !t.whole_rows() {
        return Err(Error::Config(format!(
            "table {}: reading whole rows of several owners needs a key column and 1 to {MAX_ROW_COLUMNS} encrypted and blind index columns",
            t.table
        )));
    }
    Ok(())
}

/// Loads the rows an `owner_rows` query returns (row key, values, owner).
macro_rules! load_owner_rows {
    ($query:expr, $conn:expr, $table:expr) => {{
        let (t, query): (&ResealTable, Statement<'_>) = ($table, $query);
        (|| -> std::result::Result<Vec<MigrationRow>, TxError> {
            let n = t.read_columns().count();
            Ok(if t.key_type.is_integer() {
                query
                    .load::<IntHeadValues>($conn)?
                    .into_iter()
                    .map(|h| {
                        let (values, key, owner) = h.values(n, n);
                        Ok(MigrationRow {
                            row: int_row(t, &owner, key)?,
                            key: SqlValue::Int(key),
                            owner,
                            values,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            } else {
                query
                    .load::<TextHeadValues>($conn)?
                    .into_iter()
                    .map(|h| {
                        let (values, key, owner) = h.values(n, n);
                        MigrationRow {
                            row: key.as_bytes().to_vec(),
                            key: SqlValue::Text(key),
                            owner,
                            values,
                        }
                    })
                    .collect()
            })
        })()
    }};
}

/// An integer row key read from `t`'s key column as the bytes bound into
/// its values.
fn int_row(t: &ResealTable, owner: &str, key: i64) -> Result<Vec<u8>> {
    t.key_type.int_bytes(key).map_err(|why| Error::DataTable {
        operation: "reading a row key",
        table: t.table.clone(),
        column: t.key_column.clone().unwrap_or_default(),
        owner: owner.to_owned(),
        source: why.into(),
    })
}

/// A failure inside a re-seal transaction: the database's, or phi's.
enum TxError {
    Db(DieselError),
    Phi(Error),
}

impl From<DieselError> for TxError {
    fn from(e: DieselError) -> Self {
        TxError::Db(e)
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Phi(e)
    }
}

/// Loads the values a `select_values` query returns, with their row keys
/// read as the table's key column type.
macro_rules! load_stored {
    ($query:expr, $conn:expr, $table:expr, $owner:expr) => {{
        let (t, owner, query) = ($table, $owner, $query);
        (|| -> std::result::Result<Vec<StoredValue>, TxError> {
            Ok(match &t.key_column {
                None => query
                    .load::<PlainValue>($conn)?
                    .into_iter()
                    .map(|r| StoredValue {
                        key: None,
                        row: Vec::new(),
                        bytes: r.value,
                    })
                    .collect(),
                Some(_) if t.key_type.is_integer() => query
                    .load::<IntKeyedValue>($conn)?
                    .into_iter()
                    .map(|r| {
                        Ok(StoredValue {
                            row: int_row(t, owner, r.row_key)?,
                            key: Some(SqlValue::Int(r.row_key)),
                            bytes: r.value,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                Some(_) => query
                    .load::<TextKeyedValue>($conn)?
                    .into_iter()
                    .map(|r| StoredValue {
                        row: r.row_key.as_bytes().to_vec(),
                        key: Some(SqlValue::Text(r.row_key)),
                        bytes: r.value,
                    })
                    .collect(),
            })
        })()
    }};
}

macro_rules! data_connection {
    ($($feature:literal => $conn:ty, $transaction:ident, $dialect:expr);* $(;)?) => {$(
        #[cfg(feature = $feature)]
        #[allow(private_interfaces)]
        impl DataConnection for $conn {
            fn key_versions_in_use(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owner: &str,
            ) -> Result<Vec<(u32, u64)>> {
                table.validate()?;
                let owner_value = owner_value(table, owner)?;
                let c = &column.column;
                let mut query = Statement::default();
                query
                    .sql("SELECT SUBSTR(")
                    .ident(c)
                    .sql(", 3, 4) AS version, COUNT(*) AS n FROM ")
                    .ident(&table.table)
                    .sql(" WHERE ")
                    .owned_envelopes(table, c, &owner_value)
                    .sql(" GROUP BY SUBSTR(")
                    .ident(c)
                    .sql(", 3, 4)");
                let rows: Vec<VersionCount> = query
                    .load(self)
                    .map_err(|e| data_error("counting values per key version", table, column, owner, e))?;
                let mut counts: Vec<(u32, u64)> = rows
                    .into_iter()
                    .filter_map(|r| {
                        let v: [u8; 4] = r.version.as_slice().try_into().ok()?;
                        Some((u32::from_be_bytes(v), u64::try_from(r.n).unwrap_or(0)))
                    })
                    .collect();
                counts.sort_unstable();
                Ok(counts)
            }

            fn reseal_batch(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owner: &str,
                current: u32,
                limit: usize,
                reseal: &mut Reseal<'_>,
            ) -> Result<BatchOutcome> {
                table.validate()?;
                let owner_value = owner_value(table, owner)?;
                let d: Dialect = $dialect;
                let c = &column.column;
                let current_bytes = current.to_be_bytes();
                let outcome = self.$transaction(|conn| -> std::result::Result<BatchOutcome, TxError> {
                    // Big-endian versions compare as bytes in numeric order,
                    // so `< current` finds older versions and never touches
                    // a newer one written meanwhile.
                    let mut query = d.select_values(
                        table,
                        c,
                        &owner_value,
                        |s| {
                            s.sql(" AND SUBSTR(").ident(c).sql(", 3, 4) < ").bytes(&current_bytes[..]);
                        },
                        limit,
                    );
                    query.sql(d.lock);
                    let values = load_stored!(query, &mut *conn, table, owner)?;
                    let mut outcome = BatchOutcome { read: values.len() as u64, ..BatchOutcome::default() };
                    if let Some(key_column) = &table.key_column {
                        // One set-based UPDATE for the batch, each row
                        // guarded by its key, the bytes read and the owner:
                        // row keys are unique, so the rows it did not write
                        // were changed by someone else meanwhile.
                        let mut news = Vec::with_capacity(values.len());
                        for value in &values {
                            news.push(reseal(value)?);
                        }
                        let update = SetUpdate {
                            shape: d.shape,
                            table: &table.table,
                            matches: vec![key_column, &column.column],
                            sets: std::iter::once(column.column.as_str())
                                .chain(column.indexes().map(|(i, _)| i))
                                .collect(),
                            text_sets: Vec::new(),
                            extra: None,
                            guard_flag: None,
                            guard_key: Some((&table.owner_column, &owner_value)),
                            guard_on: table.flag_column.as_deref().map(|flag| (flag, table.flag_type)),
                            rows: Vec::new(),
                        };
                        let rows: Vec<Vec<SetValue<'_>>> = values
                            .iter()
                            .zip(&news)
                            .filter_map(|(value, new)| {
                                let mut row = vec![
                                    SetValue::Key(value.key.as_ref()?),
                                    SetValue::Bytes(Some(&value.bytes)),
                                    SetValue::Bytes(Some(&new.value)),
                                ];
                                row.extend(
                                    new.indexes.iter().map(|i| SetValue::Bytes(Some(i.as_slice()))),
                                );
                                Some(row)
                            })
                            .collect();
                        let written = run_set_update(conn, d, update, rows)?;
                        outcome.updated = written;
                        outcome.conflicts = (values.len() as u64).saturating_sub(written);
                        return Ok(outcome);
                    }
                    // A value copied to several rows (no row key) is updated
                    // in all of them by its first UPDATE.
                    let mut done = std::collections::HashSet::new();
                    for value in &values {
                        if !done.insert((value.key.as_ref(), value.bytes.as_slice())) {
                            continue;
                        }
                        let new = reseal(value)?;
                        let mut update = Statement::default();
                        update
                            .sql("UPDATE ")
                            .ident(&table.table)
                            .sql(" SET ")
                            .ident(c)
                            .sql(" = ")
                            .bytes(new.value);
                        for ((index, _), value) in column.indexes().zip(new.indexes) {
                            update.sql(", ").ident(index).sql(" = ").bytes(value);
                        }
                        update
                            .sql(" WHERE ")
                            .ident(&table.owner_column)
                            .sql(" = ")
                            .key(&owner_value)
                            .sql(" AND ")
                            .ident(c)
                            .sql(" = ")
                            .bytes(&value.bytes[..]);
                        if let (Some(k), Some(key)) = (&table.key_column, &value.key) {
                            update.sql(" AND ").ident(k).sql(" = ").key(key);
                        }
                        if let Some(flag) = &table.flag_column {
                            update.sql(" AND ").flag_on(flag, table.flag_type);
                        }
                        let n = update.execute(conn)?;
                        outcome.updated += n as u64;
                        if n == 0 {
                            outcome.conflicts += 1;
                        }
                    }
                    Ok(outcome)
                });
                match outcome {
                    Ok(outcome) => Ok(outcome),
                    Err(TxError::Phi(e)) => Err(e),
                    Err(TxError::Db(e)) => Err(data_error("re-sealing a batch", table, column, owner, e)),
                }
            }

            fn key_versions_in_use_many(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owners: &[String],
            ) -> Result<Vec<(String, u32, u64)>> {
                table.validate()?;
                if owners.is_empty() {
                    return Ok(Vec::new());
                }
                let values = owner_values(table, owners)?;
                let c = &column.column;
                let mut query = Statement::default();
                query
                    .sql("SELECT ")
                    .text(&table.owner_column, table.owner_type.is_integer())
                    .sql(" AS owner, SUBSTR(")
                    .ident(c)
                    .sql(", 3, 4) AS version, COUNT(*) AS n FROM ")
                    .ident(&table.table)
                    .sql(" WHERE ")
                    .ident(&table.owner_column)
                    .in_list(&values)
                    .sql(" AND ")
                    .ident(c)
                    .sql(" IS NOT NULL AND SUBSTR(")
                    .ident(c)
                    .sql(", 1, 2) = ")
                    .bytes(&PREFIX[..]);
                if let Some(flag) = &table.flag_column {
                    query.sql(" AND ").flag_on(flag, table.flag_type);
                }
                query
                    .sql(" GROUP BY ")
                    .ident(&table.owner_column)
                    .sql(", SUBSTR(")
                    .ident(c)
                    .sql(", 3, 4)");
                let rows: Vec<OwnerVersionCount> = query.load(self).map_err(|e| {
                    data_error("counting values per owner and key version", table, column, &owners[0], e)
                })?;
                let mut counts: Vec<(String, u32, u64)> = rows
                    .into_iter()
                    .filter_map(|r| {
                        let v: [u8; 4] = r.version.as_slice().try_into().ok()?;
                        Some((r.owner, u32::from_be_bytes(v), u64::try_from(r.n).unwrap_or(0)))
                    })
                    .collect();
                counts.sort_unstable();
                Ok(counts)
            }

            fn count_owner_rows(&mut self, table: &ResealTable, owners: &[String]) -> Result<u64> {
                table.validate()?;
                if owners.is_empty() {
                    return Ok(0);
                }
                let values = owner_values(table, owners)?;
                let mut query = Statement::default();
                query
                    .sql("SELECT COUNT(*) AS n FROM ")
                    .ident(&table.table)
                    .sql(" WHERE ")
                    .ident(&table.owner_column)
                    .in_list(&values);
                if let Some(flag) = &table.flag_column {
                    query.sql(" AND ").flag_on(flag, table.flag_type);
                }
                let count: Count = query.get_result(self).map_err(|e| Error::DataTable {
                    operation: "counting rows of owners",
                    table: table.table.clone(),
                    column: table.owner_column.clone(),
                    owner: owners[0].clone(),
                    source: e.into(),
                })?;
                Ok(u64::try_from(count.n).unwrap_or(0))
            }

            fn owner_rows(
                &mut self,
                table: &ResealTable,
                owners: &[String],
                older_than: Option<u32>,
                limit: usize,
            ) -> Result<Vec<MigrationRow>> {
                check_row_table(table)?;
                if owners.is_empty() {
                    return Ok(Vec::new());
                }
                let values = owner_values(table, owners)?;
                let d: Dialect = $dialect;
                let older = older_than.map(u32::to_be_bytes);
                let query = d.owner_rows(table, &values, older.as_ref(), None, limit, false);
                match load_owner_rows!(query, &mut *self, table) {
                    Ok(rows) => Ok(rows),
                    Err(TxError::Phi(e)) => Err(e),
                    Err(TxError::Db(e)) => Err(Error::DataTable {
                        operation: "reading rows of owners",
                        table: table.table.clone(),
                        column: table.owner_column.clone(),
                        owner: owners[0].clone(),
                        source: e.into(),
                    }),
                }
            }

            fn owners_with_older_values(
                &mut self,
                table: &ResealTable,
                owners: &[String],
                current: u32,
            ) -> Result<Vec<String>> {
                table.validate()?;
                if owners.is_empty() {
                    return Ok(Vec::new());
                }
                let values = owner_values(table, owners)?;
                let d: Dialect = $dialect;
                let current_bytes = current.to_be_bytes();
                let mut query = Statement::default();
                query
                    .sql("SELECT DISTINCT ")
                    .text(&table.owner_column, table.owner_type.is_integer())
                    .sql(" AS owner FROM ")
                    .ident(&table.table);
                d.owners_where(&mut query, table, &values, Some(&current_bytes));
                let rows: Vec<OwnerName> = query.load(self).map_err(|e| Error::DataTable {
                    operation: "finding owners with values under older versions",
                    table: table.table.clone(),
                    column: table.owner_column.clone(),
                    owner: owners[0].clone(),
                    source: e.into(),
                })?;
                Ok(rows.into_iter().map(|r| r.owner).collect())
            }

            fn owner_row_keys(
                &mut self,
                table: &ResealTable,
                owners: &[String],
                current: u32,
            ) -> Result<Vec<SqlValue>> {
                check_row_table(table)?;
                let Some(key_column) = table.key_column.as_deref() else {
                    return Err(Error::Config(format!(
                        "{}: reading rows by key needs a key column",
                        table.table
                    )));
                };
                if owners.is_empty() {
                    return Ok(Vec::new());
                }
                let values = owner_values(table, owners)?;
                let d: Dialect = $dialect;
                let current_bytes = current.to_be_bytes();
                let query = d.owner_row_keys(table, key_column, &values, &current_bytes);
                let keys = if table.key_type.is_integer() {
                    query
                        .load::<IntRowKey>(self)
                        .map(|rows| rows.into_iter().map(|r| SqlValue::Int(r.row_key)).collect())
                } else {
                    query
                        .load::<TextRowKey>(self)
                        .map(|rows| rows.into_iter().map(|r| SqlValue::Text(r.row_key)).collect())
                };
                keys.map_err(|e| Error::DataTable {
                    operation: "listing rows of owners to re-seal",
                    table: table.table.clone(),
                    column: table.owner_column.clone(),
                    owner: owners[0].clone(),
                    source: e.into(),
                })
            }

            fn reseal_owner_rows(
                &mut self,
                table: &ResealTable,
                owners: &[String],
                current: u32,
                keys: Option<&[SqlValue]>,
                limit: usize,
                reseal: &mut ResealRow<'_>,
            ) -> Result<BatchOutcome> {
                check_row_table(table)?;
                if owners.is_empty() {
                    return Ok(BatchOutcome::default());
                }
                let values = owner_values(table, owners)?;
                let d: Dialect = $dialect;
                let current_bytes = current.to_be_bytes();
                let outcome = self.$transaction(|conn| -> std::result::Result<BatchOutcome, TxError> {
                    let query = d.owner_rows(table, &values, Some(&current_bytes), keys, limit, true);
                    let rows = load_owner_rows!(query, &mut *conn, table)?;
                    let mut outcome = BatchOutcome { read: rows.len() as u64, ..BatchOutcome::default() };
                    if rows.is_empty() {
                        return Ok(outcome);
                    }
                    let mut news: Vec<Vec<Option<Resealed>>> = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let mut new = Vec::with_capacity(table.columns.len());
                        for i in 0..table.columns.len() {
                            new.push(reseal(row, i)?);
                        }
                        news.push(new);
                    }
                    let owner_keys: Vec<SqlValue> = rows
                        .iter()
                        .map(|r| owner_value(table, &r.owner))
                        .collect::<Result<_>>()?;
                    let key_column = table.key_column.as_deref().unwrap_or_default();
                    let update = SetUpdate {
                        shape: d.shape,
                        table: &table.table,
                        matches: vec![key_column, &table.owner_column],
                        sets: table.read_columns().collect(),
                        text_sets: Vec::new(),
                        extra: None,
                        guard_flag: None,
                        guard_key: None,
                        guard_on: table.flag_column.as_deref().map(|flag| (flag, table.flag_type)),
                        rows: Vec::new(),
                    };
                    let set_rows: Vec<Vec<SetValue<'_>>> = rows
                        .iter()
                        .zip(&news)
                        .zip(&owner_keys)
                        .map(|((row, new), owner)| {
                            let mut values = vec![SetValue::Key(&row.key), SetValue::Key(owner)];
                            for (old, new) in row.values.iter().zip(new) {
                                let new = new.as_ref().map(|n| n.value.as_slice());
                                values.push(SetValue::Bytes(new.or(old.as_deref())));
                            }
                            // Each index beside its value: recomputed with a
                            // re-sealed value, else as read.
                            for (i, new) in new.iter().enumerate() {
                                for (k, (p, _, _)) in table.index_positions(i).enumerate() {
                                    let old = row.values.get(p).and_then(Option::as_deref);
                                    let new = new.as_ref().and_then(|n| n.indexes.get(k)).map(Vec::as_slice);
                                    values.push(SetValue::Bytes(new.or(old)));
                                }
                            }
                            values
                        })
                        .collect();
                    let written = run_set_update(conn, d, update, set_rows)?;
                    outcome.updated = written;
                    outcome.conflicts = (rows.len() as u64).saturating_sub(written);
                    Ok(outcome)
                });
                match outcome {
                    Ok(outcome) => Ok(outcome),
                    Err(TxError::Phi(e)) => Err(e),
                    Err(TxError::Db(e)) => Err(Error::DataTable {
                        operation: "re-sealing rows of owners",
                        table: table.table.clone(),
                        column: table.owner_column.clone(),
                        owner: owners[0].clone(),
                        source: e.into(),
                    }),
                }
            }

            fn sample_values(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owner: &str,
                limit: usize,
            ) -> Result<Vec<StoredValue>> {
                table.validate()?;
                let owner_value = owner_value(table, owner)?;
                let d: Dialect = $dialect;
                let query = d.select_values(table, &column.column, &owner_value, |_| {}, limit);
                match load_stored!(query, &mut *self, table, owner) {
                    Ok(values) => Ok(values),
                    Err(TxError::Phi(e)) => Err(e),
                    Err(TxError::Db(e)) => Err(data_error("sampling values", table, column, owner, e)),
                }
            }

            fn count_clear_values(
                &mut self,
                table: &ResealTable,
                column: &ResealColumn,
                owner: &str,
            ) -> Result<u64> {
                table.validate()?;
                let owner_value = owner_value(table, owner)?;
                let c = &column.column;
                let mut query = Statement::default();
                query
                    .sql("SELECT COUNT(*) AS n FROM ")
                    .ident(&table.table)
                    .sql(" WHERE ")
                    .ident(&table.owner_column)
                    .sql(" = ")
                    .key(&owner_value)
                    .sql(" AND ")
                    .ident(c)
                    .sql(" IS NOT NULL AND ");
                // In the clear: not an envelope, or (with a flag) on a row
                // whose flag is off, whatever its bytes.
                if let Some(flag) = &table.flag_column {
                    query.sql("(NOT (").flag_on(flag, table.flag_type).sql(") OR ");
                }
                query.sql("SUBSTR(").ident(c).sql(", 1, 2) <> ").bytes(&PREFIX[..]);
                if table.flag_column.is_some() {
                    query.sql(")");
                }
                let count: Count = query
                    .get_result(self)
                    .map_err(|e| data_error("counting values stored in the clear", table, column, owner, e))?;
                Ok(u64::try_from(count.n).unwrap_or(0))
            }

            fn lookup_versions_in_use(
                &mut self,
                table: &'static str,
                lookup_column: &'static str,
            ) -> Result<Vec<(u32, u64)>> {
                check_identifier("table", table, true)?;
                check_identifier("lookup column", lookup_column, false)?;
                let mut query = Statement::default();
                query
                    .sql("SELECT SUBSTR(")
                    .ident(lookup_column)
                    .sql(", 1, 4) AS version, COUNT(*) AS n FROM ")
                    .ident(table)
                    .sql(" WHERE ")
                    .ident(lookup_column)
                    .sql(" IS NOT NULL GROUP BY SUBSTR(")
                    .ident(lookup_column)
                    .sql(", 1, 4)");
                let rows: Vec<VersionCount> =
                    query.load(self).map_err(|source| Error::Database {
                        operation: "counting lookup values per key version",
                        table,
                        source,
                    })?;
                let mut counts: Vec<(u32, u64)> = rows
                    .into_iter()
                    .filter_map(|r| {
                        let v: [u8; 4] = r.version.as_slice().try_into().ok()?;
                        Some((u32::from_be_bytes(v), u64::try_from(r.n).unwrap_or(0)))
                    })
                    .collect();
                counts.sort_unstable();
                Ok(counts)
            }

            fn write_lookup(
                &mut self,
                table: &'static str,
                key_column: &str,
                key: &SqlValue,
                column: &str,
                stored: &[u8],
                lookup_column: &str,
                value: &[u8],
            ) -> Result<usize> {
                check_identifier("table", table, true)?;
                check_identifier("key column", key_column, false)?;
                check_identifier("column", column, false)?;
                check_identifier("lookup column", lookup_column, false)?;
                let mut update = Statement::default();
                update
                    .sql("UPDATE ")
                    .ident(table)
                    .sql(" SET ")
                    .ident(lookup_column)
                    .sql(" = ")
                    .bytes(value)
                    .sql(" WHERE ")
                    .ident(key_column)
                    .sql(" = ")
                    .key(key)
                    .sql(" AND ")
                    .ident(column)
                    .sql(" = ")
                    .bytes(stored)
                    .sql(" AND (")
                    .ident(lookup_column)
                    .sql(" IS NULL OR ")
                    .ident(lookup_column)
                    .sql(" <> ")
                    .bytes(value)
                    .sql(")");
                update.execute(self).map_err(|source| Error::Database {
                    operation: "writing a re-indexed lookup value",
                    table,
                    source,
                })
            }

            fn write_indexes(
                &mut self,
                table: &StoredTable,
                row: &MigrationRow,
                sets: &[(&'static str, Option<Vec<u8>>)],
            ) -> Result<usize> {
                table.validate()?;
                if sets.is_empty() {
                    return Ok(0);
                }
                let mut update = Statement::default();
                update.sql("UPDATE ").ident(table.table).sql(" SET ");
                for (k, (column, value)) in sets.iter().enumerate() {
                    if k > 0 {
                        update.sql(", ");
                    }
                    update.ident(column).sql(" = ");
                    match value {
                        Some(value) => update.bytes(value.as_slice()),
                        None => update.sql("NULL"),
                    };
                }
                update
                    .sql(" WHERE ")
                    .ident(table.key_column)
                    .sql(" = ")
                    .key(&row.key)
                    .sql(" AND ");
                let flag_type = if table.flag_is_bool {
                    FlagType::Bool
                } else {
                    FlagType::Integer
                };
                update.flag_on(table.flag_column, flag_type);
                for (i, c) in table.columns.iter().enumerate() {
                    update.sql(" AND ").ident(c.sealed_column());
                    match row.values.get(table.sealed_position(i)).and_then(Option::as_ref) {
                        Some(stored) => update.sql(" = ").bytes(stored.as_slice()),
                        None => update.sql(" IS NULL"),
                    };
                }
                update.execute(self).map_err(|source| Error::Database {
                    operation: "writing a row's index columns",
                    table: table.table,
                    source,
                })
            }

            fn count_legacy_records(&mut self, table: &'static str) -> Result<Option<u64>> {
                use crate::store::schema::phi_legacy_values as lv;
                let d: Dialect = $dialect;
                let error = |source| Error::Database {
                    operation: "counting recorded legacy values",
                    table,
                    source,
                };
                let exists: Count = diesel::sql_query(crate::table_names::prefixed_sql(d.legacy_table))
                    .get_result(self)
                    .map_err(error)?;
                if exists.n == 0 {
                    return Ok(None);
                }
                let n: i64 = lv::table
                    .filter(lv::table_name.eq(table))
                    .count()
                    .get_result(self)
                    .map_err(error)?;
                Ok(Some(u64::try_from(n).unwrap_or(0)))
            }

            fn legacy_records(
                &mut self,
                table: &'static str,
                keys: &[String],
            ) -> Result<Vec<LegacyRecord>> {
                use crate::store::schema::phi_legacy_values as lv;
                let mut out = Vec::new();
                for chunk in keys.chunks(1_000) {
                    let rows: Vec<(String, String, String, Vec<u8>)> = lv::table
                        .filter(lv::table_name.eq(table))
                        .filter(lv::row_key.eq_any(chunk))
                        .select((lv::column_name, lv::row_key, lv::owner_id, lv::stored))
                        .load(self)
                        .map_err(|source| Error::Database {
                            operation: "reading recorded legacy values",
                            table,
                            source,
                        })?;
                    out.extend(rows.into_iter().map(|(column, row_key, owner, stored)| LegacyRecord {
                        column,
                        row_key,
                        owner,
                        stored,
                    }));
                }
                Ok(out)
            }

            fn delete_legacy_records(&mut self, table: &'static str, keys: &[String]) -> Result<u64> {
                use crate::store::schema::phi_legacy_values as lv;
                let mut deleted = 0;
                for chunk in keys.chunks(1_000) {
                    deleted += diesel::delete(
                        lv::table
                            .filter(lv::table_name.eq(table))
                            .filter(lv::row_key.eq_any(chunk)),
                    )
                    .execute(self)
                    .map_err(|source| Error::Database {
                        operation: "deleting recorded legacy values",
                        table,
                        source,
                    })? as u64;
                }
                Ok(deleted)
            }

            fn insert_legacy_records(
                &mut self,
                table: &'static str,
                records: &[LegacyRecord],
            ) -> Result<u64> {
                use crate::store::schema::phi_legacy_values as lv;
                let mut inserted = 0;
                for r in records {
                    inserted += diesel::insert_into(lv::table)
                        .values((
                            lv::table_name.eq(table),
                            lv::column_name.eq(&r.column),
                            lv::row_key.eq(&r.row_key),
                            lv::owner_id.eq(&r.owner),
                            lv::stored.eq(&r.stored),
                        ))
                        .on_conflict_do_nothing()
                        .execute(self)
                        .map_err(|source| Error::Database {
                            operation: "recording legacy values",
                            table,
                            source,
                        })? as u64;
                }
                Ok(inserted)
            }

            fn migration_count(&mut self, table: &StoredTable, sealed: bool) -> Result<u64> {
                table.validate()?;
                let mut query = Statement::default();
                query
                    .sql("SELECT COUNT(*) AS n FROM ")
                    .ident(table.table)
                    .sql(" WHERE ")
                    .ident(table.flag_column)
                    .sql(" = ")
                    .flag(table.flag_is_bool, sealed);
                let count: Count = query
                    .get_result(self)
                    .map_err(|source| Error::Database {
                        operation: "counting rows by encrypted flag",
                        table: table.table,
                        source,
                    })?;
                Ok(u64::try_from(count.n).unwrap_or(0))
            }

            fn migration_rows(
                &mut self,
                table: &StoredTable,
                query: &RowsQuery<'_>,
                values: bool,
            ) -> Result<Vec<MigrationRow>> {
                table.validate()?;
                let d: Dialect = $dialect;
                match load_rows!(self, d, table, query, values, false) {
                    Ok(rows) => Ok(rows),
                    Err(TxError::Phi(e)) => Err(e),
                    Err(TxError::Db(source)) => Err(Error::Database {
                        operation: "reading rows to migrate",
                        table: table.table,
                        source,
                    }),
                }
            }

            fn migration_batch(
                &mut self,
                table: &StoredTable,
                sealed: bool,
                limit: usize,
                after: Option<&SqlValue>,
                prepare: &mut Prepare<'_, Self>,
                transform: &mut Transform<'_>,
                before_write: &mut dyn FnMut(&mut Self) -> Result<()>,
            ) -> Result<ApplyOutcome> {
                table.validate()?;
                let d: Dialect = $dialect;
                let outcome = self.$transaction(|conn| -> std::result::Result<ApplyOutcome, TxError> {
                    let q = RowsQuery { sealed, after, limit, random: false };
                    let rows = load_rows!(conn, d, table, &q, true, true)?;
                    prepare(conn, &rows)?;
                    let mut outcome = ApplyOutcome {
                        read: rows.len() as u64,
                        last: rows.last().map(|r| r.key.clone()),
                        ..ApplyOutcome::default()
                    };
                    let mut writes: Vec<(&SqlValue, RowWrite)> = Vec::with_capacity(rows.len());
                    for row in &rows {
                        match transform(row)? {
                            Some(write) => writes.push((&row.key, write)),
                            None => outcome.deferred += 1,
                        }
                    }
                    before_write(conn)?;
                    if writes.is_empty() {
                        return Ok(outcome);
                    }
                    // Sealing writes each value into its sealed column (the
                    // shadow column during the dual-write phase, whose
                    // plaintext column is left as it is); unsealing writes
                    // the plain value into the column and clears its shadow.
                    let unsealing_shadow = sealed && table.has_shadow();
                    let mut sets: Vec<&str> = table
                        .columns
                        .iter()
                        .map(|c| if sealed { c.column } else { c.sealed_column() })
                        .collect();
                    let mut text_sets: Vec<bool> = table
                        .columns
                        .iter()
                        .map(|c| sealed && c.shadow.is_some())
                        .collect();
                    sets.extend(table.all_index_columns());
                    if unsealing_shadow {
                        sets.extend(table.columns.iter().filter_map(|c| c.shadow));
                    }
                    text_sets.resize(sets.len(), false);
                    let update = SetUpdate {
                        shape: d.shape,
                        table: table.table,
                        matches: vec![table.key_column],
                        sets,
                        text_sets,
                        extra: Some((table.flag_column, FlagValue::new(table.flag_is_bool, !sealed))),
                        guard_flag: Some((table.flag_column, FlagValue::new(table.flag_is_bool, sealed))),
                        guard_key: None,
                        guard_on: None,
                        rows: Vec::new(),
                    };
                    // Bound by reference: no copy of a plaintext outlives
                    // `writes`, which zeroizes its values.
                    let shadows = table.columns.iter().filter(|c| c.shadow.is_some()).count();
                    let mut values: Vec<Vec<SetValue<'_>>> = Vec::with_capacity(writes.len());
                    for (key, write) in &writes {
                        let mut row = vec![SetValue::Key(key)];
                        for (c, v) in table.columns.iter().zip(&write.values) {
                            row.push(if sealed && c.shadow.is_some() {
                                let text = match v.as_deref().map(std::str::from_utf8).transpose() {
                                    Ok(text) => text,
                                    Err(_) => return Err(TxError::Phi(Error::DataTable {
                                        operation: "unsealing a row",
                                        table: table.table.to_owned(),
                                        column: c.column.to_owned(),
                                        owner: String::new(),
                                        source: "the plain value is not text".into(),
                                    })),
                                };
                                if d.shape == SetShape::Join {
                                    // MySQL and MariaDB bind text as `CHAR`,
                                    // whose trailing spaces the joined rows
                                    // lose: the UTF-8 bytes, bound as binary,
                                    // are converted to the column's type.
                                    SetValue::Bytes(text.map(str::as_bytes))
                                } else {
                                    SetValue::Text(text)
                                }
                            } else {
                                SetValue::Bytes(v.as_deref())
                            });
                        }
                        row.extend(write.indexes.iter().map(|v| SetValue::Bytes(v.as_deref())));
                        if unsealing_shadow {
                            row.extend((0..shadows).map(|_| SetValue::Bytes(None)));
                        }
                        values.push(row);
                    }
                    // Row keys are unique, so each row of the statement
                    // writes at most one row: those it did not write had
                    // their flag flipped by another writer first.
                    let written = run_set_update(conn, d, update, values)?;
                    outcome.updated = written;
                    outcome.conflicts = (writes.len() as u64).saturating_sub(written);
                    Ok(outcome)
                });
                match outcome {
                    Ok(outcome) => Ok(outcome),
                    Err(TxError::Phi(e)) => Err(e),
                    Err(TxError::Db(source)) => Err(Error::Database {
                        operation: "migrating a batch of rows",
                        table: table.table,
                        source,
                    }),
                }
            }
        }
    )*};
}

data_connection! {
    "sqlite" => diesel::SqliteConnection, immediate_transaction,
        Dialect { lock: "", random: "RANDOM()",
            shape: SetShape::SqliteValues, max_binds: 32_766,
            legacy_table: "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'phi_legacy_values'" };
    "mysql" => diesel::MysqlConnection, transaction,
        Dialect { lock: " FOR UPDATE", random: "RAND()",
            shape: SetShape::Join, max_binds: 65_535,
            legacy_table: "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 'phi_legacy_values'" };
    "postgres" => diesel::PgConnection, transaction,
        Dialect { lock: " FOR UPDATE", random: "random()",
            shape: SetShape::Values, max_binds: 65_535,
            legacy_table: "SELECT CAST(CASE WHEN to_regclass('phi_legacy_values') IS NULL THEN 0 ELSE 1 END AS BIGINT) AS n" };
}

/// A model whose stored rows the migration jobs can work on: generated by
/// `#[derive(PhiRecord)]` for models with both an `#[phi(encrypted_flag)]`
/// and a `#[phi(row_key)]` field.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be backfilled or verified by phi's migration jobs",
    note = "the migration jobs need a model with an `#[phi(encrypted_flag)]` field (which rows are sealed) and a `#[phi(row_key)]` field (the key batches are ordered and guarded by)"
)]
pub trait Migratable: crate::record::PhiRecord {
    /// How the model is stored: its table, owner, row key, flag and
    /// encrypted columns.
    #[doc(hidden)]
    fn stored_table() -> StoredTable;

    /// The model's table as the life-cycle jobs (re-seal, retire, usage,
    /// shred) take it: owner and row key columns with their types, the
    /// encrypted flag, and each encrypted column with the scope the model
    /// seals it under.
    ///
    /// # Errors
    /// [`Error::Config`] when the owner or row key type cannot be bound.
    fn reseal_table() -> Result<ResealTable> {
        Self::stored_table().reseal_table()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RowKey;

    #[test]
    fn typed_owner_and_key_columns_parse_and_display() {
        let t =
            ResealTable::parse("cases:user_id#i64:id#I32:notes,dob@cases.birth").expect("parses");
        assert_eq!(
            t,
            ResealTable::new("cases", "user_id")
                .owner_column_type(ColumnType::I64)
                .key_column_typed("id", ColumnType::I32)
                .column("notes")
                .column_with_scope("dob", "cases.birth")
        );
        assert_eq!(
            t.to_string(),
            "cases:user_id#i64:id#i32:notes,dob@cases.birth"
        );
        assert_eq!(ResealTable::parse(&t.to_string()).expect("round trip"), t);
        // Old descriptions keep their meaning: text columns.
        let old = ResealTable::parse("cases:user_id:case_id:notes").expect("parses");
        assert_eq!(
            (old.owner_type, old.key_type),
            (ColumnType::Text, ColumnType::Text)
        );
        assert_eq!(old.to_string(), "cases:user_id:case_id:notes");
        let explicit = ResealTable::parse("cases:user_id#text:case_id#text:notes").expect("parses");
        assert_eq!(explicit, old);
        // An integer owner without a row key.
        let nokey = ResealTable::parse("visits:owner#u32::reason").expect("parses");
        assert_eq!(
            (nokey.owner_type, nokey.key_column.as_deref()),
            (ColumnType::U32, None)
        );
        assert_eq!(nokey.to_string(), "visits:owner#u32::reason");
        for name in ["text", "i16", "i32", "i64", "u16", "u32", "u64"] {
            assert_eq!(
                ColumnType::from_name(name).map(ColumnType::name),
                Some(name)
            );
        }

        let err = ResealTable::parse("cases:user_id#int:id:notes").expect_err("unknown type");
        assert!(
            err.to_string().contains("unknown column type \"int\""),
            "{err}"
        );
        let err = ResealTable::parse("cases:user_id:#i64:notes").expect_err("type without column");
        assert!(err.to_string().contains("without a key column"), "{err}");
        let err = ResealTable::parse("cases:user id#i64:id:notes").expect_err("identifier");
        assert!(
            err.to_string().contains("not a plain SQL identifier"),
            "{err}"
        );
    }

    #[test]
    fn blind_index_columns_parse_and_display() {
        let t = ResealTable::parse(
            "clinic.cases:user_id:id:last/last_bidx#Lowercase+TRIM@cases.last_name,dob/dob_bidx,notes",
        )
        .expect("parses");
        assert_eq!(
            t,
            ResealTable::new("cases", "user_id")
                .in_schema("clinic")
                .key_column("id")
                .column_with_scope("last", "cases.last_name")
                .blind_index("last_bidx", Normalize::TRIM_LOWERCASE)
                .column("dob")
                .blind_index("dob_bidx", Normalize::NONE)
                .column("notes")
        );
        assert_eq!(
            t.to_string(),
            "clinic.cases:user_id:id:last/last_bidx#trim+lowercase@cases.last_name,dob/dob_bidx,notes"
        );
        assert_eq!(ResealTable::parse(&t.to_string()).expect("again"), t);
        assert_eq!(
            t.read_columns().collect::<Vec<_>>(),
            ["last", "dob", "notes", "last_bidx", "dob_bidx"]
        );
        assert_eq!(
            (0..3)
                .map(|i| t.index_positions(i).map(|(p, _, _)| p).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            [vec![3], vec![4], vec![]]
        );
        for (spec, why) in [
            ("cases:user_id:id:last/", "empty blind index"),
            ("cases:user_id:id:last/x#upper", "unknown normalisation"),
            ("cases:user_id:id:last/a-b", "not a plain SQL identifier"),
            ("cases:user_id:id:/last_bidx", "before any encrypted column"),
        ] {
            let error = ResealTable::parse(spec).expect_err(spec).to_string();
            assert!(error.contains(why), "{spec}: {error}");
        }
        let early = ResealTable::new("cases", "user_id").blind_index("bidx", Normalize::NONE);
        let error = early.validate().expect_err("no column").to_string();
        assert!(
            error.contains("\"bidx\" is given before any encrypted column"),
            "{error}"
        );
    }

    #[test]
    fn a_flag_column_is_a_fifth_field() {
        let t = ResealTable::parse("cases:user_id:case_id:notes:phi_encrypted").expect("parses");
        assert_eq!(
            t,
            ResealTable::new("cases", "user_id")
                .key_column("case_id")
                .column("notes")
                .flag_column("phi_encrypted")
        );
        assert_eq!(t.to_string(), "cases:user_id:case_id:notes:phi_encrypted");
        let explicit =
            ResealTable::parse("cases:user_id:case_id:notes:phi_encrypted#BOOL").expect("parses");
        assert_eq!(explicit, t);
        let int = ResealTable::parse("v:o#i64::a,b@x.b: sealed # int ").expect("parses");
        assert_eq!(
            (int.flag_column.as_deref(), int.flag_type),
            (Some("sealed"), FlagType::Integer)
        );
        assert_eq!(int.to_string(), "v:o#i64::a,b@x.b:sealed#int");
        assert_eq!(
            ResealTable::parse(&int.to_string()).expect("round trip"),
            int
        );
        // Without a fifth field there is no flag, as before.
        let none = ResealTable::parse("cases:user_id:case_id:notes").expect("parses");
        assert_eq!(none.flag_column, None);

        for (spec, why) in [
            (
                "cases:user_id:case_id:notes:flag#yes",
                "unknown flag column type \"yes\"",
            ),
            ("cases:user_id:case_id:notes:", "names no flag column"),
            ("cases:user_id:case_id:notes:a:b", "four or five"),
            (
                "cases:user_id:case_id:notes:bad flag",
                "not a plain SQL identifier",
            ),
        ] {
            let err = ResealTable::parse(spec).expect_err(spec);
            assert!(err.to_string().contains(why), "{spec}: {err}");
        }
    }

    #[test]
    fn a_schema_qualified_table_scopes_columns_by_its_name() {
        let t = ResealTable::parse("clinic.cases:user_id:case_id:notes,dob@cases.birth")
            .expect("parses");
        assert_eq!(t.table, "clinic.cases");
        assert_eq!(t.table_name(), "cases");
        let scopes: Vec<&str> = t.columns.iter().map(|c| c.scope.as_str()).collect();
        assert_eq!(scopes, ["cases.notes", "cases.birth"]);
        assert_eq!(
            t.to_string(),
            "clinic.cases:user_id:case_id:notes,dob@cases.birth"
        );
        let plain = ResealTable::new("cases", "user_id")
            .key_column("case_id")
            .column("notes")
            .column_with_scope("dob", "cases.birth");
        assert_eq!(plain.clone().in_schema("clinic"), t);
        assert_eq!(t.clone().in_schema("archive").table, "archive.cases");
        // A scope that names the schema is kept as given (pinned).
        let pinned =
            ResealTable::parse("clinic.cases:user_id::notes@clinic.cases.notes").expect("parses");
        assert_eq!(pinned.columns[0].scope, "clinic.cases.notes");
        assert_eq!(
            pinned.to_string(),
            "clinic.cases:user_id::notes@clinic.cases.notes"
        );
    }

    #[test]
    fn an_integer_owner_column_needs_an_integer_owner_id() {
        let t = ResealTable::new("visits", "user_id")
            .owner_column_type(ColumnType::I64)
            .column("reason");
        assert_eq!(owner_value(&t, "-42").expect("integer"), SqlValue::Int(-42));
        for bad in ["provider-17", "", "007", "+7", "1.5", "9223372036854775808"] {
            let err = owner_value(&t, bad).expect_err("not an i64");
            assert!(matches!(err, Error::DataTable { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("visits.user_id") && msg.contains(&format!("{bad:?}")),
                "{msg}"
            );
        }
        let small = t.clone().owner_column_type(ColumnType::U16);
        assert_eq!(
            owner_value(&small, "65535").expect("fits"),
            SqlValue::Int(65_535)
        );
        assert!(owner_value(&small, "65536").is_err());
        assert!(owner_value(&small, "-1").is_err());
        // A text owner column takes any owner id as it is.
        let text = ResealTable::new("cases", "user_id").column("notes");
        assert_eq!(
            owner_value(&text, "007").expect("text"),
            SqlValue::Text("007".into())
        );
    }

    #[test]
    fn integer_row_keys_bind_the_bytes_the_derived_models_bind() {
        let t = |ty| {
            ResealTable::new("t", "o")
                .key_column_typed("id", ty)
                .column("c")
        };
        let bytes = |ty, v| int_row(&t(ty), "o", v).expect("fits");
        assert_eq!(bytes(ColumnType::I64, -3), (*(-3i64).row_key()).to_vec());
        assert_eq!(bytes(ColumnType::I32, -3), (*(-3i32).row_key()).to_vec());
        assert_eq!(bytes(ColumnType::I16, 300), (*300i16.row_key()).to_vec());
        assert_eq!(bytes(ColumnType::U64, 7), (*7u64.row_key()).to_vec());
        assert_eq!(
            bytes(ColumnType::U32, 70_000),
            (*70_000u32.row_key()).to_vec()
        );
        assert_eq!(
            bytes(ColumnType::U16, 65_535),
            (*65_535u16.row_key()).to_vec()
        );
        assert_eq!(bytes(ColumnType::I16, 1).len(), 2);
        let err = int_row(&t(ColumnType::I16), "owner-1", 40_000).expect_err("too wide");
        assert!(
            err.to_string().contains("t.id") && err.to_string().contains("owner-1"),
            "{err}"
        );
        assert!(int_row(&t(ColumnType::U32), "o", -1).is_err());
    }
}
