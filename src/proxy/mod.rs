//! The request path: Pingora's `ProxyHttp` over the routing snapshot.
//!
//! Per request: load the table once (so one request sees one generation),
//! match a route, pick a backend, forward. No locks and no shared writes on
//! this path except counters. Failures are answered here with short
//! plain-text bodies: 404 (no route), 503 + `Retry-After` (no backends),
//! 502 (backends failed), 504 (backend timed out).

mod express;
pub(crate) mod h1;
mod h2;
mod head;
pub(crate) mod inbound;
pub(crate) mod headers;
mod park;
mod pool;
mod strict;

use crate::accesslog::{AccessLog, AccessRecord};
use crate::error::{upstream_error, ProxyFailure};
use crate::metrics::{Metrics, Outcome};
use crate::routing::{InFlight, RequestView, RoutingTable};
use crate::snapshot::Snapshot;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::Stream;
use pingora::protocols::GetSocketDigest;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{FailToProxy, HttpProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

pub use headers::RequestIds;

/// Seconds a client is told to wait when a cluster has no backends.
pub const RETRY_AFTER_SECS: &str = "5";

/// What both request paths (Pingora's `HttpProxy` and the express path)
/// share: the snapshot, metrics, the access log and request ids.
pub struct Core {
    snapshot: Arc<Snapshot>,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    ids: RequestIds,
}

impl Core {
    pub fn new(snapshot: Arc<Snapshot>, metrics: Arc<Metrics>, access_log: AccessLog) -> Arc<Self> {
        Arc::new(Core {
            snapshot,
            metrics,
            access_log,
            ids: RequestIds::new(),
        })
    }

    fn new_ctx(&self) -> Ctx {
        self.metrics.requests_in_flight.inc();
        Ctx {
            start: Instant::now(),
            table: None,
            route: None,
            cluster: None,
            backend: None,
            tried: Tried::default(),
            inflight: None,
            request_id: http::HeaderValue::from_static(""),
            upstream_start: None,
            response_started: false,
            local_status: 0,
            location: None,
            body_bytes: 0,
            _gauge: RequestGauge(self.metrics.requests_in_flight.clone()),
        }
    }

    /// Load the table, give the request its id, and find its route and
    /// cluster (recorded in `ctx`). Some: the failure to answer instead (no
    /// route: 404; a cluster without backends: 503), with `ctx.local_status`
    /// set.
    /// A route with `https_redirect` answers a cleartext request (`tls`
    /// false) with a redirect to HTTPS. A route in maintenance answers 503
    /// to every client outside its `allow` list.
    fn route<R: RequestView + ?Sized>(
        &self,
        req: &R,
        absolute: bool,
        tls: bool,
        client: Option<std::net::IpAddr>,
        ctx: &mut Ctx,
    ) -> Option<ProxyFailure> {
        let table = self.snapshot.load();
        ctx.request_id = self.ids.for_request(req);
        let too_large = over_limits(req, &table.limits);
        if let Some((_, reason)) = too_large {
            self.metrics.requests_rejected.with_label_values(&[reason]).inc();
        }
        let route = table.router.find(req.host(), req.path(), absolute);
        let failure = match route {
            None => Some(too_large.map_or(ProxyFailure::NoRoute, |(f, _)| f)),
            Some(ri) => {
                let route = &table.routes[ri];
                let ci = route.cluster;
                ctx.route = Some(ri as u32);
                ctx.cluster = Some(ci);
                if let Some((f, _)) = too_large {
                    Some(f)
                } else if let Some(r) = route.spec.https_redirect.filter(|_| !tls) {
                    match https_location(req, r.port) {
                        Some(location) => {
                            ctx.location = Some(location);
                            Some(ProxyFailure::Redirect(r.status))
                        }
                        None => Some(ProxyFailure::BadRequest),
                    }
                } else if route.spec.maintenance.as_ref().is_some_and(|m| m.applies_to(client)) {
                    Some(ProxyFailure::Maintenance)
                } else {
                    table.clusters[ci as usize].active.is_empty().then_some(ProxyFailure::NoBackends)
                }
            }
        };
        ctx.table = Some(table);
        if let Some(f) = failure {
            ctx.local_status = f.status();
        }
        failure
    }

    /// Metrics and the access log line for a finished request.
    fn log<R: RequestView + ?Sized>(&self, ctx: &mut Ctx, req: &R, client: Option<std::net::IpAddr>, status: u16, bytes: (usize, usize)) {
        ctx.inflight = None;
        let elapsed = ctx.start.elapsed();
        let table = ctx.table.as_deref();
        let route = table.zip(ctx.route).map(|(t, r)| &t.routes[r as usize]);
        match route {
            Some(r) => r.metrics.record(status),
            None => {
                if let Some(t) = table {
                    t.unrouted.record(status)
                }
            }
        }
        if let Some(c) = ctx.cluster() {
            c.duration.observe(elapsed.as_secs_f64());
        }
        if !self.access_log.enabled() {
            return;
        }
        let host = req
            .host()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .unwrap_or_default();
        let record = AccessRecord {
            time: SystemTime::now() - elapsed,
            client,
            method: req.method().to_string(),
            host,
            path: req.path().to_string(),
            status,
            route: route.map(|r| r.name.clone()),
            cluster: ctx.cluster().map(|c| c.name.clone()),
            backend: ctx.backend().map(|b| b.addr),
            upstream_duration: ctx.upstream_start.map(|s| s.elapsed().as_secs_f64()),
            duration: elapsed.as_secs_f64(),
            bytes_in: bytes.0,
            bytes_out: bytes.1,
            attempts: ctx.tried.len() as u32,
            request_id: ctx.request_id.to_str().unwrap_or_default().to_string(),
        };
        self.access_log.log(record);
    }
}

pub struct Proxy {
    core: Arc<Core>,
}

impl Proxy {
    pub fn new(core: Arc<Core>) -> Self {
        Proxy { core }
    }
}

/// Counts a request in flight for as long as its context lives.
pub struct RequestGauge(prometheus::IntGauge);

impl Drop for RequestGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Backends already tried by a request, inline (at most 1 + 10 retries).
#[derive(Default)]
pub struct Tried {
    n: u8,
    ids: [u32; 12],
}

impl Tried {
    fn push(&mut self, i: u32) {
        if (self.n as usize) < self.ids.len() {
            self.ids[self.n as usize] = i;
            self.n += 1;
        }
    }

    fn len(&self) -> usize {
        self.n as usize
    }
}

impl std::ops::Deref for Tried {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.ids[..self.n as usize]
    }
}

