//! Backend selection. Each structure is built once per backend set (when a
//! table is built) and read lock-free per request. Every policy takes a list
//! of backends already tried by this request and avoids them, so a retry goes
//! to a different backend whenever one exists.

use super::{Backend, ClusterState, RequestView};
use crate::config::{HashKey, Selection, SlowStart};
use pingora_ketama::{Bucket, Continuum};
use std::sync::atomic::Ordering;

/// Longest weighted schedule we build; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 4096;

pub enum Selector {
    RoundRobin,
    /// Smooth weighted round robin, precomputed: a cycle of backend indices.
    Weighted(Vec<u32>),
    LeastConnections,
    ConsistentHash { ring: Continuum, key: HashKey },
}

impl Selector {
    /// `active` are the indices (into `backends`) that may receive new requests.
    pub fn build(selection: &Selection, backends: &[Backend], active: &[u32]) -> Selector {
        match selection {
            Selection::RoundRobin => Selector::RoundRobin,
            Selection::LeastConnections => Selector::LeastConnections,
            Selection::Weighted => Selector::Weighted(smooth_wrr(backends, active)),
            Selection::ConsistentHash(key) => {
                let buckets: Vec<Bucket> = active
                    .iter()
                    .map(|&i| {
                        let b = &backends[i as usize];
                        Bucket::new(b.addr, b.weight.max(1))
                    })
                    .collect();
                Selector::ConsistentHash {
                    ring: Continuum::new(&buckets),
                    key: key.clone(),
                }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Selector::RoundRobin => "round_robin",
            Selector::Weighted(_) => "weighted",
            Selector::LeastConnections => "least_connections",
            Selector::ConsistentHash { .. } => "consistent_hash",
        }
    }
}

/// Precompute one cycle of smooth weighted round robin (the nginx algorithm):
/// heavy backends are spread through the cycle, not bunched.
fn smooth_wrr(backends: &[Backend], active: &[u32]) -> Vec<u32> {
    if active.is_empty() {
        return Vec::new();
    }
    let total: u64 = active.iter().map(|&i| backends[i as usize].weight as u64).sum();
    let scale = if total > MAX_SCHEDULE { total as f64 / MAX_SCHEDULE as f64 } else { 1.0 };
    let weights: Vec<i64> = active
        .iter()
        .map(|&i| ((backends[i as usize].weight as f64 / scale).round() as i64).max(1))
        .collect();
    let g = weights.iter().fold(0i64, |acc, &w| gcd(acc, w)).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| w / g).collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for j in 0..weights.len() {
            current[j] += weights[j];
            if current[j] > current[best] {
                best = j;
            }
        }
        current[best] -= sum;
        out.push(active[best]);
    }
    out
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Pick a backend index for a request, avoiding `tried` where possible.
/// Returns None only when `active` is empty. With `slow_start`, a backend
/// still ramping is taken, when its turn comes, only with the probability of
/// its current share (else the next in turn is); consistent hashing has no
/// slow start (a key's backend must not depend on time).
pub fn pick<R: RequestView + ?Sized>(
    selector: &Selector,
    backends: &[Backend],
    active: &[u32],
    state: &ClusterState,
    slow_start: Option<&SlowStart>,
    req: &R,
    tried: &[u32],
) -> Option<u32> {
    pick_at(super::process_millis, selector, backends, active, state, slow_start, req, tried)
}

