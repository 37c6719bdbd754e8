pub mod agent;
pub mod cgroup;
pub mod names;
pub mod netns;
pub mod process;
pub mod release;
pub mod skip;
pub mod sweep;
pub mod testbed;
pub mod topology;
pub mod tunnel;
pub mod wait;

use std::process::Command;

/// Runs a command that must succeed; panics with the command and its stderr otherwise.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {program} {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a cleanup command; failures are printed, never panicked on (we may be unwinding).
pub fn run_quiet(program: &str, args: &[&str]) {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "cleanup: {program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("cleanup: spawn {program}: {e}"),
    }
}
