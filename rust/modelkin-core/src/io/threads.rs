//! Worker threads: one rayon pool per thread count, built on first use and kept for the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::ThreadPool;

use crate::io::error::{Error, Result};

/// The pools built so far, by thread count. Building a pool starts and later joins its threads;
/// an evolution run merging hundreds of candidates from one process must not pay that per call.
static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();

/// The pool of `threads` workers, built once per process.
fn pool(threads: usize) -> Result<Arc<ThreadPool>> {
    let pools = POOLS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut pools = pools.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(pool) = pools.get(&threads) {
        return Ok(Arc::clone(pool));
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("modelkin-{threads}-{i}"))
            .build()
            .map_err(|e| Error::InvalidArgument(format!("cannot start {threads} threads: {e}")))?,
    );
    pools.insert(threads, Arc::clone(&pool));
    Ok(pool)
}

/// Runs `work` on the pool of `threads` workers, or on rayon's global pool (all cores) when 0.
pub(crate) fn with_threads<T: Send>(threads: usize, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    if threads == 0 {
        return work();
    }
    pool(threads)?.install(work)
}

/// Runs `work` on the pool of `threads` workers (rayon's global pool when 0) while `watch` runs on
/// the calling thread, and returns what `watch` returns once `work` has ended too. A caller that
/// must keep its own thread (Python's, to see Ctrl-C) hands the work over without starting a
/// thread per call, and the work then runs where it would have been installed anyway.
pub fn run_beside<'w, W>(
    threads: usize,
    work: impl FnOnce() + Send + 'w,
    watch: impl FnOnce() -> W,
) -> Result<W> {
    fn beside<'w, W>(
        scope: &rayon::Scope<'w>,
        work: impl FnOnce() + Send + 'w,
        watch: impl FnOnce() -> W,
    ) -> W {
        scope.spawn(|_| work());
        watch()
    }
    Ok(if threads == 0 {
        rayon::in_place_scope(|scope| beside(scope, work, watch))
    } else {
        pool(threads)?.in_place_scope(|scope| beside(scope, work, watch))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_per_thread_count_is_reused() {
        let a = pool(3).expect("pool");
        let b = pool(3).expect("pool");
        assert!(Arc::ptr_eq(&a, &b));
        let inside = with_threads(3, || Ok(rayon::current_num_threads())).expect("runs");
        assert_eq!(inside, 3);
    }

    #[test]
    fn work_beside_the_watcher_runs_on_the_pool() {
        let (sender, receiver) = std::sync::mpsc::channel();
        let caller = std::thread::current().id();
        let watched = run_beside(
            2,
            move || sender.send((std::thread::current().id(), rayon::current_num_threads())).expect("sends"),
            || receiver.recv().expect("the work reports"),
        )
        .expect("runs");
        assert_ne!(watched.0, caller);
        assert_eq!(watched.1, 2);
    }
}
