//! Prometheus metrics: a small thread-safe registry (counters, gauges, fixed-bucket histograms,
//! optional labels) rendered in the text exposition format 0.0.4, and [`Metrics`], the agent's
//! metrics. Names follow kube-proxy where the meaning matches (semantics 11.1-11.6), including
//! the `ip_family` label; the rest are prefixed `kube_bpf_proxy_`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::compile::{Family as IpFamily, Problem};

/// Content type of [`Registry::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Locks, ignoring poisoning: every critical section here leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `ip_family` label value kube-proxy uses (`v1.IPFamily`).
pub fn ip_family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

/// A label set: key/value pairs sorted by key, keys unique (the first of duplicates wins).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub fn new(pairs: &[(&str, &str)]) -> Labels {
        let mut v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| {
                debug_assert!(valid_label_name(k), "invalid label name {k:?}");
                (k.to_string(), v.to_string())
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.dedup_by(|later, first| later.0 == first.0);
        Labels(v)
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    /// The value of label `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Writes `{k="v",...}`, with `extra` (e.g. `le`) last; nothing when there are no labels.
    fn write(&self, out: &mut String, extra: Option<(&str, &str)>) {
        if self.0.is_empty() && extra.is_none() {
            return;
        }
        out.push('{');
        let mut first = true;
        for (k, v) in self
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(extra)
        {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(v, out);
            out.push('"');
        }
        out.push('}');
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
        && name != "le"
}

/// Label values escape backslash, double quote and newline.
fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text escapes backslash and newline.
fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value as the text format spells it.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        // Shortest representation that round-trips; never an exponent, which is also valid.
        format!("{v}")
    }
}

/// One kind of time series value.
pub trait Metric: Send + Sync + 'static {
    /// The `# TYPE` word.
    const TYPE: &'static str;
    /// Per-family configuration every series is created from.
    type Config: Send + Sync + 'static;
    fn create(config: &Self::Config) -> Self;
    fn render(&self, name: &str, labels: &Labels, out: &mut String);
}

/// A monotonically increasing integer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Stores an absolute total read from elsewhere (e.g. summed per-CPU BPF counters). A
    /// total below the previous one reads as a counter reset, which Prometheus handles.
    pub fn set_total(&self, total: u64) {
        self.0.store(total, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";
    type Config = ();
    fn create(_: &()) -> Self {
        Counter::default()
    }
    fn render(&self, name: &str, labels: &Labels, out: &mut String) {
        out.push_str(name);
        labels.write(out, None);
        let _ = writeln!(out, " {}", self.get());
    }
}

/// A value that goes up and down.
#[derive(Debug)]
pub struct Gauge(AtomicU64); // f64 bits

impl Default for Gauge {
    fn default() -> Self {
        Gauge(AtomicU64::new(0f64.to_bits()))
    }
}

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    pub fn add(&self, d: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + d).to_bits())
            });
    }

    pub fn inc(&self) {
        self.add(1.0);
    }

    pub fn dec(&self) {
        self.add(-1.0);
    }

    /// Sets the gauge to `t` in seconds since the Unix epoch (fractional).
    pub fn set_to_time(&self, t: SystemTime) {
        self.set(unix_seconds(t));
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Seconds since the Unix epoch, negative before it.
pub fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";
    type Config = ();
    fn create(_: &()) -> Self {
        Gauge::default()
    }
    fn render(&self, name: &str, labels: &Labels, out: &mut String) {
        out.push_str(name);
        labels.write(out, None);
        let _ = writeln!(out, " {}", format_float(self.get()));
    }
}

