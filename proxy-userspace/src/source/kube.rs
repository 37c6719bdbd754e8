//! The Kubernetes API: Services and EndpointSlices in all namespaces, and this node's Node
//! object, each followed by a kube-runtime watcher feeding a reflector store.
//!
//! Every snapshot is built from the three stores, never accumulated from events, so it always
//! equals what the API server last told us. The first one is sent once all three initial lists
//! are complete; after that, one per change (the agent coalesces bursts).
//!
//! Failures never reach the agent as data: a watcher that cannot list or watch keeps its store
//! as it was and retries with kube-runtime's default backoff (0.8 s doubling to 30 s). A watch
//! whose resourceVersion has expired (410 Gone) relists, and the store is swapped only when the
//! relist is complete. An object this build cannot decode is logged and left out; it does not
//! stop the watch.
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

use std::{fmt, path::PathBuf, sync::mpsc::Sender};

use anyhow::{Context as _, bail};
use futures::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    core::DeserializeGuard,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;

use super::{NodeAddresses, Source, addresses_of};
use crate::snapshot::{NodeInfo, Snapshot};

pub struct KubeSource {
    config: Config,
    node_name: String,
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
            node_addresses: None,
        }
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

/// The three watched kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services = 0,
    Slices = 1,
    Node = 2,
}

const KINDS: [Kind; 3] = [Kind::Services, Kind::Slices, Kind::Node];

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Services => "services",
            Kind::Slices => "endpointslices",
            Kind::Node => "node",
        })
    }
}

/// What one watcher step did to its store.
enum Step {
    /// An object was added, changed or deleted.
    Changed,
    /// A (re)list completed and its result replaced the store.
    Listed,
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

/// Runs one watcher into `writer`, turning its events into `Update`s and logging objects that
/// could not be decoded.
fn follow<K>(
    kind: Kind,
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    writer: reflector::store::Writer<DeserializeGuard<K>>,
) -> BoxStream<'static, Update>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    watcher(api, config)
        // Nobody here reads managedFields; they are often the bulk of an object.
        .modify(|o: &mut DeserializeGuard<K>| o.meta_mut().managed_fields = None)
        .default_backoff()
        .reflect(writer)
        .map(move |item| {
            let step = match item {
                Ok(event) => {
                    let object = match &event {
                        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => Some(o),
                        _ => None,
                    };
                    if let Some(DeserializeGuard(Err(invalid))) = object {
                        log::warn!(
                            "kubernetes: ignoring {} {}: {}",
                            K::kind(&()),
                            qualified_name(&invalid.metadata),
                            invalid.error
                        );
                    }
                    match event {
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Step::Changed,
                        watcher::Event::InitDone => Step::Listed,
                        watcher::Event::Init | watcher::Event::InitApply(_) => Step::Nothing,
                    }
                }
                Err(e) => Step::Failed(e),
            };
            Update { kind, step }
        })
        .boxed()
}

fn qualified_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
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
    match e {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// The decodable objects of a store, ordered by namespace and name so equal states give equal
/// snapshots.
fn valid_objects<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<DeserializeGuard<K>>,
) -> Vec<K> {
    let mut objects: Vec<K> = store
        .state()
        .iter()
        .filter_map(|o| o.0.as_ref().ok().cloned())
        .collect();
    objects.sort_by(|a, b| {
        let key = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
        key(a).cmp(&key(b))
    });
    objects
}

struct Stores {
    services: Store<DeserializeGuard<Service>>,
    slices: Store<DeserializeGuard<EndpointSlice>>,
    nodes: Store<DeserializeGuard<Node>>,
}

impl Stores {
    fn snapshot(&self, node_name: &str) -> Snapshot {
        let node = valid_objects(&self.nodes)
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name));
        Snapshot {
            services: valid_objects(&self.services),
            slices: valid_objects(&self.slices),
            node: NodeInfo::with_node(node_name.to_string(), node.as_ref()),
            config: Default::default(),
        }
    }
}

