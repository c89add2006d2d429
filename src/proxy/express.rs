//! The express path: plain HTTP/1.1 requests without a body, proxied by a
//! short loop over Pingora's HTTP/1 sessions and its upstream connection pool.
//!
//! Pingora's `HttpProxy` runs every request through its general machinery:
//! a ~14 KB boxed future per request, two tasks joined over two channels
//! (request body and response body), a boxed future per `ProxyHttp` hook and
//! several copies of the headers. For the request most sites see most —
//! `GET /page HTTP/1.1` with a `Host`, cookies and no body — none of that is
//! needed. [`eligible`] decides from the request's first bytes, before any
//! session exists, so a request it refuses goes to `HttpProxy` untouched.
//!
//! What the express path does is what `Proxy` (the `ProxyHttp` side) does:
//! the same routing, backend selection, retries, failure responses,
//! forwarding headers, metrics and access log, through the same [`Core`] and
//! [`Ctx`]. The tests run every scenario through whichever path a request
//! takes; `tests/proxy.rs` also checks that both paths answer alike.

use super::{failure_response, headers, outcome_of, Core, Ctx};
use crate::error::ProxyFailure;
use crate::metrics::Outcome;
use crate::routing::InFlight;
use http::{header, Method, Version};
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream};
use super::pool::Pool;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::protocols::http::{HttpTask, ServerSession};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::Peer;
use pingora::ErrorType;
use std::sync::Arc;
use std::time::Instant;

/// Most headers a request may have and still take the express path.
const MAX_HEADERS: usize = 64;

/// Whether `buf` holds a complete request head that the express path serves
/// exactly as `HttpProxy` would: HTTP/1.1, origin-form target, a method
/// that is idempotent and carries no body (GET, HEAD, OPTIONS, DELETE), one
/// `Host`, no body framing (`Content-Length` other than 0,
/// `Transfer-Encoding`), no `Expect`, no upgrade, and no hop-by-hop header
/// other than `Connection: keep-alive` or `Connection: close` (everything
/// `HttpProxy` would sanitise is refused, so there is nothing to sanitise).
/// None: the head is not complete yet.
pub fn eligible(buf: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Some(eligible_head(&req)),
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(false),
    }
}

fn eligible_head(req: &httparse::Request) -> bool {
    if req.version != Some(1) || !matches!(req.method, Some("GET" | "HEAD" | "OPTIONS" | "DELETE")) {
        return false;
    }
    // Origin-form, and a target `http::Uri` keeps byte for byte (the
    // upstream request is written from the parsed URI).
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else { return false };
    if !http::uri::PathAndQuery::try_from(path).is_ok_and(|pq| pq.as_str() == path) {
        return false;
    }
    let (mut hosts, mut connections) = (0, 0);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("host") {
            hosts += 1;
        } else if is("connection") {
            connections += 1;
            let v = h.value.trim_ascii();
            if !(v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")) {
                return false;
            }
        } else if is("content-length") {
            if h.value.trim_ascii() != b"0" {
                return false;
            }
        } else if is("transfer-encoding")
            || is("expect")
            || is("upgrade")
            || is("te")
            || is("trailer")
            || is("keep-alive")
            || is("proxy-connection")
            || is("proxy-authenticate")
            || is("proxy-authorization")
            || is("http2-settings")
        {
            return false;
        }
    }
    hosts == 1 && connections <= 1
}

/// How an upstream attempt ended.
enum Attempt {
    /// The response went to the client (completely, or cut mid-way).
    Done,
    /// Failed before any response byte.
    Failed(Box<Error>),
}

pub struct Express {
    core: Arc<Core>,
    /// Makes new upstream connections (Pingora's; its own pool stays unused).
    connector: TransportConnector,
    /// Idle upstream connections.
    pool: Arc<Pool>,
}

