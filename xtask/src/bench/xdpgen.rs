//! A packet generator that costs node-a's datapath almost nothing: frames injected straight
//! into node-a's `eth0` by the kernel's XDP "live frames" test mode (BPF_PROG_TEST_RUN with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`, as xdp-tools' `xdp-trafficgen` does). A small XDP program
//! writes the frame (the kernel recycles a frame's page with whatever node-a's datapath wrote
//! into it: translated addresses, rewritten MACs) and redirects it to the LAN-side peer of
//! node-a's veth, whose transmit puts it on node-a's receive queue; no socket, no route lookup,
//! no qdisc, no skb on the sending side.
//!
//! What node-a sends on is counted and dropped on that same LAN-side peer by BPF programs
//! (`Sink`) that match the backend's address and port (a mistranslated packet is not counted):
//! at tc ingress for the skbs node-a sends, at XDP for everything while node-a runs XDP (the
//! frames its XDP sends back out before any skb exists, and the skbs of its direct runs). So the figure is node-a's work per packet plus a small share for the
//! generator and the drop. On veth everything runs in softirq on the generator's CPU, batch by
//! batch.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use ::tests::NetNs;
use anyhow::{Context as _, bail};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// A `ld_imm64`'s source register naming a map by descriptor.
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `bpf_map_lookup_elem`'s helper number.
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
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
    load_program(BPF_PROG_TYPE_XDP, insns)
}

/// Loads the program `insns` of type `prog_type` (BPF_PROG_LOAD, GPL).
fn load_program(prog_type: u32, insns: &[u64]) -> anyhow::Result<OwnedFd> {
    let license = CString::new("GPL")?;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(prog_type) | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: a zero-padded bpf_attr for BPF_PROG_LOAD whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), 128u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("load a BPF program");
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
        // `repeat` is a 32-bit field (the next one is the run's duration).
        let repeat =
            u32::try_from(count.div_ceil(BATCH) * BATCH).context("too many frames for one run")?;
        let start = Instant::now();
        run_live(&self.prog, frame, repeat)
            .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")?;
        Ok(start.elapsed())
    }
}

/// Runs XDP program `prog` in live-frame test mode on `repeat` copies of `frame`, in batches of
/// `BATCH`.
fn run_live(prog: &OwnedFd, frame: &[u8], repeat: u32) -> std::io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = prog.as_raw_fd() as u64;
    attr[1] = frame.len() as u64;
    attr[2] = frame.as_ptr() as u64;
    attr[4] = u64::from(repeat);
    attr[8] = BPF_F_TEST_XDP_LIVE_FRAMES;
    attr[9] = BATCH;
    // SAFETY: a zero-padded bpf_attr for BPF_PROG_TEST_RUN whose frame outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, attr.as_ptr(), 128u32) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether this kernel runs XDP programs in live-frame test mode for this process: one batch of
