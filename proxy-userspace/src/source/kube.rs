//! The Kubernetes API: Services and EndpointSlices in all namespaces, and this node's Node
//! object, each followed by a kube-runtime watcher feeding a store of our own ([`Objects`]);
//! also this node's Pods and every Namespace, for the socket-layer opt-out (`socklb`), and the
//! ServiceCIDRs (semantics 3.12).
//!
//! Every snapshot is built from the stores, never accumulated from events, so it always
//! equals what the API server last told us. The first one is sent once the initial lists of
//! Services, EndpointSlices and the Node are complete; after that, one per change (the agent
//! coalesces bursts). Pods and Namespaces do not hold the first sync back: an API server (or
//! RBAC) that does not serve them leaves every pod with socket-layer translation, logged.
//! ServiceCIDRs do, unless the API server (or RBAC) does not serve them: then there are none,
//! logged, and unallocated Service addresses are not dropped.
//!
//! Failures never reach the agent as data: a watcher that cannot list or watch keeps its store
//! as it was and retries after a backoff of 0.4 s doubling to 3 s, with jitter; the first
//! watcher to get an answer again wakes the others, so all three resume together. A watch whose
//! resourceVersion has expired (410 Gone, as after a long outage) relists at once, and the store
//! is swapped only when the relist is complete. After an outage the source has the new state
//! about as soon as the API server answers (at most one backoff, 3 s, plus the lists). 429s and
//! 503s take the same backoff (kube's own retry layer is off), or the wait the server asks for,
//! up to 30 s: its Status' `retryAfterSeconds`, or the `Retry-After` header of an answer without
//! one (plain text from a proxy in front of it). A list that gets no answer for 60 s is started again, and a watch
//! request the server answers with HTTP 410 relists.
//!
//! An object version this build cannot decode does not stop the watch and does not replace the
//! last version of that object that could be decoded: the datapath keeps it. One never decoded
//! is left out. Either way it is logged (once per version) and counted.
//!
//! # Which API server
//!
//! `--kubeconfig PATH` (with `--master URL`, if given, replacing its server); else `--master URL`
//! alone (plain `http://` works, e.g. through `kubectl proxy`); else the in-cluster
//! configuration; else `$KUBECONFIG` / `~/.kube/config`. The configuration is read when the
//! source is created, so a missing file fails at startup.
//!
//! The in-cluster configuration reaches the API server through `KUBERNETES_SERVICE_HOST`, which
//! is normally the ClusterIP of the `kubernetes` Service, a Service this proxy programs itself:
//! on a node where the proxy is not running yet, nothing translates that address. A DaemonSet
//! should therefore pass `--master https://<API server address>:6443`; with an `https` URL and a
//! mounted service account, the pod's token and CA are used for it.

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{Arc, mpsc::Sender},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    core::{DeserializeGuard, error_boundary::InvalidObject},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;

use super::{NodeAddresses, Source, addresses_of};
use crate::{
    metrics::{Metrics, Series},
    objects::{HIDING_LABELS, PodRef, Slice},
    snapshot::{Changes, NodeInfo, Snapshot},
};

pub struct KubeSource {
    config: Config,
    node_name: String,
    metrics: Option<Arc<Metrics>>,
    /// Where the addresses of every Node object go, when asked for (`with_node_addresses`).
    node_addresses: Option<std::sync::Arc<NodeAddresses>>,
}

impl KubeSource {
    /// `--master` and `--kubeconfig` as given on the command line; see the module docs for how
    /// they combine. Reads the configuration now, so a missing kubeconfig or service account
    /// fails at startup rather than in the source thread. Must not be called from inside an
    /// async runtime.
    pub fn from_flags(
        master: Option<&str>,
        kubeconfig: Option<PathBuf>,
        node_name: String,
    ) -> anyhow::Result<Self> {
        let master = master.map(parse_master).transpose()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the tokio runtime")?;
        let config = runtime.block_on(resolve(master, kubeconfig))?;
        Ok(KubeSource::with_config(config, node_name))
    }

    /// Uses `config` as it is, e.g. `kube::Config::new(url)` for an API server without
    /// authentication.
    pub fn with_config(config: Config, node_name: String) -> Self {
        KubeSource {
            config,
            node_name,
            metrics: None,
            node_addresses: None,
        }
    }

    /// Counts list/watch errors and undecodable objects in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Also keeps `book` equal to the addresses of every Node object (`follow_node_addresses`).
    pub fn with_node_addresses(mut self, book: std::sync::Arc<NodeAddresses>) -> Self {
        self.node_addresses = Some(book);
        self
    }
}

fn parse_master(url: &str) -> anyhow::Result<http::Uri> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("--master {url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => Ok(uri),
        _ => bail!("--master {url:?}: expected http://HOST[:PORT] or https://HOST[:PORT]"),
    }
}

/// The client configuration for the flags, in the order the module docs give.
async fn resolve(master: Option<http::Uri>, kubeconfig: Option<PathBuf>) -> anyhow::Result<Config> {
    if let Some(path) = kubeconfig {
        let file = Kubeconfig::read_from(&path)
            .with_context(|| format!("read kubeconfig {}", path.display()))?;
        let mut config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("kubeconfig {}", path.display()))?;
        if let Some(master) = master {
            config.cluster_url = master;
        }
        log::info!("kubernetes: using kubeconfig {}", path.display());
        return Ok(config);
    }
    if let Some(master) = master {
        // A bearer token must not travel over plain HTTP; `kubectl proxy` adds its own.
        if master.scheme_str() == Some("https") {
            match Config::incluster_dns() {
                Ok(mut config) => {
                    config.cluster_url = master;
                    log::info!("kubernetes: using the pod's service account with --master");
                    return Ok(config);
                }
                Err(e) => log::debug!("no service account for --master: {e}"),
            }
        }
        return Ok(Config::new(master));
    }
    match Config::incluster() {
        Ok(config) => {
            log::warn!(
                "kubernetes: in-cluster config reaches the API server at {}, usually the \
                 ClusterIP of the `kubernetes` Service, which this proxy programs itself; \
                 pass --master https://<API server address> so a node without a working \
                 proxy can still start",
                config.cluster_url
            );
            Ok(config)
        }
        Err(in_cluster) => {
            log::debug!("not in a cluster: {in_cluster}");
            let config = Config::infer().await.context(
                "no API server configured: pass --master URL or --kubeconfig PATH, run \
                 in a pod, or set up $KUBECONFIG / ~/.kube/config",
            )?;
            log::info!("kubernetes: using the default kubeconfig");
            Ok(config)
        }
    }
}

/// The watched kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services = 0,
    Slices = 1,
    Node = 2,
    Pods = 3,
    Namespaces = 4,
    ServiceCidrs = 5,
}

const KINDS: [Kind; 6] = [
    Kind::Services,
    Kind::Slices,
    Kind::Node,
    Kind::Pods,
    Kind::Namespaces,
    Kind::ServiceCidrs,
];

/// The kinds whose initial lists the first snapshot waits for. ServiceCIDRs too (a first sync
/// without them would delete the ranges an earlier agent wrote, and `verify` would report them
/// as drift), but an API server that does not serve them (before 1.33) or RBAC without them
/// counts as a list of none.
const GATING: [Kind; 4] = [Kind::Services, Kind::Slices, Kind::Node, Kind::ServiceCidrs];

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Services => "services",
            Kind::Slices => "endpointslices",
            Kind::Node => "node",
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::ServiceCidrs => "servicecidrs",
        })
    }
}

impl Kind {
    /// The resource name, as a metric label.
    fn resource(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::Slices => "endpointslices",
            Kind::Node => "nodes",
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::ServiceCidrs => "servicecidrs",
        }
    }
}

/// What one watcher step did to its store.
enum Step {
    /// An object was added, changed or deleted.
    Changed,
    /// A (re)list completed and its result replaced the store.
    Listed,
    /// A (re)list completed with the objects the store held already (an empty list into an
    /// empty store, a relist after 410 that found nothing changed).
    ListedSame,
    /// The API server answered, but the objects the snapshot is built from are as they were (an
    /// update that could not be decoded).
    Unchanged,
    /// Nothing visible yet (a relist in progress).
    Nothing,
    /// Listing or watching failed; the store is untouched and the watcher retries after a
    /// backoff.
    Failed(watcher::Error),
}

struct Update {
    kind: Kind,
    step: Step,
}

