//! The express path's HTTP/1.1 codec: request heads parsed in place, the
//! upstream request written from the client's bytes, the upstream response
//! head parsed and rewritten for the client in one pass, and response bodies
//! framed as `HttpProxy` frames them.
//!
//! Why our own: Pingora's HTTP/1 sessions turn every head into a
//! `RequestHeader`/`ResponseHeader` (two header maps, a case-preserving copy of
//! every name) and back into bytes; on a small proxied response that was
//! most of the proxy's user time. Here a head is parsed once with `httparse`
//! and copied, header by header, straight from the bytes that came in.
//!
//! What the client receives is what `HttpProxy` sends for the same upstream
//! response (`tests/proxy.rs` compares both paths byte-level after
//! normalising header order and case):
//!
//! * 1xx (other than 101) go through as they came, plus `X-Request-Id`;
//! * the final head keeps every header but `Date` and `Connection`, which
//!   this proxy sets, and gets `X-Request-Id` if the backend set none;
//! * a body without framing (close-delimited) is sent chunked, as HTTP/1.1,
//!   so the client connection stays open; a chunked body is re-chunked (chunk
//!   extensions and trailers are dropped, as `HttpProxy` drops them);
//! * responses to HEAD, 204 and 304 have no body whatever their headers say.

use super::headers::FwdValue;
use crate::routing::RequestView;
use http::{HeaderName, HeaderValue};
use pingora::prelude::*;
use pingora::ErrorType;
use std::io::Write;
use std::mem::MaybeUninit;

/// Most headers a request may have and still take the express path.
const MAX_REQUEST_HEADERS: usize = 64;

/// Limits on an upstream response head (as Pingora's own client).
pub const MAX_RESPONSE_HEAD: usize = 1024 * 1024 - 1;
const MAX_RESPONSE_HEADERS: usize = 256;

/// Longest chunk-size line or trailer section accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// `(start, end)` of a piece of the head buffer.
type Span = (u16, u16);

/// The methods the express path takes: idempotent, without a body.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Method {
    Get,
    Head,
    Options,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Delete => "DELETE",
        }
    }
}

/// A request head the express path serves, kept as the bytes that came in
/// with the positions of its parts.
pub struct RawRequest {
    buf: Vec<u8>,
    method: Method,
    target: Span,
    /// End of the path within the target (where the query starts).
    path_end: u16,
    host: Span,
    headers: Vec<(Span, Span)>,
    /// The client sent `Connection: close`.
    pub close: bool,
    /// Bytes that came after the head: the start of the next, pipelined
    /// request (a head the express path takes has no body).
    pub ahead: Vec<u8>,
}

/// What the first bytes of a connection's next request say (the bytes
/// come back unless the express path takes them).
#[derive(Debug)]
pub enum Verdict {
    /// The head is not complete yet.
    Partial(Vec<u8>),
    /// Not for the express path (see [`RawRequest::parse`]).
    Refused(Vec<u8>),
    Express(Box<RawRequest>),
}

