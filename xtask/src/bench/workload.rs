//! The benchmark's cluster state and its three renderings: YAML manifests for our agent, an
//! `iptables-restore` input shaped like kube-proxy's iptables mode, and an `nft -f` input shaped
//! like kube-proxy's nftables mode. All three describe the same Services and endpoints.
//!
//! Service i has ClusterIP 10.96.0.0 + 10 + i and port 80/TCP (`http`); the middle Service also
//! has port 80/UDP (`udp`). Endpoints listen on 8080. The measured Services (first, middle, last
//! in rule order) have the real backend pods as endpoints; every other endpoint is an address of
//! another node's pod range (10.244.1.0 onwards), which never carries traffic.

use std::{fmt::Write as _, net::Ipv4Addr};

pub const SERVICE_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// Backend pods per topology (pods 1..=BACKEND_PODS; pod 0 is the client).
pub const BACKEND_PODS: usize = 10;
/// Distinct endpoint addresses of the unmeasured Services (real clusters have at most ~150k
/// pods; 10k Services × 100 endpoints share these).
const POOL: u32 = 100_000;
/// The cluster CIDR (kube-proxy's `--cluster-cidr`): traffic from outside it is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NODE_NAME: &str = "node-a";
pub const NAMESPACE: &str = "default";
/// The middle Service's externalIP (our agent only): the external data path's target, reached
/// from a pod outside the hooked cgroup and translated at tc on the node's bridge.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn lower(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
    fn upper(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
    fn port_name(self) -> &'static str {
        match self {
            Proto::Tcp => "http",
            Proto::Udp => "udp",
        }
    }
}

/// One Service port (kube-proxy programs per Service port).
#[derive(Clone, Copy, Debug)]
pub struct ServicePort {
    pub service: usize,
    pub proto: Proto,
}

/// N Services with E endpoints each; `changed` selects the alternative endpoint set of the
/// Service that single-change measurements edit.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub services: usize,
    pub endpoints: usize,
    pub changed: bool,
    /// The middle Service's `kube-bpf-proxy.io/scheduler` annotation, if any.
    pub scheduler: Option<&'static str>,
}

/// 10.244.0.(i+2): pod i of a topology (harness address plan).
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, (i + 2) as u8)
}

/// FNV-1a, for chain names that look like kube-proxy's hashed ones.
fn hash16(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016X}")
}

impl Workload {
    pub fn new(services: usize, endpoints: usize) -> Workload {
        assert!(services >= 4, "at least 4 Services");
        Workload {
            services,
            endpoints,
            changed: false,
            scheduler: None,
        }
    }

    pub fn with_change(self, changed: bool) -> Workload {
        Workload { changed, ..self }
    }

    /// The same Services, the middle one scheduled by `scheduler` (our agent only).
    pub fn with_scheduler(self, scheduler: &'static str) -> Workload {
        Workload {
            scheduler: Some(scheduler),
            ..self
        }
    }

    pub fn first(&self) -> usize {
        0
    }
    pub fn mid(&self) -> usize {
        self.services / 2
    }
    pub fn last(&self) -> usize {
        self.services - 1
    }
    /// The Service single-change measurements edit (not a measured one).
    pub fn change_target(&self) -> usize {
        self.services / 4
    }

    fn measured(&self, i: usize) -> bool {
        i == self.first() || i == self.mid() || i == self.last()
    }

