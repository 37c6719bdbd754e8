//! Reads of an skb at tc (straight from its linear data where the bytes are there), and
//! whole-packet writes, for the packets the programs turn into answers in place (ICMP errors)
//! and send back where they came from.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_RECOMPUTE_CSUM,
    helpers::{
        bpf_redirect,
        generated::{
            bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail, bpf_skb_load_bytes,
            bpf_skb_store_bytes,
        },
    },
    programs::TcContext,
};

use super::maps::no_link_header;

/// Reads a `T` at `off`: straight from the skb's linear data when it holds those bytes (the
/// usual case: headers are pulled into it), else through `bpf_skb_load_bytes`, a helper call
/// and a copy, which the per-packet path would otherwise pay for every header it reads.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, i64> {
    let (start, end) = bounds(ctx);
    let at = start + off;
    if at + core::mem::size_of::<T>() <= end {
        // SAFETY: inside the linear data, checked just above; an unaligned read of plain
        // bytes.
        return Ok(unsafe { (at as *const T).read_unaligned() });
    }
    ctx.load::<T>(off)
}

/// Loads the bytes at `off` straight into `out` (a whole buffer, or the part of one an answer
/// is built in): one helper call and no copy, where `load` goes through a `T` on the stack.
/// For frames at the end of call chains near the verifier's stack limit. Inlined, so that
/// `out`'s length is a constant the verifier sees (aya's `load_bytes` clamps the length to
/// the packet, which the verifier cannot bound away from zero).
#[inline(always)]
pub fn load_into(ctx: &TcContext, off: usize, out: &mut [u8]) -> Result<(), i64> {
    // SAFETY: a helper call writing exactly `out.len()` bytes into `out`.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            off as u32,
            out.as_mut_ptr().cast(),
            out.len() as u32,
        )
    };
    if rc == 0 { Ok(()) } else { Err(rc) }
}

/// Whether the skb's first `len` bytes are in its linear data, pulled there when they are
/// not (a packet whose headers the driver left in page fragments: rare).
#[inline(always)]
pub fn linear(ctx: &TcContext, len: usize) -> bool {
    let (start, end) = bounds(ctx);
    start + len <= end || ctx.pull_data(len as u32).is_ok()
}

/// Reads a `T` at `off` from the skb's linear data only (after `linear`): no helper fallback,
/// whose path the verifier would walk on to the program's end.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, i64> {
    let (start, end) = bounds(ctx);
    let at = start + off;
    if at + core::mem::size_of::<T>() > end {
        return Err(-1);
    }
    // SAFETY: inside the linear data, checked just above; an unaligned read of plain bytes.
    Ok(unsafe { (at as *const T).read_unaligned() })
}

/// Writes `bytes` at `off`, straight into the skb's linear data (the verifier then makes the
/// program unclone a cloned skb before it runs); an error when they are not there (`linear`
/// first). No fallback through `bpf_skb_store_bytes`: every path it added would be walked by
/// the verifier to the program's end. The skb's checksum state is left alone: the caller
/// updates the checksum fields the bytes are part of, and a CHECKSUM_COMPLETE skb's packet sum
/// where no checksum field absorbs the change (IPv6: `Ip::complete_addrs`).
#[inline(always)]
pub fn write<const N: usize>(ctx: &TcContext, off: usize, bytes: &[u8; N]) -> Result<(), i64> {
    let (start, end) = bounds(ctx);
    let at = start + off;
    if at + N > end {
        return Err(-1);
    }
    // SAFETY: inside the linear data, checked just above; an unaligned write of plain bytes.
    unsafe { (at as *mut [u8; N]).write_unaligned(*bytes) };
    Ok(())
}

/// The linear data's start and end.
#[inline(always)]
fn bounds(ctx: &TcContext) -> (usize, usize) {
    // SAFETY: the program's own context, valid while it runs; plain field loads, volatile so
    // that a caller kept out of line reads them itself (see `access::xdp::bounds`).
    unsafe {
        (
            core::ptr::read_volatile(&(*ctx.skb.skb).data) as usize,
            core::ptr::read_volatile(&(*ctx.skb.skb).data_end) as usize,
        )
    }
}

/// Writes `bytes` at `off`.
#[inline(always)]
pub fn store(ctx: &TcContext, off: usize, bytes: &[u8]) -> Result<(), i64> {
    // SAFETY: plain helper call on this context with a stack buffer of the given length.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.as_ptr().cast(),
            off as u32,
            bytes.as_ptr().cast(),
            bytes.len() as u32,
            BPF_F_RECOMPUTE_CSUM as u64,
        )
    };
    if rc < 0 { Err(rc) } else { Ok(()) }
}

/// Cuts (or grows) the packet to `len` bytes.
#[inline(always)]
pub fn set_len(ctx: &TcContext, len: usize) -> Result<(), i64> {
    // SAFETY: plain helper call on this context.
    let rc = unsafe { bpf_skb_change_tail(ctx.as_ptr().cast(), len as u32, 0) };
    if rc < 0 { Err(rc) } else { Ok(()) }
}

/// Puts a link-layer header of `len` bytes in front of a packet that has none (one from a
/// device without a link-layer header): zeroes, ending in `ethertype` (an Ethernet header's
/// shape). The helper grows the head (and makes the bytes the skb's own) and sets the skb's
/// MAC header there.
#[inline(always)]
pub fn push_link_header(ctx: &TcContext, len: usize, ethertype: u16) -> Result<(), i64> {
    // SAFETY: plain helper call on this context; no flags.
    let rc = unsafe { bpf_skb_change_head(ctx.as_ptr().cast(), len as u32, 0) };
    if rc < 0 {
        return Err(rc);
    }
    write(ctx, len - 2, &ethertype.to_be_bytes())
}

/// Swaps the Ethernet source and destination: the frame goes back to the hop it came from.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), i64> {
    let mut macs = ctx.load::<[u8; 12]>(0)?;
    let mut i = 0;
    while i < 6 {
        macs.swap(i, i + 6);
        i += 1;
    }
    store(ctx, 0, &macs)
}

/// Sends the packet, turned into an answer with its MACs swapped, back out of the interface it
/// came in on; through the kernel's route out of it when it has no link-layer header
/// (`maps::no_link_header`).
#[inline(always)]
pub fn send_back(ctx: &TcContext) -> i32 {
    // SAFETY: reading the context's own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if no_link_header(ifindex) {
        // SAFETY: plain helper call; NULL params make the kernel route the packet.
        return unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 };
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