impl RawRequest {
    /// Whether `buf` is exactly one complete request head that the express
    /// path serves as `HttpProxy` would: HTTP/1.1, an origin-form target that
    /// `http::Uri` keeps byte for byte, a method that is idempotent and has no
    /// body (GET, HEAD, OPTIONS, DELETE), one `Host`, no body framing
    /// (`Content-Length` other than 0, `Transfer-Encoding`), no `Expect`, no
    /// upgrade, and no hop-by-hop header other than `Connection: keep-alive`
    /// or `Connection: close` (everything `HttpProxy` would sanitise is
    /// refused, so there is nothing to sanitise). Bytes after the head are
    /// the next, pipelined request: kept in [`RawRequest::ahead`].
    pub fn parse(mut buf: Vec<u8>) -> Verdict {
        let mut headers = [const { MaybeUninit::uninit() }; MAX_REQUEST_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let layout = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, &buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) if n <= u16::MAX as usize => Self::eligible(&buf, &req).map(|r| (r, n)),
            Ok(httparse::Status::Partial) => return Verdict::Partial(buf),
            _ => None,
        };
        match layout {
            Some((layout, n)) => {
                let ahead = buf.split_off(n);
                Verdict::Express(Box::new(RawRequest { buf, ahead, ..layout }))
            }
            None => Verdict::Refused(buf),
        }
    }

    /// The positions of the parts of an eligible head (`buf` left empty).
    fn eligible(buf: &[u8], req: &httparse::Request) -> Option<RawRequest> {
        let method = match req.method? {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            "DELETE" => Method::Delete,
            _ => return None,
        };
        if req.version != Some(1) {
            return None;
        }
        let span = |s: &[u8]| {
            let start = s.as_ptr() as usize - buf.as_ptr() as usize;
            (start as u16, (start + s.len()) as u16)
        };
        let path = req.path.filter(|p| p.starts_with('/'))?;
        if !http::uri::PathAndQuery::try_from(path).is_ok_and(|pq| pq.as_str() == path) {
            return None;
        }
        let target = span(path.as_bytes());
        let path_end = target.0 + path.find('?').unwrap_or(path.len()) as u16;
        let (mut host, mut hosts, mut connections, mut close) = ((0, 0), 0, 0, false);
        let mut spans = Vec::with_capacity(req.headers.len());
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
            if is("host") {
                // Userinfo, spaces, lists in Host are refused by HttpProxy
                // (400); leave them to it.
                if !super::strict::valid_host(h.value) {
                    return None;
                }
                hosts += 1;
                host = span(h.value);
            } else if is("connection") {
                connections += 1;
                let v = h.value.trim_ascii();
                close = v.eq_ignore_ascii_case(b"close");
                if !(close || v.eq_ignore_ascii_case(b"keep-alive")) {
                    return None;
                }
            } else if is("content-length") {
                if h.value.trim_ascii() != b"0" {
                    return None;
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
                return None;
            }
            spans.push((span(name), span(h.value)));
        }
        (hosts == 1 && connections <= 1).then(|| RawRequest {
            buf: Vec::new(),
            method,
            target,
            path_end,
            host,
            headers: spans,
            close,
            ahead: Vec::new(),
        })
    }

    pub fn method_kind(&self) -> Method {
        self.method
    }

    fn bytes(&self, (a, b): Span) -> &[u8] {
        &self.buf[a as usize..b as usize]
    }

    fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers.iter().map(|&(n, v)| (self.bytes(n), self.bytes(v)))
    }

    /// The request to send upstream, appended to `out`: the client's request
    /// line as HTTP/1.1 and its headers as they came (names keep their case),
    /// without `Connection` (the only hop-by-hop header [`RawRequest::parse`]
    /// lets through) and without any header that `forwarding` replaces, then
    /// the `forwarding` headers.
    pub fn write_upstream<'a>(&self, out: &mut Vec<u8>, forwarding: impl Iterator<Item = (HeaderName, FwdValue<'a>)>) {
        let mut fwd: [Option<(HeaderName, FwdValue)>; 5] = [None, None, None, None, None];
        for (slot, h) in fwd.iter_mut().zip(forwarding) {
            *slot = Some(h);
        }
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.bytes(self.target));
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in self.headers() {
            let replaced = fwd.iter().flatten().any(|(n, _)| name.eq_ignore_ascii_case(n.as_str().as_bytes()));
            if replaced || name.eq_ignore_ascii_case(b"connection") {
                continue;
            }
            put_header(out, name, value);
        }
        for (name, value) in fwd.iter().flatten() {
            if !matches!(value, FwdValue::Remove) {
                put_header(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

impl std::fmt::Debug for RawRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRequest").field("head", &String::from_utf8_lossy(&self.buf)).finish()
    }
}

impl RequestView for RawRequest {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        // Checked by `http::uri::PathAndQuery` when parsed: ASCII.
        std::str::from_utf8(&self.buf[self.target.0 as usize..self.path_end as usize]).unwrap_or("/")
    }
    fn path_and_query(&self) -> &str {
        // Checked by `http::uri::PathAndQuery` when parsed: ASCII.
        std::str::from_utf8(self.bytes(self.target)).unwrap_or("/")
    }
    fn header_size(&self) -> (usize, usize) {
        (self.headers.len(), self.headers().map(|(n, v)| n.len() + v.len()).sum())
    }
    fn host(&self) -> Option<&[u8]> {
        Some(self.bytes(self.host))
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }
    fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers().filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }
}