pub struct Ctx {
    start: Instant,
    table: Option<Arc<RoutingTable>>,
    route: Option<u32>,
    cluster: Option<u32>,
    backend: Option<u32>,
    tried: Tried,
    inflight: Option<InFlight>,
    request_id: http::HeaderValue,
    upstream_start: Option<Instant>,
    response_started: bool,
    /// Status of a response this proxy generated itself.
    local_status: u16,
    /// `Location` of a redirect this proxy answers with.
    location: Option<http::HeaderValue>,
    /// Request body bytes passed on in the current attempt (checked
    /// against `limits.max_body_bytes` as they stream).
    body_bytes: u64,
    _gauge: RequestGauge,
}

/// The forwarding rules before any table exists: trust no one.
static NO_FORWARDING_TRUST: crate::config::ForwardingSettings = crate::config::ForwardingSettings {
    trusted_proxies: Vec::new(),
    forwarded: false,
};

impl Ctx {
    /// The forwarding rules of the table this request was routed with.
    fn forwarding(&self) -> &crate::config::ForwardingSettings {
        self.table.as_ref().map(|t| &*t.forwarding).unwrap_or(&NO_FORWARDING_TRUST)
    }

    fn route_spec(&self) -> Option<&crate::config::RouteSpec> {
        Some(&self.table.as_ref()?.routes[self.route? as usize].spec)
    }

    fn cluster(&self) -> Option<&crate::routing::Cluster> {
        Some(&self.table.as_ref()?.clusters[self.cluster? as usize])
    }

    fn backend(&self) -> Option<&crate::routing::Backend> {
        Some(&self.cluster()?.backends[self.backend? as usize])
    }

    fn record_outcome(&self, outcome: Outcome) {
        let Some(b) = self.backend() else { return };
        if let Some(m) = b.state.metrics.as_ref() {
            m.record(outcome);
        }
        self.outlier(b, outcome, false);
    }

    /// The backend answered with `status` (both request paths): a
    /// successful attempt, unless the cluster counts 5xx answers as failures.
    fn record_response(&self, status: u16) {
        let Some(b) = self.backend() else { return };
        if let Some(m) = b.state.metrics.as_ref() {
            m.record(Outcome::Ok);
        }
        let failed = status >= 500 && self.cluster().and_then(|c| c.spec.outlier).is_some_and(|o| o.count_5xx);
        self.outlier(b, Outcome::Ok, failed);
    }

    /// Passive outlier detection (both request paths): a backend whose
    /// attempts fail `consecutive_failures` times in a row (connect error,
    /// timeout, TLS failure) is ejected — selection passes it over — for
    /// `base_ejection` times the ejections in a row (at most
    /// `max_ejection`), unless `max_ejected_percent` of the cluster is
    /// ejected already. When the time is up it takes requests again: one
    /// more failure run ejects it for longer, a success resets it.
    /// `failed_5xx`: a 5xx answer the cluster counts as a failure.
    fn outlier(&self, b: &crate::routing::Backend, outcome: Outcome, failed_5xx: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(cluster) = self.cluster() else { return };
        let Some(o) = cluster.spec.outlier else { return };
        let st = &b.state;
        if matches!(outcome, Outcome::Ok) && !failed_5xx {
            if st.failures.load(Relaxed) != 0 {
                st.failures.store(0, Relaxed);
            }
            if st.ejections.load(Relaxed) != 0 {
                st.ejections.store(0, Relaxed);
            }
            return;
        }
        if !failed_5xx && !matches!(outcome, Outcome::ConnectError | Outcome::Timeout | Outcome::TlsError) {
            return;
        }
        if st.failures.fetch_add(1, Relaxed) + 1 < o.consecutive_failures {
            return;
        }
        let now = crate::routing::process_millis();
        if st.ejected(now) {
            return;
        }
        let ejected = cluster.backends.iter().filter(|x| x.state.ejected(now)).count();
        if (ejected + 1) * 100 > cluster.backends.len() * o.max_ejected_percent as usize {
            return;
        }
        st.failures.store(0, Relaxed);
        let n = st.ejections.fetch_add(1, Relaxed) + 1;
        let length = o.base_ejection.saturating_mul(n).min(o.max_ejection);
        let until = now + length.as_millis() as u64;
        st.ejected_until_ms.store(until, Relaxed);
        cluster.state.ejected_until_ms.fetch_max(until, Relaxed);
        // Back from an ejection, a backend ramps up again.
        if let Some(ss) = cluster.spec.slow_start {
            cluster.state.ramp_until_ms.fetch_max(until + ss.window.as_millis() as u64, Relaxed);
        }
        if let Some(m) = st.metrics.as_ref() {
            m.ejections.inc();
        }
        tracing::warn!(cluster = %cluster.name, backend = %b.addr, failures = o.consecutive_failures, ejection = n, for_ms = length.as_millis() as u64, "backend ejected after failed attempts in a row");
    }

    /// A connection to the current backend failed (both request paths):
    /// counted, and a TLS failure — a backend whose certificate does not
    /// verify fails every request, which the operator must hear about — is
    /// logged, at most every 10 s per backend.
    fn connect_failed(&self, e: &Error) {
        let outcome = outcome_of(e);
        self.record_outcome(outcome);
        if outcome != Outcome::TlsError {
            return;
        }
        let (Some(cluster), Some(backend)) = (self.cluster(), self.backend()) else { return };
        // Never 0 on this clock, so 0 means "never logged".
        let now = crate::routing::process_millis();
        let last = backend.state.tls_warned_ms.load(Ordering::Relaxed);
        if (last != 0 && now.saturating_sub(last) < 10_000)
            || backend.state.tls_warned_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let server_name = cluster.spec.tls.as_ref().map(|t| t.server_name.as_str()).unwrap_or("");
        tracing::warn!(
            cluster = %cluster.name,
            backend = %backend.addr,
            server_name,
            error = %e,
            "TLS to backend failed (requests to it fail until its certificate verifies; logged at most every 10 s per backend)"
        );
    }

    /// Whether another attempt is allowed (retry budget left).
    fn budget_left(&self) -> bool {
        self.cluster().is_some_and(|c| (self.tried.len() as u32) <= c.spec.retries)
    }

    /// After a failure to connect: retry on a backend not tried yet.
    fn may_retry_connect(&self) -> bool {
        self.budget_left() && self.cluster().is_some_and(|c| c.has_untried(&self.tried))
    }

    /// After a failure once connected, before any response byte, of a request
    /// that is safe to send again: retry if another backend is left or the
    /// connection was a reused (possibly stale) one.
    fn may_retry_sent(&self, reused: bool) -> bool {
        let target = reused || self.cluster().is_some_and(|c| c.has_untried(&self.tried));
        !self.response_started && target && self.budget_left()
    }

