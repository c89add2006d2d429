//! Consul service discovery.
//!
//! One blocking watch per distinct routed query on `/v1/health/service/<name>`
//! (up to `max_watches`; queries beyond the budget poll without an index at a
//! modest rate, so the agent's 200-connections-per-client limit is never
//! approached). Each watch publishes the *whole* instance list, with every
//! instance's aggregated health, on its own `watch` channel; reconcile turns
//! it into backends ([`endpoints_for`], which also applies panic mode).
//! Instances addressed by host name travel next to the others and are
//! resolved by reconcile through DNS sources.
//!
//! Fail-static: a failed read never publishes, so the last good set keeps
//! serving. The last good sets are persisted to a state file (temp file +
//! rename) and loaded at start, so a restart during an outage still serves.

pub mod blocking;
pub mod catalog;
pub mod client;
pub mod health;
pub mod kv;
pub mod pace;
pub mod register;
pub mod signal;
pub mod tags;
pub mod watch;

use crate::config::{ClusterSpec, ConsulQuery, ConsulSettings, RouteSpec};
use crate::discovery::{Endpoint, NamedInstance};
use crate::metrics::Metrics;
use crate::status::{unix, StatusBoard};
use async_trait::async_trait;
use client::ConsulClient;
use health::{ConsulInstance, NamedConsulInstance, Status};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch as wch, Notify};

/// Watches beyond the blocking budget re-read at least this often, even
/// without a signal (catches instances registered without any check).
pub const TRIGGERED_RESYNC: Duration = Duration::from_secs(300);

/// A whole instance list for one query, as last read.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSnapshot {
    pub instances: Arc<Vec<ConsulInstance>>,
    /// The instances addressed by host name.
    pub named: Arc<Vec<NamedConsulInstance>>,
    pub synced_at: SystemTime,
    /// Loaded from the state file at start, not (yet) confirmed by Consul.
    pub from_state_file: bool,
}


