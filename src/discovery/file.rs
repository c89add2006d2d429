//! The file catalog: a JSON file mapping service name → instances, watched for
//! changes. The embedded default that needs no Consul.
//!
//! ```json
//! { "web": [ { "address": "10.0.0.5", "port": 8000, "weight": 2,
//!              "tags": ["v2"], "meta": { "az": "a" } },
//!            { "address": "web-7.internal", "port": 8000 } ] }
//! ```
//!
//! An address that is a host name is published as a [`NamedInstance`];
//! reconcile resolves it through a DNS source (src/discovery/dns.rs) and
//! gives each of its addresses the instance's weight, tags and meta.
//!
//! Change detection uses inotify (through `notify`, watching the *directory*
//! so editors that replace the file by rename are seen) plus a 1 s poll of
//! size/mtime as a safety net for filesystems without inotify. A file is only
//! published when it parses and validates completely; anything else (bad
//! JSON, a bad address, a file truncated mid-write) leaves the last good
//! catalog in force and is reported in `/status`, the log and a metric.

pub use super::NamedInstance;
use super::{is_host_name, normalise, Endpoint, EndpointSet};
use crate::error::DiscoveryError;
use crate::metrics::Metrics;
use crate::status::StatusBoard;
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};

/// A parsed catalog: per service, the instances given by IP address (a
/// normalised set) and those given by host name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Catalog {
    pub services: BTreeMap<String, EndpointSet>,
    /// Only services with at least one host-name instance appear here.
    pub named: BTreeMap<String, Vec<NamedInstance>>,
}

impl Catalog {
    /// A service's instances given by address (None: not in the file).
    pub fn get(&self, service: &str) -> Option<&EndpointSet> {
        self.services.get(service)
    }
}

impl std::ops::Index<&str> for Catalog {
    type Output = EndpointSet;
    fn index(&self, service: &str) -> &EndpointSet {
        &self.services[service]
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Instance {
    address: String,
    port: Option<u16>,
    weight: Option<u32>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
}

/// The largest catalog file we read; a larger file is refused, not loaded.
pub const MAX_CATALOG_BYTES: u64 = 64 * 1024 * 1024;
/// Largest accepted weight (the same bound Consul puts on `Weights`).
pub const MAX_WEIGHT: u32 = 65535;

/// Parse and validate catalog text. Strict: one bad instance rejects the file,
/// because the operator wrote it and a half-applied file is a surprise.
pub fn parse_catalog(text: &[u8]) -> Result<Catalog, String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let raw: BTreeMap<String, Vec<Instance>> = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            }
        })?;
    de.end().map_err(|e| e.to_string())?;
    let mut out = Catalog::default();
    for (service, instances) in raw {
        if service.is_empty() {
            return Err("service name \"\" is not allowed".into());
        }
        let mut seen = HashSet::new();
        let mut eps = Vec::with_capacity(instances.len());
        let mut named: Vec<NamedInstance> = Vec::new();
        for (i, inst) in instances.into_iter().enumerate() {
            let at = format!("{service}[{i}]");
            let weight = inst.weight.unwrap_or(1);
            if weight > MAX_WEIGHT {
                return Err(format!("{at}.weight: invalid value {weight}: must be between 0 and {MAX_WEIGHT}"));
            }
            if let Some((host, port)) = host_name(&inst.address, inst.port) {
                if named.iter().any(|n| n.host == host && n.port == port) {
                    return Err(format!("{at}.address: duplicate instance {host}:{port}"));
                }
                named.push(NamedInstance { host, port, weight, tags: inst.tags, meta: inst.meta, id: None });
                continue;
            }
            let addr = instance_addr(&inst.address, inst.port).map_err(|m| format!("{at}.address: {m}"))?;
            if !seen.insert(addr) {
                return Err(format!("{at}.address: duplicate instance {addr}"));
            }
            eps.push(Endpoint {
                addr,
                weight,
                tags: inst.tags,
                meta: inst.meta,
                id: None,
            });
        }
        if !named.is_empty() {
            out.named.insert(service.clone(), named);
        }
        out.services.insert(service, normalise(eps));
    }
    Ok(out)
}

/// A host name address: `"NAME"` with `port`, or `"NAME:PORT"`. An IP
/// address (or something that only looks numeric) is not one.
fn host_name(address: &str, port: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = match port {
        Some(p) => (address, p),
        None => {
            let (h, p) = address.rsplit_once(':')?;
            (h, p.parse().ok()?)
        }
    };
    (port != 0 && is_host_name(host)).then(|| (host.to_string(), port))
}

