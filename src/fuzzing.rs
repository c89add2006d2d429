//! Fuzz entry points: one function per target, each taking arbitrary bytes
//! and panicking when an invariant does not hold. The cargo-fuzz crate in
//! `tests/fuzz/` calls them (one thin target each), and so does the stable
//! smoke test (`tests/fuzz_smoke.rs`), which replays the committed seed
//! corpora and seeded mutations of them. docs/fuzzing.md lists the targets
//! and what each asserts.
//!
//! Not part of the proxy's API: hidden from the docs, and free to change.

use crate::config::{HostPattern, RouteSpec};
use crate::proxy::headers::FwdValue;
use crate::proxy::h1::{self, Chunked, Framing, RawRequest, ResponseContext, Verdict};
use crate::proxy::inbound::{Inbound, Refused};
use crate::routing::matcher::prefix_matches;
use crate::routing::{RequestView, Router};
use http::HeaderValue;
use std::collections::BTreeMap;
use std::path::Path;

/// Every target, by the name of its cargo-fuzz target and corpus directory.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("request_head", request_head),
    ("response_head", response_head),
    ("chunked", chunked),
    ("request_differential", request_differential),
    ("inbound", inbound),
    ("config", config),
    ("consul", consul),
    ("catalog", catalog),
    ("tags", tags),
    ("matcher", matcher),
];

/// A small deterministic generator (SplitMix64), for split points and for
/// the smoke test's mutations.
#[derive(Clone, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

fn lower(b: &[u8]) -> Vec<u8> {
    b.to_ascii_lowercase()
}

// ---------------------------------------------------------------------------
// 1. Request heads (express codec)

/// The express codec's request head parser. On `Express`: the head and the
/// bytes after it are the input, the parts it reports are where they are in
/// the head, and the request it writes upstream parses back (strictly) to
/// the same method, target and headers, minus `Connection`, with no body
/// framing. On `Partial`: the input comes back whole and no shorter head is
/// complete in it. `pipelined_after` never points inside the head or past
/// the input.
pub fn request_head(data: &[u8]) {
    let head_len = match RawRequest::parse(data.to_vec()) {
        Verdict::Partial(b) => {
            assert_eq!(b, data, "a partial head comes back as it was");
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let complete = matches!(httparse::Request::new(&mut headers).parse(data), Ok(httparse::Status::Complete(_)));
            assert!(!complete, "a complete head reported as partial");
            None
        }
        Verdict::Refused(b) => {
            assert_eq!(b, data, "a refused head comes back as it was");
            None
        }
        Verdict::Express(r) => Some(check_express(data, &r)),
    };
    if let Some(end) = h1::pipelined_after(data) {
        assert!(end < data.len(), "pipelined_after points past the input");
        if let Some(n) = head_len {
            assert!(end >= n, "pipelined_after points inside the head");
        }
    }
}

