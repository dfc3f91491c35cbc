//! The README's quick start, as a crate of its own: it depends on the
//! published names only (`phi-types` and Diesel), as an application does.
//! CI checks that README.md shows exactly this program (from `use` on).

use diesel::prelude::*;
use phi_types::{DieselKeyStore, Keyring, PhiRecord};

diesel::table! {
    notes (id) { id -> BigInt, author -> Text, body -> Binary, body_bidx -> Nullable<Binary> }
}

#[derive(PhiRecord)]
#[diesel(table_name = notes)]
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
    // A busy timeout and WAL: phi's own connections write to the same file.
    let mut conn = phi_types::sqlite::establish(url)?;
    diesel::sql_query(
        "CREATE TABLE IF NOT EXISTS notes \
         (id BIGINT PRIMARY KEY, author TEXT NOT NULL, body BLOB NOT NULL, body_bidx BLOB)",
    )
    .execute(&mut conn)?;

    // phi's key tables, created in the same database here (an application
    // adds them to its own migrations: `phi migrations write --dir migrations`).
    // The master key: PHI_MASTER_KEY (base64 of 32 bytes) or PHI_MASTER_KEY_FILE.
    let store = DieselKeyStore::<SqliteConnection>::builder(url)
        .run_migrations(true)
        .connect()?;
    let keyring = Keyring::from_env(store)?;

    let id = notes::table.count().get_result::<i64>(&mut conn)? + 1;
    let note = Note {
        id,
        author: "dr-smith".into(),
        body: "Jane Doe, born 1980-01-15".into(),
    };
    note.insert(&keyring, &mut conn)?;

    let same_body = Note::body_is(&keyring, "dr-smith", &note.body)?;
    let found = Note::load(notes::table.filter(same_body), &mut conn, &keyring)?;
    let raw: Vec<u8> = notes::table.find(id).select(notes::body).first(&mut conn)?;
    println!(
        "note {id}: {:?}, found by its body: {}",
        found[0].body,
        found.len()
    );
    println!("stored: {} bytes, {:02x?}…", raw.len(), &raw[..8]);
    Ok(())
}
