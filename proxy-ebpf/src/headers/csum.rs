//! Checksum arithmetic: one's complement sums and their differences, for headers the programs
//! write whole (rejects, the DSR option) and for fields they replace (the address rewrites at
//! tc through the kernel's checksum helpers, at XDP by hand: XDP has none).

use aya_ebpf::helpers::generated::bpf_csum_diff;

/// RFC 1624 incremental update of a checksum field (as stored, big-endian) for bytes `old`
/// replaced by `new` (an even number of bytes at an even offset).
#[inline(always)]
pub fn csum_update<const N: usize>(check: [u8; 2], old: &[u8; N], new: &[u8; N]) -> [u8; 2] {
    let mut s: u32 = u32::from(!u16::from_be_bytes(check));
    let mut i = 0;
    while i + 1 < N {
        s += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        s += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_be_bytes()
}

/// Folds a 32-bit one's complement sum into a checksum field value.
#[inline(always)]
pub fn fold(sum: i64) -> u16 {
    let mut s = sum as u32 as u64;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// One's complement sum of `buf` (length a multiple of 4) added to `seed`.
#[inline(always)]
pub fn sum(buf: &mut [u8], seed: i64) -> Result<i64, i64> {
    // SAFETY: a stack buffer of the given length.
    let s = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
            seed as u32,
        )
    };
    if s < 0 { Err(s) } else { Ok(s) }
}

/// The difference of two 16-byte fields (an IPv6 address, or a shorter field zero-padded), to
/// hand to the kernel's checksum helpers.
#[inline(always)]
pub fn diff16(from: &mut [u8; 16], to: &mut [u8; 16]) -> Result<i64, i64> {
    // SAFETY: two 16-byte stack buffers.
    let diff =
        unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 { Err(diff) } else { Ok(diff) }
}

/// The checksum of a whole header of `N` bytes (its checksum field zero), as stored.
#[inline(always)]
pub fn header_checksum<const N: usize>(h: &[u8; N]) -> [u8; 2] {
    let mut s: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        s += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_be_bytes()
}

/// The one's complement difference `new - old` of a field of `N` bytes (even), as the kernel's
/// checksum helpers take it ("by difference", size 0): its words as loaded from memory, the
/// order the kernel sums in, not folded.
#[inline(always)]
pub fn diff<const N: usize>(old: &[u8; N], new: &[u8; N]) -> u32 {
    const { assert!(N % 2 == 0) };
    let mut s: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        s += u32::from(!u16::from_ne_bytes([old[i], old[i + 1]]));
        s += u32::from(u16::from_ne_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    s
}

/// A checksum field (as stored) updated by a difference `diff` (`diff`), as the kernel's
/// `csum_replace_by_diff` does.
#[inline(always)]
pub fn apply(check: [u8; 2], diff: u32) -> [u8; 2] {
    let mut s = u64::from(diff) + u64::from(!u16::from_ne_bytes(check));
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}
