//! PURE: the plain values the proxy reasons about, shared by the sources, the snapshot and
//! compile (which sit above this module; it imports none of them).

use std::{fmt, net::IpAddr};

/// Entries of a Maglev table by default (about 160 backends at 1% imbalance).
pub const DEFAULT_MAGLEV_SIZE: u32 = 16381;

/// How a frontend picks the backend of a new connection. Session affinity, when set, wins
/// over every scheduler (semantics 6.x).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheduler {
    /// Uniformly at random over the slots (weights as slot counts): kube-proxy's behaviour
    /// (semantics 4.11).
    #[default]
    Random,
    /// Each backend in turn, weights ignored.
    RoundRobin,
    /// Each backend in turn, as many turns as its weight.
    WeightedRoundRobin,
    /// By a hash of the client: the same client reaches the same backend while the set is
    /// unchanged.
    SourceHash,
    /// The backend with the fewest active connections (counted by the socket hooks).
    LeastConnection,
    /// The fewest active connections relative to the backend's weight.
    WeightedLeastConnection,
    /// Shortest expected delay (IPVS `sed`): the least `(connections + 1) / weight`.
    ShortestExpectedDelay,
    /// Never queue (IPVS `nq`): an idle backend if there is one, else shortest expected delay.
    NeverQueue,
    /// Maglev consistent hashing of the flow: the same flow picks the same backend on every
    /// node, and a backend change moves only about 1/N of the flows.
    Maglev,
}

impl Scheduler {
    /// Parses a scheduler name; kube-proxy's `--ipvs-scheduler` names are aliases. Known
    /// schedulers this proxy does not implement yet are an error with the reason.
    pub fn parse(s: &str) -> Result<Scheduler, String> {
        match s.trim() {
            "random" => Ok(Scheduler::Random),
            "round-robin" | "rr" => Ok(Scheduler::RoundRobin),
            "weighted-round-robin" | "wrr" => Ok(Scheduler::WeightedRoundRobin),
            "source-hash" | "sh" => Ok(Scheduler::SourceHash),
            "maglev" | "mh" => Ok(Scheduler::Maglev),
            "least-connection" | "lc" => Ok(Scheduler::LeastConnection),
            "weighted-least-connection" | "wlc" => Ok(Scheduler::WeightedLeastConnection),
            "shortest-expected-delay" | "sed" => Ok(Scheduler::ShortestExpectedDelay),
            "never-queue" | "nq" => Ok(Scheduler::NeverQueue),
            other => Err(format!(
                "unknown scheduler {other:?} (random, round-robin/rr, weighted-round-robin/wrr, \
                 least-connection/lc, weighted-least-connection/wlc, \
                 shortest-expected-delay/sed, never-queue/nq, source-hash/sh, maglev/mh)"
            )),
        }
    }
    /// Schedulers that compare the active connections the datapath counts per backend.
    pub fn counts_connections(self) -> bool {
        matches!(
            self,
            Scheduler::LeastConnection
                | Scheduler::WeightedLeastConnection
                | Scheduler::ShortestExpectedDelay
                | Scheduler::NeverQueue
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Random => "random",
            Scheduler::RoundRobin => "round-robin",
            Scheduler::WeightedRoundRobin => "weighted-round-robin",
            Scheduler::SourceHash => "source-hash",
            Scheduler::LeastConnection => "least-connection",
            Scheduler::WeightedLeastConnection => "weighted-least-connection",
            Scheduler::ShortestExpectedDelay => "shortest-expected-delay",
            Scheduler::NeverQueue => "never-queue",
            Scheduler::Maglev => "maglev",
        }
    }
}

/// An address prefix (`loadBalancerSourceRanges`, `--nodeport-addresses`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n` or `x::y/n` (a bare address is a full-length prefix); host bits are
    /// cleared.
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        if len > max {
            return None;
        }
        Some(Cidr {
            addr: mask(addr, len),
            len,
        })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(*ip, self.len) == self.addr
    }

    /// This prefix without address `ip`: itself when it does not hold `ip`, else the
    /// prefixes that cover the rest of it, one per bit below its length (the sibling of each
    /// half that holds `ip`), longest last.
    pub fn without(&self, ip: &IpAddr) -> Vec<Cidr> {
        if !self.contains(ip) {
            return vec![*self];
        }
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (self.len + 1..=max)
            .map(|len| {
                // The prefix of `len` bits that shares `ip`'s first len - 1 bits only.
                let flipped = match ip {
                    IpAddr::V4(a) => {
                        IpAddr::from((u32::from(*a) ^ (1u32 << (32 - len))).to_be_bytes())
                    }
                    IpAddr::V6(a) => {
                        IpAddr::from((u128::from(*a) ^ (1u128 << (128 - len))).to_be_bytes())
                    }
                };
                Cidr {
                    addr: mask(flipped, len),
                    len,
                }
            })
            .collect()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u32::from(a) & m).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::from((u128::from(a) & m).to_be_bytes())
        }
    }
}

/// Namespace label that turns socket-layer translation off (`disabled`) or on (`enabled`) for
/// the namespace's pods, whatever `--socket-lb-default` says.
pub const SOCKET_LB_LABEL: &str = "kube-bpf-proxy.io/socket-lb";

/// Where a pod's connections to Services are translated.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SocketLb {
    /// At connect()/sendmsg(), once per connection (the default).
    #[default]
    Enabled,
    /// Per packet, at tc on the pod's interface, after the pod's own netfilter rules (a service
    /// mesh's redirect to its sidecar) have seen the Service address.
    Disabled,
}

impl SocketLb {
    /// Reads the label's value: `enabled`/`disabled` (also `true`/`false`, `on`/`off`).
    pub fn parse_label(value: &str) -> Result<SocketLb, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "enabled" | "true" | "on" => Ok(SocketLb::Enabled),
            "disabled" | "false" | "off" => Ok(SocketLb::Disabled),
            other => Err(format!(
                "{SOCKET_LB_LABEL}={other:?} is neither enabled nor disabled"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SocketLb::Enabled => "enabled",
            SocketLb::Disabled => "disabled",
        }
    }
}
