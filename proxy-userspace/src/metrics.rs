//! The agent's Prometheus metrics, [`Metrics`], kept and encoded by the prometheus-client
//! crate in the Prometheus text format 0.0.4 (what kube-proxy serves by default). Names follow
//! kube-proxy where the meaning matches (semantics 11.1-11.6), including the `ip_family` label;
//! the rest are prefixed `kube_bpf_proxy_`. prometheus-client ends every HELP text with a
//! period.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets, linear_buckets},
    },
    registry::Registry,
};

use crate::compile::{Family as IpFamily, Problem, ProblemReason};

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The `ip_family` label value kube-proxy uses (`v1.IPFamily`).
pub fn ip_family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// A series' label set: `(name, value)` pairs sorted by name, names unique.
pub type Labels = Vec<(String, String)>;
/// A gauge of whole numbers: counts, sizes, 0/1 flags.
pub type CountGauge = Gauge<u64, AtomicU64>;
/// A gauge of seconds since the Unix epoch (fractional).
pub type TimeGauge = Gauge<f64, AtomicU64>;

/// The label set of `pairs`, sorted by name; of duplicate names the first wins.
fn labels(pairs: &[(&str, &str)]) -> Labels {
    let mut v: Labels = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.dedup_by(|later, first| later.0 == first.0);
    v
}

/// A metric family's series by label pairs given in any order (they are sorted by name, so
/// one label set is one series however it is spelled).
pub trait Series<M> {
    /// The series for `labels`, created on first use: a handle sharing the family's value.
    fn with(&self, labels: &[(&str, &str)]) -> M;
    /// The series for `labels`, if it exists (not created).
    fn existing(&self, labels: &[(&str, &str)]) -> Option<M>;
}

impl<M: Clone, C: MetricConstructor<M>> Series<M> for Family<Labels, M, C> {
    fn with(&self, pairs: &[(&str, &str)]) -> M {
        self.get_or_create_owned(&labels(pairs))
    }

    fn existing(&self, pairs: &[(&str, &str)]) -> Option<M> {
        self.get(&labels(pairs)).map(|m| m.clone())
    }
}

/// Registers a counter family under its exposed name `name`, which ends in `_total`
/// (prometheus-client appends that suffix itself).
fn counter(r: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::default();
    let base = name
        .strip_suffix("_total")
        .expect("counter names end in _total");
    r.register(base, help, family.clone());
    family
}

/// Registers a gauge family (whole numbers).
fn gauge(r: &mut Registry, name: &str, help: &str) -> Family<Labels, CountGauge> {
    let family = Family::default();
    r.register(name, help, family.clone());
    family
}

/// Registers a gauge family of Unix times.
fn time_gauge(r: &mut Registry, name: &str, help: &str) -> Family<Labels, TimeGauge> {
    let family = Family::default();
    r.register(name, help, family.clone());
    family
}

/// Registers a histogram family whose series `new` creates (with their bucket bounds).
fn histogram(
    r: &mut Registry,
    name: &str,
    help: &str,
    new: fn() -> Histogram,
) -> Family<Labels, Histogram> {
    let family = Family::new_with_constructor(new);
    r.register(name, help, family.clone());
    family
}

/// Every family of `r` in the text exposition format 0.0.4 ([`CONTENT_TYPE`]).
fn encode(r: &Registry) -> String {
    let mut out = String::new();
    // The encoder fails only when the writer does (a String never does) or on a native-only
    // histogram (there are none here).
    prometheus_text::encode(&mut out, r).expect("encoding metrics into a String");
    out
}

/// Seconds since the Unix epoch, negative before it.
fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Datapath map names and reasons are free-form; these are the rejected object kinds
/// compile reports, pre-created so the series exist at 0.
const REJECTED_KINDS: [&str; 2] = ["EndpointSlice", "Service"];

/// The agent's metrics. Metrics kube-proxy labels with `ip_family` are observed for every
/// family the agent serves (one sync covers both), unless a method takes a family.
pub struct Metrics {
    registry: Registry,
    families: Vec<IpFamily>,
    /// The `kind` label values of `rejected_objects` so far (they go back to 0, never away).
    rejected_kinds: Mutex<BTreeSet<String>>,

    /// kubeproxy_sync_proxy_rules_duration_seconds [ip_family] (11.1).
    pub sync_duration: Family<Labels, Histogram>,
    /// kubeproxy_network_programming_duration_seconds [ip_family] (11.2).
    pub network_programming_duration: Family<Labels, Histogram>,
    /// kubeproxy_sync_full_proxy_rules_duration_seconds [ip_family]: the syncs that planned
    /// every frontend, as the nftables proxier's full syncs.
    pub sync_full_duration: Family<Labels, Histogram>,
    /// kubeproxy_sync_partial_proxy_rules_duration_seconds [ip_family]: the syncs that planned
    /// the changed frontends only.
    pub sync_partial_duration: Family<Labels, Histogram>,
    /// kubeproxy_sync_proxy_rules_nftables_sync_failures_total [ip_family] (11.7): failed
    /// syncs, under the nftables proxier's name, so that its alerts keep working.
    pub nftables_sync_failures: Family<Labels, Counter>,
    /// kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total [ip_family] (11.7): stays 0
    /// (stale entries go in the sync itself, whose failures count above).
    pub nftables_cleanup_failures: Family<Labels, Counter>,
    /// kubeproxy_sync_proxy_rules_last_timestamp_seconds [ip_family] (11.4).
    pub last_sync_timestamp: Family<Labels, TimeGauge>,
    /// kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds [ip_family] (11.4).
    pub last_queued_timestamp: Family<Labels, TimeGauge>,
    /// kubeproxy_sync_proxy_rules_endpoint_changes_total [ip_family] (11.6).
    pub endpoint_changes: Family<Labels, Counter>,
    /// kubeproxy_sync_proxy_rules_service_changes_total [ip_family] (11.6).
    pub service_changes: Family<Labels, Counter>,
    /// kubeproxy_sync_proxy_rules_endpoint_changes_pending [ip_family] (11.4).
    pub endpoint_changes_pending: Family<Labels, CountGauge>,
    /// kubeproxy_sync_proxy_rules_service_changes_pending [ip_family] (11.4).
    pub service_changes_pending: Family<Labels, CountGauge>,
    /// kubeproxy_sync_proxy_rules_no_local_endpoints_total [traffic_policy, ip_family], a gauge
    /// (11.5).
    pub no_local_endpoints: Family<Labels, CountGauge>,
    /// kubeproxy_proxy_healthz_total [code] (11.6).
    pub healthz_requests: Family<Labels, Counter>,
    /// kubeproxy_proxy_livez_total [code] (11.6).
    pub livez_requests: Family<Labels, Counter>,

