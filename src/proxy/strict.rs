//! Request checks stricter than the parsers' own, on both request paths:
//! whatever two HTTP/1.1 parsers could read differently is refused with
//! `400` instead of being passed on (the corpus in `tests/hostile/` and
//! docs/hostile.md say what, and compare with nginx and HAProxy).
//!
//! Pingora's parser is lenient in places: it percent-encodes control bytes,
//! spaces and quotes in a request target and forwards the result (a NUL
//! becomes `%00`), lets `Transfer-Encoding` win over `Content-Length`
//! (dropping the latter), and passes `chunked, chunked`, duplicate lengths
//! and any `Host` value through. So:
//!
//! * [`bad_request_line`] looks at the request line in the bytes read
//!   ahead of a cleartext request (before Pingora sees them), where those
//!   bytes are still as the client sent them;
//! * [`refusal`] looks at a head Pingora parsed (`HttpProxy` path), with
//!   its raw bytes for what the parsed form hides (a `Content-Length` next
//!   to `Transfer-Encoding`, a tab before `chunked`);
//! * [`valid_host`] is shared with the express path, which takes only
//!   heads that need none of this and sends the rest to `HttpProxy`.
//!
//! Each is one pass over bytes already in hand; the field scans of raw
//! bytes happen only for requests with `Transfer-Encoding`.

use pingora::http::RequestHeader;

/// Why a request is refused, as the `reason` of
/// `switchyard_requests_rejected_total`.
pub const BAD_REQUEST_LINE: &str = "bad_request_line";
pub const BAD_FRAMING: &str = "bad_framing";
pub const BAD_HOST: &str = "bad_host";

/// Whether the first request line in `buf` (a connection's first bytes, a
/// head or part of one) is malformed in a way Pingora would paper over: a
/// control byte (NUL, tab, a bare CR, DEL), `"`, `<`, `>` or `#` (`http::Uri`
/// drops a fragment without a trace) anywhere in it,
/// or other than exactly two spaces. Empty lines before it are skipped (RFC
/// 9112 §2.2). An incomplete line is judged on what is there.
pub fn bad_request_line(buf: &[u8]) -> bool {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let rest = &buf[start..];
    let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (rest[..i].strip_suffix(b"\r").unwrap_or(&rest[..i]), true),
        None => (rest, false),
    };
    let mut spaces = 0;
    for &b in line {
        match b {
            b' ' => spaces += 1,
            0..=0x1f | 0x7f | b'"' | b'<' | b'>' | b'#' => return true,
            _ => {}
        }
    }
    spaces > 2 || (complete && spaces != 2)
}

/// A `Host` value this proxy passes on: a name, IPv4 or bracketed IPv6
/// address and an optional port, in letters, digits and `-._:[]`. No
/// spaces, lists, paths, userinfo or percent-encoding.
pub fn valid_host(v: &[u8]) -> bool {
    super::headers::host_chars(v)
}

/// Why a head Pingora parsed is refused (a `reason`), or None. `raw`: the
/// head's bytes as read. HTTP/1 only.
///
/// * a method with lower-case letters;
/// * HTTP/1.1 without `Host`; more than one, or an invalid one;
/// * more than one `Content-Length`, or one that is not all digits;
/// * `Transfer-Encoding` other than exactly one `chunked` (spaces around
///   it allowed, no tab), or with a `Content-Length` (RFC 9112 §6.3 lets a
///   server drop the length instead; refusing is stricter).
pub fn refusal(req: &RequestHeader, raw: impl FnOnce() -> bytes::Bytes) -> Option<&'static str> {
    use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
    if req.method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Some(BAD_REQUEST_LINE);
    }
    let mut hosts = req.headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version == http::Version::HTTP_11 => return Some(BAD_HOST),
        (Some(h), None) if !valid_host(h.as_bytes()) => return Some(BAD_HOST),
        (Some(_), Some(_)) => return Some(BAD_HOST),
        _ => {}
    }
    let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (Some(_), Some(_)) => return Some(BAD_FRAMING),
        (Some(l), None) if !digits(l.as_bytes().trim_ascii()) => return Some(BAD_FRAMING),
        _ => {}
    }
    if req.headers.contains_key(TRANSFER_ENCODING) {
        // Pingora has dropped a Content-Length next to it, and trimmed
        // the value: the raw head says what came.
        let raw = raw();
        let mut codings = 0;
        for line in raw.split(|&b| b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
            let (name, value) = (&line[..colon], &line[colon + 1..]);
            if name.eq_ignore_ascii_case(b"content-length") {
                return Some(BAD_FRAMING);
            }
            if name.eq_ignore_ascii_case(b"transfer-encoding") {
                codings += 1;
                if !trim_spaces(value).eq_ignore_ascii_case(b"chunked") {
                    return Some(BAD_FRAMING);
                }
            }
        }
        if codings != 1 {
            return Some(BAD_FRAMING);
        }
    }
    None
}

