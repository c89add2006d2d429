//! The routing snapshot: everything a request needs, immutable once built.
//!
//! [`RoutingTable::build`] is a pure function of the config, the discovered
//! backend sets and the registry of per-backend state: no I/O, no async, the
//! same inputs give the same table. State that must outlive one table — a
//! backend's in-flight count, a cluster's round-robin cursor — is taken from
//! the [`StateRegistry`] by identity, so a swap does not reset it.

pub mod matcher;
pub mod request;
pub mod select;

use crate::config::{ClusterSpec, Config, DiscoverySpec};
use crate::discovery::{Discovered, Endpoint, EndpointSet};
use crate::metrics::{BackendMetrics, Metrics, RouteMetrics};
use pingora::upstreams::peer::HttpPeer;
use prometheus::Histogram;
use select::Selector;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

pub use matcher::Router;
pub use request::RequestView;

/// Per-backend state that survives table swaps.
#[derive(Default)]
pub struct BackendState {
    /// Requests currently assigned to this backend (least-connections reads it).
    pub in_flight: AtomicU64,
    pub metrics: Option<BackendMetrics>,
    /// When a TLS failure to this backend was last logged (ms on the
    /// process clock), so a bad certificate is logged every 10 s, not per request.
    pub tls_warned_ms: AtomicU64,
    /// Failed attempts in a row (connect error, timeout, TLS failure).
    pub failures: std::sync::atomic::AtomicU32,
    /// Ejections in a row (reset by a success): the next lasts one more base.
    pub ejections: std::sync::atomic::AtomicU32,
    /// Until when (ms on [`process_millis`]) the backend is ejected; 0: not.
    pub ejected_until_ms: AtomicU64,
    /// When the backend joined a cluster that already had backends (ms on
    /// [`process_millis`]): a slow start ramps from here. 0: it was there
    /// from the cluster's first set, and takes its full share at once.
    pub joined_ms: AtomicU64,
}

/// Milliseconds since this process first asked, plus one, so 0 can mean
/// "never" (a clock for ejections and rate-limited warnings).
pub fn process_millis() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1
}

impl BackendState {
    /// Ejected at `now` (ms on [`process_millis`]).
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }
}

/// Per-cluster state that survives table swaps.
#[derive(Default)]
pub struct ClusterState {
    pub cursor: AtomicUsize,
    /// The latest end of an ejection among the cluster's backends (ms on
    /// [`process_millis`]); 0 once all have ended, so selection reads no
    /// clock while nothing is ejected.
    pub ejected_until_ms: AtomicU64,
    /// The latest end of a backend's slow start (ms on [`process_millis`]);
    /// 0 once all have ended, so selection reads no clock while none ramps.
    pub ramp_until_ms: AtomicU64,
}

/// Holds the surviving state, keyed by identity. Owned by reconcile.
pub struct StateRegistry {
    metrics: Arc<Metrics>,
    backends: Mutex<HashMap<(String, SocketAddr), Arc<BackendState>>>,
    clusters: Mutex<HashMap<String, Arc<ClusterState>>>,
}

impl StateRegistry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        StateRegistry {
            metrics,
            backends: Mutex::new(HashMap::new()),
            clusters: Mutex::new(HashMap::new()),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A backend's state; a new one records `joined_ms` (0: not joining).
    fn backend(&self, cluster: &str, addr: SocketAddr, joined_ms: u64) -> Arc<BackendState> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((cluster.to_string(), addr))
            .or_insert_with(|| {
                Arc::new(BackendState {
                    in_flight: AtomicU64::new(0),
                    metrics: Some(self.metrics.backend_handles(cluster, &addr.to_string())),
                    tls_warned_ms: AtomicU64::new(0),
                    failures: Default::default(),
                    ejections: Default::default(),
                    ejected_until_ms: AtomicU64::new(0),
                    joined_ms: AtomicU64::new(joined_ms),
                })
            })
            .clone()
    }

    fn cluster(&self, name: &str) -> Arc<ClusterState> {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// Forget state (and metric series) of backends and clusters that `prev`
    /// had and `table` no longer has, looking only at clusters that changed.
    pub fn retain_changed(&self, prev: &RoutingTable, table: &RoutingTable) {
        let mut gone: Vec<(String, SocketAddr)> = Vec::new();
        for old in &prev.clusters {
            let new = table.cluster(&old.name);
            if new.is_some_and(|n| Arc::ptr_eq(n, old)) {
                continue;
            }
            for b in &old.backends {
                let kept = new.is_some_and(|n| n.backends.binary_search_by(|x| x.addr.cmp(&b.addr)).is_ok());
                if !kept {
                    gone.push((old.name.to_string(), b.addr));
                }
            }
            if new.is_none() {
                self.clusters.lock().unwrap_or_else(|e| e.into_inner()).remove(&*old.name);
            }
        }
        if gone.is_empty() {
            return;
        }
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        for key in gone {
            self.metrics.forget_backend(&key.0, &key.1.to_string());
            map.remove(&key);
        }
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub endpoint: Endpoint,
    /// Built once per table; cloned per request.
    pub peer: HttpPeer,
    /// `peer.reuse_hash()`, computed once: which pooled connections can
    /// serve this backend.
    pub reuse_hash: u64,
    pub state: Arc<BackendState>,
    /// What the cluster's active health checks say (Unchecked without them).
    pub health: BackendHealth,
    /// Where this backend's slow start began (ms on [`process_millis`]):
    /// when it joined, or when its health checks passed again; 0: none.
    /// The end of an ejection also starts one (read from `state`).
    pub ramp_from_ms: u64,
}

/// A backend's standing with the cluster's active health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendHealth {
    /// The cluster has no active checks.
    Unchecked,
    /// Checked, no verdict yet.
    Pending,
    Passing,
    Failing,
}

