//! `limits.header_timeout`: a request head must arrive whole in time; and
//! the stream wrapper that follows the framing of what Pingora reads.
//!
//! On plain TCP the connection loop in [`super::ProxyApp`] reads each head
//! itself before anyone parses it, so it holds the deadline there. Over TLS
//! Pingora reads the head, with a timeout per read only (a client sending a
//! byte now and then is never cut): [`HeadClock`] wraps the TLS stream and
//! puts the deadline on its reads instead. Both answer `408` when it passes
//! with part of a head received, and close quietly when nothing came.

use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest, UniqueID, ALPN};
use std::io;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use super::inbound::Inbound;

/// Finds where a request head ends (its first empty line, after any empty
/// lines before the request line, which parsers skip), in bytes fed as they
/// arrive: each byte is looked at once, however the head is split.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct HeadEnd {
    state: Scan,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Before the request line (empty lines are skipped).
    #[default]
    Start,
    /// Within a line.
    Line,
    /// Just after a line's `\n`.
    Lf,
    /// After `\n\r`.
    LfCr,
}

impl HeadEnd {
    /// Feed the next bytes of a head. Some(n): it ends after `bytes[..n]`.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match (self.state, b) {
                (Scan::Start, b'\r' | b'\n') => Scan::Start,
                (Scan::Lf | Scan::LfCr, b'\n') => return Some(i + 1),
                (Scan::Lf, b'\r') => Scan::LfCr,
                (_, b'\n') => Scan::Lf,
                _ => match bytes[i..].iter().position(|&c| c == b'\n') {
                    // To the line's end.
                    Some(k) => {
                        self.state = Scan::Line;
                        i += k;
                        continue;
                    }
                    None => {
                        self.state = Scan::Line;
                        return None;
                    }
                },
            };
            i += 1;
        }
        None
    }
}

/// Whether `buf` certainly holds a whole head, without scanning it: it ends
/// with an empty line and does not start with one (the common request
/// without a body, read at once).
pub(super) fn ends_a_head(buf: &[u8]) -> bool {
    buf.ends_with(b"\r\n\r\n") && !matches!(buf.first(), Some(b'\r' | b'\n'))
}

/// The response to a head that did not arrive in time.
pub(super) fn timeout_response() -> Vec<u8> {
    super::h1::closing_response(408, b"Request Timeout", "request head not received in time\n", &[])
}

/// A client stream Pingora reads: it follows the requests' framing
/// ([`Inbound`]) and, over TLS, keeps the request-head deadlines.
///
/// Deadlines: while a head is awaited ([`HeadClock::arm`]), its bytes must
/// all arrive by the deadline. Past it with nothing read, reads end (end of
/// stream: Pingora closes the idle connection quietly); with part of a head
/// read, the 408 is written and reads fail (Pingora drops the connection).
/// Once the head's end has passed, reads are timed by the stream's own
/// timeouts (the body has its read timeouts).
///
/// Framing: bytes [`Inbound`] refuses never reach Pingora. A refused
/// request whose head Pingora has not seen waits for the requests before it
/// to be answered (its reads stay pending until the stream is armed again),
/// then gets a 400 and the read fails; one being proxied (a bad chunk)
/// fails the read at once, with the 400 if nothing was written since the
/// request began: Pingora drops the connection, and the upstream request
/// with it. Writes after an answer are dropped.
pub(super) struct HeadClock {
    inner: Stream,
    /// A head is awaited (its deadline runs).
    armed: bool,
    /// Bytes of it have come: the deadline is the head's.
    started: bool,
    /// The head's deadline counts from its first byte (else it is already
    /// set: a new connection's counts from accept).
    from_first_byte: bool,
    scan: HeadEnd,
    header_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The requests' framing, checked.
    inbound: Inbound,
    /// The request [`Inbound`] was at when armed, and whether anything was
    /// written since: a refusal within it may still be answered.
    first: u32,
    written: bool,
    /// A refused request waiting for its turn to be answered.
    refused: Option<&'static str>,
    /// Bytes read after a request asking for an upgrade, held (with reads)
    /// until its answer says whose they are; the read waiting for it.
    held: Vec<u8>,
    reader: Option<std::task::Waker>,
    /// The last answer (408 or 400), how much of it is written, and the
    /// error the read then fails with.
    answer: Option<(Vec<u8>, usize, io::ErrorKind, &'static str)>,
    timed_out: prometheus::IntCounter,
    rejected: prometheus::IntCounterVec,
}

impl HeadClock {
    /// Wrap a new TLS connection: its first head must be complete by
    /// `deadline`. `timed_out` counts the 408s, `rejected` the refusals by
    /// reason.
    pub fn new(inner: Stream, deadline: Instant, header_timeout: Duration, timed_out: prometheus::IntCounter, rejected: prometheus::IntCounterVec) -> Self {
        HeadClock {
            inner,
            armed: true,
            started: false,
            from_first_byte: false,
            scan: HeadEnd::default(),
            header_timeout,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            inbound: Inbound::default(),
            first: 0,
            written: false,
            refused: None,
            held: Vec::new(),
            reader: None,
            answer: None,
            timed_out,
            rejected,
        }
    }

