//! The express path: plain HTTP/1.1 requests without a body, proxied by a
//! short loop of our own over the client connection, an upstream connection
//! from our own pool, and the HTTP/1.1 codec in [`super::h1`].
//!
//! Pingora's `HttpProxy` runs every request through its general machinery:
//! a ~14 KB boxed future per request, two tasks joined over two channels
//! (request body and response body), a boxed future per `ProxyHttp` hook and
//! several copies of the headers, each turned into a header map and back
//! into bytes. For the request most sites see most — `GET /page HTTP/1.1`
//! with a `Host`, cookies and no body — none of that is needed.
//! [`RawRequest::parse`] decides from the request's first bytes, before any
//! session exists, so a request it refuses goes to `HttpProxy` untouched.
//!
//! What the express path does is what `Proxy` (the `ProxyHttp` side) does:
//! the same routing, backend selection, retries, failure responses,
//! forwarding headers, metrics and access log, through the same [`Core`] and
//! [`Ctx`]. The tests run every scenario through whichever path a request
//! takes; `tests/proxy.rs` also checks that both paths answer alike.

use super::h1::{self, Framing, Method, RawRequest, ResponseContext};
use super::pool::Pool;
use super::headers::{self, ClientAddr};
use super::{failure_response, outcome_of, Core, Ctx};
use crate::error::ProxyFailure;
use crate::routing::InFlight;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::prelude::*;
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::ErrorType;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How an upstream attempt ended.
enum Attempt {
    /// The response went to the client (completely, or cut mid-way).
    Done,
    /// Failed before any response byte.
    Failed(Box<Error>),
}

/// What one request's exchange has told the client so far.
struct Exchange {
    /// Whether the client connection stays open after the response.
    keepalive: bool,
    /// The final status the backend answered with.
    status: Option<u16>,
    /// Response body bytes sent to the client.
    body_bytes: u64,
}

