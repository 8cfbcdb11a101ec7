//! The benchmark floor: read every byte of the given files once, from the page cache, on all
//! cores (a checksum over memory maps). A kinship pass cannot be faster than this.
//!
//! Usage: `read_floor FILE...`; prints `bytes seconds checksum seconds_with_unmapping`: the last
//! also counts dropping the maps, which a pass pays inside its time (it lets pages go as it reads,
//! so resident memory does not grow with model size) and the first leaves out.

use std::fs::File;
use std::time::Instant;

use memmap2::Mmap;
use rayon::prelude::*;

fn main() -> std::io::Result<()> {
    let maps: Vec<Mmap> = std::env::args()
        .skip(1)
        .map(|path| File::open(path).and_then(|f| unsafe { Mmap::map(&f) }))
        .collect::<std::io::Result<_>>()?;
    let start = Instant::now();
    let mut bytes = 0usize;
    let mut checksum = 0u64;
    for map in &maps {
        bytes += map.len();
        checksum ^= map
            .par_chunks(1 << 20)
            .map(|block| {
                let words = block.chunks_exact(8);
                let tail = words.remainder().iter().map(|&b| u64::from(b)).sum::<u64>();
                words
                    .fold(tail, |acc, w| acc.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes"))))
            })
            .reduce(|| 0, |a, b| a ^ b);
    }
    let read = start.elapsed().as_secs_f64();
    drop(maps);
    println!("{bytes} {read:.6} {checksum} {:.6}", start.elapsed().as_secs_f64());
    Ok(())
}
