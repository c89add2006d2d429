//! The datacenter-wide blocking reads (`/v1/catalog/services` for tag routes,
//! `/v1/health/state/any` for the check signal) share one loop: pacing
//! (see [`super::pace`]), index rules, `stale`/`dc`/`index`/`wait` parameters, the hung-read
//! timeout, and backoff with a reset index after any error. Only what is done
//! with an answer differs, which the [`Handler`] supplies.

use super::client::{ClientError, ConsulClient};
use super::pace::{after_read, back_off, Outcome, Pacer};
use super::watch::{agent_down, backoff, read_timeout, IndexTracker, Observed};
use crate::metrics::Metrics;
use crate::status::StatusBoard;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub trait Handler: Send {
    /// An answer with a new index. `Ok(true)`: what the handler keeps
    /// changed; `Ok(false)`: the same as before (paced as a no-op). `Err`
    /// counts as a bad body: backoff, index reset.
    fn answer(&mut self, body: &[u8]) -> Result<bool, String>;
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
    pub path: String,
    /// Extra query parameters (`recurse` for a KV prefix).
    pub params: &'static [(&'static str, Option<&'static str>)],
    /// A 404 is an answer: nothing there yet, with an index to block on
    /// (a KV prefix with no keys).
    pub absent_ok: bool,
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
    status.register_source(ep.source, "consul", &ep.path);
    let mut tracker = IndexTracker::default();
    let mut pacer = Pacer::new(settings.min_interval, settings.noop_interval, settings.wait);
    let mut restores = client.restores.subscribe();
    let mut failures = 0u32;
    let mut answered = false;
    let mut probe = false;
    let wait_ms = format!("{}ms", settings.wait.as_millis().max(1));
    loop {
        if restores.take() {
            tracker.reset();
            probe = false;
        }
        let index = tracker.request_index().to_string();
        let blocking = tracker.request_index() > 0 && !probe;
        let mut params: Vec<(&str, Option<&str>)> = ep.params.to_vec();
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
        pacer.start();
        let result = tokio::select! {
            _ = shutdown.changed() => return,
            _ = restores.changed() => {
                handler.holding(false);
                tracker.reset();
                probe = false;
                continue;
            }
            r = tokio::time::timeout(timeout, client.request(reqwest::Method::GET, ep.label, &ep.path, &params, None, timeout)) => {
                match r.unwrap_or(Err(ClientError::Timeout)) {
                    Err(ClientError::Http { status: 404, index: Some(index), .. }) if ep.absent_ok => Ok(super::client::Response {
                        index: Some(index),
                        last_contact_ms: None,
                        body: bytes::Bytes::from_static(b"[]"),
                    }),
                    r => r,
                }
            }
        };
        probe = false;
        let (kind, msg, may_wake) = match result {
            Ok(resp) => {
                let observed = tracker.observe(resp.index, blocking);
                if observed == Observed::WentBackwards {
                    metrics.consul_watch_errors.with_label_values(&[ep.source, "index_reset"]).inc();
                    restores.report(&client.restores, ep.source);
                }
                let outcome = match observed {
                    Observed::Unchanged => Ok(pacer.unchanged(blocking)),
                    _ => handler.answer(&resp.body).map(|changed| match observed {
                        Observed::Fresh | Observed::WentBackwards => Outcome::Fresh,
                        _ if changed => Outcome::Changed,
                        _ => Outcome::Noop,
                    }),
                };
                match outcome {
                    Ok(outcome) => {
                        failures = 0;
                        status.source_ok(ep.source, SystemTime::now());
                        if !matches!(observed, Observed::Unchanged) {
                            answered = true;
                            metrics.discovery_update(ep.source, "ok");
                        }
                        match after_read(&mut pacer, &mut tracker, outcome, blocking, &mut restores, &mut shutdown).await {
                            Some(p) => probe = p,
                            None => return,
                        }
                        continue;
                    }
                    // An answer, not an unreachable agent: full backoff.
                    Err(e) => ("bad_body", e, false),
                }
            }
            Err(e) => (e.kind(), e.to_string(), agent_down(&e)),
        };
        handler.holding(false);
        handler.failed();
        answered = false;
        tracker.reset();
        failures += 1;
        metrics.consul_watch_errors.with_label_values(&[ep.source, kind]).inc();
        metrics.discovery_update(ep.source, "error");
        status.source_error(ep.source, format!("{kind}: {msg}"));
        tracing::warn!(source = ep.source, kind, error = %msg, "{}", ep.consequence);
        if !back_off(&client, backoff(failures), may_wake, &mut restores, &mut shutdown).await {
            return;
        }
    }
}
