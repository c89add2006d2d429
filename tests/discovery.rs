//! File-catalog discovery under load: edits move traffic within a second with
//! zero failed requests; invalid files keep the last good catalog; readiness
//! follows the first discovery result; removed backends finish in-flight work.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::*;

const FILE_CLUSTER: &str =
    "[[routes]]\ncluster = \"web\"\n[clusters.web]\nfile = { catalog = \"catalog.json\" }\nconnect_timeout = \"500ms\"\n";

fn names_of(ups: &[Upstream], idx: &[usize]) -> HashSet<String> {
    idx.iter().map(|&i| ups[i].name().to_string()).collect()
}

#[test]
fn catalog_edits_move_traffic_within_a_second_with_zero_failures() {
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::start(&format!("b{i}"))).collect();
    let sets: [&[usize]; 4] = [&[0, 1], &[2], &[1, 3], &[0, 2, 3]];
    let render = |idx: &[usize]| catalog_json(&[("web", idx.iter().map(|&i| (ups[i].addr, 1)).collect())]);
    let p = Proxy::builder(FILE_CLUSTER).file("catalog.json", &render(sets[0])).start();
    let cat = p.path("catalog.json");
    let loads: Vec<Load> = (0..2).map(|_| Load::start(p.url("/"), 200_000, Duration::from_secs(60))).collect();
    let mut worst = Duration::ZERO;
    let edits = 24;
    for e in 1..=edits {
        let idx = sets[e % sets.len()];
        let prev = p.generation();
        let t0 = Instant::now();
        // Half the edits replace the file by rename, half rewrite it in place
        // (truncate + write, as many editors and scripts do).
        if e % 2 == 0 {
            write_atomic(&cat, &render(idx));
        } else {
            std::fs::write(&cat, render(idx)).unwrap();
        }
        let took = p.wait_for_set(prev, &names_of(&ups, idx), t0, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("edit {e} to {idx:?} did not take effect within 3 s"));
        assert!(took < Duration::from_secs(1), "edit {e} took {took:?}");
        assert_eq!(p.generation(), prev + 1, "one edit, one new table");
        worst = worst.max(took);
    }
    // Keep the load going until it has sent at least 2,000 requests.
    assert!(wait_until(Duration::from_secs(30), || loads.iter().map(|l| l.count()).sum::<u64>() >= 2000));
    let reports: Vec<LoadReport> = loads.into_iter().map(|l| l.finish()).collect();
    let ok: u64 = reports.iter().map(|r| r.ok).sum();
    let failed: u64 = reports.iter().map(|r| r.failed).sum();
    eprintln!("{edits} edits, worst propagation {worst:?}, {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{reports:?}");
    assert!(ok >= 2000);
    assert_eq!(p.generation(), edits as u64 + 1);
}

#[test]
fn invalid_catalog_keeps_the_last_good_one() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let good = catalog_json(&[("web", vec![(a.addr, 1)])]);
    let p = Proxy::builder(FILE_CLUSTER).file("catalog.json", &good).start();
    let cat = p.path("catalog.json");
    let source = format!("file:{}", cat.display());
    let errors = |p: &Proxy| {
        let m = parse_metrics(&p.metrics());
        sample(&m, "switchyard_discovery_updates_total", &[("source", &source), ("result", "error")]).unwrap_or(0.0)
    };
    let full = catalog_json(&[("web", vec![(a.addr, 1), (b.addr, 1)])]);
    let bad_address = full.replace(&b.addr.ip().to_string(), "not an ip");
    let cases = [
        ("bad JSON", "{ this is not json".to_string(), "invalid catalog"),
        ("bad address", bad_address, "invalid IP address \"not an ip\""),
        ("truncated mid-write", full[..full.len() / 2].to_string(), "EOF"),
        ("wrong shape", "[1, 2, 3]".to_string(), "expected a map"),
    ];
    for (i, (what, text, reason)) in cases.iter().enumerate() {
        std::fs::write(&cat, text).unwrap();
        assert!(
            wait_until(Duration::from_secs(2), || errors(&p) >= (i + 1) as f64),
            "{what}: no error counted"
        );
        let st = p.status();
        let src = &st["sources"][&source];
        assert_eq!(src["state"], "error", "{what}: {st}");
        let last = src["last_error"].as_str().unwrap();
        assert!(last.contains(reason), "{what}: last_error {last:?} should mention {reason:?}");
        for _ in 0..10 {
            assert_eq!(p.fetch("/"), (200, "a".to_string()), "{what}: last good catalog must keep serving");
        }
        assert!(p.stderr().contains("last good catalog stays in force"), "{what}: no log line");
    }
    // Nothing was published while the file was bad.
    assert_eq!(p.generation(), 1);
    // A valid file is picked up again.
    let prev = p.generation();
    write_atomic(&cat, &full);
    let both: HashSet<String> = ["a".to_string(), "b".to_string()].into();
    assert!(p.wait_for_set(prev, &both, Instant::now(), Duration::from_secs(2)).is_some());
    assert!(b.hits() > 0);
    assert_eq!(p.status()["sources"][&source]["state"], "ok");
}