impl Express {
    pub fn new(core: Arc<Core>, conf: &ServerConf) -> Self {
        Express {
            core,
            connector: TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf))),
            pool: Pool::new(conf.upstream_keepalive_pool_size),
        }
    }

    /// A client session to `peer`: a pooled connection if one is idle, else a
    /// new one. True: the connection was reused.
    async fn session(&self, peer: &PooledPeer) -> Result<(Upstream, bool)> {
        if let Some(stream) = self.pool.take(peer.key) {
            return Ok((Upstream::new_with_options(stream, peer), true));
        }
        // Boxed: the connect future (TLS included) is ~8 KB and rarely needed.
        let stream = Box::pin(self.connector.new_stream(peer)).await?;
        Ok((Upstream::new_with_options(stream, peer), false))
    }

    /// Back to the pool if the exchange left the connection reusable.
    async fn release(&self, mut up: Upstream, peer: &PooledPeer) {
        up.respect_keepalive();
        if let Some(stream) = up.reuse().await {
            self.pool.put(peer.key, stream, peer.idle_timeout());
        }
    }

    /// Serve one request whose head [`eligible`] accepted (already buffered
    /// in the session's stream). The stream comes back if the connection
    /// stays open, as from `HttpProxy::process_new_http`.
    pub async fn serve(&self, mut s: ServerSession) -> Option<ReusedHttpStream> {
        match s.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                // As HttpProxy: a request it cannot parse gets a 400.
                if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                    let _ = s.respond_error(400).await;
                }
                s.shutdown().await;
                return None;
            }
        }
        self.core.metrics.requests_express.inc();
        let mut ctx = self.core.new_ctx();
        let client = s.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let ok = self.proxy(&mut s, &mut ctx, client).await;
        let status = ctx.final_status(s.response_written().map(|r| r.status.as_u16()));
        self.core.log(&mut ctx, s.req_header(), client, status, (0, s.body_bytes_sent()));
        if !ok {
            s.shutdown().await;
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&s);
        let reusable = s.finish().await.ok().flatten()?;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
    }

    /// Route, pick, forward, retry. False: the connection must close.
    async fn proxy(&self, s: &mut ServerSession, ctx: &mut Ctx, client: Option<std::net::IpAddr>) -> bool {
        if let Some(failure) = self.core.route(s.req_header(), false, ctx) {
            return self.respond(s, ctx, failure).await;
        }
        loop {
            let Some(cluster) = ctx.cluster() else { return false };
            // Not empty (checked by `route`); with everything tried, `pick`
            // reuses one.
            let Some(i) = cluster.pick(s.req_header(), &ctx.tried) else {
                return self.respond(s, ctx, ProxyFailure::BadGateway).await;
            };
            let backend = &cluster.backends[i as usize];
            let peer = PooledPeer::new(backend.peer.clone());
            ctx.inflight = Some(InFlight::new(&backend.state));
            ctx.tried.push(i);
            ctx.backend = Some(i);
            ctx.upstream_start = Some(Instant::now());
            let (up, reused) = match self.session(&peer).await {
                Ok(x) => x,
                Err(e) => {
                    ctx.record_outcome(outcome_of(&e));
                    ctx.inflight = None;
                    if ctx.may_retry_connect() {
                        continue;
                    }
                    return self.respond(s, ctx, ProxyFailure::classify(&e)).await;
                }
            };
            match self.attempt(s, ctx, up, &peer, client).await {
                Ok(Attempt::Done) => return true,
                Ok(Attempt::Failed(e)) => {
                    ctx.record_outcome(outcome_of(&e));
                    ctx.inflight = None;
                    // Every method the express path takes is idempotent and
                    // has no body, so it is always safe to send again.
                    if ctx.may_retry_sent(reused) {
                        continue;
                    }
                    return self.respond(s, ctx, ProxyFailure::classify(&e)).await;
                }
                // The client went away, or the response broke mid-way.
                Err(()) => return false,
            }
        }
    }

    /// One request/response exchange with a backend.
    async fn attempt(
        &self,
        s: &mut ServerSession,
        ctx: &mut Ctx,
        mut up: Upstream,
        peer: &PooledPeer,
        client: Option<std::net::IpAddr>,
    ) -> std::result::Result<Attempt, ()> {
        up.read_timeout = peer.peer.options.read_timeout;
        up.write_timeout = peer.peer.options.write_timeout;
        let req = match upstream_request(s.req_header(), client, &ctx.request_id) {
            Ok(r) => r,
            Err(e) => return Ok(Attempt::Failed(e)),
        };
        if let Err(e) = up.write_request_header(req).await {
            return Ok(Attempt::Failed(e));
        }
        let head = s.req_header().method == Method::HEAD;
        loop {
            let task = match up.read_response_task().await {
                Ok(t) => t,
                Err(e) if !ctx.response_started => return Ok(Attempt::Failed(e)),
                Err(_) => return Err(()),
            };
            match task {
                HttpTask::Header(mut h, end) => {
                    if h.status == 101 {
                        // Nothing was asked to upgrade.
                        let e = Error::explain(ErrorType::InvalidHTTPHeader, "unexpected 101 from backend");
                        return Ok(Attempt::Failed(e));
                    }
                    if h.status.is_informational() {
                        // As HttpProxy: the response filter (request id) runs on 1xx too.
                        response_headers(&mut h, head, end, &ctx.request_id).map_err(|_| ())?;
                        if s.write_response_header(h).await.is_err() {
                            return Err(());
                        }
                        continue;
                    }
                    if !ctx.response_started {
                        ctx.response_started = true;
                        ctx.record_outcome(Outcome::Ok);
                    }
                    response_headers(&mut h, head, end, &ctx.request_id).map_err(|_| ())?;
                    if s.write_response_header(h).await.is_err() {
                        return Err(());
                    }
                    if end {
                        break;
                    }
                }
                HttpTask::Body(data, end) => {
                    let data = data.unwrap_or_default();
                    if s.write_response_body(data, end).await.is_err() {
                        return Err(());
                    }
                    if end {
                        break;
                    }
                }
                HttpTask::Done => break,
                HttpTask::Failed(e) if !ctx.response_started => return Ok(Attempt::Failed(e)),
                HttpTask::Failed(_) | HttpTask::UpgradedBody(..) => return Err(()),
                HttpTask::Trailer(_) => {}
            }
        }
        if s.finish_body().await.is_err() {
            return Err(());
        }
        ctx.inflight = None;
        self.release(up, peer).await;
        Ok(Attempt::Done)
    }

    /// A failure response this proxy decides. As in `HttpProxy`: after
    /// failed attempts at backends (502, 504) the connection closes; a
    /// request answered without trying any (404, 503) keeps it. False: the
    /// connection must close.
    async fn respond(&self, s: &mut ServerSession, ctx: &mut Ctx, failure: ProxyFailure) -> bool {
        ctx.local_status = failure.status();
        let Ok((h, body)) = failure_response(failure, &ctx.request_id) else { return false };
        let keep = matches!(failure, ProxyFailure::NoRoute | ProxyFailure::NoBackends);
        if !keep {
            s.set_keepalive(None);
        }
        let head = s.req_header().method == Method::HEAD;
        if s.write_response_header(Box::new(h)).await.is_err() {
            return false;
        }
        let done = if head { s.finish_body().await } else { s.write_response_body(body, true).await };
        keep && done.is_ok()
    }
}

