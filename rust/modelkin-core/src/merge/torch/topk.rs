//! Which entries torch's CPU `topk` returns when values tie at its boundary: libstdc++'s
//! `std::nth_element` (or, when k·64 ≤ n, the `std::__heap_select` of `std::partial_sort`) over
//! (value, index) pairs, compared by value only, replayed step for step with the pieces of the
//! sort replay in `sort_order`.

use super::sort_order::{adjust_heap, insertion_sort, less, make_heap, partition_around_median};

/// Rearranges `entries` (`(key << 32) | index`, smallest key first: complement the keys to ask for
/// the largest values) as torch's `topk(k)` leaves its pairs: the first `k` are what it returns.
pub(crate) fn select_first(entries: &mut [u64], k: usize) {
    let n = entries.len();
    if k == 0 || k >= n {
        return;
    }
    if k * 64 <= n {
        heap_select(entries, k);
    } else {
        nth_element(entries, k - 1);
    }
}

/// `std::nth_element(first, first + nth, last)`: libstdc++'s introselect.
fn nth_element(v: &mut [u64], nth: usize) {
    let mut depth_limit = 2 * v.len().ilog2() as usize;
    let (mut first, mut last) = (0, v.len());
    while last - first > 3 {
        if depth_limit == 0 {
            heap_select(&mut v[first..last], nth + 1 - first);
            v.swap(first, nth);
            return;
        }
        depth_limit -= 1;
        let cut = partition_around_median(v, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut v[first..last]);
}

/// `std::__heap_select(first, first + middle, last)`: a heap of the first `middle` entries, each
/// later entry smaller than its top taking the top's place.
fn heap_select(v: &mut [u64], middle: usize) {
    make_heap(&mut v[..middle]);
    for i in middle..v.len() {
        if less(v[i], v[0]) {
            let value = v[i];
            v[i] = v[0];
            adjust_heap(&mut v[..middle], 0, middle, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::select_first;

    fn entries(keys: &[u32]) -> Vec<u64> {
        keys.iter().enumerate().map(|(i, &k)| (u64::from(k) << 32) | i as u64).collect()
    }

    #[test]
    fn the_first_k_hold_the_k_smallest_keys_whatever_the_ties() {
        let mut state = 7u64;
        for (n, levels) in [(1000usize, 5u64), (300, 1000), (5000, 3), (10, 2)] {
            let keys: Vec<u32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 33) % levels) as u32
                })
                .collect();
            for k in [1, 3, n / 64, n / 3, n / 2, n - 1] {
                let mut v = entries(&keys);
                select_first(&mut v, k);
                let mut chosen: Vec<u32> = v[..k].iter().map(|e| (e >> 32) as u32).collect();
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                chosen.sort_unstable();
                assert_eq!(chosen, sorted[..k], "n {n} k {k}");
                // Every entry is still there once.
                let mut indices: Vec<u64> = v.iter().map(|e| e & 0xFFFF_FFFF).collect();
                indices.sort_unstable();
                assert!(indices.iter().enumerate().all(|(i, &x)| x == i as u64));
            }
        }
    }
}
