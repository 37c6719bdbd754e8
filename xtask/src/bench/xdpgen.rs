//! A packet generator that costs node-a's datapath almost nothing: frames injected straight
//! into node-a's `eth0` by the kernel's XDP "live frames" test mode (BPF_PROG_TEST_RUN with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`, as xdp-tools' `xdp-trafficgen` does). A small XDP program
//! writes the frame (the kernel recycles a frame's page with whatever node-a's datapath wrote
//! into it: translated addresses, rewritten MACs) and redirects it to the LAN-side peer of
//! node-a's veth, whose transmit puts it on node-a's receive queue; no socket, no route lookup,
//! no qdisc, no skb on the sending side.
//!
//! What node-a sends on is dropped by an nftables `netdev` ingress rule on that same LAN-side
//! peer that matches the backend's address and port (a mistranslated packet is not counted),
//! so the figure is node-a's work per packet plus a small, equal share for the generator and
//! the drop. On veth everything runs in softirq on the generator's CPU, batch by batch.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use ::tests::NetNs;
use anyhow::{Context as _, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u64 = 1 << 1;
/// `bpf_redirect`'s helper number.
const BPF_FUNC_REDIRECT: u8 = 23;
/// Frames per batch: the generator flushes its redirects and lets softirqs run (node-a's NAPI
/// and what follows) after each batch. The kernel's default, NAPI's budget.
pub const BATCH: u64 = 64;

/// One BPF instruction: opcode, destination and source registers, offset, immediate.
pub fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = op;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

/// The generator's instructions: write `frame` (a multiple of 4 bytes) over the packet, then
/// `return bpf_redirect(ifindex, 0)`.
fn program(ifindex: u32, frame: &[u8]) -> anyhow::Result<Vec<u64>> {
    if !frame.len().is_multiple_of(4) || frame.len() > 1024 {
        bail!("a generated frame must be a multiple of 4 bytes, at most 1024");
    }
    let words = frame.len() / 4;
    let mut p = vec![
        // r2 = ctx->data; r3 = ctx->data_end
        insn(0x61, 2, 1, 0, 0),
        insn(0x61, 3, 1, 4, 0),
        // r4 = r2 + len; if r4 > r3: skip the writes
        insn(0xbf, 4, 2, 0, 0),
        insn(0x07, 4, 0, 0, frame.len() as i32),
        insn(0x2d, 4, 3, words as i16, 0),
    ];
    for (i, w) in frame.chunks(4).enumerate() {
        // *(u32 *)(r2 + 4i) = w
        let imm = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        p.push(insn(0x62, 2, 0, (4 * i) as i16, imm));
    }
    p.extend([
        // r0 = bpf_redirect(ifindex, 0); exit
        insn(0xb7, 1, 0, 0, ifindex as i32),
        insn(0xb7, 2, 0, 0, 0),
        insn(0x85, 0, 0, 0, i32::from(BPF_FUNC_REDIRECT)),
        insn(0x95, 0, 0, 0, 0),
    ]);
    Ok(p)
}

/// Loads the XDP program `insns` (BPF_PROG_LOAD, GPL).
pub fn load_xdp(insns: &[u64]) -> anyhow::Result<OwnedFd> {
    let license = CString::new("GPL")?;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_PROG_TYPE_XDP) | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: a zero-padded bpf_attr for BPF_PROG_LOAD whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), 128u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("load an XDP program");
    }
    // SAFETY: a fresh descriptor the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The generator's program, loaded in the namespace of the device it sends through.
pub struct Generator {
    prog: OwnedFd,
}

impl Generator {
    /// Loads `program(ifindex, frame)`.
    fn load(ifindex: u32, frame: &[u8]) -> anyhow::Result<Generator> {
        let prog = load_xdp(&program(ifindex, frame)?).context("the generator's program")?;
        Ok(Generator { prog })
    }

    /// Sends `count` copies of `frame` (a multiple of the batch), from the calling thread
    /// (which must be in the namespace the program was loaded for); how long it took.
    fn send(&self, frame: &[u8], count: u64) -> anyhow::Result<Duration> {
        let mut attr = [0u64; 16];
        attr[0] = self.prog.as_raw_fd() as u64;
        attr[1] = frame.len() as u64;
        attr[2] = frame.as_ptr() as u64;
        // `repeat` is a 32-bit field (the next one is the run's duration).
        attr[4] = u64::from(
            u32::try_from(count.div_ceil(BATCH) * BATCH).context("too many frames for one run")?,
        );
        attr[8] = BPF_F_TEST_XDP_LIVE_FRAMES;
        attr[9] = BATCH;
        let start = Instant::now();
        // SAFETY: a zero-padded bpf_attr for BPF_PROG_TEST_RUN whose frame outlives the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, attr.as_ptr(), 128u32) };
        let took = start.elapsed();
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES");
        }
        Ok(took)
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t, filled by the libc macros, for this thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// The generator of the LAN namespace `lan`, sending through `dev` (the LAN-side peer of
/// node-a's veth) on `cpu`: `count` copies of `frame`. Returns the time taken.
pub fn send(
    lan: &NetNs,
    dev: &str,
    cpu: usize,
    frame: &[u8],
    count: u64,
) -> anyhow::Result<Duration> {
    let dev = CString::new(dev)?;
    lan.run(|| {
        pin_to(cpu)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        if ifindex == 0 {
            bail!("no {dev:?} in the LAN namespace");
        }
        Generator::load(ifindex, frame)?.send(frame, count)
    })
}

/// The one's-complement sum of `data` folded into 16 bits, added to `sum`.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame holding one UDP datagram of `payload` bytes from `src`:`sport` to
/// `dst`:`dport` (both of one family), checksums filled in as a NIC would deliver them.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: usize,
) -> anyhow::Result<Vec<u8>> {
    let udp_len = 8 + payload;
    let mut udp = vec![0u8; udp_len];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    for (i, b) in udp[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut frame = Vec::with_capacity(14 + 40 + udp_len);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let pseudo = csum_add(
                csum_add(csum_add(0, &s.octets()), &d.octets()),
                &[0, 17, (udp_len >> 8) as u8, udp_len as u8],
            );
            let sum = csum_fold(csum_add(pseudo, &udp));
            udp[6..8].copy_from_slice(&if sum == 0 { 0xffff } else { sum }.to_be_bytes());
            frame.extend_from_slice(&ipv4_header(s, d, udp_len));
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            let len = (udp_len as u32).to_be_bytes();
            let pseudo = csum_add(
                csum_add(csum_add(0, &s.octets()), &d.octets()),
                &[len[0], len[1], len[2], len[3], 0, 0, 0, 17],
            );
            let sum = csum_fold(csum_add(pseudo, &udp));
            udp[6..8].copy_from_slice(&if sum == 0 { 0xffff } else { sum }.to_be_bytes());
            frame.extend_from_slice(&ipv6_header(s, d, udp_len));
        }
        _ => bail!("{src} and {dst} are of different families"),
    }
    frame.extend_from_slice(&udp);
    Ok(frame)
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, udp_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    // Don't fragment, TTL 64, UDP.
    h[6] = 0x40;
    h[8] = 64;
    h[9] = 17;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = csum_fold(csum_add(0, &h));
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, udp_len: usize) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    h[6] = 17;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

