//! The manifests `cargo xtask run` uses (examples/manifests) program what the README promises:
//! web balanced over pods 2-4 in both families, dns (UDP) over pods 2-3.

mod common;

use std::path::Path;

use common::*;
use tests::harness::topology::Proto;

#[test]
fn example_manifests_balance_over_their_backends() {
    if !privileged() {
        return;
    }
    let mut env = Env::new(4);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/manifests");
    for entry in std::fs::read_dir(&dir).expect("examples/manifests") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        env.agent.write_manifest(
            &name,
            &std::fs::read_to_string(&path).expect("read example"),
        );
    }
    let web = ["pod-2", "pod-3", "pod-4"];
    env.wait_for_backends(Proto::Tcp, "10.96.0.10:80".parse().unwrap(), &web);
    env.wait_for_backends(Proto::Tcp, "[fd00:96::10]:80".parse().unwrap(), &web);
    env.wait_for_backends(
        Proto::Udp,
        "10.96.0.53:53".parse().unwrap(),
        &["pod-2", "pod-3"],
    );
}
