//! The agent under test: `kube-bpf-proxy run` on a manifests directory, attached to the test
//! cgroup, with maps pinned in a per-test bpffs directory. Killed and unpinned on drop.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use super::process::workspace_binary;

pub struct Agent {
    child: Option<std::process::Child>,
    /// Every line the agent (all its runs) wrote to stderr, in order.
    logs: Arc<Mutex<Vec<String>>>,
    /// Whether log lines are echoed to our stderr as they arrive (default on).
    echo: Arc<AtomicBool>,
    pub manifests: PathBuf,
    pub pin_dir: PathBuf,
    cgroup: PathBuf,
    node_name: String,
    /// 127.0.0.1 ports of /metrics and of /healthz, /livez.
    pub metrics_port: u16,
    pub health_port: u16,
    /// More `run` arguments (e.g. map sizes), used from the next `start`.
    pub extra_args: Vec<String>,
    /// Another agent binary to start instead of the workspace's (an "upgrade").
    pub binary: Option<PathBuf>,
    /// Network namespace file the agent runs in (a node of a testbed); `None`: the test's own.
    /// Its HTTP endpoints are then reached with `get`, which enters the namespace.
    pub netns: Option<String>,
    /// A kubeconfig naming an API server to watch instead of the manifests directory.
    pub kubeconfig: Option<PathBuf>,
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

impl Agent {
    /// Prepares (does not start) an agent for test `id`, with an empty manifests directory.
    pub fn new(id: &str, cgroup: &Path, node_name: &str) -> Agent {
        let manifests = std::env::temp_dir().join(format!("{id}-manifests"));
        fs::create_dir_all(&manifests).expect("create manifests dir");
        Agent {
            child: None,
            logs: Arc::default(),
            echo: Arc::new(AtomicBool::new(true)),
            manifests,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{id}")),
            cgroup: cgroup.to_path_buf(),
            node_name: node_name.into(),
            metrics_port: free_port(),
            health_port: free_port(),
            extra_args: Vec::new(),
            binary: None,
            netns: None,
            kubeconfig: None,
        }
    }

    /// Writes (or replaces) manifest file `name`.
    pub fn write_manifest(&self, name: &str, yaml: &str) {
        // Write then rename, so the agent never reads half a file.
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        fs::write(&tmp, yaml).expect("write manifest");
        fs::rename(&tmp, self.manifests.join(name)).expect("rename manifest");
    }

    pub fn remove_manifest(&self, name: &str) {
        fs::remove_file(self.manifests.join(name)).expect("remove manifest");
    }

