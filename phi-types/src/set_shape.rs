//! How each backend writes a set-based `UPDATE`: one statement that joins
//! a list of bound rows to the table, used by the key store's rewrap and
//! by the migration jobs.

/// How one backend's set-based `UPDATE` joins the rows it writes, one
/// statement per chunk of a batch instead of one per row.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetShape {
    /// PostgreSQL: `UPDATE t AS phi_t SET … FROM (VALUES (…), …) AS
    /// phi_v(phi_0, phi_1, …) WHERE …`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Values,
    /// SQLite (3.33 and later): the same `UPDATE … FROM (VALUES …)`, whose
    /// columns SQLite names `column1`, `column2`, … (it takes no column
    /// list after the alias).
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    SqliteValues,
    /// MySQL and MariaDB: `UPDATE t AS phi_t JOIN (SELECT ? AS phi_0, …
    /// UNION ALL SELECT …) AS phi_v ON … SET … WHERE …`. MariaDB's `VALUES`
    /// in a derived table names its columns after the first row's values,
    /// and MySQL's needs `ROW(…)`: a `UNION ALL` of `SELECT`s is read the
    /// same by both.
    #[cfg_attr(not(feature = "mysql"), allow(dead_code))]
    Join,
}

impl SetShape {
    /// The name of column `i` of the bound rows (`phi_v.<name>`).
    pub(crate) fn value_column(self, i: usize) -> String {
        match self {
            SetShape::SqliteValues => format!("column{}", i + 1),
            SetShape::Values | SetShape::Join => format!("phi_{i}"),
        }
    }
}