/// Turn an instance list into backends. Healthy instances are `passing` ones
/// (plus `warning` when admitted, weighted by `Weights.Warning`). When the
/// healthy share of the non-maintenance instances falls below the panic
/// threshold — or to zero — all non-maintenance instances are used instead
/// (panic mode). Returns the endpoints, the chosen instances addressed by
/// host name (for reconcile to resolve, each with the weight chosen here),
/// and whether panic mode is on.
///
/// An instance addressed by host name counts exactly as one addressed by IP
/// (healthy, unhealthy or in maintenance), whether or not its name has
/// resolved yet: the panic decision is Consul's health, not the DNS.
pub fn endpoints_for(snap: &ServiceSnapshot, q: &ConsulQuery) -> (Vec<Endpoint>, Vec<NamedInstance>, bool) {
    let healthy_weight = |status: Status, passing: u32, warning: u32| match status {
        Status::Passing => Some(passing),
        Status::Warning if q.allow_warning => Some(warning),
        _ => None,
    };
    let eligible = snap.instances.iter().map(|i| (i.status, i.weight_passing, i.weight_warning));
    let eligible = eligible
        .chain(snap.named.iter().map(|n| (n.status, n.weight_passing, n.weight_warning)))
        .filter(|(s, _, _)| *s != Status::Maintenance);
    let (mut total, mut healthy) = (0u64, 0u64);
    for (s, p, w) in eligible {
        total += 1;
        healthy += healthy_weight(s, p, w).is_some() as u64;
    }
    if total == 0 {
        return (Vec::new(), Vec::new(), false);
    }
    let panic = healthy == 0 || healthy * 1000 < (q.panic_permille as u64) * total;
    // The weight an instance serves with, or None when it does not serve.
    let chosen = |status: Status, passing: u32, warning: u32| match status {
        Status::Maintenance => None,
        _ if panic => Some(passing.max(1)),
        _ => healthy_weight(status, passing, warning),
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for i in snap.instances.iter() {
        let Some(w) = chosen(i.status, i.weight_passing, i.weight_warning) else { continue };
        // Two registrations of one address: one backend.
        if seen.insert(i.addr) {
            out.push(Endpoint {
                addr: i.addr,
                weight: w,
                tags: i.tags.clone(),
                meta: i.meta.clone(),
                id: Some(i.id.clone()),
            });
        }
    }
    out.sort_by(|a, b| a.addr.cmp(&b.addr));
    let named = snap
        .named
        .iter()
        .filter_map(|n| {
            let w = chosen(n.status, n.weight_passing, n.weight_warning)?;
            Some(NamedInstance {
                host: n.host.clone(),
                port: n.port,
                weight: w,
                tags: n.tags.clone(),
                meta: n.meta.clone(),
                id: Some(n.id.clone()),
            })
        })
        .collect();
    (out, named, panic)
}

/// The host names (with ports) of a snapshot's instances that may serve:
/// every one not in maintenance, so that panic mode finds them resolved.
pub fn named_hosts(snap: &ServiceSnapshot) -> impl Iterator<Item = (&str, u16)> {
    snap.named.iter().filter(|n| n.status != Status::Maintenance).map(|n| (n.host.as_str(), n.port))
}

/// Everything the Consul source knows, published as one value: each watched
/// query's last good instance list, and the auto routes derived from tags.
#[derive(Debug, Clone, Default)]
pub struct ConsulView {
    pub services: BTreeMap<ConsulQuery, Arc<ServiceSnapshot>>,
    /// service → its auto route and cluster (last good version).
    pub auto: BTreeMap<String, (RouteSpec, ClusterSpec)>,
}

pub type ViewRx = wch::Receiver<Arc<ConsulView>>;
type ViewTx = Arc<wch::Sender<Arc<ConsulView>>>;

/// State shared between one watch task and the rest of the source.
pub struct WatchShared {
    pub query: ConsulQuery,
    pub name: String,
    label: String,
    view: ViewTx,
    last_sync: Mutex<Option<SystemTime>>,
    /// A blocking read is held after a good read: the set is current right now
    /// (Consul would answer at once on a change).
    holding: std::sync::atomic::AtomicBool,
    staleness: prometheus::Gauge,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    persist: Arc<Notify>,
}

impl WatchShared {
    fn new(q: &ConsulQuery, view: ViewTx, metrics: &Arc<Metrics>, status: &Arc<StatusBoard>, persist: &Arc<Notify>) -> Self {
        let name = q.source_name();
        status.register_source(&name, "consul", &q.label());
        WatchShared {
            label: q.label(),
            name,
            query: q.clone(),
            view,
            last_sync: Mutex::new(None),
            holding: std::sync::atomic::AtomicBool::new(false),
            staleness: metrics.discovery_staleness.with_label_values(&[&q.label()]),
            metrics: metrics.clone(),
            status: status.clone(),
            persist: persist.clone(),
        }
    }

    pub fn synced(&self, at: SystemTime) {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
        self.status.source_ok(&self.name, at);
        self.staleness.set(0.0);
    }

    pub fn set_holding(&self, on: bool) {
        self.holding.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn holding(&self) -> bool {
        self.holding.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn last_sync(&self) -> Option<SystemTime> {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Label of the watch's query, as in metrics and logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Publish a set; returns whether it differed from the one in force.
    pub fn publish(&self, snap: ServiceSnapshot) -> bool {
        let q = &self.query;
        let changed = self.view.send_if_modified(|v| match v.services.get(q) {
            Some(c) if c.instances == snap.instances && c.named == snap.named && !c.from_state_file => false,
            _ => {
                Arc::make_mut(v).services.insert(q.clone(), Arc::new(snap));
                true
            }
        });
        self.metrics.discovery_update(&self.name, if changed { "ok" } else { "unchanged" });
        if changed {
            self.persist.notify_one();
        }
        changed
    }

    pub fn error(&self, kind: &str, msg: &str) {
        self.metrics.consul_watch_errors.with_label_values(&[&self.label, kind]).inc();
        self.metrics.discovery_update(&self.name, "error");
        self.status.source_error(&self.name, format!("{kind}: {msg}"));
        tracing::warn!(service = %self.label, kind, error = %msg, "consul watch failed; last good set stays in force");
    }

    pub fn skipped(&self, reason: &'static str, detail: &str) {
        self.metrics.consul_instances_skipped.with_label_values(&[&self.label, reason]).inc();
        tracing::warn!(service = %self.label, reason, detail, "consul instance skipped");
    }

    pub fn index_reset(&self) {
        self.metrics.consul_watch_errors.with_label_values(&[&self.label, "index_reset"]).inc();
        // Logged once for all watches at INFO by `pace::Restores`.
        tracing::debug!(service = %self.label, "consul index went backwards");
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    saved_unix: f64,
    services: Vec<StateEntry>,
    /// Tags of services with auto routes, so those routes survive a restart too.
    #[serde(default)]
    auto_tags: BTreeMap<String, Vec<String>>,
    /// The last good KV settings (values base64), so a restart during an
    /// outage keeps them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kv: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize)]
struct StateEntry {
    query: ConsulQuery,
    synced_unix: f64,
    instances: Vec<ConsulInstance>,
    /// Instances addressed by host name (a file written without them reads
    /// as none; a reader that does not know the field ignores it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    named: Vec<NamedConsulInstance>,
}

fn from_unix(s: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(s.max(0.0))
}

struct Running {
    shared: Arc<WatchShared>,
    task: tokio::task::JoinHandle<()>,
    mode: watch::Mode,
}

pub struct ConsulSource {
    client: Arc<ConsulClient>,
    settings: ConsulSettings,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    persist: Arc<Notify>,
    view: ViewTx,
    /// The queries of the config's Consul clusters (of the running config
    /// and of a reloaded one that waits for its first results).
    configured: Mutex<Vec<ConsulQuery>>,
    /// Cluster names from the config file: an auto route may not take them.
    reserved: Mutex<BTreeSet<String>>,
    /// The live config, followed on reloads.
    config: Option<crate::live::ConfigRx>,
    /// The last catalog read for auto routes, re-applied when the reserved
    /// names change.
    last_catalog: Mutex<Option<BTreeMap<String, Vec<String>>>>,
    /// The KV settings watch's output (with `consul.kv_prefix`).
    kv: Option<Arc<wch::Sender<Option<Arc<kv::KvSet>>>>>,
    running: Mutex<BTreeMap<ConsulQuery, Running>>,
    /// Triggered watches, by service name, for the check signal to poke.
    pokes: signal::Pokes,
    signal_holding: Arc<std::sync::atomic::AtomicBool>,
    signal_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Tags of the services that have auto routes, persisted with the sets.
    auto_tags: Mutex<BTreeMap<String, Vec<String>>>,
}

impl ConsulSource {
    /// Create the source; seed the view from the state file when it has data.
    /// With `config`, the watched queries follow config reloads.
    pub fn new(
        settings: &ConsulSettings,
        configured: BTreeSet<ConsulQuery>,
        reserved: BTreeSet<String>,
        config: Option<crate::live::ConfigRx>,
        kv_out: Option<wch::Sender<Option<Arc<kv::KvSet>>>>,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
    ) -> Result<(ConsulSource, ViewRx), String> {
        let client = Arc::new(ConsulClient::new(settings, metrics.clone())?);
        let mut view = ConsulView::default();
        let mut auto_tags = BTreeMap::new();
        if let Some(p) = &settings.state_file {
            match std::fs::read(p) {
                Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                    Ok(s) if s.version == 1 => {
                        let count = s.services.len();
                        if let (Some(saved), Some(tx)) = (&s.kv, &kv_out) {
                            tracing::info!(path = %p.display(), keys = saved.len(), "loaded the persisted consul KV settings; using them until Consul answers");
                            tx.send_replace(Some(Arc::new(kv::from_state(saved))));
                        }
                        for (service, tags) in s.auto_tags {
                            if let Ok(Some(spec)) = tags::parse(&service, &tags) {
                                if !reserved.contains(&spec.1.name) {
                                    view.auto.insert(service.clone(), spec);
                                    auto_tags.insert(service, tags);
                                }
                            }
                        }
                        for e in s.services {
                            view.services.insert(
                                e.query,
                                Arc::new(ServiceSnapshot {
                                    instances: Arc::new(e.instances),
                                    named: Arc::new(e.named),
                                    synced_at: from_unix(e.synced_unix),
                                    from_state_file: true,
                                }),
                            );
                        }
                        tracing::info!(path = %p.display(), services = count, "loaded the persisted consul sets; serving them until Consul answers");
                    }
                    Ok(s) => tracing::warn!(path = %p.display(), version = s.version, "ignoring consul state file of unknown version"),
                    Err(e) => tracing::warn!(path = %p.display(), error = %e, "ignoring unreadable consul state file"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot read the consul state file"),
            }
        }
        let (tx, rx) = wch::channel(Arc::new(view));
        Ok((
            ConsulSource {
                client,
                settings: settings.clone(),
                metrics,
                status,
                persist: Arc::new(Notify::new()),
                view: Arc::new(tx),
                configured: Mutex::new(configured.into_iter().collect()),
                reserved: Mutex::new(reserved),
                config,
                last_catalog: Mutex::new(None),
                kv: kv_out.map(Arc::new),
                running: Mutex::new(BTreeMap::new()),
                pokes: Default::default(),
                signal_holding: Default::default(),
                signal_task: Mutex::new(None),
                auto_tags: Mutex::new(auto_tags),
            },
            rx,
        ))
    }

    /// Start a watch for `q` unless one runs. Blocking within the budget,
    /// polling beyond it.
    fn ensure_watch(&self, q: &ConsulQuery, shutdown: &ShutdownWatch) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.contains_key(q) {
            return;
        }
        // The catalog watch (auto routes) and the check signal hold one
        // blocking permit each.
        // (and the KV watch one more).
        let budget = client::blocking_budget(&self.settings).saturating_sub(self.settings.auto_routes as usize + 1 + self.kv.is_some() as usize);
        let blocking = running.values().filter(|r| r.mode.is_blocking()).count();
        let mode = if blocking < budget {
            watch::Mode::Blocking
        } else {
            let poke = Arc::new(Notify::new());
            self.pokes.lock().unwrap_or_else(|e| e.into_inner()).entry(q.service.clone()).or_default().push(poke.clone());
            let mut task = self.signal_task.lock().unwrap_or_else(|e| e.into_inner());
            if task.is_none() {
                tracing::info!(budget, "more routed services than blocking watches; the rest follow the datacenter-wide check signal");
                *task = Some(tokio::spawn(signal::run(
                    self.client.clone(),
                    self.metrics.clone(),
                    self.status.clone(),
                    self.pokes.clone(),
                    self.signal_holding.clone(),
                    shutdown.clone(),
                )));
            }
            watch::Mode::Triggered { poke, resync: TRIGGERED_RESYNC }
        };
        let shared = Arc::new(WatchShared::new(q, self.view.clone(), &self.metrics, &self.status, &self.persist));
        let task = tokio::spawn(watch::run(q.clone(), self.client.clone(), shared.clone(), mode.clone(), shutdown.clone()));
        running.insert(q.clone(), Running { shared, task, mode });
    }

    /// Stop the watch for `q` and forget its set.
    fn drop_watch(&self, q: &ConsulQuery) {
        if let Some(r) = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(q) {
            r.task.abort();
            if let watch::Mode::Triggered { poke, .. } = &r.mode {
                if let Some(v) = self.pokes.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&q.service) {
                    v.retain(|p| !Arc::ptr_eq(p, poke));
                }
            }
        }
        self.view.send_if_modified(|v| Arc::make_mut(v).services.remove(q).is_some());
    }

    /// Write the state file: the snapshot is taken here, the write (with its
    /// `fsync`, which can take seconds on a busy disk) runs on the blocking
    /// pool, so the watches and the reconciler on this thread go on meanwhile.
    async fn save_state(&self) {
        let Some(path) = self.settings.state_file.clone() else { return };
        let view = self.view.borrow().clone();
        let services: Vec<StateEntry> = view
            .services
            .iter()
            .map(|(q, snap)| StateEntry {
                query: q.clone(),
                synced_unix: unix(snap.synced_at),
                instances: snap.instances.as_ref().clone(),
                named: snap.named.as_ref().clone(),
            })
            .collect();
        let state = StateFile {
            version: 1,
            saved_unix: unix(SystemTime::now()),
            services,
            auto_tags: self.auto_tags.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            kv: self.kv.as_ref().and_then(|tx| tx.borrow().as_deref().map(kv::to_state)),
        };
        let shown = path.display().to_string();
        let write = move || -> std::io::Result<std::path::PathBuf> {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            serde_json::to_writer(&mut tmp, &state)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(path)
        };
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(write).await {
            Ok(Ok(path)) => {
                tracing::debug!(path = %path.display(), seconds = started.elapsed().as_secs_f64(), "consul state file written")
            }
            Ok(Err(e)) => tracing::warn!(path = %shown, error = %e, "cannot write the consul state file"),
            Err(e) => tracing::warn!(path = %shown, error = %e, "the consul state file writer failed"),
        }
    }

    /// Run a watch for every configured query and every auto route's, and
    /// stop the others.
    fn sync_watches(&self, auto: &BTreeMap<String, (crate::config::RouteSpec, crate::config::ClusterSpec)>, shutdown: &ShutdownWatch) {
        let wanted: BTreeSet<ConsulQuery> = auto
            .values()
            .filter_map(|(_, c)| match &c.discovery {
                crate::config::DiscoverySpec::Consul(q) => Some(q.clone()),
                _ => None,
            })
            .chain(self.configured.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned())
            .collect();
        for q in &wanted {
            self.ensure_watch(q, shutdown);
        }
        let stale: Vec<ConsulQuery> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|q| !wanted.contains(*q))
            .cloned()
            .collect();
        for q in stale {
            self.drop_watch(&q);
        }
    }

    /// A config reload: follow its Consul clusters (and those of the
    /// running config until it is replaced) and its cluster names.
    fn apply_config(&self, state: &crate::live::ConfigState, shutdown: &ShutdownWatch) {
        let configured: BTreeSet<ConsulQuery> = state.wanted().flat_map(|c| c.consul_queries()).collect();
        let reserved: BTreeSet<String> = state.wanted().flat_map(|c| c.clusters.keys().cloned()).collect();
        *self.configured.lock().unwrap_or_else(|e| e.into_inner()) = configured.into_iter().collect();
        *self.reserved.lock().unwrap_or_else(|e| e.into_inner()) = reserved;
        let catalog = self.last_catalog.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match catalog {
            Some(cat) => self.apply_catalog(&cat, shutdown),
            None => {
                let auto = self.view.borrow().auto.clone();
                self.sync_watches(&auto, shutdown);
            }
        }
    }

    /// Apply a new catalog of service → tags: update auto routes and their watches.
    fn apply_catalog(&self, catalog: &BTreeMap<String, Vec<String>>, shutdown: &ShutdownWatch) {
        *self.last_catalog.lock().unwrap_or_else(|e| e.into_inner()) = Some(catalog.clone());
        let mut auto = self.view.borrow().auto.clone();
        let mut errors = BTreeMap::new();
        for (service, tags) in catalog {
            match tags::parse(service, tags) {
                Ok(Some((route, cluster))) => {
                    if self.reserved.lock().unwrap_or_else(|e| e.into_inner()).contains(&cluster.name) {
                        errors.insert(service.clone(), format!("auto cluster name {:?} is taken by the config file", cluster.name));
                        continue;
                    }
                    auto.insert(service.clone(), (route, cluster));
                }
                Ok(None) => {
                    auto.remove(service);
                }
                Err(e) => {
                    // Keep the service's last good route (if any).
                    errors.insert(service.clone(), e);
                }
            }
        }
        auto.retain(|service, _| catalog.contains_key(service));
        {
            let mut tags = self.auto_tags.lock().unwrap_or_else(|e| e.into_inner());
            tags.retain(|s, _| auto.contains_key(s));
            for s in auto.keys() {
                if !errors.contains_key(s) {
                    if let Some(t) = catalog.get(s) {
                        tags.insert(s.clone(), t.clone());
                    }
                }
            }
        }
        for (service, e) in &errors {
            self.metrics.consul_tag_errors.with_label_values(&[service]).inc();
            tracing::warn!(service = %service, error = %e, "bad switchyard tag; the service keeps its last good route");
        }
        self.status.set_tag_errors(errors);
        self.sync_watches(&auto, shutdown);
        self.view.send_if_modified(|v| {
            if v.auto == auto {
                false
            } else {
                Arc::make_mut(v).auto = auto;
                true
            }
        });
    }
}

#[async_trait]
impl BackgroundService for ConsulSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let configured = self.configured.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for q in &configured {
            self.ensure_watch(q, &shutdown);
        }
        let mut config = self.config.clone();
        // Consul clusters defined only in KV settings (loaded from the state
        // file) are in the live config already.
        if let Some(rx) = &config {
            let state = rx.borrow().clone();
            self.apply_config(&state, &shutdown);
        }
        let kv_task = match (&self.kv, &self.settings.kv_prefix) {
            (Some(tx), Some(prefix)) => Some(tokio::spawn(kv::run(
                self.client.clone(),
                self.metrics.clone(),
                self.status.clone(),
                prefix.clone(),
                tx.clone(),
                shutdown.clone(),
            ))),
            _ => None,
        };
        let mut kv_rx = self.kv.as_ref().map(|tx| tx.subscribe());
        let restored: Vec<ConsulQuery> = self
            .view
            .borrow()
            .auto
            .values()
            .filter_map(|(_, c)| match &c.discovery {
                crate::config::DiscoverySpec::Consul(q) => Some(q.clone()),
                _ => None,
            })
            .collect();
        for q in &restored {
            self.ensure_watch(q, &shutdown);
        }
        let (cat_tx, mut cat_rx) = wch::channel::<Option<BTreeMap<String, Vec<String>>>>(None);
        let catalog_task = self
            .settings
            .auto_routes
            .then(|| tokio::spawn(catalog::run(self.client.clone(), self.metrics.clone(), self.status.clone(), cat_tx, shutdown.clone())));
        let prober = tokio::spawn(pace::run_prober(self.client.clone(), self.metrics.clone(), shutdown.clone()));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let started = SystemTime::now();
        let mut last_save = tokio::time::Instant::now() - Duration::from_secs(10);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(state) = async {
                    match config.as_mut() {
                        Some(rx) => rx.changed().await.ok().map(|()| rx.borrow_and_update().clone()),
                        None => std::future::pending().await,
                    }
                } => {
                    self.apply_config(&state, &shutdown);
                }
                Some(()) = async {
                    match kv_rx.as_mut() {
                        Some(rx) => rx.changed().await.ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    self.persist.notify_one();
                }
                Ok(()) = cat_rx.changed() => {
                    let cat = cat_rx.borrow_and_update().clone();
                    if let Some(cat) = cat {
                        self.apply_catalog(&cat, &shutdown);
                    }
                }
                _ = self.persist.notified() => {
                    if self.settings.state_file.is_some() {
                        // At most one write per second; the tick picks up the rest.
                        if last_save.elapsed() >= Duration::from_secs(1) {
                            self.save_state().await;
                            last_save = tokio::time::Instant::now();
                        } else {
                            self.persist.notify_one();
                            tokio::time::sleep(Duration::from_secs(1).saturating_sub(last_save.elapsed())).await;
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = SystemTime::now();
                    let view = self.view.borrow().clone();
                    for r in self.running.lock().unwrap_or_else(|e| e.into_inner()).values() {
                        let w = &r.shared;
                        let signalled = !r.mode.is_blocking() && self.signal_holding.load(std::sync::atomic::Ordering::Relaxed);
                        if w.holding() || signalled {
                            // In sync right now: a held blocking read after a good one.
                            w.synced(now);
                            continue;
                        }
                        let since = w.last_sync()
                            .or_else(|| view.services.get(&w.query).map(|s| s.synced_at))
                            .unwrap_or(started);
                        let age = now.duration_since(since).unwrap_or_default().as_secs_f64();
                        w.staleness.set(age);
                    }
                }
            }
        }
        if let Some(t) = catalog_task {
            t.abort();
        }
        if let Some(t) = kv_task {
            t.abort();
        }
        prober.abort();
        if let Some(t) = self.signal_task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        let tasks: Vec<_> = std::mem::take(&mut *self.running.lock().unwrap_or_else(|e| e.into_inner()))
            .into_values()
            .map(|r| r.task)
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, status: Status) -> ConsulInstance {
        ConsulInstance {
            node: "n".into(),
            id: id.into(),
            addr: format!("10.0.0.{}:80", id.len() + id.bytes().map(|b| b as usize).sum::<usize>() % 200).parse().unwrap(),
            status,
            weight_passing: 3,
            weight_warning: 1,
            tags: vec![],
            meta: Default::default(),
        }
    }

    fn q(permille: u32, allow_warning: bool) -> ConsulQuery {
        ConsulQuery {
            service: "web".into(),
            tags: vec![],
            allow_warning,
            filter: None,
            panic_permille: permille,
        }
    }

    fn snap(v: Vec<ConsulInstance>) -> ServiceSnapshot {
        ServiceSnapshot {
            instances: Arc::new(v),
            named: Arc::new(vec![]),
            synced_at: SystemTime::now(),
            from_state_file: false,
        }
    }

    #[test]
    fn healthy_only_above_threshold() {
        let s = snap(vec![inst("a", Status::Passing), inst("b", Status::Passing), inst("c", Status::Critical)]);
        let (eps, _, panic) = endpoints_for(&s, &q(500, false));
        assert!(!panic);
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|e| e.weight == 3));
    }

    #[test]
    fn panic_below_threshold_and_at_zero() {
        let s = snap(vec![inst("a", Status::Passing), inst("b", Status::Critical), inst("c", Status::Critical)]);
        let (eps, _, panic) = endpoints_for(&s, &q(500, false));
        assert!(panic, "1/3 healthy < 50 %");
        assert_eq!(eps.len(), 3);
        let s = snap(vec![inst("a", Status::Critical), inst("b", Status::Critical), inst("m", Status::Maintenance)]);
        let (eps, _, panic) = endpoints_for(&s, &q(0, false));
        assert!(panic, "zero healthy always panics, even with threshold 0");
        assert_eq!(eps.len(), 2, "maintenance stays out even in panic mode");
    }

    #[test]
    fn warning_admitted_with_warning_weight() {
        let s = snap(vec![inst("a", Status::Passing), inst("b", Status::Warning)]);
        let (eps, _, panic) = endpoints_for(&s, &q(500, true));
        assert!(!panic);
        let mut w: Vec<u32> = eps.iter().map(|e| e.weight).collect();
        w.sort();
        assert_eq!(w, vec![1, 3]);
        let (eps, _, _) = endpoints_for(&s, &q(500, false));
        assert_eq!(eps.len(), 1);
    }

    fn named(id: &str, status: Status) -> NamedConsulInstance {
        NamedConsulInstance {
            node: "n".into(),
            id: id.into(),
            host: format!("{id}.example"),
            port: 8080,
            status,
            weight_passing: 4,
            weight_warning: 2,
            tags: vec!["t".into()],
            meta: [("k".to_string(), "v".to_string())].into_iter().collect(),
        }
    }

    fn with_named(ip: Vec<ConsulInstance>, named: Vec<NamedConsulInstance>) -> ServiceSnapshot {
        ServiceSnapshot { named: Arc::new(named), ..snap(ip) }
    }

    #[test]
    fn host_name_instances_count_and_serve_as_the_others() {
        // One passing by IP, one passing by name, two critical: 2/4 is not
        // below 50 %, so only the healthy ones serve.
        let s = with_named(
            vec![inst("a", Status::Passing), inst("b", Status::Critical)],
            vec![named("h1", Status::Passing), named("h2", Status::Critical), named("m", Status::Maintenance)],
        );
        let (eps, chosen, panic) = endpoints_for(&s, &q(500, false));
        assert!(!panic);
        assert_eq!(eps.len(), 1);
        let got: Vec<(&str, u16, u32, Option<&str>)> =
            chosen.iter().map(|n| (n.host.as_str(), n.port, n.weight, n.id.as_deref())).collect();
        assert_eq!(got, vec![("h1.example", 8080, 4, Some("h1"))], "the passing weight, the service ID");
        assert_eq!(chosen[0].tags, vec!["t".to_string()]);
        assert_eq!(chosen[0].meta.get("k").map(String::as_str), Some("v"));
        // The named instance is what keeps this service out of panic mode.
        let s = with_named(vec![inst("a", Status::Passing), inst("b", Status::Critical), inst("c", Status::Critical)], vec![named("h1", Status::Passing)]);
        let (_, _, panic) = endpoints_for(&s, &q(500, false));
        assert!(!panic, "2 of 4 healthy");
        let s = with_named(vec![inst("a", Status::Passing)], vec![named("h1", Status::Critical), named("h2", Status::Critical)]);
        let (eps, chosen, panic) = endpoints_for(&s, &q(500, false));
        assert!(panic, "1 of 3 healthy: the critical names count");
        assert_eq!((eps.len(), chosen.len()), (1, 2));
        // Warning admitted: the warning weight.
        let s = with_named(vec![], vec![named("h1", Status::Warning), named("h2", Status::Passing)]);
        let (eps, chosen, panic) = endpoints_for(&s, &q(500, true));
        assert!(!panic && eps.is_empty());
        let w: Vec<u32> = chosen.iter().map(|n| n.weight).collect();
        assert_eq!(w, vec![2, 4]);
        // Only names in maintenance: an empty pool, not panic.
        let s = with_named(vec![], vec![named("m", Status::Maintenance)]);
        let (eps, chosen, panic) = endpoints_for(&s, &q(500, false));
        assert!(eps.is_empty() && chosen.is_empty() && !panic);
        let s = with_named(vec![], vec![named("a", Status::Critical), named("m", Status::Maintenance)]);
        let hosts: Vec<(&str, u16)> = named_hosts(&s).collect();
        assert_eq!(hosts, vec![("a.example", 8080)], "names not in maintenance are resolved, critical ones too");
    }

    #[test]
    fn state_entries_keep_host_name_instances() {
        let e = StateEntry { query: q(500, false), synced_unix: 1.0, instances: vec![inst("a", Status::Passing)], named: vec![named("h", Status::Warning)] };
        let text = serde_json::to_string(&e).unwrap();
        let back: StateEntry = serde_json::from_str(&text).unwrap();
        assert_eq!(back.named, e.named);
        // A file written before host names were kept reads as none.
        let old = text.replace(&format!(",\"named\":{}", serde_json::to_string(&e.named).unwrap()), "");
        assert!(!old.contains("named"), "{old}");
        let back: StateEntry = serde_json::from_str(&old).unwrap();
        assert!(back.named.is_empty() && back.instances.len() == 1);
    }

    #[test]
    fn deregistered_service_is_empty_not_panic() {
        let (eps, _, panic) = endpoints_for(&snap(vec![]), &q(500, false));
        assert!(eps.is_empty() && !panic);
    }
}