/// The first retry of a failed list or watch waits about this long; each further one twice as
/// long, up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(400);
/// The longest wait between retries. client-go's reflector (and kube-runtime's default) go up to
/// 30 s, plus jitter; since the proxy converges only when the retry comes, that meant a minute
/// of stale state after an outage. 3 s, with every node's retries spread by jitter, costs the
/// API server one request per kind and node every 2-3 s while it is down.
const RETRY_MAX: Duration = Duration::from_secs(3);

/// Exponential backoff with jitter: the n-th consecutive failure waits a random time in the upper
/// half of `RETRY_MIN * 2^n`, capped at [`RETRY_MAX`].
struct Backoff {
    ceiling: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { ceiling: RETRY_MIN }
    }

    fn reset(&mut self) {
        self.ceiling = RETRY_MIN;
    }

    /// The wait before the next retry.
    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (ceiling * 2).min(RETRY_MAX);
        ceiling.mul_f64(0.5 + 0.5 * random_fraction())
    }
}

/// A number in [0, 1) from std's per-process random hash keys (good enough for jitter).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher as _, RandomState};
    (RandomState::new().hash_one(0u8) >> 11) as f64 / (1u64 << 53) as f64
}

/// Two 410 Gone less than this apart: the second relist waits (see [`paced`]).
const RELIST_AGAIN_WITHIN: Duration = Duration::from_secs(10);

/// A list that has not moved on for this long (one page, or the watch that follows it, not
/// answered) has failed: the watcher is started afresh. A silent watch is normal; kube-runtime
/// ends one after 295 s and the client's read timeout ([`READ_TIMEOUT`]) covers a request that
/// never gets an answer at all.
const LIST_STALL: Duration = Duration::from_secs(60);

/// No byte from the API server for this long fails the request (a hung server, a half-open
/// connection). Longer than a healthy watch stays silent: the API server ends a watch after
/// kube-runtime's 290 s timeout, and kube-runtime gives up on it after 295 s.
const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// A connection to the API server not set up within this long is given up and tried again
/// after the backoff. kube's default (30 s) would leave a client whose SYNs went into a dark
/// path waiting out the kernel's SYN retries after the path came back.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalive on every connection to the API server: after this long without a packet from
/// it, probes go out every [`KEEPALIVE_INTERVAL`], and [`KEEPALIVE_PROBES`] unanswered ones
/// (or an answer with a reset) fail the connection. A watch is silent while nothing changes, so
/// without probes a server that went away without a word (rebooted, its address moved to
/// another machine, a network path that went dark) is noticed only by [`READ_TIMEOUT`], five
/// minutes in which no change reaches the maps. client-go (kube-proxy's) pings its HTTP/2
/// connections after 30 s of silence and gives up 15 s later.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

/// Longest time data sent to the API server may stay unacknowledged (`TCP_USER_TIMEOUT`): a
/// request written into a dark path fails after this, not after the kernel's fifteen minutes
/// of retransmissions. It also bounds the probes above.
const UNACKED_TIMEOUT: Duration = Duration::from_secs(30);

/// Watch requests of each kind the API server answered with a 2xx status. kube-runtime reports
/// nothing when a watch starts, nor for bookmarks: after an outage in which nothing changed,
/// a resumed watch yields no item, and only this tells that the kind is answered again.
///
/// Also the furthest deadline a `Retry-After` header of a 429 or 503 asked for: the wait a proxy
/// or load balancer in front of the API server asks for with a plain-text answer carries no
/// Status, so kube's error has no `retryAfterSeconds` and only the header tells it. Every
/// watcher's next failure waits for what is left of it (the API server is one for all of
/// them); it expires by itself.
#[derive(Default)]
struct Answered {
    watches: [std::sync::atomic::AtomicU64; KINDS.len()],
    retry_until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// An unreadable `Retry-After` was logged (once: every watcher's retry would bring it).
    unreadable_logged: std::sync::atomic::AtomicBool,
}

impl Answered {
    fn get(&self, kind: Kind) -> u64 {
        self.watches[kind as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes the `Retry-After` header of a 429 or 503 answer, if it has one that can be read
    /// (seconds, or an HTTP date).
    fn note_retry_after(&self, status: http::StatusCode, headers: &http::HeaderMap) {
        if status != http::StatusCode::TOO_MANY_REQUESTS
            && status != http::StatusCode::SERVICE_UNAVAILABLE
        {
            return;
        }
        let Some(value) = headers.get(http::header::RETRY_AFTER) else {
            return;
        };
        let Some(wait) = value.to_str().ok().and_then(parse_retry_after) else {
            if !self
                .unreadable_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                log::warn!(
                    "kubernetes: a {status} answer's Retry-After {value:?} cannot be read; \
                     ignored (logged once)"
                );
            }
            return;
        };
        // Capped here too, so that a huge value cannot overflow the deadline.
        let until = tokio::time::Instant::now() + wait.min(RETRY_AFTER_MAX);
        let mut held = self.retry_until.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none_or(|h| h < until) {
            *held = Some(until);
        }
    }

    /// What is left of the furthest wait a `Retry-After` header asked for.
    fn asked_wait(&self) -> Duration {
        let held = *self.retry_until.lock().unwrap_or_else(|e| e.into_inner());
        held.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(tokio::time::Instant::now())
        })
    }

    /// Counts a watch of the collection `uri` names, if it is one of `KINDS`.
    fn count(&self, uri: &http::Uri) {
        let watch = uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let resource = uri.path().rsplit('/').next().unwrap_or("");
        if let Some(kind) = KINDS.iter().find(|k| watch && k.resource() == resource) {
            self.watches[*kind as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A `Retry-After` value (RFC 9110 10.2.3): delay seconds, or an HTTP date (a wait until then;
/// none when it has passed).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// What the watchers' pacing shares: `wake`, bumped when the API server answers a watcher
/// again after failures (the others then retry at once), and what it answered (`Answered`: the
/// wait a `Retry-After` header asked for).
struct Pacing {
    wake: tokio::sync::watch::Sender<u64>,
    answered: Arc<Answered>,
}

/// Counts the answered watch requests in [`Answered`], and notes `Retry-After` headers.
#[derive(Clone)]
struct CountAnswers<S> {
    inner: S,
    answered: Option<Arc<Answered>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for CountAnswers<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let uri = request.uri().clone();
        let answered = self.answered.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if let Some(answered) = answered {
                if response.status().is_success() {
                    answered.count(&uri);
                } else {
                    answered.note_retry_after(response.status(), response.headers());
                }
            }
            Ok(response)
        })
    }
}

/// The API client: kube's own stack (base URI, authentication, extra headers, TLS, timeouts)
/// over a connector that sets TCP keepalive ([`KEEPALIVE_IDLE`]) and [`UNACKED_TIMEOUT`] on
/// its sockets, which kube's `Client::try_from` does not. Through a proxy (`proxy-url` in the
/// kubeconfig) kube's default client is used, without them.
fn api_client(config: Config, answered: Option<Arc<Answered>>) -> anyhow::Result<Client> {
    use hyper_util::{client::legacy::connect::HttpConnector, rt::TokioExecutor};
    use kube::client::ConfigExt as _;
    use tower::{BoxError, ServiceBuilder};

    if let Some(proxy) = &config.proxy_url {
        log::info!(
            "kubernetes: reaching the API server through the proxy {proxy}: kube's default \
             client, without TCP keepalive (a connection that goes dark is noticed after {}s)",
            READ_TIMEOUT.as_secs()
        );
        return Client::try_from(config).context("build the API client");
    }
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_keepalive(Some(KEEPALIVE_IDLE));
    tcp.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    tcp.set_keepalive_retries(Some(KEEPALIVE_PROBES));
    tcp.set_tcp_user_timeout(Some(UNACKED_TIMEOUT));
    let tls = config
        .rustls_https_connector_with_connector(tcp)
        .context("TLS for the API client")?;
    let mut timed = hyper_timeout::TimeoutConnector::new(tls);
    timed.set_connect_timeout(config.connect_timeout);
    timed.set_read_timeout(config.read_timeout);
    timed.set_write_timeout(config.write_timeout);
    timed.set_reset_reader_on_write(config.reset_reader_on_write);
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(timed);
    let service = ServiceBuilder::new()
        .layer_fn(move |inner| CountAnswers {
            inner,
            answered: answered.clone(),
        })
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().context("API client authentication")?)
        .layer(config.extra_headers_layer().context("API client headers")?)
        .map_err(BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}

/// The longest wait a `Retry-After` (the Status' `retryAfterSeconds`, as the API server's
/// priority and fairness sends with a 429) can ask for.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);

/// Whether an item shows the watcher listing (its answers come at once, so a stall is a
/// failure: `Some(true)`) or watching (silence is normal: `Some(false)`).
trait Phase {
    fn listing(&self) -> Option<bool>;
}

impl<K> Phase for watcher::Event<K> {
    fn listing(&self) -> Option<bool> {
        match self {
            watcher::Event::Init | watcher::Event::InitApply(_) => Some(true),
            watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                Some(false)
            }
        }
    }
}

