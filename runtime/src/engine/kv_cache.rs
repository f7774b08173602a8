//! The paged KV cache's bookkeeping: a pool of fixed-size blocks, per-sequence block tables, and
//! the prefix cache.
//!
//! The storage itself lives in the backend (one pool per layer, `Backend::KvCache`); this module
//! decides which blocks a sequence owns and which slot each new token's keys and values go to.
//!
//! Blocks are reference-counted so that sequences with a common prefix share them. A *full*
//! block can be registered under a [`BlockHash`]: a hash of the adapter key, every token before
//! it and its own tokens, so the same tokens under another adapter (or another adapter
//! generation) never match. When the last sequence using a registered block lets it go, the
//! block stays cached (its contents intact) on a least-recently-released list and is only
//! reused for new data when no never-cached block is free. Usage counts blocks held by
//! sequences; cached-but-unused blocks count as free.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

/// Identity of a full block's contents: adapter key, all tokens up to and including the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 16]);

impl BlockHash {
    /// The hash of a block holding `tokens`, following the block hashed as `parent` (or the
    /// start of a sequence run with `adapter_key`).
    pub fn chain(parent: Option<BlockHash>, adapter_key: &[u8; 32], tokens: &[u32]) -> Self {
        let mut h = Sha256::new();
        match parent {
            Some(p) => {
                h.update([1u8]);
                h.update(p.0);
            }
            None => {
                h.update([0u8]);
                h.update(adapter_key);
            }
        }
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        let d = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&d[..16]);
        Self(out)
    }
}

/// Hands out block indices from a fixed pool and keeps the prefix cache.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    num_blocks: usize,
    /// Never-cached free blocks.
    free: Vec<u32>,
    refs: Vec<u32>,
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    /// Cached blocks no sequence holds, by release tick (oldest first).
    evictable: BTreeMap<u64, u32>,
    evictable_tick: Vec<u64>,
    tick: u64,
}

