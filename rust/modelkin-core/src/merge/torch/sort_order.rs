//! Where torch's CPU sort puts tied magnitudes.
//!
//! mergekit prunes by `torch.argsort(|δ|)` and keeps a run of ranks. Entries tied with the value
//! at a boundary rank are split by the order an unstable sort leaves them in, and on the CPU that
//! sort is libstdc++'s `std::sort` (introsort) over (value, index) pairs. This module replays that
//! algorithm step for step, but only where it matters: a sub-range that no boundary crosses keeps
//! its members whatever order it ends in, so it is never sorted further. What remains is a
//! quickselect towards each boundary, which costs a few passes over the entries instead of a sort.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use multiversion::multiversion;
use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::source::{map_magnitudes, Source};

/// Entry buffers kept from one tensor's replay to the next within a merge: a fresh buffer per
/// tensor and input would be mapped and zeroed by the kernel each time. At most `budget` bytes
/// of them are kept.
pub(crate) struct EntryPool {
    budget: u64,
    free: Mutex<Vec<Vec<u64>>>,
}

impl EntryPool {
    pub(crate) fn new(budget: u64) -> Self {
        EntryPool { budget, free: Mutex::new(Vec::new()) }
    }

    /// A buffer of `n` entries (their values are whatever the last user left).
    pub(super) fn take(&self, n: usize) -> Vec<u64> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        // The largest free buffer: the one least likely to grow.
        let largest = (0..free.len()).max_by_key(|&i| free[i].capacity());
        let mut buffer = largest.map(|i| free.swap_remove(i)).unwrap_or_default();
        drop(free);
        if buffer.len() < n {
            buffer.resize(n, 0);
        }
        buffer.truncate(n);
        buffer
    }

    pub(super) fn give(&self, buffer: Vec<u64>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buffer);
        free.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        let mut kept = 0u64;
        free.retain(|b| {
            kept += 8 * b.capacity() as u64;
            kept <= self.budget
        });
    }
}

/// The entries torch's CPU sort of |δ| = |input − base| (descending or ascending) puts at
/// positions `run` of `n`, as a bitmask over the tensor: every |δ| is packed with its index into a
/// buffer from `pool`, and the sort is replayed towards the run's ends ([`arrange`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sorted_run(
    base: &Source,
    input: &Source,
    n: usize,
    block: usize,
    descending: bool,
    run: Range<usize>,
    pool: &EntryPool,
    progress: &Progress,
) -> Result<Vec<u64>> {
    let mut entries = pool.take(n);
    let kept = mark_run(base, input, block, descending, run, &mut entries, progress);
    pool.give(entries);
    kept
}

fn mark_run(
    base: &Source,
    input: &Source,
    block: usize,
    descending: bool,
    run: Range<usize>,
    entries: &mut [u64],
    progress: &Progress,
) -> Result<Vec<u64>> {
    let n = entries.len();
    // Progress counts this input's own bytes, once for the packing and once for the replay (the
    // caller accounts for the base, read by every input's run).
    let bytes_per_element = input.dtype.size() as u64;
    entries.par_chunks_mut(block).enumerate().try_for_each(|(b, out)| -> Result<()> {
        progress.check()?;
        sort_entries(base, input, b * block, descending, out);
        progress.done.fetch_add(out.len() as u64 * bytes_per_element, Ordering::Relaxed);
        Ok(())
    })?;
    let mut boundaries: Vec<usize> = [run.start, run.end].into_iter().filter(|&b| 0 < b && b < n).collect();
    boundaries.dedup();
    arrange(entries, &boundaries);
    progress.check()?;
    // The replay stands in for the second histogram pass of the progress total.
    progress.done.fetch_add(n as u64 * bytes_per_element, Ordering::Relaxed);
    // Marks the smaller side: the run's entries on a clear mask, or the rest on a full one.
    let outside = run.start + (n - run.end);
    let (marked, fill) =
        if run.len() <= outside { (&entries[run.clone()], 0u64) } else { (&entries[..run.start], u64::MAX) };
    let mut kept = vec![fill; n.div_ceil(64)];
    let mut flip = |entries: &[u64]| {
        for &entry in entries {
            let element = entry as u32 as usize;
            kept[element / 64] ^= 1 << (element % 64);
        }
    };
    flip(marked);
    if fill != 0 {
        flip(&entries[run.end..]);
    }
    Ok(kept)
}

