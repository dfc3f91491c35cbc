//! An application's own `phi` command: every key command, and the
//! migration jobs (`backfill`, `verify`, `decrypt-back`, `status`) of its
//! derived model, in ten lines of `main`.
//!
//! ```sh
//! DATABASE_URL=sqlite://notes.db cargo run --example own_cli -- migrations run
//! DATABASE_URL=sqlite://notes.db PHI_MASTER_KEY=… cargo run --example own_cli -- status
//! cargo run --example own_cli -- backfill --dry-run --format json
//! ```
//!
//! The application's table (`own_cli_notes` here) is the application's own:
//! created by its migrations, with rows written before phi (flag off).

use std::process::ExitCode;

use phi_types::cli::App;
use phi_types::{KeyringConfig, PhiRecord};

diesel::table! {
    /// The application's notes: the body sealed under its author's key.
    own_cli_notes (id) {
        /// The row key.
        id -> BigInt,
        /// The owner.
        author -> Text,
        /// Sealed (or, before the backfill, plain) text.
        body -> Binary,
        /// Whether the row is sealed.
        sealed -> Bool,
    }
}

/// A note as the application sees it.
#[derive(PhiRecord, Clone)]
#[phi(table = own_cli_notes, debug)]
#[diesel(primary_key(id))]
pub struct Note {
    /// The note's id.
    #[phi(row_key)]
    pub id: i64,
    /// Who wrote it.
    #[phi(owner)]
    pub author: String,
    /// What it says.
    #[phi(encrypt)]
    pub body: String,
    /// Whether the row is sealed.
    #[phi(encrypted_flag)]
    pub sealed: bool,
}

fn main() -> ExitCode {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://notes.db".into());
    // The KEK as PHI_KEK / PHI_KEK_ID / PHI_MASTER_KEY(_FILE) configure it;
    // built when a command needs it (`migrations run` does not).
    App::with_keyring(url, |url| {
        Ok(KeyringConfig::from_env()?
            .builder(phi_types::cli::key_store(url)?)?
            .actor("notes-admin")
            .build()?)
    })
    .name("notes-admin")
    .model::<Note>()
    .run()
}
