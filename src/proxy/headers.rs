//! Request headers the backends rely on: `X-Forwarded-For`,
//! `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Request-Id` and optionally
//! `Forwarded` — so a Django app behind the proxy sees the real client and
//! scheme, and a client cannot pose as another — and origin-form targets.

use crate::config::ForwardingSettings;
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
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

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
    /// The header is dropped, not replaced.
    Remove,
}

impl FwdValue<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            FwdValue::Raw(b) => b,
            FwdValue::Value(v) => v.as_bytes(),
            FwdValue::Owned(v) => v.as_bytes(),
            FwdValue::Remove => b"",
        }
    }

    pub fn into_value(self) -> Option<HeaderValue> {
        match self {
            FwdValue::Raw(b) => HeaderValue::from_bytes(b).ok(),
            FwdValue::Value(v) => Some(v.clone()),
            FwdValue::Owned(v) => Some(v),
            FwdValue::Remove => None,
        }
    }
}

/// Visible ASCII, spaces and tabs (what `HeaderValue::to_str` accepts).
fn is_text(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
}

/// The forwarding headers for the request going upstream, in order:
/// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`,
/// `X-Request-Id` and `Forwarded`. Each replaces any the client sent.
///
/// From a peer in `policy.trusted_proxies` (a proxy in front of this one)
/// the client's `X-Forwarded-For` list is extended with the peer, and its
/// `X-Forwarded-Proto` (`http` or `https`), `X-Forwarded-Host` and
/// `Forwarded` are kept (the last extended). From anyone else they are
/// replaced: `X-Forwarded-For` is the peer alone, `-Proto` is this
/// connection's scheme (`tls`), `-Host` the request's `Host`, and a
/// client's `Forwarded` is removed ([`FwdValue::Remove`]) unless
/// `policy.forwarded` sends this hop's own.
pub fn forwarding<'a, R: RequestView + ?Sized>(
    req: &'a R,
    client: Option<&'a ClientAddr>,
    request_id: &'a HeaderValue,
    tls: bool,
    policy: &ForwardingSettings,
) -> impl Iterator<Item = (HeaderName, FwdValue<'a>)> {
    let trusted = client.is_some_and(|c| policy.trusts(c.ip));
    let xff = client.and_then(|c| {
        let list = if trusted { joined(req.header_all("x-forwarded-for")) } else { Vec::new() };
        if list.is_empty() {
            return Some(FwdValue::Value(&c.text));
        }
        let mut list = list;
        list.extend_from_slice(b", ");
        list.extend_from_slice(c.text.as_bytes());
        HeaderValue::from_bytes(&list).ok().map(FwdValue::Owned)
    });
    let scheme: &'static [u8] = if tls { b"https" } else { b"http" };
    let proto = trusted
        .then(|| single(req, "x-forwarded-proto"))
        .flatten()
        .and_then(|v| {
            if v.eq_ignore_ascii_case(b"https") {
                Some(&b"https"[..])
            } else if v.eq_ignore_ascii_case(b"http") {
                Some(&b"http"[..])
            } else {
                None
            }
        })
        .unwrap_or(scheme);
    let host = trusted
        .then(|| single(req, "x-forwarded-host"))
        .flatten()
        .filter(|v| is_host(v))
        .or_else(|| req.host());
    let fwd = if policy.forwarded {
        let earlier = if trusted { joined(req.header_all("forwarded")) } else { Vec::new() };
        rfc7239(earlier, client, scheme, req.host()).map(FwdValue::Owned)
    } else if !trusted && req.header("forwarded").is_some() {
        Some(FwdValue::Remove)
    } else {
        None
    };
    [
        xff.map(|v| (X_FORWARDED_FOR, v)),
        Some((X_FORWARDED_PROTO, FwdValue::Raw(proto))),
        host.map(|h| (X_FORWARDED_HOST, FwdValue::Raw(h))),
        Some((X_REQUEST_ID, FwdValue::Value(request_id))),
        fwd.map(|v| (FORWARDED, v)),
    ]
    .into_iter()
    .flatten()
}

/// Every value of a list header, trimmed and joined with `, ` (values that
/// are not text are left out).
fn joined<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut list = Vec::new();
    for v in values {
        let v = v.trim_ascii();
        if !v.is_empty() && is_text(v) {
            if !list.is_empty() {
                list.extend_from_slice(b", ");
            }
            list.extend_from_slice(v);
        }
    }
    list
}

/// The header's value when the request has exactly one, trimmed.
fn single<'a, R: RequestView + ?Sized>(req: &'a R, name: &'a str) -> Option<&'a [u8]> {
    let mut all = req.header_all(name);
    let first = all.next()?;
    all.next().is_none().then(|| first.trim_ascii())
}

/// A host name or address with an optional port: what `Host` may hold.
pub(crate) fn is_host(v: &[u8]) -> bool {
    v.len() <= 255 && host_chars(v)
}

/// Not empty, and only the bytes a host (a name, an IPv4 or bracketed IPv6
/// address, an optional port) is written with: letters, digits, `.-_:[]`.
pub(crate) fn host_chars(v: &[u8]) -> bool {
    !v.is_empty() && v.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'))
}

