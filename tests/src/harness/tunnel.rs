//! An overlay whose devices have no link-layer header, as ipip's, GRE's and WireGuard's: a
//! `tun` device in every node, and a thread of the test that carries each IP packet one node's
//! device sends to the node the packet is for (`Testbed::with_l3_overlay`). This kernel has no
//! ipip or WireGuard; a `tun` device is of the same kind to the programs (packets start with
//! their IP header at tc, `ARPHRD_NONE`).

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::IpAddr,
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use super::netns::NetNs;

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// A layer-3 device, packets without the protocol information prefix.
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// The devices (one open file each, which keeps the device: it goes when the file is closed)
/// and the thread carrying packets between them until dropped.
pub struct TunOverlay {
    stop: Arc<AtomicBool>,
    carrier: Option<JoinHandle<()>>,
}

/// Creates device `name` in namespace `ns` and returns its file.
fn open(ns: &NetNs, name: &str) -> File {
    let name = name.to_string();
    ns.run(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) an ifreq of 40 bytes, which `req` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } != 0 {
            panic!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
        }
        file
    })
}

/// The destination address of IP packet `p`.
fn destination(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?)),
        6 if p.len() >= 40 => Some(IpAddr::from(<[u8; 16]>::try_from(&p[24..40]).ok()?)),
        _ => None,
    }
}

impl TunOverlay {
    /// Device `name` in each of `nodes`; a packet one sends goes to the device of node
    /// `node_of(destination)` (dropped when that is none, or the sender itself).
    pub fn new(nodes: &[&NetNs], name: &str, node_of: fn(IpAddr) -> Option<usize>) -> TunOverlay {
        let files: Vec<File> = nodes.iter().map(|ns| open(ns, name)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let carrier = std::thread::spawn(move || carry(files, &stopped, node_of));
        TunOverlay {
            stop,
            carrier: Some(carrier),
        }
    }
}

/// Carries packets between the devices of `files` until `stop`; polls at most 50 ms at a time.
/// A device that fails (deleted under the test) is not polled again.
fn carry(mut files: Vec<File>, stop: &AtomicBool, node_of: fn(IpAddr) -> Option<usize>) {
    let mut buf = vec![0u8; 65536];
    let mut fds: Vec<libc::pollfd> = files
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for from in 0..fds.len() {
            let revents = fds[from].revents;
            if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                // A negative descriptor is left out by poll(2).
                fds[from].fd = -1;
                continue;
            }
            if revents & libc::POLLIN == 0 {
                continue;
            }
            let Ok(len) = files[from].read(&mut buf) else {
                continue;
            };
            let packet = &buf[..len];
            if let Some(to) = destination(packet).and_then(node_of)
                && to != from
                && to < files.len()
            {
                let _ = files[to].write(packet);
            }
        }
    }
}

impl Drop for TunOverlay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.carrier.take() {
            let _ = t.join();
        }
        // The files went with the thread: the devices are gone.
    }
}
