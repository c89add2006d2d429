//! The public schema of the TOML config file, exactly as written by operators.
//!
//! Every struct denies unknown fields so a typo is an error, not a silently
//! ignored setting. Leaf values that need checking (addresses, durations) stay
//! strings here; `validate` turns them into typed values and reports the field
//! path and the bad value. `Config` (the validated model) is never deserialised.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Worker threads of the proxy runtime.
    pub threads: Option<usize>,
    /// One multi-thread runtime (true) or one single-thread runtime per thread (false).
    pub work_stealing: Option<bool>,
    /// On SIGTERM, how long in-flight requests may take to finish.
    pub drain_timeout: Option<String>,
    /// After the drain, how long runtimes get to stop.
    pub shutdown_timeout: Option<String>,
    pub pid_file: Option<String>,
    pub upgrade_sock: Option<String>,
    /// Idle upstream connections kept for reuse (all backends together).
    pub upstream_keepalive_pool: Option<usize>,
    /// Serve plain bodiless HTTP/1.1 requests on the express path.
    pub express: Option<bool>,
    /// Idle time after which a client connection is parked (held as a bare
    /// socket, no task), or `off`.
    pub park_idle_after: Option<String>,
}

/// Running as one node of a keepalived pair.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// keepalived `track_file` that Switchyard writes its VRRP readiness into
    /// (`0` ready, `1` not ready).
    pub track_file: Option<String>,
    /// How often readiness is evaluated (and the file rewritten on a change).
    pub interval: Option<String>,
    /// The floating addresses this node may hold; on SIGTERM it waits until
    /// none of them is local any more before it stops accepting.
    #[serde(default)]
    pub vips: Vec<String>,
    /// On SIGTERM, the longest wait for the peer to take the VIPs over (with
    /// `vips`), or the whole wait (without).
    pub handoff_timeout: Option<String>,
    /// After the VIPs left, how long to keep accepting before the drain, for
    /// packets still sent here by clients that have not heard the peer's ARP.
    pub handoff_linger: Option<String>,
    /// A routing table loaded from the Consul state file and older than this
    /// does not count as servable for VRRP, or `off`.
    pub max_persisted_age: Option<String>,
}

/// The `[limits]` section: the largest request this proxy accepts.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Request line and headers together, in bytes (431 above).
    pub max_header_bytes: Option<u64>,
    /// Header fields (431 above).
    pub max_headers: Option<u64>,
    /// Request target (path and query), in bytes (414 above).
    pub max_uri_bytes: Option<u64>,
    /// A request body, declared or counted as it streams, in bytes (413 above).
    pub max_body_bytes: Option<u64>,
    /// Idle time between requests on a client keep-alive connection.
    pub keepalive_timeout: Option<String>,
    /// Time for a whole request head (408 after).
    pub header_timeout: Option<String>,
    /// Client connections served at once (503 to the next).
    pub max_connections: Option<u64>,
}

