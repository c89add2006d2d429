//! Active health checks and slow start, through both request paths, against
//! real HTTP backends whose `/healthz` answer the test controls.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::*;

/// A backend's `/status` entry, by address.
fn backend(p: &Proxy, addr: SocketAddr) -> Option<serde_json::Value> {
    let st = p.status();
    st["clusters"][0]["backends"].as_array()?.iter().find(|b| b["address"] == addr.to_string().as_str()).cloned()
}

fn health_of(p: &Proxy, addr: SocketAddr) -> String {
    backend(p, addr).map(|b| b["health"].as_str().unwrap_or("null").to_string()).unwrap_or_else(|| "absent".into())
}

/// Which backend answered each of `n` requests (by the name it answers with).
fn spread(p: &Proxy, n: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let (status, body) = p.fetch("/");
        assert_eq!(status, 200, "{body}");
        *out.entry(body).or_insert(0) += 1;
    }
    out
}

/// Checks every 300 ms; a check answered after 300 ms fails (generous on a
/// loaded machine: a passing backend that failed two in a row would make a
/// test's pool fail open).
const CHECK: &str = "health_check = { path = \"/healthz\", interval = \"300ms\", timeout = \"300ms\", healthy_threshold = 2, unhealthy_threshold = 2 }\nretries = 0\noutlier = false\n";
/// Slow repeats: only the first check of each backend matters.
const FIRST_CHECK: &str = "health_check = { path = \"/healthz\", interval = \"2s\", timeout = \"2s\", healthy_threshold = 2, unhealthy_threshold = 2 }\nretries = 0\noutlier = false\n";

#[test]
fn a_failing_health_check_takes_a_backend_out_and_back() {
    for (path, server) in PATHS {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let body = format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[a.addr, b.addr], CHECK));
        let p = Proxy::builder(&body).server(server).start();
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, a.addr) == "passing" && health_of(&p, b.addr) == "passing"), "{path}: {}", p.status());
        let load = Load::start(p.url("/"), 100_000, Duration::from_secs(30));
        // (The load shares the round-robin turn, so count at the backends.)
        let b_hits = b.hits();
        assert!(wait_until(Duration::from_secs(5), || b.hits() > b_hits + 10), "{path}");

        // b's checks fail: out after two failed checks, no request lost.
        b.set_health(503);
        let failing_at = Instant::now();
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, b.addr) == "failing"), "{path}: {}", p.status());
        let took = failing_at.elapsed();
        assert!(took >= Duration::from_millis(250), "{path}: out after {took:?}, before two checks could fail");
        let b_hits = b.hits();
        let only_a = spread(&p, 40);
        assert_eq!(only_a.get("a"), Some(&40), "{path}: {only_a:?}");
        assert_eq!(b.hits(), b_hits, "{path}: b served the load while failing");
        let bk = backend(&p, b.addr).unwrap();
        assert_eq!(bk["state"], "unhealthy", "{path}: {bk}");
        let m = parse_metrics(&p.metrics());
        assert_eq!(sample(&m, "switchyard_backend_health", &[("cluster", "web"), ("backend", &b.addr.to_string())]), Some(0.0));
        assert_eq!(sample(&m, "switchyard_backends", &[("cluster", "web"), ("state", "unhealthy")]), Some(1.0));
        assert!(sample(&m, "switchyard_health_checks_total", &[("cluster", "web"), ("result", "fail")]).unwrap_or(0.0) >= 2.0);
        assert!(p.stderr().contains("health check failing"), "{path}");

        // Healthy again: back after two passed checks.
        b.set_health(200);
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, b.addr) == "passing"), "{path}: {}", p.status());
        let b_hits = b.hits();
        assert!(wait_until(Duration::from_secs(5), || b.hits() > b_hits + 10), "{path}: b gets no traffic back");
        let rep = load.finish();
        assert_eq!(rep.failed, 0, "{path}: {:?}", rep.failures);
        assert!(rep.ok > 0);
        // The checks went to /healthz, never counted as traffic.
        // pass, fail, fail, pass, pass at least.
        assert!(b.health_hits() >= 5, "{path}: {}", b.health_hits());
    }
}

