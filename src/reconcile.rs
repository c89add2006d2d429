//! The single writer of the routing snapshot.
//!
//! Reconcile waits on every source's watch channel (and on shutdown),
//! debounces bursts, calls the pure [`RoutingTable::build`] and publishes the
//! result. A build that fails leaves the last good table serving; the failure
//! is logged, counted and shown in `/status`.

use crate::config::{Config, DiscoverySpec};
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

pub struct Reconciler {
    config: Arc<Config>,
    files: Vec<FileInput>,
    states: Arc<StateRegistry>,
    snapshot: Arc<Snapshot>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    generation: AtomicU64,
    last_inputs: Mutex<Option<Discovered>>,
}

impl Reconciler {
    /// Build the first table from whatever the sources hold right now
    /// (file sources have already read their files once).
    pub fn new(
        config: Arc<Config>,
        files: Vec<FileInput>,
        states: Arc<StateRegistry>,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
    ) -> Result<Self, crate::routing::BuildError> {
        let discovered = discovered(&config, &files);
        let table = RoutingTable::build(&config, &discovered, &states, 1)?;
        states.retain(&table);
        table.export_gauges(&metrics);
        metrics.routing_swaps.inc();
        status.swapped(1, table.built_at);
        Ok(Reconciler {
            config,
            files,
            states,
            snapshot: Arc::new(Snapshot::new(table)),
            metrics,
            status,
            generation: AtomicU64::new(1),
            last_inputs: Mutex::new(Some(discovered)),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    /// Rebuild and publish if the inputs changed. Returns the new generation.
    pub fn reconcile(&self) -> Option<u64> {
        let discovered = discovered(&self.config, &self.files);
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

/// Map each cluster to its current discovered set (absent = no result yet).
fn discovered(config: &Config, files: &[FileInput]) -> Discovered {
    let mut out = Discovered::new();
    for (name, spec) in &config.clusters {
        if let DiscoverySpec::File { catalog, service } = &spec.discovery {
            let Some(input) = files.iter().find(|f| &f.path == catalog) else { continue };
            let current = input.rx.borrow();
            if let Some(cat) = current.as_ref() {
                // A valid catalog without this service means "no instances".
                let set = cat.get(service).cloned().unwrap_or_default();
                out.insert(name.clone(), set);
            }
        }
    }
    out
}

#[async_trait]
impl BackgroundService for Reconciler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let changed = Arc::new(Notify::new());
        let mut forwarders = Vec::new();
        for f in &self.files {
            let mut rx = f.rx.clone();
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