    /// The status to log: the response sent (unless it was cut short after
    /// a failure this proxy answered itself), else the status of this
    /// proxy's own answer, else 499 (the client went away first).
    fn final_status(&self, written: Option<u16>) -> u16 {
        written
            .filter(|_| self.local_status == 0 || self.response_started)
            .unwrap_or(match self.local_status {
                0 => 499,
                s => s,
            })
    }
}

/// The short plain-text response for a failure this proxy decides.
fn failure_response(failure: ProxyFailure, ctx: &Ctx) -> Result<(ResponseHeader, Bytes)> {
    let request_id = &ctx.request_id;
    let maintenance = match failure {
        ProxyFailure::Maintenance => ctx.route_spec().and_then(|r| r.maintenance.as_ref()),
        _ => None,
    };
    let body = match maintenance {
        Some(m) => m.body.clone(),
        None => Bytes::from_static(failure.body().as_bytes()),
    };
    let mut h = ResponseHeader::build(failure.status(), Some(4))?;
    h.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    h.insert_header(http::header::CONTENT_LENGTH, body.len())?;
    match (failure, maintenance) {
        (ProxyFailure::NoBackends, _) => h.insert_header(http::header::RETRY_AFTER, RETRY_AFTER_SECS)?,
        (_, Some(m)) => h.insert_header(http::header::RETRY_AFTER, m.retry_after_secs)?,
        _ => {}
    }
    if let (ProxyFailure::Redirect(_), Some(l)) = (failure, &ctx.location) {
        h.insert_header(http::header::LOCATION, l.clone())?;
    }
    if !request_id.is_empty() {
        h.insert_header("x-request-id", request_id.clone())?;
    }
    Ok((h, body))
}

/// Write a short plain-text response for a failure this proxy decides.
async fn respond(session: &mut Session, failure: ProxyFailure, ctx: &Ctx) -> Result<()> {
    let (h, body) = failure_response(failure, ctx)?;
    let oversized = matches!(failure, ProxyFailure::HeadersTooLarge | ProxyFailure::UriTooLong | ProxyFailure::BodyTooLarge | ProxyFailure::Malformed);
    if oversized || !session.is_body_empty() {
        // The unread request body would poison the next request on this
        // connection; a client over the limits is not served more.
        session.set_keepalive(None);
    }
    let head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(h), head).await?;
    if !head {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Whether a request is larger than `[limits]` allows, and the metric's
/// reason. Checked before routing, on both request paths.
fn over_limits<R: RequestView + ?Sized>(req: &R, limits: &crate::config::Limits) -> Option<(ProxyFailure, &'static str)> {
    let (count, bytes) = req.header_size();
    if count > limits.max_headers || bytes > limits.max_header_bytes {
        return Some((ProxyFailure::HeadersTooLarge, "headers_too_large"));
    }
    if req.path_and_query().len() > limits.max_uri_bytes {
        return Some((ProxyFailure::UriTooLong, "uri_too_long"));
    }
    let declared = req.header("content-length").and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes) {
        return Some((ProxyFailure::BodyTooLarge, "body_too_large"));
    }
    None
}

/// `https://HOST[:port]/path?query` for a request, from its host without
/// the port it came on. None: no usable host.
fn https_location<R: RequestView + ?Sized>(req: &R, port: u16) -> Option<http::HeaderValue> {
    let raw = req.host()?;
    let host = if raw.first() == Some(&b'[') {
        &raw[..=raw.iter().position(|&b| b == b']')?]
    } else {
        raw.split(|&b| b == b':').next()?
    };
    if !headers::host_chars(host) {
        return None;
    }
    let mut out = Vec::with_capacity(16 + host.len() + req.path_and_query().len());
    out.extend_from_slice(b"https://");
    out.extend_from_slice(host);
    if port != 443 {
        out.extend_from_slice(format!(":{port}").as_bytes());
    }
    out.extend_from_slice(req.path_and_query().as_bytes());
    http::HeaderValue::from_bytes(&out).ok()
}