/// The invariants of a head the express path takes; returns its length.
fn check_express(data: &[u8], r: &RawRequest) -> usize {
    let n = data.len() - r.ahead.len();
    assert_eq!(&data[n..], &r.ahead[..], "the bytes after the head are kept");
    let head = &data[..n];
    let method = r.method();
    assert!(["GET", "HEAD", "OPTIONS", "DELETE"].contains(&method), "{method}");
    let target = r.path_and_query();
    assert!(target.starts_with('/'), "origin-form target: {target:?}");
    assert!(target.starts_with(r.path()) && !r.path().contains('?'), "path {:?} of {target:?}", r.path());
    assert_eq!(&target[r.path().len()..].chars().next().unwrap_or('?'), &'?', "the path ends where the query starts");
    let host = r.host().expect("an express request has a Host");

    // The same head, parsed by httparse on its own.
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    assert_eq!(req.parse(head), Ok(httparse::Status::Complete(n)), "the head is exactly one complete head");
    assert_eq!((req.method, req.path, req.version), (Some(method), Some(target), Some(1)));
    let hosts: Vec<&[u8]> = req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host")).map(|h| h.value).collect();
    assert_eq!(hosts, vec![host], "exactly one Host, the one reported");
    let close = req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("connection") && h.value.trim_ascii().eq_ignore_ascii_case(b"close"));
    assert_eq!(r.close, close, "Connection: close");
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        assert!(!["transfer-encoding", "upgrade", "expect", "te", "trailer", "keep-alive"].contains(&name.as_str()), "{name} let through");
        if name == "content-length" {
            assert_eq!(h.value.trim_ascii(), b"0", "a body let through");
        }
    }
    let (count, bytes) = r.header_size();
    assert_eq!(count, req.headers.len());
    assert_eq!(bytes, req.headers.iter().map(|h| h.name.len() + h.value.len()).sum::<usize>());

    // What goes upstream: the same request, strictly valid, without Connection.
    let mut out = Vec::new();
    let fwd = || {
        [
            (http::HeaderName::from_static("x-forwarded-for"), FwdValue::Raw(b"10.0.0.1")),
            (http::HeaderName::from_static("x-request-id"), FwdValue::Raw(b"rid")),
            (http::HeaderName::from_static("x-forwarded-host"), FwdValue::Remove),
        ]
    };
    r.write_upstream(&mut out, fwd().into_iter());
    // Room for the client's headers and the forwarding ones.
    let mut up_headers = [httparse::EMPTY_HEADER; 64 + 8];
    let mut up = httparse::Request::new(&mut up_headers);
    assert_eq!(up.parse(&out), Ok(httparse::Status::Complete(out.len())), "upstream request: {}", String::from_utf8_lossy(&out));
    assert_eq!((up.method, up.path, up.version), (Some(method), Some(target), Some(1)));
    assert!(out.windows(2).filter(|w| w == b"\r\n").count() == up.headers.len() + 2, "CRLF line ends only");
    let sent: Vec<(Vec<u8>, &[u8])> = up.headers.iter().map(|h| (lower(h.name.as_bytes()), h.value)).collect();
    let expected: Vec<(Vec<u8>, &[u8])> = req
        .headers
        .iter()
        .filter(|h| !h.name.eq_ignore_ascii_case("connection"))
        .filter(|h| !fwd().iter().any(|(n, _)| h.name.eq_ignore_ascii_case(n.as_str())))
        .map(|h| (lower(h.name.as_bytes()), h.value))
        .chain([(b"x-forwarded-for".to_vec(), &b"10.0.0.1"[..]), (b"x-request-id".to_vec(), &b"rid"[..])])
        .collect();
    assert_eq!(sent, expected, "upstream headers: the client's in order, without Connection and replaced ones, then the forwarding ones");
    n
}

// ---------------------------------------------------------------------------
// 2. Response heads

/// The upstream response head parser. The first byte picks the context
/// (HEAD request, client keep-alive). A head reported complete is complete
/// at exactly that length and at no shorter one; the head written for the
/// client parses strictly, has one `Date` and one `Connection` (final heads)
/// and tells the client the same body framing the proxy then sends.
pub fn response_head(data: &[u8]) {
    let Some((&flags, buf)) = data.split_first() else { return };
    let rid = HeaderValue::from_static("fuzz-rid");
    let date = HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT");
    let cx = ResponseContext { head_request: flags & 1 != 0, keepalive: flags & 2 != 0, request_id: &rid, date: &date };
    let mut out = Vec::new();
    let head = match h1::parse_response(buf, &cx, &mut out) {
        Ok(Some(head)) => head,
        Ok(None) => {
            assert!(out.is_empty(), "nothing written for an incomplete head");
            assert!(buf.len() <= h1::MAX_RESPONSE_HEAD);
            return;
        }
        Err(_) => return,
    };
    assert!(head.len <= buf.len());
    assert!((100..1000).contains(&head.status) && head.status != 101);
    assert_eq!(head.informational, (100..200).contains(&head.status));

    // Complete at its length, and not before.
    let mut again = Vec::new();
    let at_len = h1::parse_response(&buf[..head.len], &cx, &mut again).expect("the head alone parses").expect("complete");
    assert_eq!((at_len.len, at_len.framing, &again), (head.len, head.framing, &out), "the same head without what follows");
    for cut in [head.len - 1, head.len / 2] {
        let r = h1::parse_response(&buf[..cut], &cx, &mut Vec::new());
        assert!(matches!(r, Ok(None)), "a prefix of {cut} bytes of a {}-byte head: {r:?}", head.len);
    }

    let no_body = cx.head_request || head.status == 204 || head.status == 304 || head.informational;
    if no_body {
        assert_eq!(head.framing, Framing::Empty, "no body after HEAD, 1xx, 204, 304");
    }
    if head.chunk_close_delimited {
        assert_eq!(head.framing, Framing::Close);
    }
    if head.framing == Framing::Close {
        assert!(!head.reusable, "a close-delimited backend connection is not reused");
    }

    // The client's head.
    let mut headers = [httparse::EMPTY_HEADER; 300];
    let mut resp = httparse::Response::new(&mut headers);
    assert_eq!(resp.parse(&out), Ok(httparse::Status::Complete(out.len())), "client head: {}", String::from_utf8_lossy(&out));
    assert_eq!(resp.code, Some(head.status));
    let all = |name: &str| -> Vec<&[u8]> { resp.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value).collect() };
    assert!(!all("x-request-id").is_empty(), "a request id goes to the client");
    if head.informational {
        return;
    }
    assert_eq!(all("date"), vec![date.as_bytes()], "one Date, this proxy's");
    let keepalive: &[u8] = if head.client_keepalive { b"keep-alive" } else { b"close" };
    assert_eq!(all("connection"), vec![keepalive], "one Connection, this proxy's");
    if head.framing == Framing::Empty {
        return;
    }
    // How a client reads the body from this head (RFC 9112 section 6.3).
    let te = all("transfer-encoding");
    let cl = all("content-length");
    let client_chunked = te.last().is_some_and(|v| v.rsplit(|&b| b == b',').next().unwrap().trim_ascii().eq_ignore_ascii_case(b"chunked"));
    if !te.is_empty() {
        assert!(cl.is_empty(), "Content-Length next to Transfer-Encoding: {}", String::from_utf8_lossy(&out));
    }
    match head.framing {
        Framing::Length(n) => {
            assert!(te.is_empty());
            for v in cl {
                for part in v.split(|&b| b == b',') {
                    let read = std::str::from_utf8(part.trim_ascii()).ok().and_then(|d| d.parse::<u64>().ok());
                    assert_eq!(read, Some(n), "the length the client reads");
                }
            }
        }
        Framing::Chunked => assert!(client_chunked, "a chunked body is sent chunked"),
        Framing::Close if head.chunk_close_delimited => {
            assert!(client_chunked && cl.is_empty(), "a close-delimited body is sent chunked");
            assert!(resp.version == Some(1), "chunked needs HTTP/1.1");
        }
        Framing::Close => {
            assert!(!client_chunked && !te.is_empty(), "a non-chunked coding stays as it came");
            assert!(!head.client_keepalive, "and ends with the connection");
        }
        Framing::Empty => unreachable!(),
    }
}

