//! kube-proxy's own command-line flags on `run`, so a kube-proxy command line carries over.
//!
//! Each flag stands for a field of the `KubeProxyConfiguration` (kube-proxy defines its flags
//! as setters of that document's fields). The flags given are written into such a document,
//! which then goes through exactly what a `--config` file goes through ([`super::parse_tree`]):
//! the same checks, the same mapping onto `run`'s own flags, the same list of what has no
//! meaning here. Errors and that list name the flags, not the fields.
//!
//! With `--config` as well, kube-proxy takes its settings from the file alone and ignores
//! these flags, except the logging ones, which win over the file (semantics 11.13; kube-proxy's
//! `Options.Complete`); so does this proxy, and it says which flags it ignored.
//!
//! The flags `run` has under the same name (`--hostname-override`, `--bind-address`,
//! `--nodeport-addresses`, `--masquerade-all`, `--healthz-bind-address`, ...) are `run`'s own
//! and are not listed here.

use std::collections::BTreeMap;

use clap::{Arg, ArgMatches, Command};
use serde_json::{Map, Value};

use super::{API_VERSION, ConfigError, KIND, KubeProxyConfig};

/// How a flag's text becomes a value of the document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Str,
    Int,
    /// A float (`--kube-api-qps`).
    Number,
    /// Go's `strconv.ParseBool`; the flag alone means true.
    Bool,
    /// A Go duration, checked by the document's parser.
    Duration,
    /// Comma-separated strings.
    List,
    /// `Name=true,Other=false`.
    Gates,
}

/// A flag of kube-proxy and the field it sets.
struct Flag {
    /// The long name, without `--`.
    name: &'static str,
    /// The field's path in the document (`conntrack.maxPerCore`).
    field: &'static str,
    ty: Type,
}

const fn flag(name: &'static str, field: &'static str, ty: Type) -> Flag {
    Flag { name, field, ty }
}

/// kube-proxy's flags (1.31-1.35, `cmd/kube-proxy/app/server.go` AddFlags and the logging
/// flags of component-base) that `run` does not have under the same name.
const FLAGS: &[Flag] = &[
    flag("proxy-mode", "mode", Type::Str),
    flag("cluster-cidr", "clusterCIDR", Type::Str),
    flag("detect-local-mode", "detectLocalMode", Type::Str),
    flag(
        "pod-bridge-interface",
        "detectLocal.bridgeInterface",
        Type::Str,
    ),
    flag(
        "pod-interface-name-prefix",
        "detectLocal.interfaceNamePrefix",
        Type::Str,
    ),
    flag(
        "iptables-masquerade-bit",
        "iptables.masqueradeBit",
        Type::Int,
    ),
    flag(
        "iptables-localhost-nodeports",
        "iptables.localhostNodePorts",
        Type::Bool,
    ),
    flag(
        "iptables-sync-period",
        "iptables.syncPeriod",
        Type::Duration,
    ),
    flag(
        "iptables-min-sync-period",
        "iptables.minSyncPeriod",
        Type::Duration,
    ),
    flag("ipvs-scheduler", "ipvs.scheduler", Type::Str),
    flag("ipvs-sync-period", "ipvs.syncPeriod", Type::Duration),
    flag("ipvs-min-sync-period", "ipvs.minSyncPeriod", Type::Duration),
    flag("ipvs-exclude-cidrs", "ipvs.excludeCIDRs", Type::List),
    flag("ipvs-strict-arp", "ipvs.strictARP", Type::Bool),
    flag("ipvs-tcp-timeout", "ipvs.tcpTimeout", Type::Duration),
    flag("ipvs-tcpfin-timeout", "ipvs.tcpFinTimeout", Type::Duration),
    flag("ipvs-udp-timeout", "ipvs.udpTimeout", Type::Duration),
    flag("conntrack-max-per-core", "conntrack.maxPerCore", Type::Int),
    flag("conntrack-min", "conntrack.min", Type::Int),
    flag(
        "conntrack-tcp-timeout-close-wait",
        "conntrack.tcpCloseWaitTimeout",
        Type::Duration,
    ),
    flag(
        "conntrack-tcp-be-liberal",
        "conntrack.tcpBeLiberal",
        Type::Bool,
    ),
    flag(
        "conntrack-udp-timeout-stream",
        "conntrack.udpStreamTimeout",
        Type::Duration,
    ),
    flag("config-sync-period", "configSyncPeriod", Type::Duration),
    flag("feature-gates", "featureGates", Type::Gates),
    flag(
        "kube-api-content-type",
        "clientConnection.contentType",
        Type::Str,
    ),
    flag("kube-api-qps", "clientConnection.qps", Type::Number),
    flag("kube-api-burst", "clientConnection.burst", Type::Int),
    flag("profiling", "enableProfiling", Type::Bool),
    flag(
        "show-hidden-metrics-for-version",
        "showHiddenMetricsForVersion",
        Type::Str,
    ),
    flag("v", "logging.verbosity", Type::Int),
    flag("vmodule", "logging.vmodule", Type::Str),
    flag("logging-format", "logging.format", Type::Str),
    flag(
        "log-flush-frequency",
        "logging.flushFrequency",
        Type::Duration,
    ),
];