/// Packs |x − z| of elements `first..first + out.len()` (f32 bits, complemented when sorting
/// descending: descending order by |δ| is ascending order by its complement) with each index.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn sort_entries(base: &Source, input: &Source, first: usize, descending: bool, out: &mut [u64]) {
    let flip = if descending { u32::MAX } else { 0 };
    map_magnitudes(base, input, first, out, |e, bits| (u64::from(bits ^ flip) << 32) | (first + e) as u64);
}

/// Below this many elements introsort leaves a range to the final insertion sort.
const INSERTION_THRESHOLD: usize = 16;

/// Entries are `(key << 32) | index`; only the key (the upper half) is compared.
#[inline(always)]
fn key(entry: u64) -> u32 {
    (entry >> 32) as u32
}

#[inline(always)]
pub(super) fn less(a: u64, b: u64) -> bool {
    key(a) < key(b)
}

/// Rearranges `entries` so that, for every boundary `b` in `boundaries` (ascending), positions
/// `..b` hold the same entries as after libstdc++'s `std::sort(entries, less-by-key)`. Ranges
/// between boundaries are not ordered internally.
pub(super) fn arrange(entries: &mut [u64], boundaries: &[usize]) {
    let n = entries.len();
    if n < 2 {
        return;
    }
    let depth_limit = 2 * n.ilog2() as usize;
    introsort_loop(entries, 0, n, depth_limit, boundaries);
}

/// Whether some boundary (`boundaries` ascending) falls strictly inside `first..last`: only then
/// does the order within the range decide which entries lie before it.
fn crossed(first: usize, last: usize, boundaries: &[usize]) -> bool {
    let next = boundaries.partition_point(|&b| b <= first);
    boundaries.get(next).is_some_and(|&b| b < last)
}

fn introsort_loop(
    v: &mut [u64],
    first: usize,
    mut last: usize,
    mut depth_limit: usize,
    boundaries: &[usize],
) {
    while last - first > INSERTION_THRESHOLD {
        if !crossed(first, last, boundaries) {
            return;
        }
        if depth_limit == 0 {
            heap_sort(&mut v[first..last]);
            return;
        }
        depth_limit -= 1;
        let cut = partition_around_median(v, first, last);
        introsort_loop(v, cut, last, depth_limit, boundaries);
        last = cut;
    }
    // std::sort's final insertion sort never moves an entry out of the leaf range it ends in (the
    // partitions already order the leaves), and within a leaf it is stable.
    if crossed(first, last, boundaries) {
        insertion_sort(&mut v[first..last]);
    }
}

/// `std::__unguarded_partition_pivot`: the median of (first + 1, middle, last − 1) moved to
/// `first`, then Hoare's partition of `first + 1..last` around it.
pub(super) fn partition_around_median(v: &mut [u64], first: usize, last: usize) -> usize {
    let middle = first + (last - first) / 2;
    let (a, b, c) = (first + 1, middle, last - 1);
    let median = if less(v[a], v[b]) {
        if less(v[b], v[c]) {
            b
        } else if less(v[a], v[c]) {
            c
        } else {
            a
        }
    } else if less(v[a], v[c]) {
        a
    } else if less(v[b], v[c]) {
        c
    } else {
        b
    };
    v.swap(first, median);
    hoare_partition(v, first + 1, last, v[first])
}

/// Entries per block of [`hoare_partition`]'s branch-free scan.
const BLOCK: usize = 64;

