//! Frontends at tc and XDP: the Service a packet is for (an external-scope frontend, or at tc
//! for pods with socket-layer translation off an internal one) and whether its source may use
//! it (loadBalancerSourceRanges), one implementation per family.

use aya_ebpf::btf_maps::lpm_trie::Key as LpmKey;
use proxy_common::service::{
    SCOPE_INTERNAL, SERVICE_CIDRS, Service4Key, Service6Key, ServiceValue, SrcRange4, SrcRange6,
};

use crate::{
    access::maps::{LB4_SERVICES, LB4_SRC_RANGES, LB6_SERVICES, LB6_SRC_RANGES},
    flow::dsr::Dsr,
    headers::{
        Tuple,
        family::{Ip, V4, V6},
    },
};

/// The frontend maps of a family.
pub trait Frontends: Ip {
    /// The frontend (`addr`, `port`, `proto`) of `scope` (`SCOPE_EXTERNAL` or
    /// `SCOPE_INTERNAL`).
    fn lookup(addr: &Self::Addr, port: u16, proto: u8, scope: u8) -> Option<ServiceValue>;

    /// The frontend of `scope` the packet is for.
    #[inline(always)]
    fn frontend(t: &Tuple<Self::Addr>, scope: u8) -> Option<ServiceValue> {
        Self::lookup(&t.daddr, t.dport, t.proto, scope)
    }

    /// Whether `addr` is a ClusterIP (its any-port entry: semantics 3.12).
    fn cluster_ip(addr: &Self::Addr) -> bool;

    fn source_allowed(svc_id: u32, saddr: &Self::Addr) -> bool;

    /// Whether `addr` lies inside a ServiceCIDR (semantics 3.12): the agent keeps their ranges
    /// in the source-range maps under `SERVICE_CIDRS`, the id no frontend has.
    #[inline(always)]
    fn in_service_cidr(addr: &Self::Addr) -> bool {
        Self::source_allowed(SERVICE_CIDRS, addr)
    }
}

impl Frontends for V4 {
    #[inline(always)]
    fn lookup(addr: &[u8; 4], port: u16, proto: u8, scope: u8) -> Option<ServiceValue> {
        let key = Service4Key {
            addr: *addr,
            port,
            proto,
            scope,
        };
        // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
        unsafe { LB4_SERVICES.get(&key) }.copied()
    }

    #[inline(always)]
    fn cluster_ip(addr: &[u8; 4]) -> bool {
        let key = Service4Key {
            addr: *addr,
            port: 0,
            proto: 0,
            scope: SCOPE_INTERNAL,
        };
        // SAFETY: a map lookup whose value is not read.
        unsafe { LB4_SERVICES.get(&key) }.is_some()
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, saddr: &[u8; 4]) -> bool {
        let key = LpmKey::new(
            64,
            SrcRange4 {
                svc_id: svc_id.to_be_bytes(),
                addr: *saddr,
            },
        );
        LB4_SRC_RANGES.get(&key).is_some()
    }
}

impl Frontends for V6 {
    #[inline(always)]
    fn lookup(addr: &[u8; 16], port: u16, proto: u8, scope: u8) -> Option<ServiceValue> {
        let key = Service6Key {
            addr: *addr,
            port,
            proto,
            scope,
        };
        // SAFETY: a map lookup whose value is used at once; an update racing it gives either version.
        unsafe { LB6_SERVICES.get(&key) }.copied()
    }

    #[inline(always)]
    fn cluster_ip(addr: &[u8; 16]) -> bool {
        let key = Service6Key {
            addr: *addr,
            port: 0,
            proto: 0,
            scope: SCOPE_INTERNAL,
        };
        // SAFETY: a map lookup whose value is not read.
        unsafe { LB6_SERVICES.get(&key) }.is_some()
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, saddr: &[u8; 16]) -> bool {
        let key = LpmKey::new(
            160,
            SrcRange6 {
                svc_id: svc_id.to_be_bytes(),
                addr: *saddr,
            },
        );
        LB6_SRC_RANGES.get(&key).is_some()
    }
}

/// Everything the packet paths need of a family: its headers, its connection tracking and its
/// frontends.
pub trait Family: Dsr + Frontends {}

impl<F: Dsr + Frontends> Family for F {}
