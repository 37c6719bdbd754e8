//! What the datapath does not need but operators do: which Service each frontend belongs to,
//! and the agent's own state. Written by the agent, read by the inspection CLI; the programs
//! never touch these maps.

use crate::pod;

/// Value of `LB_SVC_INFO`, keyed by `ServiceValue::id`.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `ServiceValue::port_id` of the frontend.
    pub port_id: u32,
    /// `KIND_*`: where the frontend comes from.
    pub kind: u8,
    /// `INFO_*` policy bits of the Service.
    pub flags: u8,
    /// Length of the used part of `name`.
    pub name_len: u16,
    /// `namespace/name:port/PROTOCOL` of the Service port, UTF-8, zero-padded.
    pub name: [u8; 248],
}

pub const KIND_CLUSTER_IP: u8 = 1;
pub const KIND_EXTERNAL_IP: u8 = 2;
pub const KIND_LOAD_BALANCER: u8 = 3;
pub const KIND_NODE_PORT: u8 = 4;

/// internalTrafficPolicy: Local.
pub const INFO_ITP_LOCAL: u8 = 1 << 0;
/// externalTrafficPolicy: Local.
pub const INFO_ETP_LOCAL: u8 = 1 << 1;

impl ServiceInfo {
    pub fn name(&self) -> &str {
        let len = (self.name_len as usize).min(self.name.len());
        core::str::from_utf8(&self.name[..len]).unwrap_or("?")
    }
}

/// The single value of `LB_AGENT` (key 0).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AgentState {
    /// Wall-clock time of the last successful sync, milliseconds since the Unix epoch.
    pub last_sync_unix_ms: u64,
    /// Successful syncs since the agent started.
    pub syncs: u64,
    /// Failed syncs since the agent started.
    pub sync_failures: u64,
    /// Process id of the agent that wrote this.
    pub pid: u32,
    /// Length of the used part of `version`.
    pub version_len: u32,
    /// Agent version, UTF-8, zero-padded.
    pub version: [u8; 32],
}

pod!(ServiceInfo, AgentState);
