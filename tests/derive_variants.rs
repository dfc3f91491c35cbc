//! Variants of `#[derive(PhiRecord)]` models beyond the clinical case of the
//! backend suite: integer owners and row keys, pinned scopes, renamed
//! columns, no encrypted flag. SQLite in memory; what differs between
//! backends is covered by `tests/backends.rs`.
#![cfg(feature = "sqlite")]

mod common;

use diesel::prelude::*;
use phi::{Error, Keyring, MemoryKeyStore, PhiRecord, Rollout};

mod schema {
    //! The test table.
    #![allow(missing_docs)]
    diesel::table! {
        notes (id) {
            id -> BigInt,
            tenant_id -> BigInt,
            body -> Binary,
            pages -> Nullable<Binary>,
        }
    }
}
use schema::notes;

/// Integer owner and row key, a pinned scope on a renamed column, no flag.
#[derive(PhiRecord, Clone, PartialEq)]
#[phi(table = notes, crate = phi, debug)]
struct Note {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    tenant_id: i64,
    #[phi(encrypt, scope = "notes.body_v1")]
    #[diesel(column_name = body)]
    text: String,
    #[phi(encrypt)]
    pages: Option<i32>,
}

fn setup() -> (SqliteConnection, Keyring) {
    let mut conn = SqliteConnection::establish(":memory:").expect("sqlite");
    diesel::sql_query("CREATE TABLE notes (id BIGINT PRIMARY KEY, tenant_id BIGINT NOT NULL, body BLOB NOT NULL, pages BLOB)")
        .execute(&mut conn)
        .expect("table");
    let keyring = Keyring::builder(
        std::sync::Arc::new(MemoryKeyStore::new()),
        common::local_kek(),
    )
    .build()
    .expect("keyring");
    (conn, keyring)
}

fn note(id: i64, tenant: i64, text: &str) -> Note {
    Note {
        id,
        tenant_id: tenant,
        text: text.into(),
        pages: Some(3),
    }
}

#[test]
fn integer_owner_and_row_key_with_a_pinned_scope_round_trip() {
    let (mut conn, keyring) = setup();
    let notes = vec![
        note(1, 42, "follow-up in two weeks"),
        note(2, 43, "allergic to latex"),
    ];
    diesel::insert_into(notes::table)
        .values(&Note::seal_all(&notes, &keyring).expect("seal"))
        .execute(&mut conn)
        .expect("insert");
    let loaded = Note::load(notes::table.order(notes::id), &mut conn, &keyring).expect("load");
    assert_eq!(loaded, notes);
    // The owner id of an integer owner is its decimal text.
    assert_eq!(
        keyring.keys_for_open("42").expect("keys").current_version(),
        Some(1)
    );

    // The pinned scope is what the value is bound to: opening it under the
    // column's default scope fails, under the pinned one succeeds.
    let raw: Vec<u8> = notes::table
        .find(1)
        .select(notes::body)
        .first(&mut conn)
        .expect("raw");
    let sealed = phi::Encrypted::<String>::from_bytes(raw);
    let err = keyring
        .open(sealed.clone(), "42", "notes.body", &1i64.to_be_bytes())
        .expect_err("default scope");
    assert!(matches!(err, Error::Decrypt { .. }));
    let text: String = keyring
        .open(sealed, "42", "notes.body_v1", &1i64.to_be_bytes())
        .expect("pinned scope");
    assert_eq!(text, "follow-up in two weeks");
}

#[test]
fn a_model_without_a_flag_is_sealed_whatever_the_rollout_says() {
    let (mut conn, keyring) = setup();
    keyring.set_rollout(Rollout::Nobody);
    let sealed = note(7, 42, "no plaintext").seal(&keyring).expect("seal");
    diesel::insert_into(notes::table)
        .values(&sealed)
        .execute(&mut conn)
        .expect("insert");
    let raw: Vec<u8> = notes::table
        .find(7)
        .select(notes::body)
        .first(&mut conn)
        .expect("raw");
    assert_eq!(&raw[..2], &[0xF1, 0x01]);
}

#[test]
fn a_row_moved_to_another_id_fails_naming_the_pinned_scope() {
    let (mut conn, keyring) = setup();
    diesel::insert_into(notes::table)
        .values(&note(1, 42, "post-op note").seal(&keyring).expect("seal"))
        .execute(&mut conn)
        .expect("insert");
    diesel::update(notes::table.find(1))
        .set(notes::id.eq(9))
        .execute(&mut conn)
        .expect("move");
    let err = Note::load(notes::table, &mut conn, &keyring).expect_err("moved row");
    let message = err.to_string();
    assert!(
        message.contains("notes.body_v1") && message.contains("\"42\""),
        "{message}"
    );
    assert!(!message.contains("post-op"), "{message}");
}

#[test]
fn changes_of_an_unchanged_model_are_empty_and_owner_changes_reseal_everything() {
    let (_conn, keyring) = setup();
    let old = note(1, 42, "text");
    assert!(old.changes(&old, &keyring).expect("changes").is_empty());
    let mut moved = old.clone();
    moved.tenant_id = 43;
    let changes = moved.changes(&old, &keyring).expect("changes");
    assert_eq!(changes.tenant_id, Some(43));
    assert!(
        changes.text.is_some() && changes.pages.is_some(),
        "a new owner re-seals every field"
    );
}

/// The table named by Diesel's own attribute only.
#[derive(PhiRecord, Clone, PartialEq)]
#[phi(crate = phi)]
#[diesel(table_name = notes)]
struct DieselNamed {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    tenant_id: i64,
    #[phi(encrypt, scope = "notes.body_v1")]
    body: String,
    #[phi(encrypt)]
    pages: Option<i32>,
}

/// The table named by both attributes, agreeing.
#[derive(PhiRecord, Clone, PartialEq)]
#[phi(table = schema::notes, crate = phi)]
#[diesel(table_name = schema::notes, primary_key(id))]
struct BothNamed {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    tenant_id: i64,
    #[phi(encrypt, scope = "notes.body_v1")]
    body: String,
    #[phi(encrypt)]
    pages: Option<i32>,
}

#[test]
fn the_table_is_read_from_diesels_table_name() {
    let (mut conn, keyring) = setup();
    assert_eq!(<DieselNamed as PhiRecord>::TABLE, "notes");
    assert_eq!(<BothNamed as PhiRecord>::TABLE, "notes");
    let one = DieselNamed {
        id: 1,
        tenant_id: 42,
        body: "follow-up".into(),
        pages: None,
    };
    assert_eq!(one.insert(&keyring, &mut conn).expect("insert"), 1);
    let two = BothNamed {
        id: 2,
        tenant_id: 42,
        body: "latex".into(),
        pages: Some(1),
    };
    assert_eq!(
        BothNamed::insert_all(std::slice::from_ref(&two), &keyring, &mut conn).expect("insert_all"),
        1
    );
    // The same rows, read through every model of the table.
    let loaded = Note::load(notes::table.order(notes::id), &mut conn, &keyring).expect("load");
    assert_eq!(
        loaded,
        vec![
            note_with(1, 42, "follow-up", None),
            note_with(2, 42, "latex", Some(1))
        ]
    );
    assert!(
        DieselNamed::load_first(notes::table.find(1), &mut conn, &keyring).expect("first") == one
    );
    assert!(
        BothNamed::load_first(notes::table.find(2), &mut conn, &keyring).expect("first") == two
    );
}

fn note_with(id: i64, tenant: i64, text: &str, pages: Option<i32>) -> Note {
    Note {
        id,
        tenant_id: tenant,
        text: text.into(),
        pages,
    }
}
