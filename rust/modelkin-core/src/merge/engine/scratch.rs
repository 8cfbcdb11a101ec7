//! The merge's per-thread scratch memory: one pool of buffers per worker thread, reused block after
//! block by every stage (decoded inputs, merged values, task-vector terms, kinship deltas, f32
//! decodes, histogram tables). A stage takes the buffers it needs and they go back to the pool when
//! it is done, so nested stages (a block decoded, then merged from the decoded views) each hold
//! their own, and no stage keeps memory of its own between blocks.

use std::cell::RefCell;

use bytemuck::Pod;

/// Buffers that are all zero whenever they are in the pool: histogram tables, of which a pass
/// clears only the bins it touched (clearing a whole table per block would cost more than the
/// counting).
type Zeroed = Vec<Vec<u64>>;

thread_local! {
    /// This thread's buffers not taken now, and its all-zero ones.
    static POOL: RefCell<(Vec<Vec<u64>>, Zeroed)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Buffers taken from this thread's pool, in 8-byte words (so any element type up to f64 can view
/// them); they go back when this is dropped.
pub(crate) struct Scratch {
    buffers: Vec<Vec<u64>>,
    zeroed: bool,
}

impl Scratch {
    /// `count` buffers of at least `len` elements of `T`; what they hold is left from earlier use.
    pub(crate) fn take<T: Pod>(count: usize, len: usize) -> Scratch {
        Self::from_pool(count, len * std::mem::size_of::<T>(), false)
    }

    /// `count` all-zero buffers of at least `len` elements of `T`. They must be all zero again
    /// when dropped (the taker clears what it wrote).
    pub(crate) fn take_zeroed<T: Pod>(count: usize, len: usize) -> Scratch {
        Self::from_pool(count, len * std::mem::size_of::<T>(), true)
    }

    fn from_pool(count: usize, bytes: usize, zeroed: bool) -> Scratch {
        let words = bytes.div_ceil(8);
        let mut buffers = POOL.with_borrow_mut(|(free, zero)| {
            let list = if zeroed { zero } else { free };
            list.split_off(list.len().saturating_sub(count))
        });
        buffers.resize_with(count, Vec::new);
        for buffer in &mut buffers {
            if buffer.len() < words {
                // New words are zero, so an all-zero buffer stays all zero.
                buffer.resize(words, 0);
            }
        }
        Scratch { buffers, zeroed }
    }

    /// Each buffer viewed as `len` elements of `T`.
    pub(crate) fn views<T: Pod>(&mut self, len: usize) -> Vec<&mut [T]> {
        self.buffers.iter_mut().map(|b| &mut bytemuck::cast_slice_mut::<u64, T>(b)[..len]).collect()
    }

    /// The one buffer taken, viewed as `len` elements of `T`.
    pub(super) fn one<T: Pod>(&mut self, len: usize) -> &mut [T] {
        &mut bytemuck::cast_slice_mut::<u64, T>(&mut self.buffers[0])[..len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buffers = std::mem::take(&mut self.buffers);
        let zeroed = self.zeroed;
        // A thread ending drops its pool first; a buffer returned after that is simply freed.
        let _ = POOL.try_with(|pool| {
            let (free, zero) = &mut *pool.borrow_mut();
            if zeroed { zero } else { free }.extend(buffers);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Scratch;

    #[test]
    fn buffers_go_back_to_the_pool_and_nested_takers_get_their_own() {
        let mut outer = Scratch::take::<f64>(2, 16);
        let pointer = outer.views::<f64>(16)[0].as_ptr() as usize;
        outer.views::<f64>(16)[0].fill(1.5);
        {
            let mut inner = Scratch::take::<f32>(1, 8);
            assert_ne!(inner.one::<f32>(8).as_ptr() as usize, pointer);
        }
        drop(outer);
        // The same memory comes back, holding what it held.
        let mut again = Scratch::take::<f64>(2, 16);
        let views = again.views::<f64>(16);
        assert!(views.iter().any(|v| v.as_ptr() as usize == pointer && v[0] == 1.5));
        // Zeroed buffers come from their own list.
        let mut zero = Scratch::take_zeroed::<u32>(1, 64);
        assert!(zero.one::<u32>(64).iter().all(|&c| c == 0));
    }
}
