//! `cargo xtask image`: an OCI image of the agent, written without a container daemon.
//!
//! One layer on no base image: the release binary at `/usr/local/bin/kube-bpf-proxy` (where
//! deploy/Dockerfile puts it), the shared libraries `ldd` lists for it (the dynamic loader
//! included) at the paths it lists, `/etc/nsswitch.conf` and an empty `/tmp`. The layer is
//! deterministic (entries sorted, parents first, owner 0:0, one mtime), so the same binary
//! always gives the same digests. Three outputs share the layer and the config:
//!
//! - `oci/`: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/`), tagged with the
//!   crate version (`org.opencontainers.image.ref.name`), gzip layer;
//! - `kube-bpf-proxy-<version>-oci-archive.tar`: that layout as a tar (`oci-archive:`);
//! - `kube-bpf-proxy-<version>-docker-archive.tar`: `docker save`'s format (`manifest.json`
//!   naming the config, the uncompressed layer and the tag `kube-bpf-proxy:<version>`).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::exec::{cargo, step, target_dir};

/// The image's name; its tag is the crate version (the agent and xtask share the workspace's).
const NAME: &str = "kube-bpf-proxy";
/// The workspace version, which is also the agent's (both use `version.workspace`).
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The agent's own one-line description (`kube-bpf-proxy --help`).
const DESCRIPTION: &str = "A Kubernetes service proxy in BPF";
/// Where the agent lives in the image: the same path as in deploy/Dockerfile's image.
const BINARY_PATH: &str = "usr/local/bin/kube-bpf-proxy";
/// glibc's built-in default without this file is `hosts: dns [!UNAVAIL=return] files`, which
/// consults /etc/hosts (kubelet mounts the node's for a hostNetwork pod) only when no DNS server
/// answers; a `--master` host name given there would not resolve. Files first, as on a node.
const NSSWITCH_CONF: &str = "hosts: files dns\n";
/// Docker's default PATH, so `kube-bpf-proxy ...` as a container command (`kubectl debug
/// ... -- kube-bpf-proxy cleanup`, deploy/README.md) finds the binary.
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(clap::Args)]
pub struct Options {
    /// Directory to write the image to (default `<target dir>/image`). Its `oci/` subdirectory
    /// is replaced; other files in it are left alone.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Builds the release agent, then writes the image and prints what it wrote.
pub fn image(opts: Options) -> anyhow::Result<()> {
    let binary = build_release_binary()?;
    let image = Image::build(&agent_tree(&binary)?, &Metadata::for_host()?)?;
    let out = opts.out.unwrap_or_else(|| target_dir().join("image"));
    let written = image.write(&out)?;
    println!("{}", written.describe(&image));
    Ok(())
}

/// `cargo build --release` of the agent (a no-op when it is up to date); returns the binary.
pub fn build_release_binary() -> anyhow::Result<PathBuf> {
    step(
        "build the release agent binary",
        cargo().args([
            "build",
            "--release",
            "-p",
            "proxy-userspace",
            "--bin",
            "kube-bpf-proxy",
        ]),
    )?;
    Ok(release_binary_path())
}

/// Where `cargo build --release` puts the agent.
pub fn release_binary_path() -> PathBuf {
    target_dir().join("release").join("kube-bpf-proxy")
}

/// A file or directory of a tree; modes are permission bits only.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
}

/// Files and directories by relative path, written as a tar or into a directory. Iteration is
/// by path components, so a directory comes before everything in it; adding a file adds its
/// missing parents (mode 0755).
#[derive(Clone, Debug, Default)]
struct Tree {
    entries: BTreeMap<PathBuf, Node>,
}

impl Tree {
    fn add_dir(&mut self, path: impl AsRef<Path>, mode: u32) {
        let path = path.as_ref();
        self.add_parents(path);
        self.entries.insert(path.to_path_buf(), Node::Dir { mode });
    }

    fn add_file(&mut self, path: impl AsRef<Path>, mode: u32, data: Vec<u8>) {
        let path = path.as_ref();
        self.add_parents(path);
        self.entries
            .insert(path.to_path_buf(), Node::File { mode, data });
    }

    fn add_parents(&mut self, path: &Path) {
        assert!(
            path.is_relative() && path.components().all(|c| c.as_os_str() != ".."),
            "tree paths are relative and stay inside: {}",
            path.display()
        );
        for parent in path.ancestors().skip(1) {
            if !parent.as_os_str().is_empty() {
                self.entries
                    .entry(parent.to_path_buf())
                    .or_insert(Node::Dir { mode: 0o755 });
            }
        }
    }

