//! Headers of the packets the programs answer with (ICMP errors): an IPv4 header with its
//! checksum, an ICMPv6 error's IPv6 header, the IPv6 pseudo header's sum for an ICMPv6
//! checksum.

use aya_ebpf::helpers::generated::bpf_csum_diff;

use super::{
    IPPROTO_ICMPV6,
    csum::{fold, sum},
};

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

/// Writes into `hdr` the IPv6 header of an ICMPv6 error with `len` bytes of payload, from the
/// quoted packet's destination to its source; `quote` starts at the quoted IPv6 header. The
/// addresses go from buffer to buffer, with no copy on the stack (these frames end call chains
/// near the verifier's stack limit).
#[inline(always)]
pub fn ipv6_error_header(hdr: &mut [u8; 40], quote: &[u8], len: u16) {
    *hdr = [0u8; 40];
    hdr[0] = 0x60;
    let l = len.to_be_bytes();
    hdr[4] = l[0];
    hdr[5] = l[1];
    hdr[6] = IPPROTO_ICMPV6;
    hdr[7] = TTL;
    let mut i = 0;
    while i < 16 {
        hdr[8 + i] = quote[24 + i];
        hdr[24 + i] = quote[8 + i];
        i += 1;
    }
}

/// Sum of the pseudo header of a packet with IPv6 header `hdr`, `len` bytes of payload `next`:
/// the addresses summed where they are (no copy of the pseudo header on the stack, whose
/// frames are near the verifier's limit), then the length and next header.
#[inline(always)]
pub fn pseudo6_sum(hdr: &[u8; 40], len: u32, next: u8) -> Result<i64, i64> {
    // SAFETY: 32 bytes of a stack buffer of 40 from offset 8; the helper only reads them.
    let s = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            hdr.as_ptr().add(8).cast_mut().cast(),
            32,
            0,
        )
    };
    if s < 0 {
        return Err(s);
    }
    let l = len.to_be_bytes();
    let mut tail = [l[0], l[1], l[2], l[3], 0, 0, 0, next];
    sum(&mut tail, s)
}
