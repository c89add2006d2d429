//! The live config file: re-read on SIGHUP and on `POST /reload`
//! (`switchyard reload`).
//!
//! A reload validates the whole file with the same validator as `check` and
//! `run`. An invalid file is refused: every error is logged and shown in
//! `/status`, and the running config stays. A valid one becomes the
//! *candidate*: the sources it needs (new Consul queries, new catalog files)
//! start at once, and reconcile switches the routing table to it in one swap
//! once every new source has had a first result (or after
//! [`ACTIVATE_WITHIN`], so a source that never answers cannot hold the
//! reload back for ever). The old sources keep feeding the running table
//! until then, so a changed cluster never serves an empty set in between.
//!
//! Routes and clusters (with their discovery) change live. Everything else
//! (listeners, `[server]`, `[admin]`, `[access_log]`, `[consul]`, `[ha]`)
//! belongs to sockets, threads and tasks that exist once per process: a
//! change there is reported as "needs a restart or upgrade" and ignored, the
//! running value is kept, and the rest of the file applies.

use crate::config::{Config, DiscoverySpec};
use crate::discovery::consul::kv::KvSet;
use crate::kvconfig::{FileDoc, KvError};
use crate::metrics::Metrics;
use crate::status::unix;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;

/// How long a reloaded config waits for the first results of its new
/// sources before it serves anyway (its clusters without a result are then
/// pending, as at start).
pub const ACTIVATE_WITHIN: Duration = Duration::from_secs(10);

/// A reloaded config that does not serve yet.
#[derive(Clone)]
pub struct Candidate {
    pub config: Arc<Config>,
    pub serial: u64,
    pub since: Instant,
}

/// What reconcile builds from, and what the sources must feed.
#[derive(Clone)]
pub struct ConfigState {
    /// The config the routing table is built from.
    pub active: Arc<Config>,
    /// Reload serial of `active` (0: the config the process started with).
    pub serial: u64,
    pub candidate: Option<Candidate>,
}

impl ConfigState {
    /// The active config and the candidate, if any: what sources must feed.
    pub fn wanted(&self) -> impl Iterator<Item = &Config> {
        std::iter::once(&*self.active).chain(self.candidate.as_ref().map(|c| &*c.config))
    }
}

pub type ConfigRx = watch::Receiver<ConfigState>;