    /// A tar of the tree: GNU headers, owner 0:0, every mtime `mtime` (seconds since the
    /// epoch), no user or group names: the bytes depend on the contents and nothing else.
    fn tar(&self, mtime: u64) -> anyhow::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        for (path, node) in &self.entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(mtime);
            let data: &[u8] = match node {
                Node::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(*mode);
                    &[]
                }
                Node::File { mode, data } => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    data
                }
            };
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, path, data)
                .with_context(|| format!("tar entry {}", path.display()))?;
        }
        Ok(tar.into_inner()?)
    }

    /// Writes the tree under `dir` (created if missing).
    fn write_to(&self, dir: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for (path, node) in &self.entries {
            let dest = dir.join(path);
            let mode = match node {
                Node::Dir { mode } => {
                    std::fs::create_dir_all(&dest)
                        .with_context(|| format!("create {}", dest.display()))?;
                    *mode
                }
                Node::File { mode, data } => {
                    std::fs::write(&dest, data)
                        .with_context(|| format!("write {}", dest.display()))?;
                    *mode
                }
            };
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", dest.display()))?;
        }
        Ok(())
    }
}

/// The agent's root filesystem: the binary, its shared libraries and loader, the little glibc
/// reads at run time, and /tmp.
fn agent_tree(binary: &Path) -> anyhow::Result<Tree> {
    let mut tree = Tree::default();
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
    tree.add_file(BINARY_PATH, 0o755, read(binary)?);
    for lib in shared_libraries(binary)? {
        // Copied as regular files at the path the loader found them (a symlink such as
        // /lib64/ld-linux-x86-64.so.2 becomes the file it points to): without /etc/ld.so.cache
        // the loader searches the same system directories.
        let mode = file_mode(&lib)?;
        let rel = lib.strip_prefix("/").expect("ldd paths are absolute");
        tree.add_file(rel, mode, read(&lib)?);
    }
    tree.add_file(
        "etc/nsswitch.conf",
        0o644,
        NSSWITCH_CONF.as_bytes().to_vec(),
    );
    tree.add_dir("tmp", 0o1777);
    Ok(tree)
}

/// Permission bits of `path` (following symlinks).
fn file_mode(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(meta.permissions().mode() & 0o7777)
}

/// The shared libraries and the dynamic loader `binary` loads, as `ldd` resolves them here.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd (Debian package libc-bin)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A static binary: ldd says so and exits 1; it needs no library.
    if stdout.contains("statically linked") || stderr.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed ({}): {stderr}", binary.display(), out.status);
    }
    parse_ldd(&stdout).with_context(|| format!("ldd {}", binary.display()))
}

/// Paths out of `ldd` output, in its order: `name => /path (0x..)` and the loader's
/// `/path (0x..)`. The vDSO (`linux-vdso.so.1 (0x..)`) is the kernel's and has no file; a
/// `name => not found` is an error.
fn parse_ldd(out: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("{} is not found", name.trim());
                }
                rest
            }
            None => line,
        };
        let path = target.split_whitespace().next().unwrap_or_default();
        if path.starts_with('/') {
            paths.push(PathBuf::from(path));
        } else if !line.contains("=>") && path.starts_with("linux-vdso") {
            // The vDSO is mapped by the kernel.
        } else {
            bail!("unexpected ldd line: {line:?}");
        }
    }
    if !paths.is_empty() && !paths.iter().any(|p| is_loader(p)) {
        bail!("ldd listed libraries but no dynamic loader: {paths:?}");
    }
    Ok(paths)
}

/// `ld-linux-x86-64.so.2`, `ld-linux-aarch64.so.1`, ...
fn is_loader(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("ld-linux"))
}

/// What the image says about itself.
#[derive(Clone, Debug)]
struct Metadata {
    version: String,
    /// GOARCH spelling, as OCI platforms use it.
    architecture: &'static str,
    /// Seconds since the epoch: the config's `created` and every tar mtime.
    epoch: u64,
}

