//! Backends (endpoint address, port and protocol) by id.

use crate::pod;

/// Value of `LB_BACKENDS`, keyed by a `u32` backend id that stays stable while the backend
/// exists, so affinity entries stay valid across syncs and restarts.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BackendValue {
    /// Address in network byte order; an IPv4 backend uses the first 4 bytes, the rest are 0.
    pub addr: [u8; 16],
    /// Backend port, host byte order.
    pub port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// `BACKEND_*` bits, informational for inspection (eligibility is decided in userspace).
    pub flags: u8,
    pub _pad: u8,
    /// Relative weight (1 for Kubernetes endpoints); the number of slots a backend holds.
    pub weight: u16,
}

/// The endpoint is on this node.
pub const BACKEND_LOCAL: u8 = 1 << 0;
/// The endpoint is terminating (used only as a fallback, semantics 3.3).
pub const BACKEND_TERMINATING: u8 = 1 << 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

impl BackendValue {
    pub fn addr4(&self) -> [u8; 4] {
        [self.addr[0], self.addr[1], self.addr[2], self.addr[3]]
    }
}

/// Value of `LB_SOCK` (socket-local storage) of a translated socket: the backend its
/// connection is counted against in `LB_CONNS` (least-connection), and the key of its latest
/// record in `SOCK4_REVNAT`/`SOCK6_REVNAT`, both released when the socket goes away.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SockConn {
    pub backend_id: u32,
    /// 1 while the connection is counted.
    pub counted: u32,
    /// Backend address of the latest socket record (IPv4 in the first 4 bytes; IPv4-mapped
    /// for an IPv4 peer of an IPv6 socket), network order.
    pub rev_addr: [u8; 16],
    /// Backend port of that record, host order.
    pub rev_port: u16,
    /// `FAMILY_V4` (the record is in `SOCK4_REVNAT`), `FAMILY_V6`, or 0: no record.
    pub rev_family: u8,
    pub _pad: u8,
}

pod!(BackendValue, SockConn);
