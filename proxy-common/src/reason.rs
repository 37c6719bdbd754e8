//! Why the datapath did what it did: one numbered list for counters, logs and the CLI.

/// Index into `LB_STATS`. Never renumber: counters and tools read these numbers.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Destination is not a Service frontend; the socket was left untouched.
    NotService = 0,
    /// A connect()/sendmsg() was translated to a backend.
    Translated = 1,
    /// Translated to the backend remembered by session affinity.
    AffinityHit = 2,
    /// The Service has no usable endpoint: rejected with ECONNREFUSED (semantics 3.7).
    NoBackends = 3,
    /// internalTrafficPolicy Local with no local endpoint: dropped (semantics 3.8).
    NoLocalBackends = 4,
    /// A slot the Service entry promised was missing (a racing update); the socket was left
    /// untouched rather than failed.
    SlotMissing = 5,
    /// A slot named a backend id that does not exist.
    BackendMissing = 6,
    /// The reverse-translation entry could not be written; the socket was left untouched.
    RevNatFailed = 7,
    /// recvmsg/getpeername showed the Service address instead of the backend's.
    RevTranslated = 8,
}

/// Number of `Reason` values: the size of `LB_STATS`.
pub const REASON_COUNT: u32 = 9;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::NotService,
        Reason::Translated,
        Reason::AffinityHit,
        Reason::NoBackends,
        Reason::NoLocalBackends,
        Reason::SlotMissing,
        Reason::BackendMissing,
        Reason::RevNatFailed,
        Reason::RevTranslated,
    ];

    /// Stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotService => "not_service",
            Reason::Translated => "translated",
            Reason::AffinityHit => "affinity_hit",
            Reason::NoBackends => "no_backends",
            Reason::NoLocalBackends => "no_local_backends",
            Reason::SlotMissing => "slot_missing",
            Reason::BackendMissing => "backend_missing",
            Reason::RevNatFailed => "revnat_failed",
            Reason::RevTranslated => "rev_translated",
        }
    }
}
