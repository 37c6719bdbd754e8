//! The running kernel's release, against the oldest this agent supports.

/// The oldest kernel the agent is checked on: Ubuntu 24.04's 6.8. Its tc programs attach
/// through TCX (Linux 6.6), and their deepest call chains fit the verifier's 512 bytes of stack
/// as verifiers before 6.9 count it (each frame rounded up to 32 bytes). The programs are
/// checked on 6.8 and Debian's 6.12 in guests (`cargo xtask kernels`) and on the development
/// machine's kernel; 6.6 and 6.7 were not run.
pub const OLDEST: (u32, u32) = (6, 8);

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
            "Linux {release} is older than {}.{}, the oldest kernel this agent is checked on: \
             its tc programs attach through TCX (Linux 6.6), 6.6 and 6.7 were not run, and \
             Linux 6.1's verifier stops tc_ingress at a million instructions. A kernel with \
             TCX and a newer verifier backported may still serve",
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
    fn releases_older_than_6_8_are_named() {
        assert_eq!(version_of("6.1.0-50-amd64"), Some((6, 1)));
        assert_eq!(version_of("6.12.118+deb12-amd64"), Some((6, 12)));
        assert_eq!(version_of("5.14.0-503.el9.x86_64"), Some((5, 14)));
        assert_eq!(version_of("garbage"), None);
        assert!(
            too_old("6.1.0-50-amd64")
                .unwrap()
                .contains("older than 6.8")
        );
        assert!(too_old("5.15.0-91-generic").is_some());
        assert!(too_old("6.7.12-generic").is_some());
        assert!(too_old("6.8.0-49-generic").is_none());
        assert!(too_old("6.9.0").is_none());
        assert!(too_old("6.12.118+deb12-amd64").is_none());
        assert!(too_old("6.18.44-fc-v1300").is_none());
        assert!(too_old("7.0.1").is_none());
        assert!(too_old("unknown").is_none());
    }
}