/// Starts a watcher afresh (from a list).
type Restart<T> = Box<dyn Fn() -> BoxStream<'static, Result<T, watcher::Error>> + Send>;

/// Paces the stream `start` gives, a watcher's: after a failure, the next item is asked for
/// only after the backoff, which ends early when another watcher finds the API server
/// answering again (`pacing.wake`); or, when it is longer, after the wait the API server asked
/// for (its Status' `retryAfterSeconds`, or a `Retry-After` header: [`Answered`]), up to
/// [`RETRY_AFTER_MAX`], which no other watcher's answer cuts short.
/// A 410 Gone is an answer, not a failure: the watcher relists at once, unless the previous 410
/// came less than [`RELIST_AGAIN_WITHIN`] before (a server whose watches expire as soon as they
/// start would otherwise be relisted in a loop); such relists wait a backoff of their own. Any
/// answer resets the failure backoff and, after failures, wakes the other watchers.
///
/// The watcher is started afresh (`start` again) when its list stalls ([`LIST_STALL`]: the
/// stall is reported as a failed list) and when the API server answers a watch request itself
/// with 410, which kube-runtime would otherwise ask again with the same expired
/// resourceVersion for ever (it relists only after a 410 inside a watch stream).
///
/// `optional`: a kind the proxy can run without (Pods, Namespaces): a 403 or 404 for it waits
/// [`REFUSED_RETRY`] and is not cut short by other watchers' recovery.
fn paced<T: Phase + Send + 'static>(
    start: Restart<T>,
    pacing: Arc<Pacing>,
    optional: bool,
) -> BoxStream<'static, Result<T, watcher::Error>> {
    struct Pace<T> {
        stream: BoxStream<'static, Result<T, watcher::Error>>,
        start: Restart<T>,
        listing: bool,
        backoff: Backoff,
        relist_backoff: Backoff,
        last_expired: Option<tokio::time::Instant>,
        wait: Option<Duration>,
        /// `wait` is what the server asked for: no wake-up cuts it short.
        asked: bool,
        failing: bool,
        pacing: Arc<Pacing>,
        woken: tokio::sync::watch::Receiver<u64>,
    }
    let woken = pacing.wake.subscribe();
    let pace = Pace {
        stream: start(),
        start,
        listing: true,
        backoff: Backoff::new(),
        relist_backoff: Backoff::new(),
        last_expired: None,
        wait: None,
        asked: false,
        failing: false,
        pacing,
        woken,
    };
    futures::stream::unfold(pace, move |mut p| async move {
        if let Some(wait) = p.wait.take() {
            if wait >= REFUSED_RETRY || std::mem::take(&mut p.asked) {
                tokio::time::sleep(wait).await;
            } else {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = p.woken.changed() => log::debug!("kubernetes: API server answering, retrying now"),
                }
            }
        }
        let item = if p.listing {
            match tokio::time::timeout(LIST_STALL, p.stream.next()).await {
                Ok(item) => item?,
                Err(_) => {
                    p.stream = (p.start)();
                    Err(stalled())
                }
            }
        } else {
            p.stream.next().await?
        };
        match &item {
            Ok(event) => {
                if let Some(listing) = event.listing() {
                    p.listing = listing;
                }
            }
            // A watch request answered with 410: list afresh.
            Err(
                watcher::Error::WatchStartFailed(kube::Error::Api(status))
                | watcher::Error::WatchFailed(kube::Error::Api(status)),
            ) if status.code == 410 => {
                p.stream = (p.start)();
                p.listing = true;
            }
            // kube-runtime relists after these itself.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => p.listing = true,
            // kube-runtime would resume from the same place again, where no change can be
            // trusted to arrive: a resourceVersion the server does not have (restored or
            // replaced with a younger history), or a watch event that could not be read (a
            // change lost with it). List afresh, as client-go does.
            Err(e) if needs_relist(e) => {
                p.stream = (p.start)();
                p.listing = true;
            }
            Err(watcher::Error::InitialListFailed(_)) => p.listing = true,
            Err(_) => {}
        }
        if let Err(e) = &item
            && optional
            && is_refused(e)
        {
            // Answered, so no outage: the others are not held back or woken.
            p.wait = Some(REFUSED_RETRY);
            return Some((item, p));
        }
        let expired = match &item {
            Err(e) if !is_expired(e) => {
                // Wake-ups from before this failure must not cut its backoff.
                p.woken.borrow_and_update();
                p.failing = true;
                let asked = asked_wait(e, &p.pacing.answered);
                let backoff = p.backoff.next_delay();
                p.asked = asked > backoff;
                p.wait = Some(backoff.max(asked));
                return Some((item, p));
            }
            Err(_) => true,
            Ok(_) => false,
        };
        p.backoff.reset();
        if std::mem::take(&mut p.failing) {
            p.pacing.wake.send_modify(|n| *n += 1);
        }
        if expired {
            let now = tokio::time::Instant::now();
            match p.last_expired.replace(now) {
                Some(last) if now.duration_since(last) < RELIST_AGAIN_WITHIN => {
                    p.wait = Some(p.relist_backoff.next_delay());
                }
                _ => p.relist_backoff.reset(),
            }
        }
        Some((item, p))
    })
    .boxed()
}

/// A watch failure after which resuming from the last resourceVersion would lose changes:
/// the server's "Too large resource version" (a 504 whose cause is `ResourceVersionTooLarge`:
/// its history no longer reaches the version, after an etcd restore or a new cluster behind
/// the same address), or a watch event that is no watch event (malformed JSON, or an event
/// type this client does not know, which kube decodes as a Status without a code).
fn needs_relist(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchFailed(kube::Error::SerdeError(_)) => true,
        watcher::Error::WatchFailed(kube::Error::Api(status)) if status.code == 0 => true,
        _ => status_of(e).is_some_and(|s| {
            s.code == 504
                && (s.details.as_ref().is_some_and(|d| {
                    d.causes
                        .iter()
                        .any(|c| c.reason == "ResourceVersionTooLarge")
                }) || s.message.contains("Too large resource version"))
        }),
    }
}

/// The failure a stalled list is reported as.
fn stalled() -> watcher::Error {
    watcher::Error::InitialListFailed(kube::Error::Service(Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer for {LIST_STALL:?} while listing; starting the list again"),
    ))))
}

/// The wait the API server asked for with failure `e`, up to [`RETRY_AFTER_MAX`]: its Status'
/// `retryAfterSeconds`, or what is left of the furthest wait a `Retry-After` header asked for.
fn asked_wait(e: &watcher::Error, answered: &Answered) -> Duration {
    retry_after(e)
        .unwrap_or_default()
        .max(answered.asked_wait())
        .min(RETRY_AFTER_MAX)
}

/// The wait the API server asked for with a failure (`retryAfterSeconds` of its Status).
fn retry_after(e: &watcher::Error) -> Option<Duration> {
    let seconds = status_of(e)?.details.as_ref()?.retry_after_seconds;
    (seconds > 0).then(|| Duration::from_secs(u64::from(seconds)))
}

/// One watcher, paced by [`paced`]. Objects are decoded behind a [`DeserializeGuard`], so one
/// that cannot be decoded arrives as such instead of failing the list or watch.
fn follow<K>(
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    pacing: Arc<Pacing>,
    optional: bool,
) -> BoxStream<'static, WatcherItem<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    let start = move || {
        watcher(api.clone(), config.clone())
            // Nobody here reads managedFields; they are often the bulk of an object.
            .modify(|o: &mut DeserializeGuard<K>| o.meta_mut().managed_fields = None)
            .boxed()
    };
    paced(Box::new(start), pacing, optional)
}

type WatcherItem<K> = Result<watcher::Event<DeserializeGuard<K>>, watcher::Error>;