    /// kube_bpf_proxy_sync_failures_total.
    pub sync_failures: Family<Labels, Counter>,
    /// kube_bpf_proxy_rejected_objects [kind].
    pub rejected_objects: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_rejected_objects_by_reason [reason].
    pub rejected_by_reason: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_map_update_errors_total [map].
    pub map_update_errors: Family<Labels, Counter>,
    /// kube_bpf_proxy_map_entries [map].
    pub map_entries: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_map_max_entries [map].
    pub map_max_entries: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_map_memlock_bytes [map]: the kernel's memory accounting of the map.
    pub map_memlock: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_map_evictions [map]: records of the socket LRU maps evicted because the
    /// map was full (created minus present; the agent deletes none).
    pub map_evictions: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_datapath_events_total [reason].
    pub datapath_events: Family<Labels, Counter>,
    /// kube_bpf_proxy_drops_total [hook, reason]: packets dropped and connect()/sendmsg()
    /// calls failed by the programs.
    pub drops: Family<Labels, Counter>,
    /// kube_bpf_proxy_pod_interfaces: pod-facing interfaces carrying the tc program.
    pub pod_interfaces: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_interface_attach_failures_total [reason].
    pub interface_attach_failures: Family<Labels, Counter>,
    /// kube_bpf_proxy_local_endpoints_waiting_for_interface: local endpoints left out of
    /// tc-translated traffic until their interface carries the program.
    pub pod_endpoints_waiting: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_network_namespaces_with_source: network namespaces of the hooked cgroup
    /// whose source address the socket hooks know (for loadBalancerSourceRanges, and a pod's
    /// session affinity and source hashing by its address).
    pub netns_sources: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_foreign_programs: programs of others found at start where this agent's
    /// run (`datapath::foreign`).
    pub foreign_programs: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_pod_namespaces_at_tc: pods' network namespaces whose connections to the
    /// external frontends kube-proxy masquerades are left to tc on their interface (7.13).
    pub pod_namespaces_at_tc: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_socket_lb_off_pods [state]: pods of this node whose namespace has
    /// socket-layer translation off: `programmed` (their cgroup in LB_SOCKLB_OFF) or `waiting`
    /// (no cgroup found yet).
    pub socket_lb_off_pods: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_socket_lb_label_errors: namespaces whose kube-bpf-proxy.io/socket-lb
    /// label cannot be read (the default applies).
    pub socket_lb_label_errors: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_drift_repairs_total: read-backs that found the maps different from what
    /// the agent wrote (each followed by a full sync that repairs them).
    pub drift_repairs: Family<Labels, Counter>,
    /// kube_bpf_proxy_build_info [version], always 1.
    pub build_info: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_sockets_terminated_total [protocol].
    pub sockets_terminated: Family<Labels, Counter>,
    /// kube_bpf_proxy_socket_termination_errors_total.
    pub socket_termination_errors: Family<Labels, Counter>,
    /// kubeproxy_conntrack_reconciler_deleted_entries_total [ip_family] (11.8): UDP
    /// connection-tracking entries of the tc path deleted because their backend went away.
    pub conntrack_deleted: Family<Labels, Counter>,
    /// kubeproxy_conntrack_reconciler_sync_duration_seconds [ip_family] (11.8): how long one
    /// round of that cleanup took, after each sync.
    pub conntrack_reconciler_duration: Family<Labels, Histogram>,
    /// kube_bpf_proxy_socket_termination_active: 1 while sockets of removed backends are
    /// terminated, 0 when the kernel cannot or it is turned off.
    pub socket_termination_active: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_healthcheck_bind_failures_total: failed attempts to bind a Service's
    /// healthCheckNodePort (each is retried at the next sync).
    pub healthcheck_bind_failures: Family<Labels, Counter>,
    /// kube_bpf_proxy_healthcheck_ports [state]: healthCheckNodePorts served ("serving") and
    /// wanted but not bound ("failing"), as of the last sync.
    pub healthcheck_ports: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_list_watch_errors_total [resource, operation]: lists and watches of the
    /// Kubernetes source that failed (each retried after a backoff). kube-proxy has no such
    /// metric; a 410 Gone is not counted here but in `watch_expired`.
    pub list_watch_errors: Family<Labels, Counter>,
    /// kube_bpf_proxy_list_watch_failing [resource]: 1 from a failed list or watch of the
    /// resource until the API server answers it again, else 0; an alert on it staying 1 says
    /// the maps no longer follow the cluster. A silent watch is healthy (a connection that went
    /// dark is noticed by TCP keepalive within 30 s).
    pub list_watch_failing: Family<Labels, CountGauge>,
    /// kube_bpf_proxy_watch_expired_total [resource]: watches answered 410 Gone (the
    /// resourceVersion was compacted away), each followed at once by a relist.
    pub watch_expired: Family<Labels, Counter>,
    /// kube_bpf_proxy_undecodable_objects_total [kind]: object versions from the API server
    /// that could not be decoded, each counted once.
    pub undecodable_objects_total: Family<Labels, Counter>,
    /// kube_bpf_proxy_undecodable_objects [kind]: objects whose newest version cannot be
    /// decoded; the last decodable version is used meanwhile (none if never decoded).
    pub undecodable_objects: Family<Labels, CountGauge>,
}

/// 1 ms x 2^n, 15 buckets (kube-proxy's sync duration buckets).
pub fn sync_duration_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15).collect()
}

/// 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5, 120..300 s by 30 (kube-proxy's network
/// programming buckets).
pub fn network_programming_buckets() -> Vec<f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
        .collect()
}

