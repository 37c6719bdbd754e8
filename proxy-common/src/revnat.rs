//! Reverse translation at the socket layer: which Service address a socket really talks to.
//!
//! connect/sendmsg record (socket cookie, backend address, backend port) → frontend; recvmsg
//! and getpeername use it to show the Service address to the application.

use crate::pod;

/// Key of `SOCK4_REVNAT`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat4Key {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: [u8; 4],
    /// Backend port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `SOCK4_REVNAT`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SockRevNat4Value {
    /// Frontend address, network byte order.
    pub addr: [u8; 4],
    /// Frontend port, host byte order.
    pub port: u16,
    pub _pad: u16,
    /// `ServiceValue::id` of the frontend.
    pub svc_id: u32,
}

/// Key of `SOCK6_REVNAT`; fields as in `SockRevNat4Key`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat6Key {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of `SOCK6_REVNAT`; fields as in `SockRevNat4Value`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SockRevNat6Value {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    pub svc_id: u32,
}

/// Key of `LB_DGRAM_FLOWS`: the datagrams one unconnected socket sends to one frontend, which
/// kube-proxy's conntrack sees as one flow (one source port, one destination) and keeps on one
/// backend.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DgramFlowKey {
    /// `bpf_get_socket_cookie()` of the sending socket.
    pub cookie: u64,
    /// `ServiceValue::id` of the frontend the datagrams are addressed to.
    pub svc_id: u32,
    pub _pad: u32,
}

/// Value of `LB_DGRAM_FLOWS`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DgramFlowValue {
    /// The backend the flow's datagrams go to.
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` at the flow's latest datagram.
    pub last_used_ns: u64,
}

pod!(
    SockRevNat4Key,
    SockRevNat4Value,
    SockRevNat6Key,
    SockRevNat6Value,
    DgramFlowKey,
    DgramFlowValue
);
