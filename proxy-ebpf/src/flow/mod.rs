//! Layer 2: the flow engine. Connection tracking, address and port translation (DNAT, SNAT
//! with port claims), reverse translation of replies and of ICMP errors, forwarding through the
//! FIB, DSR, and the least-connection counts flows hold; for tc (`tc`) and XDP (`xdp`), generic
//! over the address family. Imports only `access` and `headers`.

pub mod conns;
pub mod ct;
pub mod dsr;
pub mod fib;
pub mod frag;
pub mod hops;
pub mod icmp;
pub mod monitor;
pub mod nat;
pub mod pmtu;
pub mod records;
pub mod tc;
pub mod xdp;
