//! A directory of YAML manifests (Service, EndpointSlice, Node, Pod, Namespace; `List`s and
//! multi-document files too), re-read when any file changes. Used by `cargo xtask run` and the tests.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::mpsc::Sender,
    thread,
    time::{Duration, SystemTime},
};

use std::os::unix::ffi::OsStrExt as _;

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::{EndpointPort, EndpointSlice},
        networking::v1::ServiceCIDR,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize as _;

use super::{NodeAddresses, Source, addresses_of};
use crate::objects::{PodRef, Slice, SliceEndpoint};
use crate::snapshot::{Changes, NodeInfo, Snapshot};

/// Objects parsed from one file.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    /// Shared with every snapshot until the file changes.
    services: Vec<std::sync::Arc<Service>>,
    slices: Vec<std::sync::Arc<Slice>>,
    nodes: Vec<Node>,
    pods: Vec<std::sync::Arc<PodRef>>,
    namespaces: Vec<std::sync::Arc<Namespace>>,
    service_cidrs: Vec<ServiceCIDR>,
}

pub struct ManifestSource {
    dir: PathBuf,
    node_name: String,
    poll: Duration,
    /// Where the addresses of every Node object go, when asked for (`with_node_addresses`).
    node_addresses: Option<std::sync::Arc<NodeAddresses>>,
}

impl ManifestSource {
    pub fn new(dir: PathBuf, node_name: String) -> Self {
        ManifestSource {
            dir,
            node_name,
            poll: Duration::from_millis(100),
            node_addresses: None,
        }
    }

    /// Also keeps `book` equal to the addresses of every Node object in the directory.
    pub fn with_node_addresses(mut self, book: std::sync::Arc<NodeAddresses>) -> Self {
        self.node_addresses = Some(book);
        self
    }
}

/// Wakes the source when the directory changes (inotify: a file closed after writing, renamed
/// into or out of it, created or removed; not every partial write), so a change is read at once instead of at the next poll. The poll
/// stays as the fallback (a directory on a filesystem without inotify, an overflow).
struct DirWatch(std::os::fd::OwnedFd);

impl DirWatch {
    fn new(dir: &Path) -> Option<DirWatch> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain syscall; the fd is owned at once.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh fd nobody else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd, path.as_ptr(), mask) } < 0 {
            return None;
        }
        Some(DirWatch(owned))
    }

    /// Waits up to `timeout` for a manifest to change; then, while more changes follow each
    /// other within `QUIET` (files written or renamed in one go), for those too, up to `BURST`
    /// in all: the directory is read once for the burst, not once for its first file (a
    /// partial snapshot would be programmed, then the rest on top of it). Events of other
    /// files (an editor's or a tool's temporary file) do not count.
    fn wait(&self, timeout: Duration) {
        const QUIET: Duration = Duration::from_millis(2);
        const BURST: Duration = Duration::from_millis(100);
        let started = std::time::Instant::now();
        loop {
            let Some(left) = timeout.checked_sub(started.elapsed()) else {
                return;
            };
            match self.wait_once(left) {
                Some(true) => break,
                Some(false) => {}
                None => return,
            }
        }
        let burst = std::time::Instant::now();
        while let Some(left) = BURST.checked_sub(burst.elapsed()) {
            if self.wait_once(QUIET.min(left)).is_none() {
                return;
            }
        }
    }

    /// Waits up to `timeout` for events and drains them: `None` if none came, else whether
    /// one was of a manifest (or the queue overflowed).
    fn wait_once(&self, timeout: Duration) -> Option<bool> {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().max(1).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
        if ready <= 0 {
            return None;
        }
        // The kernel writes whole events; the buffer is aligned for their header.
        let mut buf = [0u64; 512];
        let mut relevant = false;
        loop {
            // SAFETY: reading into our buffer from our non-blocking fd.
            let n = unsafe {
                libc::read(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(&buf),
                )
            };
            let Ok(n) = usize::try_from(n) else { break };
            if n == 0 {
                break;
            }
            // SAFETY: u64s seen as their bytes; `n` bytes were written.
            let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
            relevant |= names_a_manifest(bytes);
        }
        Some(relevant)
    }
}

/// Whether the inotify events in `bytes` name a manifest file (or say the queue overflowed).
fn names_a_manifest(bytes: &[u8]) -> bool {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let word = |i: usize| {
            let b = &bytes[at + 4 * i..at + 4 * i + 4];
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        };
        let (mask, len) = (word(1), word(3) as usize);
        let name = bytes.get(at + HEADER..at + HEADER + len).unwrap_or(&[]);
        let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
        if mask & libc::IN_Q_OVERFLOW != 0
            || is_manifest(Path::new(std::ffi::OsStr::from_bytes(name)))
        {
            return true;
        }
        at += HEADER + len;
    }
    false
}

