//! The routing snapshot: everything a request needs, immutable once built.
//!
//! [`RoutingTable::build`] is a pure function of the config, the discovered
//! backend sets and the registry of per-backend state: no I/O, no async, the
//! same inputs give the same table. State that must outlive one table — a
//! backend's in-flight count, a cluster's round-robin cursor — is taken from
//! the [`StateRegistry`] by identity, so a swap does not reset it.

pub mod matcher;
pub mod select;

use crate::config::{ClusterSpec, Config, DiscoverySpec};
use crate::discovery::{Discovered, Endpoint};
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

/// Per-backend state that survives table swaps.
#[derive(Default)]
pub struct BackendState {
    /// Requests currently assigned to this backend (least-connections reads it).
    pub in_flight: AtomicU64,
    pub metrics: Option<BackendMetrics>,
}

/// Per-cluster state that survives table swaps.
#[derive(Default)]
pub struct ClusterState {
    pub cursor: AtomicUsize,
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

    fn backend(&self, cluster: &str, addr: SocketAddr) -> Arc<BackendState> {
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((cluster.to_string(), addr))
            .or_insert_with(|| {
                Arc::new(BackendState {
                    in_flight: AtomicU64::new(0),
                    metrics: Some(self.metrics.backend_handles(cluster, &addr.to_string())),
                })
            })
            .clone()
    }

    fn cluster(&self, name: &str) -> Arc<ClusterState> {
        let mut map = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    /// Forget state (and metric series) of backends and clusters the table no
    /// longer has. Requests still in flight keep their own `Arc`s.
    pub fn retain(&self, table: &RoutingTable) {
        let mut keep: std::collections::HashSet<(&str, SocketAddr)> = std::collections::HashSet::new();
        for c in &table.clusters {
            for b in &c.backends {
                keep.insert((&c.name, b.addr));
            }
        }
        let mut map = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(cluster, addr), _| {
            let kept = keep.contains(&(cluster.as_str(), *addr));
            if !kept {
                self.metrics.forget_backend(cluster, &addr.to_string());
            }
            kept
        });
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters.retain(|name, _| table.cluster_index.contains_key(name));
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub endpoint: Endpoint,
    /// Built once per table; cloned per request.
    pub peer: HttpPeer,
    pub state: Arc<BackendState>,
}

impl Backend {
    #[cfg(test)]
    pub fn for_test(addr: SocketAddr, weight: u32) -> Backend {
        Backend {
            addr,
            weight,
            endpoint: Endpoint { weight, ..Endpoint::new(addr) },
            peer: HttpPeer::new(addr, false, String::new()),
            state: Arc::new(BackendState::default()),
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
    pub duration: Histogram,
}

impl Cluster {
    pub fn pick(&self, req: &pingora::http::RequestHeader, tried: &[u32]) -> Option<u32> {
        select::pick(&self.selector, &self.backends, &self.active, &self.state, req, tried)
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
    pub router: Router,
    pub routes: Vec<Route>,
    pub clusters: Vec<Cluster>,
    pub cluster_index: HashMap<String, u32>,
    /// Metrics for requests no route matched.
    pub unrouted: RouteMetrics,
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
        let mut clusters = Vec::with_capacity(config.clusters.len());
        let mut cluster_index = HashMap::with_capacity(config.clusters.len());
        for (name, spec) in &config.clusters {
            let (endpoints, was_discovered): (Vec<Endpoint>, bool) = match &spec.discovery {
                DiscoverySpec::Static(addrs) => (addrs.iter().map(|&a| Endpoint::new(a)).collect(), true),
                _ => match discovered.get(name) {
                    Some(set) => (set.as_ref().clone(), true),
                    None => (Vec::new(), false),
                },
            };
            let mut backends: Vec<Backend> = endpoints
                .into_iter()
                .map(|ep| Backend {
                    addr: ep.addr,
                    weight: ep.weight,
                    peer: make_peer(ep.addr, spec),
                    state: states.backend(name, ep.addr),
                    endpoint: ep,
                })
                .collect();
            backends.sort_by(|a, b| a.addr.cmp(&b.addr));
            backends.dedup_by(|a, b| a.addr == b.addr);
            let active: Vec<u32> = backends
                .iter()
                .enumerate()
                .filter(|(_, b)| b.weight > 0)
                .map(|(i, _)| i as u32)
                .collect();
            let selector = Selector::build(&spec.selection, &backends, &active);
            cluster_index.insert(name.clone(), clusters.len() as u32);
            clusters.push(Cluster {
                name: Arc::from(name.as_str()),
                spec: spec.clone(),
                backends,
                active,
                selector,
                state: states.cluster(name),
                discovered: was_discovered,
                duration: states.metrics().cluster_histogram(name),
            });
        }
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let Some(&ci) = cluster_index.get(&r.cluster) else {
                return Err(BuildError::UnknownCluster {
                    route: r.name.clone(),
                    cluster: r.cluster.clone(),
                });
            };
            routes.push(Route {
                spec: r.clone(),
                name: Arc::from(r.name.as_str()),
                cluster: ci,
                metrics: states.metrics().route_handles(&r.name, &r.cluster),
            });
        }
        Ok(RoutingTable {
            generation,
            built_at: SystemTime::now(),
            router: Router::new(&config.routes),
            routes,
            clusters,
            cluster_index,
            unrouted: states.metrics().route_handles("", ""),
        })
    }

    /// Clusters that have not had a first discovery result.
    pub fn pending_clusters(&self) -> Vec<&str> {
        self.clusters.iter().filter(|c| !c.discovered).map(|c| &*c.name).collect()
    }

    /// Update the per-cluster backend gauges after a publish.
    pub fn export_gauges(&self, metrics: &Metrics) {
        metrics.routing_generation.set(self.generation as i64);
        for c in &self.clusters {
            let active = c.active.len() as i64;
            let drained = c.backends.len() as i64 - active;
            metrics.backends.with_label_values(&[&c.name, "active"]).set(active);
            metrics.backends.with_label_values(&[&c.name, "drained"]).set(drained);
        }
    }
}

fn make_peer(addr: SocketAddr, spec: &ClusterSpec) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
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
