//! The BPF programs on other kernels than the machine's own: each kernel of [`KERNELS`], from
//! Debian's or Ubuntu's archive, boots in a qemu guest whose root is this machine's file system (9p), and
//! runs the `bpf_programs` test binary there: every program through the kernel's verifier,
//! and the packet cases through `BPF_PROG_TEST_RUN`. A newer development machine would
//! otherwise hide a program an older supported kernel rejects (a verifier of another
//! generation, a helper it lacks).
//!
//! The guest is emulated (TCG): no nested virtualisation is needed, and the verifier and the
//! test runs are CPU work the emulator does well enough.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sha2::Digest as _;

use crate::exec::{probe, step, target_dir};

/// A kernel the programs are checked on.
pub struct Kernel {
    /// Kernel series, as the summary names it.
    pub series: &'static str,
    source: Source,
}

/// Where a kernel's packages come from.
enum Source {
    /// Debian's archive, through the machine's apt sources: the newest package whose name
    /// starts with `prefix` and ends with `suffix`, the kernel and its modules in one.
    Debian {
        prefix: &'static str,
        suffix: &'static str,
    },
    /// Ubuntu's archive over HTTP (not among a Debian machine's apt sources): the newest ABI
    /// of kernel `version` in the package index `dist` (`<ARCHIVE>/dists/<dist>/main`), whose
    /// kernel (`linux-image-unsigned-<version>-<abi>-generic`) and modules
    /// (`linux-modules-<version>-<abi>-generic`) are two packages. Checked as apt checks
    /// them: the release file's signature with Ubuntu's keyring (`UBUNTU_KEYRING`), the
    /// index's sum with the release file, the packages' sums with the index.
    Ubuntu {
        dist: &'static str,
        version: &'static str,
    },
}

/// Ubuntu's archive.
const UBUNTU_ARCHIVE: &str = "http://archive.ubuntu.com/ubuntu";

/// A kernel's archive could not be reached for its keyring, release file or index (no name
/// resolution, no connection, nothing in time) and no earlier run left the kernel: the
/// network this runs in does not reach it, which the test command reports as a skip by name
/// rather than a failure. Anything else (a package missing from the index, a signature or
/// sum that does not match, a package download that fails, an HTTP error) fails.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Ubuntu's archive keyring package in noble's release pocket (which never changes), pinned by
/// its SHA-256 sum: the trust anchor for the archive's signed release files, as an Ubuntu
/// machine's apt has it.
const UBUNTU_KEYRING: (&str, &str) = (
    "pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb",
    "36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8",
);

/// The kernels checked besides the machine's own. Ubuntu 24.04's 6.8 is the oldest the agent
/// is checked on (`proxy_userspace::datapath::kernel::OLDEST`: TCX came with 6.6, and its
/// verifier rounds each stack frame up to 32 bytes, as verifiers before 6.9 do, so it guards
/// the call chains' stack), Debian's 6.12 the newest long-term kernel before the machine's.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        series: "6.8",
        source: Source::Ubuntu {
            dist: "noble-updates",
            version: "6.8.0",
        },
    },
    Kernel {
        series: "6.12",
        source: Source::Debian {
            prefix: "linux-image-6.12.",
            suffix: "+deb12-amd64-unsigned",
        },
    },
];

/// Debian packages the guests need: the emulator, a static shell for the initramfs, cpio to
/// pack it, depmod, xz and zstd for the kernel's modules (and the package index), curl and
/// gpgv for Ubuntu's archive.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    "zstd",
    "curl",
    "gpgv",
];

/// Modules the initramfs loads, in order, to mount the host's root over 9p (those built into
/// a kernel are not in its tree and are passed over).
const ROOT_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
];

/// How long one guest may run before it is stopped and counted as failed (a run takes about
/// four minutes with two test threads).
const GUEST_LIMIT: Duration = Duration::from_secs(15 * 60);

/// A kernel unpacked under `target/kernels/<package>`, with its initramfs.
pub struct Prepared {
    pub series: &'static str,
    pub package: String,
    dir: PathBuf,
    vmlinuz: PathBuf,
    release: String,
}