/// Whether the source reads the file at `path`, by its name.
fn is_manifest(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

/// After parsing this much at once, the heap the parsers freed (their threads' arenas, which
/// the agent's sync does not reuse) is given back to the system before the sync grows its own.
const TRIM_AFTER_BYTES: u64 = 4 << 20;

type Fingerprint = BTreeMap<PathBuf, (SystemTime, u64)>;

fn fingerprint(dir: &Path) -> anyhow::Result<Fingerprint> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if !is_manifest(&path) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            out.insert(path, (meta.modified()?, meta.len()));
        }
    }
    Ok(out)
}

fn parse_document(value: serde_norway::Value, into: &mut FileObjects) -> anyhow::Result<()> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    match kind.as_str() {
        "Service" => into
            .services
            .push(std::sync::Arc::new(Service::deserialize(value)?)),
        "EndpointSlice" => into.slices.push(std::sync::Arc::new(Slice::from(
            EndpointSlice::deserialize(value)?,
        ))),
        "Node" => into.nodes.push(Node::deserialize(value)?),
        "Pod" => into
            .pods
            .push(std::sync::Arc::new(PodRef::from(Pod::deserialize(value)?))),
        "Namespace" => into
            .namespaces
            .push(std::sync::Arc::new(Namespace::deserialize(value)?)),
        "ServiceCIDR" => into.service_cidrs.push(ServiceCIDR::deserialize(value)?),
        "List" => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    parse_document(item, into)?;
                }
            }
        }
        "" => {}
        other => log::debug!("ignoring manifest of kind {other}"),
    }
    Ok(())
}

fn parse_one_pass(text: &str) -> anyhow::Result<FileObjects> {
    let mut objects = FileObjects::default();
    for doc in serde_norway::Deserializer::from_str(text) {
        if let Some(d) = Option::<Document>::deserialize(doc)? {
            d.into_objects(&mut objects)?;
        }
    }
    Ok(objects)
}

fn parse_values(text: &str) -> anyhow::Result<FileObjects> {
    let mut objects = FileObjects::default();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = serde_norway::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        parse_document(value, &mut objects)?;
    }
    Ok(objects)
}

/// One document of any kind, read in one pass: an EndpointSlice's endpoints and ports (the bulk
/// of a large manifest) straight into their types, the small parts of other kinds as values
/// converted by kind afterwards.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<ObjectMeta>,
    #[serde(default)]
    spec: Option<serde_norway::Value>,
    #[serde(default)]
    status: Option<serde_norway::Value>,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default)]
    endpoints: Option<Vec<SliceEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<EndpointPort>>,
    #[serde(default)]
    items: Option<Vec<Document>>,
}

impl Document {
    fn into_objects(self, into: &mut FileObjects) -> anyhow::Result<()> {
        fn typed<T: serde::de::DeserializeOwned>(
            v: Option<serde_norway::Value>,
        ) -> anyhow::Result<Option<T>> {
            Ok(v.map(T::deserialize).transpose()?)
        }
        let metadata = self.metadata.unwrap_or_default();
        match self.kind.as_deref().unwrap_or("") {
            "Service" => into.services.push(std::sync::Arc::new(Service {
                metadata,
                spec: typed(self.spec)?,
                status: typed(self.status)?,
            })),
            "EndpointSlice" => into.slices.push(std::sync::Arc::new(Slice::of_parts(
                metadata,
                self.address_type.unwrap_or_default(),
                self.ports,
                self.endpoints.unwrap_or_default(),
            ))),
            "Node" => into.nodes.push(Node {
                metadata,
                spec: typed(self.spec)?,
                status: typed(self.status)?,
            }),
            "Pod" => into.pods.push(std::sync::Arc::new(PodRef::from(Pod {
                metadata,
                spec: typed(self.spec)?,
                status: typed(self.status)?,
            }))),
            "Namespace" => into.namespaces.push(std::sync::Arc::new(Namespace {
                metadata,
                spec: typed(self.spec)?,
                status: typed(self.status)?,
            })),
            "ServiceCIDR" => into.service_cidrs.push(ServiceCIDR {
                metadata,
                spec: typed(self.spec)?,
                status: typed(self.status)?,
            }),
            "List" => {
                for item in self.items.unwrap_or_default() {
                    item.into_objects(into)?;
                }
            }
            "" => {}
            other => log::debug!("ignoring manifest of kind {other}"),
        }
        Ok(())
    }
}