impl BackendHealth {
    /// As `/status` shows it (None: the cluster has no active checks).
    pub fn name(self) -> Option<&'static str> {
        match self {
            BackendHealth::Unchecked => None,
            BackendHealth::Pending => Some("pending"),
            BackendHealth::Passing => Some("passing"),
            BackendHealth::Failing => Some("failing"),
        }
    }
}

fn sha256_hex(v: &serde_json::Value, take: usize) -> String {
    use sha2::{Digest, Sha256};
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    Sha256::digest(&bytes).iter().take(take).map(|b| format!("{b:02x}")).collect()
}

/// One cluster's part of the digest: the SHA-256 (hex) of its normalised
/// compact JSON. A cluster is immutable, so a table reuses it with the
/// cluster: a rebuild hashes only the clusters that changed.
pub fn cluster_digest(normalised_cluster: &serde_json::Value) -> String {
    sha256_hex(normalised_cluster, 32)
}

/// The digest of a normalised table: the first 16 hex digits of the SHA-256
/// of the compact JSON (keys sorted, as serde_json's map keeps them) of its
/// routes and, in place of each cluster, that cluster's [`cluster_digest`].
pub fn digest(normalised: &serde_json::Value) -> String {
    let clusters: Vec<String> = normalised["clusters"]
        .as_array()
        .map(|a| a.iter().map(cluster_digest).collect())
        .unwrap_or_default();
    digest_of(&normalised["routes"], clusters)
}

fn digest_of(routes: &serde_json::Value, cluster_digests: Vec<String>) -> String {
    sha256_hex(&serde_json::json!({ "routes": routes, "clusters": cluster_digests }), 8)
}

impl Backend {
    /// `active` (takes new requests), `drained` (weight 0) or `unhealthy`
    /// (failing or awaiting its first active health check).
    pub fn state_name(&self) -> &'static str {
        if self.weight == 0 {
            "drained"
        } else if matches!(self.health, BackendHealth::Pending | BackendHealth::Failing) {
            "unhealthy"
        } else {
            "active"
        }
    }

    /// Where a slow start that is still running at `now` began, if one is.
    pub fn ramp_start(&self, now: u64, window_ms: u64) -> Option<u64> {
        let from = self.ramp_from_ms.max(self.state.ejected_until_ms.load(Ordering::Relaxed));
        (from != 0 && from <= now && now < from + window_ms).then_some(from)
    }

    #[cfg(test)]
    pub fn for_test(addr: SocketAddr, weight: u32) -> Backend {
        let peer = HttpPeer::new(addr, false, String::new());
        Backend {
            addr,
            weight,
            endpoint: Endpoint { weight, ..Endpoint::new(addr) },
            reuse_hash: pingora::upstreams::peer::Peer::reuse_hash(&peer),
            peer,
            state: Arc::new(BackendState::default()),
            health: BackendHealth::Unchecked,
            ramp_from_ms: 0,
        }
    }
}