/// The logging flags, which win over a `--config` file.
const LOGGING: &[&str] = &["v", "vmodule", "logging-format", "log-flush-frequency"];

/// kube-proxy's flags that ask for something else than running: `--cleanup` removes what the
/// proxy installed and exits, `--init-only` does what needs full privileges and exits.
const CLEANUP: &str = "cleanup";
const INIT_ONLY: &str = "init-only";

/// The kube-proxy flags given to `run`, as written, in the order of [`FLAGS`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxyFlags {
    given: Vec<(&'static str, String)>,
    cleanup: Option<String>,
    init_only: Option<String>,
}

/// What `--cleanup` or `--init-only` ask for instead of running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instead {
    Cleanup,
    InitOnly,
}

impl KubeProxyFlags {
    /// The flags given, `--name=value`, for a log line.
    pub fn given(&self) -> Vec<String> {
        self.shown(|_| true)
    }

    /// The given flags whose name `pick` keeps, `--name=value`.
    fn shown(&self, pick: impl Fn(&str) -> bool) -> Vec<String> {
        self.given
            .iter()
            .filter(|(name, _)| pick(name))
            .map(|(name, value)| format!("--{name}={value}"))
            .collect()
    }

    /// The given flags that a `--config` file does not override (logging).
    fn logging_only(&self) -> KubeProxyFlags {
        KubeProxyFlags {
            given: self
                .given
                .iter()
                .filter(|(name, _)| LOGGING.contains(name))
                .cloned()
                .collect(),
            ..Default::default()
        }
    }

    /// `--cleanup` or `--init-only`, when true (`--cleanup` first).
    pub fn instead(&self) -> Result<Option<Instead>, ConfigError> {
        for (name, value, what) in [
            (CLEANUP, &self.cleanup, Instead::Cleanup),
            (INIT_ONLY, &self.init_only, Instead::InitOnly),
        ] {
            if let Some(v) = value
                && go_bool(name, v)?
            {
                return Ok(Some(what));
            }
        }
        Ok(None)
    }

    /// The document the flags describe; `None` when no field flag was given.
    pub fn document(&self) -> Result<Option<Value>, ConfigError> {
        if self.given.is_empty() {
            return Ok(None);
        }
        let mut top = Map::new();
        top.insert("apiVersion".into(), Value::String(API_VERSION.into()));
        top.insert("kind".into(), Value::String(KIND.into()));
        for (name, text) in &self.given {
            let f = FLAGS.iter().find(|f| f.name == *name).expect("listed flag");
            let value = typed(f, text)?;
            let mut at = &mut top;
            let mut parts = f.field.split('.').peekable();
            while let Some(part) = parts.next() {
                if parts.peek().is_none() {
                    at.insert(part.to_string(), value.clone());
                    break;
                }
                let next = at
                    .entry(part.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                at = next.as_object_mut().expect("only mappings on the way");
            }
        }
        move_sync_periods_to_nftables(&mut top);
        Ok(Some(Value::Object(top)))
    }
}

/// kube-proxy applies `--iptables-sync-period` and `--iptables-min-sync-period` in every mode
/// but ipvs (its processV1Alpha1Flags); nftables mode has no flags of its own, so in that mode
/// they set the `nftables` block's periods.
fn move_sync_periods_to_nftables(top: &mut Map<String, Value>) {
    if top.get("mode").and_then(Value::as_str).map(str::trim) != Some("nftables") {
        return;
    }
    let Some(Value::Object(iptables)) = top.get_mut("iptables") else {
        return;
    };
    let moved: Vec<(String, Value)> = ["syncPeriod", "minSyncPeriod"]
        .iter()
        .filter_map(|k| iptables.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    if iptables.is_empty() {
        top.remove("iptables");
    }
    if moved.is_empty() {
        return;
    }
    let nftables = top
        .entry("nftables".to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(n) = nftables {
        n.extend(moved);
    }
}

/// The flags read as a configuration: what [`super::parse`] gives for a file, with errors and
/// the unused list naming flags. `None` when no field flag was given.
pub fn parse(
    flags: &KubeProxyFlags,
) -> Result<Option<(KubeProxyConfig, Vec<String>)>, ConfigError> {
    let Some(doc) = flags.document()? else {
        return Ok(None);
    };
    let (config, unused) = super::parse_tree(&doc).map_err(name_flag)?;
    let mut unused: Vec<String> = unused.iter().map(|field| flag_of(field)).collect();
    unused.sort();
    unused.dedup();
    Ok(Some((config, unused)))
}

/// The logging flags over a `--config` file's settings (they win, as in kube-proxy); the
/// other flags are returned, to be reported as ignored.
pub fn over_file(
    flags: &KubeProxyFlags,
    file: &mut KubeProxyConfig,
) -> Result<Vec<String>, ConfigError> {
    if let Some((logging, _)) = parse(&flags.logging_only())? {
        if logging.log_verbosity.is_some() {
            file.log_verbosity = logging.log_verbosity;
        }
        if logging.log_format.is_some() {
            file.log_format = logging.log_format;
        }
    }
    Ok(flags.shown(|name| !LOGGING.contains(&name)))
}

/// `--name` for a field path (the path itself when no flag sets it).
fn flag_of(field: &str) -> String {
    // The nftables periods came from the iptables flags (`move_sync_periods_to_nftables`).
    let from = match field {
        "nftables.syncPeriod" => "iptables.syncPeriod",
        "nftables.minSyncPeriod" => "iptables.minSyncPeriod",
        other => other,
    };
    FLAGS
        .iter()
        .find(|f| f.field == from)
        .map_or_else(|| field.to_string(), |f| format!("--{}", f.name))
}

/// An error of the document, naming the flag instead of the field.
fn name_flag(e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Type {
            field,
            expected,
            got,
        } => ConfigError::Type {
            field: flag_of(&field),
            expected,
            got,
        },
        ConfigError::Invalid { field, why } => ConfigError::Invalid {
            field: flag_of(&field),
            why,
        },
        other => other,
    }
}

/// Go's `strconv.ParseBool`, as pflag reads boolean flags.
fn go_bool(name: &str, text: &str) -> Result<bool, ConfigError> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(ConfigError::Invalid {
            field: format!("--{name}"),
            why: format!("{other:?} is not a boolean (true or false)"),
        }),
    }
}

