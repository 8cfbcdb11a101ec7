//! mergekit's half-precision arithmetic (`dtype: bfloat16` / `float16`), reproduced bit for bit.
//!
//! torch's CPU kernels compute a bf16 or f16 operation in f32 and round the result to the half
//! type (round to nearest, ties to even); a reduction (`sum(dim=0)`) accumulates in f32 and rounds
//! once; a Python scalar operand stays f32. mergekit does every step of a method in the loaded
//! dtype, so the result differs from rounding the exact value once: modelkin follows its order.

/// A half-precision arithmetic dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Half {
    /// bfloat16 (8-bit exponent, 8-bit significand).
    Bf16,
    /// IEEE float16.
    F16,
}

impl Half {
    /// Rounds an f32 result to this type, as torch stores it (round to nearest even).
    #[inline(always)]
    pub(crate) fn round(self, v: f32) -> f32 {
        match self {
            Half::Bf16 => half::bf16::from_f32(v).to_f32(),
            Half::F16 => half::f16::from_f32(v).to_f32(),
        }
    }

    /// Rounds a stored value to this type, as mergekit's load does (`tensor.to(dtype)`).
    #[inline(always)]
    pub(crate) fn load(self, v: f64) -> f64 {
        f64::from(self.round(v as f32))
    }
}

#[cfg(test)]
mod tests {
    use super::Half;

    #[test]
    fn rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one.
        assert_eq!(Half::Bf16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(Half::Bf16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(Half::F16.round(1.0 + 1.0 / 2048.0), 1.0);
        assert_eq!(Half::F16.round(65520.0), f32::INFINITY);
        assert_eq!(Half::Bf16.load(0.1), f64::from(half::bf16::from_f32(0.1).to_f32()));
    }
}
