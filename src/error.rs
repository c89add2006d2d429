//! Error vocabulary. Control-plane errors are `thiserror` enums; request-path
//! errors are Pingora errors, created in exactly one place ([`upstream_error`])
//! so the proxy's status-code mapping stays in one spot.

use pingora::{Error, ErrorType};
use std::fmt;

/// One configuration problem: where it is (a dotted field path) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a config file, section by section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Why a discovery source could not produce a set.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DiscoveryError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("invalid catalog {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The request-path failure kinds the proxy answers for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyFailure {
    /// No route matched the request: 404.
    NoRoute,
    /// The route's cluster has no backend to send to: 503 with `Retry-After`.
    NoBackends,
    /// Every attempt failed to reach or read a backend: 502.
    BadGateway,
    /// The backend did not answer within its timeout: 504.
    Timeout,
    /// The route is in maintenance: 503 with its own body and `Retry-After`.
    Maintenance,
    /// A cleartext request to an HTTPS-only route: this status (301, 302,
    /// 307 or 308) with `Location` to the same URL over HTTPS.
    Redirect(u16),
    /// A request that cannot be served as it is (a redirect without a
    /// usable `Host`): 400.
    BadRequest,
    /// A request two HTTP/1.1 parsers could read differently (ambiguous
    /// framing, a bad request line or `Host`): 400. See `proxy::strict`.
    Malformed,
    /// More header bytes or fields than `[limits]` allows: 431.
    HeadersTooLarge,
    /// A request target longer than `limits.max_uri_bytes`: 414.
    UriTooLong,
    /// A declared body longer than `limits.max_body_bytes`: 413.
    BodyTooLarge,
}

impl ProxyFailure {
    pub fn status(self) -> u16 {
        match self {
            ProxyFailure::NoRoute => 404,
            ProxyFailure::NoBackends => 503,
            ProxyFailure::BadGateway => 502,
            ProxyFailure::Timeout => 504,
            ProxyFailure::Maintenance => 503,
            ProxyFailure::Redirect(status) => status,
            ProxyFailure::BadRequest | ProxyFailure::Malformed => 400,
            ProxyFailure::HeadersTooLarge => 431,
            ProxyFailure::UriTooLong => 414,
            ProxyFailure::BodyTooLarge => 413,
        }
    }

    /// The short plain-text body sent with the status.
    pub fn body(self) -> &'static str {
        match self {
            ProxyFailure::NoRoute => "no route for this request\n",
            ProxyFailure::NoBackends => "no backend available for this service\n",
            ProxyFailure::BadGateway => "upstream failed\n",
            ProxyFailure::Timeout => "upstream timed out\n",
            ProxyFailure::Maintenance => crate::config::MAINTENANCE_BODY,
            ProxyFailure::Redirect(_) => "this site is served over HTTPS\n",
            ProxyFailure::BadRequest => "a request to an HTTPS-only route needs a valid Host header\n",
            ProxyFailure::Malformed => "malformed request\n",
            ProxyFailure::HeadersTooLarge => "request headers too large\n",
            ProxyFailure::UriTooLong => "request target too long\n",
            ProxyFailure::BodyTooLarge => "request body too large\n",
        }
    }

    /// Classify a Pingora error that ended a proxied request.
    pub fn classify(e: &Error) -> ProxyFailure {
        match e.etype() {
            ErrorType::HTTPStatus(503) => ProxyFailure::NoBackends,
            ErrorType::HTTPStatus(404) => ProxyFailure::NoRoute,
            ErrorType::HTTPStatus(413) => ProxyFailure::BodyTooLarge,
            ErrorType::HTTPStatus(504)
            | ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout => ProxyFailure::Timeout,
            _ => ProxyFailure::BadGateway,
        }
    }
}

/// The one constructor of request-path errors.
pub fn upstream_error(kind: ProxyFailure, context: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(kind.status()), context)
}
