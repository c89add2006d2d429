//! The datacenter-wide change signal for services beyond the blocking budget.
//!
//! One blocking query on `/v1/health/state/any` (the checks table: it moves
//! on every check created, changed or removed anywhere). Each answer is
//! reduced to a fingerprint per service — its checks' (node, id, status,
//! modify index) — and per node; only the services whose fingerprint changed
//! (or that run on a node whose node check changed) are poked for a targeted,
//! non-blocking re-read. Nothing is rebuilt for services that did not change.
//!
//! Cost: every check change anywhere in the datacenter makes this one
//! connection download the whole check list (≈ 300 bytes per check). An
//! instance registered without any check does not move the checks table; it
//! is picked up by the triggered watches' periodic resync.

use super::blocking;
use super::client::ConsulClient;
use crate::metrics::Metrics;
use crate::status::StatusBoard;
use serde_json::Value;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

pub const SOURCE: &str = "consul-checks";

/// Per service, per node: fingerprints of one answer.
#[derive(Default, Debug, PartialEq)]
pub struct Fingerprints {
    pub services: HashMap<String, u64>,
    pub nodes: HashMap<String, u64>,
    /// node → services with checks on it
    pub placement: HashMap<String, BTreeSet<String>>,
}

fn get<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> &'a str {
    o.get(k).and_then(|v| v.as_str()).unwrap_or("")
}

/// Reduce a check list to fingerprints. Entries that are not objects are skipped.
pub fn fingerprints(body: &[u8]) -> Result<Fingerprints, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Array(checks) = v else { return Err("body is not a JSON array".into()) };
    let mut per_service: BTreeMap<(&str, bool), Vec<(String, String, String, String)>> = BTreeMap::new();
    let mut placement: HashMap<String, BTreeSet<String>> = HashMap::new();
    for c in &checks {
        let Some(o) = c.as_object() else { continue };
        let node = get(o, "Node");
        let service = get(o, "ServiceName");
        let modify = o.get("ModifyIndex").map(|m| m.to_string()).unwrap_or_default();
        let entry = (node.to_string(), get(o, "CheckID").to_string(), get(o, "Status").to_string(), modify);
        if service.is_empty() {
            per_service.entry((node, true)).or_default().push(entry);
        } else {
            placement.entry(node.to_string()).or_default().insert(service.to_string());
            per_service.entry((service, false)).or_default().push(entry);
        }
    }
    let mut out = Fingerprints { placement, ..Default::default() };
    for ((name, is_node), mut entries) in per_service {
        entries.sort();
        let mut h = DefaultHasher::new();
        entries.hash(&mut h);
        if is_node {
            out.nodes.insert(name.to_string(), h.finish());
        } else {
            out.services.insert(name.to_string(), h.finish());
        }
    }
    Ok(out)
}

/// Services whose checks (or whose nodes' checks) differ between two answers.
pub fn changed(old: &Fingerprints, new: &Fingerprints) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (s, h) in &new.services {
        if old.services.get(s) != Some(h) {
            out.insert(s.clone());
        }
    }
    for s in old.services.keys() {
        if !new.services.contains_key(s) {
            out.insert(s.clone());
        }
    }
    let nodes: BTreeSet<&String> = new.nodes.keys().chain(old.nodes.keys()).collect();
    for n in nodes {
        if old.nodes.get(n) != new.nodes.get(n) {
            for p in [old.placement.get(n), new.placement.get(n)].into_iter().flatten() {
                out.extend(p.iter().cloned());
            }
        }
    }
    out
}

/// Who to poke: service name → the notifiers of its triggered watches.
pub type Pokes = Arc<Mutex<HashMap<String, Vec<Arc<Notify>>>>>;

struct Signal {
    pokes: Pokes,
    holding: Arc<AtomicBool>,
    last: Option<Fingerprints>,
}

impl blocking::Handler for Signal {
    fn answer(&mut self, body: &[u8]) -> Result<bool, String> {
        let fp = fingerprints(body)?;
        let map = self.pokes.lock().unwrap_or_else(|e| e.into_inner());
        let services = match &self.last {
            Some(old) => changed(old, &fp),
            // First answer (or the first after an error): re-read everything we trigger.
            None => map.keys().cloned().collect(),
        };
        for s in &services {
            for n in map.get(s).into_iter().flatten() {
                n.notify_one();
            }
        }
        drop(map);
        self.last = Some(fp);
        Ok(!services.is_empty())
    }

    fn holding(&mut self, on: bool) {
        self.holding.store(on, Ordering::Relaxed);
    }

    fn failed(&mut self) {
        self.last = None;
    }
}

pub async fn run(
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    pokes: Pokes,
    holding: Arc<AtomicBool>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let ep = blocking::Endpoint {
        source: SOURCE,
        label: "health_state",
        path: "/v1/health/state/any".to_string(),
        params: &[],
        absent_ok: false,
        consequence: "consul check signal failed; triggered services resync when it returns",
    };
    blocking::run(ep, client, metrics, status, Signal { pokes, holding, last: None }, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(checks: &[(&str, &str, &str, &str, u64)]) -> Vec<u8> {
        let v: Vec<Value> = checks
            .iter()
            .map(|(node, id, svc, status, m)| serde_json::json!({"Node": node, "CheckID": id, "ServiceName": svc, "Status": status, "ModifyIndex": m}))
            .collect();
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn only_changed_services_are_reported() {
        let a = fingerprints(&body(&[
            ("n1", "serfHealth", "", "passing", 1),
            ("n1", "service:web-1", "web", "passing", 5),
            ("n2", "serfHealth", "", "passing", 1),
            ("n2", "service:api-1", "api", "passing", 6),
            ("n2", "service:db-1", "db", "passing", 7),
        ]))
        .unwrap();
        // web flips.
        let b = fingerprints(&body(&[
            ("n1", "serfHealth", "", "passing", 1),
            ("n1", "service:web-1", "web", "critical", 9),
            ("n2", "serfHealth", "", "passing", 1),
            ("n2", "service:api-1", "api", "passing", 6),
            ("n2", "service:db-1", "db", "passing", 7),
        ]))
        .unwrap();
        assert_eq!(changed(&a, &b), BTreeSet::from(["web".to_string()]));
        // n2's node check flips: everything on n2.
        let c = fingerprints(&body(&[
            ("n1", "serfHealth", "", "passing", 1),
            ("n1", "service:web-1", "web", "critical", 9),
            ("n2", "serfHealth", "", "critical", 10),
            ("n2", "service:api-1", "api", "passing", 6),
            ("n2", "service:db-1", "db", "passing", 7),
        ]))
        .unwrap();
        assert_eq!(changed(&b, &c), BTreeSet::from(["api".to_string(), "db".to_string()]));
        // Order of entries does not matter; removal is a change.
        let d = fingerprints(&body(&[("n1", "service:web-1", "web", "critical", 9), ("n1", "serfHealth", "", "passing", 1)])).unwrap();
        assert!(changed(&c, &d).contains("api"));
        assert!(!changed(&c, &d).contains("web"));
        assert!(fingerprints(b"{}").is_err());
    }
}