/// [`pick`] with the clock given (read only while something is timed).
#[allow(clippy::too_many_arguments)]
fn pick_at<R: RequestView + ?Sized>(
    clock: impl Fn() -> u64,
    selector: &Selector,
    backends: &[Backend],
    active: &[u32],
    state: &ClusterState,
    slow_start: Option<&SlowStart>,
    req: &R,
    tried: &[u32],
) -> Option<u32> {
    let n = active.len();
    if n == 0 {
        return None;
    }
    // Ejected backends (passive outlier detection) are passed over like
    // tried ones; the clock is read only while an ejection or a slow start
    // lasts.
    let ejections_until = state.ejected_until_ms.load(Ordering::Relaxed);
    let ramp_until = if slow_start.is_some() { state.ramp_until_ms.load(Ordering::Relaxed) } else { 0 };
    let now = if ejections_until == 0 && ramp_until == 0 { 0 } else { clock() };
    if ejections_until != 0 && now >= ejections_until {
        let _ = state.ejected_until_ms.compare_exchange(ejections_until, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
    if ramp_until != 0 && now >= ramp_until {
        let _ = state.ramp_until_ms.compare_exchange(ramp_until, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
    let ramping = match slow_start {
        Some(ss) if ramp_until > now => Some(ss),
        _ => None,
    };
    let untried = |i: u32| !tried.contains(&i) && (now == 0 || !backends[i as usize].state.ejected(now));
    let admitted = |i: u32| {
        let Some(ss) = ramping else { return true };
        let window = ss.window.as_millis() as u64;
        match backends[i as usize].ramp_start(now, window) {
            None => true,
            Some(from) => (next_random() & 0xffff) < ss.share(now - from),
        }
    };
    let choose = |ok: &dyn Fn(u32) -> bool| match selector {
        Selector::RoundRobin => {
            let start = state.cursor.fetch_add(1, Ordering::Relaxed);
            (0..n).map(|k| active[(start + k) % n]).find(|&i| ok(i))
        }
        Selector::Weighted(schedule) => {
            let len = schedule.len();
            let start = state.cursor.fetch_add(1, Ordering::Relaxed);
            (0..len).map(|k| schedule[(start + k) % len]).find(|&i| ok(i))
        }
        Selector::LeastConnections => {
            // Scan from a rotating start so ties spread evenly.
            let start = state.cursor.fetch_add(1, Ordering::Relaxed);
            let mut best: Option<(u32, u64, u64)> = None; // (index, in_flight, weight)
            for k in 0..n {
                let i = active[(start + k) % n];
                if !ok(i) {
                    continue;
                }
                let b = &backends[i as usize];
                let load = b.state.in_flight.load(Ordering::Relaxed);
                let w = b.weight.max(1) as u64;
                // load/w < best_load/best_w, without division
                if best.is_none_or(|(_, bl, bw)| load * bw < bl * w) {
                    best = Some((i, load, w));
                }
            }
            best.map(|(i, _, _)| i)
        }
        Selector::ConsistentHash { ring, key } => match hash_key(req, key) {
            Some(k) => ring
                .node_iter(k)
                .take(n * 64 + 64)
                .filter_map(|addr| backends.binary_search_by(|b| b.addr.cmp(addr)).ok())
                .map(|i| i as u32)
                .find(|&i| untried(i)),
            None => {
                let start = state.cursor.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| active[(start + k) % n]).find(|&i| ok(i))
            }
        },
    };
    let chosen = match (ramping, selector) {
        (None, _) => choose(&untried),
        // Least connections weighs every candidate: ramping ones turned
        // down by their roll are left out of this comparison.
        (Some(_), Selector::LeastConnections) => choose(&|i| untried(i) && admitted(i)).or_else(|| choose(&untried)),
        // In turn: a ramping backend that loses its roll gives its turn
        // up, and the pick moves on a turn, so the others share what it
        // does not take evenly (not just the next in line).
        (Some(_), _) => {
            let mut chosen = None;
            for _ in 0..8 {
                chosen = choose(&untried);
                if chosen.is_none_or(admitted) {
                    break;
                }
            }
            chosen
        }
    };
    // Everything tried: reuse one (a stale pooled connection is worth a second try).
    chosen.or_else(|| {
        let start = state.cursor.fetch_add(1, Ordering::Relaxed);
        Some(active[start % n])
    })
}

/// A fast per-thread pseudo-random number (xorshift64*), for slow start's
/// admission rolls; not for anything that needs to be unpredictable.
fn next_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        // Seeded from the standard library's per-thread random keys.
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(super::process_millis());
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 16
    })
}

