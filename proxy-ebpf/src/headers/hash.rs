//! The flow hash (murmur3's mixing): every node runs the same code, so a flow hashes alike
//! everywhere (Maglev's consistency across nodes).

use super::Tuple;

/// Mixes one 32-bit word into a flow hash (murmur3's block step).
#[inline(always)]
pub fn mix(h: u32, word: u32) -> u32 {
    let mut k = word.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
    let h = (h ^ k).rotate_left(13);
    h.wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// murmur3's finalizer: spreads the mixed words over all 32 bits.
#[inline(always)]
pub fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of the ports and protocol, mixed into `h`.
#[inline(always)]
pub fn ports<A>(h: u32, t: &Tuple<A>) -> u32 {
    let h = mix(h, (u32::from(t.sport) << 16) | u32::from(t.dport));
    finish(mix(h, u32::from(t.proto)))
}
