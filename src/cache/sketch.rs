//! TinyLFU's frequency sketch: how often each entry was asked for lately, in a few bits.
//!
//! A count-min sketch of 4-bit counters, four rows: an entry's frequency is the smallest of its
//! four counters, which over-counts only where every row collides. Every `10 × width`
//! increments all counters are halved, so the sketch follows what is popular now rather than
//! what was popular once (the "reset" of Einziger, Friedman and Manes, *TinyLFU: A Highly
//! Efficient Cache Admission Policy*, 2017). Its size is fixed when it is made: 4 rows of
//! `width` half-bytes.

/// Most a counter counts to.
const MAX: u8 = 15;

#[derive(Debug)]
pub(super) struct Sketch {
    /// Four rows of `width` counters, two per byte.
    rows: [Vec<u8>; 4],
    mask: usize,
    /// Increments since the last halving.
    added: usize,
    /// Halve every counter after this many increments.
    period: usize,
}

impl Sketch {
    /// A sketch with a power of two of counters per row, at least `width`.
    pub(super) fn new(width: usize) -> Sketch {
        let width = width.clamp(64, 1 << 24).next_power_of_two();
        Sketch {
            rows: std::array::from_fn(|_| vec![0; width / 2]),
            mask: width - 1,
            added: 0,
            period: width * 10,
        }
    }

    /// The counter of `hash` in each row: four indexes from one 64-bit hash, each row mixing
    /// it with its own odd constant.
    fn slots(&self, hash: u64) -> [usize; 4] {
        const SEEDS: [u64; 4] = [
            0x9e37_79b9_7f4a_7c15,
            0xc2b2_ae3d_27d4_eb4f,
            0x1656_67b1_9e37_79f9,
            0x85eb_ca77_c2b2_ae63,
        ];
        SEEDS.map(|seed| {
            let mixed = hash.wrapping_mul(seed);
            ((mixed ^ (mixed >> 29)) as usize) & self.mask
        })
    }

    fn get_counter(row: &[u8], slot: usize) -> u8 {
        (row[slot / 2] >> ((slot % 2) * 4)) & 0x0f
    }

    /// How often `hash` was counted lately (0 to 15).
    pub(super) fn frequency(&self, hash: u64) -> u8 {
        let slots = self.slots(hash);
        (0..4)
            .map(|row| Self::get_counter(&self.rows[row], slots[row]))
            .min()
            .unwrap_or(0)
    }

    /// Counts one more use of `hash`.
    pub(super) fn add(&mut self, hash: u64) {
        let slots = self.slots(hash);
        let current = self.frequency(hash);
        if current < MAX {
            // Conservative update: only the counters at the minimum grow, which keeps the
            // over-counting of colliding entries down.
            for (row, slot) in slots.into_iter().enumerate() {
                if Self::get_counter(&self.rows[row], slot) == current {
                    self.rows[row][slot / 2] += 1 << ((slot % 2) * 4);
                }
            }
        }
        self.added += 1;
        if self.added >= self.period {
            self.halve();
        }
    }

    fn halve(&mut self) {
        self.added /= 2;
        for row in &mut self.rows {
            for pair in row.iter_mut() {
                // Both half-bytes at once: shift right, then drop what crossed from the high
                // half into the low one.
                *pair = (*pair >> 1) & 0x77;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_saturate_and_halve() {
        let mut sketch = Sketch::new(64);
        for _ in 0..20 {
            sketch.add(7);
        }
        assert_eq!(sketch.frequency(7), MAX);
        assert_eq!(sketch.frequency(8), 0);
        sketch.halve();
        assert_eq!(sketch.frequency(7), MAX / 2);
    }

    #[test]
    fn the_popular_outcount_the_rare() {
        let mut sketch = Sketch::new(1024);
        for _ in 0..5 {
            for key in 0..200u64 {
                sketch.add(key.wrapping_mul(0x1234_5678_9abc_def1));
            }
            for _ in 0..5 {
                for key in 0..10u64 {
                    sketch.add(key.wrapping_mul(0x1234_5678_9abc_def1));
                }
            }
        }
        let hot = sketch.frequency(3u64.wrapping_mul(0x1234_5678_9abc_def1));
        let cold = sketch.frequency(150u64.wrapping_mul(0x1234_5678_9abc_def1));
        assert!(hot > cold, "hot {hot} cold {cold}");
    }
}
