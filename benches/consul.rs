//! End-to-end Consul benchmarks against the Consul double (not criterion:
//! these time a real proxy process).
//!
//! * propagation: from the Consul write to the first proxied request that
//!   reaches the new backend, p50/p99 over N changes;
//! * sustained churn: one service changing without pause (register, fail,
//!   pass, deregister; each next event 50-150 ms after the previous one shows
//!   in traffic): write -> first request at a new backend / last request at
//!   a removed one, p50/p99, and Consul reads per second meanwhile;
//! * scale: 1,000 routed services × 10 instances: time to ready, RSS, idle
//!   CPU over a quiet window, and the reconcile time of one service's change;
//! * KV propagation: from a `consul kv put` that moves a route to another
//!   cluster to the first request served by it, p50/p99;
//! * KV scale: 1,000 keys (500 clusters, 500 routes) under the prefix: time
//!   to ready, RSS, and write -> traffic for one key with all of them there.
//!
//! Run: `cargo bench --bench consul` (full) or with `SWITCHYARD_BENCH_QUICK=1`
//! (a few seconds; what CI runs so the harness keeps working).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};
use support::consul::{ConsulDouble, Instance};
use support::*;

fn quick() -> bool {
    std::env::var("SWITCHYARD_BENCH_QUICK").is_ok_and(|v| v != "0")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / ticks
}

fn histogram(p: &Proxy, name: &str) -> (f64, f64) {
    let m = parse_metrics(&p.metrics());
    (
        sample(&m, &format!("{name}_sum"), &[]).unwrap_or(0.0),
        sample(&m, &format!("{name}_count"), &[]).unwrap_or(0.0),
    )
}

fn propagation(changes: usize) {
    let consul = ConsulDouble::start();
    let ups = [Upstream::start("A"), Upstream::start("B")];
    let reg = |i: usize, id: &str| {
        let a = ups[i].addr;
        consul.register(Instance::new("node", id, "web", &a.ip().to_string(), a.port()));
    };
    reg(0, "web-0");
    let p = Proxy::start(&format!(
        "[consul]\naddresses = [\"{}\"]\n[consul.register]\nenabled = false\n\
         [[routes]]\ncluster = \"web\"\n[clusters.web]\nconsul = {{ service = \"web\" }}\n",
        consul.addr
    ));
    assert!(wait_until(Duration::from_secs(10), || p.fetch("/").0 == 200));
    let mut lat = Vec::with_capacity(changes);
    let mut current = 0usize;
    for c in 1..=changes {
        let next = 1 - current;
        let id = format!("web-{c}");
        let t0 = Instant::now();
        reg(next, &id);
        // Probe until the new backend answers.
        let deadline = t0 + Duration::from_secs(10);
        loop {
            let (code, body) = p.fetch("/");
            if code == 200 && body == ups[next].name() {
                break;
            }
            assert!(Instant::now() < deadline, "change {c} never propagated");
        }
        lat.push(t0.elapsed());
        // Remove the old instance and wait until it is gone (not timed).
        consul.deregister("node", &format!("web-{}", c - 1));
        assert!(wait_until(Duration::from_secs(10), || (0..4).all(|_| p.fetch("/").1 == ups[next].name())));
        current = next;
        // Isolated changes, 300 ms apart (sustained churn is measured below).
        std::thread::sleep(Duration::from_millis(300));
    }
    lat.sort();
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "propagation: {} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, mean {:.1} ms",
        lat.len(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3
    );
}

/// Probe until `gone` has not answered for 100 consecutive requests; returns
/// when its last answer arrived (zero if it never answered after t0).
fn last_answer_from(p: &Proxy, gone: &str, t0: Instant) -> Duration {
    let mut last = Duration::ZERO;
    let mut quiet = 0;
    let deadline = t0 + Duration::from_secs(10);
    while quiet < 100 {
        let (code, body) = p.fetch("/");
        assert_eq!(code, 200, "a request failed during churn");
        if body == gone {
            last = t0.elapsed();
            quiet = 0;
        } else {
            quiet += 1;
        }
        assert!(Instant::now() < deadline, "{gone} still answered 10 s after its removal");
    }
    last
}