/// The newest Debian package named `prefix`…`suffix` the machine's package lists know.
fn newest_package(prefix: &str, suffix: &str) -> anyhow::Result<String> {
    let pattern = format!(
        "^{}.*{}$",
        prefix.replace('.', "\\."),
        suffix.replace('.', "\\.").replace('+', "\\+")
    );
    let list =
        probe("apt-cache", &["search", "--names-only", &pattern]).context("apt-cache search")?;
    let mut names: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix) && n.ends_with(suffix))
        .map(str::to_string)
        .collect();
    names.sort_by_key(|a| version_key(a));
    names.pop().with_context(|| {
        format!("no Debian package {prefix}*{suffix} in the package lists (apt-get update?)")
    })
}

/// The numbers in a package name, for ordering `6.12.9` before `6.12.10`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Downloads and unpacks `kernel` and builds its initramfs, unless an earlier run did.
pub fn prepare(kernel: &'static Kernel) -> anyhow::Result<Prepared> {
    let package = match kernel.source {
        Source::Debian { prefix, suffix } => prepare_debian(prefix, suffix)?,
        Source::Ubuntu { dist, version } => prepare_ubuntu(dist, version)?,
    };
    let dir = unpacked(&package)?;
    let root = dir.join("root");
    let initrd = dir.join("initrd.gz");
    let release = only_entry(&root.join("lib/modules"))?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} is missing", vmlinuz.display());
    }
    let prepared = Prepared {
        series: kernel.series,
        package,
        dir,
        vmlinuz,
        release,
    };
    if !initrd.exists() {
        prepared.build_initrd()?;
    }
    prepared.write_guest_script()?;
    Ok(prepared)
}

/// The newest Debian kernel package named `prefix`…`suffix`, unpacked.
fn prepare_debian(prefix: &str, suffix: &str) -> anyhow::Result<String> {
    let mut package = newest_package(prefix, suffix)?;
    if !unpacked(&package)?.join("initrd.gz").exists() && download(&package).is_err() {
        // Package lists older than the mirror name a version it no longer carries: the lists
        // are updated and the newest package named again.
        step(
            "kernels: apt-get update",
            Command::new("apt-get").args(["update", "-q"]),
        )?;
        package = newest_package(prefix, suffix)?;
        if !unpacked(&package)?.join("initrd.gz").exists() {
            download(&package)?;
        }
    }
    Ok(package)
}

/// A package of an archive's index: where it is and its SHA-256 sum.
#[derive(Debug, PartialEq)]
struct Indexed {
    filename: String,
    sha256: String,
}

/// The newest Ubuntu kernel `version` of index `dist` with its modules, unpacked (named by
/// its image package). When the index cannot be had, or the kernel's packages cannot be
/// downloaded, a kernel an earlier run unpacked serves.
fn prepare_ubuntu(dist: &str, version: &str) -> anyhow::Result<String> {
    let index = match ubuntu_index(dist) {
        Ok(index) => index,
        Err(e) => {
            if let Ok(earlier) = earlier_ubuntu(version) {
                eprintln!("kernels: {e:#}; the kernel an earlier run unpacked serves");
                return Ok(earlier);
            }
            if e.is::<Unreachable>() {
                return Err(e);
            }
            return Err(e.context(format!("no earlier kernel {version} unpacked")));
        }
    };
    let (image, modules) = newest_ubuntu(&index, version).with_context(|| {
        format!("no linux-image-unsigned-{version}-*-generic with its modules in Ubuntu's {dist}")
    })?;
    let package = package_name(&image.filename);
    let dir = unpacked(&package)?;
    if dir.join("initrd.gz").exists() {
        return Ok(package);
    }
    match unpack_ubuntu(&dir, &[&image, &modules]) {
        Ok(()) => Ok(package),
        Err(e) => match earlier_ubuntu(version) {
            Ok(earlier) => {
                eprintln!("kernels: {e:#}; the kernel an earlier run unpacked serves");
                Ok(earlier)
            }
            Err(_) => Err(e),
        },
    }
}

