//! What `/status` and `/readyz` report about sources and swaps. Written by the
//! control plane (sources, reconcile), read by the admin API. Never touched on
//! the request path.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub kind: &'static str,
    pub target: String,
    /// `pending` (no result yet), `ok`, or `error` (serving the last good set).
    pub state: &'static str,
    pub last_success_unix: Option<f64>,
    pub last_error: Option<String>,
    pub last_error_unix: Option<f64>,
    /// DNS sources only: what the last answer held and when the next refresh is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsDetail>,
}

/// A DNS source's view in `/status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DnsDetail {
    pub name: String,
    /// `SRV` or `A/AAAA`.
    pub record_type: &'static str,
    /// Empty: the system's resolver configuration.
    pub nameservers: Vec<String>,
    /// Records in the last answer (SRV, or A and AAAA).
    pub records: Option<usize>,
    /// Backends published from it.
    pub backends: Option<usize>,
    /// SRV: the priority of the group served.
    pub priority: Option<u16>,
    /// The smallest TTL among the records used (before clamping to the refresh bounds).
    pub ttl_seconds: Option<u32>,
    pub next_refresh_unix: Option<f64>,
    /// The last lookup's result, as in `switchyard_dns_lookups_total`.
    pub last_result: Option<&'static str>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SwapStatus {
    pub generation: u64,
    pub last_swap_unix: Option<f64>,
    pub swaps: u64,
    pub last_build_error: Option<String>,
}

#[derive(Default)]
pub struct StatusBoard {
    sources: Mutex<BTreeMap<String, SourceStatus>>,
    swap: Mutex<SwapStatus>,
    panics: Mutex<Vec<String>>,
    tag_errors: Mutex<BTreeMap<String, String>>,
}

pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl StatusBoard {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register_source(&self, name: &str, kind: &'static str, target: &str) {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).insert(
            name.to_string(),
            SourceStatus {
                kind,
                target: target.to_string(),
                state: "pending",
                last_success_unix: None,
                last_error: None,
                last_error_unix: None,
                dns: None,
            },
        );
    }

    fn with_source(&self, name: &str, f: impl FnOnce(&mut SourceStatus)) {
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(name) {
            f(s);
        }
    }

    pub fn source_ok(&self, name: &str, at: SystemTime) {
        self.with_source(name, |s| {
            s.state = "ok";
            s.last_success_unix = Some(unix(at));
        });
    }

    pub fn source_error(&self, name: &str, error: String) {
        self.with_source(name, |s| {
            s.state = "error";
            s.last_error = Some(error);
            s.last_error_unix = Some(unix(SystemTime::now()));
        });
    }

    /// Replace a DNS source's detail.
    pub fn source_dns(&self, name: &str, detail: DnsDetail) {
        self.with_source(name, |s| s.dns = Some(detail));
    }

    pub fn sources(&self) -> BTreeMap<String, SourceStatus> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn swapped(&self, generation: u64, at: SystemTime) {
        let mut s = self.swap.lock().unwrap_or_else(|e| e.into_inner());
        s.generation = generation;
        s.last_swap_unix = Some(unix(at));
        s.swaps += 1;
        s.last_build_error = None;
    }

    pub fn build_failed(&self, error: String) {
        self.swap.lock().unwrap_or_else(|e| e.into_inner()).last_build_error = Some(error);
    }

    pub fn set_panics(&self, clusters: Vec<String>) {
        *self.panics.lock().unwrap_or_else(|e| e.into_inner()) = clusters;
    }

    pub fn set_tag_errors(&self, errors: BTreeMap<String, String>) {
        *self.tag_errors.lock().unwrap_or_else(|e| e.into_inner()) = errors;
    }

    pub fn tag_errors(&self) -> BTreeMap<String, String> {
        self.tag_errors.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn panics(&self) -> Vec<String> {
        self.panics.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn swap(&self) -> SwapStatus {
        self.swap.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