/// Where the first request in `buf` ends, when `buf` holds all of it and
/// more: its head is complete, its body (if any) is delimited by one
/// `Content-Length` and is all there, it is no upgrade or CONNECT (after
/// which the bytes are a tunnel's), and bytes follow it — a pipelined next
/// request. None otherwise.
pub fn pipelined_after(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n < buf.len() => n,
        _ => return None,
    };
    if req.method.is_none_or(|m| m.eq_ignore_ascii_case("CONNECT")) {
        return None;
    }
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        let is = |name: &str| h.name.eq_ignore_ascii_case(name);
        if is("transfer-encoding") || is("upgrade") || is("expect") {
            return None;
        }
        if is("content-length") {
            let v: usize = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
            if length.is_some_and(|l| l != v) {
                return None;
            }
            length = Some(v);
        }
    }
    let end = n.checked_add(length.unwrap_or(0))?;
    (end < buf.len()).then_some(end)
}

/// A status line; `status` is 100–999 (checked where it is parsed).
pub fn put_status_line(out: &mut Vec<u8>, http10: bool, status: u16, reason: &[u8]) {
    out.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(&[b'0' + (status / 100) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8, b' ']);
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// The `Connection` value this proxy sends to a client.
pub fn connection_value(keepalive: bool) -> &'static [u8] {
    if keepalive {
        b"keep-alive"
    } else {
        b"close"
    }
}

pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A last answer, written before the connection closes (a request refused
/// or timed out before any parser ran, a connection over the limit): the
/// status, a plain-text `body`, `Date`, `Connection: close` and `extra`
/// fields.
pub fn closing_response(status: u16, reason: &[u8], body: &str, extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(192 + body.len());
    put_status_line(&mut out, false, status, reason);
    put_header(&mut out, b"Content-Type", b"text/plain; charset=utf-8");
    put_header(&mut out, b"Content-Length", body.len().to_string().as_bytes());
    for (name, value) in extra {
        put_header(&mut out, name, value);
    }
    put_header(&mut out, b"Date", pingora::protocols::http::date::get_cached_date().as_bytes());
    put_header(&mut out, b"Connection", b"close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

/// How a response body is delimited.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Framing {
    /// No body (HEAD, 204, 304, or `Content-Length: 0`).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

/// An upstream response head, parsed and rewritten for the client.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes of the head in the buffer it was parsed from.
    pub len: usize,
    /// A 1xx: more heads follow.
    pub informational: bool,
    /// How the backend delimits the body.
    pub framing: Framing,
    /// The body goes to the client chunked (the backend's has no framing).
    pub chunk_close_delimited: bool,
    /// The backend connection may be reused after the body (as far as the
    /// head says: HTTP/1.1 or `keep-alive`, no `close`, a delimited body).
    pub reusable: bool,
    /// The client connection may stay open after this response.
    pub client_keepalive: bool,
}

/// What the client response head depends on besides the backend's head.
pub struct ResponseContext<'a> {
    pub head_request: bool,
    /// Whether this proxy keeps the client connection after the response.
    pub keepalive: bool,
    pub request_id: &'a HeaderValue,
    pub date: &'a HeaderValue,
}

fn bad(context: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InvalidHTTPHeader, context)
}

