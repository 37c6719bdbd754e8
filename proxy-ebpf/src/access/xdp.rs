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