impl Metrics {
    /// `version` goes into build_info; `families` are the IP families the agent serves (their
    /// `ip_family` series are created at 0 so they exist before the first sync).
    pub fn new(version: &str, families: &[IpFamily]) -> Metrics {
        let mut families = families.to_vec();
        families.sort();
        families.dedup();
        let mut r = Registry::default();
        let m = Metrics {
            sync_duration: histogram(
                &mut r,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                || Histogram::new(sync_duration_buckets()),
            ),
            network_programming_duration: histogram(
                &mut r,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                || Histogram::new(network_programming_buckets()),
            ),
            sync_full_duration: histogram(
                &mut r,
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "Duration of syncs that planned every frontend, in seconds",
                || Histogram::new(sync_duration_buckets()),
            ),
            sync_partial_duration: histogram(
                &mut r,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "Duration of syncs that planned the changed frontends only, in seconds",
                || Histogram::new(sync_duration_buckets()),
            ),
            nftables_sync_failures: counter(
                &mut r,
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                "Syncs that failed to program the datapath (kube-proxy's nftables name)",
            ),
            nftables_cleanup_failures: counter(
                &mut r,
                "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
                "Failed cleanups of stale state outside a sync (none here: always 0)",
            ),
            last_sync_timestamp: time_gauge(
                &mut r,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ),
            last_queued_timestamp: time_gauge(
                &mut r,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
            ),
            endpoint_changes: counter(
                &mut r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            ),
            service_changes: counter(
                &mut r,
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            ),
            endpoint_changes_pending: gauge(
                &mut r,
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
            ),
            service_changes_pending: gauge(
                &mut r,
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
            ),
            no_local_endpoints: gauge(
                &mut r,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
            ),
            healthz_requests: counter(
                &mut r,
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
            ),
            livez_requests: counter(
                &mut r,
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
            ),
            sockets_terminated: counter(
                &mut r,
                "kube_bpf_proxy_sockets_terminated_total",
                "Sockets destroyed because their Service backend went away",
            ),
            conntrack_deleted: counter(
                &mut r,
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "UDP connection-tracking entries deleted because their backend went away",
            ),
            conntrack_reconciler_duration: histogram(
                &mut r,
                "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                "Latency of one round of the connection-tracking cleanup after a sync, in seconds",
                || Histogram::new(sync_duration_buckets()),
            ),
            socket_termination_errors: counter(
                &mut r,
                "kube_bpf_proxy_socket_termination_errors_total",
                "Failures while terminating sockets of removed backends",
            ),
            socket_termination_active: gauge(
                &mut r,
                "kube_bpf_proxy_socket_termination_active",
                "1 while sockets connected to removed backends are terminated (kernel support and not turned off)",
            ),
            healthcheck_bind_failures: counter(
                &mut r,
                "kube_bpf_proxy_healthcheck_bind_failures_total",
                "Failed attempts to bind a Service's healthCheckNodePort (retried at the next sync)",
            ),
            healthcheck_ports: gauge(
                &mut r,
                "kube_bpf_proxy_healthcheck_ports",
                "healthCheckNodePorts served (state serving) and wanted but not bound (state failing)",
            ),
            list_watch_errors: counter(
                &mut r,
                "kube_bpf_proxy_list_watch_errors_total",
                "Failed lists and watches of the API server, by resource and operation (retried after a backoff)",
            ),
            list_watch_failing: gauge(
                &mut r,
                "kube_bpf_proxy_list_watch_failing",
                "1 while lists or watches of the resource fail (from a failure until the API server answers again), else 0",
            ),
            watch_expired: counter(
                &mut r,
                "kube_bpf_proxy_watch_expired_total",
                "Watches answered 410 Gone, each followed by a relist, by resource",
            ),
            undecodable_objects_total: counter(
                &mut r,
                "kube_bpf_proxy_undecodable_objects_total",
                "Object versions from the API server that could not be decoded, by kind",
            ),
            undecodable_objects: gauge(
                &mut r,
                "kube_bpf_proxy_undecodable_objects",
                "Objects whose newest version cannot be decoded (the last decodable one is used), by kind",
            ),
            sync_failures: counter(
                &mut r,
                "kube_bpf_proxy_sync_failures_total",
                "Syncs that failed to program the datapath (retried)",
            ),
            rejected_objects: gauge(
                &mut r,
                "kube_bpf_proxy_rejected_objects",
                "Objects currently not (fully) programmed because they are invalid or conflict",
            ),
            rejected_by_reason: gauge(
                &mut r,
                "kube_bpf_proxy_rejected_objects_by_reason",
                "Objects currently not (fully) programmed, by the reason (an object with several counts under each)",
            ),
            map_update_errors: counter(
                &mut r,
                "kube_bpf_proxy_map_update_errors_total",
                "Failed BPF map writes",
            ),
            map_entries: gauge(&mut r, "kube_bpf_proxy_map_entries", "Entries in a BPF map"),
            map_max_entries: gauge(
                &mut r,
                "kube_bpf_proxy_map_max_entries",
                "Capacity of a BPF map",
            ),
            map_memlock: gauge(
                &mut r,
                "kube_bpf_proxy_map_memlock_bytes",
                "Kernel memory a BPF map takes (bpftool's memlock)",
            ),
            map_evictions: gauge(
                &mut r,
                "kube_bpf_proxy_map_evictions",
                "Socket records evicted from a full LRU map",
            ),
            datapath_events: counter(
                &mut r,
                "kube_bpf_proxy_datapath_events_total",
                "Datapath events by reason, summed over CPUs",
            ),
            drops: counter(
                &mut r,
                "kube_bpf_proxy_drops_total",
                "Packets dropped and connect()/sendmsg() calls failed by the BPF programs, by \
                 hook and reason, summed over CPUs",
            ),
            pod_interfaces: gauge(
                &mut r,
                "kube_bpf_proxy_pod_interfaces",
                "Pod-facing interfaces carrying the tc program",
            ),
            interface_attach_failures: counter(
                &mut r,
                "kube_bpf_proxy_interface_attach_failures_total",
                "Failed attempts to attach the tc program to an interface, by reason",
            ),
            pod_endpoints_waiting: gauge(
                &mut r,
                "kube_bpf_proxy_local_endpoints_waiting_for_interface",
                "Local endpoints left out of tc-translated traffic until their interface carries the program",
            ),
            drift_repairs: counter(
                &mut r,
                "kube_bpf_proxy_drift_repairs_total",
                "Read-backs of the maps that found them different from what the agent wrote",
            ),
            netns_sources: gauge(
                &mut r,
                "kube_bpf_proxy_network_namespaces_with_source",
                "Network namespaces whose source address the socket hooks know, for loadBalancerSourceRanges and for keying a pod's session affinity by its address",
            ),
            foreign_programs: gauge(
                &mut r,
                "kube_bpf_proxy_foreign_programs",
                "Attachments of programs that are not this agent's, found once at start: at its socket hooks (its cgroup's and those above), or another kube-bpf-proxy's beside its tc programs; set until the agent restarts",
            ),
            pod_namespaces_at_tc: gauge(
                &mut r,
                "kube_bpf_proxy_pod_namespaces_at_tc",
                "Pods' network namespaces whose connections to masqueraded externalIPs, load balancer IPs and NodePorts are translated at tc on their interface",
            ),
            socket_lb_off_pods: gauge(
                &mut r,
                "kube_bpf_proxy_socket_lb_off_pods",
                "Pods of this node translated per packet (socket-layer translation off), by state: programmed (cgroup known to the socket hooks) or waiting (cgroup not found yet)",
            ),
            socket_lb_label_errors: gauge(
                &mut r,
                "kube_bpf_proxy_socket_lb_label_errors",
                "Namespaces whose kube-bpf-proxy.io/socket-lb label is neither enabled nor disabled (the default applies)",
            ),
            build_info: gauge(
                &mut r,
                "kube_bpf_proxy_build_info",
                "Always 1; the version label is the agent's version",
            ),
            registry: r,
            families,
            rejected_kinds: Mutex::default(),
        };
        m.build_info.with(&[("version", version)]).set(1);
        m.sync_failures.with(&[]);
        m.pod_interfaces.with(&[]);
        m.pod_endpoints_waiting.with(&[]);
        m.netns_sources.with(&[]);
        m.pod_namespaces_at_tc.with(&[]);
        m.foreign_programs.with(&[]);
        m.socket_lb_off_pods.with(&[("state", "programmed")]);
        m.socket_lb_off_pods.with(&[("state", "waiting")]);
        m.socket_lb_label_errors.with(&[]);
        m.drift_repairs.with(&[]);
        m.healthcheck_bind_failures.with(&[]);
        m.set_healthcheck_ports(0, 0);
        for kind in REJECTED_KINDS {
            m.set_rejected(kind, 0);
        }
        for reason in ProblemReason::ALL {
            m.rejected_by_reason
                .with(&[("reason", reason.as_str())])
                .set(0);
        }
        for &f in &m.families {
            let fam = [("ip_family", ip_family_name(f))];
            m.sync_duration.with(&fam);
            m.network_programming_duration.with(&fam);
            m.sync_full_duration.with(&fam);
            m.sync_partial_duration.with(&fam);
            m.nftables_sync_failures.with(&fam);
            m.nftables_cleanup_failures.with(&fam);
            m.last_sync_timestamp.with(&fam);
            m.last_queued_timestamp.with(&fam);
            m.endpoint_changes.with(&fam);
            m.service_changes.with(&fam);
            m.endpoint_changes_pending.with(&fam);
            m.service_changes_pending.with(&fam);
            for policy in ["internal", "external"] {
                m.no_local_endpoints
                    .with(&[("ip_family", ip_family_name(f)), ("traffic_policy", policy)]);
            }
        }
        m
    }

