//! Active health checks: Switchyard's own view of each backend's health.
//!
//! A cluster with `health_check` set has every backend it knows (static,
//! file, DNS or Consul) probed with an HTTP GET every `interval`. The
//! verdicts are published on a watch channel, one more input of reconcile:
//! a backend turning unhealthy or healthy again is a table swap like any
//! other. A backend is served only when its discovery source lists it (for
//! Consul: its checks pass) **and** its active check passes; a new backend
//! waits for its first check. When no backend of a cluster passes, the
//! cluster routes over all of them (fail open) rather than refuse every
//! request on the word of its own probe.

use crate::config::{ClusterSpec, Config, DiscoverySpec, HealthCheck};
use crate::discovery::Discovered;
use crate::metrics::Metrics;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One backend's health as its checks last decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub passing: bool,
    /// When the verdict last changed (ms on [`crate::routing::process_millis`]).
    pub since_ms: u64,
    /// Passing again after having failed: a slow start ramps from `since_ms`.
    pub recovered: bool,
}

/// Per cluster, the verdict on each checked backend. A backend without an
/// entry has had no check yet (pending).
pub type ClusterHealth = BTreeMap<SocketAddr, Verdict>;

/// Every checked cluster's verdicts, as reconcile sees them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthView {
    pub clusters: BTreeMap<String, Arc<ClusterHealth>>,
}

/// What one backend's probe needs; a change restarts the probe.
#[derive(Clone, PartialEq)]
struct Target {
    check: HealthCheck,
    tls: Option<crate::config::BackendTls>,
    connect_timeout: Duration,
}

struct Probe {
    target: Target,
    task: JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    verdicts: Mutex<BTreeMap<String, ClusterHealth>>,
    tx: watch::Sender<Arc<HealthView>>,
    metrics: Arc<Metrics>,
    connector: Connector,
}

impl Shared {
    fn publish(&self, verdicts: &BTreeMap<String, ClusterHealth>) {
        let view = HealthView { clusters: verdicts.iter().map(|(k, v)| (k.clone(), Arc::new(v.clone()))).collect() };
        self.tx.send_if_modified(|cur| {
            if **cur == view {
                return false;
            }
            *cur = Arc::new(view);
            true
        });
    }
}

/// Runs one probe task per checked backend and publishes the verdicts.
pub struct HealthChecker {
    probes: Mutex<HashMap<(String, SocketAddr), Probe>>,
    shared: Arc<Shared>,
    rx: watch::Receiver<Arc<HealthView>>,
}

