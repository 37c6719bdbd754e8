//! Kubernetes Events, posted as kube-proxy posts them (events.k8s.io/v1, reporting controller
//! `kube-proxy`, reporting instance `kube-proxy-<node>`), so that `kubectl get events` and
//! `kubectl describe` show an operator what they would show with kube-proxy:
//! - `Starting` (Normal) on the Node when the agent starts;
//! - `readOnlySysFS` (Warning) on the Node when /sys is read-only and netfilter's connection
//!   tracking table cannot be sized (semantics 9.6);
//! - `FailedToStartServiceHealthcheck` (Warning) on the Service whose healthCheckNodePort cannot
//!   be served (semantics 8.1).
//!
//! Only the API source posts them (the manifests source has no API server). The callers are
//! synchronous: an event is queued (never blocking, dropped when the queue is full) and posted
//! by a thread of its own, with kube's recorder (a repeat of the same event within its cache's
//! lifetime is posted as a series: one object whose count goes up). A failed post is logged
//! once until one succeeds again; the agent never waits for the API server here.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

/// The reporting controller kube-proxy's events carry.
pub const CONTROLLER: &str = "kube-proxy";
/// Events waiting to be posted; more are dropped (and logged at debug level).
const QUEUE: usize = 64;
/// Longest time one post may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server's limits: a note of at most 1 kB, a reporting instance of at most 128 bytes.
const NOTE_MAX: usize = 1024;
const INSTANCE_MAX: usize = 128;

/// `text` cut to at most `max` bytes at a character boundary, ending in "..." when cut (as
/// client-go cuts notes).
fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The reporting instance of node `node`'s agent: kube-proxy's, `kube-proxy-<host name>`
/// (within the API server's 128 bytes).
pub fn instance(node: &str) -> String {
    truncated(&format!("{CONTROLLER}-{node}"), INSTANCE_MAX)
}

/// One event to post, on what.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    pub warning: bool,
    pub reason: String,
    pub action: String,
    pub note: Option<String>,
    pub regarding: ObjectReference,
}

/// Where the agent's events go: a queue to the posting thread, or nowhere.
#[derive(Clone, Debug)]
pub struct Events {
    node: String,
    tx: Option<mpsc::Sender<Pending>>,
}

impl Events {
    /// Events that go nowhere (no API server to post them to).
    pub fn off(node: &str) -> Events {
        Events {
            node: node.to_string(),
            tx: None,
        }
    }

    /// Events queued to `tx` (tests read them there).
    pub fn to(node: &str, tx: mpsc::Sender<Pending>) -> Events {
        Events {
            node: node.to_string(),
            tx: Some(tx),
        }
    }