fn qualified_name(meta: &ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or("<unnamed>");
    match meta.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// `e` and its sources, joined like anyhow's `{:#}`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A 410 Gone: routine, the watcher relists.
fn is_expired(e: &watcher::Error) -> bool {
    status_code(e) == Some(410)
}

/// The HTTP status the API server answered a failed list or watch with, if it answered.
fn status_code(e: &watcher::Error) -> Option<u16> {
    status_of(e).map(|s| s.code)
}

/// The Status the API server answered a failed list or watch with, if it answered.
fn status_of(e: &watcher::Error) -> Option<&kube::core::Status> {
    match e {
        watcher::Error::WatchError(status) => Some(status),
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status),
        _ => None,
    }
}

/// A kind the agent may not read (403: RBAC without it) or the API server does not serve (404):
/// a lasting condition, not an outage.
fn is_refused(e: &watcher::Error) -> bool {
    matches!(status_code(e), Some(403 | 404))
}

/// How long an optional kind (Pods, Namespaces) waits after a 403 or 404 before asking again.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// Which call failed, as a metric label.
fn operation(e: &watcher::Error) -> &'static str {
    match e {
        watcher::Error::InitialListFailed(_) => "list",
        _ => "watch",
    }
}

/// An object's place in a store: namespace ("" for cluster-scoped objects) and name. The order
/// is the snapshot's, so equal states give equal snapshots.
type Key = (String, String);

