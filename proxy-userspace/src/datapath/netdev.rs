//! The node's own interfaces and addresses, as this network namespace shows them.

use std::net::IpAddr;

/// Every address configured on an interface that is up (RTM_GETADDR joined with RTM_GETLINK).
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    super::netlink::Rtnl::new()?.local_addresses()
}

/// Interfaces that carry a default route (IPv4 or IPv6; any routing table, or the main one
/// alone with `main_only`; see `podif::default_route_names`): the node's external interfaces
/// when none are configured.
pub fn default_route_interfaces(main_only: bool) -> Vec<String> {
    let names = super::netlink::Rtnl::new().and_then(|mut rtnl| {
        let indexes = if main_only {
            rtnl.main_default_route_interfaces()?
        } else {
            rtnl.default_route_interfaces()?
        };
        Ok(super::podif::default_route_names(&rtnl.links()?, &indexes))
    });
    names.unwrap_or_else(|e| {
        log::warn!("cannot read the default routes: {e}");
        Vec::new()
    })
}

/// Whether interface `name` frames its packets with an Ethernet header (ARPHRD_ETHER), which the
/// XDP program reads; false when the links cannot be listed (no XDP rather than XDP misreading
/// every packet).
pub fn ethernet(name: &str) -> bool {
    super::netlink::Rtnl::new()
        .and_then(|mut rtnl| rtnl.links())
        .is_ok_and(|links| links.iter().any(|l| l.name == name && l.ether))
}

/// Whether an interface of this name exists here.
pub fn exists(interface: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(interface) else {
        return false;
    };
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// The kernel driver of an interface (ETHTOOL_GDRVINFO), e.g. "veth".
pub fn driver(interface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if interface.len() >= 16 {
        return None;
    }
    // SAFETY: plain-old-data structs; zero is a valid value for all their fields.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..interface.len()].copy_from_slice(interface.as_bytes());
    // SAFETY: a datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL with a valid ifreq pointing at a valid ethtool_drvinfo.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}
