//! The catalog watch behind tag-driven routes: one blocking query on
//! `/v1/catalog/services` (name → union of tags). Its index moves on
//! registrations, deregistrations and tag changes, not on health flips, so
//! it is cheap; health stays with the per-service watches.

use super::client::{ClientError, ConsulClient};
use super::watch::{backoff, read_timeout, IndexTracker, Observed, TokenBucket};
use crate::metrics::Metrics;
use crate::status::StatusBoard;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
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

pub async fn run(
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    tx: watch::Sender<Option<BTreeMap<String, Vec<String>>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let settings = client.settings().clone();
    status.register_source(SOURCE, "consul", "/v1/catalog/services");
    let mut tracker = IndexTracker::default();
    let mut bucket = TokenBucket::new(2, settings.min_interval);
    let mut failures = 0u32;
    let wait_ms = format!("{}ms", settings.wait.as_millis().max(1));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = bucket.acquire() => {}
        }
        let index = tracker.request_index().to_string();
        let blocking = tracker.request_index() > 0;
        let mut params: Vec<(&str, Option<&str>)> = Vec::new();
        if settings.stale {
            params.push(("stale", None));
        }
        if let Some(dc) = &settings.datacenter {
            params.push(("dc", Some(dc.as_str())));
        }
        if blocking {
            params.push(("index", Some(&index)));
            params.push(("wait", Some(&wait_ms)));
        }
        let timeout = if blocking { read_timeout(settings.wait) } else { Duration::from_secs(12) };
        let result = tokio::select! {
            _ = shutdown.changed() => return,
            r = tokio::time::timeout(timeout, client.request(reqwest::Method::GET, "catalog_services", "/v1/catalog/services", &params, None, timeout)) => {
                r.unwrap_or(Err(ClientError::Timeout))
            }
        };
        let err = match result {
            Ok(resp) => {
                if tracker.observe(resp.index) == Observed::Unchanged {
                    status.source_ok(SOURCE, SystemTime::now());
                    failures = 0;
                    continue;
                }
                match parse_services(&resp.body) {
                    Ok(services) => {
                        failures = 0;
                        status.source_ok(SOURCE, SystemTime::now());
                        metrics.discovery_update(SOURCE, "ok");
                        tx.send_if_modified(|cur| {
                            if cur.as_ref() == Some(&services) {
                                false
                            } else {
                                *cur = Some(services);
                                true
                            }
                        });
                        continue;
                    }
                    Err(e) => ("bad_body", e),
                }
            }
            Err(e) => (e.kind(), e.to_string()),
        };
        tracker.reset();
        failures += 1;
        metrics.consul_watch_errors.with_label_values(&[SOURCE, err.0]).inc();
        metrics.discovery_update(SOURCE, "error");
        status.source_error(SOURCE, format!("{}: {}", err.0, err.1));
        tracing::warn!(kind = err.0, error = %err.1, "consul catalog watch failed; auto routes stay as they are");
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff(failures)) => {}
        }
    }
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
