//! Diesel table definitions of the key store, for queries of your own
//! (key coverage, the audit trail). Their names carry the process's
//! prefix, if any ([`set_table_prefix`]):
//!
//! ```
//! use diesel::prelude::*;
//! use phi_types::schema::encryption_key_audit as audit;
//! let recent = audit::table
//!     .filter(audit::owner_id.eq("provider-17"))
//!     .order(audit::id.desc())
//!     .select((audit::occurred_at, audit::action, audit::key_version))
//!     .limit(20);
//! # let _ = recent;
//! ```
#![allow(missing_docs)]

pub use crate::table_names::{set_table_prefix, table_prefix};

/// A Diesel table of phi's, like `diesel::table!` makes, whose SQL name
/// carries the process's prefix ([`set_table_prefix`]). It has what phi's
/// queries use: select, filter, order, `find`, insert, update, delete,
/// aggregates and subqueries within one table.
macro_rules! phi_table {
    (
        $(#[$meta:meta])*
        $table:ident ($($pk:ident),+) {
            $($column:ident -> $ty:ty,)+
        }
    ) => {
        $(#[$meta])*
        #[allow(unused_imports, dead_code, unreachable_pub, unused_qualifications, non_camel_case_types)]
        pub mod $table {
            use diesel::sql_types::*;
            pub use self::columns::*;

            /// The columns and the table (under the module's name), for
            /// glob imports.
            pub mod dsl {
                pub use super::columns::*;
                pub use super::table as $table;
            }

            /// The table's name in SQL in this process: with the prefix
            /// ([`set_table_prefix`](crate::schema::set_table_prefix)).
            pub fn sql_name() -> &'static str {
                static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
                NAME.get_or_init(|| $crate::table_names::sql_name(stringify!($table)))
            }

            /// The table.
            #[derive(Debug, Clone, Copy, Default, diesel::query_builder::QueryId)]
            pub struct table;

            /// The SQL types of the table's columns.
            pub type SqlType = ($($ty,)+);

            impl diesel::internal::table_macro::StaticQueryFragment for table {
                type Component = $crate::table_names::TableName;
                const STATIC_COMPONENT: &'static Self::Component = &$crate::table_names::TableName(sql_name);
            }

            impl diesel::QuerySource for table {
                type FromClause = diesel::internal::table_macro::StaticQueryFragmentInstance<table>;
                type DefaultSelection = <Self as diesel::Table>::AllColumns;

                fn from_clause(&self) -> Self::FromClause {
                    diesel::internal::table_macro::StaticQueryFragmentInstance::new()
                }

                fn default_selection(&self) -> Self::DefaultSelection {
                    <Self as diesel::Table>::all_columns()
                }
            }

            impl<DB: diesel::backend::Backend> diesel::query_builder::QueryFragment<DB> for table {
                fn walk_ast<'b>(
                    &'b self,
                    out: diesel::query_builder::AstPass<'_, 'b, DB>,
                ) -> diesel::QueryResult<()> {
                    <table as diesel::internal::table_macro::StaticQueryFragment>::STATIC_COMPONENT.walk_ast(out)
                }
            }

            impl diesel::query_builder::AsQuery for table {
                type SqlType = SqlType;
                type Query = diesel::internal::table_macro::SelectStatement<
                    diesel::internal::table_macro::FromClause<Self>,
                >;

                fn as_query(self) -> Self::Query {
                    diesel::internal::table_macro::SelectStatement::simple(self)
                }
            }

            impl diesel::Table for table {
                type PrimaryKey = ($($pk,)+);
                type AllColumns = ($($column,)+);

                fn primary_key(&self) -> Self::PrimaryKey {
                    ($($pk,)+)
                }

                fn all_columns() -> Self::AllColumns {
                    ($($column,)+)
                }
            }

            impl diesel::associations::HasTable for table {
                type Table = Self;

                fn table() -> Self::Table {
                    table
                }
            }

            impl diesel::query_builder::IntoUpdateTarget for table {
                type WhereClause = <<Self as diesel::query_builder::AsQuery>::Query
                    as diesel::query_builder::IntoUpdateTarget>::WhereClause;

                fn into_update_target(self) -> diesel::query_builder::UpdateTarget<Self::Table, Self::WhereClause> {
                    use diesel::query_builder::AsQuery;
                    self.as_query().into_update_target()
                }
            }

            impl diesel::query_source::AppearsInFromClause<table> for table {
                type Count = diesel::query_source::Once;
            }

            impl diesel::query_source::AppearsInFromClause<table>
                for diesel::internal::table_macro::NoFromClause
            {
                type Count = diesel::query_source::Never;
            }

            impl<T> diesel::insertable::Insertable<T> for table
            where
                <table as diesel::query_builder::AsQuery>::Query: diesel::insertable::Insertable<T>,
            {
                type Values = <<table as diesel::query_builder::AsQuery>::Query
                    as diesel::insertable::Insertable<T>>::Values;

                fn values(self) -> Self::Values {
                    use diesel::query_builder::AsQuery;
                    self.as_query().values()
                }
            }

            /// The table's columns.
            pub mod columns {
                use diesel::sql_types::*;
                use super::table;
                $(phi_table!(@column $column -> $ty);)+
            }
        }
    };
    (@column $column:ident -> $ty:ty) => {
        /// A column.
        #[derive(Debug, Clone, Copy, Default, diesel::query_builder::QueryId)]
        pub struct $column;

        impl diesel::expression::Expression for $column {
            type SqlType = $ty;
        }

        impl<DB: diesel::backend::Backend> diesel::query_builder::QueryFragment<DB> for $column
        where
            diesel::internal::table_macro::StaticQueryFragmentInstance<table>: diesel::query_builder::QueryFragment<DB>,
        {
            fn walk_ast<'b>(
                &'b self,
                mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
            ) -> diesel::QueryResult<()> {
                if !out.should_skip_from() {
                    const FROM_CLAUSE: diesel::internal::table_macro::StaticQueryFragmentInstance<table> =
                        diesel::internal::table_macro::StaticQueryFragmentInstance::new();
                    FROM_CLAUSE.walk_ast(out.reborrow())?;
                    out.push_sql(".");
                }
                out.push_identifier(stringify!($column))
            }
        }

        impl diesel::SelectableExpression<table> for $column {}

        impl<QS> diesel::AppearsOnTable<QS> for $column where
            QS: diesel::query_source::AppearsInFromClause<table, Count = diesel::query_source::Once>,
        {
        }

        impl<From> diesel::SelectableExpression<
            diesel::internal::table_macro::SelectStatement<diesel::internal::table_macro::FromClause<From>>,
        > for $column
        where
            From: diesel::query_source::QuerySource,
            $column: diesel::SelectableExpression<From>
                + diesel::AppearsOnTable<
                    diesel::internal::table_macro::SelectStatement<diesel::internal::table_macro::FromClause<From>>,
                >,
        {
        }

        impl<GB> diesel::expression::ValidGrouping<GB> for $column
        where
            GB: diesel::expression::IsContainedInGroupBy<
                $column,
                Output = diesel::expression::is_contained_in_group_by::Yes,
            >,
        {
            type IsAggregate = diesel::expression::is_aggregate::Yes;
        }

        impl diesel::expression::ValidGrouping<()> for $column {
            type IsAggregate = diesel::expression::is_aggregate::No;
        }

        impl diesel::expression::IsContainedInGroupBy<$column> for $column {
            type Output = diesel::expression::is_contained_in_group_by::Yes;
        }

        impl diesel::query_source::Column for $column {
            type Table = table;
            const NAME: &'static str = stringify!($column);
        }

        impl<T> diesel::EqAll<T> for $column
        where
            T: diesel::expression::AsExpression<$ty>,
            diesel::dsl::Eq<$column, T::Expression>: diesel::Expression<SqlType = diesel::sql_types::Bool>,
        {
            type Output = diesel::dsl::Eq<Self, T::Expression>;

            fn eq_all(self, rhs: T) -> Self::Output {
                use diesel::expression_methods::ExpressionMethods;
                self.eq(rhs)
            }
        }
    };
}

