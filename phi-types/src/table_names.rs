//! The names of phi's tables in this process: phi's names, with the
//! prefix the application sets at start-up
//! ([`set_table_prefix`], re-exported by [`schema`](crate::schema)).

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The prefix of every table name of phi in this process (`""` until
/// [`set_table_prefix`] sets another; fixed by the first use of a name of
/// phi's tables: a query, a migration run or written, a generated adoption
/// migration, [`table_prefix`]).
static PREFIX: OnceLock<String> = OnceLock::new();

/// Puts `prefix` before the name of every table of phi (and of their
/// indexes and constraints), in this process: `set_table_prefix("phi_")`
/// keeps the keys in `phi_user_encryption_keys`, the audit trail in
/// `phi_encryption_key_audit`, the feed in `phi_phi_key_events`, and so
/// on. For a database that already has tables of phi's names (SurgiCase's
/// `user_encryption_keys` and `encryption_key_audit` have other columns):
/// a store refuses such a table, naming this function.
///
/// Call it once, at start-up, before anything of phi names a table: before
/// any store connects, any migration of phi runs or is written, and any
/// adoption migration is generated (each of these fixes the names, as
/// `""` if no prefix was set). Every store, keyring, job and access log of
/// the process then uses the same names, and so must every process sharing
/// the database: the `phi` command reads `PHI_TABLE_PREFIX` (or
/// `--table-prefix`); an application's own command built over a keyring it
/// made ([`cli::App::new`](crate::cli::App)) sets the prefix in code
/// before building that keyring. Run phi's migrations
/// ([`migrations`](crate::migrations)) after it: they create the prefixed
/// tables, indexes and constraints, under the same Diesel versions.
/// Revert them, if ever, with the `down.sql` files
/// [`write_to`](crate::migrations::write_to) writes under the prefix,
/// never with the unprefixed ones phi ships: those name the other
/// system's tables.
///
/// The PostgreSQL notification channel of the key-event feed carries the
/// prefix too ([`feed::feed_channel`](crate::feed::feed_channel)).
///
/// ```
/// phi_types::schema::set_table_prefix("surgi_phi_")?;
/// assert_eq!(phi_types::schema::table_prefix(), "surgi_phi_");
/// assert_eq!(phi_types::schema::user_encryption_keys::sql_name(), "surgi_phi_user_encryption_keys");
/// // The same prefix again is no change; another one is refused.
/// phi_types::schema::set_table_prefix("surgi_phi_")?;
/// assert!(phi_types::schema::set_table_prefix("other_").is_err());
/// # Ok::<(), phi_types::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidInput`] (`what` = `table prefix`) for a prefix that
/// is not lower-case ASCII letters, digits and `_` starting with a
/// letter, or that makes a name longer than 63 bytes (PostgreSQL's
/// limit), or when the process already uses another prefix (names are
/// fixed by their first use).
pub fn set_table_prefix(prefix: &str) -> Result<()> {
    let refused = |reason: String| Error::InvalidInput {
        what: "table prefix",
        reason,
    };
    if !prefix.is_empty() {
        let valid = prefix.as_bytes()[0].is_ascii_lowercase()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(refused(format!(
                "{prefix:?}: lower-case ASCII letters, digits and `_`, starting with a letter"
            )));
        }
        if prefix.len() + LONGEST_NAME > 63 {
            return Err(refused(format!(
                "{prefix:?} is {} bytes: with it phi's longest name would exceed the 63 bytes \
                 PostgreSQL allows (at most {} bytes)",
                prefix.len(),
                63 - LONGEST_NAME
            )));
        }
    }
    let set = PREFIX.get_or_init(|| prefix.to_owned());
    if set == prefix {
        Ok(())
    } else {
        Err(refused(format!(
            "{prefix:?}: this process already uses {set:?} (table names are fixed by their \
             first use: set the prefix at start-up, before any store connects or migration runs)"
        )))
    }
}

/// The prefix of phi's table names in this process ([`set_table_prefix`];
/// `""` by default). Reading it fixes it.
pub fn table_prefix() -> &'static str {
    PREFIX.get_or_init(String::new)
}

/// The longest name phi's migrations write for a table, index or
/// constraint (`phi_key_events_kind_not_empty`), checked against the
/// migrations by a unit test. (PostgreSQL shortens the longer names it
/// makes up itself, such as `user_encryption_keys_version_check`.)
pub(crate) const LONGEST_NAME: usize = 29;

/// The names of phi's tables, without the prefix, in migration order.
pub(crate) const TABLES: &[&str] = &[
    "user_encryption_keys",
    "encryption_key_audit",
    "kek_check_values",
    "phi_key_feed",
    "phi_key_events",
    "phi_rollout",
    "phi_rollout_owners",
    "phi_feed_readers",
    "phi_legacy_values",
    "phi_rotation_claims",
    "phi_seal_counts",
    "phi_access_chains",
    "phi_access_batches",
    "phi_access_log",
];

/// The name of phi's table `table` in this process: its name with the
/// prefix ([`set_table_prefix`]).
pub(crate) fn sql_name(table: &str) -> String {
    format!("{}{table}", table_prefix())
}

/// `sql` (one of phi's migrations, or a statement naming phi's tables)
/// with the prefix before every identifier that begins with the name of
/// one of phi's tables: the tables, and their indexes and constraints,
/// which phi names after them.
pub(crate) fn prefixed_sql(sql: &str) -> String {
    with_prefix(sql, table_prefix())
}

/// [`prefixed_sql`] with `prefix`.
pub(crate) fn with_prefix(sql: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 64);
    let bytes = sql.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let end = bytes[i..]
                .iter()
                .position(|b| !ident(*b))
                .map_or(bytes.len(), |n| i + n);
            let word = &sql[i..end];
            if TABLES.iter().any(|t| word.starts_with(t)) {
                out.push_str(prefix);
            }
            out.push_str(word);
            i = end;
        } else {
            let next = sql[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&sql[i..i + next]);
            i += next;
        }
    }
    out
}

/// The name of one of phi's tables as a query renders it: with the
/// process's prefix ([`set_table_prefix`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct TableName(pub fn() -> &'static str);

impl<DB: diesel::backend::Backend> diesel::query_builder::QueryFragment<DB> for TableName {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> diesel::QueryResult<()> {
        out.push_identifier((self.0)())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tables, their indexes and constraints, and names in string
    /// literals (a catalog lookup) get the prefix; columns, other words and
    /// text that is not an identifier stay as they are.
    #[test]
    fn the_prefix_goes_before_every_name_that_begins_with_a_tables() {
        let sql = "CREATE TABLE phi_rollout_owners (policy VARCHAR(64), owner_id TEXT);\n\
                   CREATE INDEX user_encryption_keys_kek_id ON user_encryption_keys (kek_id);\n\
                   -- keys of user_encryption_keys, é\n\
                   SELECT conname FROM pg_constraint WHERE conrelid = 'phi_key_events'::regclass;";
        assert_eq!(
            with_prefix(sql, "x_"),
            "CREATE TABLE x_phi_rollout_owners (policy VARCHAR(64), owner_id TEXT);\n\
             CREATE INDEX x_user_encryption_keys_kek_id ON x_user_encryption_keys (kek_id);\n\
             -- keys of x_user_encryption_keys, é\n\
             SELECT conname FROM pg_constraint WHERE conrelid = 'x_phi_key_events'::regclass;"
        );
        assert_eq!(with_prefix(sql, ""), sql);
        // A word that merely contains a table's name is left alone.
        assert_eq!(with_prefix("my_phi_rollout", "x_"), "my_phi_rollout");
    }
}