impl HealthChecker {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = watch::channel(Arc::new(HealthView::default()));
        HealthChecker {
            probes: Mutex::new(HashMap::new()),
            shared: Arc::new(Shared { verdicts: Mutex::new(BTreeMap::new()), tx, metrics, connector: Connector::new(None) }),
            rx,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<HealthView>> {
        self.rx.clone()
    }

    pub fn view(&self) -> Arc<HealthView> {
        self.rx.borrow().clone()
    }

    /// Probe exactly the backends of `config`'s checked clusters (from
    /// `discovered`, or the static list): start probes for new ones, restart
    /// those whose check changed, stop and forget the rest. Must run inside
    /// the runtime.
    pub fn sync(&self, config: &Config, discovered: &Discovered) {
        let mut wanted: HashMap<(String, SocketAddr), Target> = HashMap::new();
        for (name, spec) in &config.clusters {
            let Some(check) = &spec.health_check else { continue };
            let target = Target { check: check.clone(), tls: spec.tls.clone(), connect_timeout: spec.connect_timeout };
            for addr in addresses(spec, discovered.get(name)) {
                wanted.insert((name.clone(), addr), target.clone());
            }
        }
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        if probes.len() == wanted.len() && probes.iter().all(|(k, p)| wanted.get(k) == Some(&p.target)) {
            return;
        }
        let mut verdicts = self.shared.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        probes.retain(|key, probe| {
            let keep = wanted.get(key) == Some(&probe.target);
            if !keep {
                if let Some(c) = verdicts.get_mut(&key.0) {
                    c.remove(&key.1);
                }
                self.shared.metrics.forget_health(&key.0, &key.1.to_string());
            }
            keep
        });
        verdicts.retain(|cluster, c| !c.is_empty() || wanted.keys().any(|(n, _)| n == cluster));
        for (key, target) in wanted {
            if probes.contains_key(&key) {
                continue;
            }
            let spec = config.clusters.get(&key.0).expect("wanted from config");
            let peer = probe_peer(key.1, spec, &target.check);
            let task = tokio::spawn(run(key.clone(), target.check.clone(), peer, self.shared.clone()));
            probes.insert(key, Probe { target, task });
        }
        self.shared.publish(&verdicts);
    }

    /// Stop every probe.
    pub fn stop(&self) {
        self.probes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The addresses a checked cluster's probes go to.
fn addresses(spec: &ClusterSpec, set: Option<&crate::discovery::EndpointSet>) -> Vec<SocketAddr> {
    match &spec.discovery {
        DiscoverySpec::Static(addrs) => addrs.clone(),
        _ => set.map(|s| s.iter().map(|e| e.addr).collect()).unwrap_or_default(),
    }
}

/// The cluster's own peer settings (TLS included), with the check's timeout.
fn probe_peer(addr: SocketAddr, spec: &ClusterSpec, check: &HealthCheck) -> HttpPeer {
    let mut peer = crate::routing::make_peer(addr, spec);
    let connect = spec.connect_timeout.min(check.timeout);
    peer.options.connection_timeout = Some(connect);
    peer.options.total_connection_timeout = Some(connect);
    peer.options.read_timeout = Some(check.timeout);
    peer.options.write_timeout = Some(check.timeout);
    peer.options.idle_timeout = None;
    peer
}

/// One GET; Ok(status) or why it got none.
async fn probe(connector: &Connector, peer: &HttpPeer, addr: SocketAddr, check: &HealthCheck) -> Result<u16, String> {
    let attempt = async {
        let (mut session, _) = connector.get_http_session(peer).await.map_err(|e| format!("connect: {}", e.etype().as_str()))?;
        let mut req = RequestHeader::build("GET", check.path.as_bytes(), None).map_err(|e| e.to_string())?;
        let host = check.host.clone().unwrap_or_else(|| addr.to_string());
        let _ = req.insert_header("host", host);
        let _ = req.insert_header("user-agent", "switchyard-health-check");
        let _ = req.insert_header("connection", "close");
        session.write_request_header(Box::new(req)).await.map_err(|e| format!("write: {}", e.etype().as_str()))?;
        session.finish_request_body().await.map_err(|e| format!("write: {}", e.etype().as_str()))?;
        session.read_response_header().await.map_err(|e| format!("read: {}", e.etype().as_str()))?;
        let status = session.response_header().map(|r| r.status.as_u16()).ok_or("no response")?;
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(check.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", check.timeout)),
    }
}

/// A small, cheap pseudo-random number (for jitter), different per call.
fn jitter_seed(key: &(String, SocketAddr), n: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    n.hash(&mut h);
    h.finish()
}

/// Probe one backend forever (until aborted), publishing each change of verdict.
async fn run(key: (String, SocketAddr), check: HealthCheck, peer: HttpPeer, shared: Arc<Shared>) {
    let (cluster, addr) = (&key.0, key.1);
    let backend = addr.to_string();
    let mut current: Option<bool> = None;
    let (mut passes, mut fails) = (0u32, 0u32);
    for n in 0u64.. {
        let result = probe(&shared.connector, &peer, addr, &check).await;
        let pass = matches!(result, Ok(s) if check.passes(s));
        shared.metrics.health_checks.with_label_values(&[cluster.as_str(), if pass { "pass" } else { "fail" }]).inc();
        if pass {
            passes += 1;
            fails = 0;
        } else {
            fails += 1;
            passes = 0;
        }
        let next = match current {
            // The first check decides at once.
            None => Some(pass),
            Some(true) if fails >= check.unhealthy_threshold => Some(false),
            Some(false) if passes >= check.healthy_threshold => Some(true),
            _ => None,
        };
        if let Some(passing) = next.filter(|&p| current != Some(p)) {
            let why = match &result {
                Ok(s) => format!("status {s}"),
                Err(e) => e.clone(),
            };
            if passing {
                tracing::info!(cluster = %cluster, backend = %addr, result = %why, "health check passing");
            } else {
                tracing::warn!(cluster = %cluster, backend = %addr, result = %why, checks = fails, "health check failing: backend taken out");
            }
            let verdict = Verdict { passing, since_ms: crate::routing::process_millis(), recovered: passing && current == Some(false) };
            current = Some(passing);
            shared.metrics.backend_health.with_label_values(&[cluster, &backend]).set(passing as i64);
            let mut verdicts = shared.verdicts.lock().unwrap_or_else(|e| e.into_inner());
            verdicts.entry(cluster.clone()).or_default().insert(addr, verdict);
            shared.publish(&verdicts);
        }
        // ±10 % jitter so the probes of many proxies and backends spread out.
        let interval = check.interval.as_millis() as u64;
        let spread = interval / 5;
        let wait = interval - interval / 10 + if spread > 0 { jitter_seed(&key, n) % spread } else { 0 };
        tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
    }
}
