//! `{partition}`: the partition an aggregate belongs to, computed as Kafka's default
//! partitioner does for a key (and as the relay's own Kafka producer does, with librdkafka's
//! `murmur2_random` partitioner): `toPositive(murmur2(key)) mod partitions`, where `murmur2` is
//! the 32-bit MurmurHash2 with Kafka's seed and `toPositive` clears the sign bit. So one
//! aggregate gets the same partition number on RabbitMQ (one queue per partition) as on a
//! Kafka topic with as many partitions.

/// The partition of `aggregate_id` among `partitions` (at least 1).
pub fn of(aggregate_id: &str, partitions: u32) -> u32 {
    (murmur2(aggregate_id.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's `Utils.murmur2`: MurmurHash2, 32 bits, seed `0x9747b28c`, little-endian blocks.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values Kafka's own tests expect of `Utils.murmur2` (as Java ints).
    #[test]
    fn matches_kafkas_murmur2() {
        for (input, expected) in [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(input.as_bytes()) as i32, expected, "{input}");
        }
    }

    #[test]
    fn partitions_are_below_the_count_and_spread() {
        let mut seen = [0u32; 8];
        for i in 0..8_000 {
            let p = of(&format!("wallet-{i}"), 8);
            seen[p as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        assert_eq!(of("anything", 1), 0);
    }
}