/// Downloads `packages` (their sums checked against the signed index's) and unpacks them into
/// `dir/root`, made afresh.
fn unpack_ubuntu(dir: &Path, packages: &[&Indexed]) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for p in packages {
        let url = format!("{UBUNTU_ARCHIVE}/{}", p.filename);
        eprintln!("\n==> kernels: downloading {url}");
        let deb = fetch(&url, DEB_TIME).map_err(|e| anyhow::anyhow!("{e:#}"))?;
        check_sum(&url, &deb, &p.sha256)?;
        let path = dir.join(package_name(&p.filename) + ".deb");
        fs::write(&path, &deb)?;
        unpack_deb(&path, &dir.join("root"))?;
    }
    Ok(())
}

/// The package index (`Packages`) of `dist`'s main component, as text: its release file
/// (`InRelease`) verified with Ubuntu's archive keyring, the index checked against the sum the
/// release file gives it. An archive out of reach is `Unreachable`.
fn ubuntu_index(dist: &str) -> anyhow::Result<String> {
    let keyring = ubuntu_keyring()?;
    let release_url = format!("{UBUNTU_ARCHIVE}/dists/{dist}/InRelease");
    let signed = fetch(&release_url, INDEX_TIME)?;
    let release_path = target_dir()
        .join("kernels")
        .join(format!("{dist}.InRelease"));
    fs::write(&release_path, &signed)?;
    let verified = Command::new("gpgv")
        .arg("--keyring")
        .arg(&keyring)
        .args(["--output", "-"])
        .arg(&release_path)
        .output()
        .context("run gpgv (`cargo xtask setup` installs it)")?;
    if !verified.status.success() {
        bail!(
            "{release_url}: the signature does not verify with {}: {}",
            keyring.display(),
            String::from_utf8_lossy(&verified.stderr).trim()
        );
    }
    let release = String::from_utf8_lossy(&verified.stdout);
    const INDEX: &str = "main/binary-amd64/Packages.xz";
    let sum = release_sum(&release, INDEX)
        .with_context(|| format!("{release_url} gives no SHA-256 sum of {INDEX}"))?;
    let index_url = format!("{UBUNTU_ARCHIVE}/dists/{dist}/{INDEX}");
    let xz = fetch(&index_url, INDEX_TIME)?;
    check_sum(&index_url, &xz, &sum)?;
    unpack_xz(&xz)
}

/// Ubuntu's archive keyring, from the `ubuntu-keyring` package pinned by its sum
/// ([`UBUNTU_KEYRING`]), unpacked under `target/kernels/ubuntu-keyring` by the first run.
fn ubuntu_keyring() -> anyhow::Result<PathBuf> {
    let dir = std::path::absolute(target_dir().join("kernels/ubuntu-keyring"))?;
    let keyring = dir.join("root/usr/share/keyrings/ubuntu-archive-keyring.gpg");
    if keyring.exists() {
        return Ok(keyring);
    }
    let (file, sha256) = UBUNTU_KEYRING;
    let url = format!("{UBUNTU_ARCHIVE}/{file}");
    let deb = fetch(&url, INDEX_TIME)?;
    check_sum(&url, &deb, sha256)?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let path = dir.join("ubuntu-keyring.deb");
    fs::write(&path, &deb)?;
    unpack_deb(&path, &dir.join("root"))?;
    if !keyring.exists() {
        bail!("{url} holds no {}", keyring.display());
    }
    Ok(keyring)
}

/// The SHA-256 sum a release file (`InRelease`, verified) gives the index file `path`.
fn release_sum(release: &str, path: &str) -> Option<String> {
    release
        .lines()
        .skip_while(|l| l.trim_end() != "SHA256:")
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .find_map(|l| {
            let mut words = l.split_whitespace();
            let (sum, _size, file) = (words.next()?, words.next()?, words.next()?);
            (file == path).then(|| sum.to_string())
        })
}

