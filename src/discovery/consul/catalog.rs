//! The catalog watch behind tag-driven routes: one blocking query on
//! `/v1/catalog/services` (name → union of tags). Its index moves on
//! registrations, deregistrations and tag changes, not on health flips, so
//! it is cheap; health stays with the per-service watches.

use super::blocking;
use super::client::ConsulClient;
use crate::metrics::Metrics;
use crate::status::StatusBoard;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

pub const SOURCE: &str = "consul-catalog";

/// Parse `{name: [tags]}` leniently: non-string tags are dropped, a non-array
/// value counts as no tags. Fails only when the body is not a JSON object.
pub fn parse_services(body: &[u8]) -> Result<BTreeMap<String, Vec<String>>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Object(m) = v else { return Err("body is not a JSON object".into()) };
    Ok(m.into_iter()
        .map(|(k, v)| {
            let mut tags: Vec<String> = match v {
                Value::Array(a) => a.into_iter().filter_map(|t| t.as_str().map(str::to_string)).collect(),
                _ => Vec::new(),
            };
            tags.sort();
            tags.dedup();
            (k, tags)
        })
        .collect())
}

struct Catalog(watch::Sender<Option<BTreeMap<String, Vec<String>>>>);

impl blocking::Handler for Catalog {
    fn answer(&mut self, body: &[u8]) -> Result<bool, String> {
        let services = parse_services(body)?;
        Ok(self.0.send_if_modified(|cur| {
            if cur.as_ref() == Some(&services) {
                false
            } else {
                *cur = Some(services);
                true
            }
        }))
    }
}

pub async fn run(
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    tx: watch::Sender<Option<BTreeMap<String, Vec<String>>>>,
    shutdown: watch::Receiver<bool>,
) {
    let ep = blocking::Endpoint {
        source: SOURCE,
        label: "catalog_services",
        path: "/v1/catalog/services".to_string(),
        params: &[],
        absent_ok: false,
        consequence: "consul catalog watch failed; auto routes stay as they are",
    };
    blocking::run(ep, client, metrics, status, Catalog(tx), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_services() {
        let s = parse_services(br#"{"web":["b","a","a",1],"consul":[],"odd":null}"#).unwrap();
        assert_eq!(s["web"], vec!["a".to_string(), "b".to_string()]);
        assert!(s["odd"].is_empty());
        assert!(parse_services(b"[]").is_err());
    }
}
