//! `--config`: kube-proxy's file parsed, checked and laid under the command line.

use clap::{CommandFactory as _, FromArgMatches as _};

use super::*;
use crate::cli::SchedulerFlag;

/// The fields kubeadm writes into the kube-proxy ConfigMap's `config.conf` when nothing is
/// customised (kubeadm's documented default KubeProxyConfiguration): every value is a zero
/// value, which kube-proxy reads as "the default".
const KUBEADM_DEFAULT: &str = "\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: \"\"
  burst: 0
  contentType: \"\"
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: \"\"
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: \"\"
  interfaceNamePrefix: \"\"
detectLocalMode: \"\"
enableProfiling: false
healthzBindAddress: \"\"
hostnameOverride: \"\"
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: \"\"
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: \"0\"
    text:
      infoBufferSize: \"0\"
  verbosity: 0
metricsBindAddress: \"\"
mode: \"\"
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: \"\"
showHiddenMetricsForVersion: \"\"
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: \"\"
  rootHnsEndpointName: \"\"
  sourceVip: \"\"
";

/// The file's header and `body`.
fn doc(body: &str) -> String {
    format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{body}")
}

/// What `kube-bpf-proxy run FLAGS --config ...` ends up with: the command line parsed as
/// `cli::main` parses it, the file laid under it, on a node with 4 CPUs.
struct Outcome {
    cli: Cli,
    notes: Vec<Note>,
}

impl Outcome {
    fn args(&self) -> &RunArgs {
        match &self.cli.command {
            Command::Run(args) => args,
            _ => unreachable!("run was parsed"),
        }
    }

    /// The notes of one level, without their "config: " prefix.
    fn at(&self, level: log::Level) -> Vec<&str> {
        self.notes
            .iter()
            .filter(|n| n.level == level)
            .map(|n| n.text.strip_prefix("config: ").unwrap_or(&n.text))
            .collect()
    }

    fn warnings(&self) -> Vec<&str> {
        self.at(log::Level::Warn)
    }
}