    pub fn vip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 10 + i as u32)
    }

    pub fn name(&self, i: usize) -> String {
        format!("svc-{i}")
    }

    pub fn ports(&self) -> Vec<ServicePort> {
        let mut out = Vec::with_capacity(self.services + 1);
        for service in 0..self.services {
            out.push(ServicePort {
                service,
                proto: Proto::Tcp,
            });
            if service == self.mid() {
                out.push(ServicePort {
                    service,
                    proto: Proto::Udp,
                });
            }
        }
        out
    }

    /// Frontends our agent programs (one per Service port, IPv4 only), and the middle
    /// Service's externalIP for both of its ports, from this node and from elsewhere.
    pub fn frontends(&self) -> usize {
        self.services + 1 + 4
    }

    /// Endpoint 0 of the change target in the given variant.
    pub fn changed_endpoint(&self, changed: bool) -> Ipv4Addr {
        self.with_change(changed)
            .endpoints_of(self.change_target())
            .first()
            .copied()
            .expect("at least one endpoint")
    }

    pub fn endpoints_of(&self, i: usize) -> Vec<Ipv4Addr> {
        (0..self.endpoints)
            .map(|j| {
                if self.measured(i) && j < BACKEND_PODS {
                    pod_ip(j + 1)
                } else if self.changed && i == self.change_target() && j == 0 {
                    // Outside the pool: 10.246.0.0 onwards.
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 246, 0, 0)) + i as u32)
                } else {
                    let k = ((i * self.endpoints + j) as u32) % POOL;
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 1, 0)) + k)
                }
            })
            .collect()
    }

    // ---- manifests (our agent) ----

    pub fn service_yaml(&self, i: usize) -> String {
        let vip = self.vip(i);
        let ports: Vec<String> = self
            .ports_of(i)
            .iter()
            .map(|p| {
                format!(
                    "{{name: {}, port: {SERVICE_PORT}, protocol: {}}}",
                    p.port_name(),
                    p.upper()
                )
            })
            .collect();
        let external = if i == self.mid() {
            format!(", externalIPs: [{EXTERNAL_IP}]")
        } else {
            String::new()
        };
        let annotations = match self.scheduler {
            Some(s) if i == self.mid() => {
                format!(", annotations: {{kube-bpf-proxy.io/scheduler: {s}}}")
            }
            _ => String::new(),
        };
        format!(
            "---\napiVersion: v1\nkind: Service\n\
             metadata: {{name: {name}, namespace: {NAMESPACE}{annotations}}}\n\
             spec: {{clusterIP: {vip}, clusterIPs: [{vip}], ipFamilies: [IPv4]{external}, \
             ports: [{ports}]}}\n",
            name = self.name(i),
            ports = ports.join(", ")
        )
    }

    fn ports_of(&self, i: usize) -> Vec<Proto> {
        if i == self.mid() {
            vec![Proto::Tcp, Proto::Udp]
        } else {
            vec![Proto::Tcp]
        }
    }

    pub fn slice_yaml(&self, i: usize) -> String {
        let ports: Vec<String> = self
            .ports_of(i)
            .iter()
            .map(|p| {
                format!(
                    "{{name: {}, port: {BACKEND_PORT}, protocol: {}}}",
                    p.port_name(),
                    p.upper()
                )
            })
            .collect();
        let mut out = format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-slice, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{ports}]\nendpoints:\n",
            name = self.name(i),
            ports = ports.join(", ")
        );
        for addr in self.endpoints_of(i) {
            let _ = writeln!(out, "- {{addresses: [\"{addr}\"]}}");
        }
        out
    }

    /// Manifest files: (file name, contents). Services and slices in chunks of `chunk`
    /// Services; the change target's slice in `change.yaml` so a single change re-reads one
    /// small file, as one watch event would carry one object.
    pub fn manifest_files(&self, chunk: usize) -> Vec<(String, String)> {
        let mut files = Vec::new();
        let target = self.change_target();
        for start in (0..self.services).step_by(chunk) {
            let mut text = String::new();
            for i in start..(start + chunk).min(self.services) {
                text.push_str(&self.service_yaml(i));
                if i != target {
                    text.push_str(&self.slice_yaml(i));
                }
            }
            files.push((format!("services-{:05}.yaml", start / chunk), text));
        }
        files.push((CHANGE_FILE.to_string(), self.slice_yaml(target)));
        files
    }

    // ---- kube-proxy iptables mode ----

    fn port_label(&self, p: ServicePort) -> String {
        format!(
            "{NAMESPACE}/{}:{}",
            self.name(p.service),
            p.proto.port_name()
        )
    }

    fn svc_chain(&self, p: ServicePort) -> String {
        format!(
            "KUBE-SVC-{}",
            hash16(&format!("{}{}", self.port_label(p), p.proto.lower()))
        )
    }

    /// kube-proxy's chain for a Service port's external destinations (its externalIP).
    fn ext_chain(&self, p: ServicePort) -> String {
        format!(
            "KUBE-EXT-{}",
            hash16(&format!("{}{}", self.port_label(p), p.proto.lower()))
        )
    }

    /// Whether `p` has the externalIP (the middle Service's ports).
    fn has_external_ip(&self, p: ServicePort) -> bool {
        p.service == self.mid()
    }

    fn sep_chain(&self, p: ServicePort, ep: Ipv4Addr) -> String {
        format!(
            "KUBE-SEP-{}",
            hash16(&format!(
                "{}{}{ep}:{BACKEND_PORT}",
                self.port_label(p),
                p.proto.lower()
            ))
        )
    }

    fn services_rule(&self, p: ServicePort, out: &mut String) {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {SERVICE_PORT} -j {}",
            self.port_label(p),
            self.vip(p.service),
            self.svc_chain(p),
            proto = p.proto.lower()
        );
        // The externalIP, as kube-proxy writes it: to KUBE-EXT, which marks for masquerading
        // (externalTrafficPolicy Cluster) and goes on to the Service chain.
        if self.has_external_ip(p) {
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{} external IP\" -m {proto} -p {proto} -d {EXTERNAL_IP}/32 --dport {SERVICE_PORT} -j {}",
                self.port_label(p),
                self.ext_chain(p),
                proto = p.proto.lower()
            );
        }
    }

    fn ext_rules(&self, p: ServicePort, out: &mut String) {
        if !self.has_external_ip(p) {
            return;
        }
        let ext = self.ext_chain(p);
        let _ = writeln!(
            out,
            "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ",
            self.port_label(p)
        );
        let _ = writeln!(out, "-A {ext} -j {}", self.svc_chain(p));
    }

    fn svc_and_sep_rules(&self, p: ServicePort, out: &mut String) {
        let svc = self.svc_chain(p);
        let label = self.port_label(p);
        let proto = p.proto.lower();
        let _ = writeln!(
            out,
            "-A {svc} -m comment --comment \"{label} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {SERVICE_PORT} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            self.vip(p.service)
        );
        let eps = self.endpoints_of(p.service);
        let n = eps.len();
        for (j, ep) in eps.iter().enumerate() {
            let sep = self.sep_chain(p, *ep);
            if j + 1 < n {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"{label} -> {ep}:{BACKEND_PORT}\" -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / (n - j) as f64
                );
            } else {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"{label} -> {ep}:{BACKEND_PORT}\" -j {sep}"
                );
            }
        }
        for ep in &eps {
            let sep = self.sep_chain(p, *ep);
            let _ = writeln!(
                out,
                "-A {sep} -m comment --comment \"{label}\" -s {ep}/32 -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                out,
                "-A {sep} -m comment --comment \"{label}\" -m {proto} -p {proto} -j DNAT --to-destination {ep}:{BACKEND_PORT}"
            );
        }
    }

    const NODEPORTS_RULE: &'static str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

    /// The whole nat table, as one `iptables-restore` (without `--noflush`) loads it.
    pub fn iptables_full(&self) -> String {
        let ports = self.ports();
        let mut out = String::with_capacity(self.services * self.endpoints * 400);
        out.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
        out.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
        for p in &ports {
            let _ = writeln!(out, ":{} - [0:0]", self.svc_chain(*p));
            if self.has_external_ip(*p) {
                let _ = writeln!(out, ":{} - [0:0]", self.ext_chain(*p));
            }
            for ep in self.endpoints_of(p.service) {
                let _ = writeln!(out, ":{} - [0:0]", self.sep_chain(*p, ep));
            }
        }
        out.push_str(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
        );
        for p in &ports {
            self.services_rule(*p, &mut out);
        }
        out.push_str(Self::NODEPORTS_RULE);
        for p in &ports {
            self.ext_rules(*p, &mut out);
            self.svc_and_sep_rules(*p, &mut out);
        }
        out.push_str("COMMIT\n");
        out
    }

    /// One endpoint of the change target replaced, as kube-proxy's partial sync writes it with
    /// `iptables-restore --noflush`: KUBE-SERVICES (always rewritten in full), the changed
    /// Service's chain, the new endpoint chain, and the old one flushed and removed. `self` is
    /// the new state.
    pub fn iptables_change(&self) -> String {
        let target = self.change_target();
        let p = ServicePort {
            service: target,
            proto: Proto::Tcp,
        };
        let old = self.changed_endpoint(!self.changed);
        let new = self.changed_endpoint(self.changed);
        let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n");
        let _ = writeln!(out, ":{} - [0:0]", self.svc_chain(p));
        let _ = writeln!(out, ":{} - [0:0]", self.sep_chain(p, new));
        // Declaring the stale chain flushes it, so it can be deleted below.
        let _ = writeln!(out, ":{} - [0:0]", self.sep_chain(p, old));
        for port in self.ports() {
            self.services_rule(port, &mut out);
        }
        out.push_str(Self::NODEPORTS_RULE);
        // The rewritten Service chain and all its endpoint chains' rules; kube-proxy writes
        // only chains that changed, so only the new endpoint chain is declared (flushed) above.
        let mut rules = String::new();
        self.svc_and_sep_rules(p, &mut rules);
        let svc = self.svc_chain(p);
        let new_sep = self.sep_chain(p, new);
        for line in rules.lines() {
            if line.starts_with(&format!("-A {svc} "))
                || line.starts_with(&format!("-A {new_sep} "))
            {
                out.push_str(line);
                out.push('\n');
            }
        }
        let _ = writeln!(out, "-X {}", self.sep_chain(p, old));
        out.push_str("COMMIT\n");
        out
    }

    // ---- kube-proxy nftables mode ----

    fn nft_service_chain(&self, p: ServicePort) -> String {
        format!(
            "service-{}-{NAMESPACE}/{}/{}/{}",
            &hash16(&self.port_label(p))[..8],
            self.name(p.service),
            p.proto.lower(),
            p.proto.port_name()
        )
    }

    fn nft_endpoint_chain(&self, p: ServicePort, ep: Ipv4Addr) -> String {
        format!(
            "endpoint-{}-{NAMESPACE}/{}/{}/{}__{ep}/{BACKEND_PORT}",
            &hash16(&format!("{}{ep}", self.port_label(p)))[..8],
            self.name(p.service),
            p.proto.lower(),
            p.proto.port_name()
        )
    }

    fn nft_service_rules(&self, p: ServicePort, out: &mut String) {
        let chain = self.nft_service_chain(p);
        let eps = self.endpoints_of(p.service);
        let _ = writeln!(
            out,
            "add rule {NFT_TABLE} {chain} ip daddr {} {} dport {SERVICE_PORT} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            self.vip(p.service),
            p.proto.lower()
        );
        let targets: Vec<String> = eps
            .iter()
            .enumerate()
            .map(|(j, ep)| format!("{j} : goto {}", self.nft_endpoint_chain(p, *ep)))
            .collect();
        let _ = writeln!(
            out,
            "add rule {NFT_TABLE} {chain} numgen random mod {} vmap {{ {} }}",
            eps.len(),
            targets.join(", ")
        );
    }

    fn nft_endpoint(&self, p: ServicePort, ep: Ipv4Addr, out: &mut String) {
        let chain = self.nft_endpoint_chain(p, ep);
        let _ = writeln!(out, "add chain {NFT_TABLE} {chain}");
        let _ = writeln!(
            out,
            "add rule {NFT_TABLE} {chain} ip saddr {ep} jump mark-for-masquerade"
        );
        let _ = writeln!(
            out,
            "add rule {NFT_TABLE} {chain} meta l4proto {} dnat to {ep}:{BACKEND_PORT}",
            p.proto.lower()
        );
    }

    /// The whole `ip kube-proxy` table, as one `nft -f` transaction (into an empty ruleset).
    pub fn nft_full(&self) -> String {
        let ports = self.ports();
        let mut out = String::with_capacity(self.services * self.endpoints * 300);
        let _ = write!(
            out,
            "add table {NFT_TABLE} {{ comment \"rules for kube-proxy\" ; }}\n\
             add chain {NFT_TABLE} mark-for-masquerade\n\
             add rule {NFT_TABLE} mark-for-masquerade mark set mark or 0x4000\n\
             add chain {NFT_TABLE} masquerading\n\
             add rule {NFT_TABLE} masquerading mark and 0x4000 == 0 return\n\
             add rule {NFT_TABLE} masquerading mark set mark xor 0x4000\n\
             add rule {NFT_TABLE} masquerading masquerade fully-random\n\
             add map {NFT_TABLE} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
             add chain {NFT_TABLE} services\n\
             add rule {NFT_TABLE} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add chain {NFT_TABLE} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
             add rule {NFT_TABLE} nat-prerouting jump services\n\
             add chain {NFT_TABLE} nat-output {{ type nat hook output priority -100 ; }}\n\
             add rule {NFT_TABLE} nat-output jump services\n\
             add chain {NFT_TABLE} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
             add rule {NFT_TABLE} nat-postrouting jump masquerading\n"
        );
        for p in &ports {
            for ep in self.endpoints_of(p.service) {
                self.nft_endpoint(*p, ep, &mut out);
            }
            let _ = writeln!(out, "add chain {NFT_TABLE} {}", self.nft_service_chain(*p));
            self.nft_service_rules(*p, &mut out);
            // The externalIP: marked for masquerading (externalTrafficPolicy Cluster), then
            // the Service chain, as kube-proxy's external chains do.
            if self.has_external_ip(*p) {
                let ext = self
                    .nft_service_chain(*p)
                    .replacen("service-", "external-", 1);
                let _ = writeln!(out, "add chain {NFT_TABLE} {ext}");
                let _ = writeln!(out, "add rule {NFT_TABLE} {ext} jump mark-for-masquerade");
                let _ = writeln!(
                    out,
                    "add rule {NFT_TABLE} {ext} goto {}",
                    self.nft_service_chain(*p)
                );
                let _ = writeln!(
                    out,
                    "add element {NFT_TABLE} service-ips {{ {EXTERNAL_IP} . {} . {SERVICE_PORT} : goto {ext} }}",
                    p.proto.lower()
                );
            }
        }
        for p in &ports {
            let _ = writeln!(
                out,
                "add element {NFT_TABLE} service-ips {{ {} . {} . {SERVICE_PORT} : goto {} }}",
                self.vip(p.service),
                p.proto.lower(),
                self.nft_service_chain(*p)
            );
        }
        out
    }

    /// One endpoint of the change target replaced, as kube-proxy's nftables partial sync does
    /// it in one transaction: new endpoint chain, rewritten Service chain, old chain deleted.
    pub fn nft_change(&self) -> String {
        let p = ServicePort {
            service: self.change_target(),
            proto: Proto::Tcp,
        };
        let old = self.changed_endpoint(!self.changed);
        let new = self.changed_endpoint(self.changed);
        let mut out = String::new();
        self.nft_endpoint(p, new, &mut out);
        let chain = self.nft_service_chain(p);
        let _ = writeln!(out, "flush chain {NFT_TABLE} {chain}");
        self.nft_service_rules(p, &mut out);
        let _ = writeln!(
            out,
            "delete chain {NFT_TABLE} {}",
            self.nft_endpoint_chain(p, old)
        );
        out
    }
}

