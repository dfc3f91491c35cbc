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

/// A job's progress callback, as its options hold it (`.progress(f)`):
/// none by default. Clones of the options report to the same callback. A
/// callback that starts another job with the same options is not called
/// from within itself (that report is skipped).
#[allow(clippy::type_complexity)] // a shared, mutable callback of the caller's
pub(crate) struct Callback<'a, P>(Option<std::rc::Rc<std::cell::RefCell<dyn FnMut(&P) + 'a>>>);

impl<'a, P> Callback<'a, P> {
    /// `f`, called with each report.
    pub(crate) fn new(f: impl FnMut(&P) + 'a) -> Self {
        Callback(Some(std::rc::Rc::new(std::cell::RefCell::new(f))))
    }

    /// Whether a callback is set.
    pub(crate) fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Reports `progress` to the callback, if any.
    pub(crate) fn call(&self, progress: &P) {
        if let Some(f) = &self.0
            && let Ok(mut f) = f.try_borrow_mut()
        {
            f(progress);
        }
    }
}

impl<P> Default for Callback<'_, P> {
    fn default() -> Self {
        Callback(None)
    }
}

impl<P> Clone for Callback<'_, P> {
    fn clone(&self) -> Self {
        Callback(self.0.clone())
    }
}

impl<P> std::fmt::Debug for Callback<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(<callback>)"
        } else {
            "None"
        })
    }
}