fn outcome_of(e: &Error) -> Outcome {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => Outcome::Timeout,
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError
        | ErrorType::SocketError | ErrorType::BindError => Outcome::ConnectError,
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => Outcome::TlsError,
        _ => Outcome::Error,
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.core.new_ctx()
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // No downstream modules: the default registers a disabled compression
        // module that still costs a call per request.
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Requests pipelined behind this one (HTTP/1.1) are answered after
        // it, in order, instead of being dropped with the connection.
        session.as_mut().set_pipelining_enabled(true);
        let req = session.req_header();
        if !session.is_http2() {
            if let Some(reason) = strict::refusal(req, || session.as_ref().to_h1_raw()) {
                // Counted and logged as an unrouted request, with its id.
                ctx.request_id = self.core.ids.for_request(req);
                ctx.table = Some(self.core.snapshot.load());
                self.core.metrics.requests_rejected.with_label_values(&[reason]).inc();
                ctx.local_status = 400;
                session.set_keepalive(None);
                respond(session, ProxyFailure::Malformed, ctx).await?;
                return Ok(true);
            }
        }
        let absolute = !session.is_http2() && headers::is_absolute_form(req);
        let client = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        match self.core.route(req, absolute, tls, client, ctx) {
            Some(failure) => {
                respond(session, failure, ctx).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(cluster) = ctx.cluster() else {
            return Err(upstream_error(ProxyFailure::NoRoute, "no route"));
        };
        let Some(i) = cluster.pick(session.req_header(), &ctx.tried) else {
            return Err(upstream_error(ProxyFailure::NoBackends, "cluster has no active backends"));
        };
        let backend = &cluster.backends[i as usize];
        let mut peer = Box::new(backend.peer.clone());
        if session.is_upgrade_req() {
            // An upgraded connection (WebSocket) may be silent far longer
            // than a response may take: its own timeout, for the 101 and
            // the tunnel after it.
            peer.options.read_timeout = Some(cluster.spec.tunnel_timeout);
            // And from the client (Pingora's default is 60 s).
            session.as_mut().set_read_timeout(Some(cluster.spec.tunnel_timeout));
        }
        ctx.inflight = Some(InFlight::new(&backend.state));
        ctx.tried.push(i);
        ctx.backend = Some(i);
        ctx.upstream_start = Some(Instant::now());
        // A retry sends the buffered body again, through the body filter.
        ctx.body_bytes = 0;
        Ok(peer)
    }

    /// `limits.max_body_bytes` for bodies without a declared length
    /// (chunked HTTP/1.1, HTTP/2 without `content-length`), counted as they
    /// stream: the piece that passes the limit is not sent. The error ends
    /// the attempt: the upstream connection (holding part of a body) is
    /// closed, never pooled; the client gets 413 unless the response has
    /// started (then its connection is cut), and its connection closes.
    async fn request_body_filter(&self, _session: &mut Session, body: &mut Option<Bytes>, _end: bool, ctx: &mut Ctx) -> Result<()> {
        let Some(b) = body.as_ref() else { return Ok(()) };
        ctx.body_bytes += b.len() as u64;
        let max = ctx.table.as_ref().map_or(u64::MAX, |t| t.limits.max_body_bytes);
        if ctx.body_bytes <= max {
            return Ok(());
        }
        *body = None;
        if ctx.local_status != 413 {
            ctx.local_status = 413;
            self.core.metrics.requests_rejected.with_label_values(&["body_too_large"]).inc();
        }
        let mut e = upstream_error(ProxyFailure::BodyTooLarge, "request body over limits.max_body_bytes");
        // The client's doing: never retried, no backend is blamed.
        e.as_down();
        Err(e)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let client = headers::ClientAddr::of_peer(session.client_addr());
        let req = session.req_header();
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        headers::forwarded(req, session.is_http2(), client.as_ref(), upstream_request, &ctx.request_id, tls, ctx.forwarding())
    }

    /// A failed attempt that is retried is not logged: it is counted per
    /// backend (`switchyard_upstream_requests_total`) and in the access log's
    /// `attempts`, as on the express path; dead backends would otherwise
    /// fill the log with one warning per retried request.
    fn suppress_proxy_warn_log(&self, _session: &Session, _ctx: &Ctx, _error: &Error, context: ProxyWarnLogContext) -> bool {
        matches!(context, ProxyWarnLogContext::UpstreamRetry)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if !ctx.response_started {
            ctx.response_started = true;
            ctx.record_response(upstream_response.status.as_u16());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if !ctx.request_id.is_empty() && !upstream_response.headers.contains_key("x-request-id") {
            upstream_response.insert_header("x-request-id", ctx.request_id.clone())?;
        }
        Ok(())
    }

    fn fail_to_connect(&self, _session: &mut Session, _peer: &HttpPeer, ctx: &mut Ctx, mut e: Box<Error>) -> Box<Error> {
        ctx.connect_failed(&e);
        ctx.inflight = None;
        let retry = ctx.may_retry_connect();
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        if *e.esource() == ErrorSource::Upstream && !ctx.response_started {
            ctx.record_outcome(outcome_of(&e));
        }
        // Safe to send again: an idempotent method whose body (if any) is
        // still buffered.
        let safe = session.req_header().method.is_idempotent() && !session.as_ref().retry_buffer_truncated();
        let retry = safe && ctx.may_retry_sent(client_reused) && *e.esource() == ErrorSource::Upstream;
        if retry {
            ctx.inflight = None;
        }
        e.set_retry(retry);
        e
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        // A client that goes away mid-request is normal traffic, not an error
        // of ours: the access log records it (status 499); don't flood the
        // error log with one line per dropped connection.
        // Neither is a body over `limits.max_body_bytes` (counted by reason).
        *e.esource() == ErrorSource::Downstream
            && matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError | ErrorType::HTTPStatus(413))
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let failure = match (e.etype(), e.esource()) {
            (ErrorType::HTTPStatus(_), _) | (_, ErrorSource::Upstream) => Some(ProxyFailure::classify(e)),
            (ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed, ErrorSource::Downstream) => None,
            (_, ErrorSource::Downstream) => {
                // Malformed request: 400 for this connection only.
                session.set_keepalive(None);
                let _ = session.respond_error(400).await;
                ctx.local_status = 400;
                return FailToProxy { error_code: 400, can_reuse_downstream: false };
            }
            _ => Some(ProxyFailure::BadGateway),
        };
        // Pingora closes the connection after a proxy failure: say so in the response.
        session.set_keepalive(None);
        let code = match failure {
            Some(f) if !ctx.response_started => {
                if respond(session, f, ctx).await.is_err() {
                    0
                } else {
                    f.status()
                }
            }
            // Mid-response failures can't become an error page; the connection is cut.
            Some(f) => f.status(),
            None => 0,
        };
        ctx.local_status = code;
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = ctx.final_status(session.response_written().map(|r| r.status.as_u16()));
        let client = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let bytes = (session.body_bytes_read(), session.body_bytes_sent());
        self.core.log(ctx, session.req_header(), client, status, bytes);
    }
}

/// The listener-side app around Pingora's `HttpProxy`:
///
/// * keeps `switchyard_downstream_connections` current (inc/dec around the
///   connection, which Pingora keeps inside `process_new` while it lives);
/// * on h2c listeners, tells HTTP/2 from HTTP/1 by the first bytes *as they
///   arrive*. Pingora's own detection waits for 24 bytes (the length of the
///   HTTP/2 preface), so a complete HTTP/1 request shorter than that — the
///   18-byte `GET / HTTP/1.0` a health checker sends — would hang until the
///   client gave up. HTTP/1 connections are then served here, with the same
///   keep-alive loop Pingora uses; HTTP/2 ones (h2c, or TLS with ALPN
///   `h2`) go to Pingora, under the `[limits]` timeouts (see [`h2`]).
pub struct ProxyApp {
    inner: Arc<HttpProxy<Proxy>>,
    /// For the `[limits]` of the connection loops.
    snapshot: Arc<Snapshot>,
    express: Option<express::Express>,
    gauge: prometheus::IntGauge,
    h2c: bool,
    /// More than one worker thread: see [`rehome`].
    rehome: bool,
    /// Idle time after which a plain-TCP client connection is parked (see
    /// [`park`]); None: never.
    park_after: Option<std::time::Duration>,
    /// `switchyard_downstream_connections_parked`.
    parked: prometheus::IntGauge,
    /// `switchyard_downstream_parks_total`.
    parks: prometheus::IntCounter,
    /// `switchyard_requests_rejected_total`.
    rejected: prometheus::IntCounterVec,
    /// `switchyard_requests_rejected_total{reason="header_timeout"}`.
    header_timeouts: prometheus::IntCounter,
    /// `limits.max_connections` when not set.
    default_max_connections: usize,
    /// `switchyard_downstream_connections_refused_total`.
    refused: prometheus::IntCounter,
}

impl ProxyApp {
    /// `express`: the express path's shared state, or None to send every
    /// request through `inner`. `conf`: worker threads and upstream
    /// connector settings. `park_after`: idle time after which a client
    /// connection is parked (None: never).
    pub fn new(
        inner: HttpProxy<Proxy>,
        snapshot: Arc<Snapshot>,
        conf: &pingora::server::configuration::ServerConf,
        express: Option<Arc<Core>>,
        metrics: &Metrics,
        park_after: Option<std::time::Duration>,
    ) -> Self {
        let h2c = inner.server_options.as_ref().is_some_and(|o| o.h2c);
        ProxyApp {
            inner: Arc::new(inner),
            snapshot,
            express: express.map(|core| express::Express::new(core, conf)),
            rehome: conf.threads > 1 && !conf.work_stealing,
            gauge: metrics.downstream_connections.clone(),
            parked: metrics.downstream_connections_parked.clone(),
            parks: metrics.downstream_parks.clone(),
            rejected: metrics.requests_rejected.clone(),
            header_timeouts: metrics.requests_rejected.with_label_values(&["header_timeout"]),
            default_max_connections: crate::config::default_max_connections(),
            refused: metrics.downstream_connections_refused.clone(),
            park_after,
            h2c,
        }
    }

    /// Serve a plain TCP connection until it closes: HTTP/1 here, HTTP/2 (a
    /// new connection on an h2c listener that starts with the preface)
    /// through Pingora. Between requests the connection waits in
    /// [`next_request`], a small future, so an idle keep-alive connection
    /// holds no proxy state (Pingora's own loop keeps its per-request
    /// future, ~14 KB, alive while waiting); after `park_idle_after` it is
    /// parked. `at`: requests it may still serve, and whether it is new.
    /// `guard` counts it as open. `until`: when it is closed if no bytes
    /// come (a new connection: when its first head must be complete).
    async fn serve(
        self: Arc<Self>,
        mut tcp: Box<L4Stream>,
        shutdown: ShutdownWatch,
        mut guard: RequestGauge,
        mut at: park::Resume,
        until: tokio::time::Instant,
    ) {
        let shutdown = &shutdown;
        let express = self.express.as_ref();
        let peer = tcp.get_socket_digest().and_then(|d| d.peer_addr()?.as_inet().copied());
        let client = peer.map(|a| headers::ClientAddr::new(a.ip()));
        // Only connections from an internet address are parked.
        let park_after = if peer.is_some() { self.park_after } else { None };
        let limits = self.snapshot.limits();
        let mut wait = Wait { park_after, until: Some(until), fresh: true, idle: limits.keepalive_timeout, header: limits.header_timeout };
        loop {
            wait.fresh = at.fresh;
            let ahead = if at.fresh && self.h2c {
                match sniff_h2(&mut tcp, express.is_some(), shutdown, wait).await {
                    Some(ahead) => ahead,
                    // HTTP/2: Pingora reads the preface again (from the
                    // rewound bytes) and serves the whole connection (its
                    // HTTP/2 handling never hands a stream back).
                    None => {
                        let _guard = guard;
                        // Its first request is due when an HTTP/1 one's
                        // head would be.
                        let first_by = wait.until.unwrap_or_else(|| tokio::time::Instant::now() + wait.header);
                        self.serve_h2(tcp, shutdown, first_by).await;
                        return;
                    }
                }
            } else {
                next_request(&mut tcp, shutdown, express.is_some(), wait).await
            };
            let limits = self.snapshot.limits();
            wait = Wait { park_after, until: None, fresh: false, idle: limits.keepalive_timeout, header: limits.header_timeout };
            // Requests this connection may still serve after the current
            // one (None: no limit), as Pingora counts them.
            let remaining = at.remaining;
            match ahead {
                Ahead::Closed => return,
                Ahead::Malformed(reason) => {
                    self.rejected.with_label_values(&[reason]).inc();
                    answer_and_close(&mut tcp, &malformed_response()).await;
                    return;
                }
                Ahead::TimedOut => {
                    self.header_timeouts.inc();
                    answer_and_close(&mut tcp, &head::timeout_response()).await;
                    return;
                }
                Ahead::Park(deadline) => match self.park(tcp, shutdown, guard, at, deadline, peer) {
                    Ok(()) => return,
                    Err((t, g)) => {
                        // Not parked: wait on here until the same deadline,
                        // as before parking existed.
                        (tcp, guard) = (t, g);
                        wait = Wait { park_after: None, until: Some(deadline), ..wait };
                        continue;
                    }
                },
                Ahead::Express(req) => {
                    let Some(express) = express else { return };
                    let keepalive = !*shutdown.borrow() && remaining != Some(0) && !req.close;
                    // Boxed per request so that an idle connection's future
                    // stays small.
                    if !Box::pin(express.serve(&mut *tcp, &req, client.as_ref(), keepalive)).await {
                        // Dropping the stream closes it: the response is
                        // written and flushed, so `close` sends a FIN. If
                        // the client has sent more since (a pipelined next
                        // request while this proxy closes), the kernel
                        // resets the connection instead, with or without a
                        // `shutdown` first (as on Pingora's path), so that
                        // call is not made.
                        return;
                    }
                }
                Ahead::Proxy(rest, follow) => {
                    // A body that goes on past the bytes read ahead (and
                    // requests pipelined after it) are read by Pingora: the
                    // stream is then wrapped to follow their framing.
                    let stream: Stream = if follow {
                        Box::new(head::HeadClock::framing_only(tcp, self.header_timeouts.clone(), self.rejected.clone()))
                    } else {
                        tcp
                    };
                    let mut session = ServerSession::new_http1(stream);
                    session.set_keepalive_reuses_remaining(remaining);
                    // As Pingora does: no keep-alive once shutting down. The
                    // idle wait after the request is this loop's.
                    if *shutdown.borrow() {
                        session.set_keepalive(None);
                    } else {
                        session.set_keepalive(Some(keepalive_secs(limits.keepalive_timeout)));
                    }
                    let Some(mut reused) = self.inner.process_new_http(session, shutdown).await else { return };
                    if follow {
                        loop {
                            // Pingora may hold bytes it read past this body
                            // (a pipelined next request) in the settings it
                            // hands back, which it alone can read: the rest
                            // of this connection is served by it, as its own
                            // loop does.
                            let (stream, settings) = reused.consume();
                            let Ok(mut clock) = stream.into_any().downcast::<head::HeadClock>() else { return };
                            clock.rearm_answer();
                            let mut session = ServerSession::new_http1(clock);
                            if let Some(s) = settings {
                                s.apply_to_session(&mut session);
                            }
                            if *shutdown.borrow() {
                                session.set_keepalive(None);
                            }
                            let Some(r) = self.inner.process_new_http(session, shutdown).await else { return };
                            reused = r;
                        }
                    }
                    let (stream, _) = reused.consume();
                    let Ok(next) = stream.into_any().downcast::<L4Stream>() else { return };
                    tcp = next;
                    tcp.rewind(&rest);
                }
            }
            at = park::Resume {
                remaining: remaining.map(|r| r.saturating_sub(1)),
                fresh: false,
            };
        }
    }

    /// Serve an HTTP/1 connection over TLS until it closes: Pingora's own
    /// keep-alive loop (as in its `process_new`), with the idle time between
    /// requests from `[limits]`, read again before each request. Pingora
    /// reads the heads: [`head::HeadClock`] holds their deadlines (the first
    /// counted from here, just after the handshake).
    async fn serve_tls(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let limits = self.snapshot.limits();
        let until = tokio::time::Instant::now() + limits.header_timeout;
        let clock = head::HeadClock::new(stream, until, limits.header_timeout, self.header_timeouts.clone(), self.rejected.clone());
        let mut session = ServerSession::new_http1(Box::new(clock));
        session.set_keepalive_reuses_remaining(self.inner.server_options().and_then(|o| o.keepalive_request_limit));
        loop {
            // As Pingora does: no keep-alive once shutting down.
            if *shutdown.borrow() {
                session.set_keepalive(None);
            } else {
                session.set_keepalive(Some(keepalive_secs(self.snapshot.limits().keepalive_timeout)));
            }
            let Some(reused) = self.inner.process_new_http(session, shutdown).await else { return };
            let (stream, settings) = reused.consume();
            let Ok(mut clock) = stream.into_any().downcast::<head::HeadClock>() else { return };
            let limits = self.snapshot.limits();
            clock.arm(tokio::time::Instant::now() + limits.keepalive_timeout, limits.header_timeout);
            session = ServerSession::new_http1(clock);
            // Requests left, pipelined bytes read ahead, pipelining on.
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
        }
    }

    /// Park an idle connection (see [`park`]). Err: it could not be, and
    /// is handed back.
    fn park(
        self: &Arc<Self>,
        tcp: Box<L4Stream>,
        shutdown: &ShutdownWatch,
        guard: RequestGauge,
        at: park::Resume,
        deadline: tokio::time::Instant,
        peer: Option<std::net::SocketAddr>,
    ) -> std::result::Result<(), (Box<L4Stream>, RequestGauge)> {
        let Some(parker) = park::Parker::of(self, shutdown) else { return Err((tcp, guard)) };
        let Ok(fd) = dup_socket(&tcp) else { return Err((tcp, guard)) };
        parker.park(tcp, park::Parked::new(fd, at, deadline, peer, guard, &self.parked))?;
        self.parks.inc();
        Ok(())
    }

    /// Serve a parked connection again, in a task of its own on this thread.
    /// `deadline`: the one it was parked with.
    #[allow(clippy::too_many_arguments)]
    fn resume(
        self: &Arc<Self>,
        tcp: std::net::TcpStream,
        at: park::Resume,
        deadline: tokio::time::Instant,
        guard: RequestGauge,
        peer: Option<std::net::SocketAddr>,
        shutdown: &ShutdownWatch,
    ) {
        // Dropping the socket on failure closes the connection.
        let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) else { return };
        let stream = adopt(tcp, peer.map(pingora::protocols::l4::socket::SocketAddr::Inet));
        tokio::spawn(self.clone().serve(stream, shutdown.clone(), guard, at, deadline));
    }
}

