//! Route matching: Host, then path prefix.
//!
//! Precedence (documented in the README):
//! 1. routes naming the exact host, then routes with a wildcard host
//!    (`*.example.com`, longest suffix first), then routes for any host;
//! 2. within the first of those classes that has a route whose prefix matches,
//!    the longest matching path prefix wins.
//!
//! Prefixes match on segment boundaries: `/api` matches `/api` and `/api/x`
//! but not `/apix`; a prefix ending in `/` matches anything below it.
//!
//! Absolute-form requests (`GET http://other.example/ HTTP/1.1`) only match
//! routes that name their host: a route for "any host" never catches them, so
//! the proxy can't be used as an open forward proxy.

use crate::config::{HostPattern, RouteSpec};
use std::collections::HashMap;

#[derive(Debug, Default)]
struct PathTable {
    /// (prefix, route index), longest prefix first.
    entries: Vec<(String, usize)>,
}

impl PathTable {
    fn add(&mut self, prefix: &str, route: usize) {
        self.entries.push((prefix.to_string(), route));
        self.entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
    }

    fn find(&self, path: &str) -> Option<usize> {
        self.entries
            .iter()
            .find(|(p, _)| prefix_matches(p, path))
            .map(|(_, r)| *r)
    }
}

/// Segment-aware prefix match.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" || prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<String, PathTable>,
    /// (suffix such as ".example.com", table), longest suffix first.
    suffix: Vec<(String, PathTable)>,
    any: PathTable,
}

impl Router {
    pub fn new(routes: &[RouteSpec]) -> Self {
        let mut r = Router::default();
        for (i, route) in routes.iter().enumerate() {
            if route.hosts.is_empty() {
                r.any.add(&route.path_prefix, i);
            }
            for h in &route.hosts {
                match h {
                    HostPattern::Exact(h) => r.exact.entry(h.clone()).or_default().add(&route.path_prefix, i),
                    HostPattern::Suffix(s) => {
                        match r.suffix.iter_mut().find(|(x, _)| x == s) {
                            Some((_, t)) => t.add(&route.path_prefix, i),
                            None => {
                                let mut t = PathTable::default();
                                t.add(&route.path_prefix, i);
                                r.suffix.push((s.clone(), t));
                            }
                        }
                    }
                }
            }
        }
        r.suffix.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        r
    }

    /// Find the route for a request. `host` is the raw Host / authority value
    /// (port and case are handled here); `absolute` marks an absolute-form target.
    pub fn find(&self, host: Option<&[u8]>, path: &str, absolute: bool) -> Option<usize> {
        let mut buf = [0u8; 256];
        let host = host.and_then(|h| normalise_host(h, &mut buf));
        if let Some(host) = host {
            if let Some(r) = self.exact.get(host).and_then(|t| t.find(path)) {
                return Some(r);
            }
            for (suffix, t) in &self.suffix {
                if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                    if let Some(r) = t.find(path) {
                        return Some(r);
                    }
                }
            }
        }
        if absolute {
            return None;
        }
        self.any.find(path)
    }
}

/// Strip the port and a trailing dot, and lower-case into `buf` (no allocation).
/// Returns None for hosts that are not plain DNS names or IP literals.
fn normalise_host<'a>(raw: &[u8], buf: &'a mut [u8; 256]) -> Option<&'a str> {
    let host = if raw.first() == Some(&b'[') {
        // IPv6 literal: keep up to the closing bracket.
        let end = raw.iter().position(|&b| b == b']')?;
        &raw[..=end]
    } else {
        match raw.iter().rposition(|&b| b == b':') {
            Some(i) => &raw[..i],
            None => raw,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > buf.len() {
        return None;
    }
    for (i, &b) in host.iter().enumerate() {
        if !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')) {
            return None;
        }
        buf[i] = b.to_ascii_lowercase();
    }
    std::str::from_utf8(&buf[..host.len()]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::host_pattern;

    fn route(hosts: &[&str], prefix: &str) -> RouteSpec {
        RouteSpec {
            name: String::new(),
            hosts: hosts.iter().map(|h| host_pattern(h).unwrap()).collect(),
            path_prefix: prefix.into(),
            cluster: String::new(),
            maintenance: None,
            https_redirect: None,
        }
    }

    #[test]
    fn precedence() {
        let routes = vec![
            route(&[], "/"),                        // 0
            route(&[], "/api"),                     // 1
            route(&["www.example.com"], "/"),       // 2
            route(&["www.example.com"], "/static/"), // 3
            route(&["*.example.com"], "/"),         // 4
            route(&["*.eu.example.com"], "/"),      // 5
            route(&["only.example.org"], "/admin"), // 6
        ];
        let r = Router::new(&routes);
        let f = |h: &str, p: &str| r.find(Some(h.as_bytes()), p, false);
        assert_eq!(f("www.example.com", "/x"), Some(2));
        assert_eq!(f("WWW.Example.COM:8080", "/static/a.css"), Some(3));
        assert_eq!(f("www.example.com.", "/static"), Some(2)); // "/static/" needs the slash
        assert_eq!(f("a.example.com", "/"), Some(4));
        assert_eq!(f("a.eu.example.com", "/"), Some(5));
        assert_eq!(f("example.com", "/"), Some(0)); // "*.example.com" needs a subdomain
        assert_eq!(f("other", "/api/v1"), Some(1));
        assert_eq!(f("other", "/apix"), Some(0));
        // A host route whose paths don't match falls through to less specific classes.
        assert_eq!(f("only.example.org", "/"), Some(0));
        assert_eq!(f("only.example.org", "/admin/x"), Some(6));
        assert_eq!(r.find(None, "/api", false), Some(1));
    }

    #[test]
    fn absolute_form_only_matches_named_hosts() {
        let r = Router::new(&[route(&[], "/"), route(&["www.example.com"], "/")]);
        assert_eq!(r.find(Some(b"evil.test"), "/", true), None);
        assert_eq!(r.find(Some(b"www.example.com"), "/", true), Some(1));
    }

    #[test]
    fn garbage_hosts_do_not_match_named_routes() {
        let r = Router::new(&[route(&["a.b"], "/")]);
        assert_eq!(r.find(Some(b"a.b\xff"), "/", false), None);
        assert_eq!(r.find(Some(&[b'a'; 300]), "/", false), None);
        assert_eq!(r.find(Some(b""), "/", false), None);
        assert_eq!(r.find(Some(b"[::1]:80"), "/", false), None);
    }
}