/// a program that drops every frame, in the calling thread's namespace. `Err` with the kernel's
/// answer when it does not (an older kernel: EINVAL; a kernel built or configured to refuse it,
/// as some VM images are: EPERM, even for root), so the caller can report the generator's part
/// as not measured, and why.
pub fn live_frames_refused() -> Option<String> {
    // r0 = XDP_DROP; exit
    let drop = [insn(0xb7, 0, 0, 0, 1), insn(0x95, 0, 0, 0, 0)];
    let prog = match load_xdp(&drop) {
        Ok(p) => p,
        Err(e) => return Some(format!("{e:#}")),
    };
    run_live(&prog, &[0u8; 60], BATCH as u32).err().map(|e| {
        format!("this kernel refuses BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES ({e})")
    })
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

/// Where a program type finds the packet in its context, and its verdicts.
#[derive(Clone, Copy)]
struct Hook {
    prog_type: u32,
    data: i16,
    data_end: i16,
    drop: i32,
    pass: i32,
}

/// XDP: `xdp_md.data`, `.data_end`; XDP_DROP, XDP_PASS.
const XDP_HOOK: Hook = Hook {
    prog_type: BPF_PROG_TYPE_XDP,
    data: 0,
    data_end: 4,
    drop: 1,
    pass: 2,
};
/// tc (clsact, direct action): `__sk_buff.data`, `.data_end`; TC_ACT_SHOT, TC_ACT_OK.
const TC_HOOK: Hook = Hook {
    prog_type: BPF_PROG_TYPE_SCHED_CLS,
    data: 76,
    data_end: 80,
    drop: 2,
    pass: 0,
};

/// The byte checks that pick an Ethernet frame carrying UDP to `addr`:`port`: (offset, bytes
/// that must be there, 1, 2 or 4 long), and the frame length they need. IPv4 without options
/// (what node-a sends on), IPv6 with UDP as the first next header.
fn matches(addr: IpAddr, port: u16) -> (usize, Vec<(usize, Vec<u8>)>) {
    let port = port.to_be_bytes().to_vec();
    match addr {
        IpAddr::V4(a) => {
            let mut checks = vec![
                (12, vec![0x08, 0x00]),
                (14, vec![0x45]),
                (23, vec![17]),
                (30, a.octets().to_vec()),
            ];
            checks.push((36, port));
            (38, checks)
        }
        IpAddr::V6(a) => {
            let mut checks = vec![(12, vec![0x86, 0xdd]), (20, vec![17])];
            for (i, w) in a.octets().chunks(4).enumerate() {
                checks.push((38 + 4 * i, w.to_vec()));
            }
            checks.push((56, port));
            (58, checks)
        }
    }
}

/// The sink's instructions for `hook`: a frame that matches target `i` adds one to slot `i` of
/// the array map `map_fd` and is dropped; anything else passes.
fn sink_program(hook: Hook, map_fd: i32, targets: &[(IpAddr, u16)]) -> Vec<u64> {
    // r6 = data, r7 = data_end (packet pointers for the verifier).
    let mut p = vec![
        insn(0x61, 6, 1, hook.data, 0),
        insn(0x61, 7, 1, hook.data_end, 0),
    ];
    // Jumps to the counting tail, patched once its place is known.
    let mut to_count = Vec::new();
    for (i, (addr, port)) in targets.iter().enumerate() {
        let (need, checks) = matches(*addr, *port);
        // Each jump to the next target is patched with the block's length.
        let start = p.len();
        let mut to_next = Vec::new();
        // r4 = r6 + need; if r4 > r7: next target
        p.push(insn(0xbf, 4, 6, 0, 0));
        p.push(insn(0x07, 4, 0, 0, need as i32));
        to_next.push(p.len());
        p.push(insn(0x2d, 4, 7, 0, 0));
        for (off, bytes) in checks {
            let (load, imm) = match bytes.len() {
                1 => (0x71, i32::from(bytes[0])),
                2 => (0x69, i32::from(u16::from_le_bytes([bytes[0], bytes[1]]))),
                _ => (
                    0x61,
                    i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                ),
            };
            // r5 = *(size *)(r6 + off); if w5 != imm: next target (32-bit compare)
            p.push(insn(load, 5, 6, off as i16, 0));
            to_next.push(p.len());
            p.push(insn(0x56, 5, 0, 0, imm));
        }
        // r8 = i; goto count
        p.push(insn(0xb7, 8, 0, 0, i as i32));
        to_count.push(p.len());
        p.push(insn(0x05, 0, 0, 0, 0));
        let end = p.len();
        debug_assert!(start < end);
        for at in to_next {
            p[at] = with_offset(p[at], (end - at - 1) as i16);
        }
    }
    // No target: pass.
    p.push(insn(0xb7, 0, 0, 0, hook.pass));
    p.push(insn(0x95, 0, 0, 0, 0));
    let count = p.len();
    for at in to_count {
        p[at] = with_offset(p[at], (count - at - 1) as i16);
    }
    p.extend([
        // *(u32 *)(r10 - 4) = r8; r1 = map; r2 = r10 - 4; r0 = bpf_map_lookup_elem(r1, r2)
        insn(0x63, 10, 8, -4, 0),
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        0,
        insn(0xbf, 2, 10, 0, 0),
        insn(0x07, 2, 0, 0, -4),
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        // if r0 == 0: skip the add; r1 = 1; lock *(u64 *)(r0 + 0) += r1
        insn(0x15, 0, 0, 2, 0),
        insn(0xb7, 1, 0, 0, 1),
        insn(0xdb, 0, 1, 0, 0),
        // drop
        insn(0xb7, 0, 0, 0, hook.drop),
        insn(0x95, 0, 0, 0, 0),
    ]);
    p
}

/// `i` with its offset field set to `off`.
fn with_offset(i: u64, off: i16) -> u64 {
    let mut b = i.to_le_bytes();
    b[2..4].copy_from_slice(&off.to_le_bytes());
    u64::from_le_bytes(b)
}

/// Pins `prog` at `pin`, runs `args` in `ns` (which attach it by that path), unpins it (the
/// attachment holds the program).
pub fn attach_pinned(ns: &NetNs, prog: &OwnedFd, pin: &str, args: &[&str]) -> anyhow::Result<()> {
    let path = CString::new(pin)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    attr[1] = prog.as_raw_fd() as u64;
    // SAFETY: a zero-padded bpf_attr for BPF_OBJ_PIN; the path outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), 128u32) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("pin {pin}"));
    }
    // nsenter, not `ip -n`: that remounts /sys, and the pin under /sys/fs/bpf with it.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .args(args)
        .output();
    let _ = std::fs::remove_file(pin);
    match out {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!("run nsenter: {e}"),
    }
}

