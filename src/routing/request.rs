//! What routing, backend selection, forwarding and logging read from a
//! request, whichever parser produced it: Pingora's `RequestHeader` (the
//! general path) or the raw head the express path parses in place.

use pingora::http::RequestHeader;

pub trait RequestView {
    /// The method as sent (`GET`, ...).
    fn method(&self) -> &str;
    /// The target's path, without the query.
    fn path(&self) -> &str;
    /// The target's path and query, as sent (origin-form).
    fn path_and_query(&self) -> &str;
    /// The head's header fields: (count, bytes of names and values).
    fn header_size(&self) -> (usize, usize);
    /// The host the request is for: the HTTP/2 authority, else `Host`.
    fn host(&self) -> Option<&[u8]>;
    /// The first value of a header (`name` in lower case).
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// Every value of a header, in order (`name` in lower case).
    fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl RequestView for RequestHeader {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
    }
    fn header_size(&self) -> (usize, usize) {
        let bytes = self.headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        (self.headers.len(), bytes)
    }
    fn host(&self) -> Option<&[u8]> {
        if let Some(a) = self.uri.authority() {
            return Some(a.as_str().as_bytes());
        }
        self.headers.get(http::header::HOST).map(|v| v.as_bytes())
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name).map(|v| v.as_bytes())
    }
    fn header_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.get_all(name).into_iter().map(|v| v.as_bytes())
    }
}