phi_table! {
    /// Wrapped data keys, one row per (owner, version).
    user_encryption_keys (owner_id, version) {
        owner_id -> Varchar,
        version -> BigInt,
        kek_id -> Varchar,
        wrapped_key -> Binary,
        state -> Varchar,
        created_at -> Timestamp,
        updated_at -> Timestamp,
    }
}

phi_table! {
    /// Every key operation.
    encryption_key_audit (id) {
        id -> BigInt,
        occurred_at -> Timestamp,
        owner_id -> Varchar,
        action -> Varchar,
        key_version -> Nullable<BigInt>,
        kek_id -> Nullable<Varchar>,
        actor -> Varchar,
        detail -> Nullable<Text>,
    }
}

phi_table! {
    /// One check value per KEK id: a commitment to the key material first
    /// used under that id.
    kek_check_values (kek_id) {
        kek_id -> Varchar,
        format -> Varchar,
        check_value -> Binary,
        created_at -> Timestamp,
    }
}

phi_table! {
    /// The key-event feed's head: one row (`id` 1), `head` the id of the
    /// last event appended.
    phi_key_feed (id) {
        id -> Integer,
        head -> BigInt,
    }
}

phi_table! {
    /// The key-event feed: shred, rotate, retire, rewrap, roll-out changes
    /// and cache clears, in commit order.
    phi_key_events (id) {
        id -> BigInt,
        occurred_at -> Timestamp,
        kind -> Varchar,
        owner_id -> Nullable<Varchar>,
        key_version -> Nullable<BigInt>,
        actor -> Varchar,
        detail -> Nullable<Text>,
    }
}

