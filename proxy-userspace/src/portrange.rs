//! Masquerading source ports (`--masquerade-port-range`) and the node's ephemeral ports
//! (`net.ipv4.ip_local_port_range`): the two must not overlap, or a masqueraded flow and a
//! connection of the node itself can claim the same tuple (the datapath's connection tracking
//! does not see the node's sockets).

use std::{fmt, str::FromStr};

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// Masquerading ports start here at the lowest: below are the privileged ports.
pub const LOWEST: u16 = 1024;
/// A default range is only chosen with at least this many ports.
const MIN_DEFAULT_PORTS: u32 = 1024;

/// Where the kernel keeps the ephemeral range of the current network namespace.
pub const EPHEMERAL_SYSCTL: &str = "net.ipv4.ip_local_port_range";
const EPHEMERAL_PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `LOW-HIGH`, `LOWEST` <= LOW <= HIGH <= 65535.
    fn from_str(s: &str) -> Result<Self, String> {
        let (low, high) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected LOW-HIGH, e.g. 61000-65535"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: {p:?} is not a port (0-65535)"))
        };
        let (first, last) = (port(low)?, port(high)?);
        if first < LOWEST {
            return Err(format!(
                "{s:?}: ports below {LOWEST} are privileged ports, not for masquerading"
            ));
        }
        if first > last {
            return Err(format!("{s:?}: LOW is above HIGH"));
        }
        Ok(PortRange { first, last })
    }
}

/// Parses the sysctl's text (`32768\t60999`).
pub fn parse_ephemeral(text: &str) -> Result<PortRange, String> {
    let mut f = text.split_whitespace().map(str::parse::<u16>);
    match (f.next(), f.next(), f.next()) {
        (Some(Ok(first)), Some(Ok(last)), None) if first <= last => Ok(PortRange { first, last }),
        _ => Err(format!("{EPHEMERAL_SYSCTL}: unexpected value {text:?}")),
    }
}

/// The ephemeral range of the caller's network namespace.
pub fn read_ephemeral() -> Result<PortRange, String> {
    let text = std::fs::read_to_string(EPHEMERAL_PATH)
        .map_err(|e| format!("read {EPHEMERAL_PATH}: {e}"))?;
    parse_ephemeral(&text)
}

/// The masquerading range to use: `configured` if it stays clear of `ephemeral`, else an
/// error naming both; without one, 61000-65535 (above Linux's default 32768-60999) when that
/// is clear of it, else the ports above the ephemeral range, or else those below it, whichever
/// holds at least 1024 ports.
pub fn choose(configured: Option<PortRange>, ephemeral: PortRange) -> Result<PortRange, String> {
    if let Some(range) = configured {
        if range.overlaps(&ephemeral) {
            return Err(format!(
                "--masquerade-port-range {range} overlaps the node's ephemeral ports {ephemeral} \
                 ({EPHEMERAL_SYSCTL}): a masqueraded flow and a connection of the node itself \
                 could claim the same tuple; choose a range outside {ephemeral} or narrow \
                 {EPHEMERAL_SYSCTL}"
            ));
        }
        return Ok(range);
    }
    let usual = PortRange {
        first: proxy_common::config::SNAT_PORT_MIN_DEFAULT,
        last: proxy_common::config::SNAT_PORT_MAX_DEFAULT,
    };
    if !usual.overlaps(&ephemeral) {
        return Ok(usual);
    }
    if u32::from(ephemeral.last) + MIN_DEFAULT_PORTS <= 65535 {
        return Ok(PortRange {
            first: ephemeral.last + 1,
            last: 65535,
        });
    }
    if u32::from(ephemeral.first) >= u32::from(LOWEST) + MIN_DEFAULT_PORTS {
        return Ok(PortRange {
            first: LOWEST,
            last: ephemeral.first - 1,
        });
    }
    Err(format!(
        "the node's ephemeral ports {ephemeral} ({EPHEMERAL_SYSCTL}) leave fewer than \
         {MIN_DEFAULT_PORTS} ports above or below them for masquerading; narrow \
         {EPHEMERAL_SYSCTL} or pass --masquerade-port-range LOW-HIGH outside it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn parses_ranges_and_refuses_bad_ones() {
        assert_eq!("61000-65535".parse(), Ok(r(61000, 65535)));
        assert_eq!(" 2000 - 2000".parse(), Ok(r(2000, 2000)));
        for bad in ["61000", "a-b", "65535-61000", "80-1000", "61000-70000", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_sysctl_format() {
        assert_eq!(parse_ephemeral("32768\t60999\n"), Ok(r(32768, 60999)));
        assert!(parse_ephemeral("32768").is_err());
        assert!(parse_ephemeral("60999 32768").is_err());
    }

    #[test]
    fn default_lies_outside_the_ephemeral_range() {
        assert_eq!(choose(None, r(32768, 60999)), Ok(r(61000, 65535)));
        assert_eq!(choose(None, r(40000, 40063)), Ok(r(61000, 65535)));
        assert_eq!(choose(None, r(32768, 61999)), Ok(r(62000, 65535)));
        // A range reaching the top: the ports below it.
        assert_eq!(choose(None, r(40000, 65000)), Ok(r(1024, 39999)));
        assert!(choose(None, r(1024, 65535)).is_err());
    }

    #[test]
    fn an_overlapping_range_is_refused_naming_both_and_the_sysctl() {
        let e = choose(Some(r(60000, 62000)), r(32768, 60999)).unwrap_err();
        assert!(e.contains("60000-62000"), "{e}");
        assert!(e.contains("32768-60999"), "{e}");
        assert!(e.contains(EPHEMERAL_SYSCTL), "{e}");
        assert_eq!(
            choose(Some(r(20000, 29999)), r(32768, 60999)),
            Ok(r(20000, 29999))
        );
        // Touching at one port is an overlap.
        assert!(choose(Some(r(60999, 65535)), r(32768, 60999)).is_err());
    }
}