/// Parse the upstream response head at the start of `buf` and append its
/// client version to `out`. None: the head is not complete yet.
pub fn parse_response(buf: &[u8], cx: &ResponseContext, out: &mut Vec<u8>) -> Result<Option<ResponseHead>> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config.allow_obsolete_multiline_headers_in_responses(true);
    let len = match config.parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err(bad("backend response head too large")),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(bad("invalid backend response head")),
    };
    let status = resp.code.unwrap_or(0);
    if !(100..1000).contains(&status) {
        return Err(bad("invalid status code from backend"));
    }
    let version = resp.version.unwrap_or(1);
    if status == 101 {
        // Nothing was asked to upgrade.
        return Err(bad("unexpected 101 from backend"));
    }
    let informational = (100..200).contains(&status);

    let (mut te, mut chunked, mut cl, mut cl_bad, mut has_cl) = (false, false, None::<u64>, false, false);
    let (mut conn_close, mut conn_keepalive, mut has_request_id) = (false, false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        if is(b"transfer-encoding") {
            te = true;
            // The last coding of the last Transfer-Encoding decides.
            chunked = h.value.rsplit(|&b| b == b',').next().is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if is(b"content-length") {
            has_cl = true;
            for v in h.value.split(|&b| b == b',') {
                let v = v.trim_ascii();
                let n = (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
                    .then(|| v.iter().fold(0u64, |n, d| n * 10 + (d - b'0') as u64));
                match (n, cl) {
                    (Some(n), None) => cl = Some(n),
                    (Some(n), Some(c)) if n == c => {}
                    _ => cl_bad = true,
                }
            }
        } else if is(b"connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                conn_close |= t.eq_ignore_ascii_case(b"close");
                conn_keepalive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if is(b"x-request-id") {
            has_request_id = true;
        }
    }

    let no_body = cx.head_request || status == 204 || status == 304 || informational;
    let framing = if no_body {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if te {
        Framing::Close
    } else if cl_bad {
        return Err(bad("invalid Content-Length from backend"));
    } else {
        match cl {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    // As HttpProxy: a body without framing goes to the client chunked; a
    // non-chunked Transfer-Encoding can only end with the connection.
    let chunk_close_delimited = framing == Framing::Close && !te;
    let client_keepalive = cx.keepalive && !(framing == Framing::Close && te);
    let keepalive = if conn_keepalive {
        true
    } else if conn_close {
        false
    } else {
        version == 1
    };
    let reusable = keepalive && framing != Framing::Close && !(version == 0 && te) && !(te && has_cl);

    // The status line: the backend's version (HTTP/1.1 when the body is
    // re-framed as chunked), code and reason phrase.
    put_status_line(out, version == 0 && !chunk_close_delimited, status, resp.reason.unwrap_or("").as_bytes());
    // Headers in the backend's order; this proxy's `Date` and `Connection`
    // take the place of the backend's (as a header map's insert would).
    let connection = connection_value(client_keepalive);
    let (mut date_done, mut connection_done) = (informational, informational);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if !informational && name.eq_ignore_ascii_case(b"date") {
            if !date_done {
                put_header(out, name, cx.date.as_bytes());
                date_done = true;
            }
        } else if !informational && name.eq_ignore_ascii_case(b"connection") {
            if !connection_done {
                put_header(out, name, connection);
                connection_done = true;
            }
        } else if te && name.eq_ignore_ascii_case(b"content-length") {
            // With Transfer-Encoding the length is void; passing it on would
            // let whoever trusts it read the body differently (as HttpProxy,
            // which drops it).
        } else if h.value.iter().any(|&b| b == b'\r' || b == b'\n') {
            // An obsolete line folding: unfolded to spaces.
            let value: Vec<u8> = h.value.iter().map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }).collect();
            put_header(out, name, &value);
        } else {
            put_header(out, name, h.value);
        }
    }
    if chunk_close_delimited {
        put_header(out, b"Transfer-Encoding", b"chunked");
    }
    if !has_request_id && !cx.request_id.is_empty() {
        put_header(out, b"x-request-id", cx.request_id.as_bytes());
    }
    if !date_done {
        put_header(out, b"Date", cx.date.as_bytes());
    }
    if !connection_done {
        put_header(out, b"Connection", connection);
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        status,
        len,
        informational,
        framing,
        chunk_close_delimited,
        reusable,
        client_keepalive,
    }))
}