/// The `Forwarded` value (RFC 7239): the earlier hops' elements, then this
/// hop's `for` (IPv6 quoted in brackets), `proto` and `host` (quoted).
fn rfc7239(mut out: Vec<u8>, client: Option<&ClientAddr>, scheme: &[u8], host: Option<&[u8]>) -> Option<HeaderValue> {
    if !out.is_empty() {
        out.extend_from_slice(b", ");
    }
    match client.map(|c| c.ip) {
        Some(IpAddr::V4(ip)) => out.extend_from_slice(format!("for={ip};").as_bytes()),
        Some(IpAddr::V6(ip)) => out.extend_from_slice(format!("for=\"[{ip}]\";").as_bytes()),
        None => out.extend_from_slice(b"for=unknown;"),
    }
    out.extend_from_slice(b"proto=");
    out.extend_from_slice(scheme);
    if let Some(h) = host.filter(|h| is_host(h)) {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(h);
        out.push(b'"');
    }
    HeaderValue::from_bytes(&out).ok()
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
    policy: &ForwardingSettings,
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
    for (name, value) in forwarding(req, client, request_id, tls, policy) {
        match value.into_value() {
            Some(value) => {
                up.insert_header(name, value)?;
            }
            None => {
                up.remove_header(&name);
            }
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

    fn fwd(req: &RequestHeader, client: &str, tls: bool, policy: &ForwardingSettings) -> Vec<(String, Option<String>)> {
        let c = ClientAddr::new(client.parse().unwrap());
        let rid = HeaderValue::from_static("rid");
        forwarding(req, Some(&c), &rid, tls, policy)
            .map(|(n, v)| (n.to_string(), v.into_value().map(|v| v.to_str().unwrap().to_string())))
            .collect()
    }

    fn get<'a>(h: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
        h.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.as_deref())
    }

    fn spoofing_request() -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("host", "www.example.com").unwrap();
        req.append_header("x-forwarded-for", "203.0.113.7").unwrap();
        req.append_header("x-forwarded-for", "198.51.100.1, 198.51.100.2").unwrap();
        req.insert_header("x-forwarded-proto", "https").unwrap();
        req.insert_header("x-forwarded-host", "evil.example").unwrap();
        req.insert_header("forwarded", "for=203.0.113.7").unwrap();
        req
    }

    #[test]
    fn untrusted_peer_forwarding_headers_are_replaced() {
        let req = spoofing_request();
        let h = fwd(&req, "192.0.2.9", false, &ForwardingSettings::default());
        assert_eq!(get(&h, "x-forwarded-for"), Some("192.0.2.9"));
        assert_eq!(get(&h, "x-forwarded-proto"), Some("http"));
        assert_eq!(get(&h, "x-forwarded-host"), Some("www.example.com"));
        // The client's Forwarded is removed, not passed on.
        assert!(h.iter().any(|(n, v)| n == "forwarded" && v.is_none()), "{h:?}");
        let h = fwd(&req, "192.0.2.9", true, &ForwardingSettings::default());
        assert_eq!(get(&h, "x-forwarded-proto"), Some("https"));
    }

    #[test]
    fn trusted_peer_forwarding_headers_are_extended() {
        let req = spoofing_request();
        let policy = ForwardingSettings { trusted_proxies: vec!["192.0.2.0/24".parse().unwrap()], forwarded: false };
        let h = fwd(&req, "192.0.2.9", false, &policy);
        assert_eq!(get(&h, "x-forwarded-for"), Some("203.0.113.7, 198.51.100.1, 198.51.100.2, 192.0.2.9"));
        assert_eq!(get(&h, "x-forwarded-proto"), Some("https"), "the front proxy terminated TLS");
        assert_eq!(get(&h, "x-forwarded-host"), Some("evil.example"));
        assert!(!h.iter().any(|(n, _)| n == "forwarded"), "kept as sent: {h:?}");
        // Not in the list: replaced; an IPv4-mapped peer counts as IPv4.
        assert_eq!(get(&fwd(&req, "192.0.3.1", false, &policy), "x-forwarded-for"), Some("192.0.3.1"));
        assert_eq!(get(&fwd(&req, "::ffff:192.0.2.9", false, &policy), "x-forwarded-for").map(|v| v.ends_with("::ffff:192.0.2.9")), Some(true));
        // A junk proto from a trusted peer is not believed.
        let mut junk = spoofing_request();
        junk.insert_header("x-forwarded-proto", "gopher").unwrap();
        assert_eq!(get(&fwd(&junk, "192.0.2.9", false, &policy), "x-forwarded-proto"), Some("http"));
    }

    #[test]
    fn rfc7239_forwarded() {
        let req = spoofing_request();
        let on = ForwardingSettings { trusted_proxies: Vec::new(), forwarded: true };
        assert_eq!(get(&fwd(&req, "192.0.2.9", true, &on), "forwarded"), Some("for=192.0.2.9;proto=https;host=\"www.example.com\""));
        assert_eq!(get(&fwd(&req, "2001:db8::1", false, &on), "forwarded"), Some("for=\"[2001:db8::1]\";proto=http;host=\"www.example.com\""));
        let trusted = ForwardingSettings { trusted_proxies: vec!["2001:db8::/32".parse().unwrap()], forwarded: true };
        assert_eq!(
            get(&fwd(&req, "2001:db8::1", false, &trusted), "forwarded"),
            Some("for=203.0.113.7, for=\"[2001:db8::1]\";proto=http;host=\"www.example.com\"")
        );
    }
}
