use std::net::IpAddr;

use super::*;

fn link(index: u32, name: &str, master: Option<u32>, kind: Option<&str>) -> Link {
    Link {
        index,
        name: name.into(),
        master,
        kind: kind.map(str::to_string),
        up: true,
        loopback: index == 1,
        ether: index != 1 && !matches!(kind, Some("wireguard" | "tun" | "ipip" | "gre" | "ipoib")),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// lo, eth0 (external), a bridge cni0 with port veth1, and two routed pod veths.
fn links() -> Vec<Link> {
    vec![
        link(1, "lo", None, None),
        link(2, "eth0", None, Some("veth")),
        link(3, "cni0", None, Some("bridge")),
        link(4, "veth1", Some(3), Some("veth")),
        link(5, "calia1", None, Some("veth")),
        link(6, "calib2", None, Some("veth")),
    ]
}

/// Routes as a node with both shapes would have them.
fn route(a: IpAddr) -> RouteHit {
    match a.to_string().as_str() {
        "10.244.0.5" => RouteHit::Direct { oif: 5 },
        "10.244.0.6" => RouteHit::Direct { oif: 6 },
        "10.244.1.2" => RouteHit::Direct { oif: 3 },
        "10.244.9.9" => RouteHit::Gateway { oif: 2 },
        "192.168.77.1" => RouteHit::Local,
        "fd00:244::1" => RouteHit::Direct { oif: 4 },
        _ => RouteHit::Gateway { oif: 2 },
    }
}

#[test]
fn glob_matches_like_a_shell() {
    assert!(glob("cali*", "cali12345"));
    assert!(glob("cali*", "cali"));
    assert!(!glob("cali*", "eth0"));
    assert!(glob("veth?", "veth1"));
    assert!(!glob("veth?", "veth12"));
    assert!(glob("*", "anything"));
    assert!(glob("e*n*", "eni0abc"));
    assert!(!glob("gke*x", "gke123"));
}

#[test]
fn parse_accepts_auto_names_patterns_and_none() {
    let p = PodInterfaces::parse(&["auto".into(), "cni0".into(), "cali*".into()]).unwrap();
    assert_eq!(
        p.0,
        vec![
            Selector::Auto,
            Selector::Name("cni0".into()),
            Selector::Pattern("cali*".into())
        ]
    );
    assert!(PodInterfaces::parse(&["none".into()]).unwrap().is_empty());
    assert!(PodInterfaces::parse(&["".into()]).unwrap().is_empty());
    assert!(PodInterfaces::parse(&["a-name-longer-than-15".into()]).is_err());
    assert!(PodInterfaces::parse(&["a/b".into()]).is_err());
}

#[test]
fn auto_follows_routes_to_local_endpoints() {
    let spec = PodInterfaces::parse(&["auto".into()]).unwrap();
    let inputs = ClusterInputs {
        endpoints: [
            ip("10.244.0.5"),
            ip("10.244.1.2"),
            ip("10.244.9.9"),
            ip("192.168.77.1"),
            ip("fd00:244::1"),
        ]
        .into(),
        pod_cidrs: Vec::new(),
        ..ClusterInputs::default()
    };
    let found = discover(&spec, &links(), &["eth0".into()], &[], &inputs, &mut route);
    let got: Vec<(&str, String)> = found
        .wanted
        .iter()
        .map(|(n, w)| (n.as_str(), w.why.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("calia1", "pod: route to endpoint 10.244.0.5".to_string()),
            (
                "cni0",
                // The v6 endpoint's route leaves through a bridge port: the bridge carries it.
                "pod: route to endpoint 10.244.1.2".to_string()
            ),
            ("eth0", "external".to_string()),
        ]
    );
    assert_eq!(found.wanted["calia1"].index, 5);
    assert!(found.missing.is_empty());
}

/// Overlays (flannel's vxlan, Calico's VXLAN): the route to pods on other nodes leaves through
/// a tunnel device, which carries the program (replies of masqueraded flows arrive there),
/// also one without an Ethernet header (Calico's ipip `tunl0`, flagged in its record); one
/// through an external interface, a GRE device or another device of unknown shape (IPoIB) adds
/// nothing.
#[test]
fn routes_to_remote_endpoints_through_a_tunnel_select_it() {
    let spec = PodInterfaces::parse(&["auto".into()]).unwrap();
    let mut all = links();
    all.push(link(7, "flannel.1", None, Some("vxlan")));
    all.push(link(8, "tunl0", None, Some("ipip")));
    all.push(link(9, "gre0", None, Some("gre")));
    all.push(link(10, "ib0", None, Some("ipoib")));
    let inputs = ClusterInputs {
        remote: [
            ip("10.244.1.9"),
            ip("10.244.2.9"),
            ip("10.244.3.9"),
            ip("10.244.4.9"),
            ip("10.244.5.9"),
            ip("fd00:244:1::9"),
        ]
        .into(),
        ..ClusterInputs::default()
    };
    let mut route = |a: IpAddr| match a.to_string().as_str() {
        "10.244.1.9" | "fd00:244:1::9" => RouteHit::Gateway { oif: 7 },
        "10.244.2.9" => RouteHit::Gateway { oif: 8 },
        "10.244.4.9" => RouteHit::Gateway { oif: 9 },
        "10.244.5.9" => RouteHit::Direct { oif: 10 },
        _ => RouteHit::Gateway { oif: 2 },
    };
    let found = discover(&spec, &all, &["eth0".into()], &[], &inputs, &mut route);
    let got: Vec<(&str, String)> = found
        .wanted
        .iter()
        .map(|(n, w)| (n.as_str(), w.why.to_string()))
        .collect();
    assert_eq!(
        got,
        [
            ("eth0", "external".to_string()),
            (
                "flannel.1",
                "route to remote endpoint 10.244.1.9".to_string()
            ),
            ("tunl0", "route to remote endpoint 10.244.2.9".to_string()),
        ]
    );
    let vxlan = found.wanted["flannel.1"].why.info("flannel.1", 7, false);
    assert_eq!(vxlan.why, proxy_common::info::IFACE_REMOTE_ROUTE);
    assert!(!vxlan.no_link_header());
    let ipip = found.wanted["tunl0"].why.info("tunl0", 8, true);
    assert_eq!(ipip.reason(), proxy_common::info::IFACE_REMOTE_ROUTE);
    assert!(ipip.no_link_header());
}

#[test]
fn bridge_ports_count_as_their_bridge() {
    let spec = PodInterfaces::parse(&["veth*".into()]).unwrap();
    let found = discover(
        &spec,
        &links(),
        &[],
        &[],
        &ClusterInputs::default(),
        &mut route,
    );
    assert_eq!(found.wanted.len(), 1);
    let w = &found.wanted["cni0"];
    assert_eq!(w.index, 3);
    assert_eq!(
        w.why,
        Why::Bridge {
            port: "veth1".into(),
            because: Box::new(Why::Pattern("veth*".into()))
        }
    );
}

#[test]
fn patterns_and_missing_names() {
    let spec = PodInterfaces::parse(&["cali*".into(), "cni9".into()]).unwrap();
    let found = discover(
        &spec,
        &links(),
        &[],
        &[],
        &ClusterInputs::default(),
        &mut route,
    );
    assert_eq!(
        found.wanted.keys().collect::<Vec<_>>(),
        vec!["calia1", "calib2"]
    );
    assert_eq!(found.missing, vec!["cni9".to_string()]);
    // A pattern matching nothing selects nothing, and is no error.
    let spec = PodInterfaces::parse(&["lxc*".into()]).unwrap();
    let found = discover(
        &spec,
        &links(),
        &[],
        &[],
        &ClusterInputs::default(),
        &mut route,
    );
    assert!(found.wanted.is_empty() && found.missing.is_empty());
}

#[test]
fn pod_cidr_route_selects_its_interface() {
    let spec = PodInterfaces::parse(&["auto".into()]).unwrap();
    let inputs = ClusterInputs {
        endpoints: Default::default(),
        pod_cidrs: vec![Cidr::parse("10.244.1.0/24").unwrap()],
        ..ClusterInputs::default()
    };
    let mut r = |a: IpAddr| {
        if a.to_string().starts_with("10.244.1.") {
            RouteHit::Direct { oif: 3 }
        } else {
            RouteHit::None
        }
    };
    let found = discover(&spec, &links(), &[], &[], &inputs, &mut r);
    assert_eq!(
        found.wanted["cni0"].why.to_string(),
        "pod: route to pod CIDR 10.244.1.0/24"
    );
}

#[test]
fn waiting_until_the_interface_carries_the_program() {
    let eps = [
        ip("10.244.0.5"),
        ip("10.244.0.6"),
        ip("fd00:244::1"),
        ip("192.168.77.1"),
        ip("10.244.9.9"),
    ]
    .into();
    let none = waiting(&eps, &BTreeSet::new(), &links(), &mut route);
    assert_eq!(
        none,
        [ip("10.244.0.5"), ip("10.244.0.6"), ip("fd00:244::1")].into()
    );
    // calia1 and the bridge (whose port veth1 leads to fd00:244::1) carry it.
    let some = waiting(&eps, &[5, 3].into(), &links(), &mut route);
    assert_eq!(some, [ip("10.244.0.6")].into());
}

#[test]
fn why_records_round_trip_to_words() {
    let info = Why::Route(ip("10.244.0.5")).info("calia1", 5, false);
    assert_eq!(
        tclinks::describe(&info),
        "pod: route to endpoint 10.244.0.5"
    );
    let info = Why::Bridge {
        port: "veth1".into(),
        because: Box::new(Why::Route(ip("fd00:244::1"))),
    }
    .info("cni0", 3, false);
    assert_eq!(
        tclinks::describe(&info),
        "bridge: its port veth1 carries the route to endpoint fd00:244::1"
    );
    assert_eq!(
        tclinks::describe(&Why::External.info("eth0", 2, false)),
        "external"
    );
    assert_eq!(
        tclinks::describe(&Why::RemoteRoute(ip("10.244.2.9")).info("tunl0", 8, true)),
        "route to remote endpoint 10.244.2.9; no link-layer header (tc_ingress_l3)"
    );
    assert_eq!(
        tclinks::describe(&Why::Pattern("cali*".into()).info("calia1", 5, false)),
        "pod: name matches pattern cali*"
    );
}

#[test]
fn default_route_interfaces_leave_out_the_loopback_and_l3_devices() {
    let mut all = links();
    all.push(link(7, "eth1", None, Some("veth")));
    all.push(link(8, "wg0", None, Some("wireguard")));
    all.push(link(9, "tailscale0", None, Some("tun")));
    // Default routes through lo (a blackhole-ish table), eth0 (main), eth1 (its own table, as
    // the AWS VPC CNI writes it), a WireGuard and a tun device (VPNs' tables): two usable.
    assert_eq!(
        default_route_names(&all, &[1, 2, 7, 8, 9]),
        ["eth0".to_string(), "eth1".to_string()]
    );
    assert!(default_route_names(&all, &[]).is_empty());
}

#[test]
fn interfaces_holding_a_node_port_address_are_external_unless_they_face_pods() {
    // semantics 7.1, 7.2: a NodePort answers on every node address (of the selection), so
    // the interface holding one gets tc, like a second network without a default route.
    let mut all = links();
    all.push(link(7, "eth1", None, Some("veth")));
    all.push(link(8, "wg0", None, Some("wireguard")));
    all.push(link(9, "bond0", None, Some("bond")));
    all.push(link(10, "eth2", Some(9), Some("veth")));
    all.push(link(11, "docker0", None, Some("bridge")));
    all.push(link(12, "br-ex", None, Some("bridge")));
    all.push(link(13, "enp1s0", Some(12), None));
    all.push(link(15, "ovn-k8s-mp0", None, Some("openvswitch")));
    all.push(link(16, "vxlan0", None, Some("vxlan")));
    let addresses = [
        (1, ip("127.0.0.1"), 8),
        (2, ip("192.168.77.1"), 24),
        (2, ip("fd00:77::1"), 64),
        // The pod bridge's gateway (inside the pod CIDR), a ptp CNI's gateway on each pod
        // veth (a host prefix, held twice).
        (3, ip("10.244.0.1"), 24),
        (5, ip("10.244.1.1"), 32),
        (6, ip("10.244.1.1"), 32),
        (7, ip("192.168.78.1"), 24),
        (7, ip("fd00:78::1"), 64),
        (8, ip("10.9.0.1"), 24),
        (9, ip("172.16.0.1"), 16),
        (10, ip("172.17.0.9"), 16),
        (11, ip("172.18.0.1"), 16),
        (12, ip("192.168.79.1"), 24),
        // Pod gateways and overlays without a pod CIDR to tell them by.
        (15, ip("10.128.0.2"), 23),
        (16, ip("10.10.0.1"), 24),
    ];
    let mut nodeport: Vec<IpAddr> = addresses
        .iter()
        .map(|(_, ip, _)| *ip)
        .filter(|ip| !ip.is_loopback())
        .collect();
    let pod_cidrs = [Cidr::parse("10.244.0.0/24").unwrap()];
    let found = nodeport_interfaces(&all, &addresses, &nodeport, &pod_cidrs);
    // Not: lo, cni0 (pod CIDR, veth ports), calia1/calib2 (host prefix, shared), wg0 (no
    // Ethernet header), eth2 (a bond's port), an Open vSwitch internal port (OVN-Kubernetes'
    // pod gateway), a VXLAN device. A bridge whose port is a NIC is taken.
    assert_eq!(found, ["eth0", "eth1", "bond0", "docker0", "br-ex"]);
    // A container bridge (a veth port) faces containers.
    all.push(link(14, "vethc0", Some(11), Some("veth")));
    let found = nodeport_interfaces(&all, &addresses, &nodeport, &pod_cidrs);
    assert_eq!(found, ["eth0", "eth1", "bond0", "br-ex"]);
    // --nodeport-addresses narrows it: only the selected addresses count.
    nodeport.retain(|ip| ip.to_string().starts_with("192.168.78."));
    let found = nodeport_interfaces(&all, &addresses, &nodeport, &pod_cidrs);
    assert_eq!(found, ["eth1"]);
    assert!(nodeport_interfaces(&all, &addresses, &[], &pod_cidrs).is_empty());
}

#[test]
fn interfaces_holding_a_node_port_address_come_after_named_ones_and_patterns() {
    // A name or a pattern of --pod-interfaces says an interface faces pods: that wins. Over a
    // route to a local endpoint, the NodePort address wins (the kinds and places that face
    // pods are left out before: `nodeport_interfaces`).
    let spec = PodInterfaces::parse(&["auto".into(), "calib*".into(), "cni0".into()]).unwrap();
    let inputs = ClusterInputs {
        endpoints: [ip("10.244.0.5")].into(),
        ..ClusterInputs::default()
    };
    let by_address = ["calia1", "calib2", "cni0", "gone0"].map(String::from);
    let found = discover(&spec, &links(), &[], &by_address, &inputs, &mut route);
    let why = |n: &str| found.wanted.get(n).map(|w| w.why.clone());
    assert_eq!(why("calia1"), Some(Why::External));
    assert_eq!(why("calib2"), Some(Why::Pattern("calib*".into())));
    assert_eq!(why("cni0"), Some(Why::Named));
    assert_eq!(why("gone0"), None);
}

#[test]
fn an_interface_stays_external_while_its_address_is_away_unless_it_turns_to_pods() {
    let mut all = links();
    all.push(link(7, "eth1", None, Some("veth")));
    all.push(link(8, "br1", None, Some("bridge")));
    let before = ["eth1", "br1", "gone0"].map(String::from);
    let pod_cidrs = [Cidr::parse("10.244.0.0/24").unwrap()];
    // Addresses flushed: both stay; a vanished interface goes.
    let kept = nodeport_interfaces_kept(&all, &[], &[], &pod_cidrs, &before);
    assert_eq!(kept, ["br1", "eth1"]);
    // br1 gets the pods' gateway (the pod CIDR came later than the first pass), eth1 an
    // address another interface holds too: neither stays.
    let addresses = [
        (8, ip("10.244.0.1"), 24),
        (7, ip("10.9.9.1"), 24),
        (2, ip("10.9.9.1"), 24),
    ];
    let kept = nodeport_interfaces_kept(&all, &addresses, &[], &pod_cidrs, &before);
    assert!(kept.is_empty(), "{kept:?}");
    // A veth port on br1: a pod bridge, not kept.
    all.push(link(9, "vethp", Some(8), Some("veth")));
    let kept = nodeport_interfaces_kept(&all, &[], &[], &pod_cidrs, &before);
    assert_eq!(kept, ["eth1"]);
}