fn instance_addr(address: &str, port: Option<u16>) -> Result<SocketAddr, String> {
    let addr = match port {
        Some(port) => {
            let ip: IpAddr = address
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| format!("invalid IP address {address:?}"))?;
            SocketAddr::new(ip, port)
        }
        None => address.parse().map_err(|_| {
            format!("invalid address {address:?}: give \"IP\" with \"port\", or \"IP:PORT\"")
        })?,
    };
    if addr.port() == 0 {
        return Err(format!("invalid port 0 in {address:?}"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(format!("invalid IP address {address:?}: not a unicast host address"));
    }
    Ok(addr)
}

/// Watches one catalog file and publishes every valid version of it.
pub struct FileSource {
    path: PathBuf,
    name: String,
    tx: watch::Sender<Option<Arc<Catalog>>>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    poll: Duration,
    /// The bytes read by `new`, handed to the watch loop: a change made
    /// between that first read and the watcher's start is compared against
    /// what was actually published, so it is not missed.
    initial: std::sync::Mutex<Option<Vec<u8>>>,
}

impl FileSource {
    /// Create the source and read the file once, so the first routing table
    /// can be complete before the proxy starts listening.
    pub fn new(
        path: PathBuf,
        metrics: Arc<Metrics>,
        status: Arc<StatusBoard>,
    ) -> (Self, watch::Receiver<Option<Arc<Catalog>>>) {
        let (tx, rx) = watch::channel(None);
        let name = crate::config::file_source_name(&path);
        status.register_source(&name, "file", &path.display().to_string());
        let src = FileSource {
            path,
            name,
            tx,
            metrics,
            status,
            poll: Duration::from_secs(1),
            initial: std::sync::Mutex::new(None),
        };
        let mut seen = None;
        src.reload(&mut seen);
        *src.initial.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        (src, rx)
    }

    /// Read the file; publish when it is valid and differs from what is out.
    /// `last_seen` is the raw content last looked at, to skip re-parsing.
    fn reload(&self, last_seen: &mut Option<Vec<u8>>) {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                *last_seen = None;
                self.fail(DiscoveryError::Read {
                    path: self.path.display().to_string(),
                    reason: e.to_string(),
                });
                return;
            }
        };
        if last_seen.as_deref() == Some(&bytes[..]) {
            return;
        }
        let result = if bytes.len() as u64 > MAX_CATALOG_BYTES {
            Err(format!("file is {} bytes, above the {} byte limit", bytes.len(), MAX_CATALOG_BYTES))
        } else {
            parse_catalog(&bytes)
        };
        *last_seen = Some(bytes);
        match result {
            Ok(catalog) => {
                let changed = self.tx.send_if_modified(|cur| {
                    if cur.as_deref() == Some(&catalog) {
                        false
                    } else {
                        *cur = Some(Arc::new(catalog));
                        true
                    }
                });
                let result = if changed { "ok" } else { "unchanged" };
                self.metrics.discovery_update(&self.name, result);
                self.status.source_ok(&self.name, SystemTime::now());
                if changed {
                    tracing::info!(source = %self.name, "catalog loaded");
                }
            }
            Err(reason) => self.fail(DiscoveryError::Invalid {
                path: self.path.display().to_string(),
                reason,
            }),
        }
    }

    fn fail(&self, e: DiscoveryError) {
        tracing::warn!(source = %self.name, error = %e, "catalog rejected; last good catalog stays in force");
        self.metrics.discovery_update(&self.name, "error");
        self.status.source_error(&self.name, e.to_string());
    }
}

#[async_trait]
impl BackgroundService for FileSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (ev_tx, mut ev_rx) = mpsc::channel::<()>(1);
        let file_name = self.path.file_name().map(|n| n.to_os_string());
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                let ours = ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == file_name);
                if ours {
                    let _ = ev_tx.try_send(());
                }
            }
        });
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!(source = %self.name, error = %e, "cannot watch directory; falling back to polling");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e, "no file watcher; falling back to polling");
                None
            }
        };
        // What `new` published, not a fresh read: the file may have changed
        // since. No fingerprint yet, so the first tick (at once) re-reads it.
        let mut last_seen = self.initial.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut seen_fp = None;
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = ev_rx.recv() => {
                    // Let a burst of events (write + close + rename) settle.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while ev_rx.try_recv().is_ok() {}
                }
                _ = tick.tick() => {
                    if fingerprint(&self.path) == seen_fp {
                        continue;
                    }
                }
            }
            seen_fp = fingerprint(&self.path);
            self.reload(&mut last_seen);
        }
    }
}