impl Metadata {
    /// This machine's architecture (the binary is built for it) and `SOURCE_DATE_EPOCH`, the
    /// reproducible-builds convention, or 0 (1970-01-01).
    fn for_host() -> anyhow::Result<Metadata> {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => bail!("no OCI architecture name known for {other}"),
        };
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds"))?,
            Err(_) => 0,
        };
        Ok(Metadata {
            version: VERSION.to_string(),
            architecture,
            epoch,
        })
    }

    /// `kube-bpf-proxy:<version>`.
    fn tag(&self) -> String {
        format!("{NAME}:{}", self.version)
    }
}

/// Bytes named by their SHA-256.
#[derive(Clone, Debug)]
struct Blob {
    media_type: &'static str,
    bytes: Vec<u8>,
}

impl Blob {
    fn hex(&self) -> String {
        sha256_hex(&self.bytes)
    }

    fn digest(&self) -> String {
        format!("sha256:{}", self.hex())
    }

    fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type,
            digest: self.digest(),
            size: self.bytes.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

// The JSON documents. Structs, not `json!`: field order is the declaration order whatever
// serde_json's features, so the bytes (and digests) do not depend on the build.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Platform {
    architecture: &'static str,
    os: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The image configuration (also Docker's image JSON: same fields).
#[derive(Serialize)]
struct Config {
    created: String,
    architecture: &'static str,
    os: &'static str,
    config: RunConfig,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    env: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created: String,
    created_by: &'static str,
}

/// One entry of a docker-archive's `manifest.json`.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// The image in memory: the uncompressed layer, and the blobs of the OCI layout.
struct Image {
    meta: Metadata,
    layer_tar: Vec<u8>,
    layer: Blob,
    config: Blob,
    manifest: Blob,
}

impl Image {
    fn build(root: &Tree, meta: &Metadata) -> anyhow::Result<Image> {
        let layer_tar = root.tar(meta.epoch)?;
        let layer = Blob {
            media_type: MEDIA_LAYER_GZIP,
            bytes: gzip(&layer_tar)?,
        };
        let created = rfc3339(meta.epoch);
        let labels = BTreeMap::from(
            [
                ("org.opencontainers.image.title", NAME),
                ("org.opencontainers.image.version", &meta.version),
                ("org.opencontainers.image.description", DESCRIPTION),
                (
                    "org.opencontainers.image.licenses",
                    env!("CARGO_PKG_LICENSE"),
                ),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let config = Config {
            created: created.clone(),
            architecture: meta.architecture,
            os: "linux",
            config: RunConfig {
                env: vec![PATH_ENV.to_string()],
                entrypoint: vec![format!("/{BINARY_PATH}")],
                // As deploy/Dockerfile: the DaemonSet gives `run` and its flags as args.
                cmd: vec!["--help".to_string()],
                labels,
            },
            rootfs: RootFs {
                kind: "layers",
                diff_ids: vec![format!("sha256:{}", sha256_hex(&layer_tar))],
            },
            history: vec![History {
                created,
                created_by: "cargo xtask image",
            }],
        };
        let config = Blob {
            media_type: MEDIA_CONFIG,
            bytes: serde_json::to_vec(&config)?,
        };
        let manifest = Manifest {
            schema_version: 2,
            media_type: MEDIA_MANIFEST,
            config: config.descriptor(),
            layers: vec![layer.descriptor()],
        };
        let manifest = Blob {
            media_type: MEDIA_MANIFEST,
            bytes: serde_json::to_vec(&manifest)?,
        };
        Ok(Image {
            meta: meta.clone(),
            layer_tar,
            layer,
            config,
            manifest,
        })
    }

    /// The OCI image layout: `oci-layout`, `index.json` (the manifest, tagged with the version)
    /// and the blobs.
    fn layout(&self) -> anyhow::Result<Tree> {
        let mut manifest = self.manifest.descriptor();
        manifest.platform = Some(Platform {
            architecture: self.meta.architecture,
            os: "linux",
        });
        manifest.annotations.insert(
            "org.opencontainers.image.ref.name".to_string(),
            self.meta.version.clone(),
        );
        let index = Index {
            schema_version: 2,
            media_type: MEDIA_INDEX,
            manifests: vec![manifest],
        };
        let mut tree = Tree::default();
        tree.add_file(
            "oci-layout",
            0o644,
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        );
        tree.add_file("index.json", 0o644, serde_json::to_vec(&index)?);
        for blob in [&self.manifest, &self.config, &self.layer] {
            tree.add_file(
                Path::new("blobs/sha256").join(blob.hex()),
                0o644,
                blob.bytes.clone(),
            );
        }
        Ok(tree)
    }

    /// `docker save`'s format: `manifest.json`, the config as `<hex>.json`, the uncompressed
    /// layer as `<diff id hex>/layer.tar`.
    fn docker_archive(&self) -> anyhow::Result<Tree> {
        let config_name = format!("{}.json", self.config.hex());
        let layer_name = format!("{}/layer.tar", sha256_hex(&self.layer_tar));
        let manifest = [DockerManifest {
            config: config_name.clone(),
            repo_tags: vec![self.meta.tag()],
            layers: vec![layer_name.clone()],
        }];
        let mut tree = Tree::default();
        tree.add_file("manifest.json", 0o644, serde_json::to_vec(&manifest)?);
        tree.add_file(config_name, 0o644, self.config.bytes.clone());
        tree.add_file(layer_name, 0o644, self.layer_tar.clone());
        Ok(tree)
    }

    /// Writes the layout directory `out/oci` (replacing it) and the two archives in `out`.
    fn write(&self, out: &Path) -> anyhow::Result<Written> {
        let written = Written::in_dir(out, &self.meta.version);
        match std::fs::remove_dir_all(&written.layout) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("remove {}", written.layout.display()));
            }
        }
        let layout = self.layout()?;
        layout.write_to(&written.layout)?;
        let write = |path: &Path, bytes: Vec<u8>| {
            std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
        };
        write(&written.oci_archive, layout.tar(self.meta.epoch)?)?;
        write(
            &written.docker_archive,
            self.docker_archive()?.tar(self.meta.epoch)?,
        )?;
        Ok(written)
    }
}

/// Where `Image::write` puts things.
struct Written {
    layout: PathBuf,
    oci_archive: PathBuf,
    docker_archive: PathBuf,
}

impl Written {
    fn in_dir(out: &Path, version: &str) -> Written {
        Written {
            layout: out.join("oci"),
            oci_archive: out.join(format!("{NAME}-{version}-oci-archive.tar")),
            docker_archive: out.join(format!("{NAME}-{version}-docker-archive.tar")),
        }
    }

