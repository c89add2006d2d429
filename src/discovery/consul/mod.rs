//! Consul service discovery.
//!
//! One blocking watch per distinct routed query on `/v1/health/service/<name>`
//! (up to `max_watches`; queries beyond the budget poll without an index at a
//! modest rate, so the agent's 200-connections-per-client limit is never
//! approached). Each watch publishes the *whole* instance list, with every
//! instance's aggregated health, on its own `watch` channel; reconcile turns
//! it into backends ([`endpoints_for`], which also applies panic mode).
//!
//! Fail-static: a failed read never publishes, so the last good set keeps
//! serving. The last good sets are persisted to a state file (temp file +
//! rename) and loaded at start, so a restart during an outage still serves.

pub mod client;
pub mod health;
pub mod tags;
pub mod watch;

use crate::config::{ConsulQuery, ConsulSettings};
use crate::discovery::Endpoint;
use crate::metrics::Metrics;
use crate::status::{unix, StatusBoard};
use async_trait::async_trait;
use client::ConsulClient;
use health::{ConsulInstance, Status};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch as wch, Notify};

/// Poll interval of watches beyond the blocking budget.
pub const OVERFLOW_POLL: Duration = Duration::from_secs(5);

/// A whole instance list for one query, as last read.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSnapshot {
    pub instances: Arc<Vec<ConsulInstance>>,
    pub synced_at: SystemTime,
    /// Loaded from the state file at start, not (yet) confirmed by Consul.
    pub from_state_file: bool,
}

pub type SnapshotRx = wch::Receiver<Option<Arc<ServiceSnapshot>>>;

