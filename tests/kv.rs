//! Consul KV settings (README "Settings in Consul KV") against the Consul
//! double, under continuous load: keys reach traffic within a second on
//! every node, an invalid key is rejected alone and shown in `/status`, a
//! deleted key reverts to the file, a drain loses no request, and a KV
//! outage (or a restart during one) keeps the last good settings.

mod support;

use std::time::{Duration, Instant};
use support::consul::{ConsulDouble, Fault};
use support::*;

fn body(consul: &ConsulDouble, a: &Upstream, b: &Upstream) -> String {
    format!(
        "[consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"20ms\"\nauto_routes = false\nkv = true\nstate_file = \"consul-state.json\"\n\
         register = {{ enabled = false }}\n\
         [[routes]]\nname = \"site\"\ncluster = \"web\"\n\
         [clusters.web]\nstatic = [\"{}\", \"{}\"]\n",
        consul.addr, a.addr, b.addr
    )
}

fn who(p: &Proxy, path: &str) -> String {
    match p.fetch(path) {
        (200, body) => body,
        (code, _) => format!("status {code}"),
    }
}

fn kv_errors(p: &Proxy) -> Vec<(String, String, String)> {
    p.status()["kv_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap().into(), e["value"].as_str().unwrap().into(), e["message"].as_str().unwrap().into()))
        .collect()
}

fn rejected_gauge(p: &Proxy) -> Option<f64> {
    sample(&parse_metrics(&p.metrics()), "switchyard_kv_rejected_keys", &[])
}

#[test]
fn keys_apply_an_invalid_one_is_rejected_alone_and_a_deleted_one_reverts() {
    let consul = ConsulDouble::start();
    let (a, b, c) = (Upstream::start("a"), Upstream::start("b"), Upstream::start("c"));
    let p = Proxy::start(&body(&consul, &a, &b));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
    assert_eq!(p.status()["config"]["kv"]["keys"], 0, "an empty prefix is a valid, empty set");

    // A whole cluster and route from KV, a field override, and a bad key.
    consul.kv_put("switchyard/clusters/shop", format!("static = [\"{}\"]\nretries = 0", c.addr).as_bytes());
    consul.kv_put("switchyard/routes/shop", br#"{"path_prefix": "/shop/", "cluster": "shop"}"#);
    consul.kv_put("switchyard/clusters/web/connect_timeout", b"soon");
    consul.kv_put("switchyard/clusters/web/selection", b"least_connections");
    assert!(wait_until(Duration::from_secs(2), || who(&p, "/shop/x") == "c"), "{}", p.stderr());
    assert!(wait_until(Duration::from_secs(2), || p.status()["clusters"].as_array().unwrap().iter().any(|c| c["name"] == "web" && c["selection"] == "least_connections")));
    let errs = kv_errors(&p);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].0, "clusters/web/connect_timeout");
    assert_eq!(errs[0].1, "soon");
    assert!(errs[0].2.contains("clusters.web.connect_timeout"), "{errs:?}");
    assert_eq!(rejected_gauge(&p), Some(1.0));
    assert!(p.stderr().contains("consul KV key rejected"), "the rejection is logged");

    // Maintenance on a KV route, through KV.
    consul.kv_put("switchyard/maintenance/shop", b"body = \"soon back\"\nretry_after = \"7s\"");
    assert!(wait_until(Duration::from_secs(2), || p.fetch("/shop/x") == (503, "soon back".into())));
    let r = p.get("/shop/x");
    assert_eq!(r.headers()["retry-after"], "7");

    // Fixing the bad key clears the error; deleting keys reverts to the file.
    consul.kv_put("switchyard/clusters/web/connect_timeout", b"1s");
    assert!(wait_until(Duration::from_secs(2), || kv_errors(&p).is_empty()));
    assert_eq!(rejected_gauge(&p), Some(0.0));
    consul.kv_delete("switchyard/maintenance/shop");
    assert!(wait_until(Duration::from_secs(2), || who(&p, "/shop/x") == "c"));
    consul.kv_delete("switchyard/routes/shop");
    consul.kv_delete("switchyard/clusters/web/selection");
    assert!(wait_until(Duration::from_secs(2), || who(&p, "/shop/x") != "c"), "the KV route is gone");
    assert!(wait_until(Duration::from_secs(2), || p.status()["clusters"].as_array().unwrap().iter().any(|c| c["name"] == "web" && c["selection"] == "round_robin")), "the file's selection is back");
    // One recursive blocking query, nothing else, on the KV side.
    let kv_paths: std::collections::BTreeSet<String> = consul.requests().iter().filter(|r| r.path.starts_with("/v1/kv/")).map(|r| r.path.clone()).collect();
    assert_eq!(kv_paths.into_iter().collect::<Vec<_>>(), ["/v1/kv/switchyard/"]);
    assert!(consul.requests().iter().filter(|r| r.path == "/v1/kv/switchyard/").all(|r| r.query.contains("recurse")));
}