/// Append `data` to `out` as one chunk.
pub fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if !data.is_empty() {
        let _ = write!(out, "{:x}\r\n", data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Decodes a chunked body as it arrives, in pieces of any size, and writes
/// its data re-chunked for the client ([`feed`](Self::feed)); or only checks
/// a client's chunked request body, strictly ([`check`](Self::check)).
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    trailers: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Bytes of chunk data still to come.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

impl Chunked {
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decode from `input`, appending the data as chunks (and the last chunk
    /// once the body ends) to `out`. Returns (bytes consumed, data bytes).
    /// Unconsumed bytes are an incomplete line (feed them again with more)
    /// or, once [`done`](Self::done), bytes after the body.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, u64)> {
        self.run(input, Some(out))
    }

    /// Follow a request body from `input` without decoding it, refusing
    /// what two parsers could read differently ([`strict_size_line`],
    /// [`strict_trailer_line`], CRLF line ends only). Returns the bytes
    /// consumed, as [`feed`](Self::feed) does.
    pub fn check(&mut self, input: &[u8]) -> Result<usize> {
        self.run(input, None).map(|(n, _)| n)
    }

    /// `out` None: strict, and nothing written.
    fn run(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<(usize, u64)> {
        let strict = out.is_none();
        let (mut at, mut data) = (0usize, 0u64);
        loop {
            let rest = &input[at..];
            match self.state {
                ChunkState::Done => break,
                ChunkState::Size if strict => {
                    // A size line starts with a digit: refused at its first
                    // byte, however the line is split.
                    if rest.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                        return Err(bad("invalid chunk size line"));
                    }
                    let Some(eol) = line_end(rest, MAX_CHUNK_LINE)? else { break };
                    let size = strict_size_line(&rest[..eol]).ok_or_else(|| bad("invalid chunk size line"))?;
                    at += eol + 2;
                    self.state = if size == 0 { ChunkState::Trailers } else { ChunkState::Data(size) };
                }
                // A size line must start with a digit (httparse takes an
                // empty line for the last chunk).
                ChunkState::Size if rest.first().is_some_and(|b| !b.is_ascii_hexdigit()) => {
                    return Err(bad("invalid chunk size from backend"));
                }
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    // The same bound whether the line came in one read or
                    // in many (a partial line is refused at this length).
                    Ok(httparse::Status::Complete((n, _))) if n > MAX_CHUNK_LINE => {
                        return Err(bad("chunk size line too long from backend"));
                    }
                    Ok(httparse::Status::Complete((n, 0))) => {
                        at += n;
                        self.state = ChunkState::Trailers;
                    }
                    Ok(httparse::Status::Complete((n, size))) => {
                        at += n;
                        self.state = ChunkState::Data(size);
                    }
                    Ok(httparse::Status::Partial) if rest.len() < MAX_CHUNK_LINE => break,
                    _ => return Err(bad("invalid chunk size from backend")),
                },
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        break;
                    }
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    if let Some(out) = out.as_deref_mut() {
                        put_chunk(out, &rest[..n]);
                    }
                    at += n;
                    data += n as u64;
                    let left = left - n as u64;
                    self.state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        break;
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let eol = if strict {
                        line_end(rest, MAX_TRAILERS - self.trailers)?
                    } else {
                        rest.windows(2).position(|w| w == b"\r\n")
                    };
                    let Some(eol) = eol else {
                        if self.trailers + rest.len() > MAX_TRAILERS {
                            return Err(bad("chunked trailers too large"));
                        }
                        break;
                    };
                    if strict && eol > 0 && !strict_trailer_line(&rest[..eol]) {
                        return Err(bad("invalid trailer field"));
                    }
                    at += eol + 2;
                    self.trailers += eol + 2;
                    if self.trailers > MAX_TRAILERS {
                        return Err(bad("chunked trailers too large"));
                    }
                    if eol == 0 {
                        if let Some(out) = out.as_deref_mut() {
                            out.extend_from_slice(LAST_CHUNK);
                        }
                        self.state = ChunkState::Done;
                    }
                }
            }
        }
        Ok((at, data))
    }
}

/// Where the CRLF-ended line at the start of `buf` ends (None: not yet, and
/// shorter than `max`). A CR not before LF, or an LF not after CR, is an
/// error, as is a line of `max` bytes or more.
fn line_end(buf: &[u8], max: usize) -> Result<Option<usize>> {
    let Some(i) = buf.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= max { Err(bad("chunk line too long")) } else { Ok(None) };
    };
    if i >= max {
        return Err(bad("chunk line too long"));
    }
    match (buf[i], buf.get(i + 1)) {
        (b'\r', Some(b'\n')) => Ok(Some(i)),
        (b'\r', None) => Ok(None),
        _ => Err(bad("chunk line not ended by CRLF")),
    }
}

/// An RFC 9110 token character.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The size of a chunk-size line (without its CRLF) if it is, strictly,
/// `1*15HEXDIG *( ";" token [ "=" ( token / quoted-string ) ] )`: no
/// whitespace anywhere (RFC 9112 allows some before `;`, which parsers
/// treat differently), at most 15 digits (no overflow), no control bytes.
pub fn strict_size_line(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let size = line[..digits].iter().fold(0u64, |n, &b| n * 16 + u64::from((b as char).to_digit(16).unwrap_or(0)));
    let mut e = &line[digits..];
    while !e.is_empty() {
        let rest = e.strip_prefix(b";")?;
        let name = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return None;
        }
        e = &rest[name..];
        let Some(v) = e.strip_prefix(b"=") else { continue };
        if let Some(q) = v.strip_prefix(b"\"") {
            let mut i = 0;
            loop {
                match *q.get(i)? {
                    b'"' => break,
                    b'\\' if q.get(i + 1).is_some_and(|&c| c == b'\t' || c >= 0x20 && c != 0x7f) => i += 2,
                    b if b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80 => i += 1,
                    _ => return None,
                }
            }
            e = &q[i + 1..];
        } else {
            let n = v.iter().take_while(|&&b| is_tchar(b)).count();
            if n == 0 {
                return None;
            }
            e = &v[n..];
        }
    }
    Some(size)
}

