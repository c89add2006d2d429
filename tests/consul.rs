//! Consul discovery against the Consul double, with continuous client load:
//! churn moves traffic within a second and fails nothing; Consul outages,
//! index resets, hung watches and revoked tokens leave the last good set
//! serving; restarts during an outage serve the persisted set; panic mode
//! replaces an empty pool.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::consul::{ConsulDouble, Fault, Instance};
use support::*;

fn config(consul: &ConsulDouble, extra_consul: &str, cluster: &str) -> String {
    format!(
        "[consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"50ms\"\nstate_file = \"consul-state.json\"\n{extra_consul}\n\
         [[routes]]\ncluster = \"web\"\n\
         [clusters.web]\nconsul = {{ service = \"web\" {cluster} }}\nconnect_timeout = \"500ms\"\n",
        consul.addr
    )
}

fn reg(c: &ConsulDouble, u: &Upstream, id: &str) {
    let a = u.addr;
    c.register(Instance::new(&format!("node-{id}"), id, "web", &a.ip().to_string(), a.port()));
}

fn watch_errors(p: &Proxy, kind: &str) -> f64 {
    let m = parse_metrics(&p.metrics());
    sample(&m, "switchyard_consul_watch_errors_total", &[("service", "web"), ("kind", kind)]).unwrap_or(0.0)
}

