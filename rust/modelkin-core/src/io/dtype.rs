//! Floating-point storage formats and their exact widening to f64.
//!
//! Tensor data inside a safetensors file starts wherever the header ends, so it is read as
//! little-endian bytes and never reinterpreted in place (no alignment is assumed).

// Stored words are read as native ones, which is only right on little-endian CPUs.
#[cfg(target_endian = "big")]
compile_error!("modelkin reads little-endian safetensors data on little-endian targets only");

use std::sync::LazyLock;

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

fn decode_f64(bytes: &[u8], out: &mut [f64]) {
    bytemuck::cast_slice_mut::<f64, u8>(out).copy_from_slice(bytes);
}

/// Elements widened per step: one unaligned vector load of stored words each.
const STEP: usize = 16;

fn decode_f32(bytes: &[u8], out: &mut [f64]) {
    widen_f32(bytes, out);
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn widen_f32(bytes: &[u8], out: &mut [f64]) {
    widen_words::<f32>(bytes, out, f64::from);
}

fn decode_bf16(bytes: &[u8], out: &mut [f64]) {
    widen_bf16(bytes, out);
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn widen_bf16(bytes: &[u8], out: &mut [f64]) {
    // bf16 is the upper half of an f32: shifting the bits up widens it exactly.
    widen_words::<u16>(bytes, out, |b| f64::from(f32::from_bits(u32::from(b) << 16)));
}

/// Widens stored words read straight from `bytes` (any alignment), [`STEP`] per step: each step's
/// words come in as one unaligned array read, which the compiler makes a vector load, so no
/// aligned staging copy is needed for the loop to vectorise.
#[inline(always)]
fn widen_words<T: bytemuck::Pod>(bytes: &[u8], out: &mut [f64], widen: impl Fn(T) -> f64) {
    let size = std::mem::size_of::<T>();
    debug_assert_eq!(bytes.len(), out.len() * size);
    let (mut words, mut values) = (bytes.chunks_exact(STEP * size), out.chunks_exact_mut(STEP));
    for (w, o) in (&mut words).zip(&mut values) {
        let w: [T; STEP] = bytemuck::pod_read_unaligned(w);
        for (o, w) in o.iter_mut().zip(w) {
            *o = widen(w);
        }
    }
    for (w, o) in words.remainder().chunks_exact(size).zip(values.into_remainder()) {
        *o = widen(bytemuck::pod_read_unaligned(w));
    }
}

fn decode_f16(bytes: &[u8], out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { widen_f16_f16c(bytes, out) };
        }
    }
    widen_words::<u16>(bytes, out, |b| half::f16::from_bits(b).to_f64());
}

/// f16 widened by F16C, four elements per step, straight from the stored bytes.
///
/// # Safety
/// The CPU must have AVX and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16_f16c(bytes: &[u8], out: &mut [f64]) {
    use std::arch::x86_64::{_mm256_cvtps_pd, _mm256_storeu_pd, _mm_cvtph_ps, _mm_loadl_epi64};
    let (mut words, mut values) = (bytes.chunks_exact(8), out.chunks_exact_mut(4));
    for (w, o) in (&mut words).zip(&mut values) {
        // SAFETY: `w` holds 8 bytes and `o` 4 values; the CPU has the features.
        unsafe {
            _mm256_storeu_pd(
                o.as_mut_ptr(),
                _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(w.as_ptr().cast()))),
            )
        };
    }
    for (w, o) in words.remainder().chunks_exact(2).zip(values.into_remainder()) {
        *o = half::f16::from_le_bytes([w[0], w[1]]).to_f64();
    }
}

/// The value of one FP8 byte (`dtype` is [`FloatDtype::F8E4M3`] or [`FloatDtype::F8E5M2`]).
pub(crate) fn f8_value(dtype: FloatDtype, byte: u8) -> f64 {
    match dtype {
        FloatDtype::F8E4M3 => F8E4M3_TABLE[usize::from(byte)],
        FloatDtype::F8E5M2 => F8E5M2_TABLE[usize::from(byte)],
        _ => unreachable!("not an FP8 format"),
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
