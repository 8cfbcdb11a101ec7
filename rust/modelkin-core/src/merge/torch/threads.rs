//! The thread count torch's reductions split over. Its own file because the float32 sums, the
//! float32 angles and several methods read it, and the angles' library is loaded from the job:
//! beside the sums it would close a circle (job -> angles -> sums -> sources -> job).

/// The intra-op thread count torch starts with: `OMP_NUM_THREADS`, else `MKL_NUM_THREADS`, else
/// the physical cores.
pub(crate) fn torch_threads() -> usize {
    ["OMP_NUM_THREADS", "MKL_NUM_THREADS"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.trim().parse::<usize>().ok().filter(|&n| n > 0))
        .unwrap_or_else(num_cpus::get_physical)
}