/// The MAC address of `dev` in `ns`.
pub fn mac_of(ns: &NetNs, dev: &str) -> anyhow::Result<[u8; 6]> {
    let json = ns.ip(&["-j", "link", "show", dev]);
    let v: serde_json::Value = serde_json::from_str(&json).context("ip -j link JSON")?;
    let text = v[0]["address"]
        .as_str()
        .with_context(|| format!("no address of {dev}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("{dev}: MAC {text:?}");
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("{dev}: MAC {text:?}"))?;
    }
    Ok(mac)
}

/// The drop at the LAN side: an nftables `netdev` table on `dev` in `ns` counting and dropping
/// UDP to each `(address, port)` (one named counter each, `c0`, `c1`, ...); removed on drop.
pub struct Sink<'a> {
    ns: &'a NetNs,
    targets: usize,
}

const SINK_TABLE: &str = "kbp-bench-sink";

impl<'a> Sink<'a> {
    pub fn install(ns: &'a NetNs, dev: &str, targets: &[(IpAddr, u16)]) -> anyhow::Result<Self> {
        let mut rules = format!(
            "add table netdev {SINK_TABLE}\n\
             add chain netdev {SINK_TABLE} in {{ type filter hook ingress device \"{dev}\" \
             priority 0 ; policy accept ; }}\n"
        );
        for (i, (addr, port)) in targets.iter().enumerate() {
            let family = if addr.is_ipv4() { "ip" } else { "ip6" };
            rules.push_str(&format!(
                "add counter netdev {SINK_TABLE} c{i}\n\
                 add rule netdev {SINK_TABLE} in {family} daddr {addr} udp dport {port} \
                 counter name \"c{i}\" drop\n"
            ));
        }
        let file = std::env::temp_dir().join(format!("{}-sink.nft", ns.name));
        std::fs::write(&file, rules)?;
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .args(["nft", "-f"])
            .arg(&file)
            .output()
            .context("run nft")?;
        let _ = std::fs::remove_file(&file);
        if !out.status.success() {
            bail!(
                "nft (the sink): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Sink {
            ns,
            targets: targets.len(),
        })
    }

    /// Packets counted (and dropped) for target `i`.
    pub fn count(&self, i: usize) -> anyhow::Result<u64> {
        assert!(i < self.targets);
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path()))
            .args([
                "nft",
                "-j",
                "list",
                "counter",
                "netdev",
                SINK_TABLE,
                &format!("c{i}"),
            ])
            .output()
            .context("run nft")?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("nft -j list counter")?;
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e["counter"]["packets"].as_u64())
            .with_context(|| format!("no counter c{i}: {v}"))
    }
}

impl Drop for Sink<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.ns.path()))
            .args(["nft", "delete", "table", "netdev", SINK_TABLE])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksums of a datagram of each family check out: summed with the data they cover
    /// (the UDP one with the pseudo-header), they fold to zero.
    #[test]
    fn checksums_of_a_known_datagram() {
        let f = udp_frame(
            [2; 6],
            [4; 6],
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            1234,
            80,
            2,
        )
        .unwrap();
        assert_eq!(f.len(), 14 + 20 + 8 + 2);
        // A header's checksum over itself folds to zero.
        assert_eq!(csum_fold(csum_add(0, &f[14..34])), 0);
        // So does the UDP checksum over the pseudo-header and the datagram.
        let pseudo = csum_add(
            csum_add(csum_add(0, &f[26..30]), &f[30..34]),
            &[0, 17, 0, 10],
        );
        assert_eq!(csum_fold(csum_add(pseudo, &f[34..])), 0);
        let f6 = udp_frame(
            [2; 6],
            [4; 6],
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            1234,
            80,
            18,
        )
        .unwrap();
        assert_eq!(f6.len(), 14 + 40 + 8 + 18);
        let pseudo = csum_add(
            csum_add(csum_add(0, &f6[22..38]), &f6[38..54]),
            &[0, 0, 0, 26, 0, 0, 0, 17],
        );
        assert_eq!(csum_fold(csum_add(pseudo, &f6[54..])), 0);
    }
}
