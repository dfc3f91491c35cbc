//! Random nonces, fast and fork-safe.
//!
//! A `getrandom` system call costs about as much as sealing five small
//! values, so each thread keeps a ChaCha12 generator seeded from the
//! operating system and reseeded every 65,536 nonces. A forked child inherits
//! its parent's generator state and would replay the parent's nonce stream,
//! so every entry into [`with_nonces`] asks a fork detector first and reseeds
//! in a child:
//!
//! - on Unix, a `pthread_atfork` child handler bumps a counter (the
//!   `forkguard` crate): the check is one atomic load;
//! - where no handler can be registered, the process id is compared (one
//!   system call).
//!
//! Batch operations enter once per batch.

use std::cell::RefCell;

use chacha20::ChaCha12Rng;
use chacha20::rand_core::{Rng as _, SeedableRng};

use crate::envelope::NONCE_LEN;

const RESEED_EVERY: u32 = 1 << 16;

/// Tells whether the process forked since the generator was seeded.
enum ForkCheck {
    #[cfg(unix)]
    Atfork(forkguard::atfork::Guard),
    Pid(u32),
}

impl ForkCheck {
    fn new() -> Self {
        #[cfg(unix)]
        if let Ok(guard) = forkguard::atfork::Guard::try_new() {
            return ForkCheck::Atfork(guard);
        }
        ForkCheck::Pid(std::process::id())
    }

    fn forked(&mut self) -> bool {
        match self {
            #[cfg(unix)]
            ForkCheck::Atfork(guard) => guard.detected_fork(),
            ForkCheck::Pid(pid) => *pid != std::process::id(),
        }
    }
}

struct ThreadRng {
    rng: ChaCha12Rng,
    fork: ForkCheck,
    remaining: u32,
}

thread_local! {
    static RNG: RefCell<Option<ThreadRng>> = const { RefCell::new(None) };
}

/// Draws nonces; obtained from [`with_nonces`].
pub(crate) struct Nonces<'a> {
    state: &'a mut ThreadRng,
}

impl<'a> Nonces<'a> {
    /// A handle on the same generator, for the span of a shorter borrow.
    pub(crate) fn reborrow<'b>(this: &'b mut Nonces<'a>) -> Nonces<'b> {
        Nonces { state: this.state }
    }

    /// The next nonce. Reseeds from the OS when the stream is used up.
    pub(crate) fn next(&mut self) -> Result<[u8; NONCE_LEN], getrandom::Error> {
        if self.state.remaining == 0 {
            *self.state = ThreadRng::seeded()?;
        }
        self.state.remaining -= 1;
        let mut nonce = [0u8; NONCE_LEN];
        self.state.rng.fill_bytes(&mut nonce);
        Ok(nonce)
    }
}

impl ThreadRng {
    fn seeded() -> Result<Self, getrandom::Error> {
        // The detector is armed before the seed is drawn, so a fork in
        // between is seen at the next entry.
        let fork = ForkCheck::new();
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        let rng = ChaCha12Rng::from_seed(seed);
        zeroize::Zeroize::zeroize(&mut seed);
        Ok(ThreadRng {
            rng,
            fork,
            remaining: RESEED_EVERY,
        })
    }
}

/// Runs `f` with this thread's nonce generator, reseeding it first if the
/// process forked since it was seeded.
///
/// An entry nested in another on the same thread (a sealer inside a sealer,
/// a value whose encoding seals) finds the thread's generator in use; it
/// draws from a generator of its own, seeded from the OS for that entry.
pub(crate) fn with_nonces<R>(f: impl FnOnce(&mut Nonces<'_>) -> R) -> Result<R, getrandom::Error> {
    RNG.with(|cell| match cell.try_borrow_mut() {
        Ok(mut slot) => {
            if slot.as_mut().is_some_and(|state| state.fork.forked()) {
                *slot = None;
            }
            let state = match slot.as_mut() {
                Some(state) => state,
                None => slot.insert(ThreadRng::seeded()?),
            };
            Ok(f(&mut Nonces { state }))
        }
        Err(_) => {
            let mut state = ThreadRng::seeded()?;
            Ok(f(&mut Nonces { state: &mut state }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn nonces_do_not_repeat_across_reseeds() {
        let mut seen = HashSet::new();
        with_nonces(|n| {
            for _ in 0..(RESEED_EVERY as usize + 1000) {
                assert!(seen.insert(n.next().expect("nonce")));
            }
        })
        .expect("rng");
    }

    #[test]
    fn a_detected_fork_reseeds_before_the_next_nonce() {
        let first = with_nonces(|n| n.next().expect("nonce")).expect("rng");
        // Pretend the generator was inherited from a parent process: its
        // detector fires (another pid) and its stream is a known one.
        RNG.with(|cell| {
            let mut slot = cell.borrow_mut();
            let state = slot.as_mut().expect("seeded");
            state.fork = ForkCheck::Pid(std::process::id().wrapping_add(1));
            state.rng = ChaCha12Rng::from_seed([7; 32]);
        });
        let mut replay = ChaCha12Rng::from_seed([7; 32]);
        let mut would_be = [0u8; NONCE_LEN];
        replay.fill_bytes(&mut would_be);
        let after = with_nonces(|n| n.next().expect("nonce")).expect("rng");
        assert_ne!(after, would_be, "the inherited stream must not be used");
        assert_ne!(after, first);
    }

    #[test]
    fn a_nested_entry_draws_from_its_own_generator() {
        let (outer, inner, after) = with_nonces(|outer| {
            let first = outer.next().expect("nonce");
            let inner: Vec<_> =
                with_nonces(|inner| (0..100).map(|_| inner.next().expect("nonce")).collect())
                    .expect("a nested entry is served");
            (first, inner, outer.next().expect("nonce"))
        })
        .expect("rng");
        let mut seen = HashSet::from([outer, after]);
        assert_eq!(seen.len(), 2);
        for nonce in inner {
            assert!(seen.insert(nonce), "no nonce repeats across generators");
        }
        // The thread's generator is free again: the next entry uses it.
        RNG.with(|cell| assert!(cell.try_borrow_mut().is_ok()));
        with_nonces(|n| assert!(seen.insert(n.next().expect("nonce")))).expect("rng");
    }

    #[cfg(unix)]
    #[test]
    fn the_atfork_detector_is_in_use_on_unix() {
        assert!(matches!(ForkCheck::new(), ForkCheck::Atfork(_)));
        let mut check = ForkCheck::new();
        assert!(!check.forked(), "no fork happened");
    }
}
