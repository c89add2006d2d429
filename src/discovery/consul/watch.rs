//! One blocking watch on `/v1/health/service/<name>`, following the rules in
//! the rules in `docs/consul.md` (sections 3.3 and 9):
//!
//! * long-poll with the last good `X-Consul-Index` and an explicit `wait`;
//!   the request timeout is `wait × 17/16` plus slack (Consul adds up to
//!   wait/16 of jitter) — this timeout is also the watchdog for hung watches;
//! * index went backwards → reset to 0 (one non-blocking read), and tell
//!   every other watch (the indexes rewind together);
//!   index 0, missing or unparsable → treat as a reset, never block below 1;
//! * unchanged index → no-op; changed index but same normalised set → no-op;
//! * pacing and the probes that keep a stale index from being held are in
//!   [`super::pace`];
//! * errors back off exponentially with full jitter and reset the index;
//! * a failed read never publishes anything: the last good set stays.

use super::client::{ClientError, ConsulClient};
use super::health::parse_health;
use super::pace::{after_read, back_off, Outcome, Pacer};
use super::{ServiceSnapshot, WatchShared};
use crate::config::ConsulQuery;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Extra time on top of `wait × 17/16` before a blocking read counts as hung.
pub const READ_SLACK: Duration = Duration::from_secs(2);
/// First backoff after an error, and the cap.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// What a response's index means for the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// First read, or the first after a reset: apply the content.
    Fresh,
    /// The index moved forward: compare content, apply if changed.
    Advanced,
    /// Same index: nothing changed.
    Unchanged,
    /// The index went backwards: apply the content; the next read is non-blocking.
    WentBackwards,
    /// 0, missing or unparsable: apply the content; block on 1 next.
    Invalid,
}

/// The index rules, with no I/O.
#[derive(Debug, Default, Clone)]
pub struct IndexTracker {
    index: u64,
}

impl IndexTracker {
    /// Index to send; 0 means "no index parameter": a non-blocking read.
    pub fn request_index(&self) -> u64 {
        self.index
    }

    pub fn reset(&mut self) {
        self.index = 0;
    }

    /// Apply a response's index. `blocking`: the read carried our index. A
    /// non-blocking read (a probe) that answers a lower index answered with
    /// the current state, so that index is adopted; a blocking one that
    /// does is re-read without blocking first.
    pub fn observe(&mut self, header: Option<u64>, blocking: bool) -> Observed {
        match header {
            None | Some(0) => {
                // Never echo 0: block on 1, which is always safe.
                self.index = 1;
                Observed::Invalid
            }
            Some(n) if self.index == 0 => {
                self.index = n;
                Observed::Fresh
            }
            Some(n) if n < self.index => {
                self.index = if blocking { 0 } else { n };
                Observed::WentBackwards
            }
            Some(n) if n == self.index => Observed::Unchanged,
            Some(n) => {
                self.index = n;
                Observed::Advanced
            }
        }
    }
}

/// Exponential backoff with full jitter: uniform in [base·2ⁿ/2, base·2ⁿ], capped.
pub fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let top = exp.min(BACKOFF_CAP);
    let low = top / 2;
    low + top.saturating_sub(low).mul_f64(rand::random::<f64>())
}

/// The blocking-read timeout for a wait: `wait × 17/16` plus slack.
pub fn read_timeout(wait: Duration) -> Duration {
    wait + wait / 16 + READ_SLACK
}

/// How a watch reads: blocking; or, beyond the connection budget, a
/// non-blocking read each time the datacenter-wide check signal says this
/// service changed (and at least every `resync`).
#[derive(Debug, Clone)]
pub enum Mode {
    Blocking,
    Triggered { poke: Arc<tokio::sync::Notify>, resync: Duration },
}

impl Mode {
    pub fn is_blocking(&self) -> bool {
        matches!(self, Mode::Blocking)
    }
}