    /// The IP families given to [`Metrics::new`].
    pub fn families(&self) -> &[IpFamily] {
        &self.families
    }

    /// Everything, in the text exposition format 0.0.4 ([`CONTENT_TYPE`]). Families without
    /// series are left out.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }

    fn each_family(&self, f: impl Fn(&[(&str, &str)])) {
        for &family in &self.families {
            f(&[("ip_family", ip_family_name(family))]);
        }
    }

    /// A sync attempt finished after `duration`: observed in the duration histogram whether
    /// or not it succeeded (as kube-proxy does); success sets the last-sync timestamp to now,
    /// failure counts in kube_bpf_proxy_sync_failures_total and its nftables twin.
    pub fn observe_sync(&self, duration: Duration, ok: bool) {
        self.observe_sync_at(duration, ok, SystemTime::now());
    }

    /// [`Metrics::observe_sync`] with an explicit clock.
    pub fn observe_sync_at(&self, duration: Duration, ok: bool, now: SystemTime) {
        self.each_family(|l| {
            self.sync_duration.with(l).observe(duration.as_secs_f64());
            if ok {
                self.last_sync_timestamp.with(l).set(unix_seconds(now));
            } else {
                self.nftables_sync_failures.with(l).inc();
            }
        });
        if !ok {
            self.sync_failures.with(&[]).inc();
        }
    }

    /// A successful sync's `duration`, by how it was planned: over every frontend (`full`) or
    /// over the changed ones.
    pub fn observe_sync_kind(&self, duration: Duration, full: bool) {
        let histogram = if full {
            &self.sync_full_duration
        } else {
            &self.sync_partial_duration
        };
        self.each_family(|l| histogram.with(l).observe(duration.as_secs_f64()));
    }

    /// A change arrived and a sync was requested at `now`.
    pub fn observe_queued(&self, now: SystemTime) {
        self.each_family(|l| {
            self.last_queued_timestamp.with(l).set(unix_seconds(now));
        });
    }

    /// Network programming latency of one EndpointSlice change of `family`: now minus its
    /// endpoints.kubernetes.io/last-change-trigger-time, after the sync that programmed it
    /// (semantics 11.3: skip deletions and trigger times before the agent started).
    /// One round of the connection-tracking cleanup took `duration` (every family).
    pub fn observe_conntrack_reconciler(&self, duration: Duration) {
        self.each_family(|l| {
            self.conntrack_reconciler_duration
                .with(l)
                .observe(duration.as_secs_f64());
        });
    }

    pub fn observe_programming_latency(&self, family: IpFamily, latency: Duration) {
        self.network_programming_duration
            .with(&[("ip_family", ip_family_name(family))])
            .observe(latency.as_secs_f64());
    }

    /// The Service and EndpointSlice add/update/delete events `changes` took in (semantics
    /// 11.6): Service events counted for every family, as kube-proxy's per-family proxiers
    /// each see every Service event; slice events in their address type's.
    pub fn add_change_events(&self, changes: &crate::snapshot::Changes) {
        self.add_service_changes(changes.service_events);
        for (family, n) in [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .zip(changes.slice_events)
        {
            if n > 0 {
                self.add_endpoint_changes(family, n);
            }
        }
    }

    /// `n` Service add/update/delete events were received (counted for every family, as
    /// kube-proxy's per-family proxiers each see every Service event).
    pub fn add_service_changes(&self, n: u64) {
        self.each_family(|l| {
            self.service_changes.with(l).inc_by(n);
        });
    }

    /// The Services and EndpointSlices changed and not programmed yet, per family (`Changes`).
    pub fn set_changes_pending(&self, pending: &crate::snapshot::Changes) {
        let (services, slices) = pending.counts();
        for &family in &self.families {
            let i = usize::from(family == IpFamily::V6);
            let l = [("ip_family", ip_family_name(family))];
            self.service_changes_pending.with(&l).set(services[i]);
            self.endpoint_changes_pending.with(&l).set(slices[i]);
        }
    }

    /// `n` EndpointSlice events of `family` (the slice's addressType) were received.
    pub fn add_endpoint_changes(&self, family: IpFamily, n: u64) {
        self.endpoint_changes
            .with(&[("ip_family", ip_family_name(family))])
            .inc_by(n);
    }

    /// Service ports of `family` whose internal / external traffic is dropped for lack of a
    /// local endpoint (semantics 3.8/3.9), as of the last sync.
    pub fn set_no_local_endpoints(&self, family: IpFamily, internal: u64, external: u64) {
        let f = ip_family_name(family);
        for (policy, n) in [("internal", internal), ("external", external)] {
            self.no_local_endpoints
                .with(&[("ip_family", f), ("traffic_policy", policy)])
                .set(n);
        }
    }

    /// `n` objects of `kind` are currently rejected.
    pub fn set_rejected(&self, kind: &str, n: u64) {
        self.rejected_objects.with(&[("kind", kind)]).set(n);
        let mut kinds = self
            .rejected_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !kinds.contains(kind) {
            kinds.insert(kind.to_string());
        }
    }

    /// Sets kube_bpf_proxy_rejected_objects from a sync's problems: distinct objects per kind
    /// (the first word of [`Problem::object`]); kinds seen before but absent now go to 0.
    pub fn set_rejected_problems(&self, problems: &[Problem]) {
        let objects: BTreeSet<&str> = problems.iter().map(|p| p.object.as_str()).collect();
        let mut per_kind: BTreeMap<&str, u64> = BTreeMap::new();
        for object in objects {
            let kind = object.split_whitespace().next().unwrap_or("unknown");
            *per_kind.entry(kind).or_default() += 1;
        }
        let seen: Vec<String> = self
            .rejected_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|k| !per_kind.contains_key(k.as_str()))
            .cloned()
            .collect();
        for kind in seen {
            self.set_rejected(&kind, 0);
        }
        for (kind, n) in per_kind {
            self.set_rejected(kind, n);
        }
        let mut per_reason: BTreeMap<ProblemReason, BTreeSet<&str>> = BTreeMap::new();
        for p in problems {
            per_reason
                .entry(p.reason)
                .or_default()
                .insert(p.object.as_str());
        }
        for reason in ProblemReason::ALL {
            let n = per_reason.get(&reason).map_or(0, |o| o.len() as u64);
            self.rejected_by_reason
                .with(&[("reason", reason.as_str())])
                .set(n);
        }
    }

