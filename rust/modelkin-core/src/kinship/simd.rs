//! Eight f64 partial sums held in registers — one AVX-512 register, two AVX2 ones, or a plain
//! array — behind one trait, so each explicit SIMD kernel is written once and compiled per level.
//!
//! LLVM leaves multi-accumulator reductions scalar under strict floating-point rules; these types
//! keep the vector width explicit while the summation order stays the same on every level.

/// Partial sums per accumulator.
pub(crate) const LANES: usize = 8;

/// Eight partial sums in memory.
pub(crate) type Lanes = [f64; LANES];

/// `LANES` f64 values in registers.
pub(crate) trait Accumulator: Copy {
    /// Every lane set to `v`.
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn splat(v: f64) -> Self;
    /// # Safety
    /// `p` must be valid for reading `LANES` f64, and the CPU must have the type's features.
    unsafe fn load(p: *const f64) -> Self;
    /// # Safety
    /// `p` must be valid for writing `LANES` f64, and the CPU must have the type's features.
    unsafe fn store(self, p: *mut f64);
    /// self − other, lane by lane.
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn sub(self, other: Self) -> Self;
    /// self + x·y, lane by lane (fused where the CPU has FMA).
    /// # Safety
    /// The CPU must have the type's features.
    unsafe fn add_product(self, x: Self, y: Self) -> Self;
}

impl Accumulator for Lanes {
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
    unsafe fn sub(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] - other[l])
    }
    #[inline(always)]
    unsafe fn add_product(self, x: Self, y: Self) -> Self {
        // Without FMA a product is rounded before it is added, as in a plain loop.
        std::array::from_fn(|l| self[l] + x[l] * y[l])
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::Accumulator;

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512d);

    impl Accumulator for Avx512 {
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

    /// Two AVX2 registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2([__m256d; 2]);

    impl Accumulator for Avx2 {
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
}