fn typed(f: &Flag, text: &str) -> Result<Value, ConfigError> {
    let invalid = |why: String| ConfigError::Invalid {
        field: format!("--{}", f.name),
        why,
    };
    Ok(match f.ty {
        Type::Str | Type::Duration => Value::String(text.to_string()),
        Type::Int => Value::from(
            text.trim()
                .parse::<i64>()
                .map_err(|_| invalid(format!("{text:?} is not an integer")))?,
        ),
        Type::Number => {
            let n = text
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .ok_or_else(|| invalid(format!("{text:?} is not a number")))?;
            Value::Number(n)
        }
        Type::Bool => Value::Bool(go_bool(f.name, text)?),
        Type::List => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        Type::Gates => {
            let mut gates = BTreeMap::new();
            for pair in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let Some((gate, on)) = pair.split_once('=') else {
                    return Err(invalid(format!("{pair:?} is not Name=true or Name=false")));
                };
                gates.insert(gate.trim().to_string(), go_bool(f.name, on.trim())?);
            }
            Value::Object(
                gates
                    .into_iter()
                    .map(|(k, v)| (k, Value::Bool(v)))
                    .collect(),
            )
        }
    })
}

/// A boolean flag as pflag has them: `--name` alone is true, `--name=false` false; a value
/// must follow `=` (pflag never takes the next argument for a boolean).
fn boolean_arg(arg: Arg) -> Arg {
    arg.num_args(0..=1)
        .require_equals(true)
        .default_missing_value("true")
        .value_name("BOOL")
}

impl clap::FromArgMatches for KubeProxyFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = KubeProxyFlags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        let given = |id: &str| matches.get_one::<String>(id).cloned();
        self.given = FLAGS
            .iter()
            .filter_map(|f| given(f.name).map(|v| (f.name, v)))
            .collect();
        self.cleanup = given(CLEANUP);
        self.init_only = given(INIT_ONLY);
        Ok(())
    }
}

impl clap::Args for KubeProxyFlags {
    fn augment_args(cmd: Command) -> Command {
        let mut cmd = cmd.next_help_heading(
            "kube-proxy's flags (each sets its KubeProxyConfiguration field, read as --config \
             reads the file; ignored with --config, except the logging flags)",
        );
        for f in FLAGS {
            let mut arg = Arg::new(f.name)
                .long(f.name)
                .help(format!("kube-proxy's --{}: {}", f.name, f.field));
            if f.name == "v" {
                arg = arg.short('v').value_name("LEVEL");
            }
            arg = match f.ty {
                Type::Bool => boolean_arg(arg),
                Type::Duration => arg.value_name("DURATION"),
                Type::Int | Type::Number if f.name != "v" => arg.value_name("N"),
                Type::List => arg.value_name("LIST"),
                Type::Gates => arg.value_name("NAME=BOOL,..."),
                _ => arg,
            };
            cmd = cmd.arg(arg);
        }
        cmd.arg(boolean_arg(Arg::new(CLEANUP).long(CLEANUP).help(
            "kube-proxy's --cleanup: remove this proxy's hooks and maps (as `cleanup`) and exit",
        )))
        .arg(boolean_arg(Arg::new(INIT_ONLY).long(INIT_ONLY).help(
            "kube-proxy's --init-only: nothing needs doing ahead of the agent (it mounts the \
             bpffs itself); exit",
        )))
        .next_help_heading(None)
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}