/// Answer a connection over `limits.max_connections`: `503` with
/// `Retry-After` and `Connection: close` (HTTP/2 over TLS: closed at once,
/// it cannot take an HTTP/1 answer), then the end of the stream, then what
/// the client sends is read and dropped until it closes (64 KiB, 1 s at
/// most): closing with its request unread would reset the connection, and
/// the client could lose the answer. Not counted as open meanwhile.
async fn refuse(mut stream: Stream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if matches!(stream.selected_alpn_proto(), Some(pingora::protocols::ALPN::H2)) {
        return;
    }
    let answer = h1::closing_response(503, b"Service Unavailable", "too many connections\n", &[(b"Retry-After", RETRY_AFTER_SECS.as_bytes())]);
    let exchange = async {
        stream.write_all(&answer).await?;
        stream.flush().await?;
        AsyncWriteExt::shutdown(&mut stream).await?;
        let (mut buf, mut total) = ([0u8; 4096], 0);
        while total < 64 * 1024 {
            match stream.read(&mut buf).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), exchange).await;
}

/// What the bytes read ahead of a request say.
#[derive(Debug)]
enum Ahead {
    /// A request the express path serves (its head, taken off the stream).
    Express(Box<h1::RawRequest>),
    /// Anything else, for Pingora's `HttpProxy` (bytes put back), with
    /// the bytes of pipelined requests after it, held back until it is
    /// answered (Pingora would drop them); true: Pingora reads past these
    /// bytes (see [`reads_past`]).
    Proxy(Vec<u8>, bool),
    /// A malformed request line ([`strict::bad_request_line`]): answered
    /// 400 here, and the connection closed. The reason as counted.
    Malformed(&'static str),
    /// The connection closed, failed, idled out or the server is stopping.
    Closed,
    /// Part of a head came, but not all of it within `limits.header_timeout`.
    TimedOut,
    /// Idle for `park_idle_after`: park it, to close at this deadline if
    /// nothing arrives.
    Park(tokio::time::Instant),
}

/// Largest request head the express path looks at (longer ones go to
/// `HttpProxy`).
const EXPRESS_HEAD_MAX: usize = 8 * 1024;

/// Longest request head read here: Pingora's own limit (it refuses a longer
/// one with 400), so a head that goes to it is always whole.
pub(super) const HEAD_MAX: usize = 1024 * 1024;

/// Say which path serves the request whose first bytes are `buf`: the
/// express path (if `express`) takes the head off the stream, anything else
/// is put back for `HttpProxy`. A head not all there yet is read on here
/// until it is whole, by `until` (None: `header_timeout` from now): so no
/// head reaches Pingora, which times each read only, in pieces.
async fn classify(tcp: &mut L4Stream, buf: Vec<u8>, express: bool, until: Option<tokio::time::Instant>, header_timeout: std::time::Duration) -> Ahead {
    use h1::{RawRequest, Verdict};
    use tokio::io::AsyncReadExt;
    let mut head = if express {
        match RawRequest::parse(buf) {
            Verdict::Express(r) => return express_ahead(tcp, r),
            Verdict::Refused(b) => return for_proxy(tcp, b),
            Verdict::Partial(b) => b,
        }
    } else if head::ends_a_head(&buf) {
        return for_proxy(tcp, buf);
    } else {
        buf
    };
    let mut end = head::HeadEnd::default();
    if end.feed(&head).is_some() {
        return for_proxy(tcp, head);
    }
    // Only a head that is not whole in its first read gets here: the clock
    // is read off the common path.
    let until = until.unwrap_or_else(|| tokio::time::Instant::now() + header_timeout);
    loop {
        if head.len() > HEAD_MAX {
            return for_proxy(tcp, head);
        }
        let n = head.len();
        head.reserve(READ_AHEAD);
        match tokio::time::timeout_at(until, tcp.read_buf(&mut head)).await {
            Err(_) => return Ahead::TimedOut,
            Ok(Ok(0)) | Ok(Err(_)) => return Ahead::Closed,
            Ok(Ok(_)) => {}
        }
        if end.feed(&head[n..]).is_none() {
            continue;
        }
        if !express || head.len() > EXPRESS_HEAD_MAX {
            return for_proxy(tcp, head);
        }
        return match RawRequest::parse(head) {
            Verdict::Express(r) => express_ahead(tcp, r),
            Verdict::Partial(h) | Verdict::Refused(h) => for_proxy(tcp, h),
        };
    }
}

/// A request for the express path; the bytes of a pipelined next request
/// go back onto the stream, to be read when this one is answered.
fn express_ahead(tcp: &mut L4Stream, mut r: Box<h1::RawRequest>) -> Ahead {
    if !r.ahead.is_empty() {
        tcp.rewind(&std::mem::take(&mut r.ahead));
    }
    Ahead::Express(r)
}

/// Bytes for `HttpProxy`: put back up to the end of the first request;
/// pipelined requests after it are held back (Pingora drops bytes that
/// arrive after a request) and put back once it is answered.
fn for_proxy(tcp: &mut L4Stream, mut buf: Vec<u8>) -> Ahead {
    if strict::bad_request_line(&buf) {
        return Ahead::Malformed(strict::BAD_REQUEST_LINE);
    }
    let rest = match h1::pipelined_after(&buf) {
        Some(end) => buf.split_off(end),
        None => Vec::new(),
    };
    let follow = reads_past(&buf);
    tcp.rewind(&buf);
    Ahead::Proxy(rest, follow)
}

/// Whether Pingora, reading the request whose complete head starts `buf`,
/// reads past `buf` (and may read a pipelined next request too): its body
/// goes on past `buf`, or is chunked (whose end is not looked for here), or
/// it asks for an upgrade (what follows is a tunnel's or the next
/// request's, by the answer). Such a connection's stream is wrapped to
/// follow its framing ([`inbound`]), which also refuses a bad first chunk.
fn reads_past(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = req.parse(buf) else { return false };
    let mut end = n;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") || h.name.eq_ignore_ascii_case("upgrade") {
            return true;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
            end = n.saturating_add(len.unwrap_or(usize::MAX));
        }
    }
    end > buf.len()
}