// ---------------------------------------------------------------------------
// 3. Chunked bodies

/// What decoding a chunked body produced: its data (decoded back from the
/// re-chunked output), whether it ended, what was left over; None: refused.
fn dechunk_pieces(body: &[u8], pieces: &mut dyn FnMut(usize) -> usize) -> Option<(Vec<u8>, bool, Vec<u8>)> {
    let (mut c, mut out, mut pending, mut data, mut at) = (Chunked::default(), Vec::new(), Vec::new(), 0u64, 0usize);
    while at < body.len() {
        let n = pieces(body.len() - at).clamp(1, body.len() - at);
        pending.extend_from_slice(&body[at..at + n]);
        at += n;
        let before = out.len();
        let (used, d) = c.feed(&pending, &mut out).ok()?;
        assert!(used <= pending.len());
        assert!(out.len() >= before);
        pending.drain(..used);
        data += d;
        if c.done() {
            // What follows the body is not the decoder's.
            pending.extend_from_slice(&body[at..]);
            break;
        }
    }
    let decoded = decode_chunked(&out, c.done());
    assert_eq!(decoded.len() as u64, data, "data bytes counted");
    Some((decoded, c.done(), pending))
}

/// Strictly decode what the decoder wrote for the client: chunks of
/// `HEX CRLF data CRLF`, and `0 CRLF CRLF` exactly at the end when `done`.
fn decode_chunked(mut s: &[u8], done: bool) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        if s.is_empty() {
            assert!(!done, "the last chunk is written once the body ends");
            return data;
        }
        let eol = s.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = std::str::from_utf8(&s[..eol]).ok().and_then(|h| usize::from_str_radix(h, 16).ok()).expect("a hex size");
        if size == 0 {
            assert_eq!(&s[eol..], b"\r\n\r\n", "the last chunk ends the output");
            assert!(done);
            return data;
        }
        data.extend_from_slice(&s[eol + 2..eol + 2 + size]);
        assert_eq!(&s[eol + 2 + size..eol + 4 + size], b"\r\n");
        s = &s[eol + 4 + size..];
    }
}

/// The chunked body decoder. The first two bytes seed the split points; the
/// rest is the body. Fed whole, one byte at a time and in pseudo-random
/// pieces, it refuses or accepts alike, with the same data, end and leftover.
pub fn chunked(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (seed, body) = data.split_at(2);
    let whole = dechunk_pieces(body, &mut |left| left);
    let bytes = dechunk_pieces(body, &mut |_| 1);
    let mut rng = SplitMix(u16::from_le_bytes([seed[0], seed[1]]) as u64);
    let random = dechunk_pieces(body, &mut |left| if rng.below(4) == 0 { rng.below(left) + 1 } else { rng.below(8) + 1 });
    assert_eq!(whole, bytes, "whole vs byte by byte");
    assert_eq!(whole, random, "whole vs pieces");
}

