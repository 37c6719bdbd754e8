//! Headers of the packets the programs answer with (ICMP errors): an IPv4 header with its
//! checksum, the IPv6 pseudo header's sum for an ICMPv6 checksum.

use super::csum::{fold, sum};

/// The TTL or hop limit of an answer.
pub const TTL: u8 = 64;

/// An IPv4 header without options of a packet of `tot_len` bytes, its checksum set.
#[inline(always)]
pub fn ipv4_header(
    tot_len: u16,
    proto_: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
) -> Result<[u8; 20], i64> {
    let l = tot_len.to_be_bytes();
    let mut h = [
        0x45, 0, l[0], l[1], 0, 0, 0, 0, TTL, proto_, 0, 0, saddr[0], saddr[1], saddr[2], saddr[3],
        daddr[0], daddr[1], daddr[2], daddr[3],
    ];
    let c = fold(sum(&mut h, 0)?).to_ne_bytes();
    h[10] = c[0];
    h[11] = c[1];
    Ok(h)
}

/// An IPv6 header of an answer from `saddr` to `daddr` with `len` bytes of payload `next`.
#[inline(always)]
pub fn ipv6_header(len: u16, next: u8, saddr: &[u8; 16], daddr: &[u8; 16]) -> [u8; 40] {
    let mut h = [0u8; 40];
    let l = len.to_be_bytes();
    h[0] = 0x60;
    h[4] = l[0];
    h[5] = l[1];
    h[6] = next;
    h[7] = TTL;
    let mut i = 0;
    while i < 16 {
        h[8 + i] = saddr[i];
        h[24 + i] = daddr[i];
        i += 1;
    }
    h
}

/// Sum of the pseudo header of a packet with IPv6 header `hdr`, `len` bytes of payload `next`.
#[inline(always)]
pub fn pseudo6_sum(hdr: &[u8; 40], len: u32, next: u8) -> Result<i64, i64> {
    let mut p = [0u8; 40];
    let mut i = 0;
    while i < 32 {
        p[i] = hdr[8 + i];
        i += 1;
    }
    let l = len.to_be_bytes();
    p[32] = l[0];
    p[33] = l[1];
    p[34] = l[2];
    p[35] = l[3];
    p[39] = next;
    sum(&mut p, 0)
}