/// Room read from a backend at a time.
const READ_CHUNK: usize = 16 * 1024;

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

    /// A connection to `peer`: a pooled one if one is idle, else a new one.
    /// True: the connection was reused.
    async fn connection(&self, peer: &PooledPeer<'_>) -> Result<(Stream, bool)> {
        if let Some(stream) = self.pool.take(peer.key) {
            return Ok((stream, true));
        }
        // Boxed: the connect future (TLS included) is ~8 KB and rarely needed.
        let stream = Box::pin(self.connector.new_stream(peer.peer)).await?;
        Ok((stream, false))
    }

    /// Serve one request that [`RawRequest::parse`] accepted, on `client`,
    /// the client connection. `keepalive`: whether this proxy would keep the
    /// connection open after the response. True: it stays open.
    pub async fn serve<C>(&self, client: &mut C, req: &RawRequest, addr: Option<&ClientAddr>, keepalive: bool) -> bool
    where
        C: AsyncWrite + Unpin,
    {
        self.core.metrics.requests_express.inc();
        let mut ctx = self.core.new_ctx();
        let mut x = Exchange { keepalive, status: None, body_bytes: 0 };
        let ok = self.proxy(client, req, &mut ctx, addr, &mut x).await;
        let status = ctx.final_status(x.status);
        self.core.log(&mut ctx, req, addr.map(|a| a.ip), status, (0, x.body_bytes as usize));
        ok && x.keepalive
    }

    /// Route, pick, forward, retry. False: the connection must close.
    async fn proxy<C>(&self, client: &mut C, req: &RawRequest, ctx: &mut Ctx, addr: Option<&ClientAddr>, x: &mut Exchange) -> bool
    where
        C: AsyncWrite + Unpin,
    {
        // Express connections are cleartext (TLS ones go to `HttpProxy`).
        if let Some(failure) = self.core.route(req, false, false, addr.map(|a| a.ip), ctx) {
            return self.respond(client, req, ctx, failure, x).await;
        }
        loop {
            let (Some(table), Some(ci)) = (ctx.table.clone(), ctx.cluster) else { return false };
            let cluster = &table.clusters[ci as usize];
            // Not empty (checked by `route`); with everything tried, `pick`
            // reuses one.
            let Some(i) = cluster.pick(req, &ctx.tried) else {
                return self.respond(client, req, ctx, ProxyFailure::BadGateway, x).await;
            };
            let backend = &cluster.backends[i as usize];
            let peer = PooledPeer::new(backend);
            ctx.inflight = Some(InFlight::new(&backend.state));
            ctx.tried.push(i);
            ctx.backend = Some(i);
            ctx.upstream_start = Some(Instant::now());
            let (up, reused) = match self.connection(&peer).await {
                Ok(x) => x,
                Err(e) => {
                    ctx.connect_failed(&e);
                    ctx.inflight = None;
                    if ctx.may_retry_connect() {
                        continue;
                    }
                    return self.respond(client, req, ctx, ProxyFailure::classify(&e), x).await;
                }
            };
            match self.attempt(client, req, ctx, up, &peer, addr, x).await {
                Ok(Attempt::Done) => return true,
                Ok(Attempt::Failed(e)) => {
                    ctx.record_outcome(outcome_of(&e));
                    ctx.inflight = None;
                    // Every method the express path takes is idempotent and
                    // has no body, so it is always safe to send again.
                    if ctx.may_retry_sent(reused) {
                        continue;
                    }
                    return self.respond(client, req, ctx, ProxyFailure::classify(&e), x).await;
                }
                // The client went away, or the response broke mid-way.
                Err(()) => return false,
            }
        }
    }

    /// One request/response exchange with a backend.
    #[allow(clippy::too_many_arguments)]
    async fn attempt<C>(
        &self,
        client: &mut C,
        req: &RawRequest,
        ctx: &mut Ctx,
        mut up: Stream,
        peer: &PooledPeer<'_>,
        addr: Option<&ClientAddr>,
        x: &mut Exchange,
    ) -> std::result::Result<Attempt, ()>
    where
        C: AsyncWrite + Unpin,
    {
        let (read_timeout, write_timeout) = (peer.peer.options.read_timeout, peer.peer.options.write_timeout);
        let mut out = Vec::with_capacity(1024);
        req.write_upstream(&mut out, headers::forwarding(req, addr, &ctx.request_id, false, ctx.forwarding()));
        if let Err(e) = send(&mut up, &out, write_timeout).await {
            return Ok(Attempt::Failed(e));
        }
        out.clear();

        // The response head; 1xx heads go to the client as they come.
        let date = pingora::protocols::http::date::get_cached_date();
        let cx = ResponseContext {
            head_request: req.method_kind() == Method::Head,
            keepalive: x.keepalive,
            request_id: &ctx.request_id,
            date: &date,
        };
        let mut buf = Vec::with_capacity(READ_CHUNK);
        let mut start = 0;
        let head = loop {
            match h1::parse_response(&buf[start..], &cx, &mut out) {
                Ok(Some(h)) if h.informational => {
                    start += h.len;
                    // Something has reached the client: as in HttpProxy,
                    // no other backend is tried after this.
                    ctx.response_started = true;
                    send(client, &out, None).await.map_err(|_| ())?;
                    out.clear();
                }
                Ok(Some(h)) => break h,
                Ok(None) => match receive(&mut up, &mut buf, read_timeout).await {
                    Ok(0) => {
                        let e = Error::explain(ErrorType::ConnectionClosed, "backend closed before a response");
                        return Ok(Attempt::Failed(e));
                    }
                    Ok(_) => {}
                    Err(e) => return Ok(Attempt::Failed(e)),
                },
                Err(e) => return Ok(Attempt::Failed(e)),
            }
        };
        ctx.response_started = true;
        ctx.record_response(head.status);
        x.status = Some(head.status);
        x.keepalive = head.client_keepalive;
        start += head.len;

        // The body, framed for the client; the first write carries the head.
        let mut reusable = head.reusable;
        match head.framing {
            Framing::Empty => {
                reusable &= buf.len() == start;
                send(client, &out, None).await.map_err(|_| ())?;
            }
            Framing::Length(len) => {
                let mut left = len;
                let mut data = &buf[start..];
                loop {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    reusable &= n == data.len();
                    out.extend_from_slice(&data[..n]);
                    left -= n as u64;
                    x.body_bytes += n as u64;
                    send(client, &out, None).await.map_err(|_| ())?;
                    out.clear();
                    if left == 0 {
                        break;
                    }
                    buf.clear();
                    match receive(&mut up, &mut buf, read_timeout).await {
                        Ok(n) if n > 0 => data = &buf[..],
                        _ => return Err(()),
                    }
                }
            }
            Framing::Chunked => {
                let mut chunked = h1::Chunked::default();
                loop {
                    let (used, data) = chunked.feed(&buf[start..], &mut out).map_err(|_| ())?;
                    start += used;
                    x.body_bytes += data;
                    if chunked.done() {
                        reusable &= buf.len() == start;
                        send(client, &out, None).await.map_err(|_| ())?;
                        break;
                    }
                    if !out.is_empty() {
                        send(client, &out, None).await.map_err(|_| ())?;
                        out.clear();
                    }
                    // Keep an incomplete line for the next round.
                    buf.drain(..start);
                    start = 0;
                    match receive(&mut up, &mut buf, read_timeout).await {
                        Ok(n) if n > 0 => {}
                        _ => return Err(()),
                    }
                }
            }
            Framing::Close => {
                // Each piece goes to the client as it arrives (the body may
                // be a stream); the end is the backend closing.
                reusable = false;
                let mut data = &buf[start..];
                loop {
                    x.body_bytes += data.len() as u64;
                    if head.chunk_close_delimited {
                        h1::put_chunk(&mut out, data);
                    } else {
                        out.extend_from_slice(data);
                    }
                    if !out.is_empty() {
                        send(client, &out, None).await.map_err(|_| ())?;
                        out.clear();
                    }
                    buf.clear();
                    match receive(&mut up, &mut buf, read_timeout).await {
                        Ok(0) => break,
                        Ok(_) => data = &buf[..],
                        Err(_) => return Err(()),
                    }
                }
                if head.chunk_close_delimited {
                    send(client, h1::LAST_CHUNK, None).await.map_err(|_| ())?;
                }
            }
        }
        ctx.inflight = None;
        if reusable {
            self.pool.put(peer.key, up, peer.peer.idle_timeout());
        }
        Ok(Attempt::Done)
    }

    /// A failure response this proxy decides. As in `HttpProxy`: after
    /// failed attempts at backends (502, 504) the connection closes; a
    /// request answered without trying any (404, 503) keeps it. False: the
    /// connection must close.
    async fn respond<C>(&self, client: &mut C, req: &RawRequest, ctx: &mut Ctx, failure: ProxyFailure, x: &mut Exchange) -> bool
    where
        C: AsyncWrite + Unpin,
    {
        ctx.local_status = failure.status();
        let Ok((h, body)) = failure_response(failure, ctx) else { return false };
        x.keepalive &= matches!(
            failure,
            ProxyFailure::NoRoute | ProxyFailure::NoBackends | ProxyFailure::Maintenance | ProxyFailure::Redirect(_)
        );
        let mut out = Vec::with_capacity(256);
        let reason = h.status.canonical_reason().unwrap_or("");
        h1::put_status_line(&mut out, false, h.status.as_u16(), reason.as_bytes());
        h.header_to_h1_wire(&mut out);
        h1::put_header(&mut out, b"Date", pingora::protocols::http::date::get_cached_date().as_bytes());
        h1::put_header(&mut out, b"Connection", h1::connection_value(x.keepalive));
        out.extend_from_slice(b"\r\n");
        if req.method_kind() != Method::Head {
            out.extend_from_slice(&body);
            x.body_bytes += body.len() as u64;
        }
        send(client, &out, None).await.is_ok()
    }
}