// ---------------------------------------------------------------------------
// 4. Express codec vs Pingora

/// How Pingora's HTTP/1 server session reads a request from these bytes.
#[derive(Debug)]
struct PingoraRequest {
    head_len: usize,
    method: String,
    target: Vec<u8>,
    version: http::Version,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    keepalive: bool,
    upgrade: bool,
    /// Body bytes read, when the body ended within the input.
    body: Option<usize>,
}

fn pingora_read(data: &[u8]) -> Option<PingoraRequest> {
    use pingora::protocols::http::v1::server::HttpSession;
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    }
    RT.with(|rt| {
        rt.block_on(async {
            let mut s = HttpSession::new(Box::new(std::io::Cursor::new(data.to_vec())));
            let head_len = match s.read_request().await {
                Ok(Some(n)) => n,
                _ => return None,
            };
            let req = s.req_header();
            let mut headers: Vec<(Vec<u8>, Vec<u8>)> =
                req.headers.iter().map(|(n, v)| (n.as_str().as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
            headers.sort();
            let (method, target, version) = (req.method.to_string(), req.raw_path().to_vec(), req.version);
            let (keepalive, upgrade) = (s.will_keepalive(), s.is_upgrade_req());
            let mut body = Some(0usize);
            // Bounded: the input is all there is.
            for _ in 0..=data.len() + 1 {
                match s.read_body_bytes().await {
                    Ok(Some(b)) => *body.as_mut().unwrap() += b.len(),
                    Ok(None) => break,
                    Err(_) => {
                        body = None;
                        break;
                    }
                }
            }
            Some(PingoraRequest { head_len, method, target, version, headers, keepalive, upgrade, body })
        })
    })
}

/// The express codec against Pingora's own HTTP/1 server session (the
/// parser `HttpProxy` reads requests with), over an in-memory stream. Where
/// the express path takes a request, Pingora must read the same request:
/// same head length, method, target, version, headers and keep-alive, no
/// upgrade, an empty body. Where `pipelined_after` splits a buffer before a
/// pipelined request, Pingora must read the first request's body to exactly
/// that point (or refuse the request). Where the express path refuses,
/// nothing is asserted: refusing sends the bytes to Pingora itself.
pub fn request_differential(data: &[u8]) {
    let ours = match RawRequest::parse(data.to_vec()) {
        Verdict::Express(r) => Some(r),
        _ => None,
    };
    let split = h1::pipelined_after(data);
    if ours.is_none() && split.is_none() {
        return;
    }
    let theirs = pingora_read(data);
    if let Some(r) = ours {
        let p = theirs.as_ref().unwrap_or_else(|| panic!("express takes a request Pingora refuses: {:?}", String::from_utf8_lossy(data)));
        let n = data.len() - r.ahead.len();
        assert_eq!(p.head_len, n, "head length");
        assert_eq!(p.method, r.method());
        assert_eq!(p.target, r.path_and_query().as_bytes(), "target");
        assert_eq!(p.version, http::Version::HTTP_11);
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut hs);
            let _ = req.parse(&data[..n]);
            req.headers.iter().map(|h| (lower(h.name.as_bytes()), h.value.to_vec())).collect()
        };
        headers.sort();
        assert_eq!(p.headers, headers, "headers");
        assert_eq!(p.keepalive, !r.close, "keep-alive");
        assert!(!p.upgrade, "an upgrade taken by express");
        assert_eq!(p.body, Some(0), "Pingora reads a body from a request express takes without one");
    }
    if let (Some(end), Some(p)) = (split, theirs.as_ref()) {
        assert!(!p.upgrade, "a split before an upgrade's bytes");
        match p.body {
            Some(body) => assert_eq!(p.head_len + body, end, "where the first request ends: {:?}", String::from_utf8_lossy(data)),
            None => panic!("a split where Pingora cannot read the body: {:?}", String::from_utf8_lossy(data)),
        }
    }
}

/// Follow `bytes` as one read, answering each upgrade asked for with
/// `answer`: the bytes followed (fewer when an answer left it waiting).
fn follow_read(i: &mut Inbound, bytes: &[u8], answer: u16) -> Result<usize, Refused> {
    let mut at = 0;
    while at < bytes.len() {
        let n = i.feed(&bytes[at..]).map_err(|r| Refused { start: r.start.map(|s| at + s), ..r })?;
        assert!(n <= bytes.len() - at);
        if n < bytes.len() - at {
            assert!(i.awaiting_answer(), "bytes left unfollowed only to wait for an answer");
        }
        at += n;
        i.answered(answer);
        if i.awaiting_answer() {
            break;
        }
    }
    Ok(at)
}