type L4Stream = pingora::protocols::l4::stream::Stream;

/// The answer to a request refused before any parser ran: `400` with the
/// body `HttpProxy` sends for a malformed request (the connection closes).
fn malformed_response() -> Vec<u8> {
    h1::closing_response(400, b"Bad Request", ProxyFailure::Malformed.body(), &[])
}

/// Write a last answer (the connection closes after it); a client that
/// reads nothing holds this up for at most a second.
async fn answer_and_close(tcp: &mut L4Stream, answer: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let write = async {
        tcp.write_all(answer).await?;
        tcp.flush().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
}

/// `limits.keepalive_timeout` as Pingora's session takes it: whole seconds,
/// rounded up (0 would mean no limit).
fn keepalive_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}


/// Most bytes read ahead while waiting for a request. Sized for a browser's
/// request head with cookies (typically 0.5–1.5 KB): a longer head costs
/// one more `read` before the express path can decide (at 512 bytes, a 1 KB
/// head cost 9 % more CPU per request). The buffer exists only while a read
/// is polled ([`read_ahead`]), so idle connections do not hold it.
const READ_AHEAD: usize = 2048;

/// Read what has arrived (up to `room` bytes, at most [`READ_AHEAD`]) into a
/// buffer sized to it. The stack buffer lives only during each poll, so a
/// connection waiting here holds no buffer at all. None: closed or failed.
fn read_ahead(tcp: &mut L4Stream, room: usize) -> impl std::future::Future<Output = Option<Vec<u8>>> + '_ {
    use std::mem::MaybeUninit;
    use std::task::Poll;
    std::future::poll_fn(move |cx| {
        let mut buf = [MaybeUninit::<u8>::uninit(); READ_AHEAD];
        let mut rb = tokio::io::ReadBuf::uninit(&mut buf[..room.min(READ_AHEAD)]);
        match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut *tcp), cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => Poll::Ready(Some(rb.filled().to_vec())),
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
}