    /// What was written, with digests and sizes.
    fn describe(&self, image: &Image) -> String {
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        let size = |p: &Path| mib(std::fs::metadata(p).map_or(0, |m| m.len()));
        format!(
            "image {tag} ({arch}), one layer: {gz:.1} MiB gzip, {tar:.1} MiB uncompressed\n\
             manifest {manifest}\n\
             config   {config}\n\
             layer    {layer}\n\
             {layout}: OCI layout, tag {version}\n\
             {oci}: oci-archive, {oci_size:.1} MiB\n\
             {docker}: docker-archive, {docker_size:.1} MiB",
            tag = image.meta.tag(),
            arch = image.meta.architecture,
            gz = mib(image.layer.bytes.len() as u64),
            tar = mib(image.layer_tar.len() as u64),
            manifest = image.manifest.digest(),
            config = image.config.digest(),
            layer = image.layer.digest(),
            layout = self.layout.display(),
            version = image.meta.version,
            oci = self.oci_archive.display(),
            oci_size = size(&self.oci_archive),
            docker = self.docker_archive.display(),
            docker_size = size(&self.docker_archive),
        )
    }
}

/// gzip with a zero header mtime and no file name: the bytes depend on `data` and the
/// compressor's version only.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(data)?;
    Ok(gz.finish()?)
}