#[test]
fn a_new_backend_waits_for_its_first_check_and_a_dead_one_never_gets_traffic() {
    for (path, server) in PATHS {
        let a = Upstream::start("a");
        let dead = dead_addr();
        let cluster = format!("[[routes]]\ncluster = \"web\"\n[clusters.web]\nfile = {{ catalog = \"catalog.json\" }}\nconnect_timeout = \"200ms\"\n{FIRST_CHECK}");
        let p = Proxy::builder(&cluster).server(server).file("catalog.json", &catalog_json(&[("web", vec![(a.addr, 1)])])).start();
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, a.addr) == "passing"), "{path}: {}", p.status());
        // With no retries and no passive ejection, any request sent to the
        // dead backend would fail: none may.
        let load = Load::start(p.url("/"), 100_000, Duration::from_secs(30));
        write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![(a.addr, 1), (dead, 1)])]));
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, dead) == "failing"), "{path}: {}", p.status());
        let before = load.count();
        assert!(wait_until(Duration::from_secs(5), || load.count() > before + 50));
        let rep = load.finish();
        assert_eq!(rep.failed, 0, "{path}: {:?}", rep.failures);
        let log = p.stderr();
        assert!(log.contains("health check failing") && log.contains(&dead.to_string()), "{path}: {log}");
    }
}

#[test]
fn when_every_check_fails_the_cluster_fails_open() {
    for (path, server) in PATHS {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        a.set_health(500);
        b.set_health(500);
        let body = format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[a.addr, b.addr], CHECK));
        let p = Proxy::builder(&body).server(server).start();
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, a.addr) == "failing" && health_of(&p, b.addr) == "failing"), "{path}: {}", p.status());
        assert_eq!(p.status()["clusters"][0]["health_failopen"], true, "{path}");
        let both = spread(&p, 40);
        assert_eq!((both.get("a"), both.get("b")), (Some(&20), Some(&20)), "{path}: {both:?}");
        assert!(wait_until(Duration::from_secs(2), || p.stderr().contains("fail open")), "{path}");
        // One passes again: only it serves.
        a.set_health(200);
        assert!(wait_until(Duration::from_secs(5), || p.status()["clusters"][0]["health_failopen"] == false), "{path}");
        let one = spread(&p, 20);
        assert_eq!(one.get("a"), Some(&20), "{path}: {one:?}");
    }
}

