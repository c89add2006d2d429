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
use std::sync::Arc;

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
    /// Present when a cluster uses Consul (or a `[consul]` section is given).
    pub consul: Option<ConsulSettings>,
    pub ha: HaSettings,
    pub forwarding: Arc<ForwardingSettings>,
    pub limits: Limits,
    /// The `[dns]` section, for host names in catalog files (`dns` clusters
    /// and static lists carry them in their queries).
    pub dns: DnsSettings,
}

/// The `[limits]` section, validated. Changes apply on reload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: u64,
    /// Idle time allowed between requests on a client keep-alive connection
    /// (HTTP/2: with no stream in progress, then a GOAWAY).
    pub keepalive_timeout: Duration,
    /// Time allowed for a whole request head, from its first byte (for a
    /// new connection, from accept; HTTP/2: its first request's HEADERS).
    pub header_timeout: Duration,
    /// Client connections served at once (None: half the open-file limit,
    /// see [`default_max_connections`]).
    pub max_connections: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
            max_body_bytes: 64 * 1024 * 1024,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: None,
        }
    }
}

/// `limits.max_connections` when not set: half this process's open-file
/// limit (soft `RLIMIT_NOFILE`), since each client connection may hold an
/// upstream one too; at least 64. With the shipped systemd unit
/// (`LimitNOFILE=65536`) that is 32768.
pub fn default_max_connections() -> usize {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0;
    let nofile = if ok && r.rlim_cur != libc::RLIM_INFINITY { r.rlim_cur as usize } else { 1024 };
    (nofile / 2).clamp(64, 1_000_000)
}

/// The `[forwarding]` section, validated. Changes apply on reload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ForwardingSettings {
    /// Peers whose forwarding headers are extended; everyone else's are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Send an RFC 7239 `Forwarded` header too.
    pub forwarded: bool,
}

impl ForwardingSettings {
    /// Whether a connection from `peer` may tell us about earlier hops.
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|n| n.contains(&peer))
    }
}

/// The `[dns]` section after validation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DnsSettings {
    pub nameservers: Vec<SocketAddr>,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub timeout: Duration,
}

impl DnsSettings {
    /// The A/AAAA query for `host` on `port` with these settings.
    pub fn query(&self, host: &str, port: u16) -> DnsQuery {
        DnsQuery {
            name: host.to_string(),
            port: Some(port),
            nameservers: self.nameservers.clone(),
            min_refresh: self.min_refresh,
            max_refresh: self.max_refresh,
            timeout: self.timeout,
        }
    }
}

/// The `[ha]` section: this node's part in a keepalived pair.
#[derive(Debug, Clone, PartialEq)]
pub struct HaSettings {
    /// None: readiness is still evaluated (`/readyz?vrrp`), nothing is written.
    pub track_file: Option<PathBuf>,
    pub interval: Duration,
    pub vips: Vec<std::net::IpAddr>,
    pub handoff_timeout: Duration,
    pub handoff_linger: Duration,
    /// None: a persisted table of any age counts.
    pub max_persisted_age: Option<Duration>,
}

impl Default for HaSettings {
    fn default() -> Self {
        HaSettings {
            track_file: None,
            interval: Duration::from_millis(100),
            vips: Vec::new(),
            handoff_timeout: Duration::from_secs(2),
            handoff_linger: Duration::from_secs(1),
            max_persisted_age: Some(Duration::from_secs(3600)),
        }
    }
}

impl HaSettings {
    /// Whether this node takes part in a pair (SIGTERM then hands off first).
    pub fn enabled(&self) -> bool {
        self.track_file.is_some() || !self.vips.is_empty()
    }
}

/// How to reach the Consul agent, after merging the config file with the
/// `CONSUL_*` environment conventions (the file wins).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsulSettings {
    /// Base URLs (`http://host:port` or `https://…`), tried in order.
    pub addresses: Vec<String>,
    /// The ACL token; never shown (`Debug` prints `Secret(***)`).
    pub token: Option<Secret>,
    /// Re-read on 403, since the token may have been rotated.
    pub token_file: Option<PathBuf>,
    pub datacenter: Option<String>,
    pub stale: bool,
    pub max_stale: Duration,
    pub wait: Duration,
    pub max_watches: usize,
    /// Spacing between the starts of two reads after a change (see `pace`).
    pub min_interval: Duration,
    /// Token-bucket interval (burst 2) for reads that changed nothing.
    pub noop_interval: Duration,
    pub state_file: Option<PathBuf>,
    pub stale_after: Duration,
    pub tls: ConsulTls,
    pub auto_routes: bool,
    pub register: Option<RegisterSettings>,
    /// The watched KV prefix (ends in `/`), when KV settings are on.
    pub kv_prefix: Option<String>,
}