/// A backend's `HttpPeer` as the express path's connection pool sees it.
///
/// On every reuse of a pooled connection Pingora checks that the socket's
/// peer address is still the backend's (`Peer::matches_fd`, a `getpeername`
/// system call per request). The pool owns its idle connections and files
/// them under this peer's `reuse_hash`, so a pooled socket cannot belong to
/// another address; this peer skips that check and delegates the rest.
///
/// `key` is where its idle connections are filed in the pool: per backend
/// (`reuse_hash`) and per worker thread. Each worker thread runs its own
/// runtime, and a socket stays registered with the runtime that opened it; a
/// connection taken by another thread would have its readiness delivered
/// across threads (a wake-up through the other runtime's driver per event).
#[derive(Clone)]
pub struct PooledPeer {
    peer: HttpPeer,
    key: u64,
}

impl PooledPeer {
    fn new(peer: HttpPeer) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        peer.reuse_hash().hash(&mut h);
        std::thread::current().id().hash(&mut h);
        PooledPeer { key: h.finish(), peer }
    }
}

impl std::fmt::Display for PooledPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.peer.fmt(f)
    }
}

impl Peer for PooledPeer {
    fn address(&self) -> &pingora::protocols::l4::socket::SocketAddr {
        self.peer.address()
    }
    fn tls(&self) -> bool {
        self.peer.tls()
    }
    fn sni(&self) -> &str {
        self.peer.sni()
    }
    fn reuse_hash(&self) -> u64 {
        self.peer.reuse_hash()
    }
    fn get_proxy(&self) -> Option<&pingora::upstreams::peer::Proxy> {
        self.peer.get_proxy()
    }
    fn get_peer_options(&self) -> Option<&pingora::upstreams::peer::PeerOptions> {
        self.peer.get_peer_options()
    }
    fn get_mut_peer_options(&mut self) -> Option<&mut pingora::upstreams::peer::PeerOptions> {
        self.peer.get_mut_peer_options()
    }
    fn get_client_cert_key(&self) -> Option<&Arc<pingora::utils::tls::CertKey>> {
        self.peer.get_client_cert_key()
    }
    fn get_tracer(&self) -> Option<pingora::upstreams::peer::Tracer> {
        self.peer.get_tracer()
    }
    fn matches_fd<V: std::os::fd::AsRawFd>(&self, _fd: V) -> bool {
        true
    }
}

