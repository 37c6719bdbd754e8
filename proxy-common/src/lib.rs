//! Every byte that crosses the kernel/userspace boundary, defined once for both sides.
//!
//! All types are `#[repr(C)]`, `Copy`, have no implicit padding (checked in `layout`), and
//! store addresses as bytes in network order and ports in host order, so `bpftool map dump`
//! prints them readably (`[10,96,0,10]`, `80`).
#![no_std]

pub mod affinity;
pub mod backend;
pub mod config;
pub mod ct;
pub mod dsr;
pub mod event;
pub mod info;
pub mod maglev;
pub mod maps;
pub mod reason;
pub mod revnat;
pub mod service;

mod layout;

/// IANA protocol numbers as carried in keys (`proto` fields).
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
    /// EtherTypes (the tc/XDP programs' frames, the agent's `conn_release` frame).
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86dd;
}

/// Marks types that userspace reads and writes through aya maps.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: repr(C), Copy, only integer fields and arrays, no implicit padding.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;
