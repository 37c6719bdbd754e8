//! `verify`: the kernel's maps against the state computed from the source. Prints every
//! difference as the write that would repair it; exits 1 on drift.

use std::time::Duration;

use serde::Serialize;

use super::{
    InspectArgs, SourceArgs,
    output::{Format, json},
};
use crate::{
    compile::compile,
    datapath::{MapIo as _, bpf::Maps},
    plan::plan,
};

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub inspect: InspectArgs,
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
}

pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let snapshot = args.source.first_snapshot(Duration::from_secs(30))?;
    let desired = compile(&snapshot);
    let maps = Maps::open_pinned(&args.inspect.bpffs)?;
    let current = maps.dump()?;
    let ops = plan(&desired, &current);
    let view = VerifyView {
        in_sync: ops.is_empty(),
        frontends: desired.frontends.len(),
        differences: ops.iter().map(ToString::to_string).collect(),
    };
    if args.inspect.output == Format::Json {
        json(&view)?;
    } else if view.in_sync {
        println!("in sync: {} frontends match the source", view.frontends);
    } else {
        println!(
            "DRIFT: {} difference(s); the writes that would repair them:",
            ops.len()
        );
        for d in &view.differences {
            println!("  {d}");
        }
    }
    if ops.is_empty() {
        Ok(())
    } else {
        Err(Drift(ops.len()).into())
    }
}
