//! The KV settings watch: **one** blocking recursive read of the prefix
//! (`/v1/kv/<prefix>?recurse`), with the same index rules, pacing, hung-read
//! timeout, backoff and fail-static rule as every other watch (see
//! [`super::blocking`]). A prefix with no keys answers 404 with an index,
//! which is an empty set, not an error. A failed read publishes nothing: the
//! last good settings stay. What the keys mean is in [`crate::kvconfig`].

use super::blocking;
use super::client::ConsulClient;
use crate::metrics::Metrics;
use crate::status::StatusBoard;
use base64::Engine as _;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

pub const SOURCE: &str = "consul-kv";

/// The keys under the prefix (the prefix cut off) and their raw values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvSet {
    pub entries: BTreeMap<String, Vec<u8>>,
    /// Loaded from the state file, not read from Consul since start.
    pub from_state_file: bool,
}

pub type KvRx = watch::Receiver<Option<Arc<KvSet>>>;

/// Parse a recursive KV answer. Folder keys (ending in `/`) and the prefix
/// itself are skipped; an entry that is not an object with a string `Key`
/// fails the whole answer (the last good set stays).
pub fn parse_kv(body: &[u8], prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    Ok(parse_entries(body, prefix)?.into_iter().map(|(k, (v, _))| (k, v)).collect())
}

/// [`parse_kv`] with each key's `ModifyIndex` (for check-and-set writes).
pub fn parse_entries(body: &[u8], prefix: &str) -> Result<BTreeMap<String, (Vec<u8>, u64)>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Array(items) = v else { return Err("body is not a JSON array".into()) };
    let mut out = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let key = item.get("Key").and_then(Value::as_str).ok_or_else(|| format!("entry {i} has no string Key"))?;
        let Some(rel) = key.strip_prefix(prefix) else { continue };
        if rel.is_empty() || rel.ends_with('/') {
            continue;
        }
        let value = match item.get("Value") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("entry {key:?}: Value is not base64: {e}"))?,
            Some(_) => return Err(format!("entry {key:?}: Value is not a string")),
        };
        let index = item.get("ModifyIndex").and_then(Value::as_u64).unwrap_or(0);
        out.insert(rel.to_string(), (value, index));
    }
    Ok(out)
}

struct Kv {
    prefix: String,
    tx: Arc<watch::Sender<Option<Arc<KvSet>>>>,
}

impl blocking::Handler for Kv {
    fn answer(&mut self, body: &[u8]) -> Result<bool, String> {
        let entries = parse_kv(body, &self.prefix)?;
        Ok(self.tx.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.entries == entries && !c.from_state_file) {
                false
            } else {
                *cur = Some(Arc::new(KvSet { entries, from_state_file: false }));
                true
            }
        }))
    }
}

pub async fn run(
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    prefix: String,
    tx: Arc<watch::Sender<Option<Arc<KvSet>>>>,
    shutdown: watch::Receiver<bool>,
) {
    let ep = blocking::Endpoint {
        source: SOURCE,
        label: "kv",
        path: format!("/v1/kv/{prefix}"),
        params: &[("recurse", None)],
        absent_ok: true,
        consequence: "consul KV watch failed; the last good settings stay",
    };
    blocking::run(ep, client, metrics, status, Kv { prefix, tx }, shutdown).await
}

/// Values as kept in the state file (base64, since a value may be binary).
pub fn to_state(set: &KvSet) -> BTreeMap<String, String> {
    set.entries.iter().map(|(k, v)| (k.clone(), base64::engine::general_purpose::STANDARD.encode(v))).collect()
}

pub fn from_state(saved: &BTreeMap<String, String>) -> KvSet {
    let entries = saved
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), base64::engine::general_purpose::STANDARD.decode(v).ok()?)))
        .collect();
    KvSet { entries, from_state_file: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_cut_to_the_prefix_and_decoded() {
        let body = br#"[
            {"Key":"switchyard/","Value":null,"ModifyIndex":3},
            {"Key":"switchyard/routes/","Value":null,"ModifyIndex":4},
            {"Key":"switchyard/clusters/web/retries","Value":"Mw==","ModifyIndex":5},
            {"Key":"switchyard/maintenance/shop","Value":null,"ModifyIndex":6}
        ]"#;
        let m = parse_kv(body, "switchyard/").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["clusters/web/retries"], b"3");
        assert_eq!(m["maintenance/shop"], b"");
        assert!(parse_kv(b"{}", "switchyard/").is_err());
        assert!(parse_kv(br#"[{"Value":"Mw=="}]"#, "switchyard/").is_err());
        assert!(parse_kv(br#"[{"Key":"switchyard/a","Value":"%%%"}]"#, "switchyard/").is_err());
        let set = KvSet { entries: m, from_state_file: false };
        let back = from_state(&to_state(&set));
        assert_eq!(back.entries, set.entries);
        assert!(back.from_state_file);
    }
}