/// The snapshot the manifests in `text` (one file's worth) give, for `node`: what the agent
/// would program from a directory holding that file (tests and tools).
pub fn snapshot_of(text: &str, node: NodeInfo) -> anyhow::Result<Snapshot> {
    let objects = parse_text(text)?;
    let mut service_cidrs = crate::snapshot::service_cidrs_of(&objects.service_cidrs);
    service_cidrs.dedup();
    Ok(Snapshot {
        foreign_services: crate::snapshot::foreign_services_of(&objects.services),
        services: objects.services,
        slices: objects.slices,
        service_cidrs,
        node,
        ..Snapshot::default()
    })
}

/// Notes in `changes` the Services and EndpointSlices that differ between a file's previous
/// objects and its new ones (`None`: the file did not exist): every object, by namespace and
/// name, added, removed or changed in what the proxy reads.
fn file_changes(old: Option<&FileObjects>, new: Option<&FileObjects>, changes: &mut Changes) {
    fn by_name<T: kube::Resource>(
        objects: Option<&Vec<std::sync::Arc<T>>>,
    ) -> BTreeMap<(Option<&str>, Option<&str>), &T> {
        objects
            .into_iter()
            .flatten()
            .map(|o| {
                let meta = o.meta();
                ((meta.namespace.as_deref(), meta.name.as_deref()), &**o)
            })
            .collect()
    }
    fn each_changed<'a, T: kube::Resource>(
        old: Option<&'a Vec<std::sync::Arc<T>>>,
        new: Option<&'a Vec<std::sync::Arc<T>>>,
        differs: impl Fn(&T, &T) -> bool,
        mut note: impl FnMut(&T),
        mut event: impl FnMut(&T),
    ) {
        let (old, new) = (by_name(old), by_name(new));
        for (key, o) in &new {
            match old.get(key) {
                Some(prev) if !differs(prev, o) => {}
                Some(prev) => {
                    event(o);
                    note(prev);
                    note(o);
                }
                None => {
                    event(o);
                    note(o);
                }
            }
        }
        for (key, o) in &old {
            if !new.contains_key(key) {
                event(o);
                note(o);
            }
        }
    }
    // Counted apart: the two closures cannot both borrow `changes`.
    let mut events = Changes::default();
    each_changed(
        old.map(|o| &o.services),
        new.map(|o| &o.services),
        crate::snapshot::service_differs,
        |s| changes.service(s),
        |_| events.service_event(),
    );
    each_changed(
        old.map(|o| &o.slices),
        new.map(|o| &o.slices),
        crate::snapshot::slice_differs,
        |s| changes.slice(s),
        |s| events.slice_event(s),
    );
    changes.add(events);
}

/// Parses `paths`, on as many threads as there are CPUs (at most 4) when there are several:
/// a start-up with many large files is bound by YAML parsing.
fn parse_files<'p>(paths: &[&'p PathBuf]) -> Vec<(&'p PathBuf, anyhow::Result<FileObjects>)> {
    let threads = thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if paths.len() < 2 || threads < 2 {
        return paths.iter().map(|p| (*p, parse_file(p))).collect();
    }
    let per_thread = paths.len().div_ceil(threads);
    thread::scope(|scope| {
        let workers: Vec<_> = paths
            .chunks(per_thread)
            .map(|chunk| {
                let worker = scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|p| (*p, parse_file(p)))
                        .collect::<Vec<_>>()
                });
                (chunk, worker)
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|(chunk, worker)| {
                worker.join().unwrap_or_else(|_| {
                    chunk
                        .iter()
                        .map(|p| (*p, Err(anyhow::anyhow!("the parser panicked"))))
                        .collect()
                })
            })
            .collect()
    })
}

/// Parses one manifest file; any error rejects the whole file. The one-pass reading
/// (`Document`) is tried first; where it fails, the file is read again through untyped
/// values, which names the error as before (and reads what the one pass cannot, such as a
/// kind this proxy ignores whose fields clash with an EndpointSlice's).
fn parse_file(path: &Path) -> anyhow::Result<FileObjects> {
    let text = fs::read_to_string(path)?;
    parse_text(&text)
}

