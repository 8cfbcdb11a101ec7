//! Runs a heavy core call off the GIL while the calling thread reports progress and watches
//! for Ctrl-C: Python only delivers signals to the main thread, and only while it holds the GIL.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use modelkin_core::io::threads::run_beside;
use modelkin_core::{Progress, Result};
use pyo3::prelude::*;

/// How often the calling thread reports progress and checks for Ctrl-C.
const POLL: Duration = Duration::from_millis(50);

/// Runs `work` on the core's pool of `threads` workers (the one the work would run on anyway: no
/// thread is started per call). `on_progress(done_bytes, total_bytes)` is called every 50 ms; a
/// pending signal (KeyboardInterrupt) or an exception from the callback cancels the work. The
/// caller wakes the moment the work ends (a short merge does not wait out a polling step).
pub fn run_watched<T: Send>(
    py: Python<'_>,
    threads: usize,
    on_progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Progress) -> Result<T> + Send,
) -> PyResult<T> {
    let progress = Progress::default();
    let (done, finished) = mpsc::channel();
    // Behind a mutex only so that the wait can run off the GIL (a receiver is not Sync).
    let finished = Mutex::new(finished);
    let watched = &progress;
    let wait = |timeout: Option<Duration>| {
        py.detach(|| {
            let finished = finished.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match timeout {
                Some(timeout) => finished.recv_timeout(timeout).ok(),
                None => finished.recv().ok(),
            }
        })
    };
    let outcome = run_beside(
        threads,
        // A panic comes back over the channel, to be raised on the calling thread.
        move || {
            let _ = done.send(catch_unwind(AssertUnwindSafe(|| work(watched))));
        },
        || loop {
            let result = wait(Some(POLL));
            let interrupted = py.check_signals().and_then(|()| match on_progress {
                Some(callback) => callback.call1((progress.done(), progress.total())).map(drop),
                None => Ok(()),
            });
            if let Err(error) = interrupted {
                progress.cancel();
                // Wait for the work to stop off the GIL (the pool's scope would wait holding it).
                if result.is_none() {
                    let _ = wait(None);
                }
                return Err(error);
            }
            if let Some(result) = result {
                return Ok(result);
            }
        },
    )
    .map_err(crate::errors::to_py)??;
    match outcome {
        Ok(result) => result.map_err(crate::errors::to_py),
        Err(panic) => resume_unwind(panic),
    }
}