    /// Starts the agent process (stderr goes to the test's output) and waits until it has
    /// loaded its programs (`wait_started`).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let from = self.log_position();
        let binary = self
            .binary
            .clone()
            .unwrap_or_else(|| workspace_binary("kube-bpf-proxy"));
        let mut cmd = match &self.netns {
            Some(netns) => super::process::command_in(
                &super::process::Placement {
                    netns,
                    cgroup_procs: None,
                },
                &binary,
                &[],
            ),
            None => Command::new(binary),
        };
        cmd.arg("run");
        match &self.kubeconfig {
            Some(kubeconfig) => cmd.arg("--kubeconfig").arg(kubeconfig),
            None => cmd.arg("--manifests").arg(&self.manifests),
        };
        let child = cmd
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--bpffs")
            .arg(&self.pin_dir)
            .args(["--hostname-override", &self.node_name])
            .arg("--metrics-bind-address")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--healthz-bind-address")
            .arg(format!("127.0.0.1:{}", self.health_port))
            .args(&self.extra_args)
            // Outside a testbed node the agent shares the test's own namespace: tc stays off
            // its interfaces, and the machine's netfilter settings stay as they are.
            .args(if self.netns.is_none() {
                &[
                    "--external-interfaces=",
                    "--pod-interfaces=none",
                    "--netfilter-conntrack=leave",
                ][..]
            } else {
                &[][..]
            })
            .env(
                "RUST_LOG",
                std::env::var("KBP_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kube-bpf-proxy");
        let mut child = child;
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::clone(&self.logs);
        let echo = Arc::clone(&self.echo);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo.load(Ordering::Relaxed) {
                    eprintln!("agent: {line}");
                }
                logs.lock().expect("log lock").push(line);
            }
        });
        self.child = Some(child);
        self.wait_started(from);
    }

    /// Waits (bounded, 60 s) until the agent started after log position `from` has loaded and
    /// attached its programs: it logs that it serves (or cannot serve) health checks just after.
    /// The verifier alone can take seconds on a slow machine, and the tests' own waits (10 s for
    /// a first answer) are for the agent's work, not for its start. Returns early if the agent
    /// exits (a test of a failing start sees that itself) or waits for another agent on its
    /// pins; a start that takes longer is left to the test's waits, with a note.
    fn wait_started(&mut self, from: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            // Or it waits for another agent on its pins to exit (by design, without end).
            if self.count_logs(from, " health checks on ") > 0
                || self.count_logs(from, "another agent holds the pins") > 0
            {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("note: the agent has not said it serves health checks within 60 s of its start");
    }

    /// Turns echoing the agent's log lines to stderr on or off (they are captured either way).
    pub fn set_echo(&self, on: bool) {
        self.echo.store(on, Ordering::Relaxed);
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Log lines after position `from` (up to now).
    pub fn logs_since(&self, from: usize) -> Vec<String> {
        let logs = self.logs.lock().expect("log lock");
        logs.iter().skip(from).cloned().collect()
    }

    /// Resident set size of the running agent, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid().expect("agent running");
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read agent status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Number of log lines so far (a position for `wait_for_log`).
    pub fn log_position(&self) -> usize {
        self.logs.lock().expect("log lock").len()
    }

    /// Number of log lines after position `from` containing `needle`.
    pub fn count_logs(&self, from: usize, needle: &str) -> usize {
        let logs = self.logs.lock().expect("log lock");
        logs.iter()
            .skip(from)
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded) for a log line after position `from` containing `needle`; returns it.
    pub fn wait_for_log(&mut self, from: usize, needle: &str, timeout: Duration) -> String {
        let logs = Arc::clone(&self.logs);
        super::wait::poll_until(
            &format!("agent log line containing {needle:?}"),
            timeout,
            || {
                let logs = logs.lock().expect("log lock");
                logs.iter()
                    .skip(from)
                    .find(|l| l.contains(needle))
                    .cloned()
                    .ok_or_else(|| {
                        logs.iter()
                            .skip(from)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
            },
        )
    }

    /// Sends SIGKILL and reaps the agent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) for the agent to exit by itself; returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("agent started");
        let status = super::wait::poll_until("agent exited", timeout, || match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            Ok(None) => Err("still running".to_string()),
            Err(e) => Err(e.to_string()),
        });
        self.child = None;
        status
    }

    /// Panics if the agent exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("agent exited: {status}");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = fs::remove_dir_all(&self.manifests);
        if self.pin_dir.exists() {
            let _ = fs::remove_dir_all(&self.pin_dir);
        }
    }
}

impl Agent {
    /// GET `path` from the agent's 127.0.0.1:`port`, inside its network namespace.
    pub fn get(&self, port: u16, path: &str) -> (u16, String) {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        http_get_in(self.netns.as_deref(), addr, path)
    }
}

/// GET `path` from 127.0.0.1:`port`; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_in(
        None,
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        path,
    )
}

/// GET `path` from `addr`, from inside network namespace `netns` (a namespace file) if given:
/// a thread enters it (setns is per thread) and makes the request there.
pub fn http_get_in(netns: Option<&str>, addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let reply =
        try_http_get_in(netns, addr, path).unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"));
    (reply.status, reply.body)
}

/// An HTTP response as `try_http_get_in` read it.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
}

/// `http_get_in` that returns failures to connect (e.g. `ConnectionRefused`) and read, and
/// keeps the headers.
pub fn try_http_get_in(
    netns: Option<&str>,
    addr: std::net::SocketAddr,
    path: &str,
) -> std::io::Result<HttpReply> {
    let netns = netns.map(|n| fs::File::open(n).unwrap_or_else(|e| panic!("open netns {n}: {e}")));
    let path = path.to_string();
    thread::spawn(move || {
        if let Some(ns) = netns {
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns on an open namespace fd, for this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        }
        http_get_at(addr, &path)
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn http_get_at(addr: std::net::SocketAddr, path: &str) -> std::io::Result<HttpReply> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_string(),
    })
}