pub struct Cluster {
    pub name: Arc<str>,
    pub spec: ClusterSpec,
    /// All known backends, sorted by address (drained ones included).
    pub backends: Vec<Backend>,
    /// Indices of backends that take new requests (weight > 0).
    pub active: Vec<u32>,
    pub selector: Selector,
    pub state: Arc<ClusterState>,
    /// False until discovery has produced a first set for this cluster.
    pub discovered: bool,
    /// The set this cluster was built from (to recognise it unchanged).
    pub source: Option<EndpointSet>,
    pub duration: Histogram,
    /// [`cluster_digest`] of this cluster, computed once.
    pub digest: String,
    /// The active health verdicts it was built with (None: unchecked).
    pub health: Option<Arc<crate::health::ClusterHealth>>,
    /// No backend passes its active health check: all are served anyway.
    pub health_failopen: bool,
}

/// Whether a cluster was built from exactly this backend set.
fn same_set(c: &Cluster, set: Option<&EndpointSet>) -> bool {
    match (&c.source, set) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

impl Cluster {
    /// `joining`: new backends join a cluster that already serves (a slow
    /// start, if set, ramps them). `health`: the active checks' verdicts.
    fn new(
        name: &str,
        spec: &ClusterSpec,
        set: Option<EndpointSet>,
        states: &StateRegistry,
        joining: bool,
        health: Option<Arc<crate::health::ClusterHealth>>,
    ) -> Cluster {
        let health = health.or_else(|| spec.health_check.as_ref().map(|_| Arc::default()));
        let joined = if joining && spec.slow_start.is_some() { process_millis() } else { 0 };
        let mut backends: Vec<Backend> = set
            .iter()
            .flat_map(|s| s.iter())
            .map(|ep| {
                let peer = make_peer(ep.addr, spec);
                let verdict = health.as_ref().map(|h| h.get(&ep.addr));
                let state = states.backend(name, ep.addr, joined);
                let recovered = verdict.flatten().filter(|v| v.recovered).map_or(0, |v| v.since_ms);
                Backend {
                    addr: ep.addr,
                    weight: ep.weight,
                    reuse_hash: pingora::upstreams::peer::Peer::reuse_hash(&peer),
                    peer,
                    ramp_from_ms: state.joined_ms.load(Ordering::Relaxed).max(recovered),
                    state,
                    endpoint: ep.clone(),
                    health: match verdict {
                        None => BackendHealth::Unchecked,
                        Some(None) => BackendHealth::Pending,
                        Some(Some(v)) if v.passing => BackendHealth::Passing,
                        Some(Some(_)) => BackendHealth::Failing,
                    },
                }
            })
            .collect();
        backends.sort_by(|a, b| a.addr.cmp(&b.addr));
        backends.dedup_by(|a, b| a.addr == b.addr);
        let serving = |b: &Backend| b.weight > 0 && matches!(b.health, BackendHealth::Unchecked | BackendHealth::Passing);
        let mut active: Vec<u32> = backends.iter().enumerate().filter(|(_, b)| serving(b)).map(|(i, _)| i as u32).collect();
        // Fail open: when no backend passes, its own probe is more likely
        // wrong than every backend dead; serve them all.
        let health_failopen = active.is_empty() && backends.iter().any(|b| b.weight > 0);
        if health_failopen {
            active = backends.iter().enumerate().filter(|(_, b)| b.weight > 0).map(|(i, _)| i as u32).collect();
        }
        let state = states.cluster(name);
        if let Some(ss) = &spec.slow_start {
            let window = ss.window.as_millis() as u64;
            let now = process_millis();
            for b in &backends {
                if b.ramp_from_ms != 0 && b.ramp_from_ms + window > now {
                    state.ramp_until_ms.fetch_max(b.ramp_from_ms + window, Ordering::Relaxed);
                }
            }
        }
        let selector = Selector::build(&spec.selection, &backends, &active);
        let mut c = Cluster {
            name: Arc::from(name),
            spec: spec.clone(),
            discovered: set.is_some(),
            source: set,
            backends,
            active,
            selector,
            state,
            duration: states.metrics().cluster_histogram(name),
            digest: String::new(),
            health,
            health_failopen,
        };
        c.digest = cluster_digest(&c.normalised());
        c
    }

    /// The cluster as the table digest and `/status` show it: selection,
    /// discovered, backends (address, weight, state).
    pub fn normalised(&self) -> serde_json::Value {
        let backends: Vec<_> = self
            .backends
            .iter()
            .map(|b| serde_json::json!({ "address": b.addr.to_string(), "weight": b.weight, "state": b.state_name() }))
            .collect();
        let mut v = serde_json::json!({
            "name": &*self.name,
            "selection": self.selector.name(),
            "discovered": self.discovered,
            "backends": backends,
        });
        if let Some(tls) = &self.spec.tls {
            v["tls"] = serde_json::json!({ "server_name": tls.server_name, "verify": tls.verify });
        }
        v
    }

    pub fn pick<R: RequestView + ?Sized>(&self, req: &R, tried: &[u32]) -> Option<u32> {
        select::pick(&self.selector, &self.backends, &self.active, &self.state, self.spec.slow_start.as_ref(), req, tried)
    }

    /// Whether some active backend has not been tried yet.
    pub fn has_untried(&self, tried: &[u32]) -> bool {
        self.active.iter().any(|i| !tried.contains(i))
    }
}

pub struct Route {
    pub spec: crate::config::RouteSpec,
    pub name: Arc<str>,
    pub cluster: u32,
    pub metrics: RouteMetrics,
}

pub struct RoutingTable {
    pub generation: u64,
    pub built_at: SystemTime,
    pub router: Arc<Router>,
    pub routes: Vec<Route>,
    pub clusters: Vec<Arc<Cluster>>,
    pub cluster_index: HashMap<String, u32>,
    /// Metrics for requests no route matched.
    pub unrouted: RouteMetrics,
    /// SHA-256 (first 16 hex digits) of [`RoutingTable::normalised`].
    pub digest: String,
    /// Whose forwarding headers to believe, and which to send.
    pub forwarding: Arc<crate::config::ForwardingSettings>,
    /// The largest request accepted.
    pub limits: crate::config::Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("route {route:?} names unknown cluster {cluster:?}")]
    UnknownCluster { route: String, cluster: String },
}