/// The `[forwarding]` section: which peers' forwarding headers are believed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingSection {
    /// Networks (CIDR or address) of proxies in front of this one whose
    /// `X-Forwarded-*` and `Forwarded` headers are kept and extended.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Also send an RFC 7239 `Forwarded` header.
    pub forwarded: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Option<String>,
    /// A file holding the bearer token `/status` and `POST /reload` require.
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSection {
    pub enabled: Option<bool>,
    /// `json` (default) or `text`.
    pub format: Option<String>,
    /// `-` for stdout (default), or a file path.
    pub path: Option<String>,
    /// Rotate the file when it grows past this many bytes (`0` = never).
    pub max_bytes: Option<u64>,
    /// Rotated files kept (`path.1` … `path.N`).
    pub keep: Option<u32>,
    /// Lines queued for the writer before new lines are dropped (and counted).
    pub buffer_lines: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub address: String,
    /// Accept HTTP/2 over cleartext (prior knowledge) next to HTTP/1.1. Default true.
    pub h2c: Option<bool>,
    /// Bytes of read buffer kept per client connection (0: read straight
    /// from the socket into the request parser's own buffer).
    pub read_buffer: Option<usize>,
    /// Terminate TLS on this listener.
    pub tls: Option<TlsSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain (leaf first) of the default certificate.
    pub cert: String,
    /// Its PEM private key.
    pub key: String,
    /// More certificates, chosen by SNI from their DNS names.
    #[serde(default)]
    pub certificates: Vec<TlsPairSection>,
    /// `default` (serve the first certificate) or `refuse` (fail the
    /// handshake) for a client without SNI or with a name no certificate has.
    pub without_sni: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPairSection {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: Option<String>,
    /// Host names; `*.example.com` matches any subdomain. Empty or absent: any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path prefix, matched on segment boundaries. Default `/`.
    pub path_prefix: Option<String>,
    pub cluster: String,
    /// Answer every request with 503 + `Retry-After` instead of proxying it.
    pub maintenance: Option<MaintenanceSection>,
    /// On a cleartext listener, redirect to the same URL over HTTPS.
    pub https_redirect: Option<HttpsRedirectSection>,
}

/// `https_redirect = true`, or a table with its settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum HttpsRedirectSection {
    On(bool),
    With(HttpsRedirectTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsRedirectTable {
    /// The HTTPS port in the `Location` (default 443, then left out).
    pub port: Option<u16>,
    /// 301, 302, 307 or 308 (default).
    pub status: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceSection {
    /// Default true: the section's presence turns maintenance on.
    pub enabled: Option<bool>,
    /// Response body (plain text). Default: a one-line notice.
    pub body: Option<String>,
    /// `Retry-After` in whole seconds, as a duration (default `"60s"`).
    pub retry_after: Option<String>,
    /// Client networks (CIDR, or a bare address) whose requests still pass.
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSection {
    /// Replace the discovered weight (0 – the catalog maximum).
    pub weight: Option<u32>,
    /// No new requests; those in flight finish.
    pub drain: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDiscoverySection {
    /// Path of the JSON catalog (service name → instances).
    pub catalog: String,
    /// Service name in the catalog; defaults to the cluster name.
    pub service: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulDiscoverySection {
    /// Consul service name; defaults to the cluster name.
    pub service: Option<String>,
    /// Only instances carrying all of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Admit instances whose checks are `warning` too (weighted by `Weights.Warning`).
    pub allow_warning: Option<bool>,
    /// A Consul filter expression, passed through to the agent.
    pub filter: Option<String>,
    /// Share of healthy instances below which all registered instances are used.
    pub panic_threshold: Option<f64>,
}

/// A cluster's `dns = { ... }`: backends from DNS (src/discovery/dns.rs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsDiscoverySection {
    /// An SRV name (`_http._tcp.web.example.`), or with `port` an A/AAAA name.
    pub name: String,
    /// Port for the addresses of an A/AAAA name; absent: `name` is an SRV name.
    pub port: Option<u16>,
    /// These override the `[dns]` section's values for this cluster.
    pub nameservers: Option<Vec<String>>,
    pub min_refresh: Option<String>,
    pub max_refresh: Option<String>,
    pub timeout: Option<String>,
}

/// `[dns]`: defaults for every DNS source.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSection {
    /// `IP` or `IP:PORT` each (UDP, TCP when an answer is truncated); absent:
    /// the system's `/etc/resolv.conf`.
    pub nameservers: Option<Vec<String>>,
    /// Bounds on the refresh interval the answers' TTL asks for.
    pub min_refresh: Option<String>,
    pub max_refresh: Option<String>,
    /// Bound on one whole refresh (the query, a TCP retry, target lookups).
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulTlsSection {
    pub ca_file: Option<String>,
    pub ca_path: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub server_name: Option<String>,
    pub verify: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulSection {
    /// Agent addresses, tried in order: `host:port`, `http://host:port`, `https://host:port`.
    pub addresses: Option<Vec<String>>,
    pub token: Option<String>,
    pub token_file: Option<String>,
    pub datacenter: Option<String>,
    /// Read with `?stale` (default true).
    pub stale: Option<bool>,
    /// Re-read without `stale` when the answering server lags the leader by more.
    pub max_stale: Option<String>,
    /// Blocking query wait (default 5m, at most 10m).
    pub wait: Option<String>,
    /// Upper bound on concurrent blocking health watches.
    pub max_watches: Option<usize>,
    /// Minimum spacing between the starts of two reads of one watch after a
    /// read that returned a change early (default 50ms).
    pub min_interval: Option<String>,
    /// Pacing of reads that changed nothing (index moved, same set): a token
    /// bucket with a burst of 2, one token per `noop_interval` (default 1s).
    pub noop_interval: Option<String>,
    /// Where the last good catalog is kept for restarts during an outage.
    pub state_file: Option<String>,
    /// Staleness (since the last successful sync) that `/readyz` and `/status` flag.
    pub stale_after: Option<String>,
    pub tls: Option<ConsulTlsSection>,
    /// Build routes from `switchyard.*` tags on Consul services (default true).
    pub auto_routes: Option<bool>,
    /// Take routes, clusters and operator settings from Consul KV (default false).
    pub kv: Option<bool>,
    /// The KV prefix watched when `kv` is on (default `switchyard/`).
    pub kv_prefix: Option<String>,
    pub register: Option<RegisterSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterSection {
    /// Register this instance in Consul (default true).
    pub enabled: Option<bool>,
    pub name: Option<String>,
    pub id: Option<String>,
    /// Address to advertise; default: the agent's node address.
    pub address: Option<String>,
    /// Port to advertise; default: the first listener's.
    pub port: Option<u16>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub ttl: Option<String>,
    pub deregister_after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Fixed backend list, `ip:port` each.
    #[serde(rename = "static")]
    pub static_: Option<Vec<String>>,
    /// Backends from a watched JSON catalog file.
    pub file: Option<FileDiscoverySection>,
    /// Backends from Consul's health endpoint.
    pub consul: Option<ConsulDiscoverySection>,
    /// Backends from DNS: SRV records, or A/AAAA records with a fixed port.
    pub dns: Option<DnsDiscoverySection>,
    /// `round_robin` (default), `weighted`, `least_connections`, `consistent_hash`.
    pub selection: Option<String>,
    /// For `consistent_hash`: request header whose value is the key.
    pub hash_header: Option<String>,
    /// For `consistent_hash`: cookie whose value is the key.
    pub hash_cookie: Option<String>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub write_timeout: Option<String>,
    /// How long an idle upstream connection stays in the keep-alive pool.
    pub idle_timeout: Option<String>,
    /// How long an upgraded connection (WebSocket) may stay silent.
    pub tunnel_timeout: Option<String>,
    /// Further attempts, each on a different backend, after a failed one.
    pub retries: Option<u32>,
    /// Per-instance overrides, keyed by Consul service ID or `ip:port`.
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceSection>,
    /// Connect to the backends over TLS.
    pub tls: Option<BackendTlsSection>,
    /// Passive outlier ejection: `false`, or its settings.
    pub outlier: Option<OutlierSection>,
    /// Active health checks (HTTP) of every backend; off when absent.
    pub health_check: Option<HealthCheckSection>,
    /// Ramp a joining or returning backend's share over this window:
    /// `"30s"`, or `{ window = "30s", curve = "linear" | "aggressive" }`.
    pub slow_start: Option<SlowStartSection>,
}

/// `clusters.NAME.health_check`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    /// Path (and query) to GET; default "/".
    pub path: Option<String>,
    /// Host header; default: the backend's address.
    pub host: Option<String>,
    /// Time between checks of one backend (default 5s).
    pub interval: Option<String>,
    /// A check not answered within this fails (default 2s).
    pub timeout: Option<String>,
    /// Statuses that pass: `"200"` or ranges `"200-399"` (default 200-399).
    pub expect: Option<Vec<String>>,
    /// Passed checks in a row that bring a failing backend back (default 2).
    pub healthy_threshold: Option<u32>,
    /// Failed checks in a row that take a passing backend out (default 3).
    pub unhealthy_threshold: Option<u32>,
}

/// `slow_start = "30s"` or a table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SlowStartSection {
    Window(String),
    With(SlowStartTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowStartTable {
    pub window: Option<String>,
    /// `linear` (default): share grows in proportion to time; `aggressive`:
    /// as the square root of it (half the share after a quarter of the window).
    pub curve: Option<String>,
}

/// `outlier = false`, or a table with its settings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OutlierSection {
    On(bool),
    With(OutlierTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierTable {
    /// Failed attempts in a row (connect error, timeout, TLS failure) that eject.
    pub consecutive_failures: Option<u32>,
    /// First ejection's length; the n-th in a row lasts n times as long.
    pub base_ejection: Option<String>,
    /// Longest ejection.
    pub max_ejection: Option<String>,
    /// At most this share of the cluster's backends is ejected at once.
    pub max_ejected_percent: Option<u32>,
    /// A 5xx answer from the backend counts as a failed attempt too.
    pub count_5xx: Option<bool>,
}

/// `clusters.NAME.tls`: TLS from Switchyard to the cluster's backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTlsSection {
    /// SNI, and the name the backend's certificate must carry.
    pub server_name: Option<String>,
    /// PEM file of the CAs to trust (default: the system's roots).
    pub ca: Option<String>,
    /// Verify the backend's certificate (default true).
    pub verify: Option<bool>,
    /// A client certificate chain (PEM) to present, with `client_key`.
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

/// Top-level sections, deserialised one by one so that an error in one does
/// not hide errors in the others.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "server",
    "admin",
    "access_log",
    "listeners",
    "routes",
    "clusters",
    "consul",
    "ha",
    "forwarding",
    "limits",
    "dns",
];

/// Named clusters, in name order.
pub type ClustersSection = BTreeMap<String, ClusterSection>;
