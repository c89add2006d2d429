//! The datacenter-wide blocking reads (`/v1/catalog/services` for tag routes,
//! `/v1/health/state/any` for the check signal) share one loop: token
//! bucket, index rules, `stale`/`dc`/`index`/`wait` parameters, the hung-read
//! timeout, and backoff with a reset index after any error. Only what is done
//! with an answer differs, which the [`Handler`] supplies.

use super::client::{ClientError, ConsulClient};
use super::watch::{backoff, read_timeout, IndexTracker, Observed, TokenBucket};
use crate::metrics::Metrics;
use crate::status::StatusBoard;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub trait Handler: Send {
    /// A changed answer. `Err` counts as a bad body: backoff, index reset.
    fn answer(&mut self, body: &[u8]) -> Result<(), String>;
    /// A blocking read is about to be held after a good answer (`true`), or
    /// the loop lost contact (`false`).
    fn holding(&mut self, _on: bool) {}
    /// After any failed read: the next answer starts from scratch.
    fn failed(&mut self) {}
}

pub struct Endpoint {
    /// Status-board source name and error-metric label.
    pub source: &'static str,
    /// Request-metric label.
    pub label: &'static str,
    pub path: &'static str,
    /// Log line on failure.
    pub consequence: &'static str,
}

pub async fn run(
    ep: Endpoint,
    client: Arc<ConsulClient>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
    mut handler: impl Handler,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let settings = client.settings().clone();
    status.register_source(ep.source, "consul", ep.path);
    let mut tracker = IndexTracker::default();
    let mut bucket = TokenBucket::new(2, settings.min_interval);
    let mut failures = 0u32;
    let mut answered = false;
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
        handler.holding(blocking && failures == 0 && answered);
        let timeout = if blocking { read_timeout(settings.wait) } else { Duration::from_secs(12) };
        let result = tokio::select! {
            _ = shutdown.changed() => return,
            r = tokio::time::timeout(timeout, client.request(reqwest::Method::GET, ep.label, ep.path, &params, None, timeout)) => {
                r.unwrap_or(Err(ClientError::Timeout))
            }
        };
        let err = match result {
            Ok(resp) if tracker.observe(resp.index) == Observed::Unchanged => {
                failures = 0;
                status.source_ok(ep.source, SystemTime::now());
                continue;
            }
            Ok(resp) => match handler.answer(&resp.body) {
                Ok(()) => {
                    failures = 0;
                    answered = true;
                    status.source_ok(ep.source, SystemTime::now());
                    metrics.discovery_update(ep.source, "ok");
                    continue;
                }
                Err(e) => ("bad_body", e),
            },
            Err(e) => (e.kind(), e.to_string()),
        };
        handler.holding(false);
        handler.failed();
        answered = false;
        tracker.reset();
        failures += 1;
        metrics.consul_watch_errors.with_label_values(&[ep.source, err.0]).inc();
        metrics.discovery_update(ep.source, "error");
        status.source_error(ep.source, format!("{}: {}", err.0, err.1));
        tracing::warn!(source = ep.source, kind = err.0, error = %err.1, "{}", ep.consequence);
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff(failures)) => {}
        }
    }
}
