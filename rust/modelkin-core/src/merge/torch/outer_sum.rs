//! torch's CPU `sum` over the first axis of a row-major matrix, reproduced bit for bit.
//!
//! mergekit reduces a matrix along its first axis when it transposes it and sums along the last
//! (nuslerp with `nuslerp_row_wise`). torch then sums each column down the rows
//! (`vectorized_outer_sum`, or `scalar_outer_sum` when the matrix is narrower than one vector) in
//! one of two orders, picked by the column's position, not its values:
//! - columns in whole groups of four vectors (of four columns below one vector) add their rows one
//!   after another into four cascade levels (`multi_row_sum`);
//! - the columns after them (`row_sum`) spread their rows over four partial sums in turn, cascade
//!   those the same way over a quarter of the rows, add the last `rows % 4` rows to the first, then
//!   fold the four.
//!
//! torch's threads split the columns only at multiples of 128 bytes, so neither order depends on
//! them. Accumulation is in float32 for every float dtype, as torch's accumulate type is.

/// torch's four-level cascade of partial sums (`multi_row_sum`) over `width` accumulators: after
/// every run of `2^power` rows, level j takes level j − 1 while the row count is a multiple of
/// level j's span.
#[derive(Debug, Clone)]
struct Cascade {
    width: usize,
    power: u32,
    rows: usize,
    levels: Vec<f32>,
}

/// `max(4, CeilLog2(rows) / 4)`: the span of torch's first level, as a power of two.
pub(super) fn level_power(rows: usize) -> u32 {
    let ceil_log2 = if rows <= 2 { 1 } else { usize::BITS - (rows - 1).leading_zeros() };
    (ceil_log2 / 4).max(4)
}

impl Cascade {
    fn new(width: usize, rows: usize) -> Self {
        Cascade { width, power: level_power(rows), rows: 0, levels: vec![0.0; 4 * width] }
    }

    fn add(&mut self, slot: usize, v: f32) {
        self.levels[slot] += v;
    }

    fn end_row(&mut self) {
        self.rows += 1;
        let mask = (1usize << self.power) - 1;
        if self.rows & mask != 0 {
            return;
        }
        let w = self.width;
        for j in 1..4 {
            let (lower, upper) = self.levels.split_at_mut(j * w);
            for (up, low) in upper[..w].iter_mut().zip(&mut lower[(j - 1) * w..]) {
                *up += *low;
                *low = 0.0;
            }
            if self.rows & (mask << (j as u32 * self.power)) != 0 {
                break;
            }
        }
    }

    /// Every level added into the first, in order.
    fn fold(&self) -> Vec<f32> {
        let mut out = self.levels[..self.width].to_vec();
        for level in self.levels.chunks(self.width.max(1)).skip(1) {
            out.iter_mut().zip(level).for_each(|(o, v)| *o += v);
        }
        out
    }
}

/// torch's sum over the first axis of a row-major `[rows, cols]` float matrix, fed its elements in
/// memory order.
#[derive(Debug, Clone)]
pub(crate) struct OuterSum {
    cols: usize,
    /// Columns `..grouped` take the plain cascade, the rest the interleaved one.
    grouped: usize,
    /// Rows in the interleaved cascade's groups of four (`rows / 4 * 4`).
    interleaved_rows: usize,
    plain: Cascade,
    interleaved: Cascade,
    /// The interleaved columns' last `rows % 4` rows, row by row.
    leftover: Vec<f32>,
    row: usize,
    col: usize,
}

impl OuterSum {
    /// A sum over `rows` rows of `cols` columns of a dtype whose torch vector holds `vector` values
    /// (8 for float32, 16 for bfloat16 and float16).
    pub(crate) fn new(rows: usize, cols: usize, vector: usize) -> Self {
        let group = if cols >= vector { 32 } else { 4 };
        let grouped = cols / group * group;
        let rest = cols - grouped;
        OuterSum {
            cols,
            grouped,
            interleaved_rows: rows / 4 * 4,
            plain: Cascade::new(grouped, rows),
            interleaved: Cascade::new(4 * rest, rows / 4),
            leftover: Vec::with_capacity(rest * (rows % 4)),
            row: 0,
            col: 0,
        }
    }

    /// Adds the next element in memory order.
    pub(crate) fn add(&mut self, v: f32) {
        let (row, col) = (self.row, self.col);
        if col < self.grouped {
            self.plain.add(col, v);
        } else if row < self.interleaved_rows {
            self.interleaved.add((col - self.grouped) * 4 + row % 4, v);
        } else {
            self.leftover.push(v);
        }
        self.col += 1;
        if self.col == self.cols {
            self.col = 0;
            self.row += 1;
            self.plain.end_row();
            if row % 4 == 3 && row < self.interleaved_rows {
                self.interleaved.end_row();
            }
        }
    }

    /// Each column's sum, as torch stores it (added to the zeroed output).
    pub(crate) fn finish(&self) -> Vec<f32> {
        let mut sums = self.plain.fold();
        let partials = self.interleaved.fold();
        let rest = self.cols - self.grouped;
        for (c, four) in partials.chunks(4).enumerate().take(rest) {
            let mut first = four[0];
            for v in self.leftover.iter().skip(c).step_by(rest) {
                first += v;
            }
            sums.push(four[1..].iter().fold(first, |sum, p| sum + p));
        }
        sums.into_iter().map(|s| 0.0 + s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::OuterSum;

    fn sums(rows: usize, cols: usize, vector: usize, value: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut sum = OuterSum::new(rows, cols, vector);
        for r in 0..rows {
            for c in 0..cols {
                sum.add(value(r, c));
            }
        }
        sum.finish()
    }

    /// The two orders on values where they differ: 1e8 swallows what is added to it before the
    /// −1e8 comes back.
    #[test]
    fn grouped_columns_add_rows_in_order_and_the_rest_interleave() {
        let value = |r: usize, _c: usize| [1e8f32, 1.0, -1e8, 1.0, 0.5][r];
        // 36 float32 columns: 32 grouped, 4 interleaved.
        let out = sums(5, 36, 8, value);
        // In order: ((((1e8 + 1) − 1e8) + 1) + 0.5) = 1.5.
        assert!(out[..32].iter().all(|&s| s == 1.5), "{out:?}");
        // Interleaved: partials [1e8 + 0.5, 1, −1e8, 1], folded: ((1e8 + 0.5) + 1 − 1e8) + 1 = 1.
        assert!(out[32..].iter().all(|&s| s == 1.0), "{out:?}");
        // Below one vector of columns the groups are four wide: 4 grouped, 2 interleaved.
        let narrow = sums(5, 6, 8, value);
        assert_eq!(narrow, [1.5, 1.5, 1.5, 1.5, 1.0, 1.0]);
    }

    /// Bit patterns torch 2.15 gave for `torch.sum(x.T, dim=-1)` of these float32 matrices.
    #[test]
    fn cascades_long_columns_as_torch_does() {
        let value =
            |r: usize, c: usize| (((r * 7919 + c * 104_729) % 1000) as f64 / 997.0 - 0.5) as f32 * 1e-3;
        let out = sums(5000, 33, 8, value);
        let bits: Vec<u32> = [0, 1, 31, 32].iter().map(|&c| out[c].to_bits()).collect();
        assert_eq!(bits, [0x3ba4_5544, 0x3ba4_5542, 0x3ba4_5544, 0x3ba4_553c]);
    }
}
