#![doc = include_str!("../guide/index.md")]
// The chapters are Markdown files beside this crate's sources, rendered by
// rustdoc (docs.rs) and doc-tested with the features their examples need;
// `cfg(doc)` renders every chapter whatever the features.

#[doc = include_str!("../guide/models.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod models {}

#[doc = include_str!("../guide/adopting.md")]
#[cfg(any(
    doc,
    all(feature = "derive", feature = "sqlite", feature = "legacy-fernet")
))]
pub mod adopting {}

#[doc = include_str!("../guide/keys.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod keys {}

#[doc = include_str!("../guide/rotation.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod rotation {}

#[doc = include_str!("../guide/access_log.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod access_log {}

#[doc = include_str!("../guide/own_cli.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite", feature = "cli")))]
pub mod own_cli {}

#[doc = include_str!("../guide/admin_http.md")]
#[cfg(any(
    doc,
    all(feature = "derive", feature = "sqlite", feature = "admin-http")
))]
pub mod admin_http {}

#[doc = include_str!("../guide/fleet.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod fleet {}

#[doc = include_str!("../guide/asynchronous.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite", feature = "async")))]
pub mod asynchronous {}

#[doc = include_str!("../guide/observability.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod observability {}

#[doc = include_str!("../guide/production.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite", feature = "aws-kms")))]
pub mod production {}

#[doc = include_str!("../guide/performance.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod performance {}

#[doc = include_str!("../guide/examples.md")]
#[cfg(any(doc, all(feature = "derive", feature = "sqlite")))]
pub mod examples {}