    /// Wrap a cleartext connection whose head was read (and timed) ahead:
    /// only the framing is followed, from the start of that head.
    pub fn framing_only(inner: Stream, timed_out: prometheus::IntCounter, rejected: prometheus::IntCounterVec) -> Self {
        let mut c = HeadClock::new(inner, Instant::now(), Duration::ZERO, timed_out, rejected);
        c.armed = false;
        c
    }

    /// Await the next request on a kept-alive connection: its first byte by
    /// `idle_until`, the rest within `header_timeout` of it.
    pub fn arm(&mut self, idle_until: Instant, header_timeout: Duration) {
        self.armed = true;
        self.started = false;
        self.from_first_byte = true;
        self.scan = HeadEnd::default();
        self.header_timeout = header_timeout;
        self.deadline.as_mut().reset(idle_until);
        self.rearm_answer();
    }

    /// The previous request is answered: a refusal of the next one may be
    /// answered too.
    pub fn rearm_answer(&mut self) {
        self.first = self.inbound.current();
        self.written = false;
    }

    /// Write the answer; then fail the read.
    fn answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((bytes, written, kind, why)) = self.answer.as_mut() else { return Poll::Ready(Ok(())) };
        while *written < bytes.len() {
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..])) {
                Ok(0) | Err(_) => break,
                Ok(n) => *written += n,
            }
        }
        let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        *written = bytes.len();
        Poll::Ready(Err(io::Error::new(*kind, *why)))
    }

    /// Whether a refusal now may be answered: nothing was written since
    /// the last answered request, and the refused one is the next.
    fn answerable(&self) -> bool {
        !self.written && self.inbound.current() == self.first
    }

    /// A request [`Inbound`] refused (`reason`): counted, answered with the
    /// 400 if it may be, and the read fails.
    fn refuse(&mut self, cx: &mut Context<'_>, reason: &'static str) -> Poll<io::Result<()>> {
        self.rejected.with_label_values(&[reason]).inc();
        let why = "request refused: malformed or ambiguous framing";
        if !self.answerable() {
            self.answer = Some((Vec::new(), 0, io::ErrorKind::InvalidData, why));
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why)));
        }
        self.answer = Some((super::malformed_response(), 0, io::ErrorKind::InvalidData, why));
        self.answer(cx)
    }

    /// A refused request none of whose bytes Pingora has, behind requests
    /// it has: its reads wait (not woken) until those are answered and the
    /// stream is armed again, then it gets its 400.
    fn refuse_in_turn(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.refused {
            Some(reason) if self.answerable() => {
                self.refused = None;
                self.refuse(cx, reason)
            }
            _ => Poll::Pending,
        }
    }

    /// Follow the bytes just put in `buf` after `before` (read, or taken
    /// from those held): pass on what is followed, hold back what waits
    /// for an upgrade's answer, refuse the rest.
    fn judge(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>, before: usize) -> Poll<io::Result<()>> {
        let new = &buf.filled()[before..];
        let len = new.len();
        let passed = match self.inbound.feed(new) {
            Ok(n) => {
                if n < len {
                    self.held.splice(0..0, new[n..].iter().copied());
                    buf.set_filled(before + n);
                }
                n
            }
            Err(r) => {
                // Pingora gets the whole requests before the refused one,
                // and nothing of it.
                let keep = r.start.unwrap_or(0);
                buf.set_filled(before + keep);
                if r.in_flight {
                    return self.refuse(cx, r.reason);
                }
                self.refused = Some(r.reason);
                if keep == 0 {
                    return self.refuse_in_turn(cx);
                }
                keep
            }
        };
        if self.armed {
            if !self.started {
                self.started = true;
                if self.from_first_byte {
                    self.deadline.as_mut().reset(Instant::now() + self.header_timeout);
                }
            }
            if self.scan.feed(&buf.filled()[before..before + passed]).is_some() {
                self.armed = false;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A write from Pingora: the status of the answer an upgrade request
    /// waits for.
    fn saw_write(&mut self, bytes: &[u8]) {
        if !self.inbound.awaiting_answer() {
            return;
        }
        let status = match bytes {
            [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _, b' ', a, b, c, ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => {
                u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
            }
            // A response head is written whole; anything else decides
            // nothing (and a body cannot come before the head).
            _ => return,
        };
        self.inbound.answered(status);
        if !self.inbound.awaiting_answer() {
            if let Some(w) = self.reader.take() {
                w.wake();
            }
        }
    }
}

impl AsyncRead for HeadClock {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.answer.is_some() {
            return this.answer(cx);
        }
        if this.refused.is_some() {
            return this.refuse_in_turn(cx);
        }
        if this.inbound.awaiting_answer() {
            // Nothing more is read until the answer says whose it is.
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let before = buf.filled().len();
        if !this.held.is_empty() {
            let n = this.held.len().min(buf.remaining());
            buf.put_slice(&this.held[..n]);
            this.held.drain(..n);
            return this.judge(cx, buf, before);
        }
        if !this.armed && this.inbound.off() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() == before {
                    return Poll::Ready(Ok(()));
                }
                this.judge(cx, buf, before)
            }
            Poll::Pending if !this.armed => Poll::Pending,
            Poll::Pending => {
                ready!(this.deadline.as_mut().poll(cx));
                if !this.started {
                    // Idle past its time: end of stream.
                    return Poll::Ready(Ok(()));
                }
                this.timed_out.inc();
                this.answer = Some((timeout_response(), 0, io::ErrorKind::TimedOut, "request head not complete within limits.header_timeout"));
                this.answer(cx)
            }
            err => err,
        }
    }
}

impl AsyncWrite for HeadClock {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.answer.is_some() {
            // Answered and closing: nothing more goes out.
            return Poll::Ready(Ok(buf.len()));
        }
        self.written = true;
        self.saw_write(buf);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if self.answer.is_some() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        self.written = true;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            self.saw_write(first);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl std::fmt::Debug for HeadClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadClock").field("inner", &self.inner).field("armed", &self.armed).finish()
    }
}

