//! [`IntoShared`]: a value or an `Arc` of it, wherever phi keeps a shared
//! trait object (a key store, a KEK, an access-log store).

use std::sync::Arc;

/// A value phi can hold as a shared `Arc<T>`, `T` a trait object such as
/// `dyn KeyStore` or `dyn KeyEncryptionKey`: the implementing value itself
/// (moved into a new `Arc`), an `Arc` of it, or an `Arc<T>` already.
///
/// Builders taking a store or a KEK accept any of the three, so that
/// `Keyring::builder(store, kek)` and
/// `Keyring::builder(Arc::new(store), Arc::new(kek))` both compile:
///
/// ```
/// use std::sync::Arc;
/// use phi_types::{KeyBytes, KeyEncryptionKey, KeyStore, Keyring, LocalKek, MemoryKeyStore};
///
/// let master = KeyBytes::new([7; 32]);
/// // By value.
/// let _ = Keyring::builder(MemoryKeyStore::new(), LocalKek::new("local-1", &master));
/// // As an Arc of the concrete type.
/// let _ = Keyring::builder(Arc::new(MemoryKeyStore::new()), Arc::new(LocalKek::new("local-1", &master)));
/// // As a trait object.
/// let store: Arc<dyn KeyStore> = Arc::new(MemoryKeyStore::new());
/// let kek: Arc<dyn KeyEncryptionKey> = Arc::new(LocalKek::new("local-1", &master));
/// let _ = Keyring::builder(store, kek);
/// ```
pub trait IntoShared<T: ?Sized> {
    /// The value as a shared `Arc<T>`.
    fn into_shared(self) -> Arc<T>;
}

/// Implements [`IntoShared<dyn $trait>`] for every sized implementation of
/// `$trait`, for an `Arc` of one, and for `Arc<dyn $trait>`.
macro_rules! into_shared {
    ($trait:path) => {
        impl<S: $trait + 'static> $crate::shared::IntoShared<dyn $trait> for S {
            fn into_shared(self) -> ::std::sync::Arc<dyn $trait> {
                ::std::sync::Arc::new(self)
            }
        }

        impl<S: $trait + 'static> $crate::shared::IntoShared<dyn $trait> for ::std::sync::Arc<S> {
            fn into_shared(self) -> ::std::sync::Arc<dyn $trait> {
                self
            }
        }

        impl $crate::shared::IntoShared<dyn $trait> for ::std::sync::Arc<dyn $trait> {
            fn into_shared(self) -> ::std::sync::Arc<dyn $trait> {
                self
            }
        }
    };
}
pub(crate) use into_shared;