impl RoutingTable {
    /// Build a table from its inputs. Pure: no I/O, no async.
    pub fn build(
        config: &Config,
        discovered: &Discovered,
        states: &StateRegistry,
        generation: u64,
    ) -> Result<RoutingTable, BuildError> {
        Self::build_from(None, config, discovered, &crate::health::HealthView::default(), states, generation)
    }

    /// Build a table, reusing from `prev` every cluster whose spec and
    /// backend set did not change (their selection structures — a consistent
    /// hash ring is the expensive one — are then not rebuilt), the route
    /// matcher when the routes did not change, and metric handles. The result
    /// is the same as a fresh build.
    pub fn build_from(
        prev: Option<&RoutingTable>,
        config: &Config,
        discovered: &Discovered,
        health: &crate::health::HealthView,
        states: &StateRegistry,
        generation: u64,
    ) -> Result<RoutingTable, BuildError> {
        let mut clusters = Vec::with_capacity(config.clusters.len());
        let mut cluster_index = HashMap::with_capacity(config.clusters.len());
        for (name, spec) in &config.clusters {
            let set: Option<EndpointSet> = match &spec.discovery {
                DiscoverySpec::Static(addrs) => {
                    Some(crate::discovery::normalise(addrs.iter().map(|&a| Endpoint::new(a)).collect()))
                }
                _ => discovered.get(name).cloned(),
            };
            let set = set.map(|s| crate::discovery::apply_overrides(s, &spec.instances));
            let verdicts = spec.health_check.as_ref().and_then(|_| health.clusters.get(name).cloned());
            let old = prev.and_then(|p| p.cluster(name));
            let same_health = |c: &Cluster| match (&c.health, &verdicts) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                (Some(a), None) => a.is_empty(),
                (None, None) => spec.health_check.is_none(),
                (None, Some(_)) => false,
            };
            let reused = old.filter(|c| &c.spec == spec && c.discovered == set.is_some() && same_set(c, set.as_ref()) && same_health(c));
            let cluster = match reused {
                Some(c) => c.clone(),
                None => {
                    let joining = old.is_some_and(|c| !c.active.is_empty());
                    Arc::new(Cluster::new(name, spec, set, states, joining, verdicts))
                }
            };
            cluster_index.insert(name.clone(), clusters.len() as u32);
            clusters.push(cluster);
        }
        let same_routes = prev.is_some_and(|p| p.routes.len() == config.routes.len() && p.routes.iter().zip(&config.routes).all(|(a, b)| &a.spec == b));
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let Some(&ci) = cluster_index.get(&r.cluster) else {
                return Err(BuildError::UnknownCluster {
                    route: r.name.clone(),
                    cluster: r.cluster.clone(),
                });
            };
            let metrics = match prev.filter(|_| same_routes) {
                Some(p) => p.routes[i].metrics.clone(),
                None => states.metrics().route_handles(&r.name, &r.cluster),
            };
            routes.push(Route {
                spec: r.clone(),
                name: Arc::from(r.name.as_str()),
                cluster: ci,
                metrics,
            });
        }
        let router = match prev.filter(|_| same_routes) {
            Some(p) => p.router.clone(),
            None => Arc::new(Router::new(&config.routes)),
        };
        let mut table = RoutingTable {
            generation,
            built_at: SystemTime::now(),
            router,
            routes,
            clusters,
            cluster_index,
            unrouted: match prev {
                Some(p) => p.unrouted.clone(),
                None => states.metrics().route_handles("", ""),
            },
            digest: String::new(),
            forwarding: config.forwarding.clone(),
            limits: config.limits,
        };
        table.digest = digest_of(&table.normalised_routes(), table.clusters.iter().map(|c| c.digest.clone()).collect());
        Ok(table)
    }

    /// What the table routes, without anything that differs between two nodes
    /// fed the same inputs (generation, timestamps, in-flight counts, file
    /// paths): routes in match order, clusters by name with their selection
    /// and backends (address, weight, state). `/status` shows the same fields,
    /// and `switchyard status --compare` diffs them.
    pub fn normalised(&self) -> serde_json::Value {
        let clusters: Vec<_> = self.clusters.iter().map(|c| c.normalised()).collect();
        serde_json::json!({ "routes": self.normalised_routes(), "clusters": clusters })
    }

    fn normalised_routes(&self) -> serde_json::Value {
        let routes: Vec<_> = self
            .routes
            .iter()
            .map(|r| {
                let hosts: Vec<String> = r.spec.hosts.iter().map(|h| h.to_string()).collect();
                serde_json::json!({
                    "name": r.spec.name,
                    "hosts": hosts,
                    "path_prefix": r.spec.path_prefix,
                    "cluster": r.spec.cluster,
                    "maintenance": r.spec.maintenance.is_some(),
                })
            })
            .collect();
        serde_json::Value::Array(routes)
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.cluster_index.get(name).map(|&i| &self.clusters[i as usize])
    }

    /// Clusters that have not had a first discovery result.
    pub fn pending_clusters(&self) -> Vec<&str> {
        self.clusters.iter().filter(|c| !c.discovered).map(|c| &*c.name).collect()
    }

    /// Update the per-cluster backend gauges after a publish (only clusters
    /// that changed since `prev`).
    pub fn export_gauges(&self, metrics: &Metrics, prev: Option<&RoutingTable>) {
        metrics.routing_generation.set(self.generation as i64);
        metrics.routing_table_info.reset();
        metrics
            .routing_table_info
            .with_label_values(&[&self.digest])
            .set(1);
        for c in &self.clusters {
            if prev.and_then(|p| p.cluster(&c.name)).is_some_and(|old| Arc::ptr_eq(old, c)) {
                continue;
            }
            let active = c.active.len() as i64;
            let unhealthy = c.backends.iter().filter(|b| b.state_name() == "unhealthy").count() as i64;
            let drained = c.backends.iter().filter(|b| b.weight == 0).count() as i64;
            metrics.backends.with_label_values(&[&c.name, "active"]).set(active);
            metrics.backends.with_label_values(&[&c.name, "drained"]).set(drained);
            if c.spec.health_check.is_some() || unhealthy > 0 {
                metrics.backends.with_label_values(&[&c.name, "unhealthy"]).set(unhealthy);
            }
        }
    }
}

pub(crate) fn make_peer(addr: SocketAddr, spec: &ClusterSpec) -> HttpPeer {
    let mut peer = match &spec.tls {
        None => HttpPeer::new(addr, false, String::new()),
        Some(tls) => {
            // Without a name (only with `verify = false`) the address stands
            // in: the handshake needs one, and no SNI is sent for an IP.
            let name = if tls.server_name.is_empty() { addr.ip().to_string() } else { tls.server_name.clone() };
            let mut peer = HttpPeer::new(addr, true, name);
            peer.options.verify_cert = tls.verify;
            peer.options.verify_hostname = tls.verify;
            peer.options.ca = tls.material.ca.clone();
            peer.client_cert_key = tls.material.client.clone();
            peer
        }
    };
    peer.options.connection_timeout = Some(spec.connect_timeout);
    peer.options.total_connection_timeout = Some(spec.connect_timeout);
    peer.options.read_timeout = Some(spec.read_timeout);
    peer.options.write_timeout = Some(spec.write_timeout);
    peer.options.idle_timeout = Some(spec.idle_timeout);
    peer
}

/// Count of requests in flight for a backend, decremented on drop.
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    pub fn new(state: &Arc<BackendState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
