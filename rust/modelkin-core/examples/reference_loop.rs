//! The reference loop the kinship pass is held to: the six float64 pair sums of two fine-tunes
//! against their base, swept straight over the three memory maps on all cores with the pair
//! kernel alone (no plan, no per-tensor bookkeeping, no progress). Between the floor
//! (`read_floor`) and a kinship pass, it shows what the arithmetic costs and what the pass adds.
//!
//! Usage: `reference_loop A B BASE`, three safetensors files of the same layout, all of one
//! `--dtype` (default bf16; f16, f32, f64, f8_e4m3, f8_e5m2); prints `bytes seconds sum`.

use std::fs::File;
use std::time::Instant;

use memmap2::Mmap;
use modelkin_core::io::dtype::FloatDtype;
use modelkin_core::kinship::kernel::pair_delta_sums_stored;
use rayon::prelude::*;

/// Elements per work item, as in the pass.
const CHUNK: usize = 16 * 1024;

fn main() -> std::io::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut dtype = FloatDtype::BF16;
    if let Some(i) = args.iter().position(|a| a == "--dtype") {
        let name = args.get(i + 1).cloned().unwrap_or_default();
        dtype = match name.to_ascii_lowercase().as_str() {
            "bf16" => FloatDtype::BF16,
            "f16" => FloatDtype::F16,
            "f32" => FloatDtype::F32,
            "f64" => FloatDtype::F64,
            "f8_e4m3" => FloatDtype::F8E4M3,
            "f8_e5m2" => FloatDtype::F8E5M2,
            _ => panic!("unknown --dtype {name}"),
        };
        args.drain(i..i + 2);
    }
    assert_eq!(args.len(), 3, "usage: reference_loop A B BASE [--dtype bf16]");
    let maps: Vec<Mmap> = args
        .iter()
        // SAFETY: the files are read-only inputs that nothing modifies while they are mapped.
        .map(|path| File::open(path).and_then(|f| unsafe { Mmap::map(&f) }))
        .collect::<std::io::Result<_>>()?;
    // The tensors' bytes: after the 8-byte header length and the JSON header.
    let data: Vec<&[u8]> = maps
        .iter()
        .map(|m| {
            let header = u64::from_le_bytes(m[..8].try_into().expect("8 bytes")) as usize;
            &m[8 + header..]
        })
        .collect();
    let size = dtype.size();
    let n = data.iter().map(|d| d.len() / size).min().unwrap_or(0);
    let start = Instant::now();
    let sums = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let (first, last) = (c * CHUNK * size, ((c + 1) * CHUNK).min(n) * size);
            pair_delta_sums_stored(dtype, &data[0][first..last], &data[1][first..last], &data[2][first..last])
        })
        .reduce(|| [0.0; 6], |a, b| std::array::from_fn(|s| a[s] + b[s]));
    let seconds = start.elapsed().as_secs_f64();
    let bytes: usize = maps.iter().map(|m| m.len()).sum();
    println!("{bytes} {seconds:.6} {:e}", sums[5]);
    Ok(())
}
