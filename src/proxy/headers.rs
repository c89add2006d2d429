//! Request headers the backends rely on: `X-Forwarded-For` (appended),
//! `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Request-Id` — so a Django app
//! behind the proxy sees the real client and scheme — and origin-form targets.

use crate::routing::RequestView;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use http::{HeaderName, HeaderValue};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether an HTTP/1.x request used an absolute-form target
/// (`GET http://host/path`). Pingora keeps only the path in `uri` and has
/// already checked that `Host` agrees with the target's authority.
pub fn is_absolute_form(req: &RequestHeader) -> bool {
    let raw = req.raw_path();
    !raw.is_empty() && raw[0] != b'/' && raw != b"*"
}

/// Generates request ids: a random per-process prefix and a counter, so ids
/// are unique across restarts and instances without a random draw per request.
pub struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        RequestIds {
            prefix: rand::random(),
            counter: AtomicU64::new(0),
        }
    }

    /// Keep a sane incoming `X-Request-Id`, else make one. A `HeaderValue`
    /// is shared (not copied) by the upstream request, the response and the log.
    pub fn for_request<R: RequestView + ?Sized>(&self, req: &R) -> HeaderValue {
        if let Some(v) = req.header("x-request-id") {
            if is_sane_id(v) {
                return HeaderValue::from_bytes(v).expect("a sane id is a valid header value");
            }
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        hex16(self.prefix, &mut buf[..16]);
        hex16(n, &mut buf[16..]);
        HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
    }
}

fn hex16(v: u64, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().enumerate().take(16) {
        *o = HEX[((v >> ((15 - i) * 4)) & 0xf) as usize];
    }
}

/// 1–128 characters from `[A-Za-z0-9._:-]`.
pub fn is_sane_id(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 128
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A client's address as `X-Forwarded-For` carries it, formatted once (per
/// connection on the express path).
#[derive(Clone, Debug)]
pub struct ClientAddr {
    pub ip: IpAddr,
    text: HeaderValue,
}

impl ClientAddr {
    pub fn new(ip: IpAddr) -> Self {
        let text = HeaderValue::try_from(ip.to_string()).expect("an IP address is a valid header value");
        ClientAddr { ip, text }
    }

    /// The client of a connection, from its peer address (None for a Unix socket).
    pub fn of_peer(peer: Option<&pingora::protocols::l4::socket::SocketAddr>) -> Option<Self> {
        peer.and_then(|a| a.as_inet()).map(|a| ClientAddr::new(a.ip()))
    }
}

/// A forwarding header's value: borrowed from the request or the
/// connection where it can be, made only for a client-sent list.
pub enum FwdValue<'a> {
    Raw(&'a [u8]),
    Value(&'a HeaderValue),
    Owned(HeaderValue),
}

impl FwdValue<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            FwdValue::Raw(b) => b,
            FwdValue::Value(v) => v.as_bytes(),
            FwdValue::Owned(v) => v.as_bytes(),
        }
    }

    pub fn into_value(self) -> Option<HeaderValue> {
        match self {
            FwdValue::Raw(b) => HeaderValue::from_bytes(b).ok(),
            FwdValue::Value(v) => Some(v.clone()),
            FwdValue::Owned(v) => Some(v),
        }
    }
}

/// Visible ASCII, spaces and tabs (what `HeaderValue::to_str` accepts).
fn is_text(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
}

/// The forwarding headers for the request going upstream, in order:
/// `X-Forwarded-For` (the client's list with the client appended; none
/// without a client address), `X-Forwarded-Proto`, `X-Forwarded-Host` (if
/// the request named a host) and `X-Request-Id`. Each replaces any the
/// client sent.
/// `tls`: the client connection is TLS (`X-Forwarded-Proto: https`).
pub fn forwarding<'a, R: RequestView + ?Sized>(
    req: &'a R,
    client: Option<&'a ClientAddr>,
    request_id: &'a HeaderValue,
    tls: bool,
) -> impl Iterator<Item = (HeaderName, FwdValue<'a>)> {
    let xff = client.and_then(|c| {
        let mut list = Vec::new();
        for v in req.header_all("x-forwarded-for") {
            let v = v.trim_ascii();
            if !v.is_empty() && is_text(v) {
                list.extend_from_slice(v);
                list.extend_from_slice(b", ");
            }
        }
        if list.is_empty() {
            return Some(FwdValue::Value(&c.text));
        }
        list.extend_from_slice(c.text.as_bytes());
        HeaderValue::from_bytes(&list).ok().map(FwdValue::Owned)
    });
    [
        xff.map(|v| (X_FORWARDED_FOR, v)),
        Some((X_FORWARDED_PROTO, FwdValue::Raw(if tls { b"https" } else { b"http" }))),
        req.host().map(|h| (X_FORWARDED_HOST, FwdValue::Raw(h))),
        Some((X_REQUEST_ID, FwdValue::Value(request_id))),
    ]
    .into_iter()
    .flatten()
}

/// Set the forwarding headers on the request going upstream (Pingora's
/// path), and send an absolute-form target as origin-form.
pub fn forwarded(
    req: &RequestHeader,
    is_h2: bool,
    client: Option<&ClientAddr>,
    up: &mut RequestHeader,
    request_id: &HeaderValue,
    tls: bool,
) -> Result<()> {
    // Absolute-form (HTTP/1.x only): send origin-form upstream.
    if !is_h2 && is_absolute_form(req) {
        let pq = up
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string());
        let uri: http::Uri = pq
            .parse()
            .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "bad request target"))?;
        up.set_uri(uri);
    }
    for (name, value) in forwarding(req, client, request_id, tls) {
        if let Some(value) = value.into_value() {
            up.insert_header(name, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        let ids = RequestIds::new();
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        let a = ids.for_request(&req);
        let b = ids.for_request(&req);
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.to_str().unwrap().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(&a.as_bytes()[..16], &b.as_bytes()[..16], "same process prefix");
        req.insert_header("x-request-id", "abc-123").unwrap();
        assert_eq!(ids.for_request(&req), "abc-123");
        req.insert_header("x-request-id", "bad id with spaces").unwrap();
        assert_ne!(ids.for_request(&req), "bad id with spaces");
        assert!(!is_sane_id(&[b'a'; 129]));
    }
}
