//! f64 values held in registers — one AVX-512 register, one or two AVX2 ones, or a plain array —
//! behind one trait, so each explicit SIMD kernel is written once and compiled per level; and the
//! stored formats, widened into those registers straight from the mapped bytes.
//!
//! LLVM leaves multi-accumulator reductions scalar under strict floating-point rules; these types
//! keep the vector width explicit. Every operation acts on each lane alone and rounds as IEEE
//! says (a product and its sum with one rounding, fused, on every level, the plain array
//! included), so a kernel that feeds each lane the same values in the same order gets the same
//! bits on every CPU level.

/// Partial sums per accumulator of the 8-lane kernels (and lanes per group of the pair kernel).
pub(crate) const LANES: usize = 8;

/// Eight partial sums in memory.
pub(crate) type Lanes = [f64; LANES];

/// `WIDTH` f64 values in registers, one lane each.
pub(crate) trait Accumulator: Copy {
    /// Lanes held.
    const WIDTH: usize;
    /// Every lane set to `v`.
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn splat(v: f64) -> Self;
    /// # Safety
    /// `p` must be valid for reading `WIDTH` f64, and the CPU must have the type's features.
    unsafe fn load(p: *const f64) -> Self;
    /// # Safety
    /// `p` must be valid for writing `WIDTH` f64, and the CPU must have the type's features.
    unsafe fn store(self, p: *mut f64);
    /// self + other, lane by lane.
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn add(self, other: Self) -> Self;
    /// self − other, lane by lane.
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn sub(self, other: Self) -> Self;
    /// self + x·y, lane by lane, rounded once (fused).
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn add_product(self, x: Self, y: Self) -> Self;
}

impl Accumulator for Lanes {
    const WIDTH: usize = LANES;
    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        [v; LANES]
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: the caller guarantees `LANES` readable values.
        unsafe { p.cast::<Lanes>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: the caller guarantees `LANES` writable values.
        unsafe { p.cast::<Lanes>().write_unaligned(self) }
    }
    #[inline(always)]
    unsafe fn add(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] + other[l])
    }
    #[inline(always)]
    unsafe fn sub(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] - other[l])
    }
    #[inline(always)]
    unsafe fn add_product(self, x: Self, y: Self) -> Self {
        // Fused, as the vector levels' FMA is, so every level rounds alike. NEON has FMA; an x86
        // CPU without it (this path serves only those) gets the C library's exact fma, slowly.
        std::array::from_fn(|l| x[l].mul_add(y[l], self[l]))
    }
}

/// A storage format read straight from mapped bytes: little-endian, any alignment (the target is
/// little-endian, see `io::dtype`).
pub(crate) trait Stored {
    /// Bytes per element.
    const SIZE: usize;
    /// The power of two the widened values carry: `scalar` and `widen` give the stored value
    /// times SCALE. A power of two in range changes no rounding, so sums of the scaled values,
    /// divided by it, are the sums of the stored ones bit for bit; FP8 E4M3 is widened through
    /// f16, in which it is exactly 2⁻⁸ times its value, and saves the multiplication.
    const SCALE: f64 = 1.0;
    /// The element at `p` times [`Stored::SCALE`], widened exactly.
    /// # Safety
    /// `p` must be valid for reading `SIZE` bytes.
    unsafe fn scalar(p: *const u8) -> f64;
}

/// A group of [`LANES`] stored elements widened exactly into `A`'s lanes, in order, one
/// register's worth (`A::WIDTH` lanes) at a time.
pub(crate) trait Widen<A: Accumulator>: Stored {
    /// Lanes `part · A::WIDTH ..` of the group at `p` (`part` < [`LANES`] / `A::WIDTH`).
    /// # Safety
    /// `p` must be valid for reading `LANES · SIZE` bytes, and the CPU must have `A`'s features
    /// (for x86 types, F16C as well).
    unsafe fn widen(p: *const u8, part: usize) -> A;
}

/// Stored bfloat16.
pub(crate) struct Bf16;
/// Stored IEEE binary16.
pub(crate) struct F16;
/// Stored IEEE binary32.
pub(crate) struct F32;
/// Stored IEEE binary64.
pub(crate) struct F64;
/// Stored OCP FP8 E4M3.
pub(crate) struct F8E4M3;
/// Stored OCP FP8 E5M2.
pub(crate) struct F8E5M2;

