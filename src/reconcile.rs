//! The single writer of the routing snapshot.
//!
//! Reconcile waits on every source's watch channel (and on shutdown),
//! debounces bursts, calls the pure [`RoutingTable::build`] and publishes the
//! result. A build that fails leaves the last good table serving; the failure
//! is logged, counted and shown in `/status`.

use crate::config::{Config, ConsulQuery, DiscoverySpec};
use crate::discovery::consul::{endpoints_for, SnapshotRx};
use crate::discovery::file::Catalog;
use crate::discovery::Discovered;
use crate::metrics::Metrics;
use crate::routing::{RoutingTable, StateRegistry};
use crate::snapshot::Snapshot;
use crate::status::StatusBoard;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How long reconcile waits after a change for more changes to arrive.
pub const DEBOUNCE: Duration = Duration::from_millis(10);

/// One file catalog input.
pub struct FileInput {
    pub path: PathBuf,
    pub rx: watch::Receiver<Option<Arc<Catalog>>>,
}

/// One Consul query input.
pub struct ConsulInput {
    pub query: ConsulQuery,
    pub rx: SnapshotRx,
}

/// Everything reconcile reads.
#[derive(Default)]
pub struct Inputs {
    pub files: Vec<FileInput>,
    pub consul: Vec<ConsulInput>,
}

pub struct Reconciler {
    config: Arc<Config>,
    inputs: Inputs,
    states: Arc<StateRegistry>,
    snapshot: Arc<Snapshot>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    generation: AtomicU64,
    last_inputs: Mutex<Option<Discovered>>,
    panics: Mutex<std::collections::BTreeSet<String>>,
}

impl Reconciler {
    /// Build the first table from whatever the sources hold right now
    /// (file sources have already read their files once).
    pub fn new(
        config: Arc<Config>,
        inputs: Inputs,
        states: Arc<StateRegistry>,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
    ) -> Result<Self, crate::routing::BuildError> {
        let (discovered, panics) = discovered(&config, &inputs);
        let table = RoutingTable::build(&config, &discovered, &states, 1)?;
        states.retain(&table);
        table.export_gauges(&metrics);
        metrics.routing_swaps.inc();
        status.swapped(1, table.built_at);
        let r = Reconciler {
            config,
            inputs,
            states,
            snapshot: Arc::new(Snapshot::new(table)),
            metrics,
            status,
            generation: AtomicU64::new(1),
            last_inputs: Mutex::new(Some(discovered)),
            panics: Mutex::new(Default::default()),
        };
        r.note_panics(panics);
        Ok(r)
    }

    /// Export and log panic-mode transitions.
    fn note_panics(&self, now: std::collections::BTreeSet<String>) {
        let mut prev = self.panics.lock().unwrap_or_else(|e| e.into_inner());
        for c in now.difference(&prev) {
            tracing::warn!(cluster = %c, "panic mode on: too few healthy instances, routing over all registered instances");
        }
        for c in prev.difference(&now) {
            tracing::info!(cluster = %c, "panic mode off");
        }
        for (name, spec) in &self.config.clusters {
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

    /// Rebuild and publish if the inputs changed. Returns the new generation.
    pub fn reconcile(&self) -> Option<u64> {
        let (discovered, panics) = discovered(&self.config, &self.inputs);
        self.note_panics(panics);
        let mut last = self.last_inputs.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref() == Some(&discovered) {
            return None;
        }
        let generation = self.generation.load(Ordering::Relaxed) + 1;
        match RoutingTable::build(&self.config, &discovered, &self.states, generation) {
            Ok(table) => {
                *last = Some(discovered);
                self.generation.store(generation, Ordering::Relaxed);
                let table = self.snapshot.publish(table);
                self.states.retain(&table);
                table.export_gauges(&self.metrics);
                self.metrics.routing_swaps.inc();
                self.status.swapped(generation, table.built_at);
                tracing::info!(generation, "routing table published");
                Some(generation)
            }
            Err(e) => {
                self.metrics.routing_build_errors.inc();
                self.status.build_failed(e.to_string());
                tracing::error!(error = %e, "routing table build failed; previous table keeps serving");
                None
            }
        }
    }
}

/// Map each cluster to its current discovered set (absent = no result yet),
/// and name the clusters in panic mode.
fn discovered(config: &Config, inputs: &Inputs) -> (Discovered, std::collections::BTreeSet<String>) {
    let mut out = Discovered::new();
    let mut panics = std::collections::BTreeSet::new();
    for (name, spec) in &config.clusters {
        match &spec.discovery {
            DiscoverySpec::File { catalog, service } => {
                let Some(input) = inputs.files.iter().find(|f| &f.path == catalog) else { continue };
                let current = input.rx.borrow();
                if let Some(cat) = current.as_ref() {
                    // A valid catalog without this service means "no instances".
                    let set = cat.get(service).cloned().unwrap_or_default();
                    out.insert(name.clone(), set);
                }
            }
            DiscoverySpec::Consul(q) => {
                let Some(input) = inputs.consul.iter().find(|c| &c.query == q) else { continue };
                let current = input.rx.borrow();
                if let Some(snap) = current.as_ref() {
                    let (eps, panic) = endpoints_for(snap, q);
                    if panic {
                        panics.insert(name.clone());
                    }
                    out.insert(name.clone(), crate::discovery::normalise(eps));
                }
            }
            DiscoverySpec::Static(_) => {}
        }
    }
    (out, panics)
}

#[async_trait]
impl BackgroundService for Reconciler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let changed = Arc::new(Notify::new());
        let mut forwarders = Vec::new();
        for f in &self.inputs.files {
            let mut rx = f.rx.clone();
            let changed = changed.clone();
            forwarders.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    changed.notify_one();
                }
            }));
        }
        for c in &self.inputs.consul {
            let mut rx = c.rx.clone();
            let changed = changed.clone();
            forwarders.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    changed.notify_one();
                }
            }));
        }
        // Catch anything published between construction and now.
        self.reconcile();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = changed.notified() => {}
            }
            tokio::time::sleep(DEBOUNCE).await;
            self.reconcile();
        }
        for f in forwarders {
            f.abort();
        }
    }
}
