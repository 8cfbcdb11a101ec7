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

/// A half type's rounding of f32 results, written without branches so that loops over a block
/// vectorise (the `half` crate's conversions branch per element). Bit for bit the same as
/// [`Half::round`], NaN included.
pub(crate) trait Rounding {
    /// Rounds an f32 result to the half type (round to nearest even), returned as f32.
    fn round(v: f32) -> f32;
}

/// No rounding: float32 arithmetic.
pub(crate) struct NoRounding;

impl Rounding for NoRounding {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

/// bfloat16 rounding: the upper 16 bits of the f32, rounded to nearest even.
pub(crate) struct Bf16Rounding;

impl Rounding for Bf16Rounding {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        let x = v.to_bits();
        let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) & 0xffff_0000;
        // A NaN keeps its upper bits with the quiet bit set, as `half` converts it.
        let nan = (x & 0xffff_0000) | 0x0040_0000;
        f32::from_bits(if v.is_nan() { nan } else { rounded })
    }
}

/// IEEE float16 rounding: 11 significant bits in the normal range, multiples of 2^-24 below it,
/// infinity past the largest finite value.
pub(crate) struct F16Rounding;

impl Rounding for F16Rounding {
    #[inline(always)]
    fn round(v: f32) -> f32 {
        let x = v.to_bits();
        let sign = x & 0x8000_0000;
        let magnitude = f32::from_bits(x & 0x7fff_ffff);
        let normal = f32::from_bits((x & 0x7fff_ffff).wrapping_add(0x0fff + ((x >> 13) & 1)) & 0xffff_e000);
        // Below 2^-14 the spacing is 2^-24, the f32 spacing in [0.5, 1): adding 0.5 rounds there.
        let subnormal = (magnitude + 0.5) - 0.5;
        // 0x3880_0000 is 2^-14, the smallest normal float16.
        let rounded = if magnitude < f32::from_bits(0x3880_0000) { subnormal } else { normal };
        let rounded = if rounded > 65504.0 { f32::INFINITY } else { rounded };
        let out = f32::from_bits(rounded.to_bits() | sign);
        if v.is_nan() {
            f32::from_bits(x | 0x0040_0000)
        } else {
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Bf16Rounding, F16Rounding, Half, Rounding};

    /// The branchless roundings agree with the `half` crate's on a spread of every f32 class.
    #[test]
    fn branchless_rounding_matches_half() {
        let mut checked = 0u32;
        for bits in (0..=u32::MAX)
            .step_by(65_521)
            .chain(0x3380_0000..0x3390_0000)
            .chain(0x387f_0000..0x3881_0000)
            .chain(0x477f_e000..0x4780_2000)
        {
            let v = f32::from_bits(bits);
            let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            assert!(same(Bf16Rounding::round(v), Half::Bf16.round(v)), "bf16 of {v:e} ({bits:#x})");
            assert!(same(F16Rounding::round(v), Half::F16.round(v)), "f16 of {v:e} ({bits:#x})");
            checked += 1;
        }
        assert!(checked > 100_000);
    }

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
