//! The paged KV layout that the per-sequence cache ([`crate::kv_cache`]) and the shared pool
//! ([`crate::kv_pool`]) agree on: the block size and how a block table maps a token position to
//! a storage row. Both import it; neither imports the other for it, so the cache depends on the
//! pool and never the other way round.

/// Tokens per KV block; capacity is always a whole number of blocks.
pub const BLOCK_TOKENS: usize = 16;

/// The pool row that holds position `pos` of a sequence with block table `table`.
///
/// The caller has reserved blocks through `pos` (`pos < table.len() * BLOCK_TOKENS`).
pub(crate) fn pool_row(table: &[u32], pos: usize) -> u32 {
    table[pos / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (pos % BLOCK_TOKENS) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_walk_the_block_table() {
        let table = [3, 0, 7];
        assert_eq!(pool_row(&table, 0), 3 * BLOCK_TOKENS as u32);
        assert_eq!(
            pool_row(&table, BLOCK_TOKENS - 1),
            4 * BLOCK_TOKENS as u32 - 1
        );
        assert_eq!(pool_row(&table, BLOCK_TOKENS), 0);
        assert_eq!(
            pool_row(&table, 2 * BLOCK_TOKENS + 5),
            7 * BLOCK_TOKENS as u32 + 5
        );
    }
}