fn digits(v: &[u8]) -> bool {
    !v.is_empty() && v.iter().all(u8::is_ascii_digit)
}

/// `v` without the spaces (only spaces: not tabs) around it.
fn trim_spaces(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ').unwrap_or(v.len());
    let end = v.iter().rposition(|&b| b != b' ').map_or(start, |i| i + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        for ok in [&b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"[..], b"\r\nGET /a?b=%00 HTTP/1.1\r\n", b"GET /partial-targ", b"POST /x HTTP/1.1\n", b"", b"GET /caf\xc3\xa9 HTTP/1.1\r\n"] {
            assert!(!bad_request_line(ok), "{}", ok.escape_ascii());
        }
        for bad in [
            &b"GET /a\0b HTTP/1.1\r\n"[..],
            b"GET /a\x01",
            b"GET /a b HTTP/1.1\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET\t/ HTTP/1.1\r\n",
            b"GET /a\"<b> HTTP/1.1\r\n",
            b"GET /a#frag HTTP/1.1\r\n",
            b"GET /\r\n",
            b"GET / HTTP/1.1\rX\r\n",
            b"GET / HTTP/1.1 x",
        ] {
            assert!(bad_request_line(bad), "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn hosts() {
        for ok in ["h", "www.example.com:8080", "[::1]:80", "10.0.0.1", "a_b.internal"] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "a b", "a,b", "a/b", "user@a", "a%2fb", "a\tb"] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    fn head(raw: &str) -> Option<&'static str> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Request::new(&mut headers);
        r.parse(raw.as_bytes()).unwrap();
        let mut req = RequestHeader::build(r.method.unwrap(), r.path.unwrap().as_bytes(), None).unwrap();
        if r.version == Some(0) {
            req.set_version(http::Version::HTTP_10);
        }
        let mut te = false;
        for h in r.headers.iter() {
            // As Pingora does: Transfer-Encoding wins, Content-Length goes.
            te |= h.name.eq_ignore_ascii_case("transfer-encoding");
            req.append_header(h.name.to_string(), h.value).unwrap();
        }
        if te {
            req.remove_header("content-length");
        }
        refusal(&req, || bytes::Bytes::copy_from_slice(raw.as_bytes()))
    }

    #[test]
    fn parsed_heads() {
        for ok in [
            "GET / HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 005\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:  Chunked \r\n\r\n",
            "FOO /x HTTP/1.1\r\nHost: h:80\r\n\r\n",
        ] {
            assert_eq!(head(ok), None, "{ok:?}");
        }
        for (bad, reason) in [
            ("get / HTTP/1.1\r\nHost: h\r\n\r\n", BAD_REQUEST_LINE),
            ("GET / HTTP/1.1\r\n\r\n", BAD_HOST),
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", BAD_HOST),
            ("GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n", BAD_HOST),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\tchunked\r\n\r\n", BAD_FRAMING),
            ("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity\r\n\r\n", BAD_FRAMING),
        ] {
            assert_eq!(head(bad), Some(reason), "{bad:?}");
        }
    }
}