pub const CHANGE_FILE: &str = "change.yaml";
pub const NFT_TABLE: &str = "ip kube-proxy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_services_use_the_backend_pods() {
        let w = Workload::new(100, 10);
        let pods: Vec<Ipv4Addr> = (1..=10).map(pod_ip).collect();
        for i in [w.first(), w.mid(), w.last()] {
            assert_eq!(w.endpoints_of(i), pods);
        }
        assert!(!w.endpoints_of(w.change_target()).contains(&pod_ip(1)));
        assert_eq!(w.vip(0), Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(w.vip(300), Ipv4Addr::new(10, 96, 1, 54));
        // Every Service port, and the middle Service's externalIP on both its ports for this
        // node (socket hooks) and from elsewhere (tc).
        assert_eq!(w.frontends(), w.ports().len() + 2 * 2);
        assert!(
            w.service_yaml(w.mid())
                .contains(&format!("externalIPs: [{EXTERNAL_IP}]"))
        );
    }

    #[test]
    fn change_alternates_one_endpoint() {
        let w = Workload::new(100, 10);
        let a = w.endpoints_of(w.change_target());
        let b = w.with_change(true).endpoints_of(w.change_target());
        assert_ne!(a[0], b[0]);
        assert_eq!(a[1..], b[1..]);
    }

    #[test]
    fn iptables_shape() {
        let w = Workload::new(4, 3);
        let full = w.iptables_full();
        assert!(full.starts_with("*nat\n") && full.ends_with("COMMIT\n"));
        // One KUBE-SERVICES rule per Service port, then the nodeports rule last.
        let services: Vec<&str> = full
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        // The middle Service's two ports have an externalIP rule each.
        assert_eq!(services.len(), w.ports().len() + 2 + 1);
        assert_eq!(full.matches("-j KUBE-EXT-").count(), 2);
        assert!(services.last().unwrap().contains("KUBE-NODEPORTS"));
        assert_eq!(full.matches("--probability 0.3333333333").count(), 5);
        assert_eq!(full.matches("-j DNAT").count(), 5 * 3);
        let change = w.with_change(true).iptables_change();
        assert!(change.contains("-X KUBE-SEP-"));
        assert!(change.contains(&w.with_change(true).changed_endpoint(true).to_string()));
    }

    #[test]
    fn manifests_split_the_change_target() {
        let w = Workload::new(10, 2);
        let files = w.manifest_files(4);
        assert_eq!(files.len(), 4);
        assert_eq!(files[3].0, CHANGE_FILE);
        assert_eq!(
            files
                .iter()
                .map(|f| f.1.matches("kind: Service\n").count())
                .sum::<usize>(),
            10
        );
        assert_eq!(
            files
                .iter()
                .map(|f| f.1.matches("kind: EndpointSlice").count())
                .sum::<usize>(),
            10
        );
    }
}
