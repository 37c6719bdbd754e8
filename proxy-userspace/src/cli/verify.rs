//! `verify`: the kernel's maps against the state computed from the source. Prints every
//! difference as the write that would repair it; exits 1 on drift.

use std::time::Duration;

use serde::Serialize;

use super::{
    InspectArgs, SourceArgs,
    output::{Format, json},
};
use crate::{
    agent::fit_to,
    compile::Compiler,
    datapath::{
        MapIo as _,
        bpf::Maps,
        podif::{self, PodInterfaces},
    },
    plan::plan,
};

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// The agent's `--pod-interfaces`: pod-facing interfaces it finds that do not carry the tc
    /// program are reported as drift.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub pod_interfaces: Vec<String>,
}

/// The maps differ from the source (exit status 1).
#[derive(Debug, thiserror::Error)]
#[error("{0} difference(s) between the kernel maps and the source")]
pub struct Drift(pub usize);

#[derive(Serialize)]
struct VerifyView {
    in_sync: bool,
    frontends: usize,
    differences: Vec<String>,
    /// Pod-facing interfaces that should carry the tc program but do not, with the reason
    /// they should.
    interfaces_missing: Vec<String>,
}

pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let spec = PodInterfaces::parse(&args.pod_interfaces)
        .map_err(|e| anyhow::anyhow!("--pod-interfaces: {e}"))?;
    let mut snapshot = args.source.first_snapshot(Duration::from_secs(30))?;
    let endpoints = snapshot.node.local_endpoints(&snapshot.slices);
    snapshot.node.waiting = podif::waiting_now(&args.inspect.bpffs, &endpoints)?;
    let mut compiler = Compiler::default();
    compiler.update(&snapshot);
    let maps = Maps::open_pinned(&args.inspect.bpffs)?;
    let current = maps.dump()?;
    // What the agent programs: Service ports that do not fit the maps are refused alike, so
    // they are no drift.
    let (desired, _) = fit_to(&compiler, &current, maps.capacity().as_ref());
    let ops = plan(&desired, &current);
    let inputs = podif::ClusterInputs {
        endpoints,
        pod_cidrs: snapshot.node.pod_cidrs.clone(),
    };
    let interfaces_missing: Vec<String> = podif::unattached(&args.inspect.bpffs, &spec, &inputs)?
        .into_iter()
        .map(|(name, why)| format!("{name}: should carry the tc program ({why}) but does not"))
        .collect();
    let drift = ops.len() + interfaces_missing.len();
    let view = VerifyView {
        in_sync: drift == 0,
        frontends: desired.frontends.len(),
        differences: ops.iter().map(ToString::to_string).collect(),
        interfaces_missing,
    };
    if args.inspect.output == Format::Json {
        json(&view)?;
    } else if view.in_sync {
        println!("in sync: {} frontends match the source", view.frontends);
    } else {
        if !ops.is_empty() {
            println!(
                "DRIFT: {} difference(s); the writes that would repair them:",
                ops.len()
            );
            for d in &view.differences {
                println!("  {d}");
            }
        }
        for m in &view.interfaces_missing {
            println!("DRIFT: interface {m}");
        }
    }
    if drift == 0 {
        Ok(())
    } else {
        Err(Drift(drift).into())
    }
}