/// The outcome of one reload, as logged, shown in `/status` and answered by
/// `POST /reload`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Outcome {
    /// `applied`, `unchanged` or `refused`.
    pub result: &'static str,
    /// Reload serial of the accepted config (applied only).
    pub serial: Option<u64>,
    pub errors: Vec<String>,
    /// Settings that differ from the running ones and were ignored.
    pub needs_restart: Vec<String>,
    /// What changed: `route api added`, `cluster web changed`, ...
    pub changes: Vec<String>,
    /// Whether the accepted config serves already (it may wait for the
    /// first results of its new sources).
    pub active: bool,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ReloadStatus {
    /// The file that is re-read (None: this process has no config file).
    pub path: Option<String>,
    /// Reload serial of the config that serves.
    pub active_serial: u64,
    /// A reloaded config waiting for its new sources' first results.
    pub pending_serial: Option<u64>,
    pub reloads: u64,
    pub last_reload_unix: Option<f64>,
    pub last_trigger: Option<String>,
    pub last: Option<Outcome>,
    /// Clusters that had no first result when their config was switched to
    /// after waiting [`ACTIVATE_WITHIN`].
    pub activated_without_result: Vec<String>,
    /// KV settings (None: off): keys seen, keys applied, whether they come
    /// from the state file (Consul not read since start).
    pub kv: Option<KvStatus>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct KvStatus {
    pub prefix: String,
    pub keys: usize,
    pub applied: usize,
    pub from_state_file: bool,
    pub last_change_unix: Option<f64>,
    /// What the last KV change changed: `cluster web changed`, ...
    pub last_changes: Vec<String>,
    /// Keys rejected, with the start of their value and the reason.
    pub errors: Vec<KvError>,
}

pub struct LiveConfig {
    path: Option<PathBuf>,
    tx: watch::Sender<ConfigState>,
    /// `consul.kv_prefix` is set: KV settings are merged over the file.
    kv_enabled: bool,
    file: Mutex<Option<FileDoc>>,
    /// The last good KV settings (None: none read yet).
    kv: Mutex<Option<Arc<KvSet>>>,
    /// Whether the Consul source runs in this process: a reload cannot start it.
    consul_running: bool,
    metrics: Arc<Metrics>,
    status: Mutex<ReloadStatus>,
    /// One reload at a time; holds the last serial handed out.
    serial: Mutex<u64>,
    /// TLS listeners' certificates, re-read on every reload.
    tls: Mutex<Vec<Arc<crate::tls::ListenerCerts>>>,
}

impl LiveConfig {
    pub fn new(config: Arc<Config>, path: Option<PathBuf>, consul_running: bool, metrics: Arc<Metrics>) -> Arc<Self> {
        let prefix = config.consul.as_ref().and_then(|c| c.kv_prefix.clone());
        let file = path.as_ref().and_then(|p| match FileDoc::load(p) {
            Ok((file, _)) => Some(file),
            Err(errors) => {
                tracing::warn!(path = %p.display(), errors = %errors, "cannot re-read the config file; KV settings cannot be merged until a reload succeeds");
                None
            }
        });
        let (tx, _) = watch::channel(ConfigState {
            active: config,
            serial: 0,
            candidate: None,
        });
        let status = ReloadStatus {
            path: path.as_ref().map(|p| p.display().to_string()),
            kv: prefix.clone().map(|prefix| KvStatus { prefix, ..Default::default() }),
            ..Default::default()
        };
        Arc::new(LiveConfig {
            path,
            tx,
            kv_enabled: prefix.is_some(),
            file: Mutex::new(file),
            kv: Mutex::new(None),
            consul_running,
            metrics,
            status: Mutex::new(status),
            serial: Mutex::new(0),
            tls: Mutex::new(Vec::new()),
        })
    }

    pub fn set_tls(&self, certs: Vec<Arc<crate::tls::ListenerCerts>>) {
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = certs;
    }

    pub fn tls_status(&self) -> Vec<crate::tls::ListenerTlsStatus> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|c| c.status()).collect()
    }

    pub fn subscribe(&self) -> ConfigRx {
        self.tx.subscribe()
    }

    pub fn state(&self) -> ConfigState {
        self.tx.borrow().clone()
    }

    /// The config the routing table is built from.
    pub fn active(&self) -> Arc<Config> {
        self.tx.borrow().active.clone()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-read and validate the file; on success make it the candidate.
    /// `trigger` names who asked (`SIGHUP`, `admin`) for the log and `/status`.
    pub fn reload(&self, trigger: &str) -> Outcome {
        // Certificates first: they reload even when the file is refused.
        let tls = self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for certs in tls {
            certs.reload(true);
        }
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = match &self.path {
            None => refused(vec!["this instance was not started from a config file; there is nothing to re-read".into()]),
            Some(path) => match FileDoc::load(path) {
                Err(errors) => refused(errors.0.iter().map(|e| e.to_string()).collect()),
                Ok((file, file_config)) => {
                    match self.merged(&file, file_config) {
                        Err(errors) => refused(errors),
                        Ok(new) => {
                            let o = self.accept(new, &mut serial);
                            if o.result != "refused" {
                                *self.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
                            }
                            o
                        }
                    }
                }
            },
        };
        self.record(trigger, outcome)
    }

    /// The file's config with the current KV settings merged over it
    /// (rejected keys recorded), or the file's alone without KV.
    fn merged(&self, file: &FileDoc, file_config: Config) -> Result<Config, Vec<String>> {
        let kv = self.kv.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(kv) = kv.filter(|_| self.kv_enabled) else { return Ok(file_config) };
        let merged = file.merge(&kv.entries).map_err(|errs| errs.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        self.note_kv(&kv, &merged);
        Ok(merged.config)
    }

    /// Record what the KV merge kept and rejected: status, metric, a log
    /// line per key newly rejected (or rejected for a new reason).
    fn note_kv(&self, kv: &KvSet, merged: &crate::kvconfig::Merged) {
        self.metrics.kv_rejected_keys.set(merged.errors.len() as i64);
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let Some(k) = st.kv.as_mut() else { return };
        for e in &merged.errors {
            if !k.errors.contains(e) {
                tracing::warn!(key = %format!("{}{}", k.prefix, e.key), value = %e.value, error = %e.message, "consul KV key rejected; the other keys apply");
            }
        }
        k.keys = kv.entries.len();
        k.applied = merged.applied;
        k.from_state_file = kv.from_state_file;
        k.errors = merged.errors.clone();
    }

    /// New KV settings from the watch: merge them over the file and make the
    /// result the candidate, like a reload.
    pub fn apply_kv(&self, kv: Arc<KvSet>) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = Some(kv.clone());
        if let Some(k) = self.status.lock().unwrap_or_else(|e| e.into_inner()).kv.as_mut() {
            k.last_change_unix = Some(unix(SystemTime::now()));
        }
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = file.as_ref() else { return };
        let merged = match file.merge(&kv.entries) {
            Ok(m) => m,
            Err(errs) => {
                // Cannot happen while the file's document is valid on its own.
                for e in &errs {
                    tracing::error!(error = %e, "consul KV settings do not merge; the running config stays");
                }
                return;
            }
        };
        self.note_kv(&kv, &merged);
        let outcome = self.accept(merged.config, &mut serial);
        drop(serial);
        if outcome.result == "applied" {
            self.record("kv", outcome);
        }
    }

    /// At start, before the first table: the persisted KV settings serve
    /// at once (no candidate to wait for).
    pub fn start_with_kv(&self, kv: Arc<KvSet>) {
        *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = Some(kv.clone());
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = file.as_ref() else { return };
        if let Ok(merged) = file.merge(&kv.entries) {
            self.note_kv(&kv, &merged);
            self.tx.send_modify(|s| s.active = Arc::new(live_parts(&s.active, merged.config)));
        }
    }

    /// KV settings are on and none have been read (or loaded) yet.
    pub fn kv_pending(&self) -> bool {
        self.kv_enabled && self.kv.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }

    fn record(&self, trigger: &str, outcome: Outcome) -> Outcome {
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if trigger == "kv" {
            tracing::info!(serial = outcome.serial, changes = ?outcome.changes, "consul KV settings applied");
            if let Some(k) = st.kv.as_mut() {
                k.last_changes = outcome.changes.clone();
            }
            if outcome.result == "applied" {
                st.pending_serial = outcome.serial.filter(|_| !outcome.active);
            }
            return outcome;
        }
        self.metrics.config_reloads.with_label_values(&[outcome.result]).inc();
        let path = self.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        match outcome.result {
            "refused" => {
                for e in &outcome.errors {
                    tracing::error!(trigger, path = %path, error = %e, "config reload refused; the running config keeps serving");
                }
            }
            result => {
                self.metrics.config_last_reload_success.set(unix(SystemTime::now()));
                self.metrics.config_restart_pending.set(outcome.needs_restart.len() as i64);
                tracing::info!(trigger, path = %path, result, serial = outcome.serial, changes = ?outcome.changes, "config reloaded");
                for field in &outcome.needs_restart {
                    tracing::warn!(trigger, field = %field, "config reload: this setting changed but applies only after a restart or `switchyard upgrade`; the running value is kept");
                }
            }
        }
        st.reloads += 1;
        st.last_reload_unix = Some(unix(SystemTime::now()));
        st.last_trigger = Some(trigger.to_string());
        st.last = Some(outcome.clone());
        if outcome.result == "applied" {
            st.pending_serial = outcome.serial.filter(|_| !outcome.active);
        }
        outcome
    }

    fn accept(&self, new: Config, serial: &mut u64) -> Outcome {
        let state = self.state();
        let running = &state.active;
        let needs_restart = fixed_changes(running, &new);
        let new = live_parts(running, new);
        if !self.consul_running {
            let errors: Vec<String> = new
                .clusters
                .iter()
                .filter(|(_, c)| matches!(c.discovery, DiscoverySpec::Consul(_)))
                .map(|(name, _)| {
                    format!(
                        "clusters.{name}.consul: this process started without Consul discovery (no Consul cluster or auto route); a reload cannot start it, restart or `switchyard upgrade` instead"
                    )
                })
                .collect();
            if !errors.is_empty() {
                return refused(errors);
            }
        }
        let latest = state.candidate.as_ref().map(|c| &c.config).unwrap_or(running);
        let mut outcome = Outcome {
            needs_restart,
            changes: changes(latest, &new),
            ..Default::default()
        };
        if **latest == new {
            outcome.result = "unchanged";
            outcome.active = state.candidate.is_none();
            return outcome;
        }
        *serial += 1;
        outcome.result = "applied";
        outcome.serial = Some(*serial);
        let candidate = Candidate {
            config: Arc::new(new),
            serial: *serial,
            since: Instant::now(),
        };
        self.tx.send_modify(|s| s.candidate = Some(candidate));
        // Reconcile may have switched already.
        outcome.active = self.tx.borrow().serial >= *serial;
        outcome
    }

    /// Reconcile: the candidate `serial` serves now.
    pub fn promote(&self, serial: u64, without_result: Vec<String>) {
        let mut promoted = false;
        self.tx.send_if_modified(|s| match &s.candidate {
            Some(c) if c.serial == serial => {
                s.active = c.config.clone();
                s.serial = serial;
                s.candidate = None;
                promoted = true;
                true
            }
            _ => false,
        });
        if promoted {
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            st.active_serial = serial;
            if st.pending_serial.is_some_and(|p| p <= serial) {
                st.pending_serial = None;
            }
            if let Some(last) = st.last.as_mut().filter(|l| l.serial == Some(serial)) {
                last.active = true;
            }
            st.activated_without_result = without_result;
        }
    }

    /// Reconcile: the candidate `serial` did not build (an auto route from
    /// Consul tags may clash with it); the running config stays.
    pub fn abandon(&self, serial: u64, error: String) {
        let mut dropped = false;
        self.tx.send_if_modified(|s| {
            dropped = s.candidate.as_ref().is_some_and(|c| c.serial == serial);
            if dropped {
                s.candidate = None;
            }
            dropped
        });
        if dropped {
            tracing::error!(serial, error = %error, "config reload: the new config does not build; the running config keeps serving");
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            st.pending_serial = None;
            if let Some(last) = st.last.as_mut().filter(|l| l.serial == Some(serial)) {
                last.result = "refused";
                last.errors.push(format!("the routing table does not build: {error}"));
            }
        }
    }

    /// Wait until the config with reload serial `serial` serves (true), or
    /// `timeout` passes, or another reload replaced it (false).
    pub async fn wait_active(&self, serial: u64, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        let wait = async {
            rx.wait_for(|s| s.serial >= serial || s.candidate.as_ref().is_none_or(|c| c.serial > serial))
                .await
                .map(|s| s.serial == serial)
                .unwrap_or(false)
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }
}

/// Feeds every new KV settings set from the watch to [`LiveConfig::apply_kv`].
pub struct KvFollower {
    pub live: Arc<LiveConfig>,
    pub rx: crate::discovery::consul::kv::KvRx,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for KvFollower {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut rx = self.rx.clone();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                r = rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let set = rx.borrow_and_update().clone();
                    if let Some(set) = set {
                        let live = self.live.clone();
                        // Validation reads files (token, TLS paths): off the control thread.
                        let _ = tokio::task::spawn_blocking(move || live.apply_kv(set)).await;
                    }
                }
            }
        }
    }
}

