//! PURE: which pods of this node have socket-layer translation off (a namespace label, or
//! `--socket-lb-default disabled`), and where kubelet puts their cgroups. The agent's
//! `datapath::socklb` thread finds those cgroups and writes them to `LB_SOCKLB_OFF`.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::core::v1::Namespace;

use crate::{
    model::{SOCKET_LB_LABEL, SocketLb},
    objects::PodRef,
};

/// A pod whose Services are translated per packet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PerPacketPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ips: Vec<IpAddr>,
}

/// What the agent decided from the objects: the pods translated per packet, each namespace's
/// setting, and the label values it could not read (`namespace`, message).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub pods: Vec<PerPacketPod>,
    /// Namespaces whose pods are translated per packet (by label or by default), sorted.
    pub per_packet_namespaces: Vec<String>,
    pub problems: Vec<(String, String)>,
}

/// The setting of each namespace: its label, else `default`. A label value that cannot be
/// read is reported and the default applies.
pub fn namespace_settings(
    namespaces: &[Arc<Namespace>],
    default: SocketLb,
    problems: &mut Vec<(String, String)>,
) -> BTreeMap<String, SocketLb> {
    let mut out = BTreeMap::new();
    for ns in namespaces {
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        let label = ns
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SOCKET_LB_LABEL));
        let setting = match label.map(|v| SocketLb::parse_label(v)) {
            None => default,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                problems.push((name.clone(), format!("{e}; using {}", default.as_str())));
                default
            }
        };
        out.insert(name, setting);
    }
    out
}

/// The pods of `node` translated per packet: those of namespaces whose setting is `disabled`
/// (a namespace not seen yet takes `default`). Host-network pods keep socket-layer translation:
/// their packets never cross a pod-facing interface.
pub fn decide(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<PodRef>],
    node: &str,
    default: SocketLb,
) -> Decision {
    let mut problems = Vec::new();
    let settings = namespace_settings(namespaces, default, &mut problems);
    per_packet(settings, pods, node, default, problems)
}

/// `--masquerade-all`: every pod of `node` but host-network ones is translated per packet,
/// whatever its namespace's label says, since the socket layer cannot masquerade (semantics
/// 7.12: every ClusterIP connection is masqueraded).
pub fn decide_every_pod(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<PodRef>],
    node: &str,
) -> Decision {
    let settings = namespaces
        .iter()
        .filter_map(|ns| ns.metadata.name.clone())
        .map(|name| (name, SocketLb::Disabled))
        .collect();
    per_packet(settings, pods, node, SocketLb::Disabled, Vec::new())
}

/// The pods of `node` in namespaces whose setting is `disabled` (`default` for a namespace not
/// seen yet).
fn per_packet(
    settings: BTreeMap<String, SocketLb>,
    pods: &[Arc<PodRef>],
    node: &str,
    default: SocketLb,
    problems: Vec<(String, String)>,
) -> Decision {
    let setting = |ns: &str| settings.get(ns).copied().unwrap_or(default);
    let mut out: Vec<PerPacketPod> = pods
        .iter()
        .filter(|p| p.node_name == node && !p.host_network)
        .filter_map(|p| {
            let namespace = p.metadata.namespace.clone()?;
            let uid = p.metadata.uid.clone().filter(|u| !u.is_empty())?;
            (setting(&namespace) == SocketLb::Disabled).then(|| PerPacketPod {
                namespace,
                name: p.metadata.name.clone().unwrap_or_default(),
                uid,
                ips: p.ips.clone(),
            })
        })
        .collect();
    out.sort();
    let per_packet_namespaces = settings
        .iter()
        .filter(|(_, s)| **s == SocketLb::Disabled)
        .map(|(n, _)| n.clone())
        .collect();
    Decision {
        pods: out,
        per_packet_namespaces,
        problems,
    }
}