#[test]
fn a_drain_from_kv_loses_nothing_and_the_instance_gets_nothing_new_within_a_second() {
    for express in ["true", "false"] {
        let consul = ConsulDouble::start();
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let p = Proxy::builder(&body(&consul, &a, &b)).server(&format!("express = {express}")).start();
        assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
        let loads = [
            Load::start(p.url("/"), 1_000_000, Duration::from_secs(60)),
            Load::start_fresh(p.url("/"), 1_000_000, Duration::from_secs(60)),
        ];
        assert!(wait_until(Duration::from_secs(5), || a.hits() > 50 && b.hits() > 50));
        let written = Instant::now();
        consul.kv_put(&format!("switchyard/instances/web/{}", b.addr.to_string().replace(':', "_")), b"drain");
        // Within a second of the write, b's count stops moving.
        assert!(
            wait_until(Duration::from_secs(1), || p.status()["clusters"][0]["backends"].as_array().unwrap().iter().any(|x| x["address"] == b.addr.to_string().as_str() && x["state"] == "drained")),
            "express={express}: not drained within 1 s of the write"
        );
        let drained_at = written.elapsed();
        let settled = b.hits();
        let a_before = a.hits();
        assert!(wait_until(Duration::from_secs(5), || a.hits() > a_before + 300));
        // At most the requests already on their way to b when the table swapped.
        assert!(b.hits() <= settled + 2, "express={express}: b got {} new requests after the drain", b.hits() - settled);
        consul.kv_delete(&format!("switchyard/instances/web/{}", b.addr.to_string().replace(':', "_")));
        let b_before = b.hits();
        assert!(wait_until(Duration::from_secs(2), || b.hits() > b_before + 50), "express={express}: undrained");
        for l in loads {
            let r = l.finish();
            assert_eq!(r.failed, 0, "express={express}: {:?}", r.failures);
        }
        assert!(drained_at < Duration::from_secs(1), "{drained_at:?}");
    }
}

#[test]
fn two_nodes_follow_one_write_within_a_second() {
    let consul = ConsulDouble::start();
    let (a, b, c) = (Upstream::start("a"), Upstream::start("b"), Upstream::start("c"));
    let nodes = [Proxy::start(&body(&consul, &a, &b)), Proxy::start(&body(&consul, &a, &b))];
    for p in &nodes {
        assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
    }
    let loads: Vec<Load> = nodes.iter().map(|p| Load::start(p.url("/"), 1_000_000, Duration::from_secs(60))).collect();
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let written = Instant::now();
        consul.kv_put("switchyard/clusters/api", format!("static = [\"{}\"]", [&a, &b, &c][round % 3].addr).as_bytes());
        consul.kv_put("switchyard/routes/api", b"path_prefix = \"/api/\"\ncluster = \"api\"");
        let want = ["a", "b", "c"][round % 3];
        for p in &nodes {
            assert!(wait_until(Duration::from_secs(5), || who(p, "/api/x") == want), "round {round}: {}", who(p, "/api/x"));
        }
        worst = worst.max(written.elapsed());
    }
    for l in loads {
        let r = l.finish();
        assert_eq!(r.failed, 0, "{:?}", r.failures);
    }
    assert!(worst < Duration::from_secs(1), "a KV write reached both nodes after {worst:?}");
    assert_eq!(nodes[0].status()["digest"], nodes[1].status()["digest"], "both nodes serve the same table");
}