impl BlockAllocator {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Hand out low indices first (pop from the back of a descending list).
        let free = (0..num_blocks as u32).rev().collect();
        Self {
            block_size,
            num_blocks,
            free,
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            evictable_tick: vec![0; num_blocks],
            tick: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks that can be handed out now (never-cached free blocks plus cached blocks no
    /// sequence holds).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free_blocks()
    }

    /// Cached blocks no sequence holds (reusable by a later prefix match).
    pub fn cached_idle_blocks(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    fn release(&mut self, block: u32) {
        let i = block as usize;
        debug_assert!(self.refs[i] > 0, "block {block} released more often than acquired");
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] == 0 {
            if self.hash_of[i].is_some() {
                self.tick += 1;
                self.evictable_tick[i] = self.tick;
                self.evictable.insert(self.tick, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Looks up a cached block and takes a reference to it.
    fn acquire_cached(&mut self, hash: &BlockHash) -> Option<u32> {
        let b = *self.cached.get(hash)?;
        let i = b as usize;
        if self.refs[i] == 0 {
            self.evictable.remove(&self.evictable_tick[i]);
        }
        self.refs[i] += 1;
        Some(b)
    }

    /// Registers a full block under `hash` so later sequences can share it. Does nothing when
    /// the hash is already cached (another sequence computed the same block) or the block
    /// already has a hash.
    fn register(&mut self, block: u32, hash: BlockHash) {
        let i = block as usize;
        if self.hash_of[i].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        self.hash_of[i] = Some(hash);
        self.cached.insert(hash, block);
    }

    /// Forgets every cached block (their contents become unreachable).
    pub fn clear_prefix_cache(&mut self) {
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.hash_of[b as usize] = None;
            self.free.push(b);
        }
        for h in self.hash_of.iter_mut() {
            *h = None;
        }
        self.cached.clear();
    }
}

/// The blocks one sequence owns and how many tokens they hold.
#[derive(Debug, Default)]
pub struct SequenceBlocks {
    table: Vec<u32>,
    len: usize,
    /// Hashes of the leading full blocks (`hashes.len() <= table.len()`).
    hashes: Vec<BlockHash>,
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

    /// Blocks that `n` more tokens would need beyond those held.
    pub fn blocks_needed(&self, alloc: &BlockAllocator, n: usize) -> usize {
        (self.len + n).div_ceil(alloc.block_size()).saturating_sub(self.table.len())
    }

    /// Reserves room for `n` more tokens and returns their cache slots. Allocates all needed
    /// blocks or none.
    pub fn append(&mut self, alloc: &mut BlockAllocator, n: usize) -> Result<Vec<u32>, OutOfBlocks> {
        let bs = alloc.block_size();
        let needed = self.blocks_needed(alloc, n);
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

    /// Takes over the longest cached prefix of `tokens` (whole blocks only, and always leaving
    /// at least one token to compute, since its logits are needed). Must be called on an empty
    /// sequence. Returns the tokens reused.
    pub fn match_prefix(&mut self, alloc: &mut BlockAllocator, adapter_key: &[u8; 32], tokens: &[u32]) -> usize {
        debug_assert!(self.is_empty());
        let bs = alloc.block_size();
        let full = tokens.len().saturating_sub(1) / bs;
        let mut parent = None;
        for chunk in tokens.chunks(bs).take(full) {
            let h = BlockHash::chain(parent, adapter_key, chunk);
            match alloc.acquire_cached(&h) {
                Some(b) => {
                    self.table.push(b);
                    self.hashes.push(h);
                    self.len += bs;
                    parent = Some(h);
                }
                None => break,
            }
        }
        self.len
    }

    /// Registers every full block not yet registered; `tokens` are the sequence's tokens (at
    /// least `len()` of them, the ones stored in the cache).
    pub fn register_full_blocks(&mut self, alloc: &mut BlockAllocator, adapter_key: &[u8; 32], tokens: &[u32]) {
        let bs = alloc.block_size();
        let full = self.len.min(tokens.len()) / bs;
        while self.hashes.len() < full {
            let i = self.hashes.len();
            let h = BlockHash::chain(self.hashes.last().copied(), adapter_key, &tokens[i * bs..(i + 1) * bs]);
            alloc.register(self.table[i], h);
            self.hashes.push(h);
        }
    }

    /// Returns every block to the pool (registered blocks stay cached until reused).
    pub fn free(&mut self, alloc: &mut BlockAllocator) {
        for b in self.table.drain(..) {
            alloc.release(b);
        }
        self.hashes.clear();
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

    #[test]
    fn prefix_blocks_are_shared_per_adapter_key_and_evicted_last_released_first() {
        let key_a = [1u8; 32];
        let key_b = [2u8; 32];
        let mut a = BlockAllocator::new(6, 2);
        let toks = [5, 6, 7, 8, 9];
        let mut s1 = SequenceBlocks::default();
        assert_eq!(s1.match_prefix(&mut a, &key_a, &toks), 0);
        s1.append(&mut a, 5).expect("room");
        s1.register_full_blocks(&mut a, &key_a, &toks);
        // Same tokens, same key: two full blocks shared (the last token is left to compute).
        let mut s2 = SequenceBlocks::default();
        assert_eq!(s2.match_prefix(&mut a, &key_a, &toks), 4);
        assert_eq!(s2.table(), &s1.table()[..2]);
        assert_eq!(a.used_blocks(), 3);
        // Another adapter key never matches.
        let mut s3 = SequenceBlocks::default();
        assert_eq!(s3.match_prefix(&mut a, &key_b, &toks), 0);
        // A different first block breaks the chain even if the second block's tokens agree.
        assert_eq!(s3.match_prefix(&mut a, &key_a, &[0, 6, 7, 8, 9]), 0);
        s1.free(&mut a);
        assert_eq!(a.used_blocks(), 2);
        s2.free(&mut a);
        assert_eq!(a.used_blocks(), 0);
        assert_eq!(a.cached_idle_blocks(), 2);
        // Idle cached blocks still match...
        let mut s4 = SequenceBlocks::default();
        assert_eq!(s4.match_prefix(&mut a, &key_a, &toks), 4);
        s4.free(&mut a);
        // ...until pressure reuses them: all 6 blocks for one sequence evicts both.
        let mut big = SequenceBlocks::default();
        big.append(&mut a, 12).expect("room");
        assert_eq!(a.cached_idle_blocks(), 0);
        big.free(&mut a);
        let mut s5 = SequenceBlocks::default();
        assert_eq!(s5.match_prefix(&mut a, &key_a, &toks), 0);
        assert_eq!(a.free_blocks(), 6);
    }
}
