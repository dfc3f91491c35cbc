//! The table description parser (`--table`, `PHI_TABLES`,
//! `ResealTable::parse`): a description or a configuration error, never a
//! panic; what parses is made of plain identifiers and prints back to a
//! description that parses to the same table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phi_types::lifecycle::{ColumnType, ResealTable};

fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ColumnType::from_name(spec);
    let table = match ResealTable::parse(spec) {
        Ok(table) => table,
        Err(e) => {
            assert!(matches!(e, phi_types::Error::Config(_)), "{e:?}");
            return;
        }
    };
    match table.table.split_once('.') {
        Some((schema, name)) => assert!(plain(schema) && plain(name), "{table:?}"),
        None => assert!(plain(&table.table), "{table:?}"),
    }
    assert!(plain(&table.owner_column), "{table:?}");
    if let Some(key) = &table.key_column {
        assert!(plain(key), "{table:?}");
    } else {
        assert_eq!(table.key_type, ColumnType::Text);
    }
    assert!(!table.columns.is_empty());
    for c in &table.columns {
        assert!(plain(&c.column), "{table:?}");
        assert!(!c.scope.is_empty(), "{table:?}");
        if let Some((index, _)) = &c.blind_index {
            assert!(plain(index), "{table:?}");
        }
    }
    let printed = table.to_string();
    let again = ResealTable::parse(&printed)
        .unwrap_or_else(|e| panic!("{spec:?} parses, prints as {printed:?}, which does not: {e}"));
    assert_eq!(again, table, "{spec:?} printed as {printed:?}");
});
