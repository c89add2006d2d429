//! How often a watch reads, and the two client-wide signals that cut a
//! pause short: "the indexes went backwards" and "the agent answers again".
//!
//! Pacing (per watch, see [`Pacer`]):
//! * a read that returned a change early is followed by the next read no
//!   sooner than `min_interval` after it *started* (default 50 ms), so a
//!   service that changes 10 times a second is followed change by change;
//! * a read that changed nothing — the index moved but the instance set is
//!   the same (check output churn), or a held read came back early with its
//!   index unchanged — takes a token from a bucket with a burst of 2 and one
//!   token per `noop_interval` (default 1 s);
//! * a read held until `wait` ran out, or the first read after a reset,
//!   is followed by a blocking read at once: those cost Consul nothing;
//! * a non-blocking read that took `t` is followed by a pause of at least `t`,
//!   so a slow Consul slows the loop down;
//! * errors back off exponentially (see `watch::backoff`).
//!
//! Rewound indexes: Consul releases the queries it holds when a snapshot is
//! restored, answering with the index the client sent; a query sent *after*
//! the restore with an index above the new ones is held until `wait` runs
//! out. So a watch must never send an index that may be stale without first
//! confirming it: after any pause with a known index, and after a held read
//! that came back early and unchanged, the next read is a non-blocking probe.
//! A probe (or any read) that sees the index go backwards reports it to
//! [`Restores`], which tells every other watch to re-read without blocking.
//!
//! Recovery: while watches back off after the agent was unreachable, timed
//! out or answered 5xx, [`run_prober`] asks `GET /v1/status/leader` once a
//! second; when it answers again with a leader, the waiting watches wake
//! (each after a random 0–250 ms, so a thousand of them do not arrive at once).

use super::client::ConsulClient;
use super::watch::IndexTracker;
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// At most one "indexes went backwards" broadcast per this interval.
pub const RESTORE_SIGNAL_MIN: Duration = Duration::from_secs(1);
/// How often the recovery prober asks the agent while watches back off.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Upper bound of the random delay before a woken watch reads.
pub const WAKE_JITTER: Duration = Duration::from_millis(250);

/// Token bucket on tokio time (so paused-time tests can drive it). Taking a
/// token never waits here: it returns how long the caller must pause, and
/// the bucket goes into debt for that long.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    refill: Duration,
    last: Instant,
}

impl TokenBucket {
    pub fn new(capacity: u32, refill: Duration) -> Self {
        TokenBucket {
            capacity: capacity as f64,
            tokens: capacity as f64,
            refill,
            last: Instant::now(),
        }
    }

    /// Take one token; the result is the pause before it is really available.
    pub fn take(&mut self) -> Duration {
        let now = Instant::now();
        let gained = now.duration_since(self.last).as_secs_f64() / self.refill.as_secs_f64().max(1e-9);
        self.tokens = (self.tokens + gained).min(self.capacity);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens * self.refill.as_secs_f64())
        }
    }
}

/// What one good read amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// First read after a reset (or a rewound index adopted): block next.
    Fresh,
    /// The set changed and was applied.
    Changed,
    /// The index moved but the set is the same.
    Noop,
    /// A blocking read held until `wait` ran out: nothing happened.
    HeldUnchanged,
    /// A blocking read came back before `wait` with the same index: Consul
    /// does that when a snapshot restore releases its held queries.
    EarlyUnchanged,
    /// A probe confirmed the index we hold.
    ProbeUnchanged,
}

/// What to do before the next read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Next {
    pub delay: Duration,
    /// Read without an index (keeping the tracked one for comparison).
    pub probe: bool,
}

/// Per-watch pacing state; see the module documentation.
#[derive(Debug)]
pub struct Pacer {
    min_interval: Duration,
    noop: TokenBucket,
    /// The `wait` sent with blocking reads: one that returns sooner is early.
    wait: Duration,
    started: Instant,
}

impl Pacer {
    pub fn new(min_interval: Duration, noop_interval: Duration, wait: Duration) -> Pacer {
        Pacer {
            min_interval,
            noop: TokenBucket::new(2, noop_interval),
            wait,
            started: Instant::now(),
        }
    }

    /// A read is being sent now.
    pub fn start(&mut self) {
        self.started = Instant::now();
    }