#[test]
fn a_kv_outage_and_a_restart_during_it_keep_the_last_good_settings() {
    let consul = ConsulDouble::start();
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let mut p = Proxy::start(&body(&consul, &a, &b));
    consul.kv_put(&format!("switchyard/instances/web/{}", a.addr.to_string().replace(':', "_")), b"drain");
    consul.kv_put("switchyard/routes/only-b", b"path_prefix = \"/b/\"\ncluster = \"web\"");
    assert!(wait_until(Duration::from_secs(2), || p.fetch("/b/x") == (200, "b".into())));
    let state = p.path("consul-state.json");
    assert!(wait_until(Duration::from_secs(5), || std::fs::read_to_string(&state).is_ok_and(|s| s.contains("routes/only-b"))), "KV settings are persisted");

    consul.fault(Fault::Status(500));
    let load = Load::start(p.url("/b/x"), 1_000_000, Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(5), || p.status()["sources"]["consul-kv"]["state"] == "error"));
    assert!(wait_until(Duration::from_secs(2), || load.count() > 200));
    let r = load.finish();
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    assert_eq!(p.fetch("/b/x"), (200, "b".into()), "the KV settings still apply during the outage");

    // A restart while Consul still fails: the persisted settings serve from the first request.
    let cfg = std::fs::read_to_string(p.path("switchyard.toml")).unwrap();
    let saved = std::fs::read_to_string(&state).unwrap();
    p.signal(libc::SIGINT);
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
    let body = cfg.split("[consul]").nth(1).map(|rest| format!("[consul]{rest}")).unwrap();
    let body = body.split("\n[[listeners]]").next().unwrap().to_string();
    let p2 = Proxy::builder(&body).file("consul-state.json", &saved).start();
    for _ in 0..20 {
        assert_eq!(p2.fetch("/b/x"), (200, "b".into()), "the persisted KV route and drain serve at once");
    }
    assert_eq!(p2.status()["config"]["kv"]["from_state_file"], true);
    assert_eq!(p2.fetch("/readyz").0, 200, "persisted settings count as a first result");
    consul.fault(Fault::None);
    assert!(wait_until(Duration::from_secs(10), || p2.status()["config"]["kv"]["from_state_file"] == false), "follows Consul again");
}