#[async_trait::async_trait]
impl Shutdown for HeadClock {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadClock {
    fn id(&self) -> pingora::protocols::UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadClock {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadClock {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadClock {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadClock {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait::async_trait]
impl Peek for HeadClock {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the head ends, fed in pieces of `step` bytes.
    fn end(bytes: &[u8], step: usize) -> Option<usize> {
        let mut h = HeadEnd::default();
        let mut at = 0;
        for piece in bytes.chunks(step) {
            if let Some(n) = h.feed(piece) {
                return Some(at + n);
            }
            at += piece.len();
        }
        None
    }

    #[test]
    fn the_end_of_a_head_is_found_however_it_is_split() {
        let cases: [(&[u8], Option<usize>); 8] = [
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY", Some(27)),
            (b"GET / HTTP/1.1\nHost: a\n\nBODY", Some(24)),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", Some(26)),
            (b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", Some(22)),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", None),
            (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", Some(28)),
            (b"\r\n\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nX: \r\r\n\r\n", Some(24)),
        ];
        for (bytes, want) in cases {
            for step in 1..=bytes.len() {
                assert_eq!(end(bytes, step), want, "{:?} in pieces of {step}", String::from_utf8_lossy(bytes));
            }
        }
        assert!(ends_a_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ends_a_head(b"\r\n\r\n"));
        assert!(!ends_a_head(b"GET / HTTP/1.1\r\nHost: a\r\n"));
    }
}
