//! The running kernel's release, against the oldest this agent supports.

/// The oldest kernel the agent supports. Its tc programs attach through TCX (Linux 6.6), and
/// its deepest call chains use the 512 bytes of stack the verifier allows when it rounds each
/// frame up to 16 bytes (Linux 6.9); older verifiers round to 32 and reject them. The programs
/// are checked on Debian's 6.12 in a guest (`cargo xtask kernels`) and on the development
/// machine's kernel.
pub const OLDEST: (u32, u32) = (6, 9);

/// The running kernel's release (`uname -r`).
pub fn release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Major and minor version of a release string such as `6.1.0-50-amd64`.
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Why kernel `release` may not run the agent, when it is older than [`OLDEST`].
pub fn too_old(release: &str) -> Option<String> {
    let version = version_of(release)?;
    (version < OLDEST).then(|| {
        format!(
            "Linux {release} is older than {}.{}, the oldest kernel this agent supports: its tc \
             programs attach through TCX (Linux 6.6), and a verifier before 6.9 counts more \
             than 512 bytes of stack in their deepest call chains (each frame rounded up to 32 \
             bytes, not 16); Linux 6.1's also stops tc_ingress at a million instructions. A \
             kernel with those backported may still serve",
            OLDEST.0, OLDEST.1
        )
    })
}

/// The error context of a program the verifier rejected: the kernel's release, and why it may
/// not run the agent when it is older than that supports.
pub fn rejected(program: &str) -> String {
    let release = release().unwrap_or_else(|| "of unknown release".to_string());
    match too_old(&release) {
        Some(why) => format!("verifier rejected {program} ({why})"),
        None => format!("verifier of Linux {release} rejected {program}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_older_than_6_9_are_named() {
        assert_eq!(version_of("6.1.0-50-amd64"), Some((6, 1)));
        assert_eq!(version_of("6.12.118+deb12-amd64"), Some((6, 12)));
        assert_eq!(version_of("5.14.0-503.el9.x86_64"), Some((5, 14)));
        assert_eq!(version_of("garbage"), None);
        assert!(
            too_old("6.1.0-50-amd64")
                .unwrap()
                .contains("older than 6.9")
        );
        assert!(too_old("5.15.0-91-generic").is_some());
        assert!(too_old("6.8.0-49-generic").is_some());
        assert!(too_old("6.9.0").is_none());
        assert!(too_old("6.12.118+deb12-amd64").is_none());
        assert!(too_old("6.18.44-fc-v1300").is_none());
        assert!(too_old("7.0.1").is_none());
        assert!(too_old("unknown").is_none());
    }
}
