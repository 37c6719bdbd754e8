//! Layer 0: access to what the programs read and write besides headers: the maps, the
//! counters, the runtime switches, bounds-checked XDP frame access, whole-packet skb writes.
//! Imports nothing of the crate.

pub mod debug;
pub mod events;
pub mod maps;
pub mod skb;
pub mod socklb;
pub mod stats;
pub mod xdp;