/// Size and modification time: a cheap "did anything happen" check.
fn fingerprint(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change written after the first read but before the watch loop
    /// starts (a busy machine at start-up) is still seen.
    #[test]
    fn a_change_before_the_watcher_starts_is_not_missed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.json");
        std::fs::write(&path, br#"{"web":[{"address":"127.0.0.1","port":81}]}"#).unwrap();
        let metrics = Arc::new(Metrics::new());
        let status = Arc::new(StatusBoard::new());
        let (src, rx) = FileSource::new(path.clone(), metrics.clone(), status);
        assert!(rx.borrow().is_some(), "the first read publishes");
        std::fs::write(&path, b"{ not json").unwrap();
        let errors = || metrics.discovery_updates.with_label_values(&[src.name.as_str(), "error"]).get();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        rt.block_on(async {
            let run = src.start(stop_rx);
            tokio::pin!(run);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while errors() == 0 && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = &mut run => break,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
            let _ = stop_tx.send(true);
        });
        assert_eq!(errors(), 1, "the bad file written before the watcher started was not seen");
    }

    #[test]
    fn parses_and_normalises() {
        let c = parse_catalog(
            br#"{"web":[{"address":"127.0.0.2","port":80,"weight":3,"tags":["a"]},
                        {"address":"127.0.0.1:81"}]}"#,
        )
        .unwrap();
        let web = &c["web"];
        assert_eq!(web[0].addr.to_string(), "127.0.0.1:81");
        assert_eq!(web[0].weight, 1);
        assert_eq!(web[1].weight, 3);
        assert_eq!(web[1].tags, vec!["a".to_string()]);
    }

    #[test]
    fn host_names_are_kept_for_resolution() {
        let c = parse_catalog(
            br#"{"web":[{"address":"10.0.0.1","port":80},{"address":"Web-7.internal","port":81,"weight":3,"tags":["x"]},
                        {"address":"b.internal.:82"},{"address":"[::1]:83"}], "api":[]}"#,
        )
        .unwrap();
        assert_eq!(c["web"].len(), 2, "the IP instances");
        let named = &c.named["web"];
        assert_eq!((named[0].host.as_str(), named[0].port, named[0].weight), ("Web-7.internal", 81, 3));
        assert_eq!(named[0].tags, vec!["x".to_string()]);
        assert_eq!((named[1].host.as_str(), named[1].port), ("b.internal.", 82));
        assert!(!c.named.contains_key("api"));
        assert!(c.get("api").unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_input_with_location() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"web":[{"address":"no pe","port":80}]}"#, "web[0].address: invalid IP address \"no pe\""),
            (br#"{"web":[{"address":"a.test:80"},{"address":"a.test","port":80}]}"#, "web[1].address: duplicate instance a.test:80"),
            (br#"{"web":[{"address":"a.test"}]}"#, "web[0].address: invalid address"),
            (br#"{"web":[{"address":"127.0.0.1","port":70000}]}"#, "web[0].port"),
            (br#"{"web":[{"address":"127.0.0.1:1"},{"address":"127.0.0.1","port":1}]}"#, "duplicate instance"),
            (br#"{"web":[{"address":"127.0.0.1:1","wieght":1}]}"#, "unknown field `wieght`"),
            (br#"{"web":[{"address":"127.0.0.1:1"}"#, "EOF"),
            (br#"{"web":[{"address":"127.0.0.1:1","weight":70000}]}"#, "web[0].weight"),
            (br#"{"web":[{"address":"0.0.0.0:1"}]}"#, "not a unicast"),
            (br#"[]"#, "expected a map"),
        ];
        for (text, needle) in cases {
            let err = parse_catalog(text).unwrap_err();
            assert!(err.contains(needle), "{:?}: {err}", String::from_utf8_lossy(text));
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes never panic the catalog parser.
        #[test]
        fn catalog_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_catalog(&bytes);
        }

        /// Structurally plausible catalogs with arbitrary field values never panic.
        #[test]
        fn catalog_fields_never_panic(addr in ".{0,40}", port in any::<i64>(), weight in any::<i64>()) {
            let text = format!(r#"{{"s":[{{"address":{},"port":{port},"weight":{weight}}}]}}"#, serde_json::Value::String(addr));
            let _ = parse_catalog(text.as_bytes());
        }
    }
}
