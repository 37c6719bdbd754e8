//! Socket records: for a socket the socket layer translated, which frontend its backend stands
//! for (`SOCK4_REVNAT`, `SOCK6_REVNAT`, keyed by the socket's cookie and the backend), so that
//! recvmsg and getpeername show the Service address. One trait, one implementation per family;
//! the code that writes, reads and deletes records is written once over it.

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    backend::{FAMILY_V4, FAMILY_V6},
    reason::Reason,
    revnat::{SockRevNat4Key, SockRevNat4Value, SockRevNat6Key, SockRevNat6Value},
};

use crate::{
    access::{
        maps::{SOCK4_REVNAT, SOCK6_REVNAT},
        stats,
    },
    headers::family::{Ip, V4, V6},
};

/// The socket-record map of a family.
pub trait Records: Ip {
    /// `FAMILY_V4` or `FAMILY_V6`, as the socket's storage remembers a record's family.
    const FAMILY: u8;
    /// The reason counted for a new record (`RevNatNew4`/`RevNatNew6`: the agent tells LRU
    /// evictions from a map that merely holds many sockets by these counts).
    const NEW: Reason;
    /// The reason counted for a record deleted with its socket.
    const DELETED: Reason;

    /// Writes the record (`cookie`, `backend`, `backend_port`) → (`frontend`, `port`,
    /// `svc_id`). Err when the map takes it neither as new nor as a replacement.
    fn write(
        cookie: u64,
        backend: &Self::Addr,
        backend_port: u16,
        frontend: &Self::Addr,
        port: u16,
        svc_id: u32,
    ) -> Result<bool, ()>;

    /// Whether the record (`cookie`, `backend`, `backend_port`) → (`frontend`, `port`,
    /// `svc_id`) is there as `record` would write it: a datagram flow's later datagrams find it
    /// so, and writing it again would cost two LRU updates (the first, as a new entry, fails
    /// after taking a free element from the LRU lists and giving it back).
    #[inline(always)]
    fn holds(
        cookie: u64,
        backend: &Self::Addr,
        backend_port: u16,
        frontend: &Self::Addr,
        port: u16,
        svc_id: u32,
    ) -> bool {
        Self::read(cookie, backend, backend_port)
            .is_some_and(|(a, p, s)| a == *frontend && p == port && s == svc_id)
    }

    /// The frontend address and port, and the frontend id, of the record (`cookie`, `addr`,
    /// `port`), if any.
    fn read(cookie: u64, addr: &Self::Addr, port: u16) -> Option<(Self::Addr, u16, u32)>;

    /// Deletes the record (`cookie`, `addr`, `port`); whether there was one.
    fn delete(cookie: u64, addr: &Self::Addr, port: u16) -> bool;

    /// The address from the 16 bytes a socket's storage remembers (IPv4 in the first four).
    fn from_bytes(b: &[u8; 16]) -> Self::Addr;
}

/// Records a translated socket: a new record is counted; an existing one (the socket connected
/// again, or a datagram to the same backend) is replaced. Err(RevNatFailed) when neither
/// works: without its record the application would see the backend's address in replies, so
/// the caller leaves the socket untranslated rather than half translated.
#[inline(always)]
pub fn record<F: Records>(
    cookie: u64,
    backend: &F::Addr,
    backend_port: u16,
    frontend: &F::Addr,
    port: u16,
    svc_id: u32,
) -> Result<(), Reason> {
    match F::write(cookie, backend, backend_port, frontend, port, svc_id) {
        Ok(true) => stats::count(F::NEW),
        Ok(false) => {}
        Err(()) => return Err(Reason::RevNatFailed),
    }
    Ok(())
}

/// Deletes the record a released socket's storage names (`family`, address bytes, port),
/// counting it.
#[inline(always)]
pub fn forget(cookie: u64, family: u8, addr: &[u8; 16], port: u16) {
    match family {
        FAMILY_V4 => forget_in::<V4>(cookie, &V4::from_bytes(addr), port),
        FAMILY_V6 => forget_in::<V6>(cookie, &V6::from_bytes(addr), port),
        _ => {}
    }
}

/// Deletes the record (`cookie`, `addr`, `port`) of family `F`, counting it.
#[inline(always)]
pub fn forget_in<F: Records>(cookie: u64, addr: &F::Addr, port: u16) {
    if F::delete(cookie, addr, port) {
        stats::count(F::DELETED);
    }
}

