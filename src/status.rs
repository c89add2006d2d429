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