/// The request sent upstream: the client's, as HTTP/1.1, without its
/// `Connection` header (the only hop-by-hop header [`eligible`] lets
/// through), with the forwarding headers.
///
/// Built on `http`'s own header map, room reserved up front: Pingora's
/// `RequestHeader` methods turn each name into a case-preserving copy and back
/// and grow two maps per header, which cost more than the rest of this path.
/// Header names therefore go upstream in lower case (HTTP/1.1 names are
/// case-insensitive); the target is the client's, byte for byte ([`eligible`]
/// accepts only targets `http::Uri` keeps unchanged).
fn upstream_request(
    down: &RequestHeader,
    client: Option<std::net::IpAddr>,
    request_id: &http::HeaderValue,
) -> Result<Box<RequestHeader>> {
    let mut parts = down.as_owned_parts();
    parts.version = Version::HTTP_11;
    parts.headers.remove(header::CONNECTION);
    parts.headers.reserve(4);
    for (name, value) in headers::forwarding(down, client, request_id) {
        parts.headers.insert(name, value);
    }
    Ok(Box::new(RequestHeader::from(parts)))
}

/// What `HttpProxy` does to a final response header on its way to an
/// HTTP/1.1 client: a body without framing becomes chunked (so the client
/// connection can stay open), and the request id is added if the backend
/// did not set one.
fn response_headers(h: &mut ResponseHeader, head: bool, end: bool, request_id: &http::HeaderValue) -> Result<()> {
    let no_body = head || matches!(h.status.as_u16(), 204 | 304);
    if !no_body
        && !h.status.is_informational()
        && !end
        && h.headers.get(header::TRANSFER_ENCODING).is_none()
        && h.headers.get(header::CONTENT_LENGTH).is_none()
    {
        h.set_version(Version::HTTP_11);
        h.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    if !request_id.is_empty() && !h.headers.contains_key("x-request-id") {
        h.insert_header("x-request-id", request_id.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::eligible;

    #[test]
    fn eligibility() {
        let ok = |s: &str| eligible(s.as_bytes()) == Some(true);
        assert!(ok("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(ok("HEAD /x?y=1 HTTP/1.1\r\nhost: a\r\nConnection: keep-alive\r\nCookie: c=1\r\n\r\n"));
        assert!(ok("DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"));
        // incomplete head, other versions, bodies, upgrades, absolute form
        assert_eq!(eligible(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert!(!ok("GET / HTTP/1.0\r\nHost: a\r\n\r\n"));
        assert!(!ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"));
        assert!(!ok("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ok("GET * HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert_ne!(eligible(b"GET /a\xffb HTTP/1.1\r\nHost: a\r\n\r\n"), Some(true), "a target http::Uri would not keep");
        // Host missing or twice; nominated hop-by-hop headers; other hop-by-hop headers
        assert!(!ok("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-secret\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: close\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: timeout=5\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: x\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!ok("garbage\r\n\r\n"));
    }
}
