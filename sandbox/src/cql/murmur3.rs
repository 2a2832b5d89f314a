//! How a partition key becomes a token: Cassandra's Murmur3Partitioner, implemented here apart
//! from any driver so that the stand-in and the drivers it serves check each other.
//!
//! The token is the first 64 bits of the x64 128-bit MurmurHash3 (seed 0) of the serialized
//! partition key, with Cassandra's quirks: tail bytes are read as signed Java bytes (sign-extended
//! before they are shifted into place), and a hash of `i64::MIN` becomes `i64::MAX` (the minimum
//! token belongs to no partition). A compound partition key is serialized as each component's
//! 2-byte big-endian length, its bytes and a 0x00.

const C1: u64 = 0x87c3_7b91_1142_53d5;
const C2: u64 = 0x4cf5_ad43_2745_937f;

/// The token of a partition whose key columns serialize to `components` (in key order).
pub fn partition_token(components: &[&[u8]]) -> i64 {
    token(&partition_key_bytes(components))
}

/// The bytes a partition key hashes as: the value itself for one column, else each component
/// framed as length, bytes, 0x00 (what drivers call the routing key).
pub fn partition_key_bytes(components: &[&[u8]]) -> Vec<u8> {
    if let [one] = components {
        return one.to_vec();
    }
    let mut out = Vec::new();
    for c in components {
        out.extend_from_slice(&(c.len() as u16).to_be_bytes());
        out.extend_from_slice(c);
        out.push(0);
    }
    out
}

/// The Murmur3Partitioner token of a serialized partition key.
pub fn token(key: &[u8]) -> i64 {
    match hash_x64_128(key).0 as i64 {
        i64::MIN => i64::MAX,
        t => t,
    }
}

/// MurmurHash3 x64 128-bit with seed 0, as Cassandra's `MurmurHash.hash3_x64_128` computes it.
fn hash_x64_128(data: &[u8]) -> (u64, u64) {
    let (mut h1, mut h2) = (0u64, 0u64);
    let blocks = data.chunks_exact(16);
    let tail = blocks.remainder();
    for block in blocks {
        let k1 = u64::from_le_bytes(block[..8].try_into().expect("16-byte block"));
        let k2 = u64::from_le_bytes(block[8..].try_into().expect("16-byte block"));
        h1 ^= mix_k1(k1);
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= mix_k2(k2);
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    let (mut k1, mut k2) = (0u64, 0u64);
    for (i, &b) in tail.iter().enumerate() {
        // Java's `(long) key.get(i)`: a byte above 0x7f sets every bit above it.
        let v = b as i8 as i64 as u64;
        if i < 8 {
            k1 ^= v << (8 * i);
        } else {
            k2 ^= v << (8 * (i - 8));
        }
    }
    if tail.len() > 8 {
        h2 ^= mix_k2(k2);
    }
    if !tail.is_empty() {
        h1 ^= mix_k1(k1);
    }
    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix(h1);
    h2 = fmix(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    (h1, h2)
}

fn mix_k1(k: u64) -> u64 {
    k.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2)
}

fn mix_k2(k: u64) -> u64 {
    k.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1)
}

fn fmix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens as Cassandra reports them (`SELECT token(k)`; cqlsh's own tests for int 1 and 2)
    /// and as the Python driver computes them (`cassandra.murmur3.murmur3`, written to match
    /// Cassandra), covering full blocks, both tail halves and tail bytes above 0x7f.
    #[test]
    fn tokens_match_cassandra() {
        let cases: &[(&[u8], i64)] = &[
            (b"a", -8839064797231613815),
            (&1i32.to_be_bytes(), -4069959284402364209),
            (&2i32.to_be_bytes(), -3248873570005575792),
            (b"hello", -3758069500696749310),
            (&[0; 16], 5457549051747178710),
            (&[0xff; 15], -2195530867418009455),
            (&[0x80, 0x81, 0xfe, 0xff, 0x7f], 1949663256015749577),
            (b"123456789012345678901234567890", 6752176199885594596),
        ];
        for (key, want) in cases {
            assert_eq!(token(key), *want, "key {key:02x?}");
        }
        let forty: Vec<u8> = (0..40).collect();
        assert_eq!(token(&forty), -4350383952250503068);
    }

    /// A compound key hashes its framed components (the Python driver's routing key for the
    /// same values gives these tokens).
    #[test]
    fn a_compound_key_hashes_each_component_framed() {
        let one = 1i32.to_be_bytes();
        assert_eq!(
            partition_key_bytes(&[b"a", &one]),
            [0, 1, b'a', 0, 0, 4, 0, 0, 0, 1, 0]
        );
        assert_eq!(partition_token(&[b"a", &one]), 8247712171917364652);
        let day = 20000i32.to_be_bytes();
        assert_eq!(partition_token(&[b"user-1", &day]), 7260867636707958596);
        assert_eq!(
            partition_token(&[b"a"]),
            token(b"a"),
            "one column: its bytes"
        );
    }
}