/// A histogram with fixed upper bounds (the `+Inf` bucket is implicit).
#[derive(Debug)]
pub struct Histogram {
    bounds: Arc<[f64]>,
    state: Mutex<HistogramState>,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct HistogramState {
    /// Non-cumulative counts per finite bound.
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// A consistent copy of a histogram's state.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, cumulative count)` for every finite bound.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// Records `v`; NaN is ignored.
    pub fn observe(&self, v: f64) {
        if v.is_nan() {
            return;
        }
        let i = self.bounds.partition_point(|b| *b < v);
        let mut s = lock(&self.state);
        if i < s.buckets.len() {
            s.buckets[i] += 1;
        }
        s.sum += v;
        s.count += 1;
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let s = lock(&self.state).clone();
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&s.buckets)
            .map(|(b, n)| {
                cumulative += n;
                (*b, cumulative)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: s.sum,
            count: s.count,
        }
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";
    type Config = Arc<[f64]>;
    fn create(bounds: &Arc<[f64]>) -> Self {
        Histogram {
            bounds: bounds.clone(),
            state: Mutex::new(HistogramState {
                buckets: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
            }),
        }
    }
    fn render(&self, name: &str, labels: &Labels, out: &mut String) {
        let snap = self.snapshot();
        let bucket_name = format!("{name}_bucket");
        for (le, n) in snap
            .buckets
            .iter()
            .copied()
            .chain(std::iter::once((f64::INFINITY, snap.count)))
        {
            out.push_str(&bucket_name);
            labels.write(out, Some(("le", &format_float(le))));
            let _ = writeln!(out, " {n}");
        }
        out.push_str(name);
        out.push_str("_sum");
        labels.write(out, None);
        let _ = writeln!(out, " {}", format_float(snap.sum));
        out.push_str(name);
        out.push_str("_count");
        labels.write(out, None);
        let _ = writeln!(out, " {}", snap.count);
    }
}

/// `count` bounds `start`, `start * factor`, ... (prometheus.ExponentialBuckets).
pub fn exponential_buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(count);
    let mut b = start;
    for _ in 0..count {
        v.push(b);
        b *= factor;
    }
    v
}

/// `count` bounds `start`, `start + width`, ... (prometheus.LinearBuckets).
pub fn linear_buckets(start: f64, width: f64, count: usize) -> Vec<f64> {
    (0..count).map(|i| start + width * i as f64).collect()
}

/// A metric family: one name, help and type; one series per label set.
pub struct Family<M: Metric> {
    name: String,
    help: String,
    config: M::Config,
    series: Mutex<BTreeMap<Labels, Arc<M>>>,
}

impl<M: Metric> Family<M> {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The series for `labels`, created on first use. Callers on hot paths may keep the `Arc`.
    pub fn with(&self, labels: &[(&str, &str)]) -> Arc<M> {
        let labels = Labels::new(labels);
        lock(&self.series)
            .entry(labels)
            .or_insert_with(|| Arc::new(M::create(&self.config)))
            .clone()
    }

    /// The series for `labels`, if it exists.
    pub fn get(&self, labels: &[(&str, &str)]) -> Option<Arc<M>> {
        lock(&self.series).get(&Labels::new(labels)).cloned()
    }

    /// Drops a series; true if it existed.
    pub fn remove(&self, labels: &[(&str, &str)]) -> bool {
        lock(&self.series).remove(&Labels::new(labels)).is_some()
    }

    /// Every series, ordered by label set.
    pub fn series(&self) -> Vec<(Labels, Arc<M>)> {
        lock(&self.series)
            .iter()
            .map(|(l, m)| (l.clone(), m.clone()))
            .collect()
    }
}

trait Collect: Send + Sync {
    fn name(&self) -> &str;
    fn collect(&self, out: &mut String);
}

impl<M: Metric> Collect for Family<M> {
    fn name(&self) -> &str {
        &self.name
    }

    /// Families without series are left out, like client_golang does.
    fn collect(&self, out: &mut String) {
        let series = self.series();
        if series.is_empty() {
            return;
        }
        let _ = write!(out, "# HELP {} ", self.name);
        escape_help(&self.help, out);
        let _ = writeln!(out, "\n# TYPE {} {}", self.name, M::TYPE);
        for (labels, m) in &series {
            m.render(&self.name, labels, out);
        }
    }
}

/// Metric families in registration order.
#[derive(Default)]
pub struct Registry {
    families: Mutex<Vec<Arc<dyn Collect>>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn register<M: Metric>(&self, name: &str, help: &str, config: M::Config) -> Arc<Family<M>> {
        debug_assert!(valid_metric_name(name), "invalid metric name {name:?}");
        let family = Arc::new(Family::<M> {
            name: name.to_string(),
            help: help.to_string(),
            config,
            series: Mutex::new(BTreeMap::new()),
        });
        let mut families = lock(&self.families);
        debug_assert!(
            families.iter().all(|f| f.name() != name),
            "metric {name} registered twice"
        );
        families.push(family.clone());
        family
    }

    pub fn counter(&self, name: &str, help: &str) -> Arc<Family<Counter>> {
        self.register(name, help, ())
    }