fn key_of(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The objects of one kind as the API server last described them, following the watcher's
/// protocol (`Init`, `InitApply`..., `InitDone` swap in a relist whole; `Apply` and `Delete`
/// change one object), except that a version that cannot be decoded does not replace the last
/// decodable version of the same object (same uid): the datapath keeps what it has rather than
/// losing a Service, its endpoints or the node's zone over one bad write. Such an object that
/// was never decoded is left out. Each undecodable version is logged and counted once, however
/// often relists bring it back. A deletion always deletes.
/// Objects and undecodable versions of a relist in progress.
type Relist<S> = (BTreeMap<Key, Arc<S>>, BTreeMap<Key, String>);

///
/// `K` is the kind as the API serves it, `S` what is kept of each object (`Slice` for
/// EndpointSlices: what the proxy reads of them; the object itself for the others).
struct Objects<K, S = K> {
    kind: Kind,
    /// Shared with the snapshots: an object that does not change keeps its `Arc`, which is how
    /// the agent's compile cache knows it unchanged.
    objects: BTreeMap<Key, Arc<S>>,
    /// Objects whose newest version cannot be decoded, with that version's resourceVersion.
    undecodable: BTreeMap<Key, String>,
    /// A relist in progress, swapped in at `InitDone`.
    relist: Option<Relist<S>>,
    metrics: Option<Arc<Metrics>>,
    /// Changes taken in since the last snapshot (`Changes`).
    changes: Changes,
    served: std::marker::PhantomData<fn(K)>,
}

/// How a stored object compares with its next version: an update equal in what the proxy
/// keeps (a Pod's status changing, say) keeps the stored `Arc` and sends no snapshot.
trait Kept {
    fn same_as(&self, _next: &Self) -> bool {
        false
    }

    /// Notes this object as changed (`Changes`): nothing but for Services and EndpointSlices.
    fn note(&self, _changes: &mut Changes) {}

    /// Counts an event of this object (`Changes`): nothing but for Services and
    /// EndpointSlices.
    fn event(&self, _changes: &mut Changes) {}

    /// Counts the event that made this object of `old` (none: an addition).
    fn event_from(&self, _old: Option<&Self>, changes: &mut Changes) {
        self.event(changes);
    }

    /// Whether a new version differs from this one in what the proxy reads (counted as a
    /// change, `Changes`).
    fn differs(&self, _next: &Self) -> bool {
        true
    }
}

/// A Service another service proxy serves is kept for its ClusterIPs, but makes no change
/// kube-proxy would count (its watch never sees it).
impl Kept for Service {
    fn note(&self, changes: &mut Changes) {
        if !crate::objects::served_elsewhere(self) {
            changes.service(self);
        }
    }

    fn event(&self, changes: &mut Changes) {
        if !crate::objects::served_elsewhere(self) {
            changes.service_event();
        }
    }

    /// A Service that gains the other proxy's label left kube-proxy's watch: a deletion
    /// there, counted.
    fn event_from(&self, old: Option<&Self>, changes: &mut Changes) {
        let left = old.is_some_and(|o| !crate::objects::served_elsewhere(o));
        if left || !crate::objects::served_elsewhere(self) {
            changes.service_event();
        }
    }

    fn differs(&self, next: &Self) -> bool {
        crate::snapshot::service_differs(self, next)
    }
}

impl Kept for Slice {
    fn note(&self, changes: &mut Changes) {
        changes.slice(self);
    }

    fn event(&self, changes: &mut Changes) {
        changes.slice_event(self);
    }

    fn differs(&self, next: &Self) -> bool {
        crate::snapshot::slice_differs(self, next)
    }
}
impl Kept for Node {}

impl Kept for ServiceCIDR {
    fn same_as(&self, next: &Self) -> bool {
        self.metadata.uid == next.metadata.uid && self.spec == next.spec
    }
}

impl Kept for Namespace {
    fn same_as(&self, next: &Self) -> bool {
        self.metadata.uid == next.metadata.uid && self.metadata.labels == next.metadata.labels
    }
}

impl Kept for PodRef {
    fn same_as(&self, next: &Self) -> bool {
        self.metadata.uid == next.metadata.uid
            && self.node_name == next.node_name
            && self.host_network == next.host_network
            && self.ips == next.ips
    }
}

impl<K, S> Objects<K, S>
where
    K: Resource<DynamicType = ()> + Clone,
    S: Resource<DynamicType = ()> + From<K> + Kept,
{
    fn new(kind: Kind, metrics: Option<Arc<Metrics>>) -> Objects<K, S> {
        let objects = Objects {
            kind,
            objects: BTreeMap::new(),
            undecodable: BTreeMap::new(),
            relist: None,
            metrics,
            changes: Changes::default(),
            served: std::marker::PhantomData,
        };
        objects.count_undecodable();
        objects
    }

    fn values(&self) -> impl Iterator<Item = &Arc<S>> {
        self.objects.values()
    }

    /// Stores an object as the proxy needs it: without managedFields (never read, often the
    /// largest part of an object). An object whose uid and resourceVersion are those of the
    /// stored one (a relist after a watch expired) keeps the stored `Arc`.
    fn stored(&self, mut object: K) -> Arc<S> {
        object.meta_mut().managed_fields = None;
        let key = key_of(object.meta());
        match self.objects.get(&key) {
            Some(old)
                if old.meta().uid == object.meta().uid
                    && old.meta().resource_version.is_some()
                    && old.meta().resource_version == object.meta().resource_version =>
            {
                Arc::clone(old)
            }
            _ => Arc::new(S::from(object)),
        }
    }

    fn apply(&mut self, event: watcher::Event<DeserializeGuard<K>>) -> Step {
        let step = match event {
            watcher::Event::Init => {
                self.relist = Some(Default::default());
                Step::Nothing
            }
            watcher::Event::InitApply(DeserializeGuard(object)) => {
                self.relist.get_or_insert_with(Default::default);
                let kept = match object {
                    Ok(object) => Some(self.stored(object)),
                    Err(invalid) => self.kept_for(&invalid),
                };
                if let (Some(object), Some((objects, _))) = (kept, &mut self.relist) {
                    objects.insert(key_of(object.meta()), object);
                }
                Step::Nothing
            }
            watcher::Event::InitDone => {
                let (objects, undecodable) = self.relist.take().unwrap_or_default();
                let mut same = objects.len() == self.objects.len();
                for (key, new) in &objects {
                    match self.objects.get(key) {
                        Some(old) if Arc::ptr_eq(old, new) || old.same_as(new) => {}
                        Some(old) => {
                            same = false;
                            new.event_from(Some(old), &mut self.changes);
                            if old.differs(new) {
                                old.note(&mut self.changes);
                                new.note(&mut self.changes);
                            }
                        }
                        None => {
                            same = false;
                            new.event(&mut self.changes);
                            new.note(&mut self.changes);
                        }
                    }
                }
                if !same {
                    for (key, old) in &self.objects {
                        if !objects.contains_key(key) {
                            old.event(&mut self.changes);
                            old.note(&mut self.changes);
                        }
                    }
                }
                self.objects = objects;
                self.undecodable = undecodable;
                if same { Step::ListedSame } else { Step::Listed }
            }
            watcher::Event::Apply(DeserializeGuard(Ok(object))) => {
                let key = key_of(object.meta());
                self.undecodable.remove(&key);
                let object = self.stored(object);
                match self.objects.get(&key) {
                    Some(old) if Arc::ptr_eq(old, &object) || old.same_as(&object) => {
                        Step::Unchanged
                    }
                    old => {
                        object.event_from(old.map(|o| &**o), &mut self.changes);
                        match old {
                            Some(old) if !old.differs(&object) => {}
                            Some(old) => {
                                old.note(&mut self.changes);
                                object.note(&mut self.changes);
                            }
                            None => object.note(&mut self.changes),
                        }
                        self.objects.insert(key, object);
                        Step::Changed
                    }
                }
            }
            watcher::Event::Apply(DeserializeGuard(Err(invalid))) => {
                let key = key_of(&invalid.metadata);
                match self.kept_for(&invalid) {
                    Some(_) => Step::Unchanged,
                    // A different object under the same name, or none: nothing to keep.
                    None => match self.objects.remove(&key) {
                        Some(old) => {
                            old.event(&mut self.changes);
                            old.note(&mut self.changes);
                            Step::Changed
                        }
                        None => Step::Unchanged,
                    },
                }
            }
            watcher::Event::Delete(object) => {
                let key = key_of(object.meta());
                self.undecodable.remove(&key);
                // Deleting an object never seen changes nothing (semantics 2.9).
                if let Some(old) = self.objects.remove(&key) {
                    old.event(&mut self.changes);
                    old.note(&mut self.changes);
                }
                Step::Changed
            }
        };
        self.count_undecodable();
        step
    }

    /// Logs and counts `invalid` (once per version) and records it as undecodable (in the relist
    /// in progress, if any); returns the last decodable version of the same object to use in
    /// its place, if there is one.
    fn kept_for(&mut self, invalid: &InvalidObject) -> Option<Arc<S>> {
        let meta = &invalid.metadata;
        let key = key_of(meta);
        let version = meta.resource_version.clone().unwrap_or_default();
        let kept = self
            .objects
            .get(&key)
            .filter(|o| o.meta().uid == meta.uid)
            .cloned();
        if self.undecodable.get(&key) != Some(&version) {
            let kind = K::kind(&());
            let name = qualified_name(meta);
            match &kept {
                Some(o) => log::warn!(
                    "kubernetes: {kind} {name} resourceVersion {version} cannot be decoded: {}; \
                     keeping resourceVersion {}, the last one that could",
                    invalid.error,
                    o.meta().resource_version.as_deref().unwrap_or("?")
                ),
                None => log::warn!(
                    "kubernetes: {kind} {name} resourceVersion {version} cannot be decoded: {}; \
                     left out until a version that can be decoded arrives",
                    invalid.error
                ),
            }
            if let Some(m) = &self.metrics {
                m.undecodable_objects_total.with(&[("kind", &kind)]).inc();
            }
        }
        match &mut self.relist {
            Some((_, undecodable)) => undecodable.insert(key, version),
            None => self.undecodable.insert(key, version),
        };
        kept
    }

    fn count_undecodable(&self) {
        if let Some(m) = &self.metrics {
            m.undecodable_objects
                .with(&[("kind", &K::kind(&()))])
                .set(self.undecodable.len() as u64);
        }
    }
}

struct Stores {
    services: Objects<Service>,
    slices: Objects<EndpointSlice, Slice>,
    nodes: Objects<Node>,
    pods: Objects<Pod, PodRef>,
    namespaces: Objects<Namespace>,
    service_cidrs: Objects<ServiceCIDR>,
}

impl Stores {
    /// The objects as they are now, with the changes taken in since the last snapshot.
    fn snapshot(&mut self, node_name: &str, pods_unknown: bool) -> Snapshot {
        let mut changes = std::mem::take(&mut self.services.changes);
        changes.add(std::mem::take(&mut self.slices.changes));
        let node = self
            .nodes
            .values()
            .find(|n| n.metadata.name.as_deref() == Some(node_name));
        let (foreign_services, services) = self
            .services
            .values()
            .cloned()
            .partition(|s| crate::objects::served_elsewhere(s));
        Snapshot {
            services,
            foreign_services,
            slices: self.slices.values().cloned().collect(),
            pods: self.pods.values().cloned().collect(),
            namespaces: self.namespaces.values().cloned().collect(),
            pods_unknown,
            service_cidrs: crate::snapshot::service_cidrs_of(
                self.service_cidrs.values().map(|c| &**c),
            ),
            node: NodeInfo::with_node(node_name.to_string(), node.map(|n| &**n)),
            config: Default::default(),
            changes,
        }
    }
}

/// A run of failed lists or watches of one kind.
struct Failing {
    since: Instant,
    errors: u64,
    logged: Instant,
    /// `Answered::get` at the last failure: a watch answered since then ends the run, once
    /// [`ANSWERED_QUIET`] has passed without a failure (a watch answered and then broken at
    /// once keeps the run going).
    answers: u64,
    last: Instant,
}

/// How long after its last failure a kind whose watch was answered meanwhile counts as
/// answering again ([`Progress::check_answered`]).
const ANSWERED_QUIET: Duration = Duration::from_secs(5);

/// How often kinds marked failing are checked for a watch answered since (see [`Answered`]).
const ANSWERED_CHECK: Duration = Duration::from_secs(1);

/// While a kind keeps failing, a reminder this often (each failure is logged at debug level).
const FAILING_LOG_EVERY: Duration = Duration::from_secs(30);

/// What the watchers have done so far, for readiness, logs and metrics.
struct Progress {
    server: String,
    listed: [bool; 6],
    /// The Pods' or the Namespaces' lists are refused (403, 404): known to be unavailable.
    refused: [bool; 6],
    failing: [Option<Failing>; 6],
    /// The ServiceCIDRs' refusal was logged.
    refused_logged: bool,
    metrics: Option<Arc<Metrics>>,
    answered: Arc<Answered>,
}

impl Progress {
    /// Counts a failed list or watch of `kind`, which is failing until it is answered again.
    fn count_failure(&self, kind: Kind, e: &watcher::Error) {
        if let Some(m) = &self.metrics {
            let resource = [("resource", kind.resource())];
            m.list_watch_errors
                .with(&[resource[0], ("operation", operation(e))])
                .inc();
            m.list_watch_failing.with(&resource).set(1);
        }
    }

    /// `kind` is answered again: the end of its run of failures, if it had one.
    fn answering(&mut self, kind: Kind) {
        if let Some(f) = self.failing[kind as usize].take() {
            if let Some(m) = &self.metrics {
                m.list_watch_failing
                    .with(&[("resource", kind.resource())])
                    .set(0);
            }
            log::info!(
                "kubernetes: {kind}: API server answering again after {:.1?} ({} failed \
                 attempts)",
                f.since.elapsed(),
                f.errors
            );
        }
    }

    /// Ends the runs of failures of the kinds whose watch the API server has answered since
    /// their last failure (a resumed watch on which nothing happens yields no item).
    fn check_answered(&mut self) {
        for kind in KINDS {
            if self.failing[kind as usize].as_ref().is_some_and(|f| {
                self.answered.get(kind) > f.answers && f.last.elapsed() >= ANSWERED_QUIET
            }) {
                self.answering(kind);
            }
        }
    }

    fn all_listed(&self) -> bool {
        GATING.iter().all(|k| self.listed[*k as usize])
    }

    /// Whether the Pods and the Namespaces have been listed, or refused (then none are
    /// known: every pod keeps socket-layer translation): `Snapshot::pods_unknown`.
    fn pods_listed(&self) -> bool {
        [Kind::Pods, Kind::Namespaces]
            .iter()
            .all(|k| self.listed[*k as usize] || self.refused[*k as usize])
    }

    /// Logs and counts what `update` means; true if it changed a store.
    fn absorb(&mut self, Update { kind, step }: Update) -> bool {
        let k = kind as usize;
        match step {
            Step::Failed(e) if is_expired(&e) => {
                log::info!("kubernetes: {kind}: resourceVersion expired, relisting");
                if let Some(m) = &self.metrics {
                    m.watch_expired.with(&[("resource", kind.resource())]).inc();
                }
                return false;
            }
            // Not served (an API server before 1.33) or not allowed: a normal state, not an
            // outage, so not counted as failing; the first snapshot takes it as none.
            Step::Failed(e) if kind == Kind::ServiceCidrs && is_refused(&e) => {
                if !self.refused_logged {
                    self.refused_logged = true;
                    log::info!(
                        "kubernetes: {kind}: {} (API server {}): without ServiceCIDRs (an API \
                         server before 1.33, or RBAC without list and watch of \
                         networking.k8s.io servicecidrs) unallocated Service addresses are not \
                         dropped (semantics 3.12); asking again every {:?}",
                        error_chain(&e),
                        self.server,
                        REFUSED_RETRY
                    );
                }
                let first = !self.listed[k];
                self.listed[k] = true;
                // The first snapshot may have waited for this kind alone.
                return first && self.all_listed();
            }
            Step::Failed(e) if matches!(kind, Kind::Pods | Kind::Namespaces) && is_refused(&e) => {
                self.count_failure(kind, &e);
                // The first refusal may make the opt-out decidable (as none).
                let first = !self.refused[k];
                self.refused[k] = true;
                if self.failing[k].is_none() {
                    log::warn!(
                        "kubernetes: {kind}: {} (API server {}): the socket-layer opt-out \
                         (namespace label kube-bpf-proxy.io/socket-lb) needs list and watch of \
                         pods and namespaces (deploy/kube-bpf-proxy.yaml); until then every pod \
                         keeps socket-layer translation; asking again every {:?}",
                        error_chain(&e),
                        self.server,
                        REFUSED_RETRY
                    );
                    self.failing[k] = Some(Failing {
                        since: Instant::now(),
                        errors: 1,
                        logged: Instant::now(),
                        answers: self.answered.get(kind),
                        last: Instant::now(),
                    });
                }
                return first && self.all_listed();
            }
            Step::Failed(e) => {
                self.count_failure(kind, &e);
                let now = Instant::now();
                match &mut self.failing[k] {
                    None => {
                        let asked = asked_wait(&e, &self.answered);
                        let asked = if asked.is_zero() {
                            String::new()
                        } else {
                            format!(" after the {asked:.0?} the server asked for, then")
                        };
                        log::warn!(
                            "kubernetes: {kind}: {} (API server {}); keeping the last state, \
                             retrying{asked} every {:?} at most",
                            error_chain(&e),
                            self.server,
                            RETRY_MAX
                        );
                        self.failing[k] = Some(Failing {
                            since: now,
                            errors: 1,
                            logged: now,
                            answers: self.answered.get(kind),
                            last: now,
                        });
                    }
                    Some(f) => {
                        f.errors += 1;
                        f.answers = self.answered.get(kind);
                        f.last = now;
                        if now.duration_since(f.logged) >= FAILING_LOG_EVERY {
                            f.logged = now;
                            log::warn!(
                                "kubernetes: {kind}: still failing after {:.0?} ({} errors), \
                                 last: {}; keeping the last state",
                                now.duration_since(f.since),
                                f.errors,
                                error_chain(&e)
                            );
                        } else {
                            log::debug!("kubernetes: {kind}: {}", error_chain(&e));
                        }
                    }
                }
                return false;
            }
            Step::Nothing => return false,
            Step::Changed | Step::Listed | Step::ListedSame | Step::Unchanged => {}
        }
        self.answering(kind);
        let first_list = matches!(step, Step::Listed | Step::ListedSame) && !self.listed[k];
        if first_list {
            self.listed[k] = true;
            let waiting: Vec<String> = GATING
                .iter()
                .filter(|w| !self.listed[**w as usize])
                .map(ToString::to_string)
                .collect();
            if waiting.is_empty() {
                log::info!("kubernetes: initial lists complete");
            } else {
                log::info!(
                    "kubernetes: {kind} listed; waiting for {}",
                    waiting.join(", ")
                );
            }
        }
        match step {
            Step::Unchanged => false,
            // Nothing new: a snapshot only for a kind's first list, which may complete what
            // the first snapshot waits for, or make the Pods and the Namespaces known (the
            // socket-layer opt-out is decided only then, `Snapshot::pods_unknown`).
            Step::ListedSame => first_list,
            _ => true,
        }
    }
}

/// One item of any of the three watchers.
enum Item {
    // Boxed: the three differ in size by hundreds of bytes.
    Service(Box<WatcherItem<Service>>),
    Slice(Box<WatcherItem<EndpointSlice>>),
    Node(Box<WatcherItem<Node>>),
    Pod(Box<WatcherItem<Pod>>),
    Namespace(Box<WatcherItem<Namespace>>),
    ServiceCidr(Box<WatcherItem<ServiceCIDR>>),
}

impl Stores {
    /// Applies `item` to its store.
    fn apply(&mut self, item: Item) -> Update {
        fn step<K, S>(objects: &mut Objects<K, S>, item: WatcherItem<K>) -> Update
        where
            K: Resource<DynamicType = ()> + Clone,
            S: Resource<DynamicType = ()> + From<K> + Kept,
        {
            Update {
                kind: objects.kind,
                step: match item {
                    Ok(event) => objects.apply(event),
                    Err(e) => Step::Failed(e),
                },
            }
        }
        match item {
            Item::Service(i) => step(&mut self.services, *i),
            Item::Slice(i) => step(&mut self.slices, *i),
            Item::Node(i) => step(&mut self.nodes, *i),
            Item::Pod(i) => step(&mut self.pods, *i),
            Item::Namespace(i) => step(&mut self.namespaces, *i),
            Item::ServiceCidr(i) => step(&mut self.service_cidrs, *i),
        }
    }
}

impl KubeSource {
    async fn watch(self, tx: Sender<Snapshot>) -> anyhow::Result<()> {
        let server = self.config.cluster_url.clone();
        let mut config = self.config;
        // Every failure goes through `paced`: logged, counted, retried within 3 s (or the
        // server's Retry-After). kube's own retry layer would retry 429/503/504 unseen, 15
        // times with waits doubling from 5 ms, so after a minute of 503s the next try came
        // tens of seconds later.
        config.default_retry = false;
        config.read_timeout = Some(READ_TIMEOUT);
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        // The read timeout counts from the request, not from when its pooled connection
        // went idle.
        config.reset_reader_on_write = true;
        let answered = Arc::new(Answered::default());
        let client = api_client(config, Some(answered.clone()))?;
        log::info!(
            "kubernetes: watching API server {server} for node {:?}",
            self.node_name
        );
        let metrics = self.metrics;
        if let Some(m) = &metrics {
            for kind in KINDS {
                m.watch_expired.with(&[("resource", kind.resource())]);
                m.list_watch_failing.with(&[("resource", kind.resource())]);
                for op in ["list", "watch"] {
                    m.list_watch_errors
                        .with(&[("resource", kind.resource()), ("operation", op)]);
                }
                // Objects::new creates the undecodable gauges; the counters start at 0 too.
            }
            for kind in [
                "Service",
                "EndpointSlice",
                "Node",
                "Pod",
                "Namespace",
                "ServiceCIDR",
            ] {
                m.undecodable_objects_total.with(&[("kind", kind)]);
            }
        }

        let pacing = Arc::new(Pacing {
            wake: tokio::sync::watch::channel(0).0,
            answered: answered.clone(),
        });
        if let Some(book) = self.node_addresses.clone() {
            tokio::spawn(follow_node_addresses(
                Api::all(client.clone()),
                book,
                pacing.clone(),
            ));
        }
        let mut stores = Stores {
            services: Objects::new(Kind::Services, metrics.clone()),
            slices: Objects::new(Kind::Slices, metrics.clone()),
            nodes: Objects::new(Kind::Node, metrics.clone()),
            pods: Objects::new(Kind::Pods, metrics.clone()),
            namespaces: Objects::new(Kind::Namespaces, metrics.clone()),
            service_cidrs: Objects::new(Kind::ServiceCidrs, metrics.clone()),
        };
        // Bookmarks are on by default: watches resume from a recent resourceVersion instead of
        // relisting. Lists are consistent reads, so a relist after 410 never goes back in time.
        let every = watcher::Config::default;
        // kube-proxy's selector (semantics 1.1): EndpointSlices of another service proxy, and
        // headless objects, are never sent by the API server. One that gains such a label
        // leaves the watch as a deletion, one that loses it arrives as an addition. Services of
        // another proxy are sent, for their ClusterIPs alone: those are left to that proxy,
        // not dropped as unallocated (3.12); the snapshot keeps them apart and nothing else
        // reads them. The compiler ignores such objects anyway (a source without selectors:
        // manifests).
        let proxied = HIDING_LABELS
            .iter()
            .map(|l| format!("!{l}"))
            .collect::<Vec<_>>()
            .join(",");
        let not_headless = format!("!{}", HIDING_LABELS[1]);
        let mut items = futures::stream::select_all([
            follow::<Service>(
                Api::all(client.clone()),
                every().labels(&not_headless),
                pacing.clone(),
                false,
            )
            .map(|i| Item::Service(Box::new(i)))
            .boxed(),
            follow::<EndpointSlice>(
                Api::all(client.clone()),
                every().labels(&proxied),
                pacing.clone(),
                false,
            )
            .map(|i| Item::Slice(Box::new(i)))
            .boxed(),
            follow::<Node>(
                Api::all(client.clone()),
                every().fields(&format!("metadata.name={}", self.node_name)),
                pacing.clone(),
                false,
            )
            .map(|i| Item::Node(Box::new(i)))
            .boxed(),
            follow::<Pod>(
                Api::all(client.clone()),
                every().fields(&format!("spec.nodeName={}", self.node_name)),
                pacing.clone(),
                true,
            )
            .map(|i| Item::Pod(Box::new(i)))
            .boxed(),
            follow::<Namespace>(Api::all(client.clone()), every(), pacing.clone(), true)
                .map(|i| Item::Namespace(Box::new(i)))
                .boxed(),
            // semantics 3.12: the Service CIDRs, whose unallocated addresses are dropped.
            follow::<ServiceCIDR>(Api::all(client), every(), pacing, true)
                .map(|i| Item::ServiceCidr(Box::new(i)))
                .boxed(),
        ]);

        let mut progress = Progress {
            server: server.to_string(),
            listed: [false; 6],
            refused: [false; 6],
            failing: [None, None, None, None, None, None],
            refused_logged: false,
            metrics,
            answered,
        };
        let mut check = tokio::time::interval(ANSWERED_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let item = tokio::select! {
                item = items.next() => item,
                _ = check.tick() => {
                    progress.check_answered();
                    continue;
                }
            };
            let Some(item) = item else { break };
            let mut changed = progress.absorb(stores.apply(item));
            // Take whatever else is already there (a burst, a relist), then send once.
            while let Some(Some(item)) = items.next().now_or_never() {
                changed |= progress.absorb(stores.apply(item));
            }
            if changed
                && progress.all_listed()
                && tx
                    .send(stores.snapshot(&self.node_name, !progress.pods_listed()))
                    .is_err()
            {
                return Ok(());
            }
        }
        bail!("the watch streams ended")
    }
}

/// Keeps `book` equal to the addresses of every Node object (DSR peers). Apart from the
/// snapshot's watchers on purpose: Node status changes often and must not cause syncs, and only
/// names and addresses are kept, not the (large) objects. A failing watch keeps the last
/// addresses and retries with the snapshot watchers' pacing (woken with them by `pacing`); a
/// relist replaces them only once it is complete.
async fn follow_node_addresses(
    api: Api<DeserializeGuard<Node>>,
    book: std::sync::Arc<NodeAddresses>,
    pacing: Arc<Pacing>,
) {
    type Book = std::collections::BTreeMap<String, Vec<std::net::IpAddr>>;
    let entry = |o: &DeserializeGuard<Node>| -> Option<(String, Vec<std::net::IpAddr>)> {
        let node = o.0.as_ref().ok()?;
        Some((node.metadata.name.clone()?, addresses_of(node).collect()))
    };
    let mut live: Option<Book> = None;
    let mut relist = Book::new();
    let mut failing = false;
    let start = move || watcher(api.clone(), watcher::Config::default()).boxed();
    let mut events = paced(Box::new(start), pacing, false);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relist.clear(),
            Ok(watcher::Event::InitApply(o)) => relist.extend(entry(&o)),
            Ok(watcher::Event::InitDone) => live = Some(std::mem::take(&mut relist)),
            Ok(watcher::Event::Apply(o)) => {
                if let (Some(live), Some((name, addrs))) = (live.as_mut(), entry(&o)) {
                    live.insert(name, addrs);
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                if let (Some(live), Some(name)) = (live.as_mut(), o.meta().name.as_ref()) {
                    live.remove(name);
                }
            }
            Err(e) => {
                if !failing && !is_expired(&e) {
                    log::warn!(
                        "kubernetes: nodes (DSR peers): {}; keeping the last addresses, retrying \
                         with backoff",
                        error_chain(&e)
                    );
                    failing = true;
                }
                continue;
            }
        }
        failing = false;
        if let Some(live) = &live {
            book.set(live.values().flatten().copied().collect());
        }
    }
}

