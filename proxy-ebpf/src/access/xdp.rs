//! Bounds-checked reads and writes of an XDP frame.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

#[inline(always)]
pub fn ptr<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    // SAFETY: bounds checked by `ptr`; unaligned read of plain bytes.
    ptr::<T>(ctx, off).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, off: usize, v: T) -> Option<()> {
    // SAFETY: bounds checked by `ptr`.
    ptr::<T>(ctx, off).map(|p| unsafe { p.write_unaligned(v) })
}

/// The frame's bounds (`data`, `data_end`), loaded volatile. A function kept out of line that
/// only reads the frame would otherwise be handed both by its caller as plain values (LLVM's
/// argument promotion), and the verifier refuses arithmetic on a `data_end` that went through
/// a register shift.
#[inline(always)]
pub fn bounds(ctx: &XdpContext) -> (usize, usize) {
    // SAFETY: the program's own context, valid while it runs; plain field loads.
    unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    }
}

/// `read` within `bounds`.
#[inline(always)]
pub fn read_in<T: Copy>(bounds: (usize, usize), off: usize) -> Option<T> {
    let (start, end) = bounds;
    if start + off + size_of::<T>() > end {
        return None;
    }
    // SAFETY: bounds checked above; unaligned read of plain bytes.
    Some(unsafe { ((start + off) as *const T).read_unaligned() })
}
