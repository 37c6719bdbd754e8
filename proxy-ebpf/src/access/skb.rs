//! Whole-packet writes of an skb at tc, for the packets the programs turn into answers in
//! place (a reset, an ICMP error) and send back where they came from.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_F_RECOMPUTE_CSUM,
    helpers::{
        bpf_redirect,
        generated::{bpf_skb_change_tail, bpf_skb_store_bytes},
    },
    programs::TcContext,
};

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
