//! The single writer of the routing snapshot.
//!
//! Reconcile waits on every source's watch channel (and on shutdown),
//! debounces bursts, calls the pure [`RoutingTable::build`] and publishes the
//! result. A build that fails leaves the last good table serving; the failure
//! is logged, counted and shown in `/status`.

use crate::config::{Config, DiscoverySpec};
use crate::discovery::consul::{endpoints_for, named_hosts, ConsulView, ViewRx};
use crate::discovery::file::{Catalog, FileSource};
use crate::discovery::dns::DnsSource;
use crate::discovery::{Discovered, EndpointSet, NamedInstance};
use crate::health::{HealthChecker, HealthView};
use crate::live::{LiveConfig, ACTIVATE_WITHIN};
use crate::metrics::Metrics;
use crate::routing::{RoutingTable, StateRegistry};
use crate::snapshot::Snapshot;
use crate::status::StatusBoard;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// How long reconcile waits after a change for more changes to arrive.
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// One file catalog source, started and stopped by reconcile as the config
/// (reloads included) names catalog files.
struct FileInput {
    path: PathBuf,
    rx: watch::Receiver<Option<Arc<Catalog>>>,
    src: Arc<FileSource>,
    /// The source's task and the forwarder of its changes, once started.
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FileInput {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One DNS source, started and stopped like a [`FileInput`] as the config
/// names DNS queries.
struct DnsInput {
    query: crate::config::DnsQuery,
    rx: watch::Receiver<Option<EndpointSet>>,
    src: Arc<DnsSource>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DnsInput {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a table was built from; an identical set of inputs is not rebuilt.
struct Built {
    config: Arc<Config>,
    discovered: Discovered,
    health: Arc<HealthView>,
    auto: Vec<(crate::config::RouteSpec, crate::config::ClusterSpec)>,
}

impl PartialEq for Built {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
            && self.discovered == other.discovered
            && (Arc::ptr_eq(&self.health, &other.health) || self.health == other.health)
            && self.auto == other.auto
    }
}

pub struct Reconciler {
    live: Arc<LiveConfig>,
    consul: Option<ViewRx>,
    files: Mutex<Vec<FileInput>>,
    dns: Mutex<Vec<DnsInput>>,
    /// Woken by every input: sources, the live config, health checks.
    changed: Arc<Notify>,
    /// Active health checks: probes the checked clusters' backends.
    health: HealthChecker,
    states: Arc<StateRegistry>,
    snapshot: Arc<Snapshot>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    generation: AtomicU64,
    last_inputs: Mutex<Option<Built>>,
    panics: Mutex<std::collections::BTreeSet<String>>,
    memo: Mutex<Memo>,
    /// The config state (active serial, candidate serial) the file sources
    /// were last synced to.
    files_for: Mutex<Option<(u64, Option<u64>)>>,
}

/// Per cluster: the Consul snapshot last turned into backends, and the result
/// (the instances by IP, those by host name that serve, panic mode), so an
/// unchanged snapshot costs a pointer comparison, not a conversion.
type Memo = std::collections::HashMap<String, (Arc<crate::discovery::consul::ServiceSnapshot>, EndpointSet, Arc<Vec<NamedInstance>>, bool)>;

impl Reconciler {
    /// Build the first table from whatever the sources hold right now (file
    /// sources read their files once here).
    pub fn new(
        live: Arc<LiveConfig>,
        consul: Option<ViewRx>,
        states: Arc<StateRegistry>,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
    ) -> Result<Self, crate::routing::BuildError> {
        let config = live.active();
        let mut files = Vec::new();
        for path in config.catalog_paths() {
            files.push(open_file(path, &metrics, &status));
        }
        let view = consul.as_ref().map(|rx| rx.borrow().clone());
        let eff = effective(&config, view.as_deref());
        let mut memo = Memo::new();
        let dns: Vec<DnsInput> = config.dns_queries().into_iter().map(|q| open_dns(q, &metrics, &status)).collect();
        let (discovered, panics) = discovered(&eff, &files, &dns, view.as_deref(), &mut memo);
        let table = RoutingTable::build(&eff, &discovered, &states, 1)?;
        let health = HealthChecker::new(metrics.clone());
        let built = Built { config: config.clone(), discovered, health: health.view(), auto: auto_of(view.as_deref()) };
        drop(eff);
        table.export_gauges(&metrics, None);
        metrics.routing_swaps.inc();
        status.swapped(1, table.built_at);
        let r = Reconciler {
            live,
            consul,
            files: Mutex::new(files),
            dns: Mutex::new(dns),
            changed: Arc::new(Notify::new()),
            health,
            states,
            snapshot: Arc::new(Snapshot::new(table)),
            metrics,
            status,
            generation: AtomicU64::new(1),
            last_inputs: Mutex::new(Some(built)),
            panics: Mutex::new(Default::default()),
            memo: Mutex::new(memo),
            files_for: Mutex::new(None),
        };
        r.note_panics(&config, panics);
        Ok(r)
    }

    /// Export and log panic-mode transitions.
    fn note_panics(&self, config: &Config, now: std::collections::BTreeSet<String>) {
        let mut prev = self.panics.lock().unwrap_or_else(|e| e.into_inner());
        for c in now.difference(&prev) {
            tracing::warn!(cluster = %c, "panic mode on: too few healthy instances, routing over all registered instances");
        }
        for c in prev.difference(&now) {
            tracing::info!(cluster = %c, "panic mode off");
        }
        for name in prev.union(&now) {
            self.metrics.panic_mode.with_label_values(&[name]).set(now.contains(name) as i64);
        }
        for (name, spec) in &config.clusters {
            if matches!(spec.discovery, DiscoverySpec::Consul(_)) {
                self.metrics.panic_mode.with_label_values(&[name]).set(now.contains(name) as i64);
            }
        }
        self.status.set_panics(now.iter().cloned().collect());
        *prev = now;
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    /// Start file sources for every catalog the active or the candidate
    /// config names, and stop those neither names any more.
    /// Only when the config state changed since the last call: every
    /// other input leaves the set of catalog files as it is.
    fn sync_files(&self, shutdown: &ShutdownWatch) {
        let state = self.live.state();
        let version = (state.serial, state.candidate.as_ref().map(|c| c.serial));
        if self.files_for.lock().unwrap_or_else(|e| e.into_inner()).replace(version) == Some(version) {
            return;
        }
        let wanted: std::collections::BTreeSet<PathBuf> = state.wanted().flat_map(|c| c.catalog_paths()).collect();
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.retain(|f| wanted.contains(&f.path));
        for path in wanted {
            if !files.iter().any(|f| f.path == path) {
                tracing::info!(path = %path.display(), "config reload: new catalog file");
                files.push(open_file(path, &self.metrics, &self.status));
            }
        }
        for f in files.iter_mut().filter(|f| f.tasks.is_empty()) {
            let (src, sh) = (f.src.clone(), shutdown.clone());
            f.tasks.push(tokio::spawn(async move { src.start(sh).await }));
            f.tasks.push(forward_changes(f.rx.clone(), self.changed.clone()));
        }
    }

    /// Start DNS sources for every query the active or the candidate config
    /// makes (dns clusters, host names in static lists), for the host names
    /// in the catalog files they read and for those of the Consul instances
    /// watched; stop the others. Run on every input change, since a catalog
    /// edit or a Consul answer may name new hosts.
    fn sync_dns(&self, shutdown: &ShutdownWatch) {
        let state = self.live.state();
        let mut wanted: std::collections::BTreeSet<crate::config::DnsQuery> = state.wanted().flat_map(|c| c.dns_queries()).collect();
        {
            let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            for c in state.wanted() {
                wanted.extend(catalog_queries(c, &files));
            }
        }
        if let Some(rx) = &self.consul {
            let view = rx.borrow().clone();
            for c in state.wanted() {
                wanted.extend(consul_queries(c, &view));
            }
        }
        let mut dns = self.dns.lock().unwrap_or_else(|e| e.into_inner());
        if dns.len() == wanted.len() && dns.iter().all(|d| wanted.contains(&d.query) && !d.tasks.is_empty()) {
            return;
        }
        dns.retain(|d| wanted.contains(&d.query));
        for q in wanted {
            if !dns.iter().any(|d| d.query == q) {
                tracing::info!(source = %q.source_name(), "new DNS source");
                dns.push(open_dns(q, &self.metrics, &self.status));
            }
        }
        for d in dns.iter_mut().filter(|d| d.tasks.is_empty()) {
            let (src, sh) = (d.src.clone(), shutdown.clone());
            d.tasks.push(tokio::spawn(async move { src.start(sh).await }));
            d.tasks.push(forward_changes(d.rx.clone(), self.changed.clone()));
        }
    }

    /// The config to build from: the active one, or the candidate of a
    /// reload once each of its clusters whose source is new has a first
    /// result (or [`ACTIVATE_WITHIN`] has passed).
    /// With the candidate comes its serial and the clusters still without a
    /// result, for [`LiveConfig::promote`] once its table is published.
    fn pick_config(&self, view: Option<&ConsulView>) -> (Arc<Config>, Option<(u64, Vec<String>)>) {
        let state = self.live.state();
        let Some(cand) = &state.candidate else { return (state.active, None) };
        let missing: Vec<String> = {
            let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            let dns = self.dns.lock().unwrap_or_else(|e| e.into_inner());
            cand.config
                .clusters
                .iter()
                .filter(|(name, spec)| state.active.clusters.get(*name).map(|o| &o.discovery) != Some(&spec.discovery))
                .filter(|(_, spec)| match &spec.discovery {
                    DiscoverySpec::Static(_) => false,
                    DiscoverySpec::File { catalog, .. } => {
                        !files.iter().any(|f| &f.path == catalog && f.rx.borrow().is_some())
                    }
                    DiscoverySpec::Consul(q) => !view.is_some_and(|v| v.services.contains_key(q)),
                    DiscoverySpec::Dns(q) => !dns.iter().any(|d| &d.query == q && d.rx.borrow().is_some()),
                    DiscoverySpec::StaticNames { names, .. } => {
                        !names.iter().all(|q| dns.iter().any(|d| &d.query == q && d.rx.borrow().is_some()))
                    }
                })
                .map(|(name, _)| name.clone())
                .collect()
        };
        if !missing.is_empty() && cand.since.elapsed() < ACTIVATE_WITHIN {
            return (state.active, None);
        }
        if !missing.is_empty() {
            tracing::warn!(serial = cand.serial, clusters = ?missing, waited = ?ACTIVATE_WITHIN, "config reload: serving the new config although these clusters have no first discovery result yet");
        }
        (cand.config.clone(), Some((cand.serial, missing)))
    }

    /// Rebuild and publish if the inputs changed. Returns the new generation.
    pub fn reconcile(&self) -> Option<u64> {
        let started = std::time::Instant::now();
        let view = self.consul.as_ref().map(|rx| rx.borrow().clone());
        let (config, promotion) = self.pick_config(view.as_deref());
        let eff = effective(&config, view.as_deref());
        let (discovered, panics) = {
            let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
            let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
            let dns = self.dns.lock().unwrap_or_else(|e| e.into_inner());
            discovered(&eff, &files, &dns, view.as_deref(), &mut memo)
        };
        self.note_panics(&config, panics);
        // Probes follow the backends discovered (a runtime is needed to
        // start them: the service loop has one).
        if tokio::runtime::Handle::try_current().is_ok() {
            self.health.sync(&eff, &discovered);
        }
        let built = Built { config: config.clone(), discovered, health: self.health.view(), auto: auto_of(view.as_deref()) };
        let mut last = self.last_inputs.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&built) {
            return None;
        }
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        let prev = self.snapshot.load();
        match RoutingTable::build_from(Some(&prev), &eff, &built.discovered, &built.health, &self.states, generation) {
            Ok(table) => {
                *last = Some(built);
                self.generation.store(generation, Ordering::Relaxed);
                let table = self.snapshot.publish(table);
                self.states.retain_changed(&prev, &table);
                table.export_gauges(&self.metrics, Some(&prev));
                note_failopen(&prev, &table);
                self.metrics.routing_swaps.inc();
                self.status.swapped(generation, table.built_at);
                let took = started.elapsed();
                self.metrics.routing_build.observe(took.as_secs_f64());
                tracing::info!(generation, took_us = took.as_micros() as u64, "routing table published");
                if let Some((serial, missing)) = promotion {
                    tracing::info!(serial, generation, "config reload: the new config serves");
                    self.live.promote(serial, missing);
                }
                Some(generation)
            }
            Err(e) => {
                self.metrics.routing_build_errors.inc();
                self.status.build_failed(e.to_string());
                tracing::error!(error = %e, "routing table build failed; previous table keeps serving");
                if let Some((serial, _)) = promotion {
                    self.live.abandon(serial, e.to_string());
                }
                None
            }
        }
    }
}

fn auto_of(view: Option<&ConsulView>) -> Vec<(crate::config::RouteSpec, crate::config::ClusterSpec)> {
    view.map(|v| v.auto.values().cloned().collect()).unwrap_or_default()
}

/// The config plus the auto routes from Consul tags whose service has had a
/// first read (so a new auto route never makes `/readyz` flap). Config-file
/// clusters and routes come first and win any conflict.
fn effective<'a>(config: &'a Config, view: Option<&ConsulView>) -> Cow<'a, Config> {
    let Some(view) = view.filter(|v| !v.auto.is_empty()) else { return Cow::Borrowed(config) };
    let mut c = config.clone();
    for (route, cluster) in view.auto.values() {
        let DiscoverySpec::Consul(q) = &cluster.discovery else { continue };
        if c.clusters.contains_key(&cluster.name) || !view.services.contains_key(q) {
            continue;
        }
        c.clusters.insert(cluster.name.clone(), cluster.clone());
        c.routes.push(route.clone());
    }
    Cow::Owned(c)
}

/// Map each cluster to its current discovered set (absent = no result yet),
/// and name the clusters in panic mode.
fn discovered(
    config: &Config,
    files: &[FileInput],
    dns: &[DnsInput],
    view: Option<&ConsulView>,
    memo: &mut Memo,
) -> (Discovered, std::collections::BTreeSet<String>) {
    let mut out = Discovered::new();
    let mut panics = std::collections::BTreeSet::new();
    for (name, spec) in &config.clusters {
        match &spec.discovery {
            DiscoverySpec::File { catalog, service } => {
                let Some(input) = files.iter().find(|f| &f.path == catalog) else { continue };
                let current = input.rx.borrow();
                if let Some(cat) = current.as_ref() {
                    // A valid catalog without this service means "no instances".
                    let set = cat.get(service).cloned().unwrap_or_default();
                    let set = match cat.named.get(service) {
                        None => set,
                        Some(named) => with_named(set, named, &config.dns, dns),
                    };
                    out.insert(name.clone(), set);
                }
            }
            DiscoverySpec::Consul(q) => {
                if let Some(snap) = view.and_then(|v| v.services.get(q)) {
                    let (set, named, panic) = match memo.get(name) {
                        Some((s, set, named, panic)) if Arc::ptr_eq(s, snap) => (set.clone(), named.clone(), *panic),
                        _ => {
                            let (eps, named, panic) = endpoints_for(snap, q);
                            let (set, named) = (crate::discovery::normalise(eps), Arc::new(named));
                            memo.insert(name.clone(), (snap.clone(), set.clone(), named.clone(), panic));
                            (set, named, panic)
                        }
                    };
                    if panic {
                        panics.insert(name.clone());
                    }
                    // Instances by host name add the addresses their names
                    // have now (none before the first answer).
                    let set = if named.is_empty() { set } else { with_named(set, &named, &config.dns, dns) };
                    out.insert(name.clone(), set);
                }
            }
            DiscoverySpec::Dns(q) => {
                let Some(input) = dns.iter().find(|d| &d.query == q) else { continue };
                if let Some(set) = input.rx.borrow().as_ref() {
                    out.insert(name.clone(), set.clone());
                }
            }
            DiscoverySpec::StaticNames { addrs, names } => {
                // Pending until every name has had an answer; then the
                // addresses given as IPs and every name's addresses.
                let mut all: std::collections::BTreeMap<std::net::SocketAddr, crate::discovery::Endpoint> =
                    addrs.iter().map(|&a| (a, crate::discovery::Endpoint::new(a))).collect();
                let mut complete = true;
                for q in names {
                    match dns.iter().find(|d| &d.query == q).and_then(|d| d.rx.borrow().clone()) {
                        Some(set) => all.extend(set.iter().map(|e| (e.addr, e.clone()))),
                        None => complete = false,
                    }
                }
                if complete {
                    out.insert(name.clone(), crate::discovery::normalise(all.into_values().collect()));
                }
            }
            DiscoverySpec::Static(_) => {}
        }
    }
    (out, panics)
}

/// The DNS queries for the host names in the catalogs `config` reads.
fn catalog_queries(config: &Config, files: &[FileInput]) -> Vec<crate::config::DnsQuery> {
    let mut out = Vec::new();
    for spec in config.clusters.values() {
        let DiscoverySpec::File { catalog, service } = &spec.discovery else { continue };
        let Some(input) = files.iter().find(|f| &f.path == catalog) else { continue };
        if let Some(named) = input.rx.borrow().as_ref().and_then(|c| c.named.get(service)) {
            out.extend(named.iter().map(|n| config.dns.query(&n.host, n.port)));
        }
    }
    out
}

/// The DNS queries for the host names of the Consul instances watched (those
/// of the config's Consul clusters and of tag-driven routes alike), with
/// `config`'s `[dns]` settings.
fn consul_queries(config: &Config, view: &ConsulView) -> Vec<crate::config::DnsQuery> {
    view.services.values().flat_map(|snap| named_hosts(snap)).map(|(host, port)| config.dns.query(host, port)).collect()
}

/// A set plus the current addresses of its host-name instances (from a
/// catalog file or Consul), each with the instance's weight, tags, meta and
/// ID (a name not answered yet adds nothing; an address already in the set
/// keeps its entry).
fn with_named(
    set: EndpointSet,
    named: &[NamedInstance],
    settings: &crate::config::DnsSettings,
    dns: &[DnsInput],
) -> EndpointSet {
    let mut all: std::collections::BTreeMap<std::net::SocketAddr, crate::discovery::Endpoint> =
        set.iter().map(|e| (e.addr, e.clone())).collect();
    for n in named {
        let q = settings.query(&n.host, n.port);
        let Some(resolved) = dns.iter().find(|d| d.query == q).and_then(|d| d.rx.borrow().clone()) else { continue };
        for e in resolved.iter() {
            all.entry(e.addr).or_insert_with(|| crate::discovery::Endpoint {
                weight: n.weight,
                tags: n.tags.clone(),
                meta: n.meta.clone(),
                id: n.id.clone(),
                ..crate::discovery::Endpoint::new(e.addr)
            });
        }
    }
    crate::discovery::normalise(all.into_values().collect())
}

/// Log each cluster whose active health checks start or stop failing open
/// (all its backends failing; awaiting the first checks is not alarming).
fn note_failopen(prev: &RoutingTable, table: &RoutingTable) {
    let alarm = |c: &crate::routing::Cluster| {
        c.health_failopen && c.backends.iter().any(|b| b.health == crate::routing::BackendHealth::Failing)
    };
    for c in &table.clusters {
        let before = prev.cluster(&c.name).is_some_and(|p| alarm(p));
        if alarm(c) && !before {
            tracing::warn!(cluster = %c.name, backends = c.backends.len(), "no backend passes its health check: serving all of them (fail open)");
        } else if before && !alarm(c) {
            tracing::info!(cluster = %c.name, "health checks: a backend passes again, fail open over");
        }
    }
}

/// A task that wakes reconcile on every change a source publishes.
fn forward_changes<T: Send + Sync + 'static>(mut rx: watch::Receiver<T>, changed: Arc<Notify>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            changed.notify_one();
        }
    })
}

