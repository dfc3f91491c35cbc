//! `phi`: administration of phi's data keys: coverage, generation, rotation,
//! re-seal, retirement, KEK rewrap, crypto-shredding and the audit trail.
//!
//! Run `phi --help` for the commands. The database comes from
//! `--database-url` or `DATABASE_URL` (`sqlite://file.db` or a file path,
//! `mysql://…`, `postgres://…`); the master key from `PHI_MASTER_KEY` or
//! `PHI_MASTER_KEY_FILE`. The commands are [`phi::cli::App`]'s, which an
//! application also runs from a binary of its own.

fn main() -> std::process::ExitCode {
    phi::cli::App::standalone().run()
}