    /// The outcome of a read (started at the last [`Pacer::start`]) that
    /// answered the index we hold: a probe confirmed it, or a blocking read
    /// was held to the end of `wait`, or came back before it.
    pub fn unchanged(&self, blocking: bool) -> Outcome {
        if !blocking {
            Outcome::ProbeUnchanged
        } else if self.started.elapsed() < self.wait {
            Outcome::EarlyUnchanged
        } else {
            Outcome::HeldUnchanged
        }
    }

    /// The pause (and the kind of read) after a good read that started at the
    /// last [`Pacer::start`]; `blocking` says whether it carried an index.
    pub fn next(&mut self, outcome: Outcome, blocking: bool) -> Next {
        let elapsed = self.started.elapsed();
        let spacing = || {
            let s = self.min_interval.saturating_sub(elapsed);
            if blocking {
                s
            } else {
                s.max(elapsed)
            }
        };
        let delay = match outcome {
            Outcome::Fresh | Outcome::HeldUnchanged | Outcome::ProbeUnchanged => Duration::ZERO,
            Outcome::EarlyUnchanged => self.noop.take(),
            Outcome::Changed => spacing(),
            Outcome::Noop => spacing().max(self.noop.take()),
        };
        Next {
            delay,
            probe: !delay.is_zero() || outcome == Outcome::EarlyUnchanged,
        }
    }
}

/// The "indexes went backwards" broadcast shared by every watch of a client.
pub struct Restores {
    tx: watch::Sender<u64>,
    last: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

/// One watch's view of [`Restores`]: the generation it has acted on.
pub struct RestoreRx {
    rx: watch::Receiver<u64>,
    seen: u64,
}

impl RestoreRx {
    /// Whether a broadcast arrived since the last look (and mark it seen).
    pub fn take(&mut self) -> bool {
        if self.rx.has_changed().unwrap_or(false) {
            self.seen = *self.rx.borrow_and_update();
            true
        } else {
            false
        }
    }

    /// Wait for the next broadcast (and mark it seen).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.seen = *self.rx.borrow_and_update();
    }

    /// This watch saw an index go backwards and has already re-read: tell
    /// the others, and count whatever broadcast exists now as seen.
    pub fn report(&mut self, restores: &Restores, who: &str) -> bool {
        let first = restores.report(who, self.seen);
        self.seen = *self.rx.borrow_and_update();
        first
    }
}

impl Restores {
    pub fn new(metrics: Arc<Metrics>) -> Restores {
        Restores {
            tx: watch::channel(0).0,
            last: Mutex::new(None),
            metrics,
        }
    }

    /// A receiver for which the current generation counts as seen.
    pub fn subscribe(&self) -> RestoreRx {
        let mut rx = self.tx.subscribe();
        let seen = *rx.borrow_and_update();
        RestoreRx { rx, seen }
    }

    /// `who` saw an index go backwards while it had seen generation `seen`.
    /// The first report of a rewind tells every watch (logged once at INFO
    /// and counted); a report after another watch already told them, or
    /// within [`RESTORE_SIGNAL_MIN`] of the last broadcast, does nothing.
    /// Returns whether this report was the broadcast.
    fn report(&self, who: &str, seen: u64) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if *self.tx.borrow() != seen || last.is_some_and(|t| t.elapsed() < RESTORE_SIGNAL_MIN) {
            return false;
        }
        *last = Some(Instant::now());
        self.tx.send_modify(|g| *g += 1);
        self.metrics.consul_index_rewinds.inc();
        tracing::info!(
            watch = who,
            "Consul indexes went backwards (a snapshot restore or a rebuilt cluster); every watch re-reads without blocking"
        );
        true
    }
}

/// How a pause between reads ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    Timer,
    /// A rewind broadcast: reset the index, re-read without blocking.
    Rewind,
    Shutdown,
}

/// Pause `d` unless a rewind broadcast or shutdown comes first.
pub async fn pause(d: Duration, restores: &mut RestoreRx, shutdown: &mut watch::Receiver<bool>) -> Woke {
    if d.is_zero() {
        return Woke::Timer;
    }
    tokio::select! {
        _ = shutdown.changed() => Woke::Shutdown,
        _ = restores.changed() => Woke::Rewind,
        _ = tokio::time::sleep(d) => Woke::Timer,
    }
}

