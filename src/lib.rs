//! Switchyard: an edge HTTP load balancer that follows a service catalog
//! (a watched file, Consul, DNS SRV and A/AAAA records) and swaps
//! its routing snapshot without restarts or reloads.
//!
//! Data flows one way:
//!
//! ```text
//! config file ─┐
//! discovery    ├─► reconcile ─► RoutingTable::build ─► snapshot (one ArcSwap) ─► proxy ─► metrics
//!  (file,      │   (the only     (pure function:         publish() / load()        (request    (write-only
//!   consul,    │    writer)       no I/O, no async)                                 path)       sink)
//!   dns,       │
//!   static)    │
//! ```
//!
//! * Sources publish *whole* sets (never deltas) on `tokio::sync::watch` channels.
//! * [`reconcile`] is the only writer of the snapshot. A failed build or an invalid
//!   input leaves the last good table serving.
//! * [`routing::RoutingTable`] is immutable; the proxy loads it once per request.
//! * State that must survive a swap (in-flight counts, round-robin cursors) lives in
//!   per-backend / per-cluster `Arc`s that the builder reuses.

pub mod accesslog;
pub mod admin;
pub mod alloc;
pub mod cli;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod ha;
pub mod health;
pub mod kvcli;
pub mod kvconfig;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod reconcile;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod status;
pub mod tls;
