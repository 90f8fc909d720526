//! A cheap hash for maps on the path of every connection whose keys redmux picks itself
//! (client ids) or whose size it bounds (shared connections, `max_shared` of them): SipHash,
//! std's default, resists keys chosen to collide, which neither map needs, and cost about 600
//! instructions per connection between them, 3% of a connection that sends one request.
//!
//! The mixing is FxHash's (the Rust compiler's own): each word is rotated in and multiplied
//! by an odd constant, so sequential ids land in distinct buckets.

use std::hash::{BuildHasherDefault, Hasher};

/// A map's `S` parameter for [`Fx`].
pub(crate) type Fast = BuildHasherDefault<Fx>;

/// FxHash: one rotate, xor and multiply per word.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Fx(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Fx {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut buf = [0u8; 8];
            buf.copy_from_slice(word);
            self.add(u64::from_le_bytes(buf));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            // The length too, so that trailing zero bytes are not lost.
            self.add(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 56));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, hash::BuildHasher};

    use super::*;

    /// Sequential ids, as clients get them, fill a table's buckets evenly: the low bits that
    /// pick a bucket differ for every id of a run.
    #[test]
    fn sequential_ids_take_distinct_buckets() {
        let buckets: HashSet<u64> = (1..=4096u64)
            .map(|id| Fast::default().hash_one(id) & 4095)
            .collect();
        assert_eq!(buckets.len(), 4096);
    }

    /// Bytes that differ only in trailing zeros hash apart.
    #[test]
    fn trailing_zeros_count() {
        let hash = |bytes: &[u8]| {
            let mut fx = Fx::default();
            fx.write(bytes);
            fx.finish()
        };
        assert_ne!(hash(b"ab"), hash(b"ab\0"));
        assert_ne!(hash(b""), hash(b"\0"));
    }
}