    /// A write to BPF map `map` failed.
    pub fn map_update_error(&self, map: &str) {
        self.map_update_errors.with(&[("map", map)]).inc();
    }

    /// BPF map `map` holds `entries` of at most `max`.
    pub fn set_map_fill(&self, map: &str, entries: u64, max: u64) {
        self.map_entries.with(&[("map", map)]).set(entries);
        self.map_max_entries.with(&[("map", map)]).set(max);
    }

    /// Absolute datapath event totals per reason (per-CPU BPF counters already summed). A
    /// total below the previous one reads as a counter reset, which Prometheus handles.
    pub fn set_datapath_totals(&self, totals: &[(&str, u64)]) {
        for (reason, total) in totals {
            self.datapath_events
                .with(&[("reason", reason)])
                .inner()
                .store(*total, Ordering::Relaxed);
        }
    }

    /// Absolute drop totals per (hook, reason), as `set_datapath_totals`.
    pub fn set_drop_totals(&self, totals: &[(&str, &str, u64)]) {
        for (hook, reason, total) in totals {
            self.drops
                .with(&[("hook", hook), ("reason", reason)])
                .inner()
                .store(*total, Ordering::Relaxed);
        }
    }

    /// Health check servers running and wanted-but-unbound after the last sync.
    pub fn set_healthcheck_ports(&self, serving: u64, failing: u64) {
        for (state, n) in [("serving", serving), ("failing", failing)] {
            self.healthcheck_ports.with(&[("state", state)]).set(n);
        }
    }

