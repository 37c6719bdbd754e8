//! A directory of YAML manifests (Service, EndpointSlice, Node; `List`s and multi-document
//! files too), re-read when any file changes. Used by `cargo xtask run` and the tests.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::mpsc::Sender,
    thread,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;

use super::{NodeAddresses, Source, addresses_of};
use crate::objects::Slice;
use crate::snapshot::{NodeInfo, Snapshot};

/// Objects parsed from one file.
#[derive(Clone, Debug, Default)]
struct FileObjects {
    /// Shared with every snapshot until the file changes.
    services: Vec<std::sync::Arc<Service>>,
    slices: Vec<std::sync::Arc<Slice>>,
    nodes: Vec<Node>,
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
        use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
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

    /// Waits up to `timeout` for a change; drains what arrived.
    fn wait(&self, timeout: Duration) {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
        if ready > 0 {
            let mut buf = [0u8; 4096];
            // SAFETY: reading into our buffer from our non-blocking fd until it is empty.
            while unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0
            {
            }
        }
    }
}

type Fingerprint = BTreeMap<PathBuf, (SystemTime, u64)>;

fn fingerprint(dir: &Path) -> anyhow::Result<Fingerprint> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let is_yaml = path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
        if !is_yaml {
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

/// Parses one manifest file; any error rejects the whole file.
fn parse_file(path: &Path) -> anyhow::Result<FileObjects> {
    let text = fs::read_to_string(path)?;
    let mut objects = FileObjects::default();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_norway::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        parse_document(value, &mut objects)?;
    }
    // Objects without a namespace default to "default", as kubectl apply would do.
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
                cache.retain(|path, _| now.contains_key(path));
                for path in now.keys() {
                    let changed = last.as_ref().and_then(|l| l.get(path)) != now.get(path);
                    if !changed && cache.contains_key(path) {
                        continue;
                    }
                    match parse_file(path) {
                        Ok(objects) => {
                            cache.insert(path.clone(), objects);
                        }
                        Err(e) => log::warn!(
                            "manifests: {} rejected: {e:#}; keeping its previous objects",
                            path.display()
                        ),
                    }
                }
                last = Some(now);
                let snapshot = self.snapshot(&cache);
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
            if let Some(n) = objects
                .nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            {
                node = Some(n.clone());
            }
        }
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
