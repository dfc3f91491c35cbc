//! The README's quick start, as a crate of its own: it depends on the
//! published names only (`phi-types` and Diesel), as an application does.
//! CI checks that README.md shows exactly this program (from `use` on).

use std::sync::Arc;
use diesel::prelude::*;
use phi_types::{DieselKeyStore, Keyring, LocalKek, PhiRecord};

diesel::table! {
    notes (id) { id -> BigInt, author -> Text, body -> Binary, body_bidx -> Nullable<Binary> }
}

#[derive(PhiRecord)]
#[phi(table = notes)]
struct Note {
    #[phi(row_key)]
    id: i64,
    #[phi(owner)]
    author: String,
    #[phi(encrypt, blind_index = body_bidx)]
    body: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = "notes.db";
    let mut conn = SqliteConnection::establish(url)?;
    diesel::sql_query(
        "CREATE TABLE IF NOT EXISTS notes \
         (id BIGINT PRIMARY KEY, author TEXT NOT NULL, body BLOB NOT NULL, body_bidx BLOB)",
    )
    .execute(&mut conn)?;

    // phi's key tables live in the same database; the master key comes
    // from PHI_MASTER_KEY (base64, 32 bytes) or PHI_MASTER_KEY_FILE.
    let store = DieselKeyStore::<SqliteConnection>::connect(url)?;
    let kek = LocalKek::from_env("local-1")?;
    let keyring = Keyring::builder(Arc::new(store), Arc::new(kek)).build()?;

    let id = notes::table.count().get_result::<i64>(&mut conn)? + 1;
    let note = Note { id, author: "dr-smith".into(), body: "Jane Doe, born 1980-01-15".into() };
    diesel::insert_into(notes::table).values(&note.seal(&keyring)?).execute(&mut conn)?;

    let tags = Note::body_blind_index(&keyring, "dr-smith", &note.body)?;
    let found = Note::load(notes::table.filter(notes::body_bidx.eq_any(tags)), &mut conn, &keyring)?;
    let raw: Vec<u8> = notes::table.find(id).select(notes::body).first(&mut conn)?;
    println!("note {id}: {:?}, found by its body: {}", found[0].body, found.len());
    println!("stored: {} bytes, {:02x?}…", raw.len(), &raw[..8]);
    Ok(())
}