/// libstdc++'s `std::__unguarded_partition` of `first..last` around `pivot`, with the same swaps
/// in the same order, but without its unpredictable branches. Hoare's loop swaps the i-th entry
/// (from the left) not less than the pivot with the i-th entry (from the right) not greater than
/// it, until the two scans cross. Here both scans mark those entries 64 at a time in bitmasks and
/// the swaps pair them off; the few entries left where the scans meet go through the loop itself,
/// resumed from the state the swaps so far leave it in (entries between the last swapped pair
/// have not moved).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn hoare_partition(v: &mut [u64], first: usize, last: usize, pivot: u64) -> usize {
    let pivot_key = key(pivot);
    // After the last swap (l, r), Hoare's loop resumes with lo = l + 1 and hi = r.
    let (mut lo, mut hi) = (first, last);
    // Scanned regions: left ..left_end, right right_start..; marks of the latest block of each.
    let (mut left_end, mut right_start) = (first, last);
    let (mut left_marks, mut right_marks) = (0u64, 0u64);
    let (mut left_block, mut right_block) = (first, last);
    loop {
        if left_marks == 0 {
            if right_start - left_end < BLOCK {
                break;
            }
            left_block = left_end;
            prefetch(v, left_block + PREFETCH_BLOCKS * BLOCK);
            // key(e) ≥ key(pivot) ⇔ e ≥ key(pivot)·2³² (the index sits in the low half).
            let at_least = u64::from(pivot_key) << 32;
            left_marks = marks(&v[left_block..left_block + BLOCK], |e| e >= at_least);
            left_end += BLOCK;
        }
        if right_marks == 0 {
            if right_start - left_end < BLOCK {
                break;
            }
            right_block = right_start;
            if let Some(ahead) = right_block.checked_sub((PREFETCH_BLOCKS + 1) * BLOCK) {
                prefetch(v, ahead);
            }
            // Bit j marks position right_block − 1 − j, so lower bits are further right.
            let at_most = (u64::from(pivot_key) << 32) | u64::from(u32::MAX);
            right_marks = marks(&v[right_block - BLOCK..right_block], |e| e <= at_most).reverse_bits();
            right_start -= BLOCK;
        }
        while left_marks != 0 && right_marks != 0 {
            let l = left_block + left_marks.trailing_zeros() as usize;
            let r = right_block - 1 - right_marks.trailing_zeros() as usize;
            left_marks &= left_marks - 1;
            right_marks &= right_marks - 1;
            v.swap(l, r);
            (lo, hi) = (l + 1, r);
        }
    }
    hoare_loop(v, lo, hi, pivot)
}

/// How many blocks ahead of each scan [`prefetch`] asks for: the right scan walks memory
/// backwards, which the hardware prefetcher follows late (the profile showed a third of the
/// partition's time stalled on its loads).
const PREFETCH_BLOCKS: usize = 8;