/// Turn an instance list into backends. Healthy instances are `passing` ones
/// (plus `warning` when admitted, weighted by `Weights.Warning`). When the
/// healthy share of the non-maintenance instances falls below the panic
/// threshold — or to zero — all non-maintenance instances are used instead
/// (panic mode). Returns the endpoints and whether panic mode is on.
pub fn endpoints_for(snap: &ServiceSnapshot, q: &ConsulQuery) -> (Vec<Endpoint>, bool) {
    let eligible: Vec<&ConsulInstance> = snap.instances.iter().filter(|i| i.status != Status::Maintenance).collect();
    if eligible.is_empty() {
        return (Vec::new(), false);
    }
    let healthy: Vec<(&ConsulInstance, u32)> = eligible
        .iter()
        .filter_map(|i| match i.status {
            Status::Passing => Some((*i, i.weight_passing)),
            Status::Warning if q.allow_warning => Some((*i, i.weight_warning)),
            _ => None,
        })
        .collect();
    let panic = healthy.is_empty() || (healthy.len() as u64) * 1000 < (q.panic_permille as u64) * (eligible.len() as u64);
    let chosen: Vec<(&ConsulInstance, u32)> = if panic {
        eligible.iter().map(|i| (*i, i.weight_passing.max(1))).collect()
    } else {
        healthy
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(chosen.len());
    for (i, w) in chosen {
        // Two registrations of one address: one backend.
        if seen.insert(i.addr) {
            out.push(Endpoint {
                addr: i.addr,
                weight: w,
                tags: i.tags.clone(),
                meta: i.meta.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.addr.cmp(&b.addr));
    (out, panic)
}

/// State shared between one watch task and the rest of the source.
pub struct WatchShared {
    pub query: ConsulQuery,
    pub name: String,
    label: String,
    tx: wch::Sender<Option<Arc<ServiceSnapshot>>>,
    last_sync: Mutex<Option<SystemTime>>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    persist: Arc<Notify>,
}

impl WatchShared {
    pub fn synced(&self, at: SystemTime) {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
        self.status.source_ok(&self.name, at);
        self.metrics.discovery_staleness.with_label_values(&[&self.label]).set(0.0);
    }

    pub fn last_sync(&self) -> Option<SystemTime> {
        *self.last_sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn publish(&self, snap: ServiceSnapshot) {
        let changed = self.tx.send_if_modified(|cur| match cur {
            Some(c) if c.instances == snap.instances && !c.from_state_file => false,
            _ => {
                *cur = Some(Arc::new(snap));
                true
            }
        });
        self.metrics.discovery_update(&self.name, if changed { "ok" } else { "unchanged" });
        if changed {
            self.persist.notify_one();
        }
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
        tracing::info!(service = %self.label, "consul index went backwards; re-reading without blocking");
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    saved_unix: f64,
    services: Vec<StateEntry>,
}

#[derive(Serialize, Deserialize)]
struct StateEntry {
    query: ConsulQuery,
    synced_unix: f64,
    instances: Vec<ConsulInstance>,
}

fn from_unix(s: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(s.max(0.0))
}

pub struct ConsulSource {
    client: Arc<ConsulClient>,
    watches: Vec<Arc<WatchShared>>,
    settings: ConsulSettings,
    metrics: Arc<Metrics>,
    persist: Arc<Notify>,
}

impl ConsulSource {
    /// Create the source; seed each query from the state file when it has it.
    pub fn new(
        settings: &ConsulSettings,
        queries: BTreeSet<ConsulQuery>,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
    ) -> Result<(ConsulSource, Vec<(ConsulQuery, SnapshotRx)>), String> {
        let client = Arc::new(ConsulClient::new(settings, metrics.clone())?);
        let saved = settings.state_file.as_ref().and_then(|p| match std::fs::read(p) {
            Ok(bytes) => match serde_json::from_slice::<StateFile>(&bytes) {
                Ok(s) if s.version == 1 => Some(s),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "ignoring unreadable consul state file");
                    None
                }
            },
            Err(_) => None,
        });
        let persist = Arc::new(Notify::new());
        let mut watches = Vec::new();
        let mut rxs = Vec::new();
        for q in queries {
            let seed = saved.as_ref().and_then(|s| s.services.iter().find(|e| e.query == q)).map(|e| {
                Arc::new(ServiceSnapshot {
                    instances: Arc::new(e.instances.clone()),
                    synced_at: from_unix(e.synced_unix),
                    from_state_file: true,
                })
            });
            let name = format!("consul:{}", q.label());
            status.register_source(&name, "consul", &q.label());
            let from_state = seed.is_some();
            let (tx, rx) = wch::channel(seed);
            if from_state {
                tracing::info!(service = %q.label(), "serving the persisted set until Consul answers");
            }
            watches.push(Arc::new(WatchShared {
                label: q.label(),
                name,
                query: q.clone(),
                tx,
                last_sync: Mutex::new(None),
                metrics: metrics.clone(),
                status: status.clone(),
                persist: persist.clone(),
            }));
            rxs.push((q, rx));
        }
        Ok((
            ConsulSource {
                client,
                watches,
                settings: settings.clone(),
                metrics,
                persist,
            },
            rxs,
        ))
    }

    fn save_state(&self) {
        let Some(path) = &self.settings.state_file else { return };
        let services: Vec<StateEntry> = self
            .watches
            .iter()
            .filter_map(|w| {
                let cur = w.tx.borrow().clone()?;
                Some(StateEntry {
                    query: w.query.clone(),
                    synced_unix: unix(cur.synced_at),
                    instances: cur.instances.as_ref().clone(),
                })
            })
            .collect();
        let state = StateFile {
            version: 1,
            saved_unix: unix(SystemTime::now()),
            services,
        };
        let result = (|| -> std::io::Result<()> {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            serde_json::to_writer(&mut tmp, &state)?;
            tmp.as_file().sync_all()?;
            tmp.persist(path).map_err(|e| e.error)?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the consul state file");
        }
    }

    fn state_file(&self) -> Option<&PathBuf> {
        self.settings.state_file.as_ref()
    }
}

#[async_trait]
impl BackgroundService for ConsulSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = Vec::new();
        for (i, w) in self.watches.iter().enumerate() {
            // The first `max_watches` queries block; the rest poll, staggered.
            let mode = if i < self.settings.max_watches {
                watch::Mode::Blocking
            } else {
                watch::Mode::Poll(OVERFLOW_POLL)
            };
            tasks.push(tokio::spawn(watch::run(
                w.query.clone(),
                self.client.clone(),
                w.clone(),
                mode,
                shutdown.clone(),
            )));
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let started = SystemTime::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.persist.notified() => {
                    if self.state_file().is_some() {
                        // Coalesce bursts: at most one write per second.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        self.save_state();
                    }
                }
                _ = tick.tick() => {
                    let now = SystemTime::now();
                    for w in &self.watches {
                        let since = w.last_sync()
                            .or_else(|| w.tx.borrow().as_ref().map(|s| s.synced_at))
                            .unwrap_or(started);
                        let age = now.duration_since(since).unwrap_or_default().as_secs_f64();
                        self.metrics.discovery_staleness.with_label_values(&[&w.label]).set(age);
                    }
                }
            }
        }
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
            synced_at: SystemTime::now(),
            from_state_file: false,
        }
    }

    #[test]
    fn healthy_only_above_threshold() {
        let s = snap(vec![inst("a", Status::Passing), inst("b", Status::Passing), inst("c", Status::Critical)]);
        let (eps, panic) = endpoints_for(&s, &q(500, false));
        assert!(!panic);
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|e| e.weight == 3));
    }

    #[test]
    fn panic_below_threshold_and_at_zero() {
        let s = snap(vec![inst("a", Status::Passing), inst("b", Status::Critical), inst("c", Status::Critical)]);
        let (eps, panic) = endpoints_for(&s, &q(500, false));
        assert!(panic, "1/3 healthy < 50 %");
        assert_eq!(eps.len(), 3);
        let s = snap(vec![inst("a", Status::Critical), inst("b", Status::Critical), inst("m", Status::Maintenance)]);
        let (eps, panic) = endpoints_for(&s, &q(0, false));
        assert!(panic, "zero healthy always panics, even with threshold 0");
        assert_eq!(eps.len(), 2, "maintenance stays out even in panic mode");
    }

    #[test]
    fn warning_admitted_with_warning_weight() {
        let s = snap(vec![inst("a", Status::Passing), inst("b", Status::Warning)]);
        let (eps, panic) = endpoints_for(&s, &q(500, true));
        assert!(!panic);
        let mut w: Vec<u32> = eps.iter().map(|e| e.weight).collect();
        w.sort();
        assert_eq!(w, vec![1, 3]);
        let (eps, _) = endpoints_for(&s, &q(500, false));
        assert_eq!(eps.len(), 1);
    }

    #[test]
    fn deregistered_service_is_empty_not_panic() {
        let (eps, panic) = endpoints_for(&snap(vec![]), &q(500, false));
        assert!(eps.is_empty() && !panic);
    }
}
