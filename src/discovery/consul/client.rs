//! The HTTP side of talking to a Consul agent: addresses with failover, the
//! ACL token (header only, never `?token=`), TLS, response metadata, a cap on
//! body size, and a count of every request by endpoint and outcome.

use crate::config::ConsulSettings;
use crate::metrics::Metrics;
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Largest response body accepted from the agent.
pub const MAX_BODY: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent: {0}")]
    Connect(String),
    #[error("request timed out")]
    Timeout,
    #[error("HTTP {status}: {body}")]
    Http {
        status: u16,
        body: String,
        /// `X-Consul-Index` of the answer (a missing KV key still has one).
        index: Option<u64>,
    },
    #[error("bad response body: {0}")]
    Body(String),
}

impl ClientError {
    /// Label for `switchyard_consul_watch_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect(_) => "connect",
            ClientError::Timeout => "timeout",
            ClientError::Http { status: 403, .. } => "forbidden",
            ClientError::Http { status: 429, .. } => "rate_limited",
            ClientError::Http { status, .. } if *status >= 500 => "server_error",
            ClientError::Http { .. } => "http_error",
            ClientError::Body(_) => "bad_body",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub index: Option<u64>,
    /// `X-Consul-LastContact` in ms; absent with the streaming backend.
    pub last_contact_ms: Option<u64>,
    pub body: Bytes,
}

/// Permits for short (non-blocking) requests and writes.
pub const SHORT_PERMITS: usize = 4;

/// `max_watches` is the whole connection budget towards the agent: short
/// requests get [`SHORT_PERMITS`] of it, blocking queries the rest.
pub fn blocking_budget(settings: &ConsulSettings) -> usize {
    settings.max_watches.saturating_sub(SHORT_PERMITS).max(1)
}

pub struct ConsulClient {
    http: reqwest::Client,
    /// Connection budget: a blocking query holds a connection for up to
    /// `wait`, so they get `max_watches` (+1 for the catalog watch) permits;
    /// short reads and writes share a few more.
    blocking: tokio::sync::Semaphore,
    short: tokio::sync::Semaphore,
    bases: Vec<String>,
    current: AtomicUsize,
    token: RwLock<Option<String>>,
    settings: ConsulSettings,
    metrics: Arc<Metrics>,
    /// "The indexes went backwards": every watch of this client re-reads.
    pub restores: super::pace::Restores,
    /// Watches backing off, woken when the agent answers again.
    pub recovery: super::pace::Recovery,
}