    /// Counts one /healthz (`livez` false) or /livez answer with HTTP status `code`.
    pub fn count_health_request(&self, livez: bool, code: u16) {
        let family = if livez {
            &self.livez_requests
        } else {
            &self.healthz_requests
        };
        family.with(&[("code", &code.to_string())]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the structural rules of the text format: HELP then TYPE once per family before
    /// its samples, sample lines `name[{labels}] value` with a parseable value, samples of a
    /// family contiguous.
    fn check_exposition(text: &str) -> BTreeMap<String, String> {
        let mut types = BTreeMap::new();
        let mut current: Option<(String, String)> = None;
        let mut lines = text.lines();
        assert!(text.ends_with('\n'), "must end with a newline");
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                let ty = lines.next().expect("TYPE after HELP");
                let ty = ty
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("TYPE after HELP for {name}: {ty}"));
                assert!(["counter", "gauge", "histogram"].contains(&ty));
                assert!(
                    types.insert(name.clone(), ty.to_string()).is_none(),
                    "{name} twice"
                );
                current = Some((name, ty.to_string()));
                continue;
            }
            assert!(!line.starts_with('#'), "stray comment {line}");
            let (name, ty) = current.as_ref().expect("sample before HELP");
            let (series, value) = line.rsplit_once(' ').unwrap();
            let metric = series.split('{').next().unwrap();
            let ok_names: Vec<String> = if ty == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect()
            } else {
                vec![name.clone()]
            };
            assert!(ok_names.iter().any(|n| n == metric), "{line} under {name}");
            if series.contains('{') {
                assert!(series.ends_with('}'), "{line}");
            }
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "value of {line}"
            );
        }
        types
    }

    /// Every sample line of `text` as `(metric name, label pairs)`, label values unescaped.
    fn samples(text: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let end = line.find(['{', ' ']).expect("name ends");
            let name = line[..end].to_string();
            let mut labels = Vec::new();
            let mut rest = line[end..].chars();
            if line[end..].starts_with('{') {
                rest.next();
                loop {
                    let key: String = rest.by_ref().take_while(|c| *c != '=').collect();
                    assert_eq!(rest.next(), Some('"'), "{line}");
                    let mut value = String::new();
                    loop {
                        match rest.next().expect("closing quote") {
                            '"' => break,
                            '\\' => value.push(match rest.next().expect("escaped") {
                                'n' => '\n',
                                c => c,
                            }),
                            c => value.push(c),
                        }
                    }
                    labels.push((key, value));
                    match rest.next() {
                        Some(',') => continue,
                        Some('}') => break,
                        other => panic!("{other:?} after a label in {line}"),
                    }
                }
            }
            out.push((name, labels));
        }
        out
    }

    /// The metrics exposed before the move to prometheus-client, as sample names with their
    /// type and label names (a histogram's `le` aside): none may go, none may be renamed.
    const EXPOSED: &[(&str, &str, &[&str])] = &[
        (
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_network_programming_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "gauge",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "gauge",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "gauge",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "gauge",
            &["ip_family", "traffic_policy"],
        ),
        ("kubeproxy_proxy_healthz_total", "counter", &["code"]),
        ("kubeproxy_proxy_livez_total", "counter", &["code"]),
        (
            "kubeproxy_conntrack_reconciler_deleted_entries_total",
            "counter",
            &["ip_family"],
        ),
        (
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "histogram",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
            "counter",
            &["ip_family"],
        ),
        (
            "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
            "counter",
            &["ip_family"],
        ),
        ("kube_bpf_proxy_sync_failures_total", "counter", &[]),
        ("kube_bpf_proxy_rejected_objects", "gauge", &["kind"]),
        (
            "kube_bpf_proxy_rejected_objects_by_reason",
            "gauge",
            &["reason"],
        ),
        (
            "kube_bpf_proxy_map_update_errors_total",
            "counter",
            &["map"],
        ),
        ("kube_bpf_proxy_map_entries", "gauge", &["map"]),
        ("kube_bpf_proxy_map_max_entries", "gauge", &["map"]),
        ("kube_bpf_proxy_map_memlock_bytes", "gauge", &["map"]),
        ("kube_bpf_proxy_map_evictions", "gauge", &["map"]),
        (
            "kube_bpf_proxy_datapath_events_total",
            "counter",
            &["reason"],
        ),
        ("kube_bpf_proxy_pod_interfaces", "gauge", &[]),
        (
            "kube_bpf_proxy_interface_attach_failures_total",
            "counter",
            &["reason"],
        ),
        (
            "kube_bpf_proxy_local_endpoints_waiting_for_interface",
            "gauge",
            &[],
        ),
        (
            "kube_bpf_proxy_network_namespaces_with_source",
            "gauge",
            &[],
        ),
        ("kube_bpf_proxy_pod_namespaces_at_tc", "gauge", &[]),
        ("kube_bpf_proxy_drift_repairs_total", "counter", &[]),
        ("kube_bpf_proxy_foreign_programs", "gauge", &[]),
        ("kube_bpf_proxy_socket_lb_off_pods", "gauge", &["state"]),
        ("kube_bpf_proxy_socket_lb_label_errors", "gauge", &[]),
        ("kube_bpf_proxy_build_info", "gauge", &["version"]),
        (
            "kube_bpf_proxy_sockets_terminated_total",
            "counter",
            &["protocol"],
        ),
        (
            "kube_bpf_proxy_socket_termination_errors_total",
            "counter",
            &[],
        ),
        ("kube_bpf_proxy_socket_termination_active", "gauge", &[]),
        (
            "kube_bpf_proxy_healthcheck_bind_failures_total",
            "counter",
            &[],
        ),
        ("kube_bpf_proxy_healthcheck_ports", "gauge", &["state"]),
        (
            "kube_bpf_proxy_list_watch_errors_total",
            "counter",
            &["operation", "resource"],
        ),
        ("kube_bpf_proxy_list_watch_failing", "gauge", &["resource"]),
        (
            "kube_bpf_proxy_watch_expired_total",
            "counter",
            &["resource"],
        ),
        (
            "kube_bpf_proxy_undecodable_objects_total",
            "counter",
            &["kind"],
        ),
        ("kube_bpf_proxy_undecodable_objects", "gauge", &["kind"]),
    ];

    /// The series a fresh agent exposes before its first sync (both IP families), as
    /// `name{labels}` with labels sorted by name and a histogram's `le` left out.
    const EXPOSED_AT_START: &[&str] = &[
        "kube_bpf_proxy_build_info{version=\"0.1.0\"}",
        "kube_bpf_proxy_drift_repairs_total",
        "kube_bpf_proxy_foreign_programs",
        "kube_bpf_proxy_healthcheck_bind_failures_total",
        "kube_bpf_proxy_healthcheck_ports{state=\"failing\"}",
        "kube_bpf_proxy_healthcheck_ports{state=\"serving\"}",
        "kube_bpf_proxy_local_endpoints_waiting_for_interface",
        "kube_bpf_proxy_network_namespaces_with_source",
        "kube_bpf_proxy_pod_interfaces",
        "kube_bpf_proxy_pod_namespaces_at_tc",
        "kube_bpf_proxy_rejected_objects{kind=\"EndpointSlice\"}",
        "kube_bpf_proxy_rejected_objects{kind=\"Service\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"capacity\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"conflict\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"duplicate_endpoint\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"duplicate_object\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_address\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_affinity\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_annotation\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_cluster_ip\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_endpoint\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_object\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_port\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"invalid_source_range\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"missing_health_check\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"unsupported_address_type\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"unsupported_protocol\"}",
        "kube_bpf_proxy_rejected_objects_by_reason{reason=\"write_failed\"}",
        "kube_bpf_proxy_socket_lb_label_errors",
        "kube_bpf_proxy_socket_lb_off_pods{state=\"programmed\"}",
        "kube_bpf_proxy_socket_lb_off_pods{state=\"waiting\"}",
        "kube_bpf_proxy_sync_failures_total",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\"}",
        "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv6\"}",
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv6\"}",
        "kubeproxy_network_programming_duration_seconds_sum{ip_family=\"IPv4\"}",
        "kubeproxy_network_programming_duration_seconds_sum{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"external\"}",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"}",
        "kubeproxy_sync_proxy_rules_service_changes_pending{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_service_changes_pending{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_service_changes_total{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_service_changes_total{ip_family=\"IPv6\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_bucket{ip_family=\"IPv6\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family=\"IPv6\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_bucket{ip_family=\"IPv6\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_sum{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family=\"IPv6\"}",
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv6\"}",
    ];

    /// The `le` values of the two histograms before the move to prometheus-client, as exposed.
    const SYNC_LE: &str = "0.001 0.002 0.004 0.008 0.016 0.032 0.064 0.128 0.256 0.512 1.024 2.048 4.096 8.192 16.384 +Inf";
    const PROGRAMMING_LE: &str = "0.25 0.5 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 65 70 75 80 85 90 95 100 105 110 115 120 150 180 210 240 270 300 +Inf";

    /// Every series of `text` as `name{k="v",...}` (labels sorted, `le` left out), deduplicated.
    fn series_keys(text: &str) -> BTreeSet<String> {
        samples(text)
            .into_iter()
            .map(|(name, mut labels)| {
                labels.retain(|(k, _)| k != "le");
                labels.sort();
                if labels.is_empty() {
                    return name;
                }
                let labels: Vec<String> =
                    labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                format!("{name}{{{}}}", labels.join(","))
            })
            .collect()
    }

    #[test]
    fn failed_syncs_count_under_the_nftables_name_and_syncs_by_kind() {
        // semantics 11.7: kube-proxy's nftables proxier counts failed syncs per family.
        let m = Metrics::new("0.1.0", &[IpFamily::V4, IpFamily::V6]);
        m.observe_sync(Duration::from_millis(2), false);
        m.observe_sync(Duration::from_millis(2), true);
        m.observe_sync_kind(Duration::from_millis(2), true);
        m.observe_sync_kind(Duration::from_millis(2), false);
        m.observe_sync_kind(Duration::from_millis(2), false);
        let text = m.render();
        for family in ["IPv4", "IPv6"] {
            for (series, value) in [
                (
                    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                    "1",
                ),
                (
                    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
                    "0",
                ),
                (
                    "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                    "1",
                ),
                (
                    "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                    "2",
                ),
            ] {
                let line = format!("{series}{{ip_family=\"{family}\"}} {value}");
                assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
            }
        }
    }

    #[test]
    fn every_metric_exposed_before_is_still_exposed() {
        let m = Metrics::new("0.1.0", &[IpFamily::V4, IpFamily::V6]);
        let at_start = series_keys(&m.render());
        let wanted: BTreeSet<String> = EXPOSED_AT_START.iter().map(|s| s.to_string()).collect();
        assert_eq!(at_start, wanted);

        // One series in every family.
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        m.observe_queued(t);
        m.observe_sync_at(Duration::from_millis(3), false, t);
        m.observe_sync_at(Duration::from_millis(3), true, t);
        m.observe_programming_latency(IpFamily::V4, Duration::from_secs(1));
        m.add_service_changes(1);
        m.add_endpoint_changes(IpFamily::V4, 1);
        m.set_no_local_endpoints(IpFamily::V4, 1, 1);
        m.count_health_request(false, 200);
        m.count_health_request(true, 200);
        m.conntrack_deleted.with(&[("ip_family", "IPv4")]).inc();
        m.observe_conntrack_reconciler(Duration::from_millis(3));
        m.set_rejected("Service", 1);
        m.map_update_error("LB_BACKENDS");
        m.set_map_fill("LB_BACKENDS", 1, 2);
        m.map_memlock.with(&[("map", "LB_BACKENDS")]).inc();
        m.map_evictions.with(&[("map", "SOCK4_REVNAT")]).inc();
        m.set_datapath_totals(&[("translated", 1)]);
        m.pod_interfaces.with(&[]).inc();
        m.interface_attach_failures
            .with(&[("reason", "gone")])
            .inc();
        m.pod_endpoints_waiting.with(&[]).inc();
        m.netns_sources.with(&[]).inc();
        m.pod_namespaces_at_tc.with(&[]).inc();
        m.drift_repairs.with(&[]).inc();
        m.sockets_terminated.with(&[("protocol", "TCP")]).inc();
        m.socket_termination_errors.with(&[]).inc();
        m.socket_termination_active.with(&[]).inc();
        m.healthcheck_bind_failures.with(&[]).inc();
        m.set_healthcheck_ports(1, 1);
        m.list_watch_errors
            .with(&[("resource", "services"), ("operation", "list")])
            .inc();
        m.watch_expired.with(&[("resource", "services")]).inc();
        m.list_watch_failing
            .with(&[("resource", "services")])
            .set(1);
        m.undecodable_objects_total
            .with(&[("kind", "Service")])
            .inc();
        m.undecodable_objects.with(&[("kind", "Service")]).inc();

        let text = m.render();
        let types = check_exposition(&text);
        let mut exposed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, labels) in samples(&text) {
            exposed
                .entry(name)
                .or_default()
                .extend(labels.into_iter().map(|(k, _)| k).filter(|k| k != "le"));
        }
        let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, ty, labels) in EXPOSED {
            let labels: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
            let names = if *ty == "histogram" {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect()
            } else {
                vec![name.to_string()]
            };
            for n in names {
                wanted.insert(n, labels.clone());
            }
            assert_eq!(types.get(*name).map(String::as_str), Some(*ty), "{name}");
        }
        assert_eq!(exposed, wanted);
        assert_eq!(types.len(), EXPOSED.len());

        for (name, le) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", SYNC_LE),
            (
                "kubeproxy_network_programming_duration_seconds",
                PROGRAMMING_LE,
            ),
        ] {
            let shown: Vec<String> = samples(&text)
                .into_iter()
                .filter(|(n, l)| {
                    *n == format!("{name}_bucket")
                        && l.contains(&("ip_family".into(), "IPv4".into()))
                })
                .filter_map(|(_, l)| l.into_iter().find(|(k, _)| k == "le").map(|(_, v)| v))
                .collect();
            assert_eq!(shown.join(" "), le, "{name}");
        }
    }

    /// `text`'s lines, sorted: series within a family come in no particular order.
    fn sorted_lines(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort();
        lines
    }

    #[test]
    fn counter_gauge_render_with_sorted_labels() {
        let mut r = Registry::default();
        let c = counter(&mut r, "a_total", "A counter");
        let g = gauge(&mut r, "b", "A gauge");
        let t = time_gauge(&mut r, "t_seconds", "A time");
        c.with(&[("z", "1"), ("a", "2")]).inc_by(3);
        c.with(&[("a", "2"), ("z", "1")]).inc(); // same series
        c.with(&[("a", "1"), ("z", "1"), ("a", "3")]).inc(); // the first "a" wins
        g.with(&[]).set(2);
        g.with(&[]).dec();
        t.with(&[]).set(unix_seconds(
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
        ));
        let text = encode(&r);
        assert_eq!(
            sorted_lines(&text),
            sorted_lines(
                "# HELP a_total A counter.\n\
                 # TYPE a_total counter\n\
                 a_total{a=\"1\",z=\"1\"} 1\n\
                 a_total{a=\"2\",z=\"1\"} 4\n\
                 # HELP b A gauge.\n\
                 # TYPE b gauge\n\
                 b 1\n\
                 # HELP t_seconds A time.\n\
                 # TYPE t_seconds gauge\n\
                 t_seconds 1700000000.25\n"
            )
        );
        check_exposition(&text);
        assert!(text.starts_with("# HELP a_total A counter.\n# TYPE a_total counter\n"));
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_millis(1500)), -1.5);
    }

    #[test]
    fn families_without_series_are_omitted() {
        let mut r = Registry::default();
        let c = counter(&mut r, "c_total", "C");
        assert_eq!(encode(&r), "");
        c.with(&[("x", "y")]);
        assert_eq!(
            encode(&r),
            "# HELP c_total C.\n# TYPE c_total counter\nc_total{x=\"y\"} 0\n"
        );
        assert!(c.remove(&labels(&[("x", "y")])));
        assert!(!c.remove(&labels(&[("x", "y")])));
        assert_eq!(encode(&r), "");
    }

    /// Label values and HELP text are escaped by prometheus-client (before 0.25.2 label values
    /// were not); the version label, for one, is free-form.
    #[test]
    fn escaping() {
        let mut r = Registry::default();
        let g = gauge(
            &mut r,
            "e",
            "Help with \\ backslash\nand newline, \"quotes\" kept",
        );
        g.with(&[("v", "a\\b\"c\nd")]).set(1);
        assert_eq!(
            encode(&r),
            "# HELP e Help with \\\\ backslash\\nand newline, \"quotes\" kept.\n\
             # TYPE e gauge\n\
             e{v=\"a\\\\b\\\"c\\nd\"} 1\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut r = Registry::default();
        let h = histogram(&mut r, "h_seconds", "H", || Histogram::new([0.5, 1.0]));
        let s = h.with(&[("k", "v")]);
        s.observe(0.25);
        s.observe(0.5); // upper bounds are inclusive
        s.observe(1.0);
        s.observe(4.0);
        assert_eq!(
            encode(&r),
            "# HELP h_seconds H.\n\
             # TYPE h_seconds histogram\n\
             h_seconds_bucket{k=\"v\",le=\"0.5\"} 2\n\
             h_seconds_bucket{k=\"v\",le=\"1\"} 3\n\
             h_seconds_bucket{k=\"v\",le=\"+Inf\"} 4\n\
             h_seconds_sum{k=\"v\"} 5.75\n\
             h_seconds_count{k=\"v\"} 4\n"
        );
        let unlabeled = histogram(&mut r, "u", "U", || Histogram::new([1.0]));
        unlabeled
            .with(&[])
            .observe(Duration::from_millis(500).as_secs_f64());
        let text = encode(&r);
        assert!(
            text.contains("u_bucket{le=\"1\"} 1\nu_bucket{le=\"+Inf\"} 1\nu_sum 0.5\nu_count 1\n")
        );
        check_exposition(&text);
    }

    #[test]
    fn bucket_layouts_match_kube_proxy() {
        let sync = sync_duration_buckets();
        assert_eq!(sync.len(), 15);
        assert_eq!(&sync[..3], &[0.001, 0.002, 0.004]);
        assert_eq!(sync[10], 1.024);
        assert_eq!(sync[14], 16.384);
        assert!(sync.windows(2).all(|w| w[1] == w[0] * 2.0));

        let np = network_programming_buckets();
        assert_eq!(np.len(), 2 + 59 + 12 + 7);
        assert_eq!(&np[..4], &[0.25, 0.5, 1.0, 2.0]);
        assert_eq!(np[60], 59.0);
        assert_eq!(&np[61..63], &[60.0, 65.0]);
        assert_eq!(np[72], 115.0);
        assert_eq!(
            &np[73..],
            &[120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0]
        );
        assert!(np.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn agent_metrics_render() {
        let m = Metrics::new("0.1.0", &[IpFamily::V6, IpFamily::V4, IpFamily::V6]);
        assert_eq!(m.families(), &[IpFamily::V4, IpFamily::V6]);
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_500);
        m.observe_queued(t);
        m.observe_sync_at(Duration::from_millis(3), true, t);
        m.observe_sync_at(Duration::from_millis(40), false, t + Duration::from_secs(9));
        m.observe_programming_latency(IpFamily::V4, Duration::from_millis(1500));
        m.add_service_changes(2);
        m.add_endpoint_changes(IpFamily::V6, 5);
        m.set_no_local_endpoints(IpFamily::V4, 1, 2);
        m.map_update_error("services");
        m.set_map_fill("backends", 10, 65536);
        m.set_datapath_totals(&[("no_backend", 7), ("reject", 3)]);
        m.set_datapath_totals(&[("no_backend", 9)]);
        m.count_health_request(false, 200);
        m.count_health_request(true, 503);
        m.set_healthcheck_ports(2, 1);
        let text = m.render();
        let types = check_exposition(&text);

        for (name, ty) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
            (
                "kubeproxy_network_programming_duration_seconds",
                "histogram",
            ),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "gauge",
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "counter",
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "counter",
            ),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "gauge",
            ),
            ("kubeproxy_proxy_healthz_total", "counter"),
            ("kubeproxy_proxy_livez_total", "counter"),
            ("kube_bpf_proxy_sync_failures_total", "counter"),
            ("kube_bpf_proxy_rejected_objects", "gauge"),
            ("kube_bpf_proxy_map_update_errors_total", "counter"),
            ("kube_bpf_proxy_map_entries", "gauge"),
            ("kube_bpf_proxy_map_max_entries", "gauge"),
            ("kube_bpf_proxy_datapath_events_total", "counter"),
            ("kube_bpf_proxy_build_info", "gauge"),
            ("kube_bpf_proxy_healthcheck_bind_failures_total", "counter"),
            ("kube_bpf_proxy_healthcheck_ports", "gauge"),
        ] {
            assert_eq!(types.get(name).map(String::as_str), Some(ty), "{name}");
        }

        for line in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.002\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv6\",le=\"0.064\"} 2",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 2",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"1\"} 0",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"2\"} 1",
            "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv6\"} 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1700000000.5",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv6\"} 1700000000.5",
            "kubeproxy_sync_proxy_rules_service_changes_total{ip_family=\"IPv4\"} 2",
            "kubeproxy_sync_proxy_rules_service_changes_total{ip_family=\"IPv6\"} 2",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total{ip_family=\"IPv4\"} 0",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total{ip_family=\"IPv6\"} 5",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 2",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 1",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"} 0",
            "kubeproxy_proxy_healthz_total{code=\"200\"} 1",
            "kubeproxy_proxy_livez_total{code=\"503\"} 1",
            "kube_bpf_proxy_sync_failures_total 1",
            "kube_bpf_proxy_rejected_objects{kind=\"Service\"} 0",
            "kube_bpf_proxy_map_update_errors_total{map=\"services\"} 1",
            "kube_bpf_proxy_map_entries{map=\"backends\"} 10",
            "kube_bpf_proxy_map_max_entries{map=\"backends\"} 65536",
            "kube_bpf_proxy_datapath_events_total{reason=\"no_backend\"} 9",
            "kube_bpf_proxy_datapath_events_total{reason=\"reject\"} 3",
            "kube_bpf_proxy_build_info{version=\"0.1.0\"} 1",
            "kube_bpf_proxy_healthcheck_bind_failures_total 0",
            "kube_bpf_proxy_healthcheck_ports{state=\"serving\"} 2",
            "kube_bpf_proxy_healthcheck_ports{state=\"failing\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // A failed sync does not move the last-sync timestamp.
        assert_eq!(
            m.last_sync_timestamp.with(&[("ip_family", "IPv6")]).get(),
            1_700_000_000.5
        );
    }

    #[test]
    fn rejected_problems_count_distinct_objects_per_kind() {
        let m = Metrics::new("v", &[]);
        let p = |object: &str| Problem {
            reason: ProblemReason::InvalidObject,
            object: object.into(),
            message: "bad".into(),
        };
        m.set_rejected_problems(&[
            p("Service default/a"),
            p("Service default/a"),
            p("Service default/b"),
            p("EndpointSlice default/x"),
            p("Gateway default/g"),
        ]);
        let get = |k: &str| m.rejected_objects.with(&[("kind", k)]).get();
        assert_eq!(get("Service"), 2);
        assert_eq!(get("EndpointSlice"), 1);
        assert_eq!(get("Gateway"), 1);
        let by_reason =
            |r: ProblemReason| m.rejected_by_reason.with(&[("reason", r.as_str())]).get();
        assert_eq!(
            by_reason(ProblemReason::InvalidObject),
            4,
            "distinct objects"
        );
        assert_eq!(by_reason(ProblemReason::Conflict), 0);
        m.set_rejected_problems(&[p("Service default/b")]);
        // Kinds seen before stay, at 0.
        let text = m.render();
        assert!(text.contains("kube_bpf_proxy_rejected_objects{kind=\"Gateway\"} 0\n"));
        assert_eq!(get("Service"), 1);
        assert_eq!(get("EndpointSlice"), 0);
        assert_eq!(get("Gateway"), 0);
        // No families: no ip_family series, but the rest renders.
        check_exposition(&text);
        assert!(!text.contains("ip_family"));
        assert!(text.contains("kube_bpf_proxy_sync_failures_total 0\n"));
    }

    #[test]
    fn concurrent_updates() {
        let m = std::sync::Arc::new(Metrics::new("v", &[IpFamily::V4]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        m.observe_sync(Duration::from_micros(i), i % 2 == 0);
                        m.map_update_error("m");
                        let _ = m.render();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.map_update_errors.with(&[("map", "m")]).get(), 4000);
        assert_eq!(m.sync_failures.with(&[]).get(), 2000);
        let text = m.render();
        for line in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 4000",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 4000",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.001\"} 4000",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