/// What following a client's bytes in pieces gave: the refusal (which
/// stops it), the requests ended, and where it stopped.
fn follow_pieces(bytes: &[u8], answer: u16, pieces: &mut dyn FnMut(usize) -> usize) -> (Option<&'static str>, u32, usize) {
    let mut i = Inbound::default();
    let mut at = 0;
    while at < bytes.len() {
        let n = pieces(bytes.len() - at).clamp(1, bytes.len() - at);
        let before = i.current();
        match follow_read(&mut i, &bytes[at..at + n], answer) {
            Ok(k) if k < n => return (None, i.current(), at + k),
            Ok(_) => at += n,
            Err(r) => {
                if let Some(start) = r.start {
                    assert!(start <= n, "a refused request starts within its read");
                    // Whole requests before it: the same count, fed alone.
                    let mut again = Inbound::default();
                    assert!(follow_read(&mut again, &bytes[..at + start], answer).is_ok(), "the bytes before a refused request are accepted");
                    assert_eq!(again.current(), i.current(), "they are the requests counted");
                }
                assert!(!(r.in_flight && r.start.is_some()), "a request in flight started before this read");
                assert!(i.current() >= before);
                return (Some(r.reason), i.current(), at);
            }
        }
    }
    (None, i.current(), at)
}