#[test]
fn churn_moves_traffic_within_a_second_with_zero_failures() {
    let consul = ConsulDouble::start();
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::start(&format!("u{i}"))).collect();
    let mut churn = Churn::start(&consul, &ups, vec![0, 1]);
    let p = Proxy::start(&config(&consul, "", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
    let loads: Vec<Load> = (0..2).map(|_| Load::start(p.url("/"), 500_000, Duration::from_secs(90))).collect();
    // 60 events cycling through register, health flips and deregister.
    let mut worst = Duration::ZERO;
    for e in 0..60 {
        let prev = p.generation();
        churn.step(e, &consul, &ups);
        let allowed = churn.allowed(&ups);
        // What to print when an event is slow: the last health reads, and
        // the proxy's log (when each table was published).
        let diagnose = || {
            let tail: Vec<String> = consul
                .requests()
                .iter()
                .filter(|r| r.path.starts_with("/v1/health"))
                .rev()
                .take(6)
                .map(|r| format!("{} ?{} recv {:?} ago, answered {:?} ago, {:?}", r.path, r.query, r.received.elapsed(), r.answered.map(|a| a.elapsed()), r.status))
                .collect();
            let log = p.stderr();
            let log_tail: Vec<&str> = log.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
            format!("index now {}; recent reads:\n{}\nproxy log (last lines):\n{}", consul.index_of("web"), tail.join("\n"), log_tail.join("\n"))
        };
        let took = p.wait_for_set(prev, &allowed, Instant::now(), Duration::from_secs(3))
            .unwrap_or_else(|| panic!("event {e}: no new table within 3 s; {}", diagnose()));
        if took >= Duration::from_secs(1) {
            panic!("event {e} took {took:?}; {}", diagnose());
        }
        worst = worst.max(took);
    }
    assert!(wait_until(Duration::from_secs(30), || loads.iter().map(|l| l.count()).sum::<u64>() >= 2000));
    let reports: Vec<LoadReport> = loads.into_iter().map(|l| l.finish()).collect();
    let failed: u64 = reports.iter().map(|r| r.failed).sum();
    let ok: u64 = reports.iter().map(|r| r.ok).sum();
    eprintln!("60 churn events, worst propagation {worst:?}, {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{reports:?}");
    // The client never sends the token in the query string, and always blocks with an explicit wait.
    for r in consul.requests() {
        assert!(!r.query.contains("token="), "{}", r.query);
        if r.query.contains("index=") {
            assert!(r.query.contains("wait="), "blocking without wait: {}", r.query);
        }
    }
}

#[test]
fn consul_down_for_ten_seconds_fails_no_request() {
    let mut consul = ConsulDouble::start();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    reg(&consul, &a, "a");
    let p = Proxy::start(&config(&consul, "", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/") == (200, "a".into())));
    let load = Load::start(p.url("/"), 1_000_000, Duration::from_secs(60));
    consul.stop();
    let t0 = Instant::now();
    // Errors are seen and counted while the pool keeps serving.
    assert!(wait_until(Duration::from_secs(8), || watch_errors(&p, "connect") >= 1.0));
    let src = &p.status()["sources"]["consul:web"];
    assert_eq!(src["state"], "error");
    while t0.elapsed() < Duration::from_secs(10) {
        assert_eq!(p.fetch("/"), (200, "a".into()));
    }
    consul.restart();
    reg(&consul, &b, "b");
    let both: HashSet<&str> = ["a", "b"].into();
    // Recovery waits out the error backoff (capped): bounded, well under 20 s.
    let prev = p.generation();
    assert!(p.wait_for_set(prev, &both, Instant::now(), Duration::from_secs(20)).is_some(), "no recovery after Consul came back");
    let rep = load.finish();
    assert_eq!(rep.failed, 0, "{rep:?}");
    assert!(rep.ok > 100);
}

#[test]
fn restart_during_an_outage_serves_the_persisted_set() {
    let mut consul = ConsulDouble::start();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    reg(&consul, &a, "a");
    reg(&consul, &b, "b");
    let mut p = Proxy::start(&config(&consul, "", ""));
    let state = p.path("consul-state.json");
    assert!(wait_until(Duration::from_secs(5), || std::fs::read_to_string(&state)
        .map(|s| s.contains(&a.addr.port().to_string()) && s.contains(&b.addr.port().to_string()))
        .unwrap_or(false)));
    let cfg = std::fs::read_to_string(p.path("switchyard.toml")).unwrap();
    let saved = std::fs::read(&state).unwrap();
    p.signal(libc::SIGINT);
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
    consul.stop();
    // A new process, same config and state file, Consul unreachable.
    let body = cfg.split("[consul]").nth(1).map(|rest| format!("[consul]{rest}")).unwrap();
    let body = body.split("\n[[listeners]]").next().unwrap().to_string();
    let p2 = Proxy::builder(&body).file("consul-state.json", std::str::from_utf8(&saved).unwrap()).start();
    let mut seen = HashSet::new();
    for _ in 0..10 {
        let (code, body) = p2.fetch("/");
        assert_eq!(code, 200);
        seen.insert(body);
    }
    assert_eq!(seen, HashSet::from(["a".to_string(), "b".to_string()]));
    let r = p2.http.get(p2.admin_url("/readyz")).send().unwrap();
    assert_eq!(r.status(), 200, "a persisted set counts as ready");
    let v: serde_json::Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    assert_eq!(v["stale_clusters"], serde_json::json!(["web"]), "never synced with Consul: stale");
}

#[test]
fn index_going_backwards_recovers_with_one_non_blocking_read() {
    let consul = ConsulDouble::start();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    reg(&consul, &a, "a");
    let p = Proxy::start(&config(&consul, "", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/") == (200, "a".into())));
    let health = || -> Vec<support::consul::Recorded> {
        consul.requests().into_iter().filter(|r| r.path == "/v1/health/service/web").collect()
    };
    // Let the health watch settle into a held (blocking) read.
    let held = || health().into_iter().find(|r| r.has_param("index") && r.answered.is_none());
    assert!(wait_until(Duration::from_secs(5), || held().is_some()));
    let held_seq = held().unwrap().seq;
    consul.reset_indexes();
    assert!(wait_until(Duration::from_secs(5), || watch_errors(&p, "index_reset") >= 1.0));
    // The held read came back early with its old index (as Consul answers on
    // a restore). The first read after it carries no index (a probe that
    // finds the lower index); the next one blocks on the new index.
    let after = || -> Vec<support::consul::Recorded> { health().into_iter().filter(|r| r.seq > held_seq).collect() };
    assert!(wait_until(Duration::from_secs(5), || after().len() >= 2), "{:?}", after());
    let after = after();
    assert!(!after[0].has_param("index"), "after a reset the next read must not block: {}", after[0].query);
    let low = consul.index_of("web").max(1);
    assert_eq!(after[1].param("index"), Some(low.to_string()), "{}", after[1].query);
    // And the watch goes on: a change after the reset propagates.
    let prev = p.generation();
    reg(&consul, &b, "b");
    assert!(p.wait_for_set(prev, &["a", "b"].into(), Instant::now(), Duration::from_secs(3)).is_some());
}

#[test]
fn a_hung_watch_is_restarted() {
    let consul = ConsulDouble::start();
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    reg(&consul, &a, "a");
    let p = Proxy::start(&config(&consul, "", "").replace("wait = \"2s\"", "wait = \"1s\""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/") == (200, "a".into())));
    consul.fault(Fault::Hang);
    // wait 1 s × 17/16 + 2 s slack ≈ 3.1 s, then a timeout is counted.
    assert!(wait_until(Duration::from_secs(10), || watch_errors(&p, "timeout") >= 1.0));
    assert_eq!(p.fetch("/"), (200, "a".into()));
    consul.fault(Fault::None);
    let prev = p.generation();
    reg(&consul, &b, "b");
    assert!(p.wait_for_set(prev, &["a", "b"].into(), Instant::now(), Duration::from_secs(15)).is_some());
}

#[test]
fn a_revoked_token_keeps_serving_and_shows_the_error() {
    let consul = ConsulDouble::start();
    consul.require_token(Some("secret-1"));
    let a = Upstream::start("a");
    reg(&consul, &a, "a");
    let p = Proxy::start(&config(&consul, "token = \"secret-1\"", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/") == (200, "a".into())));
    consul.require_token(Some("secret-2"));
    assert!(wait_until(Duration::from_secs(10), || watch_errors(&p, "forbidden") >= 1.0));
    for _ in 0..20 {
        assert_eq!(p.fetch("/"), (200, "a".into()));
    }
    let st = p.status();
    let err = st["sources"]["consul:web"]["last_error"].as_str().unwrap();
    assert!(err.contains("403") && err.contains("ACL not found"), "{err}");
    assert!(p.stderr().contains("last good set stays in force"));
    for r in consul.requests() {
        assert!(!r.query.contains("token"), "token in query: {}", r.query);
    }
    assert!(consul.requests().iter().any(|r| r.headers.iter().any(|(k, v)| k == "x-consul-token" && v == "secret-1")));
}

#[test]
fn all_critical_triggers_panic_mode_not_an_empty_pool() {
    let consul = ConsulDouble::start();
    let ups: Vec<Upstream> = (0..3).map(|i| Upstream::start(&format!("p{i}"))).collect();
    for (i, u) in ups.iter().enumerate() {
        reg(&consul, u, &format!("p{i}"));
    }
    let p = Proxy::start(&config(&consul, "", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
    let panic_gauge = |p: &Proxy| sample(&parse_metrics(&p.metrics()), "switchyard_panic_mode", &[("cluster", "web")]);
    assert_eq!(panic_gauge(&p), Some(0.0));
    // Two of three critical: 33 % healthy < 50 % → panic, all three serve.
    let prev = p.generation();
    consul.set_health("node-p0", "p0", "critical");
    consul.set_health("node-p1", "p1", "critical");
    let all: HashSet<&str> = ["p0", "p1", "p2"].into();
    assert!(wait_until(Duration::from_secs(3), || panic_gauge(&p) == Some(1.0)));
    assert!(p.generation() >= prev);
    let mut seen = HashSet::new();
    for _ in 0..9 {
        let (code, body) = p.fetch("/");
        assert_eq!(code, 200);
        seen.insert(body);
    }
    assert_eq!(seen.iter().map(|s| s.as_str()).collect::<HashSet<_>>(), all);
    // All critical: still all three.
    consul.set_health("node-p2", "p2", "critical");
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..6 {
        assert_eq!(p.fetch("/").0, 200);
    }
    assert_eq!(p.status()["clusters"][0]["panic_mode"], true);
    assert!(p.stderr().contains("panic mode on"));
    // Recovery: two healthy of three → normal routing over the healthy two.
    let prev = p.generation();
    consul.set_health("node-p0", "p0", "passing");
    consul.set_health("node-p1", "p1", "passing");
    assert!(wait_until(Duration::from_secs(3), || panic_gauge(&p) == Some(0.0)));
    assert!(p.wait_for_set(prev, &["p0", "p1"].into(), Instant::now(), Duration::from_secs(3)).is_some());
    // Deregistering the whole service is the only way to an empty pool: 503.
    for i in 0..3 {
        consul.deregister(&format!("node-p{i}"), &format!("p{i}"));
    }
    assert!(wait_until(Duration::from_secs(3), || p.fetch("/").0 == 503));
}

#[test]
fn bad_answers_keep_the_last_good_set_and_bad_instances_are_skipped() {
    let consul = ConsulDouble::start();
    let a = Upstream::start("a");
    reg(&consul, &a, "a");
    let b = Upstream::start("b");
    reg(&consul, &b, "b");
    let p = Proxy::start(&config(&consul, "", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
    let mut flip = false;
    let mut nudge = || {
        // A real change, so the index moves and the watch reads the bad answer.
        flip = !flip;
        consul.set_health("node-b", "b", if flip { "critical" } else { "passing" });
    };
    for (fault, kind) in [(Fault::Garbage, "bad_body"), (Fault::Status(500), "server_error"), (Fault::Status(429), "rate_limited")] {
        let before = watch_errors(&p, kind);
        consul.fault(fault);
        nudge();
        assert!(wait_until(Duration::from_secs(10), || watch_errors(&p, kind) > before), "{kind} not counted");
        for _ in 0..10 {
            assert_eq!(p.fetch("/").0, 200, "{kind}: last good set must serve");
        }
        consul.fault(Fault::None);
    }
    consul.fault(Fault::WrongTypes);
    nudge();
    assert!(wait_until(Duration::from_secs(10), || {
        let m = parse_metrics(&p.metrics());
        m.iter().any(|(n, l, v)| n == "switchyard_consul_instances_skipped_total" && *v > 0.0 && l.iter().any(|(k, v)| k == "service" && v == "web"))
    }));
    for _ in 0..10 {
        assert_eq!(p.fetch("/").0, 200);
    }
}

#[test]
fn tagged_services_get_routes_that_follow_the_catalog() {
    let consul = ConsulDouble::start();
    let web = Upstream::start("web");
    let api = Upstream::start("api");
    let other = Upstream::start("other");
    reg(&consul, &web, "w1");
    // Only the configured `web` cluster at first; `api` and `other` arrive by tags.
    let p = Proxy::start(&config(&consul, "", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/") == (200, "web".into())));
    let get = |host: &str| {
        let r = p.http.get(p.url("/v1/x")).header("host", host).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    assert_eq!(get("api.example.com"), (200, "web".into()), "before registration: the any-host route");
    let t0 = Instant::now();
    consul.register(
        Instance::new("node-api", "api-1", "api", &api.addr.ip().to_string(), api.addr.port())
            .tags(&["switchyard.host=api.example.com", "switchyard.path=/v1", "switchyard.selection=least_connections"]),
    );
    assert!(wait_until(Duration::from_secs(3), || get("api.example.com") == (200, "api".into())));
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "auto route took {took:?}");
    assert_eq!(get("www.example.com"), (200, "web".into()), "other hosts unaffected");
    let st = p.status();
    let route = st["routes"].as_array().unwrap().iter().find(|r| r["name"] == "consul.api").cloned().unwrap();
    assert_eq!(route["hosts"][0], "api.example.com");
    assert_eq!(route["path_prefix"], "/v1");
    // A second tagged service with a malformed tag gets no route; the good one is untouched.
    consul.register(
        Instance::new("node-o", "o-1", "other", &other.addr.ip().to_string(), other.addr.port())
            .tags(&["switchyard.host=other.example.com", "switchyard.selection=fastest"]),
    );
    assert!(wait_until(Duration::from_secs(3), || p.status()["tag_errors"]["other"].is_string()));
    let err = p.status()["tag_errors"]["other"].as_str().unwrap().to_string();
    assert!(err.contains("fastest"), "{err}");
    let m = parse_metrics(&p.metrics());
    assert!(sample(&m, "switchyard_consul_tag_errors_total", &[("service", "other")]).unwrap_or(0.0) >= 1.0);
    assert_eq!(get("other.example.com"), (200, "web".into()), "no route from a bad tag set");
    assert_eq!(get("api.example.com"), (200, "api".into()));
    // A bad tag on a service that had a good route keeps its last good route.
    consul.register(
        Instance::new("node-api", "api-1", "api", &api.addr.ip().to_string(), api.addr.port())
            .tags(&["switchyard.host=api.example.com", "switchyard.path=/v1", "switchyard.retries=many"]),
    );
    assert!(wait_until(Duration::from_secs(3), || p.status()["tag_errors"]["api"].is_string()));
    assert_eq!(get("api.example.com"), (200, "api".into()), "last good route stays");
    assert!(p.stderr().contains("keeps its last good route"));
    // Deregistration removes the route.
    consul.deregister("node-api", "api-1");
    assert!(wait_until(Duration::from_secs(3), || get("api.example.com") == (200, "web".into())));
}

#[test]
fn many_services_stay_within_the_connection_budget() {
    let consul = ConsulDouble::start();
    let up = Upstream::start("s");
    let n = 40;
    let mut body = format!(
        "[consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"50ms\"\nmax_watches = 8\nauto_routes = false\n",
        consul.addr
    );
    for i in 0..n {
        consul.register(Instance::new(&format!("n{i}"), &format!("s{i}-1"), &format!("s{i}"), "127.0.0.1", up.addr.port()));
        body.push_str(&format!(
            "[[routes]]\nhosts = [\"s{i}.test\"]\ncluster = \"s{i}\"\n[clusters.s{i}]\nconsul = {{ service = \"s{i}\" }}\n"
        ));
    }
    let p = Proxy::start(&body);
    let ready = || p.http.get(p.admin_url("/readyz")).send().map(|r| r.status() == 200).unwrap_or(false);
    assert!(wait_until(Duration::from_secs(10), ready));
    for i in 0..n {
        let r = p.http.get(p.url("/")).header("host", format!("s{i}.test")).send().unwrap();
        assert_eq!(r.status(), 200, "s{i}");
    }
    // max_watches is the whole budget: 4 blocking watches + 4 short-read
    // permits bound the requests in flight at any moment...
    let mut events: Vec<(Instant, i32)> = Vec::new();
    for r in consul.requests() {
        events.push((r.received, 1));
        if let Some(a) = r.answered {
            events.push((a, -1));
        }
    }
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut peak) = (0, 0);
    for (_, d) in events {
        cur += d;
        peak = peak.max(cur);
    }
    assert!(peak <= 8, "{peak} requests in flight at once");
    // ...and, with no idle pool, the connections; the double counts one as
    // open until it sees the close, so a few may be in teardown.
    assert!(consul.max_open_connections() <= 8 + 4, "max open connections {}", consul.max_open_connections());
    // A change propagates fast both for a service with its own blocking watch
    // and for one beyond the budget (poked by the datacenter-wide check signal).
    let up2 = Upstream::start("new");
    for s in ["s0", "s39"] {
        let t0 = Instant::now();
        consul.register(Instance::new(&format!("{s}-b"), &format!("{s}-2"), s, "127.0.0.1", up2.addr.port()));
        assert!(wait_until(Duration::from_secs(3), || {
            (0..4).any(|_| p.http.get(p.url("/")).header("host", format!("{s}.test")).send().unwrap().text().unwrap() == "new")
        }));
        assert!(t0.elapsed() < Duration::from_secs(1), "{s}: {:?}", t0.elapsed());
    }
    // Only the changed service was re-read: a change to s39 does not make the
    // other triggered services read again.
    let before: usize = consul.requests().iter().filter(|r| r.path == "/v1/health/service/s38").count();
    consul.set_health("s39-b", "s39-2", "critical");
    assert!(wait_until(Duration::from_secs(3), || {
        (0..8).all(|_| p.http.get(p.url("/")).header("host", "s39.test").send().unwrap().text().unwrap() == "s")
    }));
    let after: usize = consul.requests().iter().filter(|r| r.path == "/v1/health/service/s38").count();
    assert_eq!(before, after, "an unrelated triggered service was re-read");
}

#[test]
fn registers_itself_keeps_the_check_passing_and_leaves_cleanly() {
    let consul = ConsulDouble::start();
    let a = Upstream::start("a");
    reg(&consul, &a, "a");
    let mut p = Proxy::start(&config(
        &consul,
        "[consul.register]\nname = \"edge\"\nid = \"edge-1\"\ntags = [\"lb\"]\nttl = \"2s\"\n",
        "",
    ));
    let ours = |consul: &ConsulDouble| consul.agent_services().into_iter().find(|s| s["ID"] == "edge-1");
    let check_status = |consul: &ConsulDouble| ours(consul).and_then(|s| s["Checks"][0]["Status"].as_str().map(str::to_string));
    assert!(wait_until(Duration::from_secs(5), || check_status(&consul).as_deref() == Some("passing")));
    let s = ours(&consul).unwrap();
    assert_eq!(s["Service"], "edge");
    assert_eq!(s["Port"], p.addr.port());
    assert_eq!(s["Tags"][0], "lb");
    assert_eq!(s["Checks"][0]["CheckID"], "service:edge-1");
    assert!(s["Checks"][0]["Output"].as_str().unwrap().contains("ready"));
    // The agent restarts and forgets us: the next heartbeat gets 404 and registers again.
    consul.set_agent_restart();
    assert!(ours(&consul).is_none());
    assert!(wait_until(Duration::from_secs(5), || check_status(&consul).as_deref() == Some("passing")));
    assert!(p.stderr().contains("registering again"));
    // SIGTERM: maintenance first, then deregistration on exit.
    consul.clear_requests();
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(8)), Some(0));
    assert!(ours(&consul).is_none(), "deregistered on exit");
    let writes: Vec<String> = consul
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.path)
        .collect();
    let maint = writes.iter().position(|p| p == "/v1/agent/service/maintenance/edge-1");
    let dereg = writes.iter().position(|p| p == "/v1/agent/service/deregister/edge-1");
    assert!(maint.is_some() && dereg.is_some() && maint < dereg, "{writes:?}");
}

#[test]
fn talks_to_the_agent_over_mutual_tls_with_a_server_name() {
    let consul = ConsulDouble::start();
    let dir = tempfile::tempdir().unwrap();
    let (front, files) = support::tls::start(consul.addr, "consul.test", true, dir.path());
    let a = Upstream::start("a");
    reg(&consul, &a, "a");
    let body = format!(
        "[consul]\naddresses = [\"https://{}\"]\nwait = \"2s\"\n\
         tls = {{ ca_file = \"{}\", cert_file = \"{}\", key_file = \"{}\", server_name = \"consul.test\" }}\n\
         [consul.register]\nenabled = false\n\
         [[routes]]\ncluster = \"web\"\n[clusters.web]\nconsul = {{ service = \"web\" }}\n",
        front.addr,
        files.ca.display(),
        files.client_cert.display(),
        files.client_key.display()
    );
    let p = Proxy::start(&body);
    assert!(wait_until(Duration::from_secs(10), || p.fetch("/") == (200, "a".into())), "{}", p.stderr());
    assert!(consul.requests().iter().any(|r| r.path == "/v1/health/service/web"));
    // Without the client certificate the handshake fails: errors, no backends.
    let no_cert = body.replace(&format!("cert_file = \"{}\", key_file = \"{}\", ", files.client_cert.display(), files.client_key.display()), "");
    let p2 = Proxy::start(&no_cert);
    assert!(wait_until(Duration::from_secs(10), || watch_errors(&p2, "connect") >= 1.0));
    assert_eq!(p2.fetch("/").0, 503, "never reached Consul: no backends");
}

#[test]
fn staleness_counts_only_real_loss_of_contact() {
    let mut consul = ConsulDouble::start();
    let a = Upstream::start("a");
    reg(&consul, &a, "a");
    let p = Proxy::start(&config(&consul, "stale_after = \"1s\"", ""));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/") == (200, "a".into())));
    let readyz = |p: &Proxy| -> serde_json::Value {
        serde_json::from_str(&p.http.get(p.admin_url("/readyz")).send().unwrap().text().unwrap()).unwrap()
    };
    let staleness = |p: &Proxy| sample(&parse_metrics(&p.metrics()), "switchyard_discovery_staleness_seconds", &[("service", "web")]);
    // A quiet service behind a held blocking read is current, not stale, even
    // though no answer arrives for a whole `wait` (2 s here, bound 1 s).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(readyz(&p)["stale_clusters"], serde_json::json!([]), "quiet but connected is not stale");
        assert!(staleness(&p).unwrap_or(0.0) < 1.5);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Losing Consul makes it stale within the bound (plus the 1 s ticker).
    consul.stop();
    assert!(wait_until(Duration::from_secs(5), || readyz(&p)["stale_clusters"] == serde_json::json!(["web"])));
    assert!(wait_until(Duration::from_secs(3), || staleness(&p).unwrap_or(0.0) >= 1.0));
    assert_eq!(readyz(&p)["ready"], true, "stale is reported, not a reason to be unready");
}

// ------------------------------------------------ freshness: churn and restores

/// The default pacing and the default `wait`: nothing tuned for the test.
fn default_config(consul: &ConsulDouble) -> String {
    format!(
        "[consul]\naddresses = [\"{}\"]\n\
         [[routes]]\ncluster = \"web\"\n\
         [clusters.web]\nconsul = {{ service = \"web\" }}\nconnect_timeout = \"500ms\"\n",
        consul.addr
    )
}

fn rewinds(p: &Proxy) -> f64 {
    sample(&parse_metrics(&p.metrics()), "switchyard_consul_index_rewinds_total", &[]).unwrap_or(0.0)
}

fn health_reads(consul: &ConsulDouble) -> Vec<support::consul::Recorded> {
    consul.requests().into_iter().filter(|r| r.path == "/v1/health/service/web").collect()
}

/// Poll the routing generation every millisecond (the 10 ms of `wait_until`
/// would be a tenth of the budget being measured).
fn time_to_new_table(p: &Proxy, prev: u64, since: Instant, limit: Duration) -> Option<Duration> {
    while since.elapsed() < limit {
        if p.generation() > prev {
            return Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

#[test]
fn sustained_churn_on_one_service_follows_every_change_within_100ms() {
    let consul = ConsulDouble::start();
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::start(&format!("u{i}"))).collect();
    let mut churn = Churn::start(&consul, &ups, vec![0, 1]);
    let p = Proxy::start(&default_config(&consul));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
    let loads: Vec<Load> = (0..2).map(|_| Load::start(p.url("/"), 1_000_000, Duration::from_secs(120))).collect();
    let reads_before = health_reads(&consul).len();
    let started = Instant::now();
    let mut took = Vec::new();
    let events = 100;
    for e in 0..events {
        let prev = p.generation();
        let t0 = Instant::now();
        // Register, fail, pass, deregister: each a real change of the set.
        churn.step(e, &consul, &ups);
        let t = time_to_new_table(&p, prev, t0, Duration::from_secs(3)).unwrap_or_else(|| panic!("event {e}: no new table within 3 s"));
        took.push(t);
        // The new table carries the traffic: every request lands on the live set.
        let allowed = churn.allowed(&ups);
        for _ in 0..4 {
            let (code, body) = p.fetch("/");
            assert_eq!(code, 200);
            assert!(allowed.contains(body.as_str()), "event {e}: {body} answered; allowed {allowed:?}");
        }
        // The next event 50-150 ms after this one shows, as in a rolling deploy.
        std::thread::sleep(Duration::from_millis(50 + (e as u64 * 37) % 101));
    }
    let elapsed = started.elapsed();
    let reads = health_reads(&consul).len() - reads_before;
    let reports: Vec<LoadReport> = loads.into_iter().map(|l| l.finish()).collect();
    let failed: u64 = reports.iter().map(|r| r.failed).sum();
    let ok: u64 = reports.iter().map(|r| r.ok).sum();
    took.sort();
    let pct = |q: f64| took[((q * events as f64).ceil() as usize).clamp(1, events) - 1];
    eprintln!(
        "{events} events in {elapsed:?}: change -> table p50 {:?}, p99 {:?}, max {:?}; {reads} health reads ({:.1}/s, {:.2} per event); {ok} ok, {failed} failed",
        pct(0.5),
        pct(0.99),
        took[events - 1],
        reads as f64 / elapsed.as_secs_f64(),
        reads as f64 / events as f64
    );
    assert_eq!(failed, 0, "{reports:?}");
    assert!(ok > 1000, "the load ran: {ok}");
    assert!(pct(0.99) < Duration::from_millis(100), "p99 {:?}; all: {took:?}", pct(0.99));
    // Consul's load stays bounded: a blocking read per change plus at most
    // one probe per change (and one for the first read).
    assert!(reads <= 2 * events + 4, "{reads} reads for {events} changes");
}

/// Raise the service index with output-only changes (as check output churn
/// does), then wait until the watch is held on the current index.
fn raise_index_and_hold(consul: &ConsulDouble, to: u64) {
    let mut n = 0;
    while consul.index_of("web") < to {
        n += 1;
        assert!(n < 500, "output changes do not move the index");
        consul.set_check_output("node-a", "a", &format!("HTTP GET: 200 OK ({n})"));
    }
    let cur = consul.index_of("web").to_string();
    assert!(
        wait_until(Duration::from_secs(10), || health_reads(consul)
            .iter()
            .any(|r| r.answered.is_none() && r.param("index").as_deref() == Some(cur.as_str()))),
        "the watch never blocked on index {cur}"
    );
}

/// After a rewind, a new instance carries traffic within 2 s.
fn new_instance_gets_traffic_within_2s(consul: &ConsulDouble, p: &Proxy, b: &Upstream) -> Duration {
    let load = Load::start(p.url("/"), 1_000_000, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    reg(consul, b, "b");
    let seen = wait_until(Duration::from_secs(2), || b.hits() > 0);
    let took = t0.elapsed();
    let report = load.finish();
    let reads: Vec<String> = health_reads(consul).iter().rev().take(6).map(|r| format!("?{} answered {:?}", r.query, r.answered.map(|a| a.elapsed()))).collect();
    assert!(seen, "the instance registered after the rewind got no traffic within 2 s; index now {}; last reads (newest first): {reads:#?}", consul.index_of("web"));
    assert_eq!(report.failed, 0, "{report:?}");
    took
}

/// Consul with instance `a`, a proxy with default settings serving it, and a
/// spare upstream `b`.
fn serving_a() -> (ConsulDouble, Upstream, Upstream, Proxy) {
    let consul = ConsulDouble::start();
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    reg(&consul, &a, "a");
    let p = Proxy::start(&default_config(&consul));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/") == (200, "a".into())));
    (consul, a, b, p)
}

#[test]
fn a_restore_while_the_watch_is_blocked_is_seen_at_once() {
    let (consul, _a, b, p) = serving_a();
    raise_index_and_hold(&consul, 60);
    consul.reset_indexes();
    let took = new_instance_gets_traffic_within_2s(&consul, &p, &b);
    eprintln!("restore while blocked: new instance served {took:?} after its registration");
    // One log line and one count for the whole process.
    assert!(wait_until(Duration::from_secs(2), || rewinds(&p) == 1.0), "rewinds {}", rewinds(&p));
    assert_eq!(p.stderr().matches("Consul indexes went backwards").count(), 1, "{}", p.stderr());
}

#[test]
fn a_restore_while_the_watch_is_paced_is_seen_at_once() {
    let (consul, _a, b, p) = serving_a();
    // Output-only churn empties the no-op bucket: the watch now pauses about
    // a second between reads. Restore while no read is in flight.
    let mut paused_at = None;
    for n in 0..400 {
        consul.set_check_output("node-a", "a", &format!("HTTP GET: 200 OK ({n})"));
        std::thread::sleep(Duration::from_millis(10));
        let reads = health_reads(&consul);
        if n > 20 && reads.iter().all(|r| r.answered.is_some()) {
            consul.reset_indexes();
            paused_at = Some(reads.last().unwrap().seq);
            break;
        }
    }
    let last_before = paused_at.expect("the watch never paused under index-only churn");
    assert!(consul.index_of("web") < 60, "restored");
    new_instance_gets_traffic_within_2s(&consul, &p, &b);
    // The read after the pause was a probe (no index): it cannot be held on
    // the pre-restore index.
    let after: Vec<_> = health_reads(&consul).into_iter().filter(|r| r.seq > last_before).collect();
    assert!(!after.is_empty() && !after[0].has_param("index"), "first read after the pause: {:?}", after.first().map(|r| &r.query));
}

#[test]
fn a_restore_while_the_watch_backs_off_is_seen_when_consul_answers_again() {
    let (consul, _a, b, p) = serving_a();
    raise_index_and_hold(&consul, 60);
    // 500s until the fifth failure in a row: the watch now backs off for
    // 4-8 s, longer than the 2.5 s this test allows from here.
    consul.fault(Fault::Status(500));
    assert!(wait_until(Duration::from_secs(15), || watch_errors(&p, "server_error") >= 5.0));
    consul.reset_indexes();
    consul.fault(Fault::None);
    let took = new_instance_gets_traffic_within_2s(&consul, &p, &b);
    eprintln!("restore while backing off: new instance served {took:?} after its registration");
    let m = parse_metrics(&p.metrics());
    assert!(sample(&m, "switchyard_consul_recovery_wakes_total", &[]).unwrap_or(0.0) >= 1.0, "the prober woke the watch");
}

#[test]
fn a_wiped_and_re_registered_catalog_is_seen_at_once() {
    let (consul, a, b, p) = serving_a();
    raise_index_and_hold(&consul, 60);
    consul.wipe();
    reg(&consul, &a, "a");
    new_instance_gets_traffic_within_2s(&consul, &p, &b);
    assert!(wait_until(Duration::from_secs(2), || rewinds(&p) == 1.0), "rewinds {}", rewinds(&p));
}