/// Fails unless `data` (from `url`) has the SHA-256 sum `expected` (hex).
fn check_sum(url: &str, data: &[u8], expected: &str) -> anyhow::Result<()> {
    let sum = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    if sum != expected {
        bail!("{url}: SHA-256 {sum}, expected {expected}");
    }
    Ok(())
}

/// The newest kernel `version` an earlier run unpacked from Ubuntu's archive, if any.
fn earlier_ubuntu(version: &str) -> anyhow::Result<String> {
    let prefix = format!("linux-image-unsigned-{version}-");
    let mut names: Vec<String> = fs::read_dir(target_dir().join("kernels"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .filter(|n| unpacked(n).is_ok_and(|d| d.join("initrd.gz").exists()))
        .collect();
    names.sort_by_key(|n| version_key(n));
    names.pop().context("none unpacked")
}

/// A package's name from its file name in the archive (`pool/…/<name>_<version>_<arch>.deb`).
fn package_name(filename: &str) -> String {
    let file = filename.rsplit('/').next().unwrap_or(filename);
    file.split('_').next().unwrap_or(file).to_string()
}

/// The newest ABI of kernel `version` in a package index (`Packages`) that has both its
/// image and its modules: (image, modules).
fn newest_ubuntu(index: &str, version: &str) -> Option<(Indexed, Indexed)> {
    let mut images = Vec::new();
    let mut modules = std::collections::HashMap::new();
    for stanza in index.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .map(str::trim)
        };
        let (Some(package), Some(filename), Some(sha256)) =
            (field("Package"), field("Filename"), field("SHA256"))
        else {
            continue;
        };
        let indexed = Indexed {
            filename: filename.to_string(),
            sha256: sha256.to_string(),
        };
        let abi = |kind: &str| {
            let abi = package
                .strip_prefix(&format!("linux-{kind}-{version}-"))?
                .strip_suffix("-generic")?;
            abi.parse::<u64>().ok()
        };
        if let Some(n) = abi("image-unsigned") {
            images.push((n, indexed));
        } else if let Some(n) = abi("modules") {
            modules.insert(n, indexed);
        }
    }
    images.sort_by_key(|(n, _)| *n);
    while let Some((n, image)) = images.pop() {
        if let Some(m) = modules.remove(&n) {
            return Some((image, m));
        }
    }
    None
}

/// How long curl may take for a release file, an index or the keyring (a few MB), and for a
/// kernel package (up to 40 MB). Either waits at most `CONNECT_TIME` for a connection.
const INDEX_TIME: u32 = 120;
const DEB_TIME: u32 = 900;
const CONNECT_TIME: u32 = 15;

/// The body of `url`, in at most `seconds` (curl, which the set-up installs). An address that
/// does not resolve, a connection refused or not made in time is `Unreachable`.
fn fetch(url: &str, seconds: u32) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-fsSL", "--retry", "2", "--connect-timeout"])
        .arg(CONNECT_TIME.to_string())
        .arg("--max-time")
        .arg(seconds.to_string())
        .arg(url)
        .output()
        .context("run curl (`cargo xtask setup` installs it)")?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let why = format!(
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    if unreachable(out.status.code()) {
        Err(Unreachable(why).into())
    } else {
        bail!(why)
    }
}

/// Whether curl's exit code says the host was out of reach: no name resolution (6), no
/// connection (7), or nothing in time (28; with `CONNECT_TIME` for the connection).
fn unreachable(code: Option<i32>) -> bool {
    matches!(code, Some(6 | 7 | 28))
}