/// Inserts `value` under `key` as a new entry (true), else replaces the existing one (false).
macro_rules! write_record {
    ($map:expr, $key:expr, $value:expr) => {
        match $map.insert($key, $value, BPF_NOEXIST as u64) {
            Ok(()) => Ok(true),
            Err(_) => $map.insert($key, $value, 0).map(|()| false).map_err(|_| ()),
        }
    };
}

impl Records for V4 {
    const FAMILY: u8 = FAMILY_V4;
    const NEW: Reason = Reason::RevNatNew4;
    const DELETED: Reason = Reason::RevNatDel4;

    #[inline(always)]
    fn write(
        cookie: u64,
        backend: &[u8; 4],
        backend_port: u16,
        frontend: &[u8; 4],
        port: u16,
        svc_id: u32,
    ) -> Result<bool, ()> {
        let key = SockRevNat4Key {
            cookie,
            addr: *backend,
            port: backend_port,
            _pad: 0,
        };
        let value = SockRevNat4Value {
            addr: *frontend,
            port,
            _pad: 0,
            svc_id,
        };
        write_record!(SOCK4_REVNAT, &key, &value)
    }

    #[inline(always)]
    fn read(cookie: u64, addr: &[u8; 4], port: u16) -> Option<([u8; 4], u16, u32)> {
        let key = SockRevNat4Key {
            cookie,
            addr: *addr,
            port,
            _pad: 0,
        };
        // SAFETY: a map lookup whose value is copied at once; an update racing it gives either
        // version.
        unsafe { SOCK4_REVNAT.get(&key) }.map(|v| (v.addr, v.port, v.svc_id))
    }

    #[inline(always)]
    fn delete(cookie: u64, addr: &[u8; 4], port: u16) -> bool {
        let key = SockRevNat4Key {
            cookie,
            addr: *addr,
            port,
            _pad: 0,
        };
        SOCK4_REVNAT.remove(&key).is_ok()
    }

    #[inline(always)]
    fn from_bytes(b: &[u8; 16]) -> [u8; 4] {
        [b[0], b[1], b[2], b[3]]
    }
}

/// The IPv6 record key: its padding written as three volatile 16-bit stores (zeroing the six
/// bytes alone compiles to a call of the byte-wise `memset`, on every socket's release).
#[inline(always)]
fn key6(cookie: u64, addr: &[u8; 16], port: u16) -> SockRevNat6Key {
    let mut key = core::mem::MaybeUninit::<SockRevNat6Key>::uninit();
    let k = key.as_mut_ptr();
    // SAFETY: every field written through the pointer before `assume_init`; `_pad` follows the
    // 16-bit port at an even offset, so its 16-bit words are aligned.
    unsafe {
        (&raw mut (*k).cookie).write(cookie);
        (&raw mut (*k).addr).write(*addr);
        (&raw mut (*k).port).write(port);
        let pad = (&raw mut (*k)._pad).cast::<u16>();
        pad.write_volatile(0);
        pad.add(1).write_volatile(0);
        pad.add(2).write_volatile(0);
        key.assume_init()
    }
}

impl Records for V6 {
    const FAMILY: u8 = FAMILY_V6;
    const NEW: Reason = Reason::RevNatNew6;
    const DELETED: Reason = Reason::RevNatDel6;

    #[inline(always)]
    fn write(
        cookie: u64,
        backend: &[u8; 16],
        backend_port: u16,
        frontend: &[u8; 16],
        port: u16,
        svc_id: u32,
    ) -> Result<bool, ()> {
        let key = key6(cookie, backend, backend_port);
        let value = SockRevNat6Value {
            addr: *frontend,
            port,
            _pad: 0,
            svc_id,
        };
        write_record!(SOCK6_REVNAT, &key, &value)
    }

    #[inline(always)]
    fn read(cookie: u64, addr: &[u8; 16], port: u16) -> Option<([u8; 16], u16, u32)> {
        let key = key6(cookie, addr, port);
        // SAFETY: a map lookup whose value is copied at once; an update racing it gives either
        // version.
        unsafe { SOCK6_REVNAT.get(&key) }.map(|v| (v.addr, v.port, v.svc_id))
    }

    #[inline(always)]
    fn delete(cookie: u64, addr: &[u8; 16], port: u16) -> bool {
        let key = key6(cookie, addr, port);
        SOCK6_REVNAT.remove(&key).is_ok()
    }

    #[inline(always)]
    fn from_bytes(b: &[u8; 16]) -> [u8; 16] {
        *b
    }
}