/// How this instance registers itself in Consul.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterSettings {
    pub name: String,
    pub id: String,
    pub address: Option<String>,
    pub port: u16,
    pub tags: Vec<String>,
    pub ttl: Duration,
    pub deregister_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ConsulTls {
    pub ca_file: Option<PathBuf>,
    pub ca_path: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub verify: bool,
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
    pub express: bool,
    /// None: never park.
    pub park_idle_after: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// The bearer token `/status` and `POST /reload` require (None: open).
    pub token: Option<Secret>,
}

/// A secret that never shows in `Debug` output (logs, errors, panics).
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
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
    pub read_buffer: usize,
    pub tls: Option<ListenerTls>,
}

/// A TLS listener's certificates (the first is the default).
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    pub certificates: Vec<crate::tls::CertFiles>,
    pub refuse_without_sni: bool,
}

/// Default per-connection read buffer (Pingora's own default is 64 KiB, which
/// dominates memory per idle keep-alive connection).
pub const DEFAULT_READ_BUFFER: usize = 0;

/// Default `limits.keepalive_timeout`: Pingora's own, and what a browser
/// keeps an idle connection for at most (Chrome and Firefox: 300 s and
/// 115 s; most close sooner). A parked idle connection costs about 0.3 KB,
/// so holding one this long is cheap, and a client that comes back within
/// it saves a handshake.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default `limits.header_timeout`: a browser sends its head (a few KB) in
/// one or two packets, milliseconds after connecting, even on a poor mobile
/// link; 10 s (HAProxy's usual `timeout http-request`) leaves ample room for
/// that and holds a client that trickles its head (slowloris) for 10 s at
/// most, instead of nginx's 60 s.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default `server.park_idle_after`: long enough that a connection in
/// active use is never parked, short enough that idle ones soon are.
pub const DEFAULT_PARK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// A host pattern of a route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostPattern {
    /// `api.example.com` (lower-case, no port).
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`.
    Suffix(String),
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub name: String,
    /// Empty: any host.
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    pub cluster: String,
    /// Some: the route answers 503 (except to `allow`ed clients).
    pub maintenance: Option<Maintenance>,
    /// Some: on a cleartext listener the route redirects to HTTPS.
    pub https_redirect: Option<HttpsRedirect>,
}

/// Where and how a route sends cleartext requests to HTTPS.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpsRedirect {
    pub port: u16,
    pub status: u16,
}

/// A route in maintenance: what it answers instead of proxying.
#[derive(Debug, Clone, PartialEq)]
pub struct Maintenance {
    pub body: bytes::Bytes,
    pub retry_after_secs: u64,
    /// Client networks whose requests are still proxied.
    pub allow: Vec<ipnet::IpNet>,
}

pub const MAINTENANCE_BODY: &str = "this service is down for maintenance; please retry later\n";

impl Maintenance {
    /// Whether a request from `client` is answered with the maintenance page.
    pub fn applies_to(&self, client: Option<std::net::IpAddr>) -> bool {
        !client.is_some_and(|ip| {
            let ip = match ip {
                std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
                v4 => v4,
            };
            self.allow.iter().any(|n| n.contains(&ip))
        })
    }
}

/// An operator's override for one instance of a cluster.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InstanceOverride {
    pub weight: Option<u32>,
    /// Weight 0: no new requests, in-flight ones finish.
    pub drain: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DiscoverySpec {
    Static(Vec<SocketAddr>),
    File { catalog: PathBuf, service: String },
    Consul(ConsulQuery),
    Dns(DnsQuery),
    /// A `static` list naming some backends by host name: the addresses
    /// given as IPs, plus what each name's A/AAAA records resolve to (one
    /// DNS source per name, with the `[dns]` settings).
    StaticNames { addrs: Vec<SocketAddr>, names: Vec<DnsQuery> },
}

/// One DNS source: a name, how to ask for it and how often.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsQuery {
    /// As written (a name without a final dot goes through the search list).
    pub name: String,
    /// Some: A/AAAA records with this port; None: SRV records.
    pub port: Option<u16>,
    /// Empty: the system's resolver configuration.
    pub nameservers: Vec<SocketAddr>,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub timeout: Duration,
}

pub const DNS_MIN_REFRESH: Duration = Duration::from_secs(1);
pub const DNS_MAX_REFRESH: Duration = Duration::from_secs(30);
pub const DNS_TIMEOUT: Duration = Duration::from_secs(2);

impl DnsQuery {
    /// Name of this query's source, as in `/status` and metrics:
    /// `dns:NAME` (SRV) or `dns:NAME:PORT` (A/AAAA).
    pub fn source_name(&self) -> String {
        match self.port {
            None => format!("dns:{}", self.name),
            Some(p) => format!("dns:{}:{p}", self.name),
        }
    }
}

/// One Consul health watch: what to ask for and how to turn the answer into backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct ConsulQuery {
    pub service: String,
    pub tags: Vec<String>,
    pub allow_warning: bool,
    pub filter: Option<String>,
    /// Panic threshold in per-mille (500 = 50 %), kept integral so the query hashes.
    pub panic_permille: u32,
}

impl ConsulQuery {
    /// Name of this query's source, as in `/status` and metrics.
    pub fn source_name(&self) -> String {
        format!("consul:{}", self.label())
    }

    /// Short stable name: `web`, `web[tag=prod,tag=v2]`, `web[filter=…]`.
    pub fn label(&self) -> String {
        let mut extra: Vec<String> = self.tags.iter().map(|t| format!("tag={t}")).collect();
        if let Some(f) = &self.filter {
            extra.push(format!("filter={f}"));
        }
        if self.allow_warning {
            extra.push("warning".into());
        }
        if extra.is_empty() {
            self.service.clone()
        } else {
            format!("{}[{}]", self.service, extra.join(","))
        }
    }
}

/// Name of a file catalog source, as in `/status` and metrics.
pub fn file_source_name(catalog: &std::path::Path) -> String {
    format!("file:{}", catalog.display())
}

impl DiscoverySpec {
    /// Name of the discovery source feeding this cluster, as in `/status` and metrics.
    pub fn source_name(&self) -> Option<String> {
        match self {
            DiscoverySpec::Static(_) | DiscoverySpec::StaticNames { .. } => None,
            DiscoverySpec::File { catalog, .. } => Some(file_source_name(catalog)),
            DiscoverySpec::Consul(q) => Some(q.source_name()),
            DiscoverySpec::Dns(q) => Some(q.source_name()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DiscoverySpec::Static(_) | DiscoverySpec::StaticNames { .. } => "static",
            DiscoverySpec::File { .. } => "file",
            DiscoverySpec::Consul(_) => "consul",
            DiscoverySpec::Dns(_) => "dns",
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
    /// Longest silence from the backend on an upgraded connection
    /// (WebSocket), instead of `read_timeout`.
    pub tunnel_timeout: Duration,
    pub retries: u32,
    /// Keyed by Consul service ID or `ip:port`.
    pub instances: BTreeMap<String, InstanceOverride>,
    /// Some: the backends are reached over TLS.
    pub tls: Option<BackendTls>,
    /// None: no passive ejection.
    pub outlier: Option<Outlier>,
    /// None: no active health checks.
    pub health_check: Option<HealthCheck>,
    /// None: a joining backend takes its full share at once.
    pub slow_start: Option<SlowStart>,
}

/// Active HTTP health checks of one cluster's backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// Path and query sent in the GET.
    pub path: String,
    /// Host header (None: the backend's `ip:port`).
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Inclusive ranges of statuses that pass.
    pub expect: Vec<(u16, u16)>,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    pub fn passes(&self, status: u16) -> bool {
        self.expect.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

/// How a backend's share ramps up after it joins or comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowStart {
    pub window: Duration,
    pub curve: SlowStartCurve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowStartCurve {
    /// Share = elapsed / window.
    Linear,
    /// Share = sqrt(elapsed / window).
    Aggressive,
}

impl SlowStart {
    /// The share (parts per 65536) a backend `elapsed_ms` into its ramp
    /// gets; at least 1/16 so a ramping backend is never starved.
    pub fn share(&self, elapsed_ms: u64) -> u64 {
        let window = (self.window.as_millis() as u64).max(1);
        if elapsed_ms >= window {
            return 65536;
        }
        let linear = (elapsed_ms << 16) / window;
        let share = match self.curve {
            SlowStartCurve::Linear => linear,
            SlowStartCurve::Aggressive => ((linear << 16) as f64).sqrt() as u64,
        };
        share.clamp(4096, 65536)
    }
}

/// Passive outlier ejection of one cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
    /// A 5xx answer counts as a failure (default: only connect errors,
    /// timeouts and TLS failures do).
    pub count_5xx: bool,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
            count_5xx: false,
        }
    }
}

/// Default `idle_timeout` of a pooled upstream connection: below gunicorn's
/// default keep-alive (2 s), so a connection taken from the pool is never
/// one the backend is closing at that moment.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Default `tunnel_timeout`: an idle WebSocket (a chat room nobody
/// speaks in) stays open this long.
pub const TUNNEL_TIMEOUT: Duration = Duration::from_secs(3600);

/// `clusters.NAME.tls`, validated, with its files loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendTls {
    /// SNI and verified name; empty only with `verify = false`.
    pub server_name: String,
    pub verify: bool,
    /// None: the system's roots.
    pub ca: Option<PathBuf>,
    pub client: Option<crate::tls::CertFiles>,
    /// What the files held when the config was read (compared by content,
    /// so a reload with a changed CA file rebuilds the cluster).
    pub material: Arc<crate::tls::BackendTlsMaterial>,
}

impl Config {
    /// The Consul queries of every Consul cluster.
    pub fn consul_queries(&self) -> std::collections::BTreeSet<ConsulQuery> {
        self.clusters
            .values()
            .filter_map(|c| match &c.discovery {
                DiscoverySpec::Consul(q) => Some(q.clone()),
                _ => None,
            })
            .collect()
    }

    /// The catalog files of every file cluster.
    pub fn catalog_paths(&self) -> std::collections::BTreeSet<PathBuf> {
        self.clusters
            .values()
            .filter_map(|c| match &c.discovery {
                DiscoverySpec::File { catalog, .. } => Some(catalog.clone()),
                _ => None,
            })
            .collect()
    }

    /// The DNS queries of every DNS cluster.
    pub fn dns_queries(&self) -> std::collections::BTreeSet<DnsQuery> {
        self.clusters
            .values()
            .map(|c| match &c.discovery {
                DiscoverySpec::Dns(q) => vec![q.clone()],
                DiscoverySpec::StaticNames { names, .. } => names.clone(),
                _ => Vec::new(),
            })
            .flatten()
            .collect()
    }

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
                DiscoverySpec::StaticNames { addrs, names } => {
                    let names: Vec<String> = names.iter().map(|q| format!("{}:{}", q.name, q.port.unwrap_or(0))).collect();
                    format!("static, {} backends by address, resolved: {}", addrs.len(), names.join(", "))
                }
                DiscoverySpec::File { catalog, service } => {
                    format!("file {} service {}", catalog.display(), service)
                }
                DiscoverySpec::Consul(q) => format!("consul service {}", q.service),
                DiscoverySpec::Dns(q) => match q.port {
                    None => format!("dns SRV {}", q.name),
                    Some(p) => format!("dns A/AAAA {} port {p}", q.name),
                },
            };
            let mut extra = String::new();
            if let Some(h) = &c.health_check {
                extra.push_str(&format!("; health check GET {} every {:?}", h.path, h.interval));
            }
            if let Some(ss) = &c.slow_start {
                extra.push_str(&format!("; slow start {:?} {}", ss.window, if ss.curve == SlowStartCurve::Linear { "linear" } else { "aggressive" }));
            }
            out.push_str(&format!(
                "  {}: {}; {}; connect {:?}, read {:?}, retries {}{extra}\n",
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
        if let Some(c) = &self.consul {
            out.push_str(&format!(
                "consul: {} (token: {}, stale reads: {}, wait {:?}, max watches {})\n",
                c.addresses.join(", "),
                if c.token.is_some() || c.token_file.is_some() { "set" } else { "none" },
                c.stale,
                c.wait,
                c.max_watches
            ));
        }
        out.push_str(&format!(
            "drain timeout: {:?}, threads: {}\n",
            self.server.drain_timeout, self.server.threads
        ));
        out
    }
}
