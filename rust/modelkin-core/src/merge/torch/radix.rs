//! Exact order statistics of per-element keys in two streamed histogram passes (a radix select),
//! for thresholds that must not hold a tensor in memory: magnitude pruning beyond the sort-replay
//! budget, and SCE's variance threshold.

use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::io::error::Result;
use crate::io::progress::Progress;
use crate::merge::engine::scratch::Scratch;
use crate::merge::engine::source::{map_magnitudes, Source};

/// The value at an order-statistic rank, with the counts that place the rank inside its ties.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Boundary {
    /// The key (f32 bits) at the rank.
    value: u32,
    /// Elements with a smaller key.
    below: u64,
    /// Elements with exactly this key.
    equal: u64,
    /// The 0-based ascending rank asked for.
    rank: u64,
}

impl Boundary {
    /// The key (f32 bits) at the rank.
    pub(crate) fn value(self) -> u32 {
        self.value
    }

    /// The smallest key to keep when keeping ascending ranks ≥ `rank`. Ties at the boundary go
    /// all in or all out, whichever side holds most of them: mergekit breaks them by the
    /// (arbitrary) order of an unstable sort, and all-or-nothing minimises the expected mismatch.
    pub(crate) fn keep_from(self) -> u32 {
        let inside = self.below + self.equal - self.rank;
        if 2 * inside >= self.equal {
            self.value
        } else {
            self.value + 1
        }
    }

    /// The first key to drop when keeping ascending ranks < `rank` (ties as in `keep_from`).
    pub(crate) fn drop_from(self) -> u32 {
        let inside = self.rank - self.below;
        if 2 * inside >= self.equal {
            self.value + 1
        } else {
            self.value
        }
    }
}

/// Exact order statistics of per-element keys (non-negative f32 bits) computed from the decoded
/// sources. `ranks[s]` lists the 0-based ascending ranks wanted of key set `s` (`keys(views, s,
/// out)` appends that set's keys of a block); the result holds one [`Boundary`] per rank. Two
/// streamed histogram passes (radix select on the upper, then the lower 16 bits) serve every set
/// at once, so memory stays bounded and the sources are read twice in all.
pub(crate) fn order_statistics(
    sources: &[&Source],
    block: usize,
    n: usize,
    ranks: &[Vec<usize>],
    progress: &Progress,
    keys: impl Fn(usize, usize, usize, &mut Vec<u32>) + Sync,
) -> Result<Vec<Vec<Boundary>>> {
    const BINS: usize = 1 << 16;
    let sets: Vec<usize> = (0..ranks.len()).filter(|&s| !ranks[s].is_empty()).collect();
    let bytes_per_element: u64 = sources.iter().map(|s| s.dtype.size() as u64).sum();
    // One histogram per query: (key set, Some(upper 16 bits) to count lower bits within, or None
    // to count upper bits).
    // Sparse histograms, (bin, count) sorted by bin: magnitudes occupy few bins, and dense
    // 65536-entry results per run would be fresh memory the kernel has to zero every time.
    let histograms = |queries: &[(usize, Option<u32>)]| -> Result<Vec<Vec<(u32, u64)>>> {
        // Magnitudes crowd into a few bins, so consecutive increments of one counter would wait
        // on each other; four interleaved tables per query break that dependency chain.
        // Contiguous runs of blocks, a few per worker, each counted into one set of tables.
        let blocks = n.div_ceil(block);
        let runs = (rayon::current_num_threads() * 2).clamp(1, blocks.max(1));
        let per_query = (0..runs)
            .into_par_iter()
            .map(|run| -> Result<Vec<Vec<(u32, u64)>>> {
                // Tables from the thread's pool of all-zero buffers: fresh 1 MiB tables per run
                // would be mapped and zeroed by the kernel again and again.
                let mut tables = Scratch::take_zeroed::<u32>(queries.len(), 4 * BINS);
                let mut counts = tables.views::<u32>(4 * BINS);
                let mut scratch = Vec::<u32>::new();
                // The bins each query touched: only those are read back and cleared.
                let mut touched = vec![(u32::MAX, 0u32); queries.len()];
                let counted = ((run * blocks / runs)..((run + 1) * blocks / runs)).try_for_each(|b| {
                    progress.check()?;
                    let first = b * block;
                    let len = block.min(n - first);
                    for &set in &sets {
                        scratch.clear();
                        keys(first, len, set, &mut scratch);
                        for (q, &(query_set, within)) in queries.iter().enumerate() {
                            if query_set == set {
                                count_bins(&scratch, within, counts[q], &mut touched[q]);
                            }
                        }
                    }
                    progress.done.fetch_add(len as u64 * bytes_per_element, Ordering::Relaxed);
                    Ok(())
                });
                // Read back and cleared even when cancelled: the tables go back to the pool zeroed.
                let totals = counts
                    .iter_mut()
                    .zip(&touched)
                    .map(|(t, &(low, high))| {
                        let mut sparse = Vec::new();
                        for bin in (low as usize)..=(high as usize).min(BINS - 1) {
                            let c: u64 = (0..4).map(|j| u64::from(t[j * BINS + bin])).sum();
                            (0..4).for_each(|j| t[j * BINS + bin] = 0);
                            if c > 0 {
                                sparse.push((bin as u32, c));
                            }
                        }
                        sparse
                    })
                    .collect();
                counted.map(|()| totals)
            })
            .try_reduce(
                || vec![Vec::new(); queries.len()],
                |a, b| Ok(a.into_iter().zip(b).map(|(x, y)| merge_sparse(&x, &y)).collect()),
            )?;
        Ok(per_query)
    };
    // (bin, elements in lower bins, elements in the bin) of the bin holding `rank`.
    let locate = |counts: &[(u32, u64)], rank: u64| -> (u32, u64, u64) {
        let mut seen = 0u64;
        for &(bin, c) in counts {
            if seen + c > rank {
                return (bin, seen, c);
            }
            seen += c;
        }
        counts.last().map_or((0, 0, 0), |&(bin, c)| (bin, seen - c, c))
    };
    let high_queries: Vec<(usize, Option<u32>)> = sets.iter().map(|&s| (s, None)).collect();
    let high = histograms(&high_queries)?;
    let mut low_queries = Vec::new();
    let mut placed = Vec::new();
    for (h, &set) in sets.iter().enumerate() {
        for &rank in &ranks[set] {
            let rank = rank.min(n.saturating_sub(1)) as u64;
            let (top, below_top, _) = locate(&high[h], rank);
            low_queries.push((set, Some(top)));
            placed.push((set, rank, top, below_top));
        }
    }
    let low = histograms(&low_queries)?;
    let mut out: Vec<Vec<Boundary>> = vec![Vec::new(); ranks.len()];
    for ((set, rank, top, below_top), counts) in placed.into_iter().zip(&low) {
        let (bottom, below_bottom, equal) = locate(counts, rank - below_top);
        out[set].push(Boundary { value: (top << 16) | bottom, below: below_top + below_bottom, equal, rank });
    }
    Ok(out)
}

