//! Runs a heavy core call off the GIL while the calling thread reports progress and watches
//! for Ctrl-C: Python only delivers signals to the main thread, and only while it holds the GIL.

use std::time::Duration;

use modelkin_core::{Progress, Result};
use pyo3::prelude::*;

const POLL_STEP: Duration = Duration::from_millis(2);
const POLL_STEPS: u32 = 25;

/// Runs `work` on a worker thread. `on_progress(done_bytes, total_bytes)` is called every 50 ms;
/// a pending signal (KeyboardInterrupt) or an exception from the callback cancels the work.
pub fn run_watched<T: Send>(
    py: Python<'_>,
    on_progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce(&Progress) -> Result<T> + Send,
) -> PyResult<T> {
    let progress = Progress::default();
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| work(&progress));
        loop {
            let finished = py.detach(|| {
                for _ in 0..POLL_STEPS {
                    if worker.is_finished() {
                        return true;
                    }
                    std::thread::sleep(POLL_STEP);
                }
                worker.is_finished()
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
            if finished {
                break;
            }
        }
        match py.detach(|| worker.join()) {
            Ok(result) => result.map_err(crate::errors::to_py),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