/// A connection's first bytes after a wait, or why there are none.
enum First {
    Bytes(Vec<u8>),
    /// Closed, failed, idled out or the server is stopping.
    Closed,
    /// Idle for `park_after`: park it, with this deadline.
    Park(tokio::time::Instant),
}

/// How an idle connection waits for bytes.
#[derive(Debug, Clone, Copy)]
struct Wait {
    /// Parked after this long (None: never).
    park_after: Option<std::time::Duration>,
    /// Closed at this time (None: the idle timeout from now).
    until: Option<tokio::time::Instant>,
    /// No request has been read from this connection yet.
    fresh: bool,
    /// The idle timeout (`limits.keepalive_timeout`), when `until` is None.
    idle: std::time::Duration,
    /// `limits.header_timeout`.
    header: std::time::Duration,
}

/// On shutdown, how long a connection that has not sent its first request
/// yet still gets for it. Its client has a request on the way (it just
/// connected); closing it would fail that request. This matters most during
/// `run --upgrade`, when both processes accept on the same sockets and the
/// old one stops with connections it has just accepted.
const FRESH_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The server is stopping: serve bytes that have already arrived (the
/// response then closes the connection), and give a fresh connection
/// [`FRESH_GRACE`] for its first request; otherwise close.
async fn last_bytes(tcp: &mut L4Stream, room: usize, fresh: bool) -> First {
    let grace = if fresh { FRESH_GRACE } else { std::time::Duration::ZERO };
    // `timeout` polls the read once before it looks at the clock, so with a
    // zero grace it still takes bytes that are already there.
    match tokio::time::timeout(grace, read_ahead(tcp, room)).await {
        Ok(Some(b)) => First::Bytes(b),
        _ => First::Closed,
    }
}

/// Wait for bytes on an idle connection (reading what has arrived, up to
/// `room` bytes), until it times out, is to be parked, or the server shuts
/// down.
async fn first_bytes(tcp: &mut L4Stream, room: usize, shutdown: &ShutdownWatch, wait: Wait) -> First {
    let mut sd = shutdown.clone();
    if *sd.borrow() {
        return last_bytes(tcp, room, wait.fresh).await;
    }
    let now = tokio::time::Instant::now();
    let deadline = wait.until.unwrap_or(now + wait.idle);
    let park_at = wait.park_after.map(|d| now + d).filter(|&t| t < deadline);
    let first = tokio::select! {
        r = read_ahead(tcp, room) => match r {
            Some(b) => First::Bytes(b),
            None => First::Closed,
        },
        _ = tokio::time::sleep_until(park_at.unwrap_or(deadline)) => match park_at {
            Some(_) => First::Park(deadline),
            None => First::Closed,
        },
        _ = sd.changed() => return last_bytes(tcp, room, wait.fresh).await,
    };
    first
}

/// Wait for the next request's first bytes on an idle keep-alive connection
/// (as [`first_bytes`]) and classify them.
async fn next_request(tcp: &mut L4Stream, shutdown: &ShutdownWatch, express: bool, wait: Wait) -> Ahead {
    match first_bytes(tcp, READ_AHEAD, shutdown, wait).await {
        // A new connection's head is due when its wait ends.
        First::Bytes(b) => classify(tcp, b, express, wait.until.filter(|_| wait.fresh), wait.header).await,
        First::Closed => Ahead::Closed,
        First::Park(deadline) => Ahead::Park(deadline),
    }
}

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Read the first bytes until they either differ from the HTTP/2 preface
/// (HTTP/1: then classified as by [`next_request`]) or complete it (HTTP/2),
/// then put them back. None: HTTP/2. The wait for the first bytes is as
/// [`first_bytes`].
async fn sniff_h2(stream: &mut L4Stream, express: bool, shutdown: &ShutdownWatch, wait: Wait) -> Option<Ahead> {
    let mut got = match first_bytes(stream, READ_AHEAD, shutdown, wait).await {
        First::Bytes(b) => b,
        First::Closed => return Some(Ahead::Closed),
        First::Park(deadline) => return Some(Ahead::Park(deadline)),
    };
    // A new connection's first head is due when its wait ends.
    let until = wait.until.unwrap_or_else(|| tokio::time::Instant::now() + wait.header);
    loop {
        let m = got.len().min(H2_PREFACE.len());
        if got[..m] != H2_PREFACE[..m] {
            return Some(classify(stream, got, express, Some(until), wait.header).await);
        }
        if got.len() >= H2_PREFACE.len() {
            stream.rewind(&got);
            return None;
        }
        match tokio::time::timeout_at(until, read_ahead(stream, READ_AHEAD - got.len())).await {
            Ok(Some(more)) => got.extend_from_slice(&more),
            Ok(None) | Err(_) => return Some(Ahead::Closed),
        }
    }
}

/// Move a connection's socket to the reactor of the runtime serving it.
///
/// With more than one worker thread, Pingora accepts on one runtime and runs
/// each connection's task on another, chosen at random, while the socket
/// stays registered with the accepting runtime's reactor: every readiness
/// event then reaches the task through a cross-thread wake-up (an `eventfd`
/// write and a second thread woken, most requests on most connections). A
/// duplicate descriptor is registered with the current runtime and the
/// original closed (which removes its registration). Per connection: `dup`,
/// two `epoll_ctl` and `close`. Done before anything is read, so no buffered
/// bytes are left behind. Unchanged if any step fails. The new stream has no
/// read or write buffer: a listener's `read_buffer` does not apply, and on
/// the general path a response head and body go out in separate writes.
/// Not done with `work_stealing` (one reactor for all threads).
fn rehome(tcp: Box<L4Stream>) -> Box<L4Stream> {
    let Ok(dup) = dup_socket(&tcp) else { return tcp };
    let Ok(moved) = tokio::net::TcpStream::from_std(std::net::TcpStream::from(dup)) else { return tcp };
    let peer = tcp.get_socket_digest().and_then(|d| d.peer_addr().cloned());
    drop(tcp);
    adopt(moved, peer)
}

/// A second descriptor for `tcp`'s socket (Pingora's stream cannot hand
/// over its own): a move to another reactor, or parking, keeps it and drops
/// the stream.
fn dup_socket(tcp: &L4Stream) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor is owned by `tcp`, which outlives this borrow.
    unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) }.try_clone_to_owned()
}