impl Source for KubeSource {
    fn name(&self) -> String {
        format!("kubernetes {}", self.config.cluster_url)
    }

    fn events(&self, node: &str) -> anyhow::Result<crate::events::Events> {
        let config = self.config.clone();
        crate::events::Events::post(node, move || api_client(config, None))
    }

    fn run(self: Box<Self>, tx: Sender<Snapshot>) -> anyhow::Result<()> {
        // The agent loop is synchronous; the watchers get a runtime of their own on this thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the tokio runtime")?;
        runtime.block_on(self.watch(tx))
    }
}

#[cfg(test)]
mod tests {
    use futures::stream;
    use kube::core::Status;

    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new();
        let mut ceiling = RETRY_MIN;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} outside {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(RETRY_MAX);
        }
        assert_eq!(ceiling, RETRY_MAX);
        // Jitter: ten draws at the cap are not all equal.
        let draws: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(draws.iter().any(|d| *d != draws[0]), "{draws:?}");
        b.reset();
        assert!(b.next_delay() <= RETRY_MIN);
    }

    fn expired() -> watcher::Error {
        watcher::Error::WatchError(Box::new(Status {
            code: 410,
            reason: "Expired".into(),
            ..Status::default()
        }))
    }

    fn unavailable() -> watcher::Error {
        watcher::Error::WatchError(Box::new(Status {
            code: 500,
            ..Status::default()
        }))
    }

    /// How long each item of `items`, paced, takes to arrive after the previous one.
    async fn gaps(items: Vec<Result<u32, watcher::Error>>) -> Vec<Duration> {
        gaps_of(items, false).await
    }

    /// Test items say nothing of the phase: the watcher counts as listing throughout.
    impl Phase for u32 {
        fn listing(&self) -> Option<bool> {
            None
        }
    }

    /// How often a watcher was started afresh, and what each new start gives.
    type Restarts<T> = Arc<std::sync::Mutex<(usize, Vec<Vec<Result<T, watcher::Error>>>)>>;

    /// `paced` over `items`, as the first start gives them; a restart gives what `restarts`
    /// has (or nothing), and counts.
    fn paced_over<T: Phase + Send + 'static>(
        items: Vec<Result<T, watcher::Error>>,
        restarts: Restarts<T>,
        optional: bool,
    ) -> BoxStream<'static, Result<T, watcher::Error>> {
        paced_with(items, restarts, optional, pacing(Arc::default()))
    }

    /// The pacing of watchers whose API client notes its answers in `answered`.
    fn pacing(answered: Arc<Answered>) -> Arc<Pacing> {
        Arc::new(Pacing {
            wake: tokio::sync::watch::channel(0).0,
            answered,
        })
    }

    /// `paced_over`, with `pacing` shared.
    fn paced_with<T: Phase + Send + 'static>(
        items: Vec<Result<T, watcher::Error>>,
        restarts: Restarts<T>,
        optional: bool,
        pacing: Arc<Pacing>,
    ) -> BoxStream<'static, Result<T, watcher::Error>> {
        let first = std::sync::Mutex::new(Some(items));
        let start = move || {
            if let Some(items) = first.lock().unwrap().take() {
                return stream::iter(items).chain(stream::pending()).boxed();
            }
            let mut r = restarts.lock().unwrap();
            r.0 += 1;
            let next = if r.1.is_empty() {
                Vec::new()
            } else {
                r.1.remove(0)
            };
            stream::iter(next).chain(stream::pending()).boxed()
        };
        paced(Box::new(start), pacing, optional)
    }

    /// As `gaps`, for an optional kind (`optional`) or not.
    async fn gaps_of(items: Vec<Result<u32, watcher::Error>>, optional: bool) -> Vec<Duration> {
        let count = items.len();
        let mut paced = paced_over(items, Arc::default(), optional).take(count);
        let mut out = Vec::new();
        let mut last = tokio::time::Instant::now();
        while paced.next().await.is_some() {
            out.push(last.elapsed());
            last = tokio::time::Instant::now();
        }
        out
    }

    fn refused() -> watcher::Error {
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(Status {
            code: 403,
            reason: "Forbidden".into(),
            ..Status::default()
        })))
    }

    /// A Pods or Namespaces list the agent may not make (RBAC without it) waits 30 s, not the
    /// outage backoff; a required kind refused backs off as in an outage.
    #[tokio::test(start_paused = true)]
    async fn a_refused_optional_kind_asks_again_only_every_30_s() {
        let gaps = gaps_of(vec![Err(refused()), Err(refused()), Ok(1)], true).await;
        assert!(
            gaps[1] >= REFUSED_RETRY && gaps[2] >= REFUSED_RETRY,
            "{gaps:?}"
        );
        let gaps = gaps_of(vec![Err(refused()), Err(refused()), Ok(1)], false).await;
        assert!(gaps[1] <= RETRY_MAX && gaps[2] <= RETRY_MAX, "{gaps:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_410_relists_at_once_but_a_second_one_soon_after_waits() {
        let gaps = gaps(vec![Err(expired()), Ok(1), Err(expired()), Ok(2)]).await;
        let quick = Duration::from_millis(100);
        assert!(
            gaps[1] < quick,
            "the relist after the first 410 waited: {gaps:?}"
        );
        assert!(gaps[2] < quick, "{gaps:?}");
        assert!(
            gaps[3] >= RETRY_MIN / 2,
            "a second 410 relisted at once: {gaps:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_an_answer_resets_the_backoff() {
        let gaps = gaps(vec![
            Err(unavailable()),
            Err(unavailable()),
            Ok(1),
            Err(unavailable()),
            Ok(2),
        ])
        .await;
        assert!(gaps[1] >= RETRY_MIN / 2, "{gaps:?}");
        assert!(gaps[2] >= RETRY_MIN, "the backoff did not grow: {gaps:?}");
        assert!(gaps[3] < Duration::from_millis(100), "{gaps:?}");
        assert!(
            gaps[4] >= RETRY_MIN / 2 && gaps[4] < RETRY_MIN * 2,
            "not reset: {gaps:?}"
        );
    }

    fn restarts<T>(next: Vec<Vec<Result<T, watcher::Error>>>) -> Restarts<T> {
        Arc::new(std::sync::Mutex::new((0, next)))
    }

    /// A list the API server never answers fails after `LIST_STALL`, counted as a failed
    /// list, and the watcher starts afresh.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_list_is_reported_and_started_afresh() {
        let again = restarts(vec![vec![Ok(7u32)]]);
        let mut paced = paced_over(Vec::new(), again.clone(), false);
        let started = tokio::time::Instant::now();
        let first = paced.next().await.expect("an item");
        let e = first.expect_err("a stall is a failure");
        assert!(started.elapsed() >= LIST_STALL, "{:?}", started.elapsed());
        assert_eq!(operation(&e), "list");
        assert!(!is_expired(&e));
        assert_eq!(again.lock().unwrap().0, 1, "started afresh once");
        assert_eq!(paced.next().await.expect("an item").ok(), Some(7));
    }

    /// Once listed, a watch that stays silent is no stall: nothing is restarted.
    #[tokio::test(start_paused = true)]
    async fn a_silent_watch_is_not_a_stall() {
        let again = restarts::<watcher::Event<u32>>(Vec::new());
        let items = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(1)),
            Ok(watcher::Event::InitDone),
        ];
        let mut paced = paced_over(items, again.clone(), false);
        for _ in 0..3 {
            paced.next().await.expect("an item").expect("no failure");
        }
        let quiet = tokio::time::timeout(LIST_STALL * 10, paced.next()).await;
        assert!(quiet.is_err(), "an item came: {quiet:?}");
        assert_eq!(again.lock().unwrap().0, 0);
    }

    /// kube-runtime asks a watch again with the same resourceVersion after an HTTP 410 to
    /// the watch request itself; the watcher is started afresh (a list) instead.
    #[tokio::test(start_paused = true)]
    async fn a_410_answering_the_watch_request_lists_afresh() {
        let gone = watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(Status {
            code: 410,
            reason: "Expired".into(),
            ..Status::default()
        })));
        let again = restarts(vec![vec![Ok(watcher::Event::<u32>::Init)]]);
        let items = vec![Ok(watcher::Event::InitDone), Err(gone)];
        let mut paced = paced_over(items, again.clone(), false);
        paced.next().await.expect("an item").expect("no failure");
        let e = paced.next().await.expect("an item").expect_err("the 410");
        assert!(is_expired(&e));
        let relist = paced.next().await.expect("an item").expect("the relist");
        assert!(matches!(relist, watcher::Event::Init));
        assert_eq!(again.lock().unwrap().0, 1);
    }

    /// A 429 with `retryAfterSeconds` waits that long (up to `RETRY_AFTER_MAX`) instead of
    /// the shorter backoff.
    #[tokio::test(start_paused = true)]
    async fn the_servers_retry_after_is_honoured() {
        let busy = |seconds| {
            watcher::Error::InitialListFailed(kube::Error::Api(Box::new(Status {
                code: 429,
                reason: "TooManyRequests".into(),
                details: Some(kube::core::response::StatusDetails {
                    name: String::new(),
                    group: String::new(),
                    kind: String::new(),
                    uid: String::new(),
                    causes: Vec::new(),
                    retry_after_seconds: seconds,
                }),
                ..Status::default()
            })))
        };
        let gaps = gaps(vec![Err(busy(10)), Ok(1), Err(busy(3600)), Ok(2)]).await;
        assert!(gaps[1] >= Duration::from_secs(10), "{gaps:?}");
        assert!(
            gaps[3] >= RETRY_AFTER_MAX && gaps[3] < RETRY_AFTER_MAX * 2,
            "{gaps:?}"
        );
    }

    /// A 429 or 503 whose wait only its `Retry-After` header tells (a plain-text answer from a
    /// proxy in front of the API server: kube's error has no `retryAfterSeconds`) waits that
    /// long, up to `RETRY_AFTER_MAX`; other statuses' headers, and unreadable ones, change
    /// nothing.
    #[tokio::test(start_paused = true)]
    async fn a_retry_after_header_is_honoured() {
        use tower::{Service as _, ServiceExt as _};

        let answered = Arc::new(Answered::default());
        let answer = |status: u16, retry_after: &'static str| {
            let answered = answered.clone();
            async move {
                let inner = tower::service_fn(move |_: http::Request<()>| async move {
                    let mut r = http::Response::new(());
                    *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    r.headers_mut()
                        .insert(http::header::RETRY_AFTER, retry_after.parse().unwrap());
                    Ok::<_, std::convert::Infallible>(r)
                });
                let mut layer = CountAnswers {
                    inner,
                    answered: Some(answered),
                };
                let request = http::Request::get("/api/v1/services").body(()).unwrap();
                layer.ready().await.unwrap().call(request).await.unwrap();
            }
        };
        answer(500, "20").await;
        answer(429, "soon").await;
        assert_eq!(answered.asked_wait(), Duration::ZERO);
        answer(429, "12").await;
        assert_eq!(answered.asked_wait(), Duration::from_secs(12));
        // A shorter wait asked later does not cut the longer one.
        answer(503, "1").await;
        assert_eq!(answered.asked_wait(), Duration::from_secs(12));

        let plain = || {
            watcher::Error::WatchFailed(kube::Error::Api(Box::new(
                Status::failure("Too Many Requests", "Failed to parse error data").with_code(429),
            )))
        };
        // Another watcher answered meanwhile (a wake-up) does not cut the asked wait short.
        let items = vec![Err(plain()), Ok(1u32)];
        let shared = pacing(answered.clone());
        let mut paced = paced_with(items, Arc::default(), false, shared.clone()).take(2);
        let start = tokio::time::Instant::now();
        paced.next().await.expect("an item").expect_err("the 429");
        let waker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            shared.wake.send_modify(|n| *n += 1);
        });
        paced.next().await.expect("an item").expect("the retry");
        assert!(
            start.elapsed() >= Duration::from_secs(12),
            "{:?}",
            start.elapsed()
        );
        waker.await.unwrap();

        // Past the maximum: RETRY_AFTER_MAX.
        answer(429, "3600").await;
        assert_eq!(answered.asked_wait(), RETRY_AFTER_MAX);
    }

    #[test]
    fn retry_after_values_are_read_as_seconds_or_dates() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = parse_retry_after(&httpdate::fmt_http_date(later)).expect("a date");
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-5"), None);
        assert_eq!(parse_retry_after("in a while"), None);
    }
}
