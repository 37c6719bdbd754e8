//! Flow events for `kube-bpf-proxy monitor`: what the programs write to the `LB_EVENTS` ring
//! buffer while a monitor watches (`LB_MONITOR` holds a deadline in `bpf_ktime_get_ns` time;
//! past it, or at 0, the programs write nothing and pay one map lookup).

/// A connection or flow was translated to a backend.
pub const EVENT_TRANSLATED: u8 = 1;
/// A packet was dropped, or a connect()/sendmsg() failed, for `reason`.
pub const EVENT_DROPPED: u8 = 2;

/// How long a monitor's deadline runs past its last renewal: a monitor renews it every
/// second, so events stop within this long of a monitor going away without saying so.
pub const MONITOR_LEASE_NS: u64 = 3_000_000_000;

/// Size of `LB_EVENTS` in bytes (a power of two; about 3,000 events).
pub const EVENTS_BYTES: usize = 256 * 1024;

/// One event. Addresses are 16 bytes, IPv4 in the first four; an unknown address or port is 0.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u8,
    /// `reason::Hook`.
    pub hook: u8,
    /// `backend::FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// IANA protocol number.
    pub proto: u8,
    /// `reason::Reason`: `Translated` or `AffinityHit` for translations, the drop's reason.
    pub reason: u32,
    /// The frontend's id (`LB_SVC_INFO` names its Service), 0 when not known.
    pub svc_id: u32,
    /// The backend's id, 0 for drops.
    pub backend_id: u32,
    /// `bpf_ktime_get_ns()` when it happened.
    pub time_ns: u64,
    pub client: [u8; 16],
    pub frontend: [u8; 16],
    pub backend: [u8; 16],
    pub client_port: u16,
    pub frontend_port: u16,
    pub backend_port: u16,
    pub _pad: u16,
}

crate::pod!(Event);
