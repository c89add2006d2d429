//! Discovery: where backends come from.
//!
//! Every source publishes a *whole* set for what it watches, never a delta,
//! so a reconnect, a reset or a restart is just another full set. Sets are
//! normalised (sorted by address, unique) so two sets compare equal exactly
//! when they would route the same way.

pub mod consul;
pub mod dns;
pub mod file;

use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// One backend instance as discovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Relative share of traffic; 0 keeps the backend known but sends it nothing new.
    pub weight: u32,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// The Consul service ID, for per-instance overrides.
    pub id: Option<String>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            weight: 1,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            id: None,
        }
    }
}

/// An instance whose address is a host name (from a catalog file or from
/// Consul), resolved by reconcile through a DNS source: each address the
/// name has becomes a backend with the instance's weight, tags, meta and ID.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedInstance {
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// The Consul service ID; None for catalog files.
    pub id: Option<String>,
}

/// Whether `host` is a DNS host name we resolve: dot-separated labels of
/// letters, digits, `-` and `_` (1–63 bytes each, 253 in all), an optional
/// final dot, and not an IP address or something that only looks numeric.
pub fn is_host_name(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() || host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return false;
    }
    let body = host.strip_suffix('.').unwrap_or(host);
    !body.is_empty()
        && body.len() <= 253
        && body.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// Apply a cluster's per-instance overrides (by Consul service ID, or by
/// `ip:port`; the ID wins when both name one instance). An override for an
/// instance that is not in the set does nothing.
pub fn apply_overrides(set: EndpointSet, overrides: &BTreeMap<String, crate::config::InstanceOverride>) -> EndpointSet {
    if overrides.is_empty() {
        return set;
    }
    let mut changed = false;
    let out: Vec<Endpoint> = set
        .iter()
        .map(|e| {
            let o = e.id.as_deref().and_then(|id| overrides.get(id)).or_else(|| overrides.get(&e.addr.to_string()));
            match o {
                Some(o) => {
                    let weight = if o.drain { 0 } else { o.weight.unwrap_or(e.weight) };
                    changed |= weight != e.weight;
                    Endpoint { weight, ..e.clone() }
                }
                None => e.clone(),
            }
        })
        .collect();
    if changed {
        Arc::new(out)
    } else {
        set
    }
}

/// A normalised backend set: sorted by address, one entry per address.
pub type EndpointSet = Arc<Vec<Endpoint>>;

/// Sort by address. Callers reject duplicates before this.
pub fn normalise(mut v: Vec<Endpoint>) -> EndpointSet {
    v.sort_by(|a, b| a.addr.cmp(&b.addr));
    Arc::new(v)
}

/// What reconcile knows per cluster: absent means "no result yet".
pub type Discovered = BTreeMap<String, EndpointSet>;