#[test]
fn health_check_config_errors_name_the_field() {
    let cases = [
        ("health_check = { path = \"healthz\" }", "clusters.web.health_check.path"),
        ("health_check = { expect = [\"200-99\"] }", "clusters.web.health_check.expect[0]"),
        ("health_check = { expect = [\"700\"] }", "clusters.web.health_check.expect[0]"),
        ("health_check = { interval = \"1s\", timeout = \"5s\" }", "clusters.web.health_check.timeout"),
        ("health_check = { unhealthy_threshold = 0 }", "clusters.web.health_check.unhealthy_threshold"),
        ("health_check = { intervall = \"1s\" }", "intervall"),
        ("slow_start = \"soon\"", "clusters.web.slow_start.window"),
        ("slow_start = { window = \"10s\", curve = \"steep\" }", "clusters.web.slow_start.curve"),
        ("slow_start = \"10s\"\nselection = \"consistent_hash\"\nhash_header = \"x-user\"", "clusters.web.slow_start"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (line, field) in cases {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, format!("[[listeners]]\naddress = \"127.0.0.1:0\"\n[[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"127.0.0.1:9\"]\n{line}\n")).unwrap();
        let out = std::process::Command::new(bin()).args(["check", "--config"]).arg(&cfg).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{line}: accepted");
        assert!(err.contains(field), "{line}: error does not name {field}: {err}");
    }
}

/// Share of requests (of those in `window`) that `name` answered, sampled
/// with one request at a time.
fn share_during(p: &Proxy, name: &str, window: Duration) -> (f64, usize) {
    let end = Instant::now() + window;
    let (mut hit, mut all) = (0usize, 0usize);
    while Instant::now() < end && all < 20_000 {
        let (status, body) = p.fetch("/");
        assert_eq!(status, 200);
        all += 1;
        hit += (body == name) as usize;
    }
    (hit as f64 / all.max(1) as f64, all)
}

#[test]
fn slow_start_ramps_a_joining_backend_share() {
    for (path, server) in PATHS {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let cluster = "[[routes]]\ncluster = \"web\"\n[clusters.web]\nfile = { catalog = \"catalog.json\" }\nslow_start = \"6s\"\n";
        let p = Proxy::builder(cluster).server(server).file("catalog.json", &catalog_json(&[("web", vec![(a.addr, 1)])])).start();
        assert_eq!(spread(&p, 5).get("a"), Some(&5));
        write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![(a.addr, 1), (b.addr, 1)])]));
        assert!(wait_until(Duration::from_secs(5), || backend(&p, b.addr).is_some()), "{path}");
        let s = backend(&p, b.addr).unwrap()["slow_start_share"].as_f64();
        assert!(s.is_some_and(|s| s > 0.0 && s < 0.3), "{path}: slow_start_share {s:?} just after joining");
        // Linear over 6 s with two backends: b's share of all requests grows
        // from ~3 % to 50 %; in the first 1.5 s it averages under 10 %.
        let (early, n_early) = share_during(&p, "b", Duration::from_millis(1500));
        assert!(early < 0.2, "{path}: b took {early:.3} of {n_early} requests in its first 1.5 s");
        assert!(wait_until(Duration::from_secs(10), || backend(&p, b.addr).unwrap()["slow_start_share"].is_null()), "{path}");
        let (late, n_late) = share_during(&p, "b", Duration::from_millis(1000));
        assert!((late - 0.5).abs() < 0.1, "{path}: b took {late:.3} of {n_late} requests after its ramp");
        assert!(early < late - 0.2, "{path}: {early:.3} then {late:.3}");
    }
}

#[test]
fn with_consul_both_checks_must_pass() {
    use support::consul::{ConsulDouble, Instance};
    let consul = ConsulDouble::start();
    let ups: Vec<Upstream> = ["a", "b", "c"].iter().map(|n| Upstream::start(n)).collect();
    for (i, u) in ups.iter().enumerate() {
        consul.register(Instance::new(&format!("node-{i}"), &format!("web-{i}"), "web", &u.addr.ip().to_string(), u.addr.port()));
    }
    for (path, server) in PATHS {
        let body = format!(
            "[consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"50ms\"\n[consul.register]\nenabled = false\n\
             [[routes]]\ncluster = \"web\"\n[clusters.web]\nconsul = {{ service = \"web\" }}\n{CHECK}",
            consul.addr
        );
        let p = Proxy::builder(&body).server(server).start();
        assert!(wait_until(Duration::from_secs(5), || ups.iter().all(|u| health_of(&p, u.addr) == "passing")), "{path}: {}", p.status());
        // b fails the proxy's own check, c fails Consul's: only a serves.
        ups[1].set_health(503);
        consul.set_health("node-2", "web-2", "critical");
        assert!(
            wait_until(Duration::from_secs(5), || health_of(&p, ups[1].addr) == "failing" && backend(&p, ups[2].addr).is_none()),
            "{path}: {}",
            p.status()
        );
        let only = spread(&p, 30);
        assert_eq!(only.get("a"), Some(&30), "{path}: {only:?}");
        // c passes Consul again and its active check still passes: back.
        consul.set_health("node-2", "web-2", "passing");
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, ups[2].addr) == "passing"), "{path}: {}", p.status());
        let two = spread(&p, 30);
        assert_eq!((two.get("a"), two.get("c"), two.get("b")), (Some(&15), Some(&15), None), "{path}: {two:?}");
        ups[1].set_health(200);
        assert!(wait_until(Duration::from_secs(5), || health_of(&p, ups[1].addr) == "passing"), "{path}");
    }
}