/// Whether a trailer line (without its CRLF) is a field line: a token,
/// `:`, and a value of visible bytes, spaces and tabs.
pub fn strict_trailer_line(line: &[u8]) -> bool {
    let name = line.iter().take_while(|&&b| is_tchar(b)).count();
    name > 0 && line.get(name) == Some(&b':') && line[name + 1..].iter().all(|&b| b == b'\t' || b >= 0x20 && b != 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(s: &str) -> Option<Box<RawRequest>> {
        match RawRequest::parse(s.as_bytes().to_vec()) {
            Verdict::Express(r) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn eligibility() {
        let ok = |s: &str| request(s).is_some();
        assert!(ok("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(ok("HEAD /x?y=1 HTTP/1.1\r\nhost: a\r\nConnection: keep-alive\r\nCookie: c=1\r\n\r\n"));
        assert!(ok("DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"));
        // incomplete head, other versions, bodies, upgrades, absolute form
        assert!(matches!(RawRequest::parse(b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec()), Verdict::Partial(_)));
        assert!(!ok("GET / HTTP/1.0\r\nHost: a\r\n\r\n"));
        assert!(!ok("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"));
        assert!(!ok("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ok("GET * HTTP/1.1\r\nHost: a\r\n\r\n"));
        // A pipelined next request is kept for later, not refused.
        match RawRequest::parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /n HTTP/1.1\r\n".to_vec()) {
            Verdict::Express(r) => assert_eq!(r.ahead, b"GET /n HTTP/1.1\r\n"),
            v => panic!("{v:?}"),
        }
        assert!(
            !matches!(RawRequest::parse(b"GET /a\xffb HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()), Verdict::Express(_)),
            "a target http::Uri would not keep"
        );
        // Host missing or twice; nominated hop-by-hop headers; other hop-by-hop headers
        assert!(!ok("GET / HTTP/1.1\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n"), "userinfo in Host: HttpProxy refuses it");
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-secret\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: close\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: timeout=5\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: x\r\n\r\n"));
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!ok("garbage\r\n\r\n"));
    }

    #[test]
    fn request_view_and_upstream_request() {
        let r = request("GET /p/q?x=1 HTTP/1.1\r\nHost: www.example.com\r\nX-Forwarded-For: 1.2.3.4\r\nCookie: a=1\r\ncookie: b=2\r\nConnection: close\r\nX-Trace: t\r\n\r\n").unwrap();
        assert_eq!((r.method(), r.path(), r.host()), ("GET", "/p/q", Some(&b"www.example.com"[..])));
        assert_eq!(r.header("x-trace"), Some(&b"t"[..]));
        assert_eq!(r.header_all("cookie").collect::<Vec<_>>(), vec![&b"a=1"[..], &b"b=2"[..]]);
        assert!(r.close);
        let fwd = [
            (HeaderName::from_static("x-forwarded-for"), FwdValue::Raw(b"1.2.3.4, 10.0.0.1")),
            (HeaderName::from_static("x-request-id"), FwdValue::Raw(b"rid")),
        ];
        let mut out = Vec::new();
        r.write_upstream(&mut out, fwd.into_iter());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p/q?x=1 HTTP/1.1\r\nHost: www.example.com\r\nCookie: a=1\r\ncookie: b=2\r\nX-Trace: t\r\n\
             x-forwarded-for: 1.2.3.4, 10.0.0.1\r\nx-request-id: rid\r\n\r\n"
        );
    }

    fn respond(raw: &str, head_request: bool, keepalive: bool) -> Result<(ResponseHead, String)> {
        let rid = HeaderValue::from_static("rid");
        let date = HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT");
        let cx = ResponseContext { head_request, keepalive, request_id: &rid, date: &date };
        let mut out = Vec::new();
        let head = parse_response(raw.as_bytes(), &cx, &mut out)?.expect("complete");
        Ok((head, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn response_framing_and_reuse() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: x\r\nConnection: keep-alive\r\n\r\nok";
        let (h, out) = respond(raw, false, true).unwrap();
        assert_eq!((h.status, h.len, h.framing, h.reusable, h.client_keepalive), (200, raw.len() - 2, Framing::Length(2), true, true));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\nConnection: keep-alive\r\nx-request-id: rid\r\n\r\n");
        let (_, out) = respond("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false, false).unwrap();
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-request-id: rid\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\nConnection: close\r\n\r\n");
        // close-delimited: re-framed as chunked HTTP/1.1, backend not reused
        let (h, out) = respond("HTTP/1.0 200 Fine\r\nX-Request-Id: theirs\r\n\r\n", false, false).unwrap();
        assert_eq!((h.framing, h.chunk_close_delimited, h.reusable), (Framing::Close, true, false));
        assert!(out.starts_with("HTTP/1.1 200 Fine\r\nX-Request-Id: theirs\r\n"), "{out}");
        assert!(out.ends_with("Transfer-Encoding: chunked\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\nConnection: close\r\n\r\n") && !out.contains("rid"), "{out}");
        // HTTP/1.0 with a length keeps its version; not reusable without keep-alive
        let (h, out) = respond("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", false, true).unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Length(2), false));
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"));
        let (h, _) = respond("HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\n", false, true).unwrap();
        assert!(h.reusable);
        // chunked wins over Content-Length, which is not passed on; such a connection is not reused
        let (h, out) = respond("HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false, true).unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, false));
        assert!(!out.to_ascii_lowercase().contains("content-length"), "{out}");
        // a non-chunked coding ends with the connection, on both sides
        let (h, out) = respond("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, true).unwrap();
        assert_eq!((h.framing, h.chunk_close_delimited, h.client_keepalive), (Framing::Close, false, false));
        assert!(out.contains("Connection: close\r\n") && !out.contains("chunked"), "{out}");
        // no body: HEAD, 204, 304, whatever the headers say
        for (raw, head) in [("HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n", true), ("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", false), ("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", false)] {
            let (h, out) = respond(raw, head, true).unwrap();
            assert_eq!((h.framing, h.reusable), (Framing::Empty, true), "{raw}");
            assert_eq!(out.matches("chunked").count(), raw.matches("chunked").count(), "nothing added: {out}");
        }
        // 1xx: passed through as they are (no Date or Connection), more heads follow
        let (h, out) = respond("HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\n", false, true).unwrap();
        assert!(h.informational);
        assert_eq!(out, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nx-request-id: rid\r\n\r\n");
        // duplicate identical lengths are one; differing or bad ones are refused
        assert_eq!(respond("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n", false, true).unwrap().0.framing, Framing::Length(3));
        for raw in ["HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", "HTTP/1.1 101 Switching Protocols\r\n\r\n", "NOT HTTP\r\n\r\n"] {
            assert!(respond(raw, false, true).is_err(), "{raw}");
        }
        // obsolete line folding is unfolded
        let (_, out) = respond("HTTP/1.1 200 OK\r\nX-Long: a\r\n b\r\nContent-Length: 0\r\n\r\n", false, true).unwrap();
        assert!(out.contains("X-Long: a   b\r\n"), "{out}");
    }

    /// Decode a chunked body fed in pieces of `step` bytes (as reads would
    /// deliver it); returns the client's bytes and what was left over.
    fn dechunk(body: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>, bool)> {
        let (mut c, mut out, mut pending) = (Chunked::default(), Vec::new(), Vec::new());
        for piece in body.chunks(step) {
            pending.extend_from_slice(piece);
            let (n, _) = c.feed(&pending, &mut out)?;
            pending.drain(..n);
        }
        Ok((out, pending, c.done()))
    }

    fn decode(mut chunked: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        loop {
            let eol = chunked.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&chunked[..eol]).unwrap(), 16).unwrap();
            if n == 0 {
                assert_eq!(&chunked[eol..], b"\r\n\r\n");
                return data;
            }
            data.extend_from_slice(&chunked[eol + 2..eol + 2 + n]);
            assert_eq!(&chunked[eol + 2 + n..eol + 4 + n], b"\r\n");
            chunked = &chunked[eol + 4 + n..];
        }
    }

    #[test]
    fn chunked_bodies_in_any_pieces() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for step in 1..body.len() + 1 {
            let (out, left, done) = dechunk(body, step).unwrap();
            assert!(done, "step {step}");
            assert_eq!(decode(&out), b"hello world", "step {step}");
            assert_eq!(left, b"NEXT", "step {step}: bytes after the body are left over");
        }
        let (out, left, done) = dechunk(b"3\r\nabc\r\n", 4).unwrap();
        assert!(!done && left.is_empty());
        assert_eq!(out, b"1\r\na\r\n2\r\nbc\r\n", "data is passed on as it arrives");
        for bad in [&b"zz\r\n"[..], b"3\r\nabcX\r\n", b"fffffffffffffffffffff\r\n", b"3\r\nabc\r\n\r\n3\r\ndef\r\n0\r\n\r\n", b";x\r\n"] {
            assert!(dechunk(bad, 64).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(dechunk(&[b'1'; 5000], 5000).is_err(), "an endless size line is refused");
        // A size line longer than the limit is refused however it arrives,
        // not only when it is still incomplete at the limit.
        let mut long = b"1;".to_vec();
        long.extend_from_slice(&[b'x'; MAX_CHUNK_LINE]);
        long.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        for step in [1, 7, long.len()] {
            assert!(dechunk(&long, step).is_err(), "step {step}");
        }
    }

    mod properties {
        use super::super::*;
        use super::decode;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]

            /// Whatever a client or a backend sends, the codec answers
            /// without panicking.
            #[test]
            fn any_bytes_are_handled(bytes in proptest::collection::vec(any::<u8>(), 0..600), split in 1usize..64) {
                let _ = RawRequest::parse(bytes.clone());
                let (rid, date) = (HeaderValue::from_static("rid"), HeaderValue::from_static("d"));
                let mut framed = b"HTTP/1.1 200 OK\r\n".to_vec();
                framed.extend_from_slice(&bytes);
                for (input, head_request) in [(&bytes, false), (&framed, true)] {
                    let cx = ResponseContext { head_request, keepalive: true, request_id: &rid, date: &date };
                    let _ = parse_response(input, &cx, &mut Vec::new());
                }
                let (mut c, mut out, mut pending) = (Chunked::default(), Vec::new(), Vec::new());
                for piece in bytes.chunks(split) {
                    pending.extend_from_slice(piece);
                    match c.feed(&pending, &mut out) {
                        Ok((n, _)) => { pending.drain(..n); }
                        Err(_) => break,
                    }
                }
            }

            /// A chunked body of any chunk sizes, arriving in pieces of any
            /// size, reaches the client with the same data.
            #[test]
            fn chunked_data_survives_any_split(
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
                split in 1usize..97,
            ) {
                let mut body = Vec::new();
                for c in &chunks {
                    body.extend_from_slice(format!("{:X}\r\n", c.len()).as_bytes());
                    body.extend_from_slice(c);
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n\r\n");
                let (mut c, mut out, mut pending, mut data) = (Chunked::default(), Vec::new(), Vec::new(), 0u64);
                for piece in body.chunks(split) {
                    pending.extend_from_slice(piece);
                    let (n, d) = c.feed(&pending, &mut out).unwrap();
                    pending.drain(..n);
                    data += d;
                }
                prop_assert!(c.done());
                prop_assert!(pending.is_empty());
                let expected: Vec<u8> = chunks.concat();
                prop_assert_eq!(data, expected.len() as u64);
                prop_assert_eq!(decode(&out), expected);
            }
        }
    }

    #[test]
    fn where_a_pipelined_request_starts() {
        let two = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n";
        assert_eq!(pipelined_after(two), Some(28));
        let body = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET /b";
        assert_eq!(pipelined_after(body), Some(body.len() - 6));
        // Nothing after, a body not all there, or framing this cannot follow.
        assert_eq!(pipelined_after(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"), None);
        assert_eq!(pipelined_after(b"POST /a HTTP/1.1\r\nContent-Length: 9\r\n\r\nhiGET"), None);
        assert_eq!(pipelined_after(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET"), None);
        assert_eq!(pipelined_after(b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nhiGET"), None);
        assert_eq!(pipelined_after(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"), None);
        assert_eq!(pipelined_after(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03"), None);
    }
}
