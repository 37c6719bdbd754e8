//! Reads of an skb at tc (straight from its linear data where the bytes are there), and
//! whole-packet writes, for the packets the programs turn into answers in place (a reset, an
//! ICMP error) and send back where they came from.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_RECOMPUTE_CSUM,
    helpers::{
        bpf_redirect,
        generated::{bpf_skb_change_tail, bpf_skb_store_bytes},
    },
    programs::TcContext,
};

/// Reads a `T` at `off`: straight from the skb's linear data when it holds those bytes (the
/// usual case: headers are pulled into it), else through `bpf_skb_load_bytes`, a helper call
/// and a copy, which the per-packet path would otherwise pay for every header it reads.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, i64> {
    // SAFETY: the program's own context, valid while it runs; plain field loads, volatile so
    // that a caller kept out of line reads them itself (see `access::xdp::bounds`).
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.skb.skb).data) as usize,
            core::ptr::read_volatile(&(*ctx.skb.skb).data_end) as usize,
        )
    };
    let at = start + off;
    if at + core::mem::size_of::<T>() <= end {
        // SAFETY: inside the linear data, checked just above; an unaligned read of plain
        // bytes.
        return Ok(unsafe { (at as *const T).read_unaligned() });
    }
    ctx.load::<T>(off)
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
/// came in on.
#[inline(always)]
pub fn send_back(ctx: &TcContext) -> i32 {
    // SAFETY: reading the context's own skb; plain helper call.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}
