//! The validated configuration model.
//!
//! `file` holds the serde schema operators write; `validate` turns it into the
//! typed [`Config`] below, collecting every error with its field path. Nothing
//! else in the crate reads the file structs.

pub mod file;
pub mod validate;

pub use validate::{load, parse};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where the shipped example config lives; `run` and `check` default to it.
pub const DEFAULT_CONFIG_PATH: &str = "config/switchyard.toml";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub access_log: AccessLogSettings,
    pub listeners: Vec<Listener>,
    pub routes: Vec<RouteSpec>,
    pub clusters: BTreeMap<String, ClusterSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub threads: usize,
    pub work_stealing: bool,
    pub drain_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub upstream_keepalive_pool: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LogTarget {
    Stdout,
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: u32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogSettings {
    pub enabled: bool,
    pub format: LogFormat,
    pub target: LogTarget,
    pub buffer_lines: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub address: SocketAddr,
    pub h2c: bool,
}

/// A host pattern of a route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostPattern {
    /// `api.example.com` (lower-case, no port).
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub name: String,
    /// Empty: any host.
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiscoverySpec {
    Static(Vec<SocketAddr>),
    File { catalog: PathBuf, service: String },
}

impl DiscoverySpec {
    pub fn kind(&self) -> &'static str {
        match self {
            DiscoverySpec::Static(_) => "static",
            DiscoverySpec::File { .. } => "file",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    RoundRobin,
    Weighted,
    LeastConnections,
    ConsistentHash(HashKey),
}

impl Selection {
    pub fn name(&self) -> &'static str {
        match self {
            Selection::RoundRobin => "round_robin",
            Selection::Weighted => "weighted",
            Selection::LeastConnections => "least_connections",
            Selection::ConsistentHash(_) => "consistent_hash",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    pub name: String,
    pub discovery: DiscoverySpec,
    pub selection: Selection,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub retries: u32,
}

impl Config {
    /// A few lines describing the effective config, printed by `check`.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| format!("{}{}", l.address, if l.h2c { " (h1+h2c)" } else { " (h1)" }))
            .collect();
        out.push_str(&format!("listeners: {}\n", listeners.join(", ")));
        out.push_str(&format!("admin: {}\n", self.admin.listen));
        out.push_str(&format!("routes: {}\n", self.routes.len()));
        for r in &self.routes {
            let hosts = if r.hosts.is_empty() {
                "*".to_string()
            } else {
                r.hosts
                    .iter()
                    .map(|h| match h {
                        HostPattern::Exact(h) => h.clone(),
                        HostPattern::Suffix(s) => format!("*{s}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            out.push_str(&format!(
                "  {}: host {} path {} -> {}\n",
                r.name, hosts, r.path_prefix, r.cluster
            ));
        }
        out.push_str(&format!("clusters: {}\n", self.clusters.len()));
        for c in self.clusters.values() {
            let source = match &c.discovery {
                DiscoverySpec::Static(a) => format!("static, {} backends", a.len()),
                DiscoverySpec::File { catalog, service } => {
                    format!("file {} service {}", catalog.display(), service)
                }
            };
            out.push_str(&format!(
                "  {}: {}; {}; connect {:?}, read {:?}, retries {}\n",
                c.name,
                source,
                c.selection.name(),
                c.connect_timeout,
                c.read_timeout,
                c.retries
            ));
        }
        let log = if !self.access_log.enabled {
            "off".to_string()
        } else {
            match &self.access_log.target {
                LogTarget::Stdout => "stdout".to_string(),
                LogTarget::File { path, .. } => path.display().to_string(),
            }
        };
        out.push_str(&format!("access log: {log}\n"));
        out.push_str(&format!(
            "drain timeout: {:?}, threads: {}\n",
            self.server.drain_timeout, self.server.threads
        ));
        out
    }
}