/// The client-stream follower (src/proxy/inbound.rs). The first two bytes
/// seed the split points and how an upgrade asked for is answered; the rest
/// is what a client sends. Fed whole, one
/// byte at a time and in pseudo-random pieces, it refuses alike (the same
/// reason) or accepts alike, having counted the same requests; a refused
/// request's start is where the requests before it end. And a chunk-size
/// line it takes (up to the first CRLF) is read by httparse, Pingora's chunk
/// parser, as the same size at the same length.
pub fn inbound(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let (seed, bytes) = data.split_at(2);
    // How an upgrade asked for is answered: taken, declined, or never.
    let answer = [101, 426, 100][seed[0] as usize % 3];
    let (whole, whole_n, _) = follow_pieces(bytes, answer, &mut |left| left);
    let (single, single_n, _) = follow_pieces(bytes, answer, &mut |_| 1);
    let mut rng = SplitMix(u16::from_le_bytes([seed[0], seed[1]]) as u64);
    let (random, random_n, _) = follow_pieces(bytes, answer, &mut |left| if rng.below(4) == 0 { rng.below(left) + 1 } else { rng.below(8) + 1 });
    assert_eq!(whole, single, "whole vs byte by byte");
    assert_eq!(whole, random, "whole vs pieces");
    if whole.is_none() {
        assert_eq!((whole_n, whole_n), (single_n, random_n), "requests counted");
    }
    if let Some(eol) = bytes.windows(2).position(|w| w == b"\r\n") {
        if let Some(size) = h1::strict_size_line(&bytes[..eol]) {
            match httparse::parse_chunk_size(&bytes[..eol + 2]) {
                Ok(httparse::Status::Complete((n, s))) => assert_eq!((n, s), (eol + 2, size), "a strict size line read differently: {:?}", String::from_utf8_lossy(&bytes[..eol])),
                other => panic!("a strict size line httparse does not read: {:?} {other:?}", String::from_utf8_lossy(&bytes[..eol])),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Config files

/// Whether any string in a TOML value names a file this process should not
/// read while fuzzing (devices, `/proc`, `/sys`: endless or blocking reads).
fn names_special_file(v: &toml::Value) -> bool {
    match v {
        toml::Value::String(s) => ["dev", "proc", "sys", "fd"].iter().any(|w| s.contains(w)),
        toml::Value::Array(a) => a.iter().any(names_special_file),
        toml::Value::Table(t) => t.iter().any(|(k, v)| names_special_file(v) || k.contains("dev")),
        _ => false,
    }
}

/// The config parser and validator (no environment, a base directory that
/// does not exist). Refusals name at least one error, each with a message;
/// a valid config is valid the same way twice, routes name clusters it has
/// and path prefixes that start with `/`, and it can be summarised.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let table = match crate::config::validate::parse_toml(text) {
        Ok(t) => t,
        Err(e) => {
            assert!(!e.0.is_empty() && !e.to_string().is_empty());
            return;
        }
    };
    if table.iter().any(|(_, v)| names_special_file(v)) {
        return;
    }
    let base = Path::new("/nonexistent/switchyard-fuzz");
    let no_env = |_: &str| None;
    match crate::config::validate::validate_table(&table, base, &no_env) {
        Err(e) => {
            assert!(!e.0.is_empty(), "a refusal with no error");
            for err in &e.0 {
                assert!(!err.message.is_empty(), "an error without a message at {:?}", err.path);
            }
        }
        Ok(c) => {
            let again = crate::config::validate::validate_table(&table, base, &no_env).expect("valid twice");
            assert_eq!(format!("{c:?}"), format!("{again:?}"), "the same config twice");
            for r in &c.routes {
                assert!(c.clusters.contains_key(&r.cluster), "route {} names unknown cluster {}", r.name, r.cluster);
                assert!(r.path_prefix.starts_with('/'), "route {} prefix {:?}", r.name, r.path_prefix);
            }
            let _ = c.summary();
        }
    }
}

// ---------------------------------------------------------------------------
// 6. Consul answers

/// The decoders of Consul's answers, each on the same bytes: health
/// (`/v1/health/service`), the catalog's services and tags, KV. Results are
/// sorted and unique as documented, and what they produce, written back as
/// Consul would send it, decodes to the same.
pub fn consul(data: &[u8]) {
    use crate::discovery::consul::{catalog::parse_services, health::parse_health, kv::parse_entries};
    use base64::Engine as _;
    if let Ok(p) = parse_health(data) {
        let mut keys: Vec<(&str, &str)> = p.instances.iter().map(|i| (i.node.as_str(), i.id.as_str())).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "instances sorted and unique");
        let named: Vec<(&str, &str)> = p.named.iter().map(|i| (i.node.as_str(), i.id.as_str())).collect();
        assert!(named.windows(2).all(|w| w[0] < w[1]), "named instances sorted and unique");
        keys.extend(named);
        keys.sort();
        assert!(keys.windows(2).all(|w| w[0] != w[1]), "a node and ID in both lists");
        for i in &p.instances {
            assert!(i.addr.port() != 0 && !i.addr.ip().is_unspecified() && !i.addr.ip().is_multicast(), "{}", i.addr);
            assert!(!i.id.is_empty() && i.weight_passing <= 65535 && i.weight_warning <= 65535);
        }
        for n in &p.named {
            assert!(n.port != 0 && crate::discovery::is_host_name(&n.host), "{}:{}", n.host, n.port);
        }
        // Written back as Consul's answer: the same instances.
        let entries: Vec<serde_json::Value> = p
            .instances
            .iter()
            .map(|i| (i.node.clone(), i.id.clone(), i.addr.ip().to_string(), i.addr.port(), i.status, i.weight_passing, i.weight_warning, &i.tags, &i.meta))
            .chain(p.named.iter().map(|n| (n.node.clone(), n.id.clone(), n.host.clone(), n.port, n.status, n.weight_passing, n.weight_warning, &n.tags, &n.meta)))
            .map(|(node, id, address, port, status, wp, ww, tags, meta)| {
                use crate::discovery::consul::health::Status;
                let check = match status {
                    Status::Maintenance => serde_json::json!({"CheckID": "_node_maintenance", "Status": "critical"}),
                    s => serde_json::json!({"CheckID": "c", "Status": serde_json::to_value(s).unwrap()}),
                };
                serde_json::json!({
                    "Node": {"Node": node},
                    "Service": {"ID": id, "Address": address, "Port": port, "Tags": tags, "Meta": meta,
                                "Weights": {"Passing": wp, "Warning": ww}},
                    "Checks": [check],
                })
            })
            .collect();
        let back = parse_health(&serde_json::to_vec(&entries).unwrap()).expect("our own answer parses");
        assert_eq!(back.instances, p.instances, "instances round trip");
        assert_eq!(back.named, p.named, "named instances round trip");
        assert!(back.skipped.is_empty(), "{:?}", back.skipped);
    }
    if let Ok(services) = parse_services(data) {
        for tags in services.values() {
            assert!(tags.windows(2).all(|w| w[0] < w[1]), "tags sorted and unique");
        }
        let back = parse_services(&serde_json::to_vec(&services).unwrap()).expect("our own answer parses");
        assert_eq!(back, services);
    }
    // The KV prefix: the input's first line when it has more than one.
    let (prefix, body) = match data.iter().position(|&b| b == b'\n').map(|i| (std::str::from_utf8(&data[..i]), &data[i + 1..])) {
        Some((Ok(prefix), body)) => (prefix, body),
        _ => ("switchyard/", data),
    };
    if let Ok(kv) = parse_entries(body, prefix) {
        let items: Vec<serde_json::Value> = kv
            .iter()
            .map(|(k, (v, index))| {
                assert!(!k.is_empty() && !k.ends_with('/'), "a folder or the prefix itself: {k:?}");
                serde_json::json!({"Key": format!("{prefix}{k}"), "Value": base64::engine::general_purpose::STANDARD.encode(v), "ModifyIndex": index})
            })
            .collect();
        let back = parse_entries(&serde_json::to_vec(&items).unwrap(), prefix).expect("our own answer parses");
        assert_eq!(back, kv, "KV round trip");
    }
}

// ---------------------------------------------------------------------------
// 7. Catalog files

/// The file catalog parser. A catalog it accepts has named services, unique
/// unicast instances with ports and bounded weights, and written back as a
/// catalog file it parses to the same.
pub fn catalog(data: &[u8]) {
    use crate::discovery::file::{parse_catalog, MAX_WEIGHT};
    let Ok(c) = parse_catalog(data) else { return };
    let mut doc = BTreeMap::<String, Vec<serde_json::Value>>::new();
    for (service, eps) in &c.services {
        assert!(!service.is_empty());
        assert!(eps.windows(2).all(|w| w[0].addr < w[1].addr), "instances sorted and unique");
        for e in eps.iter() {
            assert!(e.addr.port() != 0 && !e.addr.ip().is_unspecified() && !e.addr.ip().is_multicast(), "{}", e.addr);
            assert!(e.weight <= MAX_WEIGHT);
            doc.entry(service.clone()).or_default().push(
                serde_json::json!({"address": e.addr.ip().to_string(), "port": e.addr.port(), "weight": e.weight, "tags": e.tags, "meta": e.meta}),
            );
        }
        doc.entry(service.clone()).or_default();
    }
    for (service, named) in &c.named {
        assert!(c.services.contains_key(service), "named instances of a service not listed");
        for n in named {
            assert!(n.port != 0 && crate::discovery::is_host_name(&n.host) && n.weight <= MAX_WEIGHT);
            doc.entry(service.clone()).or_default().push(
                serde_json::json!({"address": n.host, "port": n.port, "weight": n.weight, "tags": n.tags, "meta": n.meta}),
            );
        }
    }
    let back = parse_catalog(&serde_json::to_vec(&doc).unwrap()).unwrap_or_else(|e| panic!("our own catalog: {e}"));
    assert_eq!(back, c, "catalog round trip");
}

// ---------------------------------------------------------------------------
// 8. Consul tags

/// The tag grammar. Input: the service name, then one tag per line. The
/// result does not depend on the order of tags, on duplicates or on tags
/// outside `switchyard.`; a route it yields is named for the service, has a
/// prefix starting with `/` and host patterns that parse back to themselves.
pub fn tags(data: &[u8]) {
    use crate::discovery::consul::tags::{auto_name, parse};
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let service = lines.next().unwrap_or("");
    let tags: Vec<String> = lines.map(str::to_string).collect();
    let result = parse(service, &tags);
    let shown = |r: &Result<Option<(RouteSpec, crate::config::ClusterSpec)>, String>| format!("{:?}", r.as_ref().map_err(|_| ()));
    let mut shuffled: Vec<String> = tags.iter().rev().cloned().collect();
    shuffled.extend(tags.iter().take(2).cloned());
    shuffled.push("not-ours".into());
    shuffled.push("switchyard".into());
    assert_eq!(shown(&parse(service, &shuffled)), shown(&result), "order, duplicates or other tags changed the result");
    let opted = tags.iter().any(|t| t.starts_with("switchyard.host=") || t.starts_with("switchyard.path="));
    match result {
        Ok(None) => assert!(!opted, "a service with host or path tags not routed"),
        Ok(Some((route, cluster))) => {
            assert!(opted);
            assert_eq!((route.name.as_str(), route.cluster.as_str(), cluster.name.as_str()), (&*auto_name(service), &*auto_name(service), &*auto_name(service)));
            assert!(route.path_prefix.starts_with('/'));
            for h in &route.hosts {
                let text = h.to_string();
                assert_eq!(crate::config::validate::host_pattern(&text).as_ref(), Some(h), "{text}");
            }
            assert!(cluster.retries <= 10);
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

// ---------------------------------------------------------------------------
// 9. Route matching

/// A host a route names, or a request's host, chosen by a byte.
fn pick_host(b: u8, extra: &str) -> String {
    const HOSTS: &[&str] = &["example.com", "www.example.com", "a.b.example.com", "api.test", "API.Test", "x", "localhost"];
    match b % 10 {
        n if (n as usize) < HOSTS.len() => HOSTS[n as usize].to_string(),
        7 => extra.to_string(),
        8 => format!("{}:8080", HOSTS[(b as usize / 10) % HOSTS.len()]),
        _ => format!("{}.", HOSTS[(b as usize / 10) % HOSTS.len()]),
    }
}

/// The route matcher. Input: lines; `R hosts prefix` adds a route (hosts
/// comma-separated, `*` for any), any other line is a request `host path`.
/// The route found must have a host predicate and a path prefix that hold
/// for the request, and must be the one the documented precedence picks,
/// as computed here by brute force; no route is found only when none fits.
pub fn matcher(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut routes: Vec<RouteSpec> = Vec::new();
    let mut requests: Vec<(Option<String>, String, bool)> = Vec::new();
    for line in text.lines().take(64) {
        let mut words = line.split(' ');
        if line.starts_with("R ") {
            words.next();
            let hosts = words.next().unwrap_or("*");
            let prefix = words.next().unwrap_or("/");
            if !prefix.starts_with('/') {
                continue;
            }
            let hosts: Vec<HostPattern> = hosts.split(',').filter(|h| *h != "*").filter_map(crate::config::validate::host_pattern).collect();
            routes.push(RouteSpec {
                name: format!("r{}", routes.len()),
                hosts,
                path_prefix: prefix.to_string(),
                cluster: String::new(),
                maintenance: None,
                https_redirect: None,
            });
        } else {
            let host = words.next().filter(|h| *h != "-").map(str::to_string);
            let path = words.next().unwrap_or("/").to_string();
            let absolute = words.next() == Some("abs");
            requests.push((host, path, absolute));
        }
    }
    // Byte-chosen requests as well, so short inputs still exercise hosts.
    for (i, &b) in data.iter().take(8).enumerate() {
        let extra = routes.get(i).and_then(|r| r.hosts.first()).map(|h| h.to_string().replace('*', "z")).unwrap_or_default();
        let path = routes.get(b as usize % (routes.len() + 1)).map(|r| format!("{}{}", r.path_prefix, ["", "/x", "x", "/"][i % 4])).unwrap_or("/".into());
        requests.push((Some(pick_host(b, &extra)), path, b & 0x80 != 0));
    }
    let router = Router::new(&routes);
    for (host, path, absolute) in &requests {
        let found = router.find(host.as_deref().map(str::as_bytes), path, *absolute);
        let expected = reference_match(&routes, host.as_deref(), path, *absolute);
        assert_eq!(found, expected, "host {host:?} path {path:?} absolute {absolute}; routes {routes:?}");
        if let Some(i) = found {
            assert!(prefix_matches(&routes[i].path_prefix, path));
            assert!(path.starts_with(routes[i].path_prefix.trim_end_matches('/')));
        }
    }
}

/// The request's host as routes compare it: without a port or a final dot,
/// lower case; None for anything that is not a DNS name or IP literal.
fn reference_host(raw: &str) -> Option<String> {
    let host = if raw.starts_with('[') {
        &raw[..=raw.find(']')?]
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let ok = !host.is_empty() && host.len() <= 256 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    ok.then(|| host.to_ascii_lowercase())
}

/// The documented precedence, by brute force: exact-host routes, then
/// wildcard routes by longest suffix, then any-host routes (not for
/// absolute-form targets); within the first class with a match, the longest
/// prefix, and the first route among equals.
fn reference_match(routes: &[RouteSpec], host: Option<&str>, path: &str, absolute: bool) -> Option<usize> {
    let best = |candidates: &mut dyn Iterator<Item = usize>| {
        candidates
            .filter(|&i| prefix_matches(&routes[i].path_prefix, path))
            .min_by_key(|&i| (std::cmp::Reverse(routes[i].path_prefix.len()), i))
    };
    if let Some(host) = host.and_then(reference_host) {
        let exact = |i: &usize| routes[*i].hosts.iter().any(|h| matches!(h, HostPattern::Exact(e) if *e == host));
        if let Some(i) = best(&mut (0..routes.len()).filter(exact)) {
            return Some(i);
        }
        let mut suffixes: Vec<&str> = routes
            .iter()
            .flat_map(|r| r.hosts.iter())
            .filter_map(|h| match h {
                HostPattern::Suffix(s) if host.len() > s.len() && host.ends_with(s.as_str()) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        suffixes.sort_by_key(|s| std::cmp::Reverse(s.len()));
        suffixes.dedup();
        for s in suffixes {
            let has = |i: &usize| routes[*i].hosts.iter().any(|h| matches!(h, HostPattern::Suffix(x) if x == s));
            if let Some(i) = best(&mut (0..routes.len()).filter(has)) {
                return Some(i);
            }
        }
    }
    if absolute {
        return None;
    }
    best(&mut (0..routes.len()).filter(|&i| routes[i].hosts.is_empty()))
}