/// Asks the cache for the block of entries starting at `at` (nothing past the slice's end).
#[inline(always)]
fn prefetch(v: &[u64], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at + BLOCK <= v.len() {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // Eight entries per 64-byte line.
        for line in (at..at + BLOCK).step_by(8) {
            // SAFETY: `line` is within `v` (checked above); prefetching never faults anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(v.as_ptr().add(line).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, at);
}

/// Hoare's loop as libstdc++ writes it, from the state (lo, hi) where the scans resume.
fn hoare_loop(v: &mut [u64], mut lo: usize, mut hi: usize, pivot: u64) -> usize {
    loop {
        while less(v[lo], pivot) {
            lo += 1;
        }
        hi -= 1;
        while less(pivot, v[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        v.swap(lo, hi);
        lo += 1;
    }
}

/// Bit j set when `test(block[j])`, for a block of [`BLOCK`] entries; eight at a time, which the
/// compiler turns into vector compares.
#[inline(always)]
fn marks(block: &[u64], test: impl Fn(u64) -> bool) -> u64 {
    block.chunks_exact(8).enumerate().fold(0u64, |m, (c, lanes)| {
        let byte = (0..8).fold(0u8, |b, j| b | (u8::from(test(lanes[j])) << j));
        m | (u64::from(byte) << (8 * c))
    })
}

/// `std::__insertion_sort` (stable).
pub(super) fn insertion_sort(v: &mut [u64]) {
    for i in 1..v.len() {
        let value = v[i];
        let mut j = i;
        while j > 0 && less(value, v[j - 1]) {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = value;
    }
}

/// `std::__partial_sort(first, last, last)`: libstdc++'s make_heap then sort_heap, the depth-limit
/// fallback of introsort.
fn heap_sort(v: &mut [u64]) {
    let len = v.len();
    if len < 2 {
        return;
    }
    make_heap(v);
    let mut last = len;
    while last > 1 {
        last -= 1;
        let value = v[last];
        v[last] = v[0];
        adjust_heap(&mut v[..last], 0, last, value);
    }
}

/// `std::__make_heap`.
pub(super) fn make_heap(v: &mut [u64]) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[parent];
        adjust_heap(v, parent, len, value);
        if parent == 0 {
            break;
        }
        parent -= 1;
    }
}

/// `std::__adjust_heap` followed by `std::__push_heap`, exactly as libstdc++ moves the hole.
pub(super) fn adjust_heap(v: &mut [u64], mut hole: usize, len: usize, value: u64) {
    let top = hole;
    let mut child = hole;
    while child < (len - 1) / 2 {
        child = 2 * (child + 1);
        if less(v[child], v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child];
        hole = child;
    }
    if len.is_multiple_of(2) && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    while hole > top {
        let parent = (hole - 1) / 2;
        if !less(v[parent], value) {
            break;
        }
        v[hole] = v[parent];
        hole = parent;
    }
    v[hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(keys: &[u32]) -> Vec<u64> {
        keys.iter().enumerate().map(|(i, &k)| (u64::from(k) << 32) | i as u64).collect()
    }

    /// `n` pseudo-random keys below `levels` (many ties), from a linear congruential generator.
    fn random_keys(state: &mut u64, n: usize, levels: u64) -> Vec<u32> {
        (0..n)
            .map(|_| {
                *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((*state >> 33) % levels) as u32
            })
            .collect()
    }

    /// A full libstdc++ std::sort replay (every range sorted), to check the pruned one against.
    fn full_sort(v: &mut [u64]) {
        let n = v.len();
        let all: Vec<usize> = (1..n).collect();
        arrange(v, &all);
    }

    #[test]
    fn pruned_replay_places_the_same_entries_as_the_full_one() {
        let mut state = 7u64;
        for trial in 0..200 {
            let n = 1 + (trial * 37) % 3000;
            let levels = 1 + (trial % 9) as u64 * 3;
            let keys = random_keys(&mut state, n, levels);
            let mut full = entries(&keys);
            full_sort(&mut full);
            assert!(full.windows(2).all(|w| key(w[0]) <= key(w[1])), "full replay sorts");
            let k = n / 3;
            let mut pruned = entries(&keys);
            arrange(&mut pruned, &[k]);
            let mut a: Vec<u64> = full[..k].to_vec();
            let mut b: Vec<u64> = pruned[..k].to_vec();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "trial {trial}");
        }
    }

    #[test]
    fn block_partition_swaps_as_hoare_does() {
        let mut state = 11u64;
        for trial in 0..300 {
            let n = 3 + (trial * 53) % 2000;
            let levels = 1 + (trial % 7) as u64 * 5;
            let keys = random_keys(&mut state, n, levels);
            let mut a = entries(&keys);
            // Median-of-three sentinels, as the caller sets them up.
            let m = n / 2;
            let mut three = [a[1], a[m], a[n - 1]];
            three.sort_by_key(|e| key(*e));
            (a[1], a[m], a[n - 1]) = (three[0], three[1], three[2]);
            a.swap(0, m);
            let mut b = a.clone();
            let pivot = a[0];
            assert_eq!(
                hoare_partition(&mut a, 1, n, pivot),
                hoare_loop(&mut b, 1, n, pivot),
                "trial {trial}"
            );
            assert_eq!(a, b, "trial {trial}");
        }
    }

    #[test]
    fn entry_pool_keeps_at_most_its_budget() {
        let pool = EntryPool::new(8 * 100);
        let (a, b) = (pool.take(60), pool.take(50));
        assert_eq!((a.len(), b.len()), (60, 50));
        pool.give(a);
        pool.give(b);
        // 60 + 50 entries exceed the 100-entry budget: only the larger buffer is kept.
        let kept: usize = pool.free.lock().unwrap().iter().map(Vec::capacity).sum();
        assert!((60..=100).contains(&kept), "{kept}");
        let again = pool.take(10);
        assert_eq!(again.len(), 10);
        assert!(again.capacity() >= 60, "the kept buffer is reused");
    }

    #[test]
    fn heap_sort_sorts() {
        let mut v = entries(&[5, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]);
        heap_sort(&mut v);
        assert!(v.windows(2).all(|w| key(w[0]) <= key(w[1])));
    }
}
