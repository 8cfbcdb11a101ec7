//! Floating-point storage formats and their exact widening to f64.
//!
//! Tensor data inside a safetensors file starts wherever the header ends, so it is read as
//! little-endian bytes and never reinterpreted in place (no alignment is assumed).

// Staging copies raw file bytes into native words, which is only right on little-endian CPUs.
#[cfg(target_endian = "big")]
compile_error!("modelkin reads little-endian safetensors data on little-endian targets only");

use std::sync::LazyLock;

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use multiversion::multiversion;

/// A floating-point dtype that modelkin can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE binary64.
    F64,
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the upper half of an f32).
    BF16,
    /// OCP FP8 E4M3 (finite-only, NaN at 0x7F/0xFF).
    F8E4M3,
    /// OCP FP8 E5M2.
    F8E5M2,
}

impl FloatDtype {
    /// Maps a safetensors dtype; `None` for integer, boolean and packed formats.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as D;
        Some(match dtype {
            D::F64 => Self::F64,
            D::F32 => Self::F32,
            D::F16 => Self::F16,
            D::BF16 => Self::BF16,
            D::F8_E4M3 => Self::F8E4M3,
            D::F8_E5M2 => Self::F8E5M2,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 => 8,
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::F8E4M3 | Self::F8E5M2 => 1,
        }
    }

    /// The name safetensors headers use.
    pub fn name(self) -> &'static str {
        match self {
            Self::F64 => "F64",
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F8E4M3 => "F8_E4M3",
            Self::F8E5M2 => "F8_E5M2",
        }
    }
}

/// Widens `bytes` (exactly `out.len()` elements of `dtype`) into `out`.
pub fn decode(dtype: FloatDtype, bytes: &[u8], out: &mut [f64]) {
    debug_assert_eq!(bytes.len(), out.len() * dtype.size());
    match dtype {
        FloatDtype::F64 => decode_f64(bytes, out),
        FloatDtype::F32 => decode_f32(bytes, out),
        FloatDtype::BF16 => decode_bf16(bytes, out),
        FloatDtype::F16 => decode_f16(bytes, out),
        FloatDtype::F8E4M3 => decode_lut(&F8E4M3_TABLE, bytes, out),
        FloatDtype::F8E5M2 => decode_lut(&F8E5M2_TABLE, bytes, out),
    }
}

/// Elements staged per step: the staging array stays in L1.
const STAGE: usize = 1024;

/// Copies little-endian words out of possibly unaligned bytes into an aligned buffer. A plain
/// memcpy, so the widening loops that follow read aligned words and vectorise.
pub(crate) fn stage<T: bytemuck::Pod>(bytes: &[u8], staging: &mut [T]) {
    bytemuck::cast_slice_mut::<T, u8>(staging).copy_from_slice(bytes);
}

fn decode_f64(bytes: &[u8], out: &mut [f64]) {
    stage(bytes, out);
}

fn decode_f32(bytes: &[u8], out: &mut [f64]) {
    decode_staged::<f32>(bytes, out, widen_f32);
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn widen_f32(values: &[f32], out: &mut [f64]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = f64::from(v);
    }
}

fn decode_bf16(bytes: &[u8], out: &mut [f64]) {
    decode_staged::<u16>(bytes, out, widen_bf16);
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn widen_bf16(bits: &[u16], out: &mut [f64]) {
    // bf16 is the upper half of an f32: shifting the bits up widens it exactly.
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = f64::from(f32::from_bits(u32::from(b) << 16));
    }
}

fn decode_f16(bytes: &[u8], out: &mut [f64]) {
    // half's slice conversion uses F16C/NEON when the CPU has them.
    decode_staged::<u16>(bytes, out, |bits, out| {
        bits.reinterpret_cast::<half::f16>().convert_to_f64_slice(out)
    });
}

/// Stages `bytes` in L1-sized steps of aligned `T` words and widens each step with `widen`.
fn decode_staged<T: bytemuck::Pod + Default>(
    bytes: &[u8],
    out: &mut [f64],
    widen: impl Fn(&[T], &mut [f64]),
) {
    let mut staging = [T::default(); STAGE];
    for (out, bytes) in out.chunks_mut(STAGE).zip(bytes.chunks(STAGE * std::mem::size_of::<T>())) {
        let staging = &mut staging[..out.len()];
        stage(bytes, staging);
        widen(staging, out);
    }
}

fn decode_lut(table: &[f64; 256], bytes: &[u8], out: &mut [f64]) {
    for (o, &b) in out.iter_mut().zip(bytes) {
        *o = table[usize::from(b)];
    }
}

fn fp8_table(mantissa_bits: u32, bias: i32, ieee_specials: bool) -> [f64; 256] {
    let exponent_max = (1u32 << (7 - mantissa_bits)) - 1;
    let mantissa_scale = f64::from(1u32 << mantissa_bits);
    std::array::from_fn(|byte| {
        let byte = byte as u32;
        let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
        let exponent = (byte >> mantissa_bits) & exponent_max;
        let mantissa = f64::from(byte & ((1 << mantissa_bits) - 1));
        let magnitude = if exponent == exponent_max && ieee_specials {
            if mantissa == 0.0 {
                f64::INFINITY
            } else {
                f64::NAN
            }
        } else if exponent == exponent_max && !ieee_specials && mantissa == mantissa_scale - 1.0 {
            f64::NAN
        } else if exponent == 0 {
            mantissa / mantissa_scale * 2f64.powi(1 - bias)
        } else {
            (1.0 + mantissa / mantissa_scale) * 2f64.powi(exponent as i32 - bias)
        };
        sign * magnitude
    })
}

static F8E4M3_TABLE: LazyLock<[f64; 256]> = LazyLock::new(|| fp8_table(3, 7, false));
static F8E5M2_TABLE: LazyLock<[f64; 256]> = LazyLock::new(|| fp8_table(2, 15, true));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_reference_values() {
        assert_eq!(F8E4M3_TABLE[0x7E], 448.0);
        assert_eq!(F8E4M3_TABLE[0x01], 2f64.powi(-9));
        assert!(F8E4M3_TABLE[0xFF].is_nan());
        assert_eq!(F8E4M3_TABLE[0xB8], -1.0);
        assert_eq!(F8E5M2_TABLE[0x7B], 57344.0);
        assert_eq!(F8E5M2_TABLE[0x7C], f64::INFINITY);
        assert_eq!(F8E5M2_TABLE[0x01], 2f64.powi(-16));
    }

    #[test]
    fn half_formats_widen_exactly() {
        let values = [1.0f32, -2.5, 3.140625, 0.0, 65504.0];
        let f16: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let mut out = vec![0.0; values.len()];
        decode(FloatDtype::F16, &f16, &mut out);
        assert_eq!(
            out,
            values.iter().map(|&v| f64::from(half::f16::from_f32(v).to_f32())).collect::<Vec<_>>()
        );
        decode(FloatDtype::BF16, &bf16, &mut out);
        assert_eq!(
            out,
            values.iter().map(|&v| f64::from(half::bf16::from_f32(v).to_f32())).collect::<Vec<_>>()
        );
    }
}
