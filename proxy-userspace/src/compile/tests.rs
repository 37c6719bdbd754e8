//! Table-driven tests of kube-proxy's rules: YAML in, backends per frontend out.

use super::*;
use crate::snapshot::{NodeInfo, Snapshot};

fn snapshot(yaml: &str, node: &str, zone: Option<&str>) -> Snapshot {
    let mut s = Snapshot {
        node: NodeInfo {
            name: node.into(),
            zone: zone.map(String::from),
        },
        ..Default::default()
    };
    for doc in yaml.split("\n---\n") {
        let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        match v["kind"].as_str() {
            Some("Service") => s.services.push(serde_yaml::from_value(v).unwrap()),
            Some("EndpointSlice") => s.slices.push(serde_yaml::from_value(v).unwrap()),
            _ => panic!("unexpected doc {doc}"),
        }
    }
    s
}

fn backends_of(d: &Desired, frontend: &str) -> Vec<String> {
    let f = d
        .frontends
        .iter()
        .find(|(k, _)| k.to_string() == frontend)
        .unwrap_or_else(|| panic!("no frontend {frontend} in {:?}", d.frontends.keys()));
    f.1.backends
        .iter()
        .map(|b| format!("{}:{}", b.addr, b.port))
        .collect()
}

const SVC: &str = "kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, protocol: TCP}]
---
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.0.2]
  nodeName: node-a
- addresses: [10.244.0.3]
  nodeName: node-b
  conditions: {ready: false}";

#[test]
fn clusterip_ready_endpoints_only() {
    // semantics 3.1, 3.2, 3.5
    let d = compile(&snapshot(SVC, "node-a", None));
    assert_eq!(backends_of(&d, "10.96.0.10:80/TCP"), ["10.244.0.2:8080"]);
}