/// The drop at the LAN side of node-a's veth: BPF programs that count (in an array map, one
/// slot per target) and drop UDP to each `(address, port)`, and pass everything else. A tc
/// ingress program takes the skbs node-a sends. An XDP program, attached while node-a runs
/// XDP (`xdp`), takes the frames node-a's XDP sends back out with `XDP_TX` before any skb
/// exists, as a real NIC would put them on the wire; while it is attached it also takes the
/// skbs node-a forwards (veth then hands them to the peer's NAPI, as XDP strips node-a's
/// `eth0` of TSO), so the XDP configuration's direct runs are counted there too. A
/// mistranslated packet is not counted. Removed on drop.
pub struct Sink<'a> {
    ns: &'a NetNs,
    dev: String,
    id: String,
    map: OwnedFd,
    xdp: OwnedFd,
    targets: usize,
}

impl<'a> Sink<'a> {
    /// Loads the map and both programs and attaches the tc one to `dev` in `ns`; `id` names
    /// the pins, briefly under /sys/fs/bpf.
    pub fn install(
        ns: &'a NetNs,
        dev: &str,
        id: &str,
        targets: &[(IpAddr, u16)],
    ) -> anyhow::Result<Self> {
        let mut attr = [0u64; 16];
        // BPF_MAP_TYPE_ARRAY, 4-byte keys, 8-byte values, a slot per target.
        attr[0] = u64::from(BPF_MAP_TYPE_ARRAY) | 4 << 32;
        attr[1] = 8 | (targets.len() as u64) << 32;
        // SAFETY: a zero-padded bpf_attr for BPF_MAP_CREATE.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), 128u32) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("the sink's counters (a map)");
        }
        // SAFETY: a fresh descriptor the kernel gave us.
        let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let load = |hook: Hook| {
            load_program(
                hook.prog_type,
                &sink_program(hook, map.as_raw_fd(), targets),
            )
        };
        let tc = load(TC_HOOK).context("the sink's tc program")?;
        let xdp = load(XDP_HOOK).context("the sink's XDP program")?;
        let sink = Sink {
            ns,
            dev: dev.to_string(),
            id: id.to_string(),
            map,
            xdp,
            targets: targets.len(),
        };
        ns.exec("tc", &["qdisc", "add", "dev", dev, "clsact"]);
        let pin = format!("/sys/fs/bpf/{id}-sink-tc");
        attach_pinned(
            ns,
            &tc,
            &pin,
            &[
                "tc",
                "filter",
                "add",
                "dev",
                dev,
                "ingress",
                "bpf",
                "direct-action",
                "object-pinned",
                &pin,
            ],
        )?;
        Ok(sink)
    }

    /// Attaches the XDP program (native mode), or detaches whatever XDP program `dev` has.
    pub fn xdp(&self, on: bool) -> anyhow::Result<()> {
        if !on {
            self.ns
                .ip(&["link", "set", "dev", &self.dev, "xdpdrv", "off"]);
            return Ok(());
        }
        // Replacing a program takes `-force`; none should be there, but detaching first is
        // the same for either.
        self.ns
            .ip(&["link", "set", "dev", &self.dev, "xdpdrv", "off"]);
        let pin = format!("/sys/fs/bpf/{}-sink-xdp", self.id);
        attach_pinned(
            self.ns,
            &self.xdp,
            &pin,
            &[
                "ip", "link", "set", "dev", &self.dev, "xdpdrv", "pinned", &pin,
            ],
        )
    }

    /// Packets counted (and dropped) for target `i`.
    pub fn count(&self, i: usize) -> anyhow::Result<u64> {
        assert!(i < self.targets);
        let key = i as u32;
        let mut value = 0u64;
        let mut attr = [0u64; 16];
        attr[0] = self.map.as_raw_fd() as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = &mut value as *mut u64 as u64;
        // SAFETY: a zero-padded bpf_attr for BPF_MAP_LOOKUP_ELEM whose key and value outlive
        // the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_ELEM, attr.as_ptr(), 128u32) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("read the sink's counter");
        }
        Ok(value)
    }
}

