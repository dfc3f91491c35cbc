//! How owner ids appear in phi's tracing spans and log events.

use std::fmt;

use sha2::{Digest, Sha256};

/// How a keyring writes owner ids into its tracing spans and log events
/// ([`KeyringBuilder::owner_ids_in_telemetry`](crate::KeyringBuilder::owner_ids_in_telemetry)),
/// for deployments where the owner id is itself an identifier (a medical
/// record number, an e-mail address).
///
/// Only telemetry changes: errors returned to the application still name
/// the owner (the application decides what it logs of them), and the key
/// store's audit records keep the owner id in clear.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OwnerIdTelemetry {
    /// The first 8 bytes of the owner id's SHA-256, as `sha256:` and 16 hex
    /// digits. Unkeyed on purpose: every process and every deployment
    /// writes the same value for one owner, so logs of a fleet can still be
    /// joined by owner. The price is linkability: anyone holding the logs
    /// and a list of candidate ids (a range of record numbers, a list of
    /// e-mail addresses) can find which owner a line is about by hashing
    /// the candidates. It hides the id from a casual reader, not from a
    /// determined one; when that matters, use [`Omitted`](Self::Omitted).
    Hashed,
    /// The field is written as `<omitted>`: no owner can be told from the
    /// telemetry.
    Omitted,
    /// The owner id as it is (the default).
    #[default]
    Plain,
}

impl OwnerIdTelemetry {
    /// `owner` as this setting writes it.
    pub fn render(self, owner: &str) -> TelemetryOwner<'_> {
        TelemetryOwner { mode: self, owner }
    }
}

/// An owner id as an [`OwnerIdTelemetry`] setting writes it; from
/// [`OwnerIdTelemetry::render`]. Formats lazily, when a subscriber records
/// the field.
#[derive(Clone, Copy)]
pub struct TelemetryOwner<'a> {
    mode: OwnerIdTelemetry,
    owner: &'a str,
}

impl fmt::Debug for TelemetryOwner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for TelemetryOwner<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            OwnerIdTelemetry::Plain => f.write_str(self.owner),
            OwnerIdTelemetry::Omitted => f.write_str("<omitted>"),
            OwnerIdTelemetry::Hashed => {
                let digest = Sha256::digest(self.owner.as_bytes());
                f.write_str("sha256:")?;
                for byte in &digest[..8] {
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_plain_hashed_and_omitted() {
        assert_eq!(
            OwnerIdTelemetry::Plain.render("provider-17").to_string(),
            "provider-17"
        );
        assert_eq!(
            OwnerIdTelemetry::Omitted.render("provider-17").to_string(),
            "<omitted>"
        );
        // SHA-256("abc") = ba7816bf8f01cfea 414140de5dae2223 ...
        assert_eq!(
            OwnerIdTelemetry::Hashed.render("abc").to_string(),
            "sha256:ba7816bf8f01cfea"
        );
    }
}