/// The consistent-hash key of a request: a header value or a cookie value.
fn hash_key<'a, R: RequestView + ?Sized>(req: &'a R, key: &HashKey) -> Option<&'a [u8]> {
    match key {
        HashKey::Header(name) => req.header(name.as_str()).filter(|v| !v.is_empty()),
        HashKey::Cookie(name) => req.header_all("cookie").find_map(|v| {
            v.split(|&b| b == b';').find_map(|pair| {
                let pair = pair.trim_ascii();
                let eq = pair.iter().position(|&b| b == b'=')?;
                (pair[..eq] == *name.as_bytes() && eq + 1 < pair.len()).then(|| &pair[eq + 1..])
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::RequestHeader;
    use crate::routing::BackendState;
    use std::sync::Arc;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Backend::for_test(format!("127.0.0.1:{}", 1000 + i).parse().unwrap(), w))
            .collect()
    }

    fn counts(sel: &Selector, bs: &[Backend], active: &[u32], req: &RequestHeader, n: usize) -> Vec<usize> {
        let st = ClusterState::default();
        let mut c = vec![0; bs.len()];
        for _ in 0..n {
            c[pick(sel, bs, active, &st, None, req, &[]).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn weighted_schedule_is_exact_and_interleaved() {
        let bs = backends(&[5, 1, 1]);
        let sched = smooth_wrr(&bs, &[0, 1, 2]);
        assert_eq!(sched.len(), 7);
        assert_eq!(sched.iter().filter(|&&i| i == 0).count(), 5);
        // nginx's smooth WRR for 5,1,1 is a a b a c a a: never more than two heavy in a row at the start
        assert_eq!(sched, vec![0, 0, 1, 0, 2, 0, 0]);
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        assert_eq!(counts(&Selector::Weighted(sched), &bs, &[0, 1, 2], &req, 700), vec![500, 100, 100]);
    }

    #[test]
    fn huge_weights_are_scaled() {
        let bs = backends(&[65535, 65535, 1]);
        let sched = smooth_wrr(&bs, &[0, 1, 2]);
        assert!(sched.len() as u64 <= MAX_SCHEDULE + 3, "{}", sched.len());
        assert!(sched.contains(&2));
    }

    #[test]
    fn retries_avoid_tried_backends() {
        let bs = backends(&[1, 1, 1]);
        let st = ClusterState::default();
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        for sel in [Selector::RoundRobin, Selector::LeastConnections, Selector::Weighted(smooth_wrr(&bs, &[0, 1, 2]))] {
            for _ in 0..10 {
                let a = pick(&sel, &bs, &[0, 1, 2], &st, None, &req, &[]).unwrap();
                let b = pick(&sel, &bs, &[0, 1, 2], &st, None, &req, &[a]).unwrap();
                let c = pick(&sel, &bs, &[0, 1, 2], &st, None, &req, &[a, b]).unwrap();
                assert!(a != b && b != c && a != c, "{}", sel.name());
            }
        }
    }

    #[test]
    fn least_connections_prefers_idle_backends() {
        let bs = backends(&[1, 1, 1]);
        bs[0].state.in_flight.store(5, Ordering::Relaxed);
        bs[2].state.in_flight.store(1, Ordering::Relaxed);
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let st = ClusterState::default();
        for _ in 0..5 {
            assert_eq!(pick(&Selector::LeastConnections, &bs, &[0, 1, 2], &st, None, &req, &[]), Some(1));
        }
        let _ = Arc::new(BackendState::default());
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_little() {
        let bs = backends(&[1, 1, 1, 1]);
        let sel = Selector::build(
            &Selection::ConsistentHash(HashKey::Cookie("sid".into())),
            &bs,
            &[0, 1, 2, 3],
        );
        let st = ClusterState::default();
        let mut first = Vec::new();
        for u in 0..200 {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            req.insert_header("cookie", format!("a=1; sid=user{u}; b=2")).unwrap();
            let x = pick(&sel, &bs, &[0, 1, 2, 3], &st, None, &req, &[]).unwrap();
            assert_eq!(pick(&sel, &bs, &[0, 1, 2, 3], &st, None, &req, &[]).unwrap(), x);
            first.push(x);
        }
        // Drop backend 3: only its keys move.
        let sel2 = Selector::build(&Selection::ConsistentHash(HashKey::Cookie("sid".into())), &bs, &[0, 1, 2]);
        for (u, &x) in first.iter().enumerate() {
            let mut req = RequestHeader::build("GET", b"/", None).unwrap();
            req.insert_header("cookie", format!("sid=user{u}")).unwrap();
            let y = pick(&sel2, &bs, &[0, 1, 2], &st, None, &req, &[]).unwrap();
            if x != 3 {
                assert_eq!(x, y, "key user{u} moved although its backend stayed");
            }
        }
    }

    /// Picks of `n` requests per backend while backend 2 (of three) is
    /// `elapsed_ms` into a 1000 s ramp.
    fn ramp_counts(sel: &Selector, curve: crate::config::SlowStartCurve, elapsed_ms: u64, n: usize) -> Vec<usize> {
        let mut bs = backends(&[1, 1, 1]);
        let now = 10_000_000;
        // Backend 2 joined `elapsed_ms` ago.
        let from = now - elapsed_ms;
        bs[2].ramp_from_ms = from;
        let ss = SlowStart { window: std::time::Duration::from_secs(1000), curve };
        let st = ClusterState::default();
        st.ramp_until_ms.store(from + 1_000_000, Ordering::Relaxed);
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        let mut c = vec![0; 3];
        for _ in 0..n {
            c[pick_at(|| now, sel, &bs, &[0, 1, 2], &st, Some(&ss), &req, &[]).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn slow_start_ramps_a_joining_backend() {
        use crate::config::SlowStartCurve::*;
        let bs = backends(&[1, 1, 1]);
        let n = 30_000;
        // The ramping backend's requests relative to a full-share backend's.
        let ratio = |c: &[usize]| c[2] as f64 / ((c[0] + c[1]) as f64 / 2.0);
        for sel in [Selector::RoundRobin, Selector::LeastConnections, Selector::Weighted(smooth_wrr(&bs, &[0, 1, 2]))] {
            // A quarter into the window: linear 25 % of a full share, aggressive 50 %.
            // Tolerance 0.05 (the binomial's sigma here is ~0.01).
            for (curve, expect) in [(Linear, 0.25), (Aggressive, 0.5)] {
                let c = ramp_counts(&sel, curve, 250_000, n);
                let got = ratio(&c);
                // Least connections passes a ramping backend over, when it
                // would be picked (here a third of the time), with
                // probability 1 - share: it gets share/3 of all requests.
                let expect = if matches!(sel, Selector::LeastConnections) { 2.0 * expect / (3.0 - expect) } else { expect };
                assert!((got - expect).abs() < 0.05, "{} {curve:?}: share {got:.3}, want {expect} ({c:?})", sel.name());
                // In turn, the others share what it leaves evenly (least
                // connections gives it to the least loaded: here, all idle,
                // the next in the scan).
                if !matches!(sel, Selector::LeastConnections) {
                    assert!((c[0] as i64 - c[1] as i64).abs() < (n / 50) as i64, "{}: {c:?}", sel.name());
                }
            }
            // At the very start the floor of 1/16 holds.
            let got = ratio(&ramp_counts(&sel, Linear, 0, n));
            let floor = if matches!(sel, Selector::LeastConnections) { 0.125 / (3.0 - 0.0625) } else { 0.0625 };
            assert!((got - floor).abs() < 0.03, "{}: {got:.3}", sel.name());
        }
    }

    #[test]
    fn slow_start_ends_and_a_lone_backend_still_serves() {
        let bs = backends(&[1]);
        let st = ClusterState::default();
        let ss = SlowStart { window: std::time::Duration::from_secs(1000), curve: crate::config::SlowStartCurve::Linear };
        st.ramp_until_ms.store(crate::routing::process_millis() + 1_000_000, Ordering::Relaxed);
        let mut b = bs;
        b[0].ramp_from_ms = crate::routing::process_millis();
        let req = RequestHeader::build("GET", b"/", None).unwrap();
        for _ in 0..100 {
            assert_eq!(pick(&Selector::RoundRobin, &b, &[0], &st, Some(&ss), &req, &[]), Some(0));
        }
        // Past its end, the cluster's ramp clock is reset (no more clock reads).
        st.ramp_until_ms.store(1, Ordering::Relaxed);
        pick(&Selector::RoundRobin, &b, &[0], &st, Some(&ss), &req, &[]);
        assert_eq!(st.ramp_until_ms.load(Ordering::Relaxed), 0);
    }
}
