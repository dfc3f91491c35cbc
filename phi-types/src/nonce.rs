//! Random nonces, fast and fork-safe.
//!
//! A `getrandom` system call costs about as much as sealing five small
//! values, so each thread keeps a ChaCha12 generator seeded from the
//! operating system and reseeded every 65,536 nonces. A forked child inherits
//! its parent's generator state and would replay the parent's nonce stream,
//! so every entry into [`with_nonces`] compares the process id with the one
//! the generator was seeded under and reseeds on a change. Batch operations
//! enter once per batch, so the process-id check is paid per call, not per
//! value.

use std::cell::RefCell;

use rand_chacha::ChaCha12Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::envelope::NONCE_LEN;

const RESEED_EVERY: u32 = 1 << 16;

struct ThreadRng {
    rng: ChaCha12Rng,
    pid: u32,
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
            *self.state = ThreadRng::seeded(self.state.pid)?;
        }
        self.state.remaining -= 1;
        let mut nonce = [0u8; NONCE_LEN];
        self.state.rng.fill_bytes(&mut nonce);
        Ok(nonce)
    }
}

impl ThreadRng {
    fn seeded(pid: u32) -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        let rng = ChaCha12Rng::from_seed(seed);
        zeroize::Zeroize::zeroize(&mut seed);
        Ok(ThreadRng {
            rng,
            pid,
            remaining: RESEED_EVERY,
        })
    }
}

/// Runs `f` with this thread's nonce generator, reseeding it first if the
/// process forked since it was seeded.
pub(crate) fn with_nonces<R>(f: impl FnOnce(&mut Nonces<'_>) -> R) -> Result<R, getrandom::Error> {
    let pid = std::process::id();
    RNG.with(|cell| {
        let mut slot = cell.borrow_mut();
        let state = match slot.as_mut() {
            Some(state) if state.pid == pid => state,
            _ => slot.insert(ThreadRng::seeded(pid)?),
        };
        Ok(f(&mut Nonces { state }))
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
    fn a_changed_pid_reseeds() {
        let first = with_nonces(|n| n.next().expect("nonce")).expect("rng");
        // Pretend the generator was seeded by a parent process.
        RNG.with(|cell| {
            let mut slot = cell.borrow_mut();
            let state = slot.as_mut().expect("seeded");
            state.pid = state.pid.wrapping_add(1);
            state.rng = ChaCha12Rng::from_seed([7; 32]);
        });
        let mut replay = ChaCha12Rng::from_seed([7; 32]);
        let mut would_be = [0u8; NONCE_LEN];
        replay.fill_bytes(&mut would_be);
        let after = with_nonces(|n| n.next().expect("nonce")).expect("rng");
        assert_ne!(after, would_be, "the inherited stream must not be used");
        assert_ne!(after, first);
    }
}
