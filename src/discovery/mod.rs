//! Discovery: where backends come from.
//!
//! Every source publishes a *whole* set for what it watches, never a delta,
//! so a reconnect, a reset or a restart is just another full set. Sets are
//! normalised (sorted by address, unique) so two sets compare equal exactly
//! when they would route the same way.

pub mod consul;
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
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            weight: 1,
            tags: Vec::new(),
            meta: BTreeMap::new(),
        }
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
