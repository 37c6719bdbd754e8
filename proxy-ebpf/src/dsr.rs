//! Direct server return (IPv4): the node that balanced a flow sends it to a backend on another
//! node without masquerading, with the frontend the client used in an IPv4 option. The backend's
//! node learns the frontend from the option (a reply-direction connection-tracking entry), so
//! the backend's replies leave that node with the frontend as their source and go straight to
//! the client. An IP option rather than encapsulation: the packet stays routable as it is, the
//! backend node's stack ignores an option it does not know, and it costs 8 bytes instead of a
//! second IP header (the catch: it needs 8 bytes of MTU headroom).

use aya_ebpf::{
    bindings::{BPF_ANY, bpf_adj_room_mode::BPF_ADJ_ROOM_NET},
    helpers::{bpf_ktime_get_ns, generated::bpf_skb_load_bytes},
    programs::TcContext,
};
use proxy_common::{
    config::CONFIG_DSR,
    ct::{CT_DSR, CT_REPLY},
    reason::Reason,
};

use crate::{
    maps::LB_CONFIG,
    packet::{ETH_HLEN, Entry, Family, Tuple, V4},
    stats,
};

/// Option type: copied on fragmentation, class 0, number 26 (unassigned by IANA).
const OPTION_TYPE: u8 = 0x9a;
const OPTION_LEN: u8 = 8;
const AF_INET: u8 = 2;

/// DSR is on (`--nodeport-mode dsr`) and the flow is IPv4.
#[inline(always)]
pub fn enabled<F: Family>() -> bool {
    F::AF == AF_INET && LB_CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_DSR != 0)
}

/// The IPv4 frontend address of an original tuple.
#[inline(always)]
pub fn frontend4<F: Family>(orig: &Tuple<F::Addr>) -> Option<[u8; 4]> {
    F::v4(&orig.daddr)
}

/// The option's bytes.
#[inline(always)]
pub fn option(frontend: [u8; 4], port: u16) -> [u8; 8] {
    let p = port.to_be_bytes();
    [
        OPTION_TYPE,
        OPTION_LEN,
        p[0],
        p[1],
        frontend[0],
        frontend[1],
        frontend[2],
        frontend[3],
    ]
}

/// The IPv4 header checksum of a 28-byte header (checksum field zero).
#[inline(always)]
pub fn header_checksum(h: &[u8; 28]) -> [u8; 2] {
    let mut s: u32 = 0;
    let mut i = 0;
    while i < 28 {
        s += u32::from(u16::from_be_bytes([h[i], h[i + 1]]));
        i += 2;
    }
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_be_bytes()
}

/// tc: inserts the option after the IPv4 header of a translated packet.
#[inline(never)]
pub fn add_option_tc(ctx: &TcContext, frontend: [u8; 4], port: u16) -> Result<(), i64> {
    // The header is read straight into the new one's first 20 bytes (one buffer: this frame
    // sits at the end of new_flow's call chain).
    let mut whole = [0u8; 28];
    // SAFETY: a helper call writing 20 bytes into `whole` (aya's `load_bytes` clamps the
    // length to the packet, which the verifier cannot bound away from zero).
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN as u32,
            whole.as_mut_ptr().cast(),
            20,
        )
    };
    if rc != 0 {
        return Err(rc);
    }
    if whole[0] != 0x45 {
        return Err(0);
    }
    ctx.adjust_room(8, BPF_ADJ_ROOM_NET, 0)?;
    let opt = option(frontend, port);
    let mut i = 20;
    while i < 28 {
        whole[i] = opt[i - 20];
        i += 1;
    }
    whole[0] = 0x47;
    let len = u16::from_be_bytes([whole[2], whole[3]])
        .wrapping_add(8)
        .to_be_bytes();
    whole[2] = len[0];
    whole[3] = len[1];
    whole[10] = 0;
    whole[11] = 0;
    let sum = header_checksum(&whole);
    whole[10] = sum[0];
    whole[11] = sum[1];
    ctx.store(ETH_HLEN, &whole, 0)?;
    stats::count(Reason::DsrSent);
    Ok(())
}

/// tc on the backend's node: a packet carrying the option teaches this node the frontend of
/// the flow, so the backend's replies are translated back to it here.
#[inline(never)]
pub fn learn4(ctx: &TcContext) {
    let Ok(ip) = ctx.load::<[u8; 28]>(ETH_HLEN) else {
        return;
    };
    if ip[0] != 0x47 || ip[20] != OPTION_TYPE || ip[21] != OPTION_LEN {
        return;
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(ETH_HLEN + 28) else {
        return;
    };
    let client = [ip[12], ip[13], ip[14], ip[15]];
    let backend = [ip[16], ip[17], ip[18], ip[19]];
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let frontend = [ip[24], ip[25], ip[26], ip[27]];
    let fport = u16::from_be_bytes([ip[22], ip[23]]);
    // Replies: backend:dport → client:sport, shown as frontend:fport → client:sport.
    let reply_key = Tuple {
        saddr: backend,
        daddr: client,
        sport: dport,
        dport: sport,
        proto: ip[9],
    };
    let entry = Entry {
        to: Tuple {
            saddr: frontend,
            daddr: client,
            sport: fport,
            dport: sport,
            proto: ip[9],
        },
        flags: CT_REPLY | CT_DSR,
        svc_id: 0,
        backend_id: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if V4::ct_insert(&reply_key, &entry, now, BPF_ANY as u64, 0).is_ok() {
        stats::count(Reason::DsrLearned);
    }
}