/// The names kubelet gives a pod's cgroup directory: `pod<uid>` (cgroupfs driver:
/// `kubepods/[burstable|besteffort/]pod<uid>`) and `kubepods[-<qos>]-pod<uid with _>.slice`
/// (systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`).
pub fn is_pod_cgroup_of(dir_name: &str, uid: &str) -> bool {
    if dir_name.strip_prefix("pod") == Some(uid) {
        return true;
    }
    let systemd_uid = uid.replace('-', "_");
    dir_name
        .strip_suffix(".slice")
        .and_then(|n| n.strip_prefix("kubepods"))
        .and_then(|n| n.rsplit_once("-pod"))
        .is_some_and(|(_, u)| u == systemd_uid)
}

/// The uid a pod cgroup directory's name carries, if it is one (either driver's naming).
pub fn pod_uid_of(dir_name: &str) -> Option<String> {
    if let Some(uid) = dir_name.strip_prefix("pod")
        && uid.len() >= 32
        && !uid.contains('.')
    {
        return Some(uid.to_string());
    }
    let (_, u) = dir_name
        .strip_suffix(".slice")?
        .strip_prefix("kubepods")?
        .rsplit_once("-pod")?;
    (u.len() >= 32).then(|| u.replace('_', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, label: Option<&str>) -> Arc<Namespace> {
        let mut n = Namespace::default();
        n.metadata.name = Some(name.into());
        if let Some(v) = label {
            n.metadata.labels = Some([(SOCKET_LB_LABEL.to_string(), v.to_string())].into());
        }
        Arc::new(n)
    }

    fn pod(ns: &str, name: &str, node: &str, host: bool) -> Arc<PodRef> {
        let mut p = PodRef {
            node_name: node.into(),
            host_network: host,
            ips: vec!["10.244.0.9".parse().unwrap()],
            ..PodRef::default()
        };
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        Arc::new(p)
    }

    #[test]
    fn labels_win_over_the_default_and_bad_values_are_reported() {
        let namespaces = [
            ns("mesh", Some("disabled")),
            ns("plain", None),
            ns("back", Some("enabled")),
            ns("odd", Some("maybe")),
        ];
        let pods = [
            pod("mesh", "a", "n1", false),
            pod("mesh", "host", "n1", true),
            pod("mesh", "elsewhere", "n2", false),
            pod("plain", "b", "n1", false),
            pod("back", "c", "n1", false),
            pod("odd", "d", "n1", false),
            pod("unseen", "e", "n1", false),
        ];
        let d = decide(&namespaces, &pods, "n1", SocketLb::Enabled);
        let names: Vec<&str> = d.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(d.per_packet_namespaces, ["mesh"]);
        assert_eq!(d.problems.len(), 1);
        assert!(d.problems[0].1.contains("maybe"), "{:?}", d.problems);

        let d = decide(&namespaces, &pods, "n1", SocketLb::Disabled);
        let names: Vec<&str> = d.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "d", "b", "e"]); // sorted by namespace, then name
        assert_eq!(d.per_packet_namespaces, ["mesh", "odd", "plain"]);

        // --masquerade-all: every pod of the node but host-network ones, labels aside.
        let d = decide_every_pod(&namespaces, &pods, "n1");
        let names: Vec<&str> = d.pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "d", "b", "e"]);
        assert_eq!(d.per_packet_namespaces, ["back", "mesh", "odd", "plain"]);
        assert!(d.problems.is_empty());
    }

    #[test]
    fn kubelet_cgroup_names_of_both_drivers() {
        let uid = "0d9c8a4e-5b1f-4c3a-9f00-123456789abc";
        for name in [
            format!("pod{uid}"),
            format!("kubepods-pod{}.slice", uid.replace('-', "_")),
            format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
            format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
        ] {
            assert!(is_pod_cgroup_of(&name, uid), "{name}");
            assert_eq!(pod_uid_of(&name).as_deref(), Some(uid), "{name}");
        }
        for name in [
            "kubepods.slice",
            "kubepods-besteffort.slice",
            "besteffort",
            "cri-containerd-abc.scope",
            "pod",
        ] {
            assert!(!is_pod_cgroup_of(name, uid), "{name}");
            assert_eq!(pod_uid_of(name), None, "{name}");
        }
        assert!(!is_pod_cgroup_of(&format!("pod{uid}x"), uid));
    }
}