fn run_with(text: &str, flags: &[&str]) -> Outcome {
    let (config, unused) = parse(text).unwrap_or_else(|e| panic!("parse: {e}\n{text}"));
    let argv = ["kube-bpf-proxy", "run", "--config", "/dev/null"]
        .into_iter()
        .chain(flags.iter().copied());
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .unwrap_or_else(|e| panic!("flags {flags:?}: {e}"));
    let mut cli = Cli::from_arg_matches(&matches).expect("from matches");
    let notes = lay_under(&mut cli, &matches, &config, &unused, 4);
    Outcome { cli, notes }
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_kubeadm_default_is_all_defaults_and_draws_no_warning() {
    let (config, unused) = parse(KUBEADM_DEFAULT).unwrap();
    assert_eq!(unused, Vec::<String>::new());
    assert_eq!(
        config,
        KubeProxyConfig {
            kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
            bind_address: Some("0.0.0.0".parse().unwrap()),
            log_verbosity: Some(0),
            ..Default::default()
        }
    );
    let out = run_with(KUBEADM_DEFAULT, &[]);
    assert_eq!(out.warnings(), Vec::<&str>::new());
    let args = out.args();
    assert_eq!(
        args.source.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    // Zero values keep this proxy's defaults, which are kube-proxy's where both have one.
    assert_eq!(args.healthz_bind_address, None);
    assert_eq!(args.metrics_bind_address, None);
    assert_eq!(
        super::super::run::default_http_addresses(args.source.bind_address),
        ("0.0.0.0:10256", "127.0.0.1:10249")
    );
    assert_eq!(args.source.scheduler, SchedulerFlag::Random);
    assert_eq!(args.source.nodeport_addresses, Vec::<String>::new());
    assert_eq!(args.source.hostname_override, None);
    // configSyncPeriod 0s: our own read-back period, not kube-proxy's 15m.
    assert_eq!(args.sync_period, Duration::from_secs(300));
    assert_eq!(args.max_conntrack, None);
    assert_eq!(args.pod_interfaces, ["auto"]);
    // Not in the file: `run` writes kube-proxy's -999 itself.
    assert_eq!(args.oom_score_adj, None);
    assert!(!args.bind_address_hard_fail);
    assert_eq!(out.cli.log_level, "info");
    assert_eq!(
        out.at(log::Level::Info),
        [
            "mode \"\" (iptables): replaced by this proxy (BPF programs and maps instead of \
             kube-proxy's rules)",
            "detectLocalMode ClusterCIDR: not needed, local pods are recognised by the socket \
             hooks and their interfaces (--pod-interfaces)",
        ]
    );
}

#[test]
fn config_json_reads_like_yaml() {
    let yaml: serde_norway::Value = serde_norway::from_str(KUBEADM_DEFAULT).unwrap();
    let json = serde_json::to_string_pretty(&yaml).unwrap();
    assert_eq!(parse(&json), parse(KUBEADM_DEFAULT));
    assert!(parse(&json).is_ok());
}

#[test]
fn config_every_honoured_field_sets_its_flag() {
    let text = doc("
hostnameOverride: ' Node-A '
clientConnection: {kubeconfig: /etc/kp.conf}
bindAddress: 192.0.2.10
healthzBindAddress: 192.0.2.10
metricsBindAddress: '[::1]:9999'
bindAddressHardFail: true
mode: ipvs
ipvs: {scheduler: wrr, strictARP: true}
detectLocalMode: BridgeInterface
detectLocal: {bridgeInterface: cni0}
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
nodePortAddresses: [primary]
configSyncPeriod: 15m0s
conntrack: {maxPerCore: 1000, min: 1, tcpEstablishedTimeout: 2h30m, udpTimeout: 30s, udpStreamTimeout: 300s, tcpBeLiberal: true}
oomScoreAdj: -500
logging: {format: json, verbosity: 4}
featureGates: {PreferSameTrafficDistribution: true}
");
    let out = run_with(&text, &[]);
    let args = out.args();
    assert_eq!(args.source.hostname_override.as_deref(), Some("Node-A"));
    assert_eq!(args.source.node_name(), "node-a");
    assert_eq!(
        args.source.kubeconfig.as_deref(),
        Some(Path::new("/etc/kp.conf"))
    );
    assert_eq!(
        args.source.bind_address,
        Some("192.0.2.10".parse().unwrap())
    );
    assert_eq!(
        args.healthz_bind_address.as_deref(),
        Some("192.0.2.10:10256")
    );
    assert_eq!(args.metrics_bind_address.as_deref(), Some("[::1]:9999"));
    assert!(args.bind_address_hard_fail);
    assert_eq!(args.source.scheduler, SchedulerFlag::WeightedRoundRobin);
    assert_eq!(args.pod_interfaces, ["auto", "cni0"]);
    assert_eq!(args.source.nodeport_addresses, ["primary"]);
    let selection = args.source.nodeport_selection().unwrap();
    assert!(selection.primary);
    assert_eq!(selection.bind_address, args.source.bind_address);
    assert_eq!(args.sync_period, Duration::from_secs(900));
    // max(1000 x 4 CPUs, 1)
    assert_eq!(args.max_conntrack, Some(4000));
    assert_eq!(
        args.conntrack_tcp_timeout_established,
        Duration::from_secs(9000)
    );
    // The longer of udpTimeout and udpStreamTimeout.
    assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(300));
    assert_eq!(args.oom_score_adj, Some(-500));
    assert_eq!(out.cli.log_format, LogFormat::Json);
    assert_eq!(out.cli.log_level, "debug");
    assert_eq!(out.warnings(), Vec::<&str>::new());
    let info = out.at(log::Level::Info);
    assert!(info.contains(&"ipvs.scheduler wrr: --scheduler weighted-round-robin"));
    assert!(info.contains(&"detectLocalMode BridgeInterface: --pod-interfaces auto,cni0"));
    assert!(
        info.iter()
            .any(|n| n.starts_with("ipvs.strictARP: not applicable"))
    );
    assert!(
        info.iter()
            .any(|n| n.starts_with("clusterCIDR: not needed"))
    );
    assert!(
        info.iter()
            .any(|n| n.starts_with("mode ipvs: replaced by this proxy"))
    );
}

#[test]
/// semantics 11.13: next to `--config`, kube-proxy's own flags are ignored where the file sets
/// the field, but for `--hostname-override` and the logging flags; this proxy's own flags win.
fn config_file_wins_over_kube_proxy_flags_and_own_flags_win_over_the_file() {
    let text = doc("
hostnameOverride: node-a
clientConnection: {kubeconfig: /etc/kp.conf}
bindAddress: '2001:db8::1'
healthzBindAddress: 0.0.0.0:1
metricsBindAddress: 0.0.0.0:2
ipvs: {scheduler: mh}
detectLocalMode: InterfaceNamePrefix
detectLocal: {interfaceNamePrefix: cali}
nodePortAddresses: [10.0.0.0/8]
configSyncPeriod: 1h
conntrack: {maxPerCore: 10, tcpEstablishedTimeout: 1h, udpTimeout: 1m}
oomScoreAdj: 100
logging: {format: json, verbosity: 6}
");
    let flags = [
        "--hostname-override=node-b",
        "--kubeconfig=/root/.kube/config",
        "--bind-address=192.0.2.1",
        "--healthz-bind-address=",
        "--metrics-bind-address=127.0.0.1:3",
        "--scheduler=rr",
        "--pod-interfaces=none",
        "--nodeport-addresses=192.0.2.0/24",
        "--sync-period=10m",
        "--max-conntrack=5",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-udp-timeout=3m",
        "--oom-score-adj=-1000",
        "--log-level=warn",
        "--log-format=text",
    ];
    let out = run_with(&text, &flags);
    let args = out.args();
    // kube-proxy's exception.
    assert_eq!(args.source.hostname_override.as_deref(), Some("node-b"));
    // kube-proxy's flags: the file's fields.
    assert_eq!(
        args.source.kubeconfig.as_deref(),
        Some(Path::new("/etc/kp.conf"))
    );
    assert_eq!(
        args.source.bind_address,
        Some("2001:db8::1".parse().unwrap())
    );
    assert_eq!(args.healthz_bind_address.as_deref(), Some("0.0.0.0:1"));
    assert_eq!(args.metrics_bind_address.as_deref(), Some("0.0.0.0:2"));
    assert_eq!(args.source.nodeport_addresses, ["10.0.0.0/8"]);
    assert_eq!(
        args.conntrack_tcp_timeout_established,
        Duration::from_secs(3600)
    );
    assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(60));
    assert_eq!(args.oom_score_adj, Some(100));
    // This proxy's own flags.
    assert_eq!(args.source.scheduler, SchedulerFlag::RoundRobin);
    assert_eq!(args.pod_interfaces, ["none"]);
    assert_eq!(args.sync_period, Duration::from_secs(600));
    assert_eq!(args.max_conntrack, Some(5));
    assert_eq!(out.cli.log_level, "warn");
    assert_eq!(out.cli.log_format, LogFormat::Text);
    let debug = out.at(log::Level::Debug);
    for field in [
        "hostnameOverride: --hostname-override",
        "ipvs.scheduler: --scheduler",
        "detectLocalMode: --pod-interfaces",
        "conntrack.maxPerCore: --max-conntrack",
        "logging.verbosity: --log-level",
    ] {
        assert!(
            debug.contains(&format!("{field} given on the command line wins").as_str()),
            "{field}: {debug:?}"
        );
    }
    let warn = out.at(log::Level::Warn);
    for (flag, field) in [
        ("kubeconfig", "clientConnection.kubeconfig"),
        ("bind-address", "bindAddress"),
        ("healthz-bind-address", "healthzBindAddress"),
        ("nodeport-addresses", "nodePortAddresses"),
        ("oom-score-adj", "oomScoreAdj"),
    ] {
        let line = format!(
            "--{flag} ignored: the --config file sets {field}, and kube-proxy ignores its flags \
             next to --config"
        );
        assert!(warn.contains(&line.as_str()), "{line}: {warn:?}");
    }
}

/// semantics 11.13: next to `--config` kube-proxy ignores its flags also where the file leaves
/// the field unset (its default applies then); `--hostname-override` still wins.
#[test]
fn kube_proxy_flags_next_to_a_config_file_that_leaves_their_fields_unset_are_ignored() {
    let flags = [
        "--hostname-override=Node-B",
        "--kubeconfig=/root/.kube/config",
        "--bind-address=192.0.2.1",
        "--healthz-bind-address=0.0.0.0:1",
        "--metrics-bind-address=127.0.0.1:3",
        "--bind-address-hard-fail",
        "--masquerade-all",
        "--nodeport-addresses=192.0.2.0/24",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-udp-timeout=3m",
        "--oom-score-adj=-1000",
        "--sync-period=10m",
    ];
    let out = run_with(
        &doc("mode: iptables\nconntrack: {tcpEstablishedTimeout: 0s}\n"),
        &flags,
    );
    let args = out.args();
    assert_eq!(args.source.hostname_override.as_deref(), Some("node-b"));
    assert_eq!(args.source.kubeconfig, None);
    assert_eq!(args.source.bind_address, None);
    assert_eq!(args.healthz_bind_address, None);
    assert_eq!(args.metrics_bind_address, None);
    assert!(!args.bind_address_hard_fail);
    assert!(!args.masquerade_all);
    assert!(args.source.nodeport_addresses.is_empty());
    assert_eq!(
        args.conntrack_tcp_timeout_established,
        super::super::run::TCP_ESTABLISHED_DEFAULT
    );
    assert_eq!(
        args.conntrack_udp_timeout,
        super::super::run::UDP_TIMEOUT_DEFAULT
    );
    assert_eq!(args.oom_score_adj, None);
    // This proxy's own flag.
    assert_eq!(args.sync_period, Duration::from_secs(600));
    let warn = out.at(log::Level::Warn);
    for (flag, field) in [
        ("kubeconfig", "clientConnection.kubeconfig"),
        ("bind-address", "bindAddress"),
        ("masquerade-all", "iptables.masqueradeAll"),
        ("nodeport-addresses", "nodePortAddresses"),
        (
            "conntrack-tcp-timeout-established",
            "conntrack.tcpEstablishedTimeout",
        ),
        ("oom-score-adj", "oomScoreAdj"),
    ] {
        let line = format!(
            "--{flag} ignored: kube-proxy ignores its flags next to --config, and the file \
             leaves {field} unset, so the default applies"
        );
        assert!(warn.contains(&line.as_str()), "{line}: {warn:?}");
    }

    // nftables mode: the ignored --nodeport-addresses leaves kube-proxy's [primary] default.
    let out = run_with(
        &doc("mode: nftables\n"),
        &["--nodeport-addresses=192.0.2.0/24"],
    );
    assert_eq!(out.args().source.nodeport_addresses, ["primary"]);
}

#[test]
fn config_global_logging_flags_count_as_given_after_run_too() {
    // `--log-level` is global: given before or after `run`, it wins over logging.verbosity.
    let text = doc("logging: {verbosity: 9}");
    let (config, unused) = parse(&text).unwrap();
    for argv in [
        &["kube-bpf-proxy", "--log-level", "error", "run"][..],
        &["kube-bpf-proxy", "run", "--log-level", "error"][..],
    ] {
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        lay_under(&mut cli, &matches, &config, &unused, 1);
        assert_eq!(cli.log_level, "error", "{argv:?}");
    }
    assert_eq!(run_with(&text, &[]).cli.log_level, "trace");
}

#[test]
fn config_ipv6_bind_address_moves_the_default_http_addresses() {
    let out = run_with(&doc("bindAddress: '::'"), &[]);
    assert_eq!(out.args().healthz_bind_address, None);
    assert_eq!(
        super::super::run::default_http_addresses(out.args().source.bind_address),
        ("[::]:10256", "[::1]:10249")
    );
    let out = run_with(
        &doc("healthzBindAddress: '::'\nmetricsBindAddress: 10.0.0.1:99"),
        &[],
    );
    assert_eq!(
        out.args().healthz_bind_address.as_deref(),
        Some("[::]:10256")
    );
    assert_eq!(
        out.args().metrics_bind_address.as_deref(),
        Some("10.0.0.1:99")
    );
}

#[test]
fn config_ipvs_schedulers_map_to_ours_with_a_warning_where_approximated() {
    for (name, ours, approximated) in [
        ("rr", Scheduler::RoundRobin, false),
        ("wrr", Scheduler::WeightedRoundRobin, false),
        ("lc", Scheduler::LeastConnection, false),
        ("wlc", Scheduler::WeightedLeastConnection, false),
        ("sh", Scheduler::SourceHash, false),
        ("mh", Scheduler::Maglev, false),
        ("sed", Scheduler::ShortestExpectedDelay, false),
        ("nq", Scheduler::NeverQueue, false),
        ("dh", Scheduler::SourceHash, true),
        ("lblc", Scheduler::SourceHash, true),
        ("lblcr", Scheduler::SourceHash, true),
    ] {
        let out = run_with(
            &doc(&format!("mode: ipvs\nipvs: {{scheduler: {name}}}")),
            &[],
        );
        assert_eq!(Scheduler::from(out.args().source.scheduler), ours, "{name}");
        let warnings = out.warnings();
        if approximated {
            assert_eq!(warnings.len(), 1, "{name}: {warnings:?}");
            assert!(
                warnings[0].starts_with(&format!(
                    "ipvs.scheduler {name}: --scheduler {} instead: ",
                    ours.as_str()
                )),
                "{warnings:?}"
            );
        } else {
            assert_eq!(warnings, Vec::<&str>::new(), "{name}");
        }
    }
    let dh = run_with(&doc("ipvs: {scheduler: dh}"), &[]);
    assert!(dh.warnings()[0].contains("single Service address"));
    assert!(dh.warnings()[0].ends_with("(kube-proxy itself reads it in ipvs mode only)"));
    // Empty: the default scheduler.
    let empty = run_with(&doc("ipvs: {scheduler: ''}"), &[]);
    assert_eq!(empty.args().source.scheduler, SchedulerFlag::Random);
}

#[test]
fn config_conntrack_size_follows_kube_proxys_formula() {
    let size = |body: &str, cpus: u32| {
        let (config, unused) = parse(&doc(body)).unwrap();
        let matches = Cli::command()
            .try_get_matches_from(["kube-bpf-proxy", "run"])
            .unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        lay_under(&mut cli, &matches, &config, &unused, cpus);
        match cli.command {
            Command::Run(args) => args.max_conntrack,
            _ => unreachable!(),
        }
    };
    // Both null: this proxy's memory-based default.
    assert_eq!(size("conntrack: {}", 8), None);
    // One set: the other takes kube-proxy's default.
    assert_eq!(size("conntrack: {maxPerCore: 1000}", 8), Some(131072));
    assert_eq!(size("conntrack: {maxPerCore: 65536}", 8), Some(524288));
    assert_eq!(size("conntrack: {min: 10}", 2), Some(65536));
    assert_eq!(size("conntrack: {min: 1000000}", 2), Some(1000000));
    // maxPerCore 0 leaves the size alone, min included.
    assert_eq!(size("conntrack: {maxPerCore: 0, min: 5000000}", 2), None);
    // Never more than the flag holds.
    assert_eq!(
        size("conntrack: {maxPerCore: 2147483647}", 1024),
        Some(u32::MAX)
    );
}

#[test]
fn config_detect_local_modes() {
    let pods = |body: &str| run_with(&doc(body), &[]).args().pod_interfaces.clone();
    assert_eq!(
        pods("detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: cali}"),
        ["auto", "cali*"]
    );
    assert_eq!(
        pods("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: cbr0}"),
        ["auto", "cbr0"]
    );
    assert_eq!(pods("detectLocalMode: NodeCIDR"), ["auto"]);
    assert_eq!(
        pods("detectLocalMode: ClusterCIDR\nclusterCIDR: 10.244.0.0/16"),
        ["auto"]
    );
    let out = run_with(&doc("clusterCIDR: 10.244.0.0/16"), &[]);
    assert!(out.at(log::Level::Info).contains(
        &"detectLocalMode ClusterCIDR and clusterCIDR 10.244.0.0/16: not needed, local pods are \
          recognised by the socket hooks and their interfaces (--pod-interfaces)"
    ));
    // A detectLocal field the mode does not use is listed.
    let (_, unused) = parse(&doc(
        "detectLocalMode: NodeCIDR\ndetectLocal: {bridgeInterface: cni0}",
    ))
    .unwrap();
    assert_eq!(unused, ["detectLocal.bridgeInterface"]);
}

#[test]
fn config_node_port_address_keywords_expand() {
    let list = |body: &str| {
        let out = run_with(&doc(body), &[]);
        (
            out.args().source.nodeport_addresses.clone(),
            out.warnings().len(),
        )
    };
    assert_eq!(
        list("nodePortAddresses: [all]"),
        (vec!["0.0.0.0/0".to_string(), "::/0".to_string()], 0)
    );
    assert_eq!(
        list("nodePortAddresses: [localhost, 10.1.2.3/8]"),
        (
            vec![
                "127.0.0.0/8".to_string(),
                "::1/128".to_string(),
                "10.0.0.0/8".to_string()
            ],
            1
        )
    );
    assert_eq!(list("nodePortAddresses: []"), (Vec::new(), 0));
    let out = run_with(&doc("nodePortAddresses: [localhost]"), &[]);
    assert_eq!(
        out.warnings(),
        ["nodePortAddresses localhost: NodePorts are never served on loopback addresses here"]
    );
    // Every expansion is a valid --nodeport-addresses.
    assert!(out.args().source.nodeport_selection().is_ok());
}

#[test]
fn config_fields_not_used_here_are_listed_once() {
    let text = doc("
iptables: {masqueradeAll: true, masqueradeBit: 14, localhostNodePorts: false, syncPeriod: 30s, minSyncPeriod: 0s}
nftables: {masqueradeBit: null}
ipvs: {excludeCIDRs: [10.0.0.0/8], tcpTimeout: 0s}
winkernel: {networkName: l2bridge, enableDSR: false}
clientConnection: {qps: 5, burst: 10, contentType: application/vnd.kubernetes.protobuf}
conntrack: {tcpCloseWaitTimeout: 1h}
featureGates: {NFTablesProxyMode: true, SomethingNew: false, TopologyAwareHints: true}
logging: {flushFrequency: 5s}
enableProfiling: true
udpIdleTimeout: 250ms
unknownTopLevel: null
conntrack2: {a: 1}
");
    let (_, unused) = parse(&text).unwrap();
    assert_eq!(
        unused,
        [
            "clientConnection.burst",
            "clientConnection.contentType",
            "clientConnection.qps",
            "conntrack2",
            "enableProfiling",
            "featureGates.NFTablesProxyMode",
            "featureGates.SomethingNew",
            "iptables.localhostNodePorts",
            "iptables.masqueradeBit",
            "ipvs.excludeCIDRs",
            "logging.flushFrequency",
            "udpIdleTimeout",
            "unknownTopLevel",
            "winkernel.networkName",
        ]
    );
    let out = run_with(&text, &[]);
    let warnings = out.warnings();
    assert_eq!(
        warnings
            .iter()
            .filter(|w| w.starts_with("fields not used by kube-bpf-proxy: "))
            .count(),
        1,
        "{warnings:?}"
    );
    assert!(warnings.contains(
        &"fields not used by kube-bpf-proxy: clientConnection.burst, clientConnection.contentType, \
          clientConnection.qps, conntrack2, enableProfiling, \
          featureGates.NFTablesProxyMode, featureGates.SomethingNew, iptables.localhostNodePorts, \
          iptables.masqueradeBit, ipvs.excludeCIDRs, \
          logging.flushFrequency, udpIdleTimeout, unknownTopLevel, winkernel.networkName"
    ));
    // JSON content is what this proxy speaks anyway.
    let (_, unused) = parse(&doc("clientConnection: {contentType: application/json}")).unwrap();
    assert!(unused.is_empty());
}

/// semantics 7.12, 11.11: masqueradeAll of the mode's block (iptables' in iptables and ipvs
/// modes and by default, nftables' in nftables mode) is `--masquerade-all`; the flag wins.
#[test]
fn config_masquerade_all_follows_the_mode() {
    for (text, want) in [
        ("iptables: {masqueradeAll: true}", true),
        ("mode: ipvs\niptables: {masqueradeAll: true}", true),
        ("mode: nftables\niptables: {masqueradeAll: true}", false),
        ("mode: nftables\nnftables: {masqueradeAll: true}", true),
        ("mode: iptables\nnftables: {masqueradeAll: true}", false),
        ("iptables: {masqueradeAll: false}", false),
    ] {
        let out = run_with(&doc(text), &[]);
        assert_eq!(out.args().masquerade_all, want, "{text}");
    }
    // The other mode's field means nothing: listed.
    let (_, unused) = parse(&doc("mode: nftables\niptables: {masqueradeAll: true}")).unwrap();
    assert_eq!(unused, ["iptables.masqueradeAll"]);
    let (_, unused) = parse(&doc("nftables: {masqueradeAll: true}")).unwrap();
    assert_eq!(unused, ["nftables.masqueradeAll"]);
    // The flag wins over the file (a file's `false` is its zero value: the flag's default).
    let out = run_with(
        &doc("iptables: {masqueradeAll: true}"),
        &["--masquerade-all"],
    );
    assert!(out.args().masquerade_all);
}

#[test]
fn config_feature_gates_always_on_here_warn_when_turned_off() {
    let out = run_with(
        &doc("featureGates: {TopologyAwareHints: false, LoadBalancerIPMode: true}"),
        &[],
    );
    assert_eq!(
        out.warnings(),
        [
            "featureGates.TopologyAwareHints=false: not honoured, this proxy always follows zone \
          hints (semantics 5.11)"
        ]
    );
}

/// semantics 5.5: PreferSameTrafficDistribution=false turns the reading of node hints off,
/// from the file or from kube-proxy's flag; true (or absent) leaves it on. Never listed as
/// unused.
#[test]
fn config_prefer_same_traffic_distribution_false_stops_reading_node_hints() {
    for (text, flags, ignored) in [
        (
            "featureGates: {PreferSameTrafficDistribution: false}",
            &[][..],
            true,
        ),
        (
            "featureGates: {PreferSameTrafficDistribution: true}",
            &[],
            false,
        ),
        ("", &[], false),
    ] {
        let out = run_with(&doc(text), flags);
        assert_eq!(out.args().source.ignore_node_hints, ignored, "{text}");
        assert_eq!(out.args().source.config().unwrap().node_hints, !ignored);
        assert!(out.warnings().is_empty(), "{:?}", out.warnings());
        let infos = out.at(log::Level::Info);
        assert_eq!(
            infos
                .iter()
                .any(|n| n.contains("forNodes hints are not read")),
            ignored,
            "{infos:?}"
        );
    }
    let (_, unused) = parse(&doc("featureGates: {PreferSameTrafficDistribution: false}")).unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    let out = run_argv(&["--feature-gates=PreferSameTrafficDistribution=false"]).unwrap();
    assert!(out.args().source.ignore_node_hints);
}

#[test]
fn config_errors_name_the_field() {
    for (body, want) in [
        (
            "conntrack: {maxPerCore: x}",
            "conntrack.maxPerCore: expected an integer, got \"x\"",
        ),
        (
            "conntrack: {maxPerCore: 1.5}",
            "conntrack.maxPerCore: expected an integer, got 1.5",
        ),
        ("conntrack: {min: -1}", "conntrack.min: -1 is negative"),
        (
            "conntrack: {maxPerCore: 4294967296}",
            "conntrack.maxPerCore: 4294967296 is out of range for a 32-bit integer",
        ),
        (
            "conntrack: {tcpEstablishedTimeout: 5}",
            "conntrack.tcpEstablishedTimeout: expected a duration such as \"15m0s\", got 5",
        ),
        (
            "configSyncPeriod: 1d",
            "configSyncPeriod: \"1d\" is not a duration such as \"15m0s\" or \"300ms\": unknown \
             unit \"d\"",
        ),
        (
            "configSyncPeriod: -5s",
            "configSyncPeriod: \"-5s\": a duration here must not be negative",
        ),
        (
            "iptables: {syncPeriod: soon}",
            "iptables.syncPeriod: \"soon\" is not a duration such as \"15m0s\" or \"300ms\": \
             expected a number",
        ),
        (
            "iptables: {masqueradeAll: 1}",
            "iptables.masqueradeAll: expected a boolean, got 1",
        ),
        ("iptables: 5", "iptables: expected a mapping, got 5"),
        (
            "hostnameOverride: [a]",
            "hostnameOverride: expected a string, got a list",
        ),
        (
            "hostnameOverride: 123",
            "hostnameOverride: expected a string, got 123",
        ),
        (
            "bindAddress: localhost",
            "bindAddress: \"localhost\" is not an IP address",
        ),
        (
            "healthzBindAddress: 'host:1'",
            "healthzBindAddress: \"host:1\" is not IP:port or an IP address",
        ),
        (
            "bindAddressHardFail: yes",
            "bindAddressHardFail: expected a boolean, got \"yes\"",
        ),
        (
            "mode: userspace",
            "mode: unknown mode \"userspace\" (iptables, ipvs, nftables or empty)",
        ),
        (
            "mode: kernelspace",
            "mode: kernelspace is kube-proxy's Windows mode",
        ),
        (
            "ipvs: {scheduler: fo}",
            "ipvs.scheduler: \"fo\" is not a scheduler",
        ),
        (
            "ipvs: {excludeCIDRs: [1]}",
            "ipvs.excludeCIDRs: expected a list of strings, got a list",
        ),
        (
            "detectLocalMode: Bridge",
            "detectLocalMode: unknown mode \"Bridge\"",
        ),
        (
            "detectLocalMode: BridgeInterface",
            "detectLocal.bridgeInterface: required with detectLocalMode BridgeInterface",
        ),
        (
            "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: a/b}",
            "detectLocal.bridgeInterface: \"a/b\" is not an interface name",
        ),
        (
            "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: 'cali*'}",
            "detectLocal.interfaceNamePrefix: \"cali*\" is not the start of an interface name",
        ),
        (
            "clusterCIDR: 10.244.0.0",
            "clusterCIDR: \"10.244.0.0\" is not a CIDR",
        ),
        (
            "clusterCIDR: 10.0.0.0/8,10.1.0.0/16",
            "clusterCIDR: \"10.0.0.0/8,10.1.0.0/16\" has more than one CIDR of a family",
        ),
        (
            "nodePortAddresses: [everywhere]",
            "nodePortAddresses: \"everywhere\" is not a CIDR or one of primary, all, localhost",
        ),
        (
            "nodePortAddresses: primary",
            "nodePortAddresses: expected a list of strings, got \"primary\"",
        ),
        (
            "oomScoreAdj: -1001",
            "oomScoreAdj: -1001 is outside -1000..=1000",
        ),
        (
            "oomScoreAdj: '5'",
            "oomScoreAdj: expected an integer, got \"5\"",
        ),
        (
            "logging: {format: xml}",
            "logging.format: \"xml\" is not text or json",
        ),
        (
            "logging: {verbosity: -1}",
            "logging.verbosity: -1 is negative",
        ),
        (
            "featureGates: {LoadBalancerIPMode: 'true'}",
            "featureGates.LoadBalancerIPMode: expected a boolean, got \"true\"",
        ),
        (
            "featureGates: [a]",
            "featureGates: expected a mapping of gate names to booleans, got a list",
        ),
        (
            "clientConnection: {qps: fast}",
            "clientConnection.qps: expected a number, got \"fast\"",
        ),
        (
            "clientConnection: {kubeconfig: 7}",
            "clientConnection.kubeconfig: expected a string, got 7",
        ),
    ] {
        let got = err(&doc(body));
        assert!(got.starts_with(want), "{body}:\n got {got}\nwant {want}");
    }
}

#[test]
fn config_errors_on_the_document_itself() {
    assert_eq!(
        err("kind: KubeProxyConfiguration\n"),
        "apiVersion (missing) is not supported (expected kubeproxy.config.k8s.io/v1alpha1)"
    );
    assert_eq!(
        err("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n"),
        "apiVersion \"kubeproxy.config.k8s.io/v1alpha2\" is not supported (expected \
         kubeproxy.config.k8s.io/v1alpha1)"
    );
    assert_eq!(
        err("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n"),
        "kind \"KubeletConfiguration\" is not supported (expected KubeProxyConfiguration)"
    );
    assert_eq!(
        err("apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"),
        "kind (missing) is not supported (expected KubeProxyConfiguration)"
    );
    assert_eq!(
        err(""),
        "expected a KubeProxyConfiguration mapping, got nothing"
    );
    assert_eq!(
        err("- a\n- b\n"),
        "expected a KubeProxyConfiguration mapping, got a list"
    );
    assert!(err("a: [\n").starts_with("not YAML or JSON: "));
    assert!(err("{\"apiVersion\": ").starts_with("not YAML or JSON: "));
    assert!(err(&doc("mode: a\nmode: b")).starts_with("not YAML or JSON: "));
    // A key that is no string, number or boolean has no field name.
    assert!(err(&doc("? [a]\n: b")).starts_with("not YAML or JSON: "));
    // A number is a (strange) field name.
    assert_eq!(parse(&doc("1: a")).unwrap().1, ["1"]);
    assert!(err("---\na: 1\n---\nb: 2\n").starts_with("not YAML or JSON: "));
}

#[test]
fn config_load_names_the_file() {
    let missing = load(Path::new("/nonexistent/kube-proxy.conf")).unwrap_err();
    assert!(
        missing
            .to_string()
            .starts_with("--config /nonexistent/kube-proxy.conf: "),
        "{missing}"
    );
}

/// Every field of kubeadm's file, and every mapping holding them, with values of every kind:
/// the result is a value or an error, never a panic, and a value can be applied.
#[test]
fn config_any_value_in_any_field_never_panics() {
    let base: Value = serde_json::to_value(
        serde_norway::from_str::<serde_norway::Value>(KUBEADM_DEFAULT).unwrap(),
    )
    .unwrap();
    let mut paths: Vec<Vec<String>> = Vec::new();
    fn walk(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        if let Value::Object(m) = v {
            for (k, child) in m {
                at.push(k.clone());
                out.push(at.clone());
                walk(child, at, out);
                at.pop();
            }
        }
    }
    walk(&base, &mut Vec::new(), &mut paths);
    let odd: Vec<Value> = serde_json::from_str(
        r#"[null, true, false, 0, -1, 1.5, 1e300, 18446744073709551615, -9223372036854775808,
            "", "x", "0", "0s", "-5s", "1h", "99999999999h", "primary", "::", "1.2.3.4:99999",
            [], ["x"], [1], {}, {"a": 1}, {"x": {"y": []}}]"#,
    )
    .unwrap();
    let mut tried = 0;
    for path in &paths {
        for value in &odd {
            let mut tree = base.clone();
            let mut at = &mut tree;
            for key in &path[..path.len() - 1] {
                at = &mut at[key.as_str()];
            }
            at[path[path.len() - 1].as_str()] = value.clone();
            let text = serde_json::to_string(&tree).unwrap();
            if let Ok((config, unused)) = parse(&text) {
                let matches = Cli::command()
                    .try_get_matches_from(["kube-bpf-proxy", "run"])
                    .unwrap();
                let mut cli = Cli::from_arg_matches(&matches).unwrap();
                lay_under(&mut cli, &matches, &config, &unused, 64);
            }
            tried += 1;
        }
    }
    assert!(tried > 1000, "{tried}");
}

proptest::proptest! {
    /// Arbitrary text, and arbitrary text after a valid header, is parsed or refused.
    #[test]
    fn config_parse_never_panics(text in "\\PC{0,200}", body in "[a-zA-Z:{}\\[\\], \\n0-9.\"'-]{0,200}") {
        let _ = parse(&text);
        let _ = parse(&doc(&body));
    }
}

/// What `kube-bpf-proxy run ARGV` ends up with, kube-proxy's flags (and `--config`, when in
/// `argv`) read as `cli::main` reads them, on a node with 4 CPUs.
fn run_argv(argv: &[&str]) -> Result<Outcome, String> {
    let matches = Cli::command()
        .try_get_matches_from(["kube-bpf-proxy", "run"].iter().chain(argv))
        .map_err(|e| e.to_string())?;
    let mut cli = Cli::from_arg_matches(&matches).expect("from matches");
    let Command::Run(args) = &cli.command else {
        unreachable!("run was parsed")
    };
    let mut notes = Vec::new();
    if let Some(settings) = kube_proxy_settings(args).map_err(|e| format!("{e:#}"))? {
        notes = settings.notes;
        notes.extend(lay_under(
            &mut cli,
            &matches,
            &settings.config,
            &settings.unused,
            4,
        ));
    }
    Ok(Outcome { cli, notes })
}

#[test]
fn kube_proxy_flags_read_as_the_configuration_they_describe() {
    // GKE's and kops' kube-proxy command lines carry these over unchanged.
    let out = run_argv(&[
        "--proxy-mode=ipvs",
        "--ipvs-scheduler=wlc",
        "--cluster-cidr=10.244.0.0/16",
        "--detect-local-mode=InterfaceNamePrefix",
        "--pod-interface-name-prefix=cali",
        "--conntrack-max-per-core=65536",
        "--conntrack-min=0",
        "--v=5",
        "--feature-gates=TopologyAwareHints=false,SomeGate=true",
        "--iptables-sync-period=1m",
        "--iptables-min-sync-period=10s",
        "--ipvs-strict-arp",
        "--conntrack-tcp-be-liberal=false",
        "--hostname-override=node-7",
    ])
    .unwrap();
    let args = out.args();
    assert_eq!(
        args.source.scheduler,
        SchedulerFlag::WeightedLeastConnection
    );
    assert_eq!(args.max_conntrack, Some(65536 * 4));
    assert_eq!(args.pod_interfaces, ["auto", "cali*"]);
    assert_eq!(args.source.hostname_override.as_deref(), Some("node-7"));
    assert_eq!(out.cli.log_level, "debug");
    assert_eq!(args.oom_score_adj, None);
    let warnings = out.warnings();
    assert!(
        warnings.contains(
            &"featureGates.TopologyAwareHints=false: not honoured, this proxy always follows zone \
              hints (semantics 5.11)"
        ),
        "{warnings:#?}"
    );
    // What has no meaning here is listed by flag; a false boolean is kube-proxy's default.
    assert!(
        warnings.contains(
            &"fields not used by kube-bpf-proxy: --iptables-min-sync-period, \
              --iptables-sync-period, featureGates.SomeGate"
        ),
        "{warnings:#?}"
    );
    let info = out.at(log::Level::Info);
    assert!(info[0].starts_with("kube-proxy's flags read as its configuration: --proxy-mode=ipvs"));
    assert!(info.contains(&"mode ipvs: replaced by this proxy (BPF programs and maps instead of kube-proxy's rules)"), "{info:#?}");
    assert!(
        info.iter()
            .any(|n| n.starts_with("ipvs.strictARP: not applicable")),
        "{info:#?}"
    );

    // No kube-proxy flag: nothing is laid under the command line.
    let plain = run_argv(&["--manifests", "/m"]).unwrap();
    assert!(plain.notes.is_empty(), "{:#?}", plain.notes);
    assert_eq!(plain.args().oom_score_adj, None);
}

#[test]
fn kube_proxy_flags_errors_name_the_flag() {
    for (argv, want) in [
        (
            &["--conntrack-min=x"][..],
            "--conntrack-min: \"x\" is not an integer",
        ),
        (&["--conntrack-min=-1"], "--conntrack-min: -1 is negative"),
        (
            &["--kube-api-qps=fast"],
            "--kube-api-qps: \"fast\" is not a number",
        ),
        (
            &["--proxy-mode=userspace"],
            "--proxy-mode: unknown mode \"userspace\" (iptables, ipvs, nftables or empty)",
        ),
        (
            &["--feature-gates=SomeGate"],
            "--feature-gates: \"SomeGate\" is not Name=true or Name=false",
        ),
        (
            &["--feature-gates=SomeGate=maybe"],
            "--feature-gates: \"maybe\" is not a boolean (true or false)",
        ),
        (
            &["--ipvs-strict-arp=yes"],
            "--ipvs-strict-arp: \"yes\" is not a boolean (true or false)",
        ),
        (&["--iptables-sync-period=soon"], "--iptables-sync-period: "),
        (
            &["--detect-local-mode=BridgeInterface"],
            "--pod-bridge-interface: required with detectLocalMode BridgeInterface",
        ),
        (
            &["--cluster-cidr=10.0.0.0/8,10.1.0.0/16"],
            "--cluster-cidr: \"10.0.0.0/8,10.1.0.0/16\" has more than one CIDR of a family",
        ),
    ] {
        match run_argv(argv) {
            Ok(_) => panic!("{argv:?} accepted"),
            Err(e) => assert!(e.starts_with(want), "{argv:?}: {e}"),
        }
    }
    // pflag never takes the next argument as a boolean's value.
    let e = run_argv(&["--ipvs-strict-arp", "false"]).err().unwrap();
    assert!(e.contains("unexpected argument 'false'"), "{e}");
}

#[test]
fn kube_proxy_flags_are_ignored_with_a_config_file_except_logging() {
    // semantics 11.13: with --config kube-proxy takes the file's settings; its logging flags
    // still win over the file.
    let dir = std::env::temp_dir().join(format!("kbp-flags-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.conf");
    std::fs::write(
        &file,
        doc("mode: nftables\nlogging: {verbosity: 0}\nipvs: {scheduler: rr}\n"),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let out = run_argv(&[
        "--config",
        path,
        "--ipvs-scheduler=wlc",
        "--cluster-cidr=10.244.0.0/16",
        "-v",
        "6",
    ])
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.args().source.scheduler, SchedulerFlag::RoundRobin);
    assert_eq!(out.cli.log_level, "trace");
    assert!(
        out.warnings().contains(
            &"kube-proxy's flags ignored, as kube-proxy ignores them when --config is given (the \
              file's settings apply; logging flags excepted): --cluster-cidr=10.244.0.0/16 \
              --ipvs-scheduler=wlc"
        ),
        "{:#?}",
        out.notes
    );
}

#[test]
fn kube_proxy_cleanup_and_init_only_ask_for_something_else() {
    use flags::Instead;
    let instead = |argv: &[&str]| run_argv(argv).unwrap().args().kube_proxy.instead();
    assert_eq!(instead(&[]), Ok(None));
    assert_eq!(instead(&["--cleanup"]), Ok(Some(Instead::Cleanup)));
    assert_eq!(instead(&["--cleanup=true"]), Ok(Some(Instead::Cleanup)));
    assert_eq!(instead(&["--cleanup=false"]), Ok(None));
    assert_eq!(instead(&["--init-only"]), Ok(Some(Instead::InitOnly)));
    assert_eq!(
        instead(&["--init-only", "--cleanup"]),
        Ok(Some(Instead::Cleanup))
    );
    assert!(instead(&["--cleanup=later"]).is_err());
}

/// semantics 9.6: what kube-proxy writes to the kernel's connection tracking, from its
/// `conntrack` section and its defaults.
#[test]
fn config_conntrack_settings_for_the_kernels_table() {
    let settings =
        |text: &str, cpus| netfilter_settings(&parse(&doc(text)).unwrap().0.conntrack, cpus);
    assert_eq!(
        settings("conntrack: {}", 8),
        NetfilterSettings {
            max: Some(262144),
            tcp_established_secs: Some(86400),
            tcp_close_wait_secs: Some(3600),
            tcp_be_liberal: false,
            udp_secs: None,
            udp_stream_secs: None,
        }
    );
    assert_eq!(settings("conntrack: {}", 2).max, Some(131072));
    assert_eq!(
        settings(
            "conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 30m, \
             tcpBeLiberal: true, udpTimeout: 30s, udpStreamTimeout: 5m}",
            8
        ),
        NetfilterSettings {
            max: None,
            tcp_established_secs: None,
            tcp_close_wait_secs: Some(1800),
            tcp_be_liberal: true,
            udp_secs: Some(30),
            udp_stream_secs: Some(300),
        }
    );
    assert_eq!(
        settings("conntrack: {maxPerCore: 1000, min: 10}", 4).max,
        Some(4000)
    );
}

/// semantics 8.6: /healthz's timeout is twice the sync period of the mode's block; the other
/// blocks' sync periods are not used.
#[test]
fn config_sync_period_of_the_mode_sets_the_health_timeout() {
    let text = doc("mode: nftables\nnftables: {syncPeriod: 10s}\niptables: {syncPeriod: 1m}");
    let (_, unused) = parse(&text).unwrap();
    assert_eq!(unused, ["iptables.syncPeriod"]);
    let out = run_with(&text, &[]);
    assert_eq!(out.args().health_timeout, Some(Duration::from_secs(20)));
    let out = run_with(&doc("iptables: {syncPeriod: 45s}"), &[]);
    assert_eq!(out.args().health_timeout, Some(Duration::from_secs(90)));
    let out = run_with(&doc("mode: ipvs"), &[]);
    assert_eq!(out.args().health_timeout, None);
}

/// semantics 9.6: without a `--config` file, `run`'s --conntrack-tcp-timeout-established and
/// --conntrack-udp-timeout given on the command line set the kernel's table too, as
/// kube-proxy's flags of those names do; next to a file they do not (kube-proxy ignores them).
#[test]
fn kernel_timeouts_follow_the_flags_without_a_config_file() {
    let kernel = |argv: &[&str]| {
        let matches = Cli::command()
            .try_get_matches_from(["kube-bpf-proxy", "run"].iter().chain(argv))
            .unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        let Command::Run(args) = &mut cli.command else {
            unreachable!("run was parsed")
        };
        if let Some(settings) = kube_proxy_settings(args).unwrap() {
            args.netfilter = Some(netfilter_settings(&settings.config.conntrack, 4));
        }
        kernel_timeouts_from_flags(args, matches.subcommand_matches("run").unwrap(), 4);
        args.netfilter.clone().unwrap()
    };
    let defaults = kernel(&[]);
    assert_eq!(defaults.max, Some(131072));
    assert_eq!(defaults.tcp_established_secs, Some(86400));
    assert_eq!(defaults.udp_secs, None);
    let given = kernel(&[
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-udp-timeout=30s",
    ]);
    assert_eq!(given.tcp_established_secs, Some(7200));
    assert_eq!(given.udp_secs, Some(30));
    // With kube-proxy's flags too (read as a configuration, not a file).
    let mixed = kernel(&[
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-max-per-core=0",
    ]);
    assert_eq!((mixed.max, mixed.tcp_established_secs), (None, Some(7200)));
}

/// kube-proxy's nftables mode defaults nodePortAddresses to [primary] (its
/// platformApplyDefaults; semantics 7.3); iptables and ipvs serve every local address; and
/// kube-proxy's validation refuses `primary` next to CIDRs.
#[test]
fn config_nftables_mode_serves_node_ports_on_the_primary_addresses_by_default() {
    let list = |body: &str| {
        run_with(&doc(body), &[])
            .args()
            .source
            .nodeport_addresses
            .clone()
    };
    assert_eq!(list("mode: nftables"), ["primary"]);
    assert_eq!(list("mode: nftables\nnodePortAddresses: []"), ["primary"]);
    assert_eq!(
        list("mode: nftables\nnodePortAddresses: [10.0.0.0/8]"),
        ["10.0.0.0/8"]
    );
    assert!(list("mode: iptables").is_empty());
    assert!(list("mode: ipvs").is_empty());
    assert!(list("clusterCIDR: 10.244.0.0/16").is_empty());
    let flags = |argv: &[&str]| {
        run_argv(argv)
            .unwrap()
            .args()
            .source
            .nodeport_addresses
            .clone()
    };
    assert_eq!(flags(&["--proxy-mode=nftables"]), ["primary"]);
    assert_eq!(
        flags(&["--proxy-mode=nftables", "--nodeport-addresses=192.0.2.0/24"]),
        ["192.0.2.0/24"]
    );
    assert!(flags(&["--proxy-mode=iptables"]).is_empty());

    let e = err(&doc("nodePortAddresses: [primary, 10.0.0.0/8]"));
    assert!(e.contains("can't use both 'primary' and CIDRs"), "{e}");
    let mixed = ["10.0.0.0/8".to_string(), "primary".to_string()];
    assert!(
        crate::compile::NodePortSelection::parse(&mixed, None)
            .unwrap_err()
            .contains("can't use both 'primary' and CIDRs")
    );
}

/// semantics 8.6, 11.11: kube-proxy applies --iptables-sync-period in every mode but ipvs, so
/// in nftables mode it sets the health timeout too.
#[test]
fn kube_proxy_iptables_sync_period_counts_in_nftables_mode() {
    for argv in [
        &["--proxy-mode=nftables", "--iptables-sync-period=10s"][..],
        &["--iptables-sync-period=10s"],
        &["--proxy-mode=iptables", "--iptables-sync-period=10s"],
    ] {
        let out = run_argv(argv).unwrap();
        assert_eq!(
            out.args().health_timeout,
            Some(Duration::from_secs(20)),
            "{argv:?}"
        );
        assert!(
            !out.warnings()
                .iter()
                .any(|w| w.contains("--iptables-sync-period")),
            "{argv:?}: {:#?}",
            out.warnings()
        );
    }
    let out = run_argv(&["--proxy-mode=ipvs", "--iptables-sync-period=10s"]).unwrap();
    assert_eq!(out.args().health_timeout, None);
    // An invalid value is named by its flag.
    let e = run_argv(&["--proxy-mode=nftables", "--iptables-sync-period=soon"])
        .err()
        .unwrap();
    assert!(e.contains("--iptables-sync-period"), "{e}");
}

/// semantics 8.7, 8.10, 11.10: the health and metrics addresses as kube-proxy completes its
/// flags: an IP alone gets the default port (or the deprecated --healthz-port/--metrics-port),
/// a port of 0 or an empty address turns the server off.
#[test]
fn http_addresses_complete_as_kube_proxy_completes_its_flags() {
    use super::super::run::http_addresses;
    let addrs = |argv: &[&str]| {
        let (h, m) = http_addresses(run_argv(argv).unwrap().args());
        (h, m)
    };
    let pair = |h: &str, m: &str| (h.to_string(), m.to_string());
    assert_eq!(addrs(&[]), pair("0.0.0.0:10256", "127.0.0.1:10249"));
    assert_eq!(
        addrs(&[
            "--healthz-bind-address=0.0.0.0",
            "--metrics-bind-address=127.0.0.1"
        ]),
        pair("0.0.0.0:10256", "127.0.0.1:10249")
    );
    assert_eq!(
        addrs(&["--healthz-bind-address=::", "--metrics-bind-address=[::1]"]),
        pair("[::]:10256", "[::1]:10249")
    );
    assert_eq!(
        addrs(&[
            "--healthz-bind-address=192.0.2.1",
            "--healthz-port=12345",
            "--metrics-port=9090",
            "--metrics-bind-address=0.0.0.0"
        ]),
        pair("192.0.2.1:12345", "0.0.0.0:9090")
    );
    // A port in the address wins; the default address has one.
    assert_eq!(
        addrs(&[
            "--healthz-bind-address=0.0.0.0:9999",
            "--healthz-port=12345"
        ])
        .0,
        "0.0.0.0:9999"
    );
    assert_eq!(addrs(&["--healthz-port=12345"]).0, "0.0.0.0:10256");
    assert_eq!(
        addrs(&["--bind-address=::", "--metrics-port=1"]),
        pair("[::]:10256", "[::1]:10249")
    );
    // Off: port 0 (whatever the address), or an empty address.
    assert_eq!(
        addrs(&[
            "--healthz-port=0",
            "--metrics-port=0",
            "--healthz-bind-address=0.0.0.0:9999"
        ]),
        pair("", "")
    );
    assert_eq!(
        addrs(&["--healthz-bind-address=", "--metrics-bind-address="]),
        pair("", "")
    );
    // Next to --config the port flags are not read (kube-proxy reads them only without one).
    let mut out = run_argv(&["--healthz-port=0", "--healthz-bind-address=10.0.0.1"]).unwrap();
    let Command::Run(args) = &mut out.cli.command else {
        unreachable!("run was parsed")
    };
    args.config = Some("/etc/kube-proxy/config.conf".into());
    assert_eq!(http_addresses(args).0, "10.0.0.1:10256");
}

/// semantics 11.12: 0 in kube-proxy's conntrack timeout flags leaves the kernel's value alone;
/// this proxy's own flow maps keep their defaults then (not a timeout of 0 or 1 s).
#[test]
fn zero_conntrack_timeouts_keep_the_flow_maps_defaults() {
    use super::super::run::{TCP_ESTABLISHED_DEFAULT, UDP_TIMEOUT_DEFAULT, flow_timeouts};
    let defaults = run_argv(&[]).unwrap();
    assert_eq!(
        (
            defaults.args().conntrack_tcp_timeout_established,
            defaults.args().conntrack_udp_timeout
        ),
        (TCP_ESTABLISHED_DEFAULT, UDP_TIMEOUT_DEFAULT)
    );
    let zero = run_argv(&[
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-udp-timeout=0s",
    ])
    .unwrap();
    assert_eq!(
        flow_timeouts(zero.args()),
        (TCP_ESTABLISHED_DEFAULT, UDP_TIMEOUT_DEFAULT)
    );
    let given = run_argv(&[
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-udp-timeout=30s",
    ])
    .unwrap();
    assert_eq!(
        flow_timeouts(given.args()),
        (Duration::from_secs(7200), Duration::from_secs(30))
    );
    // The same from a file: zeros are kube-proxy's "not set".
    let out = run_with(
        &doc("conntrack: {tcpEstablishedTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}"),
        &[],
    );
    assert_eq!(
        flow_timeouts(out.args()),
        (TCP_ESTABLISHED_DEFAULT, UDP_TIMEOUT_DEFAULT)
    );
}

/// semantics 11.10: --hostname-override is trimmed and lower-cased; empty means the hostname;
/// blanks alone are refused ("empty hostname-override is invalid").
#[test]
fn hostname_override_is_trimmed_and_blanks_refused() {
    let name = |argv: &[&str]| run_argv(argv).map(|o| o.args().source.node_name());
    assert_eq!(name(&["--hostname-override= Node-A "]).unwrap(), "node-a");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_lowercase();
    assert_eq!(name(&["--hostname-override="]).unwrap(), host);
    let e = name(&["--hostname-override=  "]).unwrap_err();
    assert!(e.contains("empty hostname-override is invalid"), "{e}");
}
