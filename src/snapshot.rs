//! The one swap point: an `ArcSwap` holding the whole routing table.
//!
//! Readers (`load`) are lock-free; only reconcile calls `publish`. The proxy
//! loads once per request and keeps that `Arc` for the request's lifetime, so
//! one request sees one generation even when a swap lands mid-flight.

use crate::routing::RoutingTable;
use arc_swap::ArcSwap;
use std::sync::Arc;

pub struct Snapshot {
    current: ArcSwap<RoutingTable>,
}

impl Snapshot {
    pub fn new(initial: RoutingTable) -> Self {
        Snapshot {
            current: ArcSwap::from_pointee(initial),
        }
    }

    pub fn load(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// The serving table's `[limits]`, without taking a reference to the
    /// table (for the connection loops, between requests).
    pub fn limits(&self) -> crate::config::Limits {
        self.current.load().limits
    }

    /// Replace the table. Called by reconcile only.
    pub fn publish(&self, table: RoutingTable) -> Arc<RoutingTable> {
        let table = Arc::new(table);
        self.current.store(table.clone());
        table
    }
}
