//! The cache's synchronisation: the standard library's and `dashmap`'s, or,
//! under `--cfg loom`, models of them that the loom checker schedules, so the
//! single-flight is checked on every interleaving (see `loom_model`).

#[cfg(not(loom))]
pub(super) use dashmap::DashMap;
#[cfg(not(loom))]
pub(super) use dashmap::mapref::entry::Entry;
#[cfg(not(loom))]
pub(super) use std::sync::{Condvar, Mutex};

#[cfg(loom)]
pub(super) use self::model::{DashMap, Entry};
#[cfg(loom)]
pub(super) use loom::sync::{Condvar, Mutex};

/// The part of `DashMap`'s API the cache uses, over one loom mutex.
///
/// `DashMap` makes each call, and each entry while it is held, atomic for
/// its key (it locks the key's shard); one lock for the whole map gives the
/// same per-key atomicity, which is all the cache relies on.
#[cfg(loom)]
mod model {
    use std::collections::HashMap;
    use std::ops::Deref;
    use std::sync::PoisonError;

    use loom::sync::{Mutex, MutexGuard};

    type Guard<'a, V> = MutexGuard<'a, HashMap<String, V>>;

    #[derive(Debug)]
    pub(crate) struct DashMap<K, V> {
        map: Mutex<HashMap<K, V>>,
    }

    impl<V: Clone> DashMap<String, V> {
        pub(crate) fn new() -> Self {
            DashMap {
                map: Mutex::new(HashMap::new()),
            }
        }

        fn lock(&self) -> Guard<'_, V> {
            self.map.lock().unwrap_or_else(PoisonError::into_inner)
        }

        pub(crate) fn get(&self, key: &str) -> Option<Ref<'_, V>> {
            let guard = self.lock();
            guard.contains_key(key).then(|| Ref {
                guard,
                key: key.to_owned(),
            })
        }

        pub(crate) fn entry(&self, key: String) -> Entry<'_, V> {
            let guard = self.lock();
            if guard.contains_key(&key) {
                Entry::Occupied(OccupiedEntry { guard, key })
            } else {
                Entry::Vacant(VacantEntry { guard, key })
            }
        }

        pub(crate) fn remove(&self, key: &str) -> Option<(String, V)> {
            self.lock().remove_entry(key)
        }

        pub(crate) fn remove_if(
            &self,
            key: &str,
            f: impl FnOnce(&String, &V) -> bool,
        ) -> Option<(String, V)> {
            let mut guard = self.lock();
            let (k, v) = guard.get_key_value(key)?;
            if f(k, v) {
                guard.remove_entry(key)
            } else {
                None
            }
        }

        pub(crate) fn clear(&self) {
            self.lock().clear();
        }

        pub(crate) fn len(&self) -> usize {
            self.lock().len()
        }

        /// A snapshot: `DashMap`'s iterator locks one shard at a time, so it
        /// is no more atomic than this.
        pub(crate) fn iter(&self) -> std::vec::IntoIter<RefMulti<V>> {
            self.lock()
                .iter()
                .map(|(key, value)| RefMulti {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect::<Vec<_>>()
                .into_iter()
        }
    }

    /// A value, its map locked.
    pub(crate) struct Ref<'a, V> {
        guard: Guard<'a, V>,
        key: String,
    }

    impl<V> Deref for Ref<'_, V> {
        type Target = V;
        fn deref(&self) -> &V {
            // Present: checked under the lock this guard holds.
            &self.guard[self.key.as_str()]
        }
    }

    pub(crate) struct RefMulti<V> {
        key: String,
        value: V,
    }

    impl<V> RefMulti<V> {
        pub(crate) fn key(&self) -> &String {
            &self.key
        }

        pub(crate) fn value(&self) -> &V {
            &self.value
        }
    }

    pub(crate) enum Entry<'a, V> {
        Occupied(OccupiedEntry<'a, V>),
        Vacant(VacantEntry<'a, V>),
    }

    pub(crate) struct OccupiedEntry<'a, V> {
        guard: Guard<'a, V>,
        key: String,
    }

    impl<V> OccupiedEntry<'_, V> {
        pub(crate) fn get(&self) -> &V {
            &self.guard[self.key.as_str()]
        }

        pub(crate) fn insert(&mut self, value: V) -> Option<V> {
            self.guard.insert(self.key.clone(), value)
        }

        pub(crate) fn remove(mut self) -> Option<V> {
            self.guard.remove(&self.key)
        }
    }

    pub(crate) struct VacantEntry<'a, V> {
        guard: Guard<'a, V>,
        key: String,
    }

    impl<V> VacantEntry<'_, V> {
        pub(crate) fn insert(mut self, value: V) {
            self.guard.insert(self.key, value);
        }
    }
}