/// A Pingora stream around `tcp` (registered with this thread's runtime),
/// whose socket digest knows its peer address without asking the kernel.
/// It has no read or write buffer (Pingora sets those only on accept).
fn adopt(tcp: tokio::net::TcpStream, peer: Option<pingora::protocols::l4::socket::SocketAddr>) -> Box<L4Stream> {
    use std::os::fd::AsRawFd;
    let mut stream = L4Stream::from(tcp);
    let digest = pingora::protocols::SocketDigest::from_raw_fd(stream.as_raw_fd());
    let _ = digest.peer_addr.set(peer);
    stream.set_socket_digest(digest);
    Box::new(stream)
}

#[async_trait]
impl ServerApp for ProxyApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        self.gauge.inc();
        let guard = RequestGauge(self.gauge.clone());
        // Two connections arriving at once at the limit may both be
        // refused; never more than the limit are served.
        let max = self.snapshot.limits().max_connections.unwrap_or(self.default_max_connections);
        if self.gauge.get() > max as i64 {
            drop(guard);
            self.refused.inc();
            refuse(stream).await;
            return None;
        }
        if stream.get_ssl_digest().is_some() {
            let _guard = guard;
            if matches!(stream.selected_alpn_proto(), Some(pingora::protocols::ALPN::H2)) {
                // The first request is due as an HTTP/1 one's head over
                // TLS is: `header_timeout` after the handshake.
                let first_by = tokio::time::Instant::now() + self.snapshot.limits().header_timeout;
                self.serve_h2(stream, shutdown, first_by).await;
                return None;
            }
            self.serve_tls(stream, shutdown).await;
            return None;
        }
        let Ok(mut tcp) = stream.into_any().downcast::<L4Stream>() else { return None };
        if self.rehome {
            tcp = rehome(tcp);
        }
        // A plain TCP connection is served by a task of its own, on this
        // runtime, and Pingora's per-connection task ends here: that task is
        // sized for a TLS handshake (~9 KB) and would otherwise be held for
        // as long as the connection stays open, idle or not.
        let at = park::Resume {
            remaining: self.inner.server_options().and_then(|o| o.keepalive_request_limit),
            fresh: true,
        };
        let until = tokio::time::Instant::now() + self.snapshot.limits().header_timeout;
        tokio::spawn(self.clone().serve(tcp, shutdown.clone(), guard, at, until));
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.inner).await
    }
}
