//! `[limits]` on HTTP/2 client connections (h2c, and TLS with ALPN `h2`).
//!
//! Pingora serves an HTTP/2 connection whole: it reads the preface, then
//! accepts streams and runs each in a task of its own until the connection
//! closes. Its only idle limit (`HttpServerOptions::h2_idle_timeout`) is
//! fixed when the service is built and drops the connection without a
//! GOAWAY, and nothing bounds the wait for the preface or the first
//! request. So the connection is served here through [`H2Conn`], which
//! counts the streams in progress, beside a watchdog that reads the limits
//! when it needs them:
//!
//! * the first request (its HEADERS, after the preface and SETTINGS) is due
//!   by the deadline of a new connection's first head
//!   (`limits.header_timeout` from accept; over TLS, from the end of the
//!   handshake). Past it the connection is closed at once (no GOAWAY: it may
//!   not even have sent its preface);
//! * once no stream is in progress for `limits.keepalive_timeout`, the
//!   connection gets a GOAWAY (through the shutdown signal Pingora's accept
//!   loop already answers with one); a stream that was on its way is still
//!   served. It closes when the client has acknowledged it (h2's PING round
//!   trip) and no stream is left, or after [`GOAWAY_GRACE`] with no stream
//!   in progress, whichever comes first;
//! * the server stopping does the same.
//!
//! Per connection: the app and two `watch` channels (a few small
//! allocations); per stream, two updates of the open-stream count (and a
//! wake-up of the watchdog, which re-arms its timer when the count is 0).

use super::{HttpProxy, Proxy, ProxyApp};
use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// After a GOAWAY, how long a connection with no stream in progress is
/// held for the client to close it (a client that does not answer h2's
/// PING would otherwise hold it until it goes away).
pub(super) const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// One HTTP/2 connection's app: Pingora's `HttpProxy`, with each stream
/// counted in `open` while it is served.
struct H2Conn {
    proxy: Arc<HttpProxy<Proxy>>,
    open: watch::Sender<usize>,
}

/// A stream in progress; uncounted when dropped (served, failed or
/// cancelled).
struct OpenStream<'a>(&'a watch::Sender<usize>);

impl Drop for OpenStream<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[async_trait]
impl HttpServerApp for H2Conn {
    async fn process_new_http(self: &Arc<Self>, session: ServerSession, shutdown: &ShutdownWatch) -> Option<ReusedHttpStream> {
        self.open.send_modify(|n| *n += 1);
        let _open = OpenStream(&self.open);
        HttpServerApp::process_new_http(&self.proxy, session, shutdown).await
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.proxy.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options()
    }
}

/// Why the watchdog ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// No request by the first head's deadline.
    NoRequest,
    /// No stream in progress for `limits.keepalive_timeout`.
    Idle,
    /// The server is stopping.
    Stopping,
}

/// The next change of the open-stream count (a stream started or ended).
async fn changed(events: &mut watch::Receiver<usize>) {
    if events.changed().await.is_err() {
        // The count's sender lives as long as the connection is served.
        std::future::pending::<()>().await;
    }
}

/// Until no stream has been in progress for `quiet()` (read again each
/// time the connection falls idle).
async fn quiet_for(events: &mut watch::Receiver<usize>, quiet: impl Fn() -> Duration) {
    loop {
        if *events.borrow_and_update() > 0 {
            changed(events).await;
            continue;
        }
        if tokio::time::timeout(quiet(), changed(events)).await.is_err() {
            return;
        }
    }
}

/// Until the server stops (at once if it is stopping already).
async fn stopping(shutdown: &ShutdownWatch) {
    let mut sd = shutdown.clone();
    if sd.wait_for(|&s| s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Watch one connection's streams: the first must start by `first_by`,
/// then the connection may be idle for `limits.keepalive_timeout`.
async fn watchdog(events: &mut watch::Receiver<usize>, first_by: Instant, app: &ProxyApp, shutdown: &ShutdownWatch) -> End {
    let limits = async {
        if tokio::time::timeout_at(first_by, changed(events)).await.is_err() {
            return End::NoRequest;
        }
        quiet_for(events, || app.snapshot.limits().keepalive_timeout).await;
        End::Idle
    };
    tokio::select! {
        end = limits => end,
        _ = stopping(shutdown) => End::Stopping,
    }
}

impl ProxyApp {
    /// Serve an HTTP/2 client connection until it closes, under `[limits]`
    /// (see the module's notes). `first_by`: when its first request is due.
    pub(super) async fn serve_h2(&self, stream: Stream, shutdown: &ShutdownWatch, first_by: Instant) {
        let (open, mut events) = watch::channel(0usize);
        let app = Arc::new(H2Conn { proxy: self.inner.clone(), open });
        // What Pingora's accept loop takes for the server stopping: a GOAWAY
        // is sent, streams in progress are finished, then it closes.
        let (goaway, goaway_rx) = watch::channel(false);
        let mut serve = ServerApp::process_new(&app, stream, &goaway_rx);
        let end = tokio::select! {
            _ = &mut serve => return,
            end = watchdog(&mut events, first_by, self, shutdown) => end,
        };
        tracing::debug!(?end, "HTTP/2 client connection ends");
        if end == End::NoRequest {
            // Dropping `serve` closes the connection.
            return;
        }
        let _ = goaway.send(true);
        tokio::select! {
            _ = &mut serve => {}
            _ = quiet_for(&mut events, || GOAWAY_GRACE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The open-stream count: a stream that starts and ends between two
    /// looks still restarts the idle time; an open stream holds it off.
    #[tokio::test(start_paused = true)]
    async fn idle_time_counts_from_the_last_stream() {
        let (open, mut events) = watch::channel(0usize);
        let t0 = Instant::now();
        let quiet = tokio::spawn(async move {
            quiet_for(&mut events, || Duration::from_secs(10)).await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(8)).await;
        // A quick stream at 8 s.
        open.send_modify(|n| *n += 1);
        open.send_modify(|n| *n -= 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        // A long one from 13 s to 40 s.
        open.send_modify(|n| *n += 1);
        tokio::time::sleep(Duration::from_secs(27)).await;
        assert!(!quiet.is_finished(), "a stream in progress is not idle");
        open.send_modify(|n| *n -= 1);
        let at = quiet.await.unwrap();
        assert_eq!(at - t0, Duration::from_secs(50), "idle for 10 s after the last stream ended at 40 s");
    }
}