#[test]
fn readyz_waits_for_the_first_discovery_result() {
    let a = Upstream::start("a");
    // No catalog file yet.
    let p = Proxy::start(FILE_CLUSTER);
    let readyz = |p: &Proxy| {
        let r = p.http.get(p.admin_url("/readyz")).send().unwrap();
        let code = r.status().as_u16();
        let v: serde_json::Value = serde_json::from_str(&r.text().unwrap()).unwrap();
        (code, v)
    };
    let (code, body) = readyz(&p);
    assert_eq!(code, 503);
    assert_eq!(body["ready"], false);
    assert_eq!(body["pending_clusters"], serde_json::json!(["web"]));
    assert!(body["reason"].as_str().unwrap().contains("web"));
    assert_eq!(p.fetch("/").0, 503);
    let healthz = p.http.get(p.admin_url("/healthz")).send().unwrap();
    assert_eq!(healthz.status(), 200, "alive even when not ready");
    write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![(a.addr, 1)])]));
    let t0 = Instant::now();
    assert!(wait_until(Duration::from_secs(2), || readyz(&p).0 == 200));
    assert!(t0.elapsed() < Duration::from_secs(1), "took {:?}", t0.elapsed());
    assert_eq!(readyz(&p).1["ready"], true);
    assert_eq!(p.fetch("/"), (200, "a".to_string()));
}

#[test]
fn removed_backend_finishes_in_flight_requests_and_gets_no_new_ones() {
    let slow = Upstream::start("slow");
    slow.set_delay(Duration::from_millis(1000));
    let fast = Upstream::start("fast");
    let p = Proxy::builder(&FILE_CLUSTER.replace("connect_timeout = \"500ms\"", "selection = \"round_robin\""))
        .file("catalog.json", &catalog_json(&[("web", vec![(slow.addr, 1), (fast.addr, 1)])]))
        .start();
    // Put requests in flight on the slow backend.
    let url = p.url("/");
    let inflight: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let c = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
                let r = c.get(url).send().unwrap();
                (r.status().as_u16(), r.text().unwrap())
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(3), || slow.hits() >= 1));
    let slow_before = slow.hits();
    let prev = p.generation();
    write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![(fast.addr, 1)])]));
    let only_fast: HashSet<String> = ["fast".to_string()].into();
    assert!(p.wait_for_set(prev, &only_fast, Instant::now(), Duration::from_secs(1)).is_some());
    for _ in 0..20 {
        assert_eq!(p.fetch("/"), (200, "fast".to_string()));
    }
    assert_eq!(slow.hits(), slow_before, "a removed backend must get no new requests");
    for h in inflight {
        let (code, body) = h.join().unwrap();
        assert_eq!(code, 200);
        assert!(body == "slow" || body == "fast");
    }
}

#[test]
fn weight_zero_drains_a_backend() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let p = Proxy::builder(FILE_CLUSTER)
        .file("catalog.json", &catalog_json(&[("web", vec![(a.addr, 1), (b.addr, 0)])]))
        .start();
    for _ in 0..20 {
        assert_eq!(p.fetch("/"), (200, "a".to_string()));
    }
    assert_eq!(b.hits(), 0);
    let st = p.status();
    let backends = st["clusters"][0]["backends"].as_array().unwrap();
    let states: HashSet<String> = backends.iter().map(|b| b["state"].as_str().unwrap().to_string()).collect();
    assert_eq!(states, ["active".to_string(), "drained".to_string()].into());
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_backends", &[("cluster", "web"), ("state", "drained")]), Some(1.0));
    assert_eq!(sample(&m, "switchyard_backends", &[("cluster", "web"), ("state", "active")]), Some(1.0));
}