/// Parses one file's text; objects without a namespace get "default", as kubectl apply would
/// give them.
fn parse_text(text: &str) -> anyhow::Result<FileObjects> {
    let mut objects = parse_one_pass(text).or_else(|_| parse_values(text))?;
    for s in &mut objects.services {
        std::sync::Arc::make_mut(s)
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into());
    }
    for s in &mut objects.slices {
        std::sync::Arc::make_mut(s)
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into());
    }
    for p in &mut objects.pods {
        std::sync::Arc::make_mut(p)
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into());
    }
    Ok(objects)
}

impl Source for ManifestSource {
    fn name(&self) -> String {
        format!("manifests {}", self.dir.display())
    }

    fn run(self: Box<Self>, tx: Sender<Snapshot>) -> anyhow::Result<()> {
        // Last good parse per file: a file caught mid-write, or broken by an edit, keeps its
        // previous objects instead of deleting them.
        let mut cache: BTreeMap<PathBuf, FileObjects> = BTreeMap::new();
        let mut last: Option<Fingerprint> = None;
        let watch = DirWatch::new(&self.dir);
        if watch.is_none() {
            log::info!(
                "manifests: no inotify on {}; polling every {:?}",
                self.dir.display(),
                self.poll
            );
        }
        loop {
            let now = match fingerprint(&self.dir) {
                Ok(f) => f,
                Err(e) => {
                    log::warn!("manifests: {e:#}; keeping the last state");
                    thread::sleep(self.poll * 10);
                    continue;
                }
            };
            if last.as_ref() != Some(&now) {
                let mut changes = Changes::default();
                cache.retain(|path, objects| {
                    let kept = now.contains_key(path);
                    if !kept {
                        file_changes(Some(objects), None, &mut changes);
                    }
                    kept
                });
                let changed: Vec<&PathBuf> = now
                    .keys()
                    .filter(|path| {
                        last.as_ref().and_then(|l| l.get(*path)) != now.get(*path)
                            || !cache.contains_key(*path)
                    })
                    .collect();
                let parsed_bytes: u64 = changed
                    .iter()
                    .filter_map(|p| now.get(*p))
                    .map(|(_, len)| *len)
                    .sum();
                let parsed_files = parse_files(&changed);
                if parsed_bytes >= TRIM_AFTER_BYTES {
                    crate::heap::release_freed();
                }
                for (path, parsed) in parsed_files {
                    match parsed {
                        Ok(objects) => {
                            file_changes(cache.get(path), Some(&objects), &mut changes);
                            cache.insert(path.clone(), objects);
                        }
                        Err(e) => log::warn!(
                            "manifests: {} rejected: {e:#}; keeping its previous objects",
                            path.display()
                        ),
                    }
                }
                last = Some(now);
                let mut snapshot = self.snapshot(&cache);
                snapshot.changes = changes;
                if tx.send(snapshot).is_err() {
                    return Ok(());
                }
            }
            match &watch {
                Some(w) => w.wait(self.poll),
                None => thread::sleep(self.poll),
            }
        }
    }
}

