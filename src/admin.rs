//! The admin API, on its own listener (default `127.0.0.1:9901`):
//! `/healthz` (alive), `/readyz` (every cluster has had a first discovery
//! result), `/metrics` (Prometheus text format), `/status` (JSON: generation,
//! routes, clusters and backends, sources and their last errors), and
//! `POST /reload` (re-read the config file, as SIGHUP does).

use crate::live::{LiveConfig, Outcome};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::status::{unix, StatusBoard};
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub struct Admin {
    pub live: Arc<LiveConfig>,
    pub snapshot: Arc<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<StatusBoard>,
    pub ha: Arc<crate::ha::Ha>,
}

fn reply(code: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static response parts are valid")
}

fn json_reply(code: StatusCode, v: serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    reply(code, "application/json", body)
}

impl Admin {
    /// Seconds since each cluster's source last succeeded (None: never, or static).
    fn staleness(&self, table: &crate::routing::RoutingTable) -> std::collections::BTreeMap<String, Option<f64>> {
        let sources = self.status.sources();
        let now = unix(std::time::SystemTime::now());
        table
            .clusters
            .iter()
            .filter_map(|c| {
                let src = c.spec.discovery.source_name()?;
                let age = sources.get(&src).and_then(|s| s.last_success_unix).map(|t| (now - t).max(0.0));
                Some((c.name.to_string(), age))
            })
            .collect()
    }

    /// Consul-backed clusters whose last successful sync is older than the bound.
    fn stale_clusters(&self, table: &crate::routing::RoutingTable) -> Vec<String> {
        let config = self.live.active();
        let Some(consul) = &config.consul else { return Vec::new() };
        let bound = consul.stale_after.as_secs_f64();
        let ages = self.staleness(table);
        table
            .clusters
            .iter()
            .filter(|c| matches!(c.spec.discovery, crate::config::DiscoverySpec::Consul(_)))
            .filter(|c| ages.get(&*c.name).copied().flatten().is_none_or(|a| a > bound))
            .map(|c| c.name.to_string())
            .collect()
    }

    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let table = self.snapshot.load();
        let pending = table.pending_clusters();
        let kv_pending = self.live.kv_pending();
        let ready = pending.is_empty() && !kv_pending;
        let stale = self.stale_clusters(&table);
        let reason = if ready {
            serde_json::Value::Null
        } else if pending.is_empty() {
            json!("waiting for the first read of the Consul KV settings")
        } else {
            json!(format!(
                "waiting for a first discovery result for cluster(s): {}",
                pending.join(", ")
            ))
        };

        (
            ready,
            json!({
                "ready": ready,
                "generation": table.generation,
                "pending_clusters": pending,
                "kv_pending": kv_pending,
                "stale_clusters": stale,
                "reason": reason,
            }),
        )
    }

    pub fn status_json(&self) -> serde_json::Value {
        let table = self.snapshot.load();
        let swap = self.status.swap();
        let routes: Vec<_> = table
            .routes
            .iter()
            .map(|r| &r.spec)
            .map(|r| {
                let hosts: Vec<String> = r.hosts.iter().map(|h| h.to_string()).collect();
                json!({ "name": r.name, "hosts": hosts, "path_prefix": r.path_prefix, "cluster": r.cluster, "maintenance": r.maintenance.is_some() })
            })
            .collect();
        let ages = self.staleness(&table);
        let panics = self.status.panics();
        let now_ms = crate::routing::process_millis();
        let clusters: Vec<_> = table
            .clusters
            .iter()
            .map(|c| {
                let backends: Vec<_> = c
                    .backends
                    .iter()
                    .map(|b| {
                        json!({
                            "address": b.addr.to_string(),
                            "weight": b.weight,
                            "state": b.state_name(),
                            "in_flight": b.state.in_flight.load(Ordering::Relaxed),
                            // Outlier ejection: milliseconds left, or null.
                            "ejected_for_ms": b.state.ejected(now_ms).then(|| b.state.ejected_until_ms.load(Ordering::Relaxed) - now_ms),
                            // Active health checks: passing, failing, pending, or null (none).
                            "health": b.health.name(),
                            // Slow start: the share (0..1) it gets now, or null (full).
                            "slow_start_share": c.spec.slow_start.and_then(|ss| b.ramp_start(now_ms, ss.window.as_millis() as u64).map(|from| ss.share(now_ms - from) as f64 / 65536.0)),
                            "consecutive_failures": b.state.failures.load(Ordering::Relaxed),
                            "tags": b.endpoint.tags,
                            "meta": b.endpoint.meta,
                        })
                    })
                    .collect();
                json!({
                    "name": &*c.name,
                    "discovery": c.spec.discovery.kind(),
                    "selection": c.selector.name(),
                    "discovered": c.discovered,
                    "source": c.spec.discovery.source_name(),
                    "staleness_seconds": ages.get(&*c.name).copied().flatten(),
                    "panic_mode": panics.iter().any(|p| **p == *c.name),
                    // No backend passes its active health check: all served.
                    "health_failopen": c.health_failopen,
                    "active_backends": c.active.len(),
                    "backends": backends,
                })
            })
            .collect();
        let (ready, _) = self.readiness();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "ready": ready,
            "generation": table.generation,
            "digest": table.digest,
            "built_unix": unix(table.built_at),
            "last_swap_unix": swap.last_swap_unix,
            "swaps": swap.swaps,
            "last_build_error": swap.last_build_error,
            "routes": routes,
            "clusters": clusters,
            "sources": self.status.sources(),
            "tag_errors": self.status.tag_errors(),
            "kv_errors": self.live.status().kv.map(|k| k.errors).unwrap_or_default(),
            "config": self.live.status(),
            "tls": self.live.tls_status(),
            "ha": {
                "ready": self.ha.verdict(),
                "status": self.ha.status(),
            },
        })
    }
}

