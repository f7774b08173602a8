//! The paged KV cache's bookkeeping: a pool of fixed-size blocks and per-sequence block tables.
//!
//! The storage itself lives in the backend (one pool per layer, `Backend::KvCache`); this module
//! decides which blocks a sequence owns and which slot each new token's keys and values go to.
//! Blocks return to the pool when a sequence is dropped or explicitly freed.

/// Hands out block indices from a fixed pool.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    num_blocks: usize,
    free: Vec<u32>,
}

impl BlockAllocator {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Hand out low indices first (pop from the back of a descending list).
        let free = (0..num_blocks as u32).rev().collect();
        Self { block_size, num_blocks, free }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks currently free.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn allocate(&mut self) -> Option<u32> {
        self.free.pop()
    }

    fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

/// The blocks one sequence owns and how many tokens they hold.
#[derive(Debug, Default)]
pub struct SequenceBlocks {
    table: Vec<u32>,
    len: usize,
}

/// The pool had too few free blocks.
#[derive(Debug, thiserror::Error)]
#[error("KV cache is full: {needed} more blocks needed, {free} free")]
pub struct OutOfBlocks {
    /// Blocks the request needed.
    pub needed: usize,
    /// Blocks that were free.
    pub free: usize,
}

impl SequenceBlocks {
    /// The block table (blocks in position order).
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// Tokens stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no tokens are stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reserves room for `n` more tokens and returns their cache slots. Allocates all needed
    /// blocks or none.
    pub fn append(&mut self, alloc: &mut BlockAllocator, n: usize) -> Result<Vec<u32>, OutOfBlocks> {
        let bs = alloc.block_size();
        let needed = (self.len + n).div_ceil(bs).saturating_sub(self.table.len());
        if needed > alloc.free_blocks() {
            return Err(OutOfBlocks { needed, free: alloc.free_blocks() });
        }
        for _ in 0..needed {
            // Cannot fail: checked above.
            if let Some(b) = alloc.allocate() {
                self.table.push(b);
            }
        }
        let slots = (self.len..self.len + n).map(|t| self.table[t / bs] * bs as u32 + (t % bs) as u32).collect();
        self.len += n;
        Ok(slots)
    }

    /// Returns every block to the pool.
    pub fn free(&mut self, alloc: &mut BlockAllocator) {
        alloc.release(self.table.drain(..));
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_block_table_and_blocks_come_back() {
        let mut a = BlockAllocator::new(4, 2);
        let mut s = SequenceBlocks::default();
        assert_eq!(s.append(&mut a, 3).expect("room"), vec![0, 1, 2]);
        let mut other = SequenceBlocks::default();
        assert_eq!(other.append(&mut a, 1).expect("room"), vec![4]);
        assert_eq!(s.append(&mut a, 2).expect("room"), vec![3, 6]);
        assert_eq!(s.table(), &[0, 1, 3]);
        let err = other.append(&mut a, 5).expect_err("full");
        assert_eq!((err.needed, err.free), (2, 0));
        s.free(&mut a);
        other.free(&mut a);
        assert_eq!(a.free_blocks(), 4);
    }
}