/// After a good read: pause as the pacer says (a rewind broadcast ends the
/// pause and resets the index). Returns whether the next read is a probe,
/// or None on shutdown.
pub async fn after_read(
    pacer: &mut Pacer,
    tracker: &mut IndexTracker,
    outcome: Outcome,
    blocking: bool,
    restores: &mut RestoreRx,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<bool> {
    let next = pacer.next(outcome, blocking);
    match pause(next.delay, restores, shutdown).await {
        Woke::Shutdown => None,
        Woke::Rewind => {
            tracker.reset();
            Some(false)
        }
        Woke::Timer => Some(next.probe && tracker.request_index() > 0),
    }
}

/// Watches waiting out a backoff, and the prober that wakes them.
pub struct Recovery {
    waiting: AtomicUsize,
    started: Notify,
    tx: watch::Sender<u64>,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            waiting: AtomicUsize::new(0),
            started: Notify::new(),
            tx: watch::channel(0).0,
        }
    }
}

/// Held by a watch for the length of one backoff.
pub struct Waiting<'a>(&'a Recovery);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Recovery {
    /// Enter a backoff that the prober may cut short: the receiver changes
    /// when the agent answers again.
    pub fn backing_off(&self) -> (Waiting<'_>, watch::Receiver<u64>) {
        let rx = self.tx.subscribe();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.started.notify_one();
        (Waiting(self), rx)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// Wait out `backoff`, or until the prober says the agent answers again (then
/// a random part of [`WAKE_JITTER`]), a rewind broadcast arrives, or shutdown.
/// Returns false on shutdown.
pub async fn back_off(
    client: &ConsulClient,
    backoff: Duration,
    probe_may_wake: bool,
    restores: &mut RestoreRx,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let (_guard, mut woke) = if probe_may_wake {
        let (g, rx) = client.recovery.backing_off();
        (Some(g), Some(rx))
    } else {
        (None, None)
    };
    let woken = async {
        match woke.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = shutdown.changed() => return false,
        _ = tokio::time::sleep(backoff) => {}
        _ = restores.changed() => {}
        _ = woken => {
            let j = WAKE_JITTER.mul_f64(rand::random::<f64>());
            tokio::select! {
                _ = shutdown.changed() => return false,
                _ = tokio::time::sleep(j) => {}
            }
        }
    }
    true
}

/// While any watch backs off (see [`Recovery`]), ask the agent for the
/// leader once a second; on the first good answer after a failed one, wake
/// the waiting watches. Runs until shutdown.
pub async fn run_prober(client: Arc<ConsulClient>, metrics: Arc<Metrics>, mut shutdown: watch::Receiver<bool>) {
    let rec = &client.recovery;
    let dc = client.settings().datacenter.clone();
    let mut last_ok = true;
    loop {
        while rec.waiting() == 0 {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = rec.started.notified() => {}
            }
        }
        let mut params: Vec<(&str, Option<&str>)> = Vec::new();
        if let Some(dc) = &dc {
            params.push(("dc", Some(dc.as_str())));
        }
        let t = Duration::from_secs(2);
        let ok = tokio::select! {
            _ = shutdown.changed() => return,
            r = tokio::time::timeout(t, client.request(reqwest::Method::GET, "status_leader", "/v1/status/leader", &params, None, t)) => {
                matches!(r, Ok(Ok(resp)) if serde_json::from_slice::<String>(&resp.body).is_ok_and(|l| !l.is_empty()))
            }
        };
        if ok && !last_ok {
            let n = rec.waiting();
            metrics.consul_recovery_wakes.inc();
            tracing::info!(watches = n, "Consul agent answers again; waking the watches that were backing off");
            rec.tx.send_modify(|g| *g += 1);
        }
        last_ok = ok;
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(PROBE_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn token_bucket_allows_a_burst_of_two_then_paces() {
        let mut b = TokenBucket::new(2, Duration::from_secs(1));
        assert_eq!(b.take(), Duration::ZERO);
        assert_eq!(b.take(), Duration::ZERO, "burst of two is immediate");
        assert_eq!(b.take(), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        // The debt was paid by the pause; the next token is a second away.
        assert_eq!(b.take(), Duration::from_secs(1));
        // After a quiet period the burst is available again (but not more).
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.take(), Duration::ZERO);
        assert_eq!(b.take(), Duration::ZERO);
        assert_eq!(b.take(), Duration::from_secs(1));
    }

    const MIN: Duration = Duration::from_millis(50);
    const NOOP: Duration = Duration::from_secs(1);
    const WAIT: Duration = Duration::from_secs(300);

    #[tokio::test(start_paused = true)]
    async fn changes_are_spaced_by_min_interval_from_the_start_of_the_read() {
        let mut p = Pacer::new(MIN, NOOP, WAIT);
        // A blocking read that returned a change after 10 ms: 40 ms more, then a probe.
        p.start();
        tokio::time::advance(Duration::from_millis(10)).await;
        let n = p.next(Outcome::Changed, true);
        assert_eq!(n, Next { delay: Duration::from_millis(40), probe: true });
        // Held for 2 s before the change: no pause, block again at once.
        p.start();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(p.next(Outcome::Changed, true), Next { delay: Duration::ZERO, probe: false });
        // Sustained churn never touches the no-op bucket: 100 changes, each 50 ms apart.
        for _ in 0..100 {
            p.start();
            tokio::time::advance(Duration::from_millis(5)).await;
            assert_eq!(p.next(Outcome::Changed, true).delay, Duration::from_millis(45));
            tokio::time::advance(Duration::from_millis(45)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_non_blocking_read_slows_the_loop() {
        let mut p = Pacer::new(MIN, NOOP, WAIT);
        p.start();
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(p.next(Outcome::Changed, false).delay, Duration::from_millis(300));
        // But a fresh read or a confirmed index goes straight to blocking.
        p.start();
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(p.next(Outcome::Fresh, false), Next { delay: Duration::ZERO, probe: false });
        assert_eq!(p.next(Outcome::ProbeUnchanged, false), Next { delay: Duration::ZERO, probe: false });
    }

    #[tokio::test(start_paused = true)]
    async fn index_only_churn_is_paced_by_the_noop_bucket() {
        let mut p = Pacer::new(MIN, NOOP, WAIT);
        let mut delays = Vec::new();
        for _ in 0..5 {
            p.start();
            tokio::time::advance(Duration::from_millis(100)).await;
            let n = p.next(Outcome::Noop, true);
            delays.push(n.delay);
            tokio::time::advance(n.delay).await;
        }
        assert_eq!(delays[..2], [Duration::ZERO, Duration::ZERO], "a burst of two");
        // Then one read per second: the 100 ms the read was held counts.
        for d in &delays[2..] {
            assert!(*d >= Duration::from_millis(800) && *d <= Duration::from_secs(1), "{delays:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_unchanged_return_is_followed_by_a_probe() {
        let mut p = Pacer::new(MIN, NOOP, WAIT);
        p.start();
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(p.unchanged(true), Outcome::EarlyUnchanged);
        assert_eq!(p.unchanged(false), Outcome::ProbeUnchanged, "a probe has no wait");
        assert_eq!(p.next(Outcome::EarlyUnchanged, true), Next { delay: Duration::ZERO, probe: true });
        // Held to the end of wait: block again at once.
        p.start();
        tokio::time::advance(WAIT).await;
        assert_eq!(p.unchanged(true), Outcome::HeldUnchanged);
        assert_eq!(p.next(Outcome::HeldUnchanged, true), Next { delay: Duration::ZERO, probe: false });
        // A Consul that keeps returning early unchanged is held to the bucket
        // (after its burst of two).
        p.next(Outcome::EarlyUnchanged, true);
        p.next(Outcome::EarlyUnchanged, true);
        let n = p.next(Outcome::EarlyUnchanged, true);
        assert!(n.probe && n.delay >= Duration::from_millis(900), "{n:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_broadcast_per_rewind() {
        let m = Arc::new(Metrics::new());
        let r = Restores::new(m.clone());
        let mut a = r.subscribe();
        let mut b = r.subscribe();
        assert!(a.report(&r, "a"));
        assert!(!a.take(), "the reporter has already re-read");
        // b saw the same rewind on its own, before hearing of it: no second broadcast.
        assert!(!b.report(&r, "b"));
        assert!(!b.take(), "b has re-read too");
        assert_eq!(m.consul_index_rewinds.get(), 1);
        // A third watch hears of it.
        let mut c = r.subscribe();
        assert!(!c.take());
        assert!(!a.report(&r, "a"), "within a second of the last broadcast: suppressed");
        tokio::time::advance(RESTORE_SIGNAL_MIN).await;
        assert!(a.report(&r, "a"));
        assert!(c.take(), "every other watch is told");
        assert_eq!(m.consul_index_rewinds.get(), 2);
        let (_keep, mut shutdown) = tokio::sync::watch::channel(false);
        assert_eq!(pause(Duration::from_secs(5), &mut b, &mut shutdown).await, Woke::Rewind);
        assert_eq!(pause(Duration::from_secs(5), &mut b, &mut shutdown).await, Woke::Timer);
    }
}