/// `secs` since the epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
fn rfc3339(secs: u64) -> String {
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let mut days = secs / 86_400;
    let mut year = 1970;
    while days >= if leap(year) { 366 } else { 365 } {
        days -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let february = if leap(year) { 29 } else { 28 };
    let mut month = 1;
    for len in [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31] {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        day = days + 1
    )
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read as _,
        path::{Path, PathBuf},
        process::Command,
        sync::atomic::{AtomicU32, Ordering},
    };

    use ::tests::harness::skip::{Privileges, REQUIRE_PRIVILEGES_ENV, privileges_for, skip};
    use serde_json::Value;

    use super::*;

    /// A directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("xtask-image-{}-{n}-{tag}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {dir:?}: {e}"));
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("remove {}: {e}", self.0.display());
            }
        }
    }

    /// A small tree standing in for the agent's.
    fn sample_tree() -> Tree {
        let mut tree = Tree::default();
        tree.add_file(BINARY_PATH, 0o755, b"#!/bin/false\n".to_vec());
        tree.add_file("lib64/ld-linux-x86-64.so.2", 0o755, vec![7; 3000]);
        tree.add_file("lib/x86_64-linux-gnu/libc.so.6", 0o755, vec![1; 1000]);
        tree.add_file(
            "etc/nsswitch.conf",
            0o644,
            NSSWITCH_CONF.as_bytes().to_vec(),
        );
        tree.add_dir("tmp", 0o1777);
        tree
    }

    fn sample_meta() -> Metadata {
        Metadata {
            version: VERSION.to_string(),
            architecture: "amd64",
            epoch: 1_700_000_000,
        }
    }

    /// `(path, type, mode, uid, gid, mtime, contents)` of every entry of a tar, in order.
    type TarEntry = (String, tar::EntryType, u32, u64, u64, u64, Vec<u8>);

    fn tar_entries(bytes: &[u8]) -> Vec<TarEntry> {
        let mut archive = tar::Archive::new(bytes);
        archive
            .entries()
            .expect("tar entries")
            .map(|e| {
                let mut e = e.expect("tar entry");
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read tar entry");
                (
                    e.path().expect("entry path").display().to_string(),
                    h.entry_type(),
                    h.mode().expect("mode"),
                    h.uid().expect("uid"),
                    h.gid().expect("gid"),
                    h.mtime().expect("mtime"),
                    data,
                )
            })
            .collect()
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .expect("gunzip");
        out
    }

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("JSON")
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    #[test]
    fn ldd_output_gives_libraries_and_loader_in_order() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd7a5f2000)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f5cad09f000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f5caa41e000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f5cad0d2000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        let missing = "\tlibbpf.so.1 => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x1)\n";
        let err = parse_ldd(missing).unwrap_err().to_string();
        assert!(err.contains("libbpf.so.1 is not found"), "{err}");
        let no_loader = "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n";
        assert!(parse_ldd(no_loader).is_err());
    }

    #[test]
    fn layer_is_sorted_parents_first_owned_by_root_with_one_mtime() {
        let tree = sample_tree();
        let bytes = tree.tar(1_700_000_000).unwrap();
        assert_eq!(
            bytes,
            tree.tar(1_700_000_000).unwrap(),
            "same tree, same bytes"
        );
        let entries = tar_entries(&bytes);
        let paths: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "etc",
                "etc/nsswitch.conf",
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib64",
                "lib64/ld-linux-x86-64.so.2",
                "tmp",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/kube-bpf-proxy",
            ]
        );
        for (path, kind, mode, uid, gid, mtime, _) in &entries {
            assert_eq!((*uid, *gid, *mtime), (0, 0, 1_700_000_000), "{path}");
            let want = match path.as_str() {
                "tmp" => (tar::EntryType::Directory, 0o1777),
                "etc/nsswitch.conf" => (tar::EntryType::Regular, 0o644),
                p if p.contains('.') || p.ends_with("proxy") => (tar::EntryType::Regular, 0o755),
                _ => (tar::EntryType::Directory, 0o755),
            };
            assert_eq!((*kind, *mode), want, "{path}");
        }
        let binary = entries.iter().find(|e| e.0 == BINARY_PATH).unwrap();
        assert_eq!(binary.6, b"#!/bin/false\n");
    }

    #[test]
    fn written_image_is_self_consistent_in_all_three_forms() {
        let image = Image::build(&sample_tree(), &sample_meta()).unwrap();
        let dir = Scratch::new("consistent");
        let written = image.write(&dir.0).unwrap();

        // The layout: oci-layout, and index.json tagging one manifest with the version.
        assert_eq!(
            json(&read(&written.layout.join("oci-layout"))),
            serde_json::json!({"imageLayoutVersion": "1.0.0"})
        );
        let index = json(&read(&written.layout.join("index.json")));
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], MEDIA_INDEX);
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1);
        let desc = &manifests[0];
        assert_eq!(
            desc["annotations"]["org.opencontainers.image.ref.name"],
            VERSION
        );
        assert_eq!(
            desc["platform"],
            serde_json::json!({"architecture": "amd64", "os": "linux"})
        );
        // Every descriptor names a blob of that size and digest.
        let blob = |desc: &Value| -> Vec<u8> {
            let digest = desc["digest"].as_str().unwrap();
            let hex = digest.strip_prefix("sha256:").unwrap();
            let bytes = read(&written.layout.join("blobs/sha256").join(hex));
            assert_eq!(sha256_hex(&bytes), hex, "{digest}");
            assert_eq!(desc["size"], bytes.len() as u64, "{digest}");
            bytes
        };
        assert_eq!(desc["mediaType"], MEDIA_MANIFEST);
        let manifest = json(&blob(desc));
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["config"]["mediaType"], MEDIA_CONFIG);
        let config_bytes = blob(&manifest["config"]);
        let config = json(&config_bytes);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], MEDIA_LAYER_GZIP);
        let layer_tar = gunzip(&blob(&layers[0]));
        let diff_id = format!("sha256:{}", sha256_hex(&layer_tar));

        // The config: what runs, labels, and the uncompressed layer's digest.
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["created"], "2023-11-14T22:13:20Z");
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]));
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(["/usr/local/bin/kube-bpf-proxy"])
        );
        assert_eq!(config["config"]["Cmd"], serde_json::json!(["--help"]));
        assert_eq!(
            config["config"]["Labels"]["org.opencontainers.image.version"],
            VERSION
        );
        let paths: Vec<String> = tar_entries(&layer_tar).into_iter().map(|e| e.0).collect();
        assert!(paths.contains(&BINARY_PATH.to_string()), "{paths:?}");

        // The oci-archive holds exactly the layout's files.
        let archived = tar_entries(&read(&written.oci_archive));
        let files: Vec<(String, Vec<u8>)> = archived
            .into_iter()
            .filter(|e| e.1 == tar::EntryType::Regular)
            .map(|e| (e.0, e.6))
            .collect();
        assert_eq!(files.len(), 5, "oci-layout, index.json, 3 blobs");
        for (path, bytes) in &files {
            assert_eq!(&read(&written.layout.join(path)), bytes, "{path}");
        }

        // The docker-archive: manifest.json names the same config and the uncompressed layer.
        let docker: BTreeMap<String, Vec<u8>> = tar_entries(&read(&written.docker_archive))
            .into_iter()
            .filter(|e| e.1 == tar::EntryType::Regular)
            .map(|e| (e.0, e.6))
            .collect();
        let docker_manifest = json(&docker["manifest.json"]);
        let entry = &docker_manifest.as_array().unwrap()[0];
        assert_eq!(
            entry["RepoTags"],
            serde_json::json!([format!("kube-bpf-proxy:{VERSION}")])
        );
        let config_name = entry["Config"].as_str().unwrap();
        assert_eq!(docker[config_name], config_bytes);
        let layer_name = entry["Layers"][0].as_str().unwrap();
        assert_eq!(docker[layer_name], layer_tar);
        assert_eq!(docker.len(), 3, "{:?}", docker.keys().collect::<Vec<_>>());
    }

    #[test]
    fn epoch_seconds_format_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    /// True if every tool is on PATH. Otherwise the test cannot run: a failure as root or under
    /// CI (`cargo xtask setup` installs them), else a recorded skip; the caller returns.
    fn have_tools(tools: &[&str]) -> bool {
        let missing: Vec<&str> = tools
            .iter()
            .copied()
            .filter(|t| Command::new(t).arg("--version").output().is_err())
            .collect();
        if missing.is_empty() {
            return true;
        }
        let why = format!(
            "missing: {} (`cargo xtask setup` installs the Debian packages)",
            missing.join(", ")
        );
        // SAFETY: plain getter.
        let euid = unsafe { libc::geteuid() };
        let ci = std::env::var("CI").ok();
        let require = std::env::var(REQUIRE_PRIVILEGES_ENV).ok();
        match privileges_for(euid, ci.as_deref(), require.as_deref()) {
            Privileges::Skip(_) => {
                skip(&why);
                false
            }
            Privileges::Run | Privileges::Fail(_) => panic!("{why}"),
        }
    }

    /// Runs `cmd`, panicking with its output if it fails; returns stdout.
    fn run(cmd: &mut Command) -> Vec<u8> {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Every file under `dir` by relative path, with its contents.
    fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{d:?}: {e}")) {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                    files.insert(rel, read(&p));
                }
            }
        }
        files
    }

    /// The image of the real release binary: two builds give the same bytes (so the same
    /// digests); umoci unpacks the layout and the agent runs inside its root filesystem with
    /// only the image's files (chroot as root, else through the image's own loader); skopeo
    /// reads the same config out of both archives and copies the docker-archive's layer.
    /// The first run builds the release binary; later runs reuse it.
    #[test]
    fn image_of_the_release_binary_is_reproducible_unpacks_and_runs() {
        if !have_tools(&["umoci", "skopeo"]) {
            return;
        }
        let binary = release_binary_path();
        if !binary.exists() {
            build_release_binary().unwrap_or_else(|e| panic!("{e:#}"));
        }
        let meta = Metadata::for_host().unwrap();
        let dir = Scratch::new("release");
        let build = |out: &str| {
            let tree = agent_tree(&binary).unwrap_or_else(|e| panic!("{e:#}"));
            let image = Image::build(&tree, &meta).unwrap_or_else(|e| panic!("{e:#}"));
            let written = image.write(&dir.0.join(out)).unwrap();
            eprintln!("{}", written.describe(&image));
            (image, written)
        };
        let (image, a) = build("a");
        let (_, b) = build("b");
        let files_a = files_under(&dir.0.join("a"));
        assert_eq!(files_a.len(), 7, "{:?}", files_a.keys().collect::<Vec<_>>());
        assert!(
            files_a == files_under(&dir.0.join("b")),
            "two images of one binary differ"
        );

        // umoci: the layout, by tag, into a runtime bundle.
        // SAFETY: a plain getter.
        let root = unsafe { libc::geteuid() } == 0;
        let bundle = dir.0.join("bundle");
        let mut unpack = Command::new("umoci");
        unpack.arg("unpack");
        if !root {
            unpack.arg("--rootless");
        }
        unpack
            .arg("--image")
            .arg(format!("{}:{VERSION}", a.layout.display()))
            .arg(&bundle);
        run(&mut unpack);
        let rootfs = bundle.join("rootfs");
        let version = if root {
            run(Command::new("chroot")
                .arg(&rootfs)
                .arg(format!("/{BINARY_PATH}"))
                .arg("--version"))
        } else {
            // Without root: the image's loader, told to look for libraries in the image first
            // (it would still fall back to the host's directories; chroot, under CI, cannot).
            let libs = shared_libraries(&binary).unwrap();
            let loader = libs.iter().find(|p| is_loader(p)).unwrap();
            let lib_dirs: Vec<String> = libs
                .iter()
                .map(|l| rootfs.join(l.parent().unwrap().strip_prefix("/").unwrap()))
                .map(|d| d.display().to_string())
                .collect();
            run(Command::new(rootfs.join(loader.strip_prefix("/").unwrap()))
                .arg("--library-path")
                .arg(lib_dirs.join(":"))
                .arg(rootfs.join(BINARY_PATH))
                .arg("--version"))
        };
        assert_eq!(
            String::from_utf8_lossy(&version),
            format!("kube-bpf-proxy {VERSION}\n")
        );

        // skopeo (the containers/image library podman uses) reads both archives: the same
        // config, byte for byte.
        let raw_config = |reference: String| {
            run(Command::new("skopeo").args(["inspect", "--raw", "--config", &reference]))
        };
        let oci = format!("oci-archive:{}:{VERSION}", a.oci_archive.display());
        let docker = format!("docker-archive:{}", a.docker_archive.display());
        assert_eq!(raw_config(oci), image.config.bytes);
        assert_eq!(raw_config(docker.clone()), image.config.bytes);
        // Copying out of the docker-archive reads its layer (skopeo compresses it for the
        // OCI layout it writes): the same config and the same layer contents come out.
        let copied = dir.0.join("copied");
        run(Command::new("skopeo").args([
            "--insecure-policy",
            "copy",
            "--quiet",
            &docker,
            &format!("oci:{}:{VERSION}", copied.display()),
        ]));
        let blob = |digest: &Value| {
            let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
            read(&copied.join("blobs/sha256").join(hex))
        };
        let index = json(&read(&copied.join("index.json")));
        let manifest = json(&blob(&index["manifests"][0]["digest"]));
        assert_eq!(manifest["config"]["digest"], image.config.digest());
        let layer = &manifest["layers"][0];
        let bytes = blob(&layer["digest"]);
        let layer_tar = match layer["mediaType"].as_str().unwrap() {
            m if m.ends_with("gzip") => gunzip(&bytes),
            _ => bytes,
        };
        assert!(
            layer_tar == image.layer_tar,
            "the layer skopeo copied out of the docker-archive differs ({})",
            layer["mediaType"]
        );
        drop((a, b));
    }
}