    pub fn gauge(&self, name: &str, help: &str) -> Arc<Family<Gauge>> {
        self.register(name, help, ())
    }

    /// `bounds` are the finite upper bounds; they are sorted and de-duplicated, and non-finite
    /// ones dropped (`+Inf` is always added).
    pub fn histogram(&self, name: &str, help: &str, bounds: &[f64]) -> Arc<Family<Histogram>> {
        let mut b: Vec<f64> = bounds.iter().copied().filter(|b| b.is_finite()).collect();
        b.sort_by(f64::total_cmp);
        b.dedup();
        self.register(name, help, b.into())
    }

    /// Every family in the text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let families = lock(&self.families).clone();
        let mut out = String::new();
        for f in families {
            f.collect(&mut out);
        }
        out
    }
}

/// Datapath map names and reasons are free-form; these are the rejected object kinds
/// compile reports, pre-created so the series exist at 0.
const REJECTED_KINDS: [&str; 2] = ["EndpointSlice", "Service"];

/// The agent's metrics. Metrics kube-proxy labels with `ip_family` are observed for every
/// family the agent serves (one sync covers both), unless a method takes a family.
pub struct Metrics {
    pub registry: Registry,
    families: Vec<IpFamily>,

    /// kubeproxy_sync_proxy_rules_duration_seconds [ip_family] (11.1).
    pub sync_duration: Arc<Family<Histogram>>,
    /// kubeproxy_network_programming_duration_seconds [ip_family] (11.2).
    pub network_programming_duration: Arc<Family<Histogram>>,
    /// kubeproxy_sync_proxy_rules_last_timestamp_seconds [ip_family] (11.4).
    pub last_sync_timestamp: Arc<Family<Gauge>>,
    /// kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds [ip_family] (11.4).
    pub last_queued_timestamp: Arc<Family<Gauge>>,
    /// kubeproxy_sync_proxy_rules_endpoint_changes_total [ip_family] (11.6).
    pub endpoint_changes: Arc<Family<Counter>>,
    /// kubeproxy_sync_proxy_rules_service_changes_total [ip_family] (11.6).
    pub service_changes: Arc<Family<Counter>>,
    /// kubeproxy_sync_proxy_rules_no_local_endpoints_total [traffic_policy, ip_family], a gauge
    /// (11.5).
    pub no_local_endpoints: Arc<Family<Gauge>>,
    /// kubeproxy_proxy_healthz_total [code] (11.6).
    pub healthz_requests: Arc<Family<Counter>>,
    /// kubeproxy_proxy_livez_total [code] (11.6).
    pub livez_requests: Arc<Family<Counter>>,

    /// kube_bpf_proxy_sync_failures_total.
    pub sync_failures: Arc<Family<Counter>>,
    /// kube_bpf_proxy_rejected_objects [kind].
    pub rejected_objects: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_map_update_errors_total [map].
    pub map_update_errors: Arc<Family<Counter>>,
    /// kube_bpf_proxy_map_entries [map].
    pub map_entries: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_map_max_entries [map].
    pub map_max_entries: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_map_memlock_bytes [map]: the kernel's memory accounting of the map.
    pub map_memlock: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_map_evictions [map]: records of the socket LRU maps evicted because the
    /// map was full (created minus present; the agent deletes none).
    pub map_evictions: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_datapath_events_total [reason].
    pub datapath_events: Arc<Family<Counter>>,
    /// kube_bpf_proxy_build_info [version], always 1.
    pub pod_interfaces: Arc<Family<Gauge>>,
    pub interface_attach_failures: Arc<Family<Counter>>,
    pub pod_endpoints_waiting: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_network_namespaces_with_source: network namespaces of the hooked cgroup
    /// whose source address the socket hooks know (for loadBalancerSourceRanges).
    pub netns_sources: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_drift_repairs_total: read-backs that found the maps different from what
    /// the agent wrote (each followed by a full sync that repairs them).
    pub drift_repairs: Arc<Family<Counter>>,
    pub build_info: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_sockets_terminated_total [protocol].
    pub sockets_terminated: Arc<Family<Counter>>,
    /// kube_bpf_proxy_socket_termination_errors_total.
    pub socket_termination_errors: Arc<Family<Counter>>,
    /// kubeproxy_conntrack_reconciler_deleted_entries_total [ip_family] (11.8): UDP
    /// connection-tracking entries of the tc path deleted because their backend went away.
    pub conntrack_deleted: Arc<Family<Counter>>,
    /// kube_bpf_proxy_socket_termination_active: 1 while sockets of removed backends are
    /// terminated, 0 when the kernel cannot or it is turned off.
    pub socket_termination_active: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_healthcheck_bind_failures_total: failed attempts to bind a Service's
    /// healthCheckNodePort (each is retried at the next sync).
    pub healthcheck_bind_failures: Arc<Family<Counter>>,
    /// kube_bpf_proxy_healthcheck_ports [state]: healthCheckNodePorts served ("serving") and
    /// wanted but not bound ("failing"), as of the last sync.
    pub healthcheck_ports: Arc<Family<Gauge>>,
    /// kube_bpf_proxy_list_watch_errors_total [resource, operation]: lists and watches of the
    /// Kubernetes source that failed (each retried after a backoff). kube-proxy has no such
    /// metric; a 410 Gone is not counted here but in `watch_expired`.
    pub list_watch_errors: Arc<Family<Counter>>,
    /// kube_bpf_proxy_watch_expired_total [resource]: watches answered 410 Gone (the
    /// resourceVersion was compacted away), each followed at once by a relist.
    pub watch_expired: Arc<Family<Counter>>,
    /// kube_bpf_proxy_undecodable_objects_total [kind]: object versions from the API server
    /// that could not be decoded, each counted once.
    pub undecodable_objects_total: Arc<Family<Counter>>,
    /// kube_bpf_proxy_undecodable_objects [kind]: objects whose newest version cannot be
    /// decoded; the last decodable version is used meanwhile (none if never decoded).
    pub undecodable_objects: Arc<Family<Gauge>>,
}