/// What the watchers have done so far, for readiness and logs.
struct Progress {
    server: String,
    listed: [bool; 3],
    failing: [bool; 3],
}

impl Progress {
    fn all_listed(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// Logs what `update` means; true if it changed a store.
    fn absorb(&mut self, Update { kind, step }: Update) -> bool {
        let k = kind as usize;
        match step {
            Step::Failed(e) if is_expired(&e) => {
                log::info!("kubernetes: {kind}: resourceVersion expired, relisting");
                return false;
            }
            Step::Failed(e) => {
                log::warn!(
                    "kubernetes: {kind}: {} (API server {}); keeping the last state, retrying \
                     with backoff",
                    error_chain(&e),
                    self.server
                );
                self.failing[k] = true;
                return false;
            }
            Step::Nothing => return false,
            Step::Changed | Step::Listed => {}
        }
        if std::mem::take(&mut self.failing[k]) {
            log::info!("kubernetes: {kind}: API server reachable again");
        }
        if matches!(step, Step::Listed) && !self.listed[k] {
            self.listed[k] = true;
            let waiting: Vec<String> = KINDS
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
        true
    }
}

impl KubeSource {
    async fn watch(self, tx: Sender<Snapshot>) -> anyhow::Result<()> {
        let server = self.config.cluster_url.clone();
        let client = Client::try_from(self.config).context("build the API client")?;
        log::info!(
            "kubernetes: watching API server {server} for node {:?}",
            self.node_name
        );

        if let Some(book) = self.node_addresses.clone() {
            tokio::spawn(follow_node_addresses(Api::all(client.clone()), book));
        }
        let (services, services_writer) = reflector::store();
        let (slices, slices_writer) = reflector::store();
        let (nodes, nodes_writer) = reflector::store();
        let stores = Stores {
            services,
            slices,
            nodes,
        };
        // Bookmarks are on by default: watches resume from a recent resourceVersion instead of
        // relisting. Lists are consistent reads, so a relist after 410 never goes back in time.
        let every = watcher::Config::default;
        let mut updates = futures::stream::select_all([
            follow::<Service>(
                Kind::Services,
                Api::all(client.clone()),
                every(),
                services_writer,
            ),
            follow::<EndpointSlice>(
                Kind::Slices,
                Api::all(client.clone()),
                every(),
                slices_writer,
            ),
            follow::<Node>(
                Kind::Node,
                Api::all(client),
                every().fields(&format!("metadata.name={}", self.node_name)),
                nodes_writer,
            ),
        ]);

        let mut progress = Progress {
            server: server.to_string(),
            listed: [false; 3],
            failing: [false; 3],
        };
        while let Some(update) = updates.next().await {
            let mut changed = progress.absorb(update);
            // Take whatever else is already there (a burst, a relist), then send once.
            while let Some(Some(update)) = updates.next().now_or_never() {
                changed |= progress.absorb(update);
            }
            if changed
                && progress.all_listed()
                && tx.send(stores.snapshot(&self.node_name)).is_err()
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
/// addresses and retries with backoff; a relist replaces them only once it is complete.
async fn follow_node_addresses(
    api: Api<DeserializeGuard<Node>>,
    book: std::sync::Arc<NodeAddresses>,
) {
    type Book = std::collections::BTreeMap<String, Vec<std::net::IpAddr>>;
    let entry = |o: &DeserializeGuard<Node>| -> Option<(String, Vec<std::net::IpAddr>)> {
        let node = o.0.as_ref().ok()?;
        Some((node.metadata.name.clone()?, addresses_of(node).collect()))
    };
    let mut live: Option<Book> = None;
    let mut relist = Book::new();
    let mut failing = false;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
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

    fn run(self: Box<Self>, tx: Sender<Snapshot>) -> anyhow::Result<()> {
        // The agent loop is synchronous; the watchers get a runtime of their own on this thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the tokio runtime")?;
        runtime.block_on(self.watch(tx))
    }
}
