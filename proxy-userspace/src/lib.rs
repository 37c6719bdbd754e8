//! kube-bpf-proxy's agent as a library: source → snapshot → compile (pure) → plan (pure) →
//! datapath (the only kernel I/O).

pub mod agent;
pub mod capacity;
pub mod cli;
pub mod compile;
pub mod datapath;
pub mod events;
pub mod health;
pub mod healthcheck;
pub mod heap;
pub mod http;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod objects;
pub mod plan;
pub mod portrange;
pub mod snapshot;
pub mod socklb;
pub mod source;
