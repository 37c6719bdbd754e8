//! The end-to-end harness: network namespaces, veth links and bridges (or routed pod veths,
//! `Shape`) laid out as in ../shared/testbed.md, a test cgroup, echo servers and clients inside
//! pods, and the agent.
//! Everything it creates is named `kbp-<pid>-<n>`-style and removed on drop, even on panic;
//! `sweep` removes what a crashed run left.

pub mod harness;

pub use harness::{
    agent::Agent,
    cgroup::TestCgroup,
    netns::NetNs,
    process::{ChildGuard, Reply},
    skip::{current_test, probe_sctp, require_root, skip},
    sweep::sweep,
    testbed::{Node, Shape, Testbed},
    topology::{Pod, Topology},
    wait::poll_until,
};
