//! Fuzzes the pure pipeline: YAML (multi-document; `List`s too) → Services, EndpointSlices and
//! this node → `compile` → `plan` → `MapState::apply`, twice (all objects, then every other
//! one), checking after every single write that no frontend points at a missing slot or
//! backend, and that a second plan is empty.
#![no_main]

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use libfuzzer_sys::fuzz_target;
use proxy_userspace::{
    compile::compile,
    objects::Slice,
    plan::{MapState, plan},
    snapshot::{NodeInfo, Snapshot},
};
use serde::Deserialize as _;
use std::sync::Arc;

/// Objects in input order; a document that does not parse as its kind is skipped (the
/// manifest source would reject the file; here the rest is still worth compiling).
#[derive(Default)]
struct Objects {
    services: Vec<(usize, Service)>,
    slices: Vec<(usize, EndpointSlice)>,
    node: Option<Node>,
    count: usize,
}

fn absorb(value: serde_norway::Value, into: &mut Objects, depth: usize) {
    let index = into.count;
    into.count += 1;
    match value.get("kind").and_then(|k| k.as_str()) {
        Some("Service") => {
            if let Ok(s) = Service::deserialize(value) {
                into.services.push((index, s));
            }
        }
        Some("EndpointSlice") => {
            if let Ok(s) = EndpointSlice::deserialize(value) {
                into.slices.push((index, s));
            }
        }
        Some("Node") => {
            if let Ok(n) = Node::deserialize(value) {
                into.node = Some(n);
            }
        }
        Some("List") if depth < 4 => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    absorb(item, into, depth + 1);
                }
            }
        }
        _ => {}
    }
}

fn sync(state: &mut MapState, snapshot: &Snapshot) {
    let desired = compile(snapshot);
    for problem in &desired.problems {
        assert!(!problem.object.is_empty() && !problem.message.is_empty());
    }
    let ops = plan(&desired, state);
    for (i, op) in ops.iter().enumerate() {
        state.apply(op);
        if let Err(e) = state.consistent() {
            panic!("inconsistent after op {i} ({op}) of {}: {e}", ops.len());
        }
    }
    let again = plan(&desired, state);
    assert!(again.is_empty(), "second plan not empty: {again:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut objects = Objects::default();
    for doc in serde_norway::Deserializer::from_str(text).take(64) {
        match serde_norway::Value::deserialize(doc) {
            Ok(value) => absorb(value, &mut objects, 0),
            Err(_) => break,
        }
    }
    let node_name = objects
        .node
        .as_ref()
        .and_then(|n| n.metadata.name.clone())
        .unwrap_or_else(|| "node-a".into());
    let node = NodeInfo::with_node(node_name.to_lowercase(), objects.node.as_ref());
    let all = Snapshot {
        services: objects
            .services
            .iter()
            .map(|(_, s)| Arc::new(s.clone()))
            .collect(),
        slices: objects
            .slices
            .iter()
            .map(|(_, s)| Arc::new(Slice::from(s)))
            .collect(),
        node: node.clone(),
        config: Default::default(),
    };
    let half = Snapshot {
        services: objects
            .services
            .iter()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, s)| Arc::new(s.clone()))
            .collect(),
        slices: objects
            .slices
            .iter()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, s)| Arc::new(Slice::from(s)))
            .collect(),
        node,
        config: Default::default(),
    };
    let mut state = MapState::default();
    sync(&mut state, &all);
    sync(&mut state, &half);
    // Compile is deterministic whatever the order of its input.
    let mut reversed = all.clone();
    reversed.services.reverse();
    reversed.slices.reverse();
    assert_eq!(compile(&all), compile(&reversed));
});