fn load_pem_certs(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

impl ConsulClient {
    pub fn new(settings: &ConsulSettings, metrics: Arc<Metrics>) -> Result<ConsulClient, String> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(90))
            // No idle pool: the client may race a new connection against an idle
            // one, which would break the budget. One connection per request keeps
            // open connections ≤ permits; a blocking query lasts minutes anyway.
            .pool_max_idle_per_host(0)
            .tcp_nodelay(true)
            .no_proxy()
            .gzip(true)
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")));
        let tls = &settings.tls;
        if let Some(ca) = &tls.ca_file {
            for c in load_pem_certs(ca)? {
                b = b.add_root_certificate(c);
            }
        }
        if let Some(dir) = &tls.ca_path {
            let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for e in entries.flatten() {
                if e.path().is_file() {
                    if let Ok(certs) = load_pem_certs(&e.path()) {
                        for c in certs {
                            b = b.add_root_certificate(c);
                        }
                    }
                }
            }
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            let mut pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
            pem.extend(std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?);
            b = b.identity(reqwest::Identity::from_pem(&pem).map_err(|e| format!("client certificate: {e}"))?);
        }
        if !tls.verify {
            b = b.danger_accept_invalid_certs(true);
        }
        let mut bases = settings.addresses.clone();
        // TLS server name: connect to the configured address, but verify (and
        // send SNI for) the server name, by resolving that name to the address.
        if let Some(name) = &tls.server_name {
            for base in bases.iter_mut() {
                let Ok(url) = reqwest::Url::parse(base) else { continue };
                if url.scheme() != "https" {
                    continue;
                }
                let port = url.port_or_known_default().unwrap_or(443);
                let host = url.host_str().unwrap_or("").to_string();
                let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .map(|a| a.collect())
                    .unwrap_or_default();
                if let Some(a) = addrs.first() {
                    b = b.resolve(name, *a);
                    *base = format!("https://{name}:{port}{}", url.path().trim_end_matches('/'));
                }
            }
        }
        let http = b.build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(ConsulClient {
            http,
            blocking: tokio::sync::Semaphore::new(blocking_budget(settings)),
            short: tokio::sync::Semaphore::new(SHORT_PERMITS),
            bases,
            current: AtomicUsize::new(0),
            token: RwLock::new(settings.token.as_ref().map(|t| t.0.clone())),
            settings: settings.clone(),
            restores: super::pace::Restores::new(metrics.clone()),
            recovery: super::pace::Recovery::default(),
            metrics,
        })
    }

    pub fn settings(&self) -> &ConsulSettings {
        &self.settings
    }

    /// Re-read the token file (after a 403: the token may have been rotated).
    pub fn reload_token(&self) {
        if let Some(f) = &self.settings.token_file {
            if let Ok(t) = std::fs::read_to_string(f) {
                let t = t.trim().to_string();
                *self.token.write().unwrap_or_else(|e| e.into_inner()) = Some(t).filter(|t| !t.is_empty());
            }
        }
    }

    /// Base URL of the agent in use.
    pub fn current_base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    /// Send a request. `path` starts with `/v1/`; `query` pairs are encoded
    /// here (`None` value: a bare key such as `stale`). On a connection error
    /// the next agent address is tried at once, each address once.
    pub async fn request(
        &self,
        method: reqwest::Method,
        endpoint: &'static str,
        path: &str,
        query: &[(&str, Option<&str>)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        let is_blocking = query.iter().any(|(k, _)| *k == "index");
        let _permit = if is_blocking { self.blocking.acquire().await } else { self.short.acquire().await }
            .map_err(|_| ClientError::Connect("client closed".into()))?;
        let n = self.bases.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = ClientError::Connect("no agent address".into());
        for k in 0..n {
            let i = (start + k) % n;
            let mut url = reqwest::Url::parse(&format!("{}{}", self.bases[i], path))
                .map_err(|e| ClientError::Body(format!("bad URL: {e}")))?;
            {
                let mut q = url.query_pairs_mut();
                for (k, v) in query {
                    match v {
                        Some(v) => q.append_pair(k, v),
                        None => q.append_key_only(k),
                    };
                }
            }
            if url.query() == Some("") {
                url.set_query(None);
            }
            let mut req = self.http.request(method.clone(), url).timeout(timeout);
            if let Some(t) = self.token.read().unwrap_or_else(|e| e.into_inner()).as_deref() {
                req = req.header("X-Consul-Token", t);
            }
            if let Some(b) = &body {
                req = req.header("Content-Type", "application/json").body(b.clone());
            }
            match self.send(req).await {
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
                    self.metrics.consul_request(endpoint, "200");
                    return Ok(r);
                }
                Err(e) => {
                    let code = match &e {
                        ClientError::Http { status, .. } => status.to_string(),
                        ClientError::Timeout => "timeout".into(),
                        ClientError::Connect(_) => "connect_error".into(),
                        ClientError::Body(_) => "bad_body".into(),
                    };
                    self.metrics.consul_request(endpoint, &code);
                    // Only an unreachable agent moves us to the next one; an HTTP
                    // answer is the agent speaking for the cluster.
                    if !matches!(e, ClientError::Connect(_)) {
                        self.current.store(i, Ordering::Relaxed);
                        return Err(e);
                    }
                    last = e;
                }
            }
        }
        self.current.store((start + 1) % n, Ordering::Relaxed);
        Err(last)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Response, ClientError> {
        let mut resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                ClientError::Timeout
            } else {
                ClientError::Connect(e.to_string())
            }
        })?;
        let status = resp.status().as_u16();
        let header_u64 = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let index = header_u64("x-consul-index");
        let last_contact_ms = header_u64("x-consul-lastcontact");
        if resp.content_length().is_some_and(|l| l as usize > MAX_BODY) {
            return Err(ClientError::Body(format!("body of {} bytes exceeds {MAX_BODY}", resp.content_length().unwrap_or(0))));
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if body.len() + c.len() > MAX_BODY {
                        return Err(ClientError::Body(format!("body exceeds {MAX_BODY} bytes")));
                    }
                    body.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(ClientError::Timeout),
                Err(e) => return Err(ClientError::Body(e.to_string())),
            }
        }
        if !(200..300).contains(&status) {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_string();
            return Err(ClientError::Http { status, body: text, index });
        }
        Ok(Response {
            index,
            last_contact_ms,
            body: Bytes::from(body),
        })
    }
}