fn query_params<'a>(q: &'a ConsulQuery, dc: Option<&'a str>, stale: bool, index: &'a str, wait: &'a str, blocking: bool) -> Vec<(&'a str, Option<&'a str>)> {
    let mut p: Vec<(&str, Option<&str>)> = Vec::new();
    if stale {
        p.push(("stale", None));
    }
    if let Some(dc) = dc {
        p.push(("dc", Some(dc)));
    }
    for t in &q.tags {
        p.push(("tag", Some(t.as_str())));
    }
    if let Some(f) = &q.filter {
        p.push(("filter", Some(f.as_str())));
    }
    if blocking {
        p.push(("index", Some(index)));
        p.push(("wait", Some(wait)));
    }
    p
}

/// Run one watch until shutdown.
pub async fn run(
    query: ConsulQuery,
    client: Arc<ConsulClient>,
    shared: Arc<WatchShared>,
    mode: Mode,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let settings = client.settings().clone();
    let mut tracker = IndexTracker::default();
    let mut pacer = Pacer::new(settings.min_interval, settings.noop_interval, settings.wait);
    let mut restores = client.restores.subscribe();
    let mut failures: u32 = 0;
    let mut use_stale = settings.stale;
    // Read without an index, keeping the tracked one to compare (see `pace`).
    let mut probe = false;
    let path = format!("/v1/health/service/{}", encode_segment(&query.service));
    let wait_ms = format!("{}ms", settings.wait.as_millis().max(1));
    loop {
        if *shutdown.borrow() {
            return;
        }
        if restores.take() {
            tracker.reset();
            probe = false;
        }
        let blocking = mode.is_blocking() && tracker.request_index() > 0 && !probe;
        let index = tracker.request_index().to_string();
        let params = query_params(&query, settings.datacenter.as_deref(), use_stale, &index, &wait_ms, blocking);
        let timeout = if blocking { read_timeout(settings.wait) } else { Duration::from_secs(10) + READ_SLACK };
        pacer.start();
        // Only a blocking read that follows a good read proves freshness while held.
        shared.set_holding(blocking && failures == 0);
        let result = tokio::select! {
            _ = shutdown.changed() => return,
            _ = restores.changed() => {
                // Another watch saw the indexes rewind: this read may be held
                // on an index Consul no longer has.
                shared.set_holding(false);
                tracker.reset();
                probe = false;
                continue;
            }
            r = tokio::time::timeout(timeout, client.request(reqwest::Method::GET, "health_service", &path, &params, None, timeout)) => {
                r.unwrap_or(Err(ClientError::Timeout))
            }
        };
        probe = false;
        match result {
            Ok(resp) => {
                failures = 0;
                // Freshness: a stale read from a server far behind the leader is
                // re-done without `stale`, once.
                if use_stale && resp.last_contact_ms.is_some_and(|ms| Duration::from_millis(ms) > settings.max_stale) {
                    use_stale = false;
                    tracker.reset();
                    continue;
                }
                use_stale = settings.stale;
                let observed = tracker.observe(resp.index, blocking);
                shared.synced(SystemTime::now());
                if observed == Observed::WentBackwards {
                    shared.index_reset();
                    restores.report(&client.restores, shared.label());
                }
                let outcome = match observed {
                    Observed::Unchanged => pacer.unchanged(blocking),
                    _ => match parse_health(&resp.body) {
                        Ok(parsed) if parsed.instances.is_empty() && parsed.named.is_empty() && !parsed.skipped.is_empty() => {
                            // Every entry was invalid: that is a bad answer, not an
                            // empty service. Never let it empty the pool.
                            for (reason, detail) in &parsed.skipped {
                                shared.skipped(reason, detail);
                            }
                            tracker.reset();
                            failures += 1;
                            shared.error("bad_body", &format!("all {} instances in the answer were invalid", parsed.skipped.len()));
                            if !back_off(&client, backoff(failures), false, &mut restores, &mut shutdown).await {
                                return;
                            }
                            continue;
                        }
                        Ok(parsed) => {
                            for (reason, detail) in &parsed.skipped {
                                shared.skipped(reason, detail);
                            }
                            let changed = shared.publish(ServiceSnapshot {
                                instances: Arc::new(parsed.instances),
                                named: Arc::new(parsed.named),
                                synced_at: SystemTime::now(),
                                from_state_file: false,
                            });
                            match observed {
                                Observed::Fresh | Observed::WentBackwards if mode.is_blocking() => Outcome::Fresh,
                                _ if changed => Outcome::Changed,
                                _ => Outcome::Noop,
                            }
                        }
                        Err(e) => {
                            // A garbage body is an error like any other: keep the last good set.
                            tracker.reset();
                            failures += 1;
                            shared.error("bad_body", &e);
                            if !back_off(&client, backoff(failures), false, &mut restores, &mut shutdown).await {
                                return;
                            }
                            continue;
                        }
                    },
                };
                match after_read(&mut pacer, &mut tracker, outcome, blocking, &mut restores, &mut shutdown).await {
                    Some(p) => probe = p,
                    None => return,
                }
                if let Mode::Triggered { poke, resync } = &mode {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = poke.notified() => {}
                        _ = tokio::time::sleep(*resync) => {}
                    }
                    tracker.reset();
                    probe = false;
                }
            }
            Err(e) => {
                shared.set_holding(false);
                tracker.reset();
                failures += 1;
                if matches!(e, ClientError::Http { status: 403, .. }) {
                    client.reload_token();
                }
                shared.error(e.kind(), &e.to_string());
                if !back_off(&client, backoff(failures), agent_down(&e), &mut restores, &mut shutdown).await {
                    return;
                }
            }
        }
    }
}