/// `new`'s routes, clusters and forwarding rules (what changes live) with the running
/// values of everything else.
fn live_parts(running: &Config, new: Config) -> Config {
    Config {
        routes: new.routes,
        clusters: new.clusters,
        forwarding: new.forwarding,
        limits: new.limits,
        dns: new.dns,
        ..running.clone()
    }
}

fn refused(errors: Vec<String>) -> Outcome {
    Outcome {
        result: "refused",
        errors,
        ..Default::default()
    }
}

/// Names of the settings that differ between `running` and `new` and apply
/// only at start. Values are never shown: some are secrets.
pub fn fixed_changes(running: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! fields {
        ($a:expr, $b:expr, $section:literal, [$($f:ident),* $(,)?]) => {
            {$(if $a.$f != $b.$f {
                out.push(concat!($section, ".", stringify!($f)).to_string());
            })*}
        };
    }
    if running.listeners != new.listeners {
        out.push("listeners".to_string());
    }
    fields!(running.server, new.server, "server", [
        threads, work_stealing, drain_timeout, shutdown_timeout, pid_file, upgrade_sock,
        upstream_keepalive_pool, express, park_idle_after,
    ]);
    fields!(running.admin, new.admin, "admin", [listen, token]);
    fields!(running.access_log, new.access_log, "access_log", [enabled, format, target, buffer_lines]);
    match (&running.consul, &new.consul) {
        (Some(a), Some(b)) => fields!(a, b, "consul", [
            addresses, token, token_file, datacenter, stale, max_stale, wait, max_watches, min_interval,
            noop_interval, state_file, stale_after, tls, auto_routes, register, kv_prefix,
        ]),
        (None, None) => {}
        _ => out.push("consul".to_string()),
    }
    fields!(running.ha, new.ha, "ha", [track_file, interval, vips, handoff_timeout, handoff_linger, max_persisted_age]);
    out
}