/// `data` (xz) unpacked, as text.
fn unpack_xz(data: &[u8]) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("xz")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run xz")?;
    let mut stdin = child.stdin.take().context("xz's stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().context("xz")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing to xz panicked"))??;
    if !out.status.success() {
        bail!("xz -dc failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where `package` is unpacked: `target/kernels/<package>`.
fn unpacked(package: &str) -> anyhow::Result<PathBuf> {
    Ok(std::path::absolute(
        target_dir().join("kernels").join(package),
    )?)
}

/// Downloads and unpacks `package` afresh into its directory.
fn download(package: &str) -> anyhow::Result<()> {
    let dir = unpacked(package)?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    step(
        &format!("kernels: downloading {package}"),
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
            .current_dir(&dir),
    )?;
    let deb = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    unpack_deb(&deb, &dir.join("root"))
}

/// Unpacks the package file `deb` into `root` (`dpkg -x`) and removes it.
fn unpack_deb(deb: &Path, root: &Path) -> anyhow::Result<()> {
    step(
        &format!("kernels: unpacking {}", deb.display()),
        Command::new("dpkg").arg("-x").arg(deb).arg(root),
    )?;
    let _ = fs::remove_file(deb);
    Ok(())
}

/// The one entry of directory `dir`.
fn only_entry(dir: &Path) -> anyhow::Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.len() != 1 {
        bail!("{} holds {names:?}, not one kernel", dir.display());
    }
    Ok(names.remove(0))
}

impl Prepared {
    /// Where the kernel, its initramfs and each run's files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn modules(&self) -> PathBuf {
        self.dir.join("root/lib/modules").join(&self.release)
    }

    /// The script the guest's init hands over to (`guest.sh`), written at every run so that a
    /// changed script is not left behind by an earlier run's cache.
    fn write_guest_script(&self) -> anyhow::Result<()> {
        let guest = self.dir.join("guest.sh");
        let modules = self.dir.join("root/lib/modules");
        let script = format!(
            "#!/bin/bash\n\
             # Runs in the guest, on the host's root over 9p: until the guest's own /proc, /sys,\n\
             # /dev and /run are mounted, those paths are the host's, so nothing is written\n\
             # there before, a failed mount stops the guest, and the guest powers off by the\n\
             # reboot system call (busybox), never through /proc. Then it mounts the kernel's\n\
             # modules over /lib/modules (made empty on the host if it has none) and runs run.sh\n\
             # beside this script, its output and exit code written there too.\n\
             export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
             dir={dir}\n\
             stop() {{ sync; /bin/busybox poweroff -f; sleep 10; }}\n\
             fail() {{ echo \"guest: $1\" > \"$dir/run.out\"; echo 99 > \"$dir/run.rc\"; stop; }}\n\
             mount -t proc proc /proc || fail 'cannot mount /proc'\n\
             mount -t sysfs sys /sys || fail 'cannot mount /sys'\n\
             mount -t devtmpfs dev /dev || fail 'cannot mount /dev'\n\
             mkdir -p /dev/pts && mount -t devpts devpts /dev/pts || fail 'cannot mount /dev/pts'\n\
             mount -t tmpfs tmpfs /run || fail 'cannot mount /run'\n\
             mount -t cgroup2 none /sys/fs/cgroup || fail 'cannot mount cgroup2'\n\
             mount -t bpf bpf /sys/fs/bpf || fail 'cannot mount bpffs'\n\
             mkdir -p /lib/modules && mount --bind {modules} /lib/modules \
             || fail 'cannot mount the modules'\n\
             ip link set lo up\n\
             bash \"$dir/run.sh\" > \"$dir/run.out\" 2>&1\n\
             echo $? > \"$dir/run.rc\"\n\
             stop\n",
            modules = shell_word(&modules.display().to_string()),
            dir = shell_word(&self.dir.display().to_string()),
        );
        fs::write(&guest, script)?;
        make_executable(&guest)?;
        Ok(())
    }

    /// The initramfs: busybox, the modules that mount the host's root over 9p, and an init
    /// that mounts it and hands over to the guest script (`guest.sh` beside it).
    fn build_initrd(&self) -> anyhow::Result<()> {
        let root = self.dir.join("root");
        step(
            &format!("kernels: depmod {}", self.release),
            Command::new("depmod")
                .arg("-b")
                .arg(&root)
                .arg(&self.release),
        )?;
        let tree = self.dir.join("initrd");
        let _ = fs::remove_dir_all(&tree);
        for d in ["bin", "dev", "proc", "sys", "newroot", "mods"] {
            fs::create_dir_all(tree.join(d))?;
        }
        fs::copy("/bin/busybox", tree.join("bin/busybox"))
            .context("copy /bin/busybox (Debian's busybox-static)")?;
        let mut loaded = Vec::new();
        for m in ROOT_MODULES {
            let Some(path) = find_module(&self.modules(), m) else {
                continue; // built in
            };
            let out = tree.join("mods").join(format!("{m}.ko"));
            let unpacker = match path.extension().and_then(|e| e.to_str()) {
                Some("xz") => Some("xz"),
                Some("zst") => Some("zstd"),
                _ => None,
            };
            if let Some(unpacker) = unpacker {
                let data = Command::new(unpacker)
                    .arg("-dc")
                    .arg(&path)
                    .output()
                    .with_context(|| format!("run {unpacker}"))?;
                if !data.status.success() {
                    bail!("{unpacker} -dc {} failed", path.display());
                }
                fs::write(&out, data.stdout)?;
            } else {
                fs::copy(&path, &out)?;
            }
            loaded.push(*m);
        }
        let guest = self.dir.join("guest.sh");
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
             for m in {mods}; do insmod /mods/$m.ko || echo \"insmod $m failed\"; done\n\
             mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /newroot \
             || {{ echo 'guest: cannot mount the host root'; poweroff -f; }}\n\
             umount /proc /sys /dev\n\
             exec switch_root /newroot {guest}\n",
            mods = loaded.join(" "),
            guest = shell_word(&guest.display().to_string()),
        );
        let init_path = tree.join("init");
        fs::write(&init_path, init)?;
        make_executable(&init_path)?;
        let out = fs::File::create(self.dir.join("initrd.gz.part"))?;
        let files = Command::new("sh")
            .arg("-c")
            .arg("find . | cpio -o -H newc --quiet | gzip -1")
            .current_dir(&tree)
            .stdout(out)
            .status()
            .context("cpio")?;
        if !files.success() {
            bail!("packing the initramfs failed");
        }
        fs::rename(self.dir.join("initrd.gz.part"), self.dir.join("initrd.gz"))?;
        Ok(())
    }

    /// Boots the guest, which runs `script` (bash, from the workspace root) and powers off.
    /// Returns its exit code and output.
    pub fn run(&self, script: &str) -> anyhow::Result<(i32, String)> {
        let workspace = std::path::absolute(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))?;
        if probe("qemu-system-x86_64", &["--version"]).is_none() {
            bail!("qemu-system-x86_64 is not installed (`cargo xtask setup` installs it)");
        }
        fs::write(
            self.dir.join("run.sh"),
            format!(
                "cd {}\n{script}",
                shell_word(&workspace.display().to_string())
            ),
        )?;
        let _ = fs::remove_file(self.dir.join("run.out"));
        let _ = fs::remove_file(self.dir.join("run.rc"));
        let console = self.dir.join("console.log");
        let started = Instant::now();
        let status = Command::new("timeout")
            .args(["--kill-after=30", &GUEST_LIMIT.as_secs().to_string()])
            .args([
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-nic",
                "none",
            ])
            .args(["-m", "4096", "-smp", "2", "-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.vmlinuz)
            .arg("-initrd")
            .arg(self.dir.join("initrd.gz"))
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .args([
                "-fsdev",
                "local,id=r,path=/,security_model=passthrough,multidevs=remap",
            ])
            .args(["-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot"])
            .stdin(std::process::Stdio::null())
            .stdout(fs::File::create(&console)?)
            .stderr(std::process::Stdio::null())
            .status()
            .context("start qemu-system-x86_64")?;
        let output = fs::read_to_string(self.dir.join("run.out")).unwrap_or_default();
        let rc = fs::read_to_string(self.dir.join("run.rc"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        match rc {
            Some(rc) => Ok((rc, output)),
            None => bail!(
                "the Linux {} guest ended ({status}) after {:?} without finishing.\n\
                 Its output so far:\n{}\nThe end of its console ({}):\n{}",
                self.series,
                started.elapsed(),
                last_lines(&output, 30),
                console.display(),
                last_lines(&fs::read_to_string(&console).unwrap_or_default(), 30),
            ),
        }
    }
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `word` quoted for a POSIX shell.
pub fn shell_word(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// `name`'s module file under `dir` (`name.ko`, `name.ko.xz` or `name.ko.zst`), if it is a
/// module there.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    let wanted = [
        format!("{name}.ko"),
        format!("{name}.ko.xz"),
        format!("{name}.ko.zst"),
    ];
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).ok()?.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if wanted.iter().any(|w| e.file_name().to_string_lossy() == *w) {
                return Some(path);
            }
        }
    }
    None
}

fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::{Indexed, newest_ubuntu, package_name, release_sum, unreachable, version_key};

    #[test]
    fn only_an_archive_out_of_reach_is_unreachable() {
        // No name resolution, no connection, nothing in time.
        assert!(unreachable(Some(6)) && unreachable(Some(7)) && unreachable(Some(28)));
        // An HTTP error (22), a TLS or protocol error, a signal: failures.
        assert!(!unreachable(Some(22)) && !unreachable(Some(35)) && !unreachable(None));
    }

    #[test]
    fn a_release_file_gives_the_sum_of_the_index() {
        let release = "Origin: Ubuntu\nMD5Sum:\n 0123 10 main/binary-amd64/Packages.xz\n\
                       SHA256:\n aaaa 5 main/binary-amd64/Packages\n \
                       bbbb 1540156 main/binary-amd64/Packages.xz\n \
                       cccc 7 main/binary-i386/Packages.xz\nAcquire-By-Hash: yes\n";
        assert_eq!(
            release_sum(release, "main/binary-amd64/Packages.xz").as_deref(),
            Some("bbbb")
        );
        assert_eq!(release_sum(release, "main/binary-arm64/Packages.xz"), None);
    }

    #[test]
    fn the_newest_ubuntu_kernel_with_its_modules_is_taken() {
        let stanza = |package: &str, sum: &str| {
            format!(
                "Package: {package}\nVersion: 1\nFilename: pool/main/l/linux/{package}_1_amd64.deb\n\
                 SHA256: {sum}\n"
            )
        };
        let index = [
            stanza("linux-image-unsigned-6.8.0-150-generic", "a"),
            stanza("linux-modules-6.8.0-150-generic", "b"),
            stanza("linux-image-unsigned-6.8.0-155-generic", "c"),
            stanza("linux-modules-6.8.0-155-generic", "d"),
            // No modules: passed over.
            stanza("linux-image-unsigned-6.8.0-160-generic", "e"),
            stanza("linux-image-unsigned-6.8.0-155-lowlatency", "f"),
            stanza("linux-image-unsigned-6.11.0-9-generic", "g"),
            stanza("linux-modules-extra-6.8.0-160-generic", "h"),
        ]
        .join("\n");
        let (image, modules) = newest_ubuntu(&index, "6.8.0").unwrap();
        assert_eq!(
            image,
            Indexed {
                filename: "pool/main/l/linux/linux-image-unsigned-6.8.0-155-generic_1_amd64.deb"
                    .into(),
                sha256: "c".into(),
            }
        );
        assert_eq!(modules.sha256, "d");
        assert_eq!(
            package_name(&image.filename),
            "linux-image-unsigned-6.8.0-155-generic"
        );
        assert!(newest_ubuntu(&index, "6.9.0").is_none());
    }

    #[test]
    fn newer_point_releases_sort_last() {
        let mut names = [
            "linux-image-6.12.9+deb12-amd64-unsigned",
            "linux-image-6.12.118+deb12-amd64-unsigned",
            "linux-image-6.12.41+deb12-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[2], "linux-image-6.12.118+deb12-amd64-unsigned");
    }
}
