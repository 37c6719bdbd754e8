//! Layer 1: headers and checksums. What a packet says (Ethernet, IPv4, IPv6, TCP, UDP) and
//! how to change it with its checksums, per address family (`family::Ip`), for tc
//! (`TcContext`) and XDP (`xdp::XdpIp`); the flow hash every node computes alike (`hash`).
//! Imports only `access` (layer 0).

use aya_ebpf::bindings::BPF_F_MARK_MANGLED_0;
use proxy_common::proto;

pub mod answer;
pub mod csum;
pub mod family;
pub mod hash;
pub mod xdp;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 flags and fragment offset (host order): the offset's bits.
pub const FRAG_OFFSET: u16 = 0x1fff;
/// IPv4 flags and fragment offset (host order): more fragments.
pub const FRAG_MORE: u16 = 0x2000;
/// The IPv6 fragment extension header.
pub const IPPROTO_FRAGMENT: u8 = 44;
/// IPv6 fragment header, offset and flags (host order): the offset's bits.
pub const FRAG6_OFFSET: u16 = 0xfff8;
/// IPv6 fragment header, offset and flags (host order): more fragments.
pub const FRAG6_MORE: u16 = 0x0001;

pub const ETH_HLEN: usize = 14;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A flow's addresses and ports (host order) and protocol.
#[derive(Copy, Clone)]
pub struct Tuple<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl<A: Copy> Tuple<A> {
    /// The tuple of packets going the other way.
    #[inline(always)]
    pub fn reversed(&self) -> Tuple<A> {
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// A parsed TCP or UDP packet.
pub struct Packet<A> {
    pub t: Tuple<A>,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

impl<A> Packet<A> {
    /// Offset of the layer-4 checksum and the flags its updates need (a zero UDP checksum
    /// means "none" in IPv4 and must stay zero).
    #[inline(always)]
    pub fn csum(&self) -> Option<(usize, u64)> {
        match self.t.proto {
            proto::TCP => Some((self.l4 + 16, 0)),
            proto::UDP => Some((self.l4 + 6, BPF_F_MARK_MANGLED_0 as u64)),
            _ => None,
        }
    }

    /// A TCP SYN without ACK: the first packet of a new connection.
    #[inline(always)]
    pub fn syn(&self) -> bool {
        self.t.proto == proto::TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// An IPv6 address from the four native-order words of its memory layout (as `bpf_sock_addr`
/// and the FIB lookup hold it).
#[inline(always)]
pub fn ip6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The four native-order words of an IPv6 address's memory layout.
#[inline(always)]
pub fn ip6_words(bytes: &[u8; 16]) -> [u32; 4] {
    let mut out = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        out[i] = u32::from_ne_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
        i += 1;
    }
    out
}