phi_table! {
    /// Roll-out policies, by name.
    phi_rollout (policy) {
        policy -> Varchar,
        mode -> Varchar,
        updated_at -> Timestamp,
        updated_by -> Varchar,
    }
}

phi_table! {
    /// The owners a policy seals when its `phi_rollout.mode` is `owners`.
    phi_rollout_owners (policy, owner_id) {
        policy -> Varchar,
        owner_id -> Varchar,
    }
}

phi_table! {
    /// How far each following keyring has read the feed.
    phi_feed_readers (reader) {
        reader -> Varchar,
        position -> BigInt,
        updated_at -> Timestamp,
    }
}

phi_table! {
    /// Values recorded as legacy ciphertexts before phi's writers ran, in
    /// the application's database: the only ones the backfill decodes
    /// ([`legacy`](crate::legacy)).
    phi_legacy_values (table_name, column_name, row_key) {
        table_name -> Varchar,
        column_name -> Varchar,
        row_key -> Varchar,
        owner_id -> Varchar,
        stored -> Binary,
        recorded_at -> Timestamp,
    }
}

phi_table! {
    /// Rotation jobs shared by several workers: one row per (job, owner),
    /// `state` `pending` or `done`, claimed by one worker until
    /// `claimed_until` ([`rotate_all`](crate::lifecycle::rotate_all)).
    phi_rotation_claims (job_id, owner_id) {
        job_id -> Varchar,
        owner_id -> Varchar,
        state -> Varchar,
        new_version -> Nullable<BigInt>,
        claimed_by -> Nullable<Varchar>,
        claimed_until -> Nullable<Timestamp>,
        updated_at -> Timestamp,
    }
}

phi_table! {
    /// Values sealed per data key version, added by every process that
    /// seals ([`KeyStore::add_seal_counts`](crate::KeyStore::add_seal_counts)):
    /// may run behind, never backwards.
    phi_seal_counts (owner_id, version) {
        owner_id -> Varchar,
        version -> BigInt,
        seals -> BigInt,
        updated_at -> Timestamp,
    }
}

phi_table! {
    /// The access log's chains: the id and hash of each chain's last
    /// batch ([`access_log`](crate::access_log)).
    phi_access_chains (chain) {
        chain -> Varchar,
        head -> BigInt,
        head_hash -> Binary,
        updated_at -> Timestamp,
    }
}

phi_table! {
    /// The access log's batches: each chained to the one before by a keyed
    /// hash ([`access_log`](crate::access_log)).
    phi_access_batches (chain, id) {
        chain -> Varchar,
        id -> BigInt,
        kind -> Varchar,
        written_at -> Timestamp,
        last_at -> Timestamp,
        records -> BigInt,
        key_version -> BigInt,
        prev_hash -> Binary,
        hash -> Binary,
        pruned_before -> Nullable<BigInt>,
        pruned_hash -> Nullable<Binary>,
        detail -> Nullable<Text>,
    }
}

phi_table! {
    /// The access log: one row per (accessor, operation, owner, table,
    /// row), fields named, never their values.
    phi_access_log (chain, batch, seq) {
        chain -> Varchar,
        batch -> BigInt,
        seq -> Integer,
        occurred_at -> Timestamp,
        user_id -> Varchar,
        purpose -> Varchar,
        request_id -> Nullable<Varchar>,
        op -> Varchar,
        owner_id -> Varchar,
        table_name -> Varchar,
        row_key -> Nullable<Varchar>,
        fields -> Text,
    }
}

// The access log's subqueries over its batches (what
// `diesel::allow_tables_to_appear_in_same_query!` gives, without joins).
impl diesel::query_source::TableNotEqual<phi_access_batches::table> for phi_access_log::table {}
impl diesel::query_source::TableNotEqual<phi_access_log::table> for phi_access_batches::table {}

/// `+` and `-` on phi's counters (`BigInt` columns), as `diesel::table!`
/// gives every numeric column.
macro_rules! counters {
    ($($table:ident :: $column:ident),+) => {$(
        impl<Rhs> std::ops::Add<Rhs> for $table::$column
        where
            Rhs: diesel::expression::AsExpression<diesel::sql_types::BigInt>,
        {
            type Output = diesel::internal::table_macro::ops::Add<Self, Rhs::Expression>;

            fn add(self, rhs: Rhs) -> Self::Output {
                diesel::internal::table_macro::ops::Add::new(self, rhs.as_expression())
            }
        }

        impl<Rhs> std::ops::Sub<Rhs> for $table::$column
        where
            Rhs: diesel::expression::AsExpression<diesel::sql_types::BigInt>,
        {
            type Output = diesel::internal::table_macro::ops::Sub<Self, Rhs::Expression>;

            fn sub(self, rhs: Rhs) -> Self::Output {
                diesel::internal::table_macro::ops::Sub::new(self, rhs.as_expression())
            }
        }
    )+};
}

counters!(
    phi_key_feed::head,
    phi_seal_counts::seals,
    phi_access_chains::head
);