/// Errors after which the recovery prober may end a backoff early: the agent
/// (or its servers) could not answer at all. A 403, 429 or bad body is an
/// answer, and waits its full backoff.
pub fn agent_down(e: &ClientError) -> bool {
    match e {
        ClientError::Connect(_) | ClientError::Timeout => true,
        ClientError::Http { status, .. } => *status >= 500,
        ClientError::Body(_) => false,
    }
}

/// Percent-encode one path segment.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        let mut t = IndexTracker::default();
        assert_eq!(t.request_index(), 0, "first read is non-blocking");
        assert_eq!(t.observe(Some(10), false), Observed::Fresh);
        assert_eq!(t.request_index(), 10);
        assert_eq!(t.observe(Some(10), true), Observed::Unchanged);
        assert_eq!(t.observe(Some(12), true), Observed::Advanced);
        assert_eq!(t.observe(Some(5), true), Observed::WentBackwards);
        assert_eq!(t.request_index(), 0, "reset: one non-blocking read");
        assert_eq!(t.observe(Some(5), false), Observed::Fresh);
        assert_eq!(t.observe(Some(0), true), Observed::Invalid);
        assert_eq!(t.request_index(), 1, "never block below 1");
        assert_eq!(t.observe(None, true), Observed::Invalid);
        assert_eq!(t.request_index(), 1);
        assert_eq!(t.observe(Some(7), true), Observed::Advanced);
        // A probe (no index sent) that finds a lower index has the current
        // state: adopt it and block on it next.
        assert_eq!(t.observe(Some(3), false), Observed::WentBackwards);
        assert_eq!(t.request_index(), 3);
        assert_eq!(t.observe(Some(3), false), Observed::Unchanged);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for n in 1..30 {
            let d = backoff(n);
            let top = BACKOFF_BASE.saturating_mul(1 << (n - 1).min(16)).min(BACKOFF_CAP);
            assert!(d >= top / 2 && d <= top, "{n}: {d:?}");
        }
        assert!(backoff(40) <= BACKOFF_CAP);
    }

    #[test]
    fn read_timeout_exceeds_jittered_wait() {
        let w = Duration::from_secs(300);
        assert!(read_timeout(w) > w * 17 / 16);
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("web-1"), "web-1");
        assert_eq!(encode_segment("a/b c?"), "a%2Fb%20c%3F");
    }
}