    /// Events posted by a thread started now to the API server of the client `client` makes
    /// (on that thread, inside its runtime).
    pub fn post(
        node: &str,
        client: impl FnOnce() -> anyhow::Result<kube::Client> + Send + 'static,
    ) -> anyhow::Result<Events> {
        let (tx, mut rx) = mpsc::channel::<Pending>(QUEUE);
        let reporter = Reporter {
            controller: CONTROLLER.into(),
            instance: Some(instance(node)),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let client = match client() {
                        Ok(c) => c,
                        Err(e) => {
                            log::warn!("no events are posted: {e:#}");
                            return;
                        }
                    };
                    let recorder = Recorder::new(client, reporter);
                    let mut failing = false;
                    while let Some(p) = rx.recv().await {
                        let event = Event {
                            type_: if p.warning {
                                EventType::Warning
                            } else {
                                EventType::Normal
                            },
                            reason: p.reason.clone(),
                            note: p.note.clone(),
                            action: p.action.clone(),
                            secondary: None,
                        };
                        let posted = tokio::time::timeout(
                            POST_TIMEOUT,
                            recorder.publish(&event, &p.regarding),
                        )
                        .await
                        .map_err(|_| "timed out".to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                        match posted {
                            Ok(()) => {
                                log::debug!("event {} posted", p.reason);
                                failing = false;
                            }
                            Err(e) if !std::mem::replace(&mut failing, true) => {
                                log::warn!(
                                    "cannot post the event {} to the API server: {e} (further \
                                     failures are logged at debug level until one succeeds)",
                                    p.reason
                                )
                            }
                            Err(e) => log::debug!("cannot post the event {}: {e}", p.reason),
                        }
                    }
                })
            })?;
        Ok(Events {
            node: node.to_string(),
            tx: Some(tx),
        })
    }

    /// The Node this agent runs on, as kube-proxy refers to it (its UID set to its name).
    fn node_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.clone()),
            uid: Some(self.node.clone()),
            ..ObjectReference::default()
        }
    }

    fn queue(&self, mut p: Pending) {
        p.note = p.note.map(|n| truncated(&n, NOTE_MAX));
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(p)
        {
            log::debug!("event not posted: {e}");
        }
    }

    /// kube-proxy's `Starting` event on the Node.
    pub fn starting(&self) {
        self.queue(Pending {
            warning: false,
            reason: "Starting".into(),
            action: "StartKubeProxy".into(),
            note: None,
            regarding: self.node_ref(),
        });
    }

    /// /sys is read-only: netfilter's connection tracking table could not be sized (9.6).
    pub fn read_only_sysfs(&self) {
        self.queue(Pending {
            warning: true,
            reason: "readOnlySysFS".into(),
            action: "StartKubeProxy".into(),
            note: Some(
                "/sys is read-only: cannot modify conntrack limits, problems may arise later"
                    .into(),
            ),
            regarding: self.node_ref(),
        });
    }

    /// Service `namespace/name`'s healthCheckNodePort `port` cannot be served (8.1).
    pub fn health_check_failed(&self, namespace: &str, name: &str, port: u16, error: &str) {
        self.queue(Pending {
            warning: true,
            reason: "FailedToStartServiceHealthcheck".into(),
            action: "Listen".into(),
            note: Some(format!(
                "node {} failed to start healthcheck \"{namespace}/{name}\" on port {port}: {error}",
                self.node
            )),
            regarding: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(namespace.to_string()),
                name: Some(name.to_string()),
                ..ObjectReference::default()
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_name_what_kube_proxy_names() {
        let (tx, mut rx) = mpsc::channel(8);
        let events = Events::to("node-a", tx);
        events.starting();
        events.health_check_failed("default", "web", 30999, "address in use");
        events.read_only_sysfs();
        let starting = rx.try_recv().unwrap();
        assert!(!starting.warning);
        assert_eq!(
            (starting.reason.as_str(), starting.action.as_str()),
            ("Starting", "StartKubeProxy")
        );
        assert_eq!(starting.regarding.kind.as_deref(), Some("Node"));
        assert_eq!(starting.regarding.name.as_deref(), Some("node-a"));
        assert_eq!(starting.regarding.namespace, None);
        let hc = rx.try_recv().unwrap();
        assert!(hc.warning);
        assert_eq!(hc.reason, "FailedToStartServiceHealthcheck");
        assert_eq!(hc.regarding.kind.as_deref(), Some("Service"));
        assert_eq!(hc.regarding.namespace.as_deref(), Some("default"));
        assert_eq!(hc.regarding.name.as_deref(), Some("web"));
        assert_eq!(
            hc.note.as_deref(),
            Some(
                "node node-a failed to start healthcheck \"default/web\" on port 30999: address in use"
            )
        );
        assert_eq!(rx.try_recv().unwrap().reason, "readOnlySysFS");
        // Nowhere to go: nothing happens.
        Events::off("node-a").starting();
    }

    #[test]
    fn notes_and_instances_fit_the_api_servers_limits() {
        let (tx, mut rx) = mpsc::channel(8);
        let events = Events::to("node-a", tx);
        let errors = vec!["[fd00:77::1]:30999: Address already in use (os error 98)"; 40];
        events.health_check_failed("default", "web", 30999, &errors.join("; "));
        let note = rx.try_recv().unwrap().note.unwrap();
        assert_eq!(note.len(), NOTE_MAX);
        assert!(note.ends_with("..."));
        assert_eq!(truncated("ééé", 5), "é...");
        assert_eq!(truncated("short", 5), "short");
        assert_eq!(instance("node-a"), "kube-proxy-node-a");
        assert_eq!(instance(&"n".repeat(253)).len(), INSTANCE_MAX);
    }

    #[test]
    fn a_full_queue_drops_events_without_blocking() {
        let (tx, mut rx) = mpsc::channel(1);
        let events = Events::to("node-a", tx);
        events.starting();
        events.starting();
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }
}