/// Write all of `data` and flush, within `timeout` if one is set. The
/// timer is only set if the socket does not take everything at once (a
/// request head almost always fits its send buffer).
async fn send<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8], timeout: Option<Duration>) -> Result<()> {
    let mut sent = 0;
    if timeout.is_some() {
        // One attempt without a timer.
        let tried = std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *w).poll_write(cx, data) {
            std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await;
        match tried {
            Some(Ok(n)) => sent = n,
            Some(Err(e)) => return Err(e).or_err(ErrorType::WriteError, "writing"),
            None => {}
        }
    }
    let rest = &data[sent..];
    let write = async {
        w.write_all(rest).await?;
        w.flush().await
    };
    let done = match timeout {
        Some(t) if !rest.is_empty() => pingora::prelude::timeout(t, write)
            .await
            .map_err(|_| Error::explain(ErrorType::WriteTimedout, "writing to backend"))?,
        _ => write.await,
    };
    done.or_err(ErrorType::WriteError, "writing")
}

/// Read what has arrived from the backend onto the end of `buf`, within
/// `timeout` if one is set. 0: the backend closed the connection.
async fn receive(up: &mut Stream, buf: &mut Vec<u8>, timeout: Option<Duration>) -> Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    if buf.len() > h1::MAX_RESPONSE_HEAD + READ_CHUNK {
        return Error::e_explain(ErrorType::InvalidHTTPHeader, "backend response head too large");
    }
    let read = match timeout {
        Some(t) => pingora::prelude::timeout(t, up.read_buf(buf))
            .await
            .map_err(|_| Error::explain(ErrorType::ReadTimedout, "reading from backend"))?,
        None => up.read_buf(buf).await,
    };
    read.or_err(ErrorType::ReadError, "reading from backend")
}

/// A backend as the express path's connection pool sees it: its `HttpPeer`
/// (to connect) and `key`, where its idle connections are filed in the pool:
/// per backend (`reuse_hash`) and per worker thread. Each worker thread runs
/// its own runtime, and a socket stays registered with the runtime that
/// opened it; a connection taken by another thread would have its readiness
/// delivered across threads (a wake-up through the other runtime's driver
/// per event).
///
/// Pingora checks on every reuse of a pooled connection that the socket's
/// peer address is still the backend's (`Peer::matches_fd`, a `getpeername`
/// system call per request). This pool owns its idle connections and files
/// them under the backend's `reuse_hash`, so a pooled socket cannot belong to
/// another address, and no such check is made.
#[derive(Clone)]
pub struct PooledPeer<'a> {
    peer: &'a HttpPeer,
    key: u64,
}

thread_local! {
    /// This worker thread's part of the pool keys.
    static THREAD_KEY: u64 = rand::random();
}

impl<'a> PooledPeer<'a> {
    fn new(backend: &'a crate::routing::Backend) -> Self {
        PooledPeer {
            key: backend.reuse_hash ^ THREAD_KEY.with(|k| *k),
            peer: &backend.peer,
        }
    }
}