/// Probe until `name` answers; returns when it did.
fn first_answer_from(p: &Proxy, name: &str, t0: Instant) -> Duration {
    loop {
        let (code, body) = p.fetch("/");
        assert_eq!(code, 200, "a request failed during churn");
        if body == name {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{name} never answered");
    }
}

fn sustained_churn(events: usize) {
    let consul = ConsulDouble::start();
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::start(&format!("u{i}"))).collect();
    let mut churn = Churn::start(&consul, &ups, vec![0, 1]);
    // Default pacing and wait: what a user gets.
    let p = Proxy::start(&format!(
        "[consul]\naddresses = [\"{}\"]\n[consul.register]\nenabled = false\n\
         [[routes]]\ncluster = \"web\"\n[clusters.web]\nconsul = {{ service = \"web\" }}\n",
        consul.addr
    ));
    assert!(wait_until(Duration::from_secs(10), || p.fetch("/").0 == 200));
    let reads = || consul.requests().iter().filter(|r| r.path == "/v1/health/service/web").count();
    let reads0 = reads();
    let started = Instant::now();
    let mut lat = Vec::with_capacity(events);
    for e in 0..events {
        let t0 = Instant::now();
        let (i, joined) = churn.step(e, &consul, &ups);
        lat.push(if joined { first_answer_from(&p, ups[i].name(), t0) } else { last_answer_from(&p, ups[i].name(), t0) });
        std::thread::sleep(Duration::from_millis(50 + (e as u64 * 37) % 101));
    }
    let secs = started.elapsed().as_secs_f64();
    let n = reads() - reads0;
    lat.sort();
    println!(
        "sustained churn: {} events in {secs:.1} s: write -> traffic p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         {n} Consul reads ({:.1}/s, {:.2} per event)",
        lat.len(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        n as f64 / secs,
        n as f64 / events as f64
    );
}

fn scale(services: usize, per: usize, idle_window: Duration) {
    let consul = ConsulDouble::start();
    let up = Upstream::start("s");
    let t_reg = Instant::now();
    for s in 0..services {
        for i in 0..per {
            // Distinct addresses; only instance 0 of each service is a live upstream.
            let (ip, port) = if i == 0 { ("127.0.0.1".to_string(), up.addr.port()) } else { (format!("127.0.{}.{}", 1 + s / 250, 1 + i), 10000 + (s % 250) as u16) };
            consul.register(Instance::new(&format!("node-{s}-{i}"), &format!("s{s}-{i}"), &format!("s{s}"), &ip, port));
        }
    }
    let reg_took = t_reg.elapsed();
    let mut body = format!("[consul]\naddresses = [\"{}\"]\nauto_routes = false\n[consul.register]\nenabled = false\n", consul.addr);
    for s in 0..services {
        body.push_str(&format!(
            "[[routes]]\nhosts = [\"s{s}.test\"]\ncluster = \"s{s}\"\n[clusters.s{s}]\nconsul = {{ service = \"s{s}\" }}\n"
        ));
    }
    let t0 = Instant::now();
    let p = Proxy::builder(&body).access_log("[access_log]\nenabled = false").start();
    let ready = || p.http.get(p.admin_url("/readyz")).send().map(|r| r.status() == 200).unwrap_or(false);
    assert!(wait_until(Duration::from_secs(120), ready), "not ready");
    let ready_took = t0.elapsed();
    let pid = p.pid();
    // Let the first burst of reads settle.
    std::thread::sleep(Duration::from_secs(3));
    let cpu0 = cpu_seconds(pid);
    let req0 = consul.requests().len();
    let w0 = Instant::now();
    std::thread::sleep(idle_window);
    let idle_cpu = (cpu_seconds(pid) - cpu0) / w0.elapsed().as_secs_f64() * 100.0;
    let idle_reqs: Vec<_> = consul.requests().into_iter().skip(req0).collect();
    let idle_reads = idle_reqs.len() as f64 / w0.elapsed().as_secs_f64();
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    for r in &idle_reqs {
        let kind = if r.path.starts_with("/v1/health/service/") { "/v1/health/service/*".to_string() } else { r.path.clone() };
        *by_kind.entry(format!("{kind}{}", if r.has_param("index") { " (blocking)" } else { "" })).or_default() += 1;
    }
    println!("scale: Consul requests in the idle window by endpoint: {by_kind:?}");
    let rss = rss_mib(pid);
    // One service's change: reconcile time from the build histogram.
    let (sum0, n0) = histogram(&p, "switchyard_routing_build_seconds");
    consul.set_health("node-0-1", "s0-1", "critical");
    assert!(wait_until(Duration::from_secs(10), || histogram(&p, "switchyard_routing_build_seconds").1 > n0));
    let (sum1, n1) = histogram(&p, "switchyard_routing_build_seconds");
    let publish_ms = (sum1 - sum0) / (n1 - n0) * 1e3;
    println!(
        "scale: {services} services x {per} instances: registered in {:.1} s; ready {:.2} s after start; RSS {rss:.1} MiB; \
         idle CPU {idle_cpu:.2} % of a core and {idle_reads:.1} Consul requests/s over {:.0} s; one change rebuilt+published in {publish_ms:.2} ms; max agent connections {}",
        reg_took.as_secs_f64(),
        ready_took.as_secs_f64(),
        idle_window.as_secs_f64(),
        consul.max_open_connections()
    );
}

fn kv_config(consul: &ConsulDouble, a: &Upstream, b: &Upstream) -> String {
    format!(
        "[consul]\naddresses = [\"{}\"]\nauto_routes = false\nkv = true\nmin_interval = \"20ms\"\n[consul.register]\nenabled = false\n\
         [[routes]]\nname = \"site\"\ncluster = \"a\"\n[clusters.a]\nstatic = [\"{}\"]\n[clusters.b]\nstatic = [\"{}\"]\n",
        consul.addr, a.addr, b.addr
    )
}

/// Write `routes/site/cluster` and time until a request reaches that cluster.
fn kv_flips(consul: &ConsulDouble, p: &Proxy, changes: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(changes);
    for c in 0..changes {
        let to = if c % 2 == 0 { "b" } else { "a" };
        let want = to.to_uppercase();
        let t0 = Instant::now();
        consul.kv_put("switchyard/routes/site/cluster", to.as_bytes());
        loop {
            let (code, body) = p.fetch("/");
            if code == 200 && body == want {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "KV change {c} never reached traffic");
        }
        lat.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    lat.sort();
    lat
}

fn kv_propagation(changes: usize) {
    let consul = ConsulDouble::start();
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let p = Proxy::start(&kv_config(&consul, &a, &b));
    assert!(wait_until(Duration::from_secs(10), || p.fetch("/") == (200, "A".into())));
    let lat = kv_flips(&consul, &p, changes);
    println!(
        "kv propagation: {} writes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3
    );
}

fn kv_scale(keys: usize, changes: usize) {
    let consul = ConsulDouble::start();
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    for i in 0..keys / 2 {
        consul.kv_put(&format!("switchyard/clusters/c{i}"), format!("static = [\"{}\"]", a.addr).as_bytes());
        consul.kv_put(&format!("switchyard/routes/r{i}"), format!("hosts = [\"r{i}.test\"]\ncluster = \"c{i}\"").as_bytes());
    }
    let t0 = Instant::now();
    let p = Proxy::builder(&kv_config(&consul, &a, &b)).access_log("[access_log]\nenabled = false").start();
    let ready = || p.http.get(p.admin_url("/readyz")).send().map(|r| r.status() == 200).unwrap_or(false);
    assert!(wait_until(Duration::from_secs(120), ready), "not ready");
    assert!(wait_until(Duration::from_secs(60), || p.status()["routes"].as_array().map(|r| r.len()) == Some(keys / 2 + 1)));
    let ready_took = t0.elapsed();
    let rss = rss_mib(p.pid());
    let lat = kv_flips(&consul, &p, changes);
    println!(
        "kv scale: {keys} keys: all applied {:.2} s after start; RSS {rss:.1} MiB; one write -> traffic p50 {:.1} ms, max {:.1} ms over {} writes",
        ready_took.as_secs_f64(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3,
        lat.len()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    if quick() {
        propagation(5);
        sustained_churn(8);
        scale(50, 10, Duration::from_secs(2));
        kv_propagation(5);
        kv_scale(100, 3);
    } else {
        propagation(120);
        sustained_churn(100);
        scale(1000, 10, Duration::from_secs(30));
        kv_propagation(200);
        kv_scale(1000, 20);
    }
}