impl ManifestSource {
    fn snapshot(&self, cache: &BTreeMap<PathBuf, FileObjects>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut node = None;
        for objects in cache.values() {
            snapshot.services.extend(objects.services.iter().cloned());
            snapshot.slices.extend(objects.slices.iter().cloned());
            snapshot.pods.extend(objects.pods.iter().cloned());
            snapshot
                .namespaces
                .extend(objects.namespaces.iter().cloned());
            snapshot
                .service_cidrs
                .extend(crate::snapshot::service_cidrs_of(&objects.service_cidrs));
            if let Some(n) = objects
                .nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            {
                node = Some(n.clone());
            }
        }
        snapshot.service_cidrs.sort();
        snapshot.service_cidrs.dedup();
        snapshot.foreign_services = crate::snapshot::foreign_services_of(&snapshot.services);
        snapshot.node = NodeInfo::with_node(self.node_name.clone(), node.as_ref());
        if let Some(book) = &self.node_addresses {
            book.set(
                cache
                    .values()
                    .flat_map(|o| o.nodes.iter())
                    .flat_map(addresses_of)
                    .collect(),
            );
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXED: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default, annotations: {kube-bpf-proxy.io/scheduler: rr}}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
  sessionAffinity: ClientIP
status: {loadBalancer: {ingress: [{ip: 192.0.2.1}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["10.244.0.2"], conditions: {ready: true}, nodeName: n1, zone: a}
- addresses: ["10.244.0.3"]
  conditions: {ready: false, serving: true, terminating: true}
  hints: {forZones: [{name: a}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}
  status: {addresses: [{type: InternalIP, address: 192.168.0.1}]}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: ignored}
  spec: {replicas: 2}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: also-ignored}
data: {a: b}
"#;

    fn summary(o: &FileObjects) -> String {
        format!("{:?} {:?} {:?}", o.services, o.slices, o.nodes)
    }

    /// Changes between two versions of a file, by name (semantics 11.4's pending changes): a
    /// Service changed and one added, a slice removed (IPv6) and one unchanged; a file that
    /// goes takes its objects with it.
    #[test]
    fn a_files_changes_are_counted_by_name() {
        let svc = |name: &str, port: u16| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
                 spec: {{clusterIP: 10.96.0.10, ports: [{{port: {port}}}]}}\n"
            )
        };
        let slice = |name: &str, family: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, \
                 namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: {family}\nendpoints: []\n"
            )
        };
        let old = parse_text(
            &[
                svc("web", 80),
                slice("web-4", "IPv4"),
                slice("web-6", "IPv6"),
            ]
            .join("---\n"),
        )
        .unwrap();
        let new =
            parse_text(&[svc("web", 81), svc("api", 80), slice("web-4", "IPv4")].join("---\n"))
                .unwrap();
        let counts = |old: Option<&FileObjects>, new: Option<&FileObjects>| {
            let mut c = Changes::default();
            file_changes(old, new, &mut c);
            c.counts()
        };
        assert_eq!(counts(Some(&old), Some(&new)), ([2, 0], [0, 1]));
        assert_eq!(counts(Some(&new), Some(&new)), ([0, 0], [0, 0]));
        assert_eq!(counts(Some(&old), None), ([1, 0], [1, 1]));
        assert_eq!(counts(None, Some(&new)), ([2, 0], [1, 0]));
        // A Service moved from one file to another (both changed in one pass) is one change
        // (and none if it is the same); a metadata-only edit is none (semantics 1.6).
        let mut c = Changes::default();
        file_changes(Some(&old), None, &mut c);
        file_changes(None, Some(&old), &mut c);
        assert_eq!(c.counts(), ([1, 0], [1, 1]));
        let relabelled = parse_text(
            &[
                svc("web", 80).replace("namespace: default}", "namespace: default, uid: x}"),
                slice("web-4", "IPv4"),
                slice("web-6", "IPv6"),
            ]
            .join("---\n"),
        )
        .unwrap();
        assert_eq!(counts(Some(&old), Some(&relabelled)), ([0, 0], [0, 0]));
    }

    #[test]
    fn one_pass_reads_what_untyped_values_read() {
        let fast = parse_one_pass(MIXED).unwrap();
        let slow = parse_values(MIXED).unwrap();
        assert_eq!(fast.services.len(), 1);
        assert_eq!(fast.slices.len(), 1);
        assert_eq!(fast.slices[0].endpoints.len(), 2);
        assert_eq!(fast.nodes.len(), 1);
        assert_eq!(summary(&fast), summary(&slow));
    }

    #[test]
    fn only_events_of_manifests_wake_the_source() {
        let dir = std::env::temp_dir().join(format!("kbp-dirwatch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let watch = DirWatch::new(&dir).expect("inotify");
        assert_eq!(watch.wait_once(Duration::from_millis(1)), None);
        // A tool's temporary file: events, none of a manifest.
        fs::write(dir.join(".a.yaml.tmp"), "kind: Service\n").unwrap();
        assert_eq!(watch.wait_once(Duration::from_millis(1)), Some(false));
        // Renamed into place: a manifest changed.
        fs::rename(dir.join(".a.yaml.tmp"), dir.join("a.yaml")).unwrap();
        assert_eq!(watch.wait_once(Duration::from_millis(1)), Some(true));
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(watch.wait_once(Duration::from_millis(1)), Some(true));
        assert_eq!(watch.wait_once(Duration::from_millis(1)), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_file_is_named_as_by_untyped_values() {
        let dir = std::env::temp_dir().join(format!("kbp-manifests-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for (name, text, want) in [
            (
                "bad-port.yaml",
                "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: http}]}\n",
                "invalid type",
            ),
            (
                "bad-endpoints.yaml",
                "kind: EndpointSlice\nmetadata: {name: a}\naddressType: IPv4\nendpoints: 7\n",
                "invalid type",
            ),
        ] {
            let path = dir.join(name);
            fs::write(&path, text).unwrap();
            let err = format!("{:#}", parse_file(&path).unwrap_err());
            assert!(err.contains(want), "{name}: {err}");
            assert!(parse_one_pass(text).is_err(), "{name}");
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
