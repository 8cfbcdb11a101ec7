//! Runs a heavy core call off the GIL while the calling thread reports progress and watches
//! for Ctrl-C: Python only delivers signals to the main thread, and only while it holds the GIL.

use std::sync::{mpsc, Mutex};
use std::time::Duration;

use modelkin_core::{Progress, Result};
use pyo3::prelude::*;

/// How often the calling thread reports progress and checks for Ctrl-C.
const POLL: Duration = Duration::from_millis(50);

/// Runs `work` on a worker thread. `on_progress(done_bytes, total_bytes)` is called every 50 ms;
/// a pending signal (KeyboardInterrupt) or an exception from the callback cancels the work. The
/// caller wakes the moment the work ends (a short merge does not wait out a polling step).
pub fn run_watched<T: Send>(
    py: Python<'_>,
    on_progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Progress) -> Result<T> + Send,
) -> PyResult<T> {
    let progress = Progress::default();
    let (done, finished) = mpsc::channel::<()>();
    // Behind a mutex only so that the wait can run off the GIL (a receiver is not Sync).
    let finished = Mutex::new(finished);
    let watched = &progress;
    std::thread::scope(|scope| {
        // `done` moves into the worker: if the work panics it is dropped, which also wakes us.
        let worker = scope.spawn(move || {
            let result = work(watched);
            let _ = done.send(());
            result
        });
        loop {
            let ended = py.detach(|| {
                let finished = finished.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                !matches!(finished.recv_timeout(POLL), Err(mpsc::RecvTimeoutError::Timeout))
            });
            let interrupted = py.check_signals().and_then(|()| match on_progress {
                Some(callback) => callback.call1((progress.done(), progress.total())).map(drop),
                None => Ok(()),
            });
            if let Err(error) = interrupted {
                progress.cancel();
                let _ = py.detach(|| worker.join());
                return Err(error);
            }
            if ended {
                break;
            }
        }
        match py.detach(|| worker.join()) {
            Ok(result) => result.map_err(crate::errors::to_py),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