/// The `N` bytes at `p`.
///
/// # Safety
/// `p` must be valid for reading `N` bytes.
#[inline(always)]
unsafe fn bytes<const N: usize>(p: *const u8) -> [u8; N] {
    // SAFETY: the caller guarantees N readable bytes; a byte array has no alignment.
    unsafe { p.cast::<[u8; N]>().read() }
}

impl Stored for Bf16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn scalar(p: *const u8) -> f64 {
        // SAFETY: the caller guarantees the bytes.
        let bits = u16::from_le_bytes(unsafe { bytes(p) });
        // bf16 is the upper half of an f32: shifting the bits up widens it exactly.
        f64::from(f32::from_bits(u32::from(bits) << 16))
    }
}

impl Stored for F16 {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn scalar(p: *const u8) -> f64 {
        // SAFETY: the caller guarantees the bytes.
        half::f16::from_le_bytes(unsafe { bytes(p) }).to_f64()
    }
}

impl Stored for F32 {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn scalar(p: *const u8) -> f64 {
        // SAFETY: the caller guarantees the bytes.
        f64::from(f32::from_le_bytes(unsafe { bytes(p) }))
    }
}

impl Stored for F64 {
    const SIZE: usize = 8;
    #[inline(always)]
    unsafe fn scalar(p: *const u8) -> f64 {
        // SAFETY: the caller guarantees the bytes.
        f64::from_le_bytes(unsafe { bytes(p) })
    }
}

impl Stored for F8E4M3 {
    const SIZE: usize = 1;
    const SCALE: f64 = 1.0 / 256.0;
    #[inline(always)]
    unsafe fn scalar(p: *const u8) -> f64 {
        // SAFETY: the caller guarantees the byte.
        crate::io::dtype::f8_value(crate::io::dtype::FloatDtype::F8E4M3, unsafe { p.read() }) * Self::SCALE
    }
}

impl Stored for F8E5M2 {
    const SIZE: usize = 1;
    #[inline(always)]
    unsafe fn scalar(p: *const u8) -> f64 {
        // SAFETY: the caller guarantees the byte.
        crate::io::dtype::f8_value(crate::io::dtype::FloatDtype::F8E5M2, unsafe { p.read() })
    }
}