/// 1 ms x 2^n, 15 buckets (kube-proxy's sync duration buckets).
pub fn sync_duration_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5, 120..300 s by 30 (kube-proxy's network
/// programming buckets).
pub fn network_programming_buckets() -> Vec<f64> {
    let mut b = linear_buckets(0.25, 0.25, 2);
    b.extend(linear_buckets(1.0, 1.0, 59));
    b.extend(linear_buckets(60.0, 5.0, 12));
    b.extend(linear_buckets(120.0, 30.0, 7));
    b
}

impl Metrics {
    /// `version` goes into build_info; `families` are the IP families the agent serves (their
    /// `ip_family` series are created at 0 so they exist before the first sync).
    pub fn new(version: &str, families: &[IpFamily]) -> Metrics {
        let mut families = families.to_vec();
        families.sort();
        families.dedup();
        let r = Registry::new();
        let m = Metrics {
            sync_duration: r.histogram(
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                &sync_duration_buckets(),
            ),
            network_programming_duration: r.histogram(
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                &network_programming_buckets(),
            ),
            last_sync_timestamp: r.gauge(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
            ),
            last_queued_timestamp: r.gauge(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
            ),
            endpoint_changes: r.counter(
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
            ),
            service_changes: r.counter(
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
            ),
            no_local_endpoints: r.gauge(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
            ),
            healthz_requests: r.counter(
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
            ),
            livez_requests: r.counter(
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
            ),
            sockets_terminated: r.counter(
                "kube_bpf_proxy_sockets_terminated_total",
                "Sockets destroyed because their Service backend went away",
            ),
            conntrack_deleted: r.counter(
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "UDP connection-tracking entries deleted because their backend went away",
            ),
            socket_termination_errors: r.counter(
                "kube_bpf_proxy_socket_termination_errors_total",
                "Failures while terminating sockets of removed backends",
            ),
            socket_termination_active: r.gauge(
                "kube_bpf_proxy_socket_termination_active",
                "1 while sockets connected to removed backends are terminated (kernel support and not turned off)",
            ),
            healthcheck_bind_failures: r.counter(
                "kube_bpf_proxy_healthcheck_bind_failures_total",
                "Failed attempts to bind a Service's healthCheckNodePort (retried at the next sync)",
            ),
            healthcheck_ports: r.gauge(
                "kube_bpf_proxy_healthcheck_ports",
                "healthCheckNodePorts served (state serving) and wanted but not bound (state failing)",
            ),
            list_watch_errors: r.counter(
                "kube_bpf_proxy_list_watch_errors_total",
                "Failed lists and watches of the API server, by resource and operation (retried after a backoff)",
            ),
            watch_expired: r.counter(
                "kube_bpf_proxy_watch_expired_total",
                "Watches answered 410 Gone, each followed by a relist, by resource",
            ),
            undecodable_objects_total: r.counter(
                "kube_bpf_proxy_undecodable_objects_total",
                "Object versions from the API server that could not be decoded, by kind",
            ),
            undecodable_objects: r.gauge(
                "kube_bpf_proxy_undecodable_objects",
                "Objects whose newest version cannot be decoded (the last decodable one is used), by kind",
            ),
            sync_failures: r.counter(
                "kube_bpf_proxy_sync_failures_total",
                "Syncs that failed to program the datapath (retried)",
            ),
            rejected_objects: r.gauge(
                "kube_bpf_proxy_rejected_objects",
                "Objects currently not (fully) programmed because they are invalid or conflict",
            ),
            map_update_errors: r.counter(
                "kube_bpf_proxy_map_update_errors_total",
                "Failed BPF map writes",
            ),
            map_entries: r.gauge("kube_bpf_proxy_map_entries", "Entries in a BPF map"),
            map_max_entries: r.gauge("kube_bpf_proxy_map_max_entries", "Capacity of a BPF map"),
            map_memlock: r.gauge(
                "kube_bpf_proxy_map_memlock_bytes",
                "Kernel memory a BPF map takes (bpftool's memlock)",
            ),
            map_evictions: r.gauge(
                "kube_bpf_proxy_map_evictions",
                "Socket records evicted from a full LRU map",
            ),
            datapath_events: r.counter(
                "kube_bpf_proxy_datapath_events_total",
                "Datapath events by reason, summed over CPUs",
            ),
            pod_interfaces: r.gauge(
                "kube_bpf_proxy_pod_interfaces",
                "Pod-facing interfaces carrying the tc program",
            ),
            interface_attach_failures: r.counter(
                "kube_bpf_proxy_interface_attach_failures_total",
                "Failed attempts to attach the tc program to an interface, by reason",
            ),
            pod_endpoints_waiting: r.gauge(
                "kube_bpf_proxy_local_endpoints_waiting_for_interface",
                "Local endpoints left out of tc-translated traffic until their interface carries the program",
            ),
            drift_repairs: r.counter(
                "kube_bpf_proxy_drift_repairs_total",
                "Read-backs of the maps that found them different from what the agent wrote",
            ),
            netns_sources: r.gauge(
                "kube_bpf_proxy_network_namespaces_with_source",
                "Network namespaces whose source address the socket hooks know, for loadBalancerSourceRanges",
            ),
            build_info: r.gauge(
                "kube_bpf_proxy_build_info",
                "Always 1; the version label is the agent's version",
            ),
            registry: r,
            families,
        };
        m.build_info.with(&[("version", version)]).set(1.0);
        m.sync_failures.with(&[]);
        m.pod_interfaces.with(&[]);
        m.pod_endpoints_waiting.with(&[]);
        m.netns_sources.with(&[]);
        m.drift_repairs.with(&[]);
        m.healthcheck_bind_failures.with(&[]);
        m.set_healthcheck_ports(0, 0);
        for kind in REJECTED_KINDS {
            m.rejected_objects.with(&[("kind", kind)]);
        }
        for &f in &m.families {
            let fam = [("ip_family", ip_family_name(f))];
            m.sync_duration.with(&fam);
            m.network_programming_duration.with(&fam);
            m.last_sync_timestamp.with(&fam);
            m.last_queued_timestamp.with(&fam);
            m.endpoint_changes.with(&fam);
            m.service_changes.with(&fam);
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

    /// Everything, in the text exposition format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        self.registry.render()
    }

    fn each_family(&self, f: impl Fn(&[(&str, &str)])) {
        for &family in &self.families {
            f(&[("ip_family", ip_family_name(family))]);
        }
    }

    /// A sync attempt finished after `duration`: observed in the duration histogram whether
    /// or not it succeeded (as kube-proxy does); success sets the last-sync timestamp to now,
    /// failure counts in kube_bpf_proxy_sync_failures_total.
    pub fn observe_sync(&self, duration: Duration, ok: bool) {
        self.observe_sync_at(duration, ok, SystemTime::now());
    }

    /// [`Metrics::observe_sync`] with an explicit clock.
    pub fn observe_sync_at(&self, duration: Duration, ok: bool, now: SystemTime) {
        self.each_family(|l| {
            self.sync_duration.with(l).observe_duration(duration);
            if ok {
                self.last_sync_timestamp.with(l).set_to_time(now);
            }
        });
        if !ok {
            self.sync_failures.with(&[]).inc();
        }
    }

    /// A change arrived and a sync was requested at `now`.
    pub fn observe_queued(&self, now: SystemTime) {
        self.each_family(|l| self.last_queued_timestamp.with(l).set_to_time(now));
    }

    /// Network programming latency of one EndpointSlice change of `family`: now minus its
    /// endpoints.kubernetes.io/last-change-trigger-time, after the sync that programmed it
    /// (semantics 11.3: skip deletions and trigger times before the agent started).
    pub fn observe_programming_latency(&self, family: IpFamily, latency: Duration) {
        self.network_programming_duration
            .with(&[("ip_family", ip_family_name(family))])
            .observe_duration(latency);
    }

    /// `n` Service add/update/delete events were received (counted for every family, as
    /// kube-proxy's per-family proxiers each see every Service event).
    pub fn add_service_changes(&self, n: u64) {
        self.each_family(|l| self.service_changes.with(l).inc_by(n));
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
                .set(n as f64);
        }
    }

    /// `n` objects of `kind` are currently rejected.
    pub fn set_rejected(&self, kind: &str, n: u64) {
        self.rejected_objects.with(&[("kind", kind)]).set(n as f64);
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
        for (labels, gauge) in self.rejected_objects.series() {
            if labels
                .get("kind")
                .is_some_and(|k| !per_kind.contains_key(k))
            {
                gauge.set(0.0);
            }
        }
        for (kind, n) in per_kind {
            self.set_rejected(kind, n);
        }
    }

    /// A write to BPF map `map` failed.
    pub fn map_update_error(&self, map: &str) {
        self.map_update_errors.with(&[("map", map)]).inc();
    }

    /// BPF map `map` holds `entries` of at most `max`.
    pub fn set_map_fill(&self, map: &str, entries: u64, max: u64) {
        self.map_entries.with(&[("map", map)]).set(entries as f64);
        self.map_max_entries.with(&[("map", map)]).set(max as f64);
    }

    /// Absolute datapath event totals per reason (per-CPU BPF counters already summed).
    pub fn set_datapath_totals(&self, totals: &[(&str, u64)]) {
        for (reason, total) in totals {
            self.datapath_events
                .with(&[("reason", reason)])
                .set_total(*total);
        }
    }

    /// Health check servers running and wanted-but-unbound after the last sync.
    pub fn set_healthcheck_ports(&self, serving: u64, failing: u64) {
        for (state, n) in [("serving", serving), ("failing", failing)] {
            self.healthcheck_ports
                .with(&[("state", state)])
                .set(n as f64);
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
        ("kube_bpf_proxy_sync_failures_total", "counter", &[]),
        ("kube_bpf_proxy_rejected_objects", "gauge", &["kind"]),
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
        ("kube_bpf_proxy_drift_repairs_total", "counter", &[]),
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
        "kube_bpf_proxy_healthcheck_bind_failures_total",
        "kube_bpf_proxy_healthcheck_ports{state=\"failing\"}",
        "kube_bpf_proxy_healthcheck_ports{state=\"serving\"}",
        "kube_bpf_proxy_local_endpoints_waiting_for_interface",
        "kube_bpf_proxy_network_namespaces_with_source",
        "kube_bpf_proxy_pod_interfaces",
        "kube_bpf_proxy_rejected_objects{kind=\"EndpointSlice\"}",
        "kube_bpf_proxy_rejected_objects{kind=\"Service\"}",
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
        "kubeproxy_sync_proxy_rules_service_changes_total{ip_family=\"IPv4\"}",
        "kubeproxy_sync_proxy_rules_service_changes_total{ip_family=\"IPv6\"}",
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

    #[test]
    fn counter_gauge_render_with_sorted_labels() {
        let r = Registry::new();
        let c = r.counter("a_total", "A counter.");
        let g = r.gauge("b", "A gauge.");
        c.with(&[("z", "1"), ("a", "2")]).inc_by(3);
        c.with(&[("a", "2"), ("z", "1")]).inc(); // same series
        c.with(&[("a", "1"), ("z", "1")]).inc();
        g.with(&[]).set(2.5);
        g.with(&[]).add(-1.0);
        assert_eq!(
            r.render(),
            "# HELP a_total A counter.\n\
             # TYPE a_total counter\n\
             a_total{a=\"1\",z=\"1\"} 1\n\
             a_total{a=\"2\",z=\"1\"} 4\n\
             # HELP b A gauge.\n\
             # TYPE b gauge\n\
             b 1.5\n"
        );
    }

    #[test]
    fn families_without_series_are_omitted() {
        let r = Registry::new();
        let c = r.counter("c_total", "C.");
        assert_eq!(r.render(), "");
        c.with(&[("x", "y")]);
        assert_eq!(
            r.render(),
            "# HELP c_total C.\n# TYPE c_total counter\nc_total{x=\"y\"} 0\n"
        );
        assert!(c.remove(&[("x", "y")]));
        assert!(!c.remove(&[("x", "y")]));
        assert_eq!(r.render(), "");
    }

    #[test]
    fn escaping() {
        let r = Registry::new();
        let g = r.gauge("e", "Help with \\ backslash\nand newline, \"quotes\" kept.");
        g.with(&[("v", "a\\b\"c\nd")]).set(1.0);
        assert_eq!(
            r.render(),
            "# HELP e Help with \\\\ backslash\\nand newline, \"quotes\" kept.\n\
             # TYPE e gauge\n\
             e{v=\"a\\\\b\\\"c\\nd\"} 1\n"
        );
    }

    #[test]
    fn special_floats() {
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(0.001), "0.001");
        assert_eq!(format_float(-2.0), "-2");
        assert_eq!(format_float(1_700_000_000.25), "1700000000.25");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let r = Registry::new();
        let h = r.histogram("h_seconds", "H.", &[1.0, 0.5, f64::INFINITY, 0.5]);
        let s = h.with(&[("k", "v")]);
        s.observe(0.25);
        s.observe(0.5); // upper bounds are inclusive
        s.observe(1.0);
        s.observe(4.0);
        s.observe(f64::NAN); // ignored
        assert_eq!(
            r.render(),
            "# HELP h_seconds H.\n\
             # TYPE h_seconds histogram\n\
             h_seconds_bucket{k=\"v\",le=\"0.5\"} 2\n\
             h_seconds_bucket{k=\"v\",le=\"1\"} 3\n\
             h_seconds_bucket{k=\"v\",le=\"+Inf\"} 4\n\
             h_seconds_sum{k=\"v\"} 5.75\n\
             h_seconds_count{k=\"v\"} 4\n"
        );
        let unlabeled = r.histogram("u", "U.", &[1.0]);
        unlabeled
            .with(&[])
            .observe_duration(Duration::from_millis(500));
        let text = r.render();
        assert!(
            text.contains("u_bucket{le=\"1\"} 1\nu_bucket{le=\"+Inf\"} 1\nu_sum 0.5\nu_count 1\n")
        );
        check_exposition(&text);
    }

    #[test]
    fn bucket_layouts_match_kube_proxy() {
        let sync = sync_duration_buckets();
        assert_eq!(sync.len(), 15);
        let shown: Vec<String> = sync.iter().map(|b| format_float(*b)).collect();
        assert_eq!(shown[0], "0.001");
        assert_eq!(shown[1], "0.002");
        assert_eq!(shown[10], "1.024");
        assert_eq!(shown[14], "16.384");

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
        assert_eq!(get("Service"), 2.0);
        assert_eq!(get("EndpointSlice"), 1.0);
        assert_eq!(get("Gateway"), 1.0);
        m.set_rejected_problems(&[p("Service default/b")]);
        assert_eq!(get("Service"), 1.0);
        assert_eq!(get("EndpointSlice"), 0.0);
        assert_eq!(get("Gateway"), 0.0);
        // No families: no ip_family series, but the rest renders.
        let text = m.render();
        check_exposition(&text);
        assert!(!text.contains("ip_family"));
        assert!(text.contains("kube_bpf_proxy_sync_failures_total 0\n"));
    }

    #[test]
    fn concurrent_updates() {
        let m = Arc::new(Metrics::new("v", &[IpFamily::V4]));
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
        let snap = m.sync_duration.with(&[("ip_family", "IPv4")]).snapshot();
        assert_eq!(snap.count, 4000);
        assert_eq!(snap.buckets.last().unwrap().1, 4000);
    }
}