/// The sum of two sparse histograms sorted by bin.
fn merge_sparse(a: &[(u32, u64)], b: &[(u32, u64)]) -> Vec<(u32, u64)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        match (a.get(i), b.get(j)) {
            (Some(&(x, c)), Some(&(y, d))) if x == y => {
                out.push((x, c + d));
                i += 1;
                j += 1;
            }
            (Some(&(x, c)), Some(&(y, _))) if x < y => {
                out.push((x, c));
                i += 1;
            }
            (Some(&(x, c)), None) => {
                out.push((x, c));
                i += 1;
            }
            (_, Some(&(y, d))) => {
                out.push((y, d));
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    out
}

/// Appends |x − z| (as f32 bits) of elements `first..first + len`.
pub(crate) fn magnitude_keys(base: &Source, input: &Source, first: usize, len: usize, keys: &mut Vec<u32>) {
    let start = keys.len();
    keys.resize(start + len, 0);
    map_magnitudes(base, input, first, &mut keys[start..], |_, bits| bits);
}

/// Counts keys into 65536-bin tables: their upper 16 bits into four interleaved tables (`within` =
/// None), or the lower 16 bits of the keys whose upper bits equal `within` into the first; widens
/// `touched` to the bins used.
fn count_bins(keys: &[u32], within: Option<u32>, tables: &mut [u32], touched: &mut (u32, u32)) {
    const BINS: usize = 1 << 16;
    match within {
        None => {
            let (t0, rest) = tables.split_at_mut(BINS);
            let (t1, rest) = rest.split_at_mut(BINS);
            let (t2, t3) = rest.split_at_mut(BINS);
            let quads = keys.chunks_exact(4);
            for k in quads.remainder() {
                t0[(k >> 16) as usize] += 1;
            }
            for q in quads {
                t0[(q[0] >> 16) as usize] += 1;
                t1[(q[1] >> 16) as usize] += 1;
                t2[(q[2] >> 16) as usize] += 1;
                t3[(q[3] >> 16) as usize] += 1;
            }
            let (low, high) = keys.iter().fold((u32::MAX, 0), |(l, h), k| (l.min(k >> 16), h.max(k >> 16)));
            *touched = (touched.0.min(low), touched.1.max(high));
        }
        Some(top) => {
            // Few keys fall in the boundary bin, so one table suffices here.
            for &k in keys.iter().filter(|k| *k >> 16 == top) {
                let bin = k & 0xFFFF;
                tables[bin as usize] += 1;
                *touched = (touched.0.min(bin), touched.1.max(bin));
            }
        }
    }
}
