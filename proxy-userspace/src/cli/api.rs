//! The JSON documents of the inspection commands (`-o json`): versioned, one kind per command,
//! each described field by field by a JSON Schema under `schema/` at the repository's root.
//!
//! A change that renames, removes or retypes a field is a new apiVersion; adding an optional
//! field is not. The schema files reject unknown fields, and `schema_tests` validates real
//! documents against them, so the two cannot drift apart unnoticed.

use std::net::IpAddr;

use serde::{Serialize, Serializer};

use crate::{
    compile::{Family, Proto},
    model::Scheduler,
};

/// `apiVersion` of every document but those of a kind that changed since (`Kind::API_VERSION`).
pub const API_VERSION: &str = "kube-bpf-proxy.io/v1";

/// The body of one kind of document.
pub trait Kind: Serialize {
    /// `kind` of the document (`ServiceList`, `Status`, ...).
    const KIND: &'static str;
    /// `apiVersion` of the document: `API_VERSION` unless this kind changed since.
    const API_VERSION: &'static str = API_VERSION;
}

/// A document: `apiVersion`, `kind`, then the body's fields.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Document<'a, T: Kind> {
    api_version: &'static str,
    kind: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

impl<'a, T: Kind> Document<'a, T> {
    pub fn of(body: &'a T) -> Self {
        Document {
            api_version: T::API_VERSION,
            kind: T::KIND,
            body,
        }
    }
}

/// The document of `body` as a JSON value.
pub fn to_value<T: Kind>(body: &T) -> serde_json::Value {
    serde_json::to_value(Document::of(body)).expect("documents serialize")
}

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl Serialize for Family {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.api_name())
    }
}

/// Serialized as the name `--scheduler` accepts (the long one, not the ipvs alias).
impl Serialize for Scheduler {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A Service port: `port` is its name, "" when unnamed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

/// A namespace whose pods are translated per packet at tc (socket-layer translation off), and
/// how many of its pods on this node the socket hooks know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerPacketNamespace {
    pub namespace: String,
    pub pods: u32,
}

impl PerPacketNamespace {
    pub fn list(namespaces: Vec<(String, u32)>) -> Vec<PerPacketNamespace> {
        namespaces
            .into_iter()
            .map(|(namespace, pods)| PerPacketNamespace { namespace, pods })
            .collect()
    }

    /// `mesh (2 pods), other (0 pods)`.
    pub fn text(list: &[PerPacketNamespace]) -> String {
        list.iter()
            .map(|n| {
                format!(
                    "{} ({} pod{})",
                    n.namespace,
                    n.pods,
                    if n.pods == 1 { "" } else { "s" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Which of the Service's addresses a frontend is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FrontendScope {
    #[serde(rename = "clusterIP")]
    ClusterIp,
    NodePort,
    #[serde(rename = "externalIP")]
    ExternalIp,
    LoadBalancer,
}

impl FrontendScope {
    /// As the table's TYPE column says it.
    pub fn title(self) -> &'static str {
        match self {
            FrontendScope::ClusterIp => "ClusterIP",
            FrontendScope::NodePort => "NodePort",
            FrontendScope::ExternalIp => "ExternalIP",
            FrontendScope::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Who reaches a frontend: `internal` = pods and host processes of this node, translated at the
/// socket hooks; `external` = packets arriving from elsewhere, translated at tc/XDP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Reach {
    Internal,
    External,
}

/// What a new connection to a frontend gets.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Action {
    /// Goes to one of the backends.
    Balance,
    /// Refused: no endpoints (ECONNREFUSED at the socket layer, ICMP unreachable at tc).
    Reject,
    /// Dropped: endpoints exist, but none this traffic may use (a Local traffic policy).
    Drop,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

impl TrafficPolicy {
    pub fn local(local: bool) -> Self {
        if local {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        }
    }
}

/// internalTrafficPolicy and externalTrafficPolicy of the Service.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicies {
    pub internal: TrafficPolicy,
    pub external: TrafficPolicy,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub enum AffinityMode {
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

/// sessionAffinity; `timeoutSeconds` only with ClientIP.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Affinity {
    pub mode: AffinityMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

impl Affinity {
    pub fn of(timeout: Option<u32>) -> Self {
        Affinity {
            mode: if timeout.is_some() {
                AffinityMode::ClientIp
            } else {
                AffinityMode::None
            },
            timeout_seconds: timeout,
        }
    }
}

/// An endpoint's conditions, as far as they are known: the maps know only whether a backend is
/// terminating (and hold terminating ones only while they serve, as a fallback).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EndpointState {
    Ready,
    ServingTerminating,
    Terminating,
    NotReady,
}

impl EndpointState {
    pub fn of(ready: bool, serving: bool, terminating: bool) -> Self {
        match (ready, serving, terminating) {
            (true, _, _) => EndpointState::Ready,
            (false, true, true) => EndpointState::ServingTerminating,
            (false, false, true) => EndpointState::Terminating,
            (false, _, false) => EndpointState::NotReady,
        }
    }
}

/// One backend of a frontend.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendView {
    /// Key of `LB_BACKENDS`.
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    /// Slots this backend holds in the frontend (its share of new connections).
    pub slots: u32,
    pub weight: u16,
    pub state: EndpointState,
    /// The endpoint is on this node.
    pub local: bool,
    /// Active connections counted for the schedulers that compare them (lc, wlc, sed, nq).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// nodeName of the endpoint: only from a source (`explain`), the maps do not hold it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Zone of the endpoint's node, where the source tells it (`explain`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

impl BackendView {
    /// `ip:port`, `[ip6]:port`.
    pub fn host_port(&self) -> String {
        host_port(&self.address, self.port)
    }
}

/// `ip:port`, `[ip6]:port`.
pub fn host_port(addr: &IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A backend named by id, with its address where the maps still hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
}

impl Serialize for crate::compile::explain::ExclusionCause {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use crate::compile::explain::ExclusionCause as C;
        s.serialize_str(match self {
            C::NotLocal => "notLocal",
            C::NotReady => "notReady",
            C::NotServing => "notServing",
            C::FallbackOnly => "fallbackOnly",
            C::NodeHint => "nodeHint",
            C::ZoneHint => "zoneHint",
            C::Topology => "topology",
            C::InterfaceWaiting => "interfaceWaiting",
        })
    }
}
