//! Narrowing merged f64 values to the output dtype with one correct round-to-nearest-even.

use multiversion::multiversion;
use serde::Deserialize;

/// The dtype merged tensors are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OutDtype {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl OutDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutDtype::F64 => 8,
            OutDtype::F32 => 4,
            OutDtype::F16 | OutDtype::BF16 => 2,
        }
    }

    /// The output dtype a stored safetensors dtype is, if it is one.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F64 => Some(OutDtype::F64),
            safetensors::Dtype::F32 => Some(OutDtype::F32),
            safetensors::Dtype::F16 => Some(OutDtype::F16),
            safetensors::Dtype::BF16 => Some(OutDtype::BF16),
            _ => None,
        }
    }

    /// The name safetensors headers use.
    pub fn name(self) -> &'static str {
        match self {
            OutDtype::F64 => "F64",
            OutDtype::F32 => "F32",
            OutDtype::F16 => "F16",
            OutDtype::BF16 => "BF16",
        }
    }
}

/// f64 → f32 rounding to odd: exact values stay, inexact ones get their last bit set. Rounding
/// that result to a format with at least two fewer mantissa bits is then a correctly rounded f64
/// conversion (no double-rounding error). `half`'s own f64 → bf16 drops the low mantissa bits
/// before rounding, so it can round ties wrongly; this is why the conversion is written here.
fn to_f32_round_to_odd(v: f64) -> f32 {
    let nearest = v as f32;
    if !v.is_finite() || f64::from(nearest) == v {
        return nearest;
    }
    let toward_zero =
        if f64::from(nearest).abs() > v.abs() { f32::from_bits(nearest.to_bits() - 1) } else { nearest };
    f32::from_bits(toward_zero.to_bits() | 1)
}

fn f32_to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// Appends `values` to `out` as little-endian `dtype` words.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn encode(dtype: OutDtype, values: &[f64], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + values.len() * dtype.size(), 0);
    let words = &mut out[start..];
    match dtype {
        OutDtype::F64 => write_words(words, values, |v| v.to_le_bytes()),
        OutDtype::F32 => write_words(words, values, |v| (v as f32).to_le_bytes()),
        OutDtype::BF16 => {
            write_words(words, values, |v| f32_to_bf16_bits(to_f32_round_to_odd(v)).to_le_bytes())
        }
        OutDtype::F16 => {
            write_words(words, values, |v| half::f16::from_f32(to_f32_round_to_odd(v)).to_le_bytes())
        }
    }
}

#[inline(always)]
fn write_words<const N: usize>(words: &mut [u8], values: &[f64], word: impl Fn(f64) -> [u8; N]) {
    for (out, &v) in words.chunks_exact_mut(N).zip(values) {
        out.copy_from_slice(&word(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(v: f64) -> u16 {
        let mut out = Vec::new();
        encode(OutDtype::BF16, &[v], &mut out);
        u16::from_le_bytes([out[0], out[1]])
    }

    #[test]
    fn bf16_rounds_once_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3F80);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even wins.
        assert_eq!(bf16(1.0 + 2f64.powi(-8)), 0x3F80);
        // Slightly above the tie, but the excess is lost when rounding to f32 first:
        // double rounding through f32 would give 0x3F80.
        assert_eq!(bf16(1.0 + 2f64.powi(-8) + 2f64.powi(-40)), 0x3F81);
        assert_eq!(bf16(-2.0), 0xC000);
    }
}