impl<F: Stored> Widen<Lanes> for F {
    #[inline(always)]
    unsafe fn widen(p: *const u8, _part: usize) -> Lanes {
        // SAFETY: the caller guarantees `LANES` elements.
        std::array::from_fn(|e| unsafe { F::scalar(p.add(e * F::SIZE)) })
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{Accumulator, Bf16, Stored, Widen, F16, F32, F64, F8E4M3, F8E5M2};

    /// One AVX-512 register: eight lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512d);

    impl Accumulator for Avx512 {
        const WIDTH: usize = 8;
        #[inline(always)]
        unsafe fn splat(v: f64) -> Self {
            // SAFETY: the caller guarantees AVX-512F.
            Avx512(unsafe { _mm512_set1_pd(v) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            // SAFETY: the caller guarantees 8 readable values and AVX-512F.
            Avx512(unsafe { _mm512_loadu_pd(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            // SAFETY: the caller guarantees 8 writable values and AVX-512F.
            unsafe { _mm512_storeu_pd(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            // SAFETY: the caller guarantees AVX-512F.
            Avx512(unsafe { _mm512_add_pd(self.0, other.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, other: Self) -> Self {
            // SAFETY: the caller guarantees AVX-512F.
            Avx512(unsafe { _mm512_sub_pd(self.0, other.0) })
        }
        #[inline(always)]
        unsafe fn add_product(self, x: Self, y: Self) -> Self {
            // SAFETY: the caller guarantees AVX-512F.
            Avx512(unsafe { _mm512_fmadd_pd(x.0, y.0, self.0) })
        }
    }

    /// Two AVX2 registers: eight lanes.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2([__m256d; 2]);

    impl Accumulator for Avx2 {
        const WIDTH: usize = 8;
        #[inline(always)]
        unsafe fn splat(v: f64) -> Self {
            // SAFETY: the caller guarantees AVX.
            Avx2(unsafe { [_mm256_set1_pd(v); 2] })
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            // SAFETY: the caller guarantees 8 readable values and AVX.
            Avx2(unsafe { [_mm256_loadu_pd(p), _mm256_loadu_pd(p.add(4))] })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            // SAFETY: the caller guarantees 8 writable values and AVX.
            unsafe {
                _mm256_storeu_pd(p, self.0[0]);
                _mm256_storeu_pd(p.add(4), self.0[1]);
            }
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            // SAFETY: the caller guarantees AVX.
            Avx2(unsafe { [_mm256_add_pd(self.0[0], other.0[0]), _mm256_add_pd(self.0[1], other.0[1])] })
        }
        #[inline(always)]
        unsafe fn sub(self, other: Self) -> Self {
            // SAFETY: the caller guarantees AVX.
            Avx2(unsafe { [_mm256_sub_pd(self.0[0], other.0[0]), _mm256_sub_pd(self.0[1], other.0[1])] })
        }
        #[inline(always)]
        unsafe fn add_product(self, x: Self, y: Self) -> Self {
            // SAFETY: the caller guarantees FMA.
            Avx2(unsafe {
                [_mm256_fmadd_pd(x.0[0], y.0[0], self.0[0]), _mm256_fmadd_pd(x.0[1], y.0[1], self.0[1])]
            })
        }
    }

    /// One AVX2 register: four lanes. Kernels that keep many sums live use it, so each step's
    /// temporaries are one register wide and the sums stay in AVX2's sixteen registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Ymm(__m256d);

    impl Accumulator for Ymm {
        const WIDTH: usize = 4;
        #[inline(always)]
        unsafe fn splat(v: f64) -> Self {
            // SAFETY: the caller guarantees AVX.
            Ymm(unsafe { _mm256_set1_pd(v) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f64) -> Self {
            // SAFETY: the caller guarantees 4 readable values and AVX.
            Ymm(unsafe { _mm256_loadu_pd(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f64) {
            // SAFETY: the caller guarantees 4 writable values and AVX.
            unsafe { _mm256_storeu_pd(p, self.0) }
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            // SAFETY: the caller guarantees AVX.
            Ymm(unsafe { _mm256_add_pd(self.0, other.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, other: Self) -> Self {
            // SAFETY: the caller guarantees AVX.
            Ymm(unsafe { _mm256_sub_pd(self.0, other.0) })
        }
        #[inline(always)]
        unsafe fn add_product(self, x: Self, y: Self) -> Self {
            // SAFETY: the caller guarantees FMA.
            Ymm(unsafe { _mm256_fmadd_pd(x.0, y.0, self.0) })
        }
    }

    /// Eight E4M3 bytes (the low half of `b`) as eight f16 words of 2⁻⁸ their value: E4M3's
    /// sign, exponent and mantissa bits moved to f16's places, which rebiases the exponent by a
    /// fixed 2⁸ for normal and subnormal values alike. 0x7F and 0xFF, E4M3's NaN, become NaN.
    ///
    /// # Safety
    /// The CPU must have SSE2.
    #[inline(always)]
    unsafe fn e4m3_as_f16(b: __m128i) -> __m128i {
        // SAFETY: the caller guarantees SSE2.
        unsafe {
            // Word = byte << 8: the sign in place, the magnitude one bit too high.
            let words = _mm_unpacklo_epi8(_mm_setzero_si128(), b);
            let magnitude = _mm_and_si128(_mm_srli_epi16(words, 1), _mm_set1_epi16(0x3F80));
            // Taking the magnitude once off (magnitude << 8) leaves it at << 7, the sign kept.
            let moved = _mm_sub_epi16(words, magnitude);
            // E4M3 has no infinities: its all-ones magnitude is NaN, which in f16 would be finite.
            let nan =
                _mm_and_si128(_mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x3F80)), _mm_set1_epi16(0x7C00));
            _mm_or_si128(moved, nan)
        }
    }

    /// Eight E5M2 bytes (the low half of `b`) as eight f16 words of the same value: E5M2 is
    /// the upper byte of an f16.
    ///
    /// # Safety
    /// The CPU must have SSE2.
    #[inline(always)]
    unsafe fn e5m2_as_f16(b: __m128i) -> __m128i {
        // SAFETY: the caller guarantees SSE2.
        unsafe { _mm_unpacklo_epi8(_mm_setzero_si128(), b) }
    }

    // AVX-512: eight elements per register. Every caller's CPU has AVX-512F, AVX2 and F16C.

    impl Widen<Avx512> for Bf16 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, _part: usize) -> Avx512 {
            // SAFETY: the caller guarantees 16 readable bytes and the features.
            unsafe {
                // Both halves get all eight words (a broadcast load costs no shuffle), then one
                // byte shuffle puts word i in the upper half of f32 lane i: the bits of its value.
                let words = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
                let place = _mm256_setr_epi8(
                    -128, -128, 0, 1, -128, -128, 2, 3, -128, -128, 4, 5, -128, -128, 6, 7, -128, -128, 8, 9,
                    -128, -128, 10, 11, -128, -128, 12, 13, -128, -128, 14, 15,
                );
                Avx512(_mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_shuffle_epi8(words, place))))
            }
        }
    }

    impl Widen<Avx512> for F16 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, _part: usize) -> Avx512 {
            // SAFETY: the caller guarantees 16 readable bytes and the features.
            unsafe { Avx512(_mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(p.cast())))) }
        }
    }

    impl Widen<Avx512> for F32 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, _part: usize) -> Avx512 {
            // SAFETY: the caller guarantees 32 readable bytes and the features.
            unsafe { Avx512(_mm512_cvtps_pd(_mm256_loadu_ps(p.cast()))) }
        }
    }

    impl Widen<Avx512> for F64 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, _part: usize) -> Avx512 {
            // SAFETY: the caller guarantees 64 readable bytes and the features.
            unsafe { Avx512(_mm512_loadu_pd(p.cast())) }
        }
    }

    impl Widen<Avx512> for F8E4M3 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, _part: usize) -> Avx512 {
            // SAFETY: the caller guarantees 8 readable bytes and the features.
            unsafe { Avx512(_mm512_cvtps_pd(_mm256_cvtph_ps(e4m3_as_f16(_mm_loadl_epi64(p.cast()))))) }
        }
    }

    impl Widen<Avx512> for F8E5M2 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, _part: usize) -> Avx512 {
            // SAFETY: the caller guarantees 8 readable bytes and the features.
            unsafe { Avx512(_mm512_cvtps_pd(_mm256_cvtph_ps(e5m2_as_f16(_mm_loadl_epi64(p.cast()))))) }
        }
    }

    // AVX2: four elements per register. Every caller's CPU has AVX2, FMA and F16C.

    impl Widen<Ymm> for Bf16 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, part: usize) -> Ymm {
            // SAFETY: the caller guarantees 16 readable bytes and the features.
            unsafe {
                // Interleaved below zero words, each word lands in the upper half of a 32-bit
                // lane: the bits of the f32 of the same value. One load serves both parts.
                let words = _mm_loadu_si128(p.cast());
                let bits = if part == 0 {
                    _mm_unpacklo_epi16(_mm_setzero_si128(), words)
                } else {
                    _mm_unpackhi_epi16(_mm_setzero_si128(), words)
                };
                Ymm(_mm256_cvtps_pd(_mm_castsi128_ps(bits)))
            }
        }
    }

    impl Widen<Ymm> for F16 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, part: usize) -> Ymm {
            let p = p.wrapping_add(part * 4 * Self::SIZE);
            // SAFETY: the caller guarantees 8 readable bytes and the features.
            unsafe { Ymm(_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(p.cast())))) }
        }
    }

    impl Widen<Ymm> for F32 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, part: usize) -> Ymm {
            let p = p.wrapping_add(part * 4 * Self::SIZE);
            // SAFETY: the caller guarantees 16 readable bytes and the features.
            unsafe { Ymm(_mm256_cvtps_pd(_mm_loadu_ps(p.cast()))) }
        }
    }

    impl Widen<Ymm> for F64 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, part: usize) -> Ymm {
            let p = p.wrapping_add(part * 4 * Self::SIZE);
            // SAFETY: the caller guarantees 32 readable bytes and the features.
            unsafe { Ymm(_mm256_loadu_pd(p.cast())) }
        }
    }

    impl Widen<Ymm> for F8E4M3 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, part: usize) -> Ymm {
            // SAFETY: the caller guarantees the group's 8 bytes and the features.
            unsafe {
                // The group's eight words, made once for both parts (the compiler merges the two).
                let words = e4m3_as_f16(_mm_loadl_epi64(p.cast()));
                let words = if part == 0 { words } else { _mm_unpackhi_epi64(words, words) };
                Ymm(_mm256_cvtps_pd(_mm_cvtph_ps(words)))
            }
        }
    }

    impl Widen<Ymm> for F8E5M2 {
        #[inline(always)]
        unsafe fn widen(p: *const u8, part: usize) -> Ymm {
            // SAFETY: the caller guarantees the group's 8 bytes and the features.
            unsafe {
                let words = e5m2_as_f16(_mm_loadl_epi64(p.cast()));
                let words = if part == 0 { words } else { _mm_unpackhi_epi64(words, words) };
                Ymm(_mm256_cvtps_pd(_mm_cvtph_ps(words)))
            }
        }
    }
}