/// Create a DNS source (its first lookup runs once it is started).
fn open_dns(q: crate::config::DnsQuery, metrics: &Arc<Metrics>, status: &Arc<StatusBoard>) -> DnsInput {
    let (src, rx) = DnsSource::new(q.clone(), metrics.clone(), status.clone());
    DnsInput { query: q, rx, src: Arc::new(src), tasks: Vec::new() }
}

/// Open a catalog file source (it reads the file once, now).
fn open_file(path: PathBuf, metrics: &Arc<Metrics>, status: &Arc<StatusBoard>) -> FileInput {
    let (src, rx) = FileSource::new(path.clone(), metrics.clone(), status.clone());
    FileInput { path, rx, src: Arc::new(src), tasks: Vec::new() }
}

#[async_trait]
impl BackgroundService for Reconciler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut forwarders = Vec::new();
        if let Some(rx) = &self.consul {
            forwarders.push(forward_changes(rx.clone(), self.changed.clone()));
        }
        forwarders.push(forward_changes(self.live.subscribe(), self.changed.clone()));
        forwarders.push(forward_changes(self.health.subscribe(), self.changed.clone()));
        self.sync_files(&shutdown);
        self.sync_dns(&shutdown);
        // Catch anything published between construction and now.
        self.reconcile();
        loop {
            // A reload waiting for its new sources is looked at again
            // without an input change, so it times out.
            let waiting = self.live.state().candidate.is_some();
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if waiting => {}
            }
            tokio::time::sleep(DEBOUNCE).await;
            self.sync_files(&shutdown);
            self.sync_dns(&shutdown);
            self.reconcile();
        }
        for f in forwarders {
            f.abort();
        }
        self.files.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.dns.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.health.stop();
    }
}