impl Drop for Sink<'_> {
    fn drop(&mut self) {
        let dev = self.dev.as_str();
        for args in [
            &["ip", "link", "set", "dev", dev, "xdpdrv", "off"][..],
            &["tc", "qdisc", "del", "dev", dev, "clsact"],
        ] {
            let _ = std::process::Command::new("nsenter")
                .arg(format!("--net={}", self.ns.path()))
                .args(args)
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sink's program for two targets: every jump lands inside the program, each target's
    /// block checks its address, and both hooks' verdicts are where they belong.
    #[test]
    fn sink_program_jumps_and_checks() {
        let targets = [
            ("10.244.1.2".parse().unwrap(), 8080),
            ("fd00:244:1::2".parse().unwrap(), 8080),
        ];
        for hook in [XDP_HOOK, TC_HOOK] {
            let p = sink_program(hook, 7, &targets);
            for (i, ins) in p.iter().enumerate() {
                let b = ins.to_le_bytes();
                let class = b[0] & 0x07;
                // Jumps other than call and exit, 64- and 32-bit.
                if (class == 0x05 || class == 0x06) && b[0] != 0x85 && b[0] != 0x95 {
                    let off = i16::from_le_bytes([b[2], b[3]]) as isize;
                    let to = i as isize + 1 + off;
                    assert!(off > 0 && (to as usize) < p.len(), "jump at {i} to {to}");
                }
            }
            // The IPv4 block compares the address's four bytes as one 32-bit word.
            let addr = i32::from_le_bytes([10, 244, 1, 2]);
            // (Jumps compared without their offsets.)
            let has = |want: u64| p.iter().filter(|i| with_offset(**i, 0) == want).count();
            assert_eq!(has(insn(0x56, 5, 0, 0, addr)), 1);
            // The port, in network order, as a 16-bit load's value.
            let port = i32::from(u16::from_le_bytes(8080u16.to_be_bytes()));
            assert_eq!(has(insn(0x56, 5, 0, 0, port)), 2);
            // Pass, then the counting tail ending in the drop.
            assert!(p.contains(&insn(0xb7, 0, 0, 0, hook.pass)));
            assert_eq!(p[p.len() - 2], insn(0xb7, 0, 0, 0, hook.drop));
            assert_eq!(p[p.len() - 1], insn(0x95, 0, 0, 0, 0));
        }
    }

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