impl Admin {
    /// No token configured, or `Authorization: Bearer <token>` with it
    /// (compared in constant time).
    fn authorised(&self, req: &pingora::http::RequestHeader) -> bool {
        let config = self.live.active();
        let Some(token) = &config.admin.token else { return true };
        let Some(given) = req.headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
            return false;
        };
        let (a, b) = (given.trim().as_bytes(), token.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// `POST /reload`: re-read the config file; answer once the new config
    /// serves (or has waited [`crate::live::ACTIVATE_WITHIN`] for its new
    /// sources). 200 applied or unchanged, 422 refused.
    async fn reload(&self) -> Response<Vec<u8>> {
        let live = self.live.clone();
        let mut outcome = match tokio::task::spawn_blocking(move || live.reload("admin")).await {
            Ok(o) => o,
            Err(e) => return json_reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "result": "error", "errors": [e.to_string()] })),
        };
        if let (Some(serial), false) = (outcome.serial, outcome.active) {
            let bound = crate::live::ACTIVATE_WITHIN + std::time::Duration::from_secs(1);
            outcome.active = self.live.wait_active(serial, bound).await;
            // Reconcile may have refused it after all (its table did not build).
            if let Some(last) = self.live.status().last.filter(|l| l.serial == Some(serial)) {
                outcome = Outcome { active: outcome.active, ..last };
            }
        }
        let code = if outcome.result == "refused" { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
        let generation = self.snapshot.load().generation;
        let mut v = serde_json::to_value(&outcome).unwrap_or_default();
        v["generation"] = json!(generation);
        json_reply(code, v)
    }
}

/// Whether a query string has `key` as a bare flag or `key=...`.
fn query_has(query: Option<&str>, key: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some(key)))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        // With a token, everything but the health checks needs it.
        let open = matches!(req.uri.path(), "/healthz" | "/readyz" | "/metrics");
        if !open && !self.authorised(req) {
            let mut r = reply(StatusCode::UNAUTHORIZED, "text/plain", b"a bearer token is required (admin.token_file)\n".to_vec());
            r.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            return r;
        }
        if req.uri.path() == "/reload" {
            if req.method != http::Method::POST {
                return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"only POST\n".to_vec());
            }
            return self.reload().await;
        }
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"only GET\n".to_vec());
        }
        match req.uri.path() {
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" if query_has(req.uri.query(), "vrrp") => {
                let v = self.ha.verdict();
                let code = if v.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                let table = self.snapshot.load();
                json_reply(
                    code,
                    json!({ "ready": v.ready, "reasons": v.reasons, "generation": table.generation, "digest": table.digest }),
                )
            }
            "/readyz" => {
                let (ready, body) = self.readiness();
                let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                json_reply(code, body)
            }
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            "/status" => json_reply(StatusCode::OK, self.status_json()),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found; try /healthz /readyz /metrics /status, POST /reload\n".to_vec(),
            ),
        }
    }
}
