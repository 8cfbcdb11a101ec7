//! Progress and cancellation, shared between a running pass (kinship or merge) and its watcher.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::io::error::{Error, Result};

/// Shared between the pass and whoever watches it: bytes processed, and a stop flag.
#[derive(Debug, Default)]
pub struct Progress {
    pub(crate) done: AtomicU64,
    pub(crate) total: AtomicU64,
    cancelled: AtomicBool,
}

impl Progress {
    /// Bytes of tensor data processed so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes of tensor data the pass will process (known once it has planned).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Asks the pass to stop at the next chunk; it then returns [`Error::Cancelled`].
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}