/// Routes and clusters added, removed or changed from `old` to `new`.
fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for r in &new.routes {
        match old.routes.iter().find(|o| o.name == r.name) {
            None => out.push(format!("route {} added", r.name)),
            Some(o) if o != r => out.push(format!("route {} changed", r.name)),
            Some(_) => {}
        }
    }
    for o in &old.routes {
        if !new.routes.iter().any(|r| r.name == o.name) {
            out.push(format!("route {} removed", o.name));
        }
    }
    let old_order: Vec<&str> = old.routes.iter().map(|r| r.name.as_str()).collect();
    let new_order: Vec<&str> = new.routes.iter().map(|r| r.name.as_str()).filter(|n| old_order.contains(n)).collect();
    let kept: Vec<&str> = old_order.iter().copied().filter(|n| new_order.contains(n)).collect();
    if kept != new_order {
        out.push("route order changed".to_string());
    }
    for (name, c) in &new.clusters {
        match old.clusters.get(name) {
            None => out.push(format!("cluster {name} added")),
            Some(o) if o != c => out.push(format!("cluster {name} changed")),
            Some(_) => {}
        }
    }
    for name in old.clusters.keys() {
        if !new.clusters.contains_key(name) {
            out.push(format!("cluster {name} removed"));
        }
    }
    if old.forwarding != new.forwarding {
        out.push("forwarding changed".to_string());
    }
    if old.limits != new.limits {
        out.push("limits changed".to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Config {
        crate::config::validate::parse_with_env(text, Path::new("."), &|_| None).unwrap()
    }

    const BASE: &str = r#"
[server]
threads = 1
pid_file = "/tmp/t.pid"
upgrade_sock = "/tmp/t.sock"
[[listeners]]
address = "127.0.0.1:8080"
[[routes]]
name = "site"
cluster = "web"
[clusters.web]
static = ["127.0.0.1:9000"]
"#;

    #[test]
    fn only_start_time_settings_need_a_restart() {
        let a = parse(BASE);
        let b = parse(&BASE.replace("8080", "8081").replace("9000", "9001"));
        assert_eq!(fixed_changes(&a, &b), ["listeners"]);
        let c = parse(&format!("[admin]\nlisten = \"127.0.0.1:9999\"\n{}", BASE.replace("threads = 1", "threads = 3")));
        assert_eq!(fixed_changes(&a, &c), ["server.threads", "admin.listen"]);
        assert!(fixed_changes(&a, &a).is_empty());
    }

    #[test]
    fn changes_name_routes_and_clusters() {
        let a = parse(BASE);
        let b = parse(&format!(
            "{}\n[[routes]]\nname = \"api\"\npath_prefix = \"/api\"\ncluster = \"api\"\n[clusters.api]\nstatic = [\"127.0.0.1:9002\"]\n",
            BASE.replace("9000", "9001")
        ));
        assert_eq!(changes(&a, &b), ["route api added", "cluster api added", "cluster web changed"]);
        assert_eq!(changes(&b, &a), ["route api removed", "cluster web changed", "cluster api removed"]);
    }

    #[test]
    fn a_reload_keeps_the_running_listeners_and_becomes_the_candidate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, BASE).unwrap();
        let running = Arc::new(crate::config::load(&path).unwrap());
        let live = LiveConfig::new(running, Some(path.clone()), false, Arc::new(Metrics::new()));
        assert_eq!(live.reload("test").result, "unchanged");
        std::fs::write(&path, BASE.replace("8080", "8081").replace("9000", "9001")).unwrap();
        let o = live.reload("test");
        assert_eq!((o.result, o.serial, o.active), ("applied", Some(1), false));
        assert_eq!(o.needs_restart, ["listeners"]);
        let st = live.state();
        let cand = st.candidate.as_ref().unwrap();
        assert_eq!(cand.config.listeners[0].address.port(), 8080, "the listener stays");
        assert!(matches!(&cand.config.clusters["web"].discovery, DiscoverySpec::Static(a) if a[0].port() == 9001));
        live.promote(1, vec![]);
        assert_eq!(live.state().serial, 1);
        assert!(live.state().candidate.is_none());

        std::fs::write(&path, "[[routes]]\nname = 1\n").unwrap();
        let o = live.reload("test");
        assert_eq!(o.result, "refused");
        assert!(o.errors.iter().any(|e| e.contains("routes")), "{:?}", o.errors);
        assert_eq!(live.state().serial, 1, "the running config stays");
        assert_eq!(live.status().last.unwrap().result, "refused");
    }

    #[test]
    fn without_consul_running_a_consul_cluster_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, BASE).unwrap();
        let live = LiveConfig::new(Arc::new(crate::config::load(&path).unwrap()), Some(path.clone()), false, Arc::new(Metrics::new()));
        std::fs::write(
            &path,
            format!("{BASE}\n[clusters.api]\nconsul = {{ service = \"api\" }}\n[consul]\naddresses = [\"127.0.0.1:8500\"]\n"),
        )
        .unwrap();
        let o = live.reload("test");
        assert_eq!(o.result, "refused");
        assert!(o.errors[0].starts_with("clusters.api.consul: "), "{:?}", o.errors);
    }
}