/// Run a `switchyard` operator command on the proxy's config.
fn cli(p: &Proxy, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(p.path("switchyard.toml"))
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn kv_writes(consul: &ConsulDouble) -> usize {
    consul.requests().iter().filter(|r| r.path.starts_with("/v1/kv/") && r.method != "GET").count()
}

#[test]
fn the_kv_commands_validate_before_writing_and_use_check_and_set() {
    let consul = ConsulDouble::start();
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let p = Proxy::start(&body(&consul, &a, &b));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));

    // An invalid value: refused with the field named, nothing written.
    let (code, _, err) = cli(&p, &["kv", "set", "clusters/web/connect_timeout", "soon"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nothing written") && err.contains("clusters.web.connect_timeout") && err.contains("soon"), "{err}");
    let (code, _, err) = cli(&p, &["kv", "set", "routes/shop", "cluster = \"missing\""]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown cluster \"missing\""), "{err}");
    assert_eq!(kv_writes(&consul), 0, "the double saw no write");

    // A valid one: written with cas=0 (it did not exist), and applied.
    let (code, out, err) = cli(&p, &["kv", "set", "clusters/web/retries", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("set switchyard/clusters/web/retries"), "{out}");
    let put = consul.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    assert!(put.query.contains("cas=0"), "{}", put.query);
    assert_eq!(consul.kv_get("switchyard/clusters/web/retries").as_deref(), Some(&b"1"[..]));
    let (code, out, _) = cli(&p, &["kv", "get", "clusters/web/retries"]);
    assert_eq!((code, out.trim()), (0, "1"));
    // A key written by hand that the proxy rejects shows in `list`.
    consul.kv_put("switchyard/clusters/web/colour", b"blue");
    let (code, out, _) = cli(&p, &["kv", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("switchyard/clusters/web/retries = 1") && out.contains("colour = blue   # rejected: unknown cluster field"), "{out}");

    // Check-and-set: someone else writes between our read and our write.
    consul.fault(Fault::Slow(Duration::from_millis(400)));
    let before = consul.requests().len();
    let cfg = p.path("switchyard.toml");
    let child = std::thread::spawn(move || {
        std::process::Command::new(bin()).args(["kv", "set", "clusters/web/retries", "2", "--config"]).arg(&cfg).output().unwrap()
    });
    assert!(wait_until(Duration::from_secs(5), || consul.requests().iter().skip(before).any(|r| r.method == "GET" && r.answered.is_some())));
    consul.kv_put("switchyard/clusters/web/retries", b"3");
    let out = child.join().unwrap();
    consul.fault(Fault::None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("changed since it was read"), "{err}");
    assert_eq!(consul.kv_get("switchyard/clusters/web/retries").as_deref(), Some(&b"3"[..]), "the other write stands");

    // Delete: validated too, then applied.
    let (code, out, err) = cli(&p, &["kv", "delete", "clusters/web/retries"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deleted"));
    assert!(consul.kv_get("switchyard/clusters/web/retries").is_none());
}

#[test]
fn drain_wait_undrain_and_maintenance_from_the_command_line() {
    for express in ["true", "false"] {
        let consul = ConsulDouble::start();
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let p = Proxy::builder(&body(&consul, &a, &b)).server(&format!("express = {express}")).start();
        assert!(wait_until(Duration::from_secs(5), || p.fetch("/").0 == 200));
        // Slow requests, so some are in flight when the drain lands.
        b.set_delay(Duration::from_millis(200));
        let loads: Vec<Load> = (0..3).map(|_| Load::start(p.url("/"), 1_000_000, Duration::from_secs(60))).collect();
        assert!(wait_until(Duration::from_secs(5), || b.hits() > 5));
        let admin = p.admin.to_string();
        let t0 = Instant::now();
        let (code, out, err) = cli(&p, &["drain", "web", &b.addr.to_string(), "--wait", "--admin", &admin, "--timeout", "10s"]);
        assert_eq!(code, 0, "express={express}: {out}{err}");
        assert!(out.contains("drained, nothing in flight"), "{out}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let settled = b.hits();
        let a_before = a.hits();
        assert!(wait_until(Duration::from_secs(5), || a.hits() > a_before + 100));
        assert_eq!(b.hits(), settled, "express={express}: b got a request after `drain --wait` returned");
        let (code, _, err) = cli(&p, &["undrain", "web", &b.addr.to_string()]);
        assert_eq!(code, 0, "{err}");
        b.set_delay(Duration::ZERO);
        let b_before = b.hits();
        assert!(wait_until(Duration::from_secs(3), || b.hits() > b_before + 20), "express={express}: undrained");
        for l in loads {
            let r = l.finish();
            assert_eq!(r.failed, 0, "express={express}: {:?}", r.failures);
        }

        let (code, _, err) = cli(&p, &["maintenance", "nope", "on"]);
        assert_eq!(code, 1);
        assert!(err.contains("no route \"nope\""), "{err}");
        let (code, _, err) = cli(&p, &["maintenance", "site", "on", "--body", "back soon", "--retry-after", "90s"]);
        assert_eq!(code, 0, "{err}");
        assert!(wait_until(Duration::from_secs(2), || p.fetch("/") == (503, "back soon".into())));
        assert_eq!(p.get("/").headers()["retry-after"], "90");
        let (code, _, err) = cli(&p, &["maintenance", "site", "off"]);
        assert_eq!(code, 0, "{err}");
        assert!(wait_until(Duration::from_secs(2), || p.fetch("/").0 == 200));
    }
}
