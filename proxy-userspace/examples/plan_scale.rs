//! Times compile + plan at 10k Services x 10 endpoints: a full sync and a one-endpoint change.
use std::time::Instant;

use proxy_userspace::{
    capacity::{Capacity, fit},
    compile::compile,
    plan::{MapState, plan},
    snapshot::{NodeInfo, Snapshot},
};

fn snapshot(n: usize, eps: usize, changed: Option<usize>) -> Snapshot {
    let mut yaml = String::new();
    for i in 0..n {
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        yaml.push_str(&format!(
            "kind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n---\n"
        ));
        let endpoints: Vec<String> = (0..eps)
            .map(|e| {
                let e = if changed == Some(i) && e == 0 {
                    eps + 1
                } else {
                    e
                };
                format!(
                    "{{addresses: [10.{}.{}.{}]}}",
                    100 + i / 250,
                    i % 250,
                    e + 1
                )
            })
            .collect();
        yaml.push_str(&format!(
            "kind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n---\n",
            endpoints.join(", ")
        ));
    }
    let mut s = Snapshot {
        node: NodeInfo {
            name: "n".into(),
            zone: None,
            addresses: Vec::new(),
            ..Default::default()
        },
        ..Default::default()
    };
    use serde::Deserialize;
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Service") => s
                .services
                .push(std::sync::Arc::new(serde_yaml::from_value(v).unwrap())),
            Some("EndpointSlice") => s
                .slices
                .push(std::sync::Arc::new(serde_yaml::from_value(v).unwrap())),
            _ => {}
        }
    }
    s
}

fn main() {
    let n = 10_000;
    let full = snapshot(n, 10, None);
    let changed = snapshot(n, 10, Some(4321));
    let t = Instant::now();
    let d = compile(&full);
    let compiled = t.elapsed();
    let mut state = MapState::default();
    let t = Instant::now();
    let ops = plan(&d, &state);
    let planned = t.elapsed();
    for op in &ops {
        state.apply(op);
    }
    println!(
        "full: compile {compiled:?}, plan {planned:?}, {} ops",
        ops.len()
    );
    let cap = Capacity {
        services4: 65_536,
        services6: 65_536,
        slots: 1 << 20,
        members: 1 << 20,
        backends: 1 << 18,
        infos: 65_536,
    };
    let t = Instant::now();
    let mut d2 = compile(&changed);
    let compiled = t.elapsed();
    let t = Instant::now();
    fit(&mut d2, &state, &cap);
    let fitted = t.elapsed();
    let t = Instant::now();
    let ops = plan(&d2, &state);
    println!(
        "one change: compile {compiled:?}, fit {fitted:?}, plan {:?}, {} ops",
        t.elapsed(),
        ops.len()
    );
}
