//! Operator settings on routes and instances, through both request paths
//! (the express path and Pingora's `HttpProxy`, `server.express = false`):
//! a route's maintenance mode (503, `Retry-After`, its body, allowed client
//! networks) and an instance's drain and weight override, applied live by a
//! config reload under continuous load.

mod support;

use std::time::{Duration, Instant};
use support::*;

fn body(a: &Upstream, b: &Upstream, extra_route: &str, extra_cluster: &str) -> String {
    format!(
        "[[routes]]\nname = \"shop\"\npath_prefix = \"/shop/\"\ncluster = \"web\"\n{extra_route}\n\
         [[routes]]\nname = \"site\"\ncluster = \"web\"\n\
         [clusters.web]\nstatic = [\"{}\", \"{}\"]\n{extra_cluster}\n",
        a.addr, b.addr
    )
}

fn edit_config(p: &Proxy, edit: impl FnOnce(String) -> String) {
    let path = p.path("switchyard.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &edit(text));
}

fn reload(p: &Proxy) {
    let out = std::process::Command::new(bin())
        .args(["reload", "--admin", &p.admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_route_in_maintenance_answers_503_with_its_body_except_to_allowed_networks() {
    for (name, line) in PATHS {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let p = Proxy::builder(&body(
            &a,
            &b,
            "maintenance = { body = \"back at 10\\n\", retry_after = \"120s\", allow = [\"10.0.0.0/8\"] }",
            "",
        ))
        .server(line)
        .start();
        let r = p.get("/shop/cart");
        assert_eq!(r.status(), 503, "{name}");
        assert_eq!(r.headers()["retry-after"], "120", "{name}");
        assert_eq!(r.text().unwrap(), "back at 10\n", "{name}");
        assert_eq!(a.hits() + b.hits(), 0, "{name}: nothing reached a backend");
        // HEAD gets the same status and headers, without the body.
        let head = p.http.head(p.url("/shop/")).send().unwrap();
        assert_eq!((head.status().as_u16(), head.headers()["retry-after"].to_str().unwrap()), (503, "120"), "{name}");
        // The other route on the same cluster is not in maintenance.
        assert_eq!(p.fetch("/other").0, 200, "{name}");
        let m = parse_metrics(&p.metrics());
        assert_eq!(sample(&m, "switchyard_requests_total", &[("route", "shop"), ("cluster", "web"), ("code_class", "5xx")]), Some(2.0), "{name}");
        let status = p.status();
        assert_eq!(status["routes"][0]["maintenance"], true, "{name}");
        assert_eq!(status["routes"][1]["maintenance"], false, "{name}");

        // A client inside `allow` is proxied as usual.
        edit_config(&p, |t| t.replace("10.0.0.0/8", "127.0.0.1"));
        reload(&p);
        assert_eq!(p.fetch("/shop/cart").0, 200, "{name}: an allowed client passes");
    }
}

#[test]
fn maintenance_on_and_off_under_load_answers_only_the_page_or_the_backend() {
    for (name, line) in PATHS {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let p = Proxy::builder(&body(&a, &b, "", "")).server(line).start();
        let url = p.url("/shop/x");
        // Every answer must be a backend's 200 or the maintenance page.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counts = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap();
                let (mut ok, mut page, mut other) = (0u64, 0u64, Vec::new());
                let end = Instant::now() + Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < end {
                    match client.get(&url).send() {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) if r.status() == 503 && r.headers().get("retry-after").is_some_and(|v| v == "30") => {
                            if r.text().unwrap_or_default() == "upgrading\n" {
                                page += 1
                            } else {
                                other.push("503 with another body".to_string())
                            }
                        }
                        Ok(r) => other.push(format!("status {}", r.status())),
                        Err(e) => other.push(e.to_string()),
                    }
                }
                (ok, page, other)
            })
        };
        let before = a.hits() + b.hits();
        assert!(wait_until(Duration::from_secs(5), || a.hits() + b.hits() > before + 50));
        edit_config(&p, |t| t.replace("cluster = \"web\"\n\n", "cluster = \"web\"\nmaintenance = { body = \"upgrading\\n\", retry_after = \"30s\" }\n\n"));
        reload(&p);
        // Once on, no request reaches a backend through this route.
        let on = a.hits() + b.hits();
        std::thread::sleep(Duration::from_millis(300));
        assert!(a.hits() + b.hits() <= on + 1, "{name}: requests reached a backend during maintenance");
        edit_config(&p, |t| t.replace("maintenance = { body = \"upgrading\\n\", retry_after = \"30s\" }\n", ""));
        reload(&p);
        let off = a.hits() + b.hits();
        assert!(wait_until(Duration::from_secs(5), || a.hits() + b.hits() > off + 50), "{name}: traffic resumes");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ok, page, other) = counts.join().unwrap();
        assert!(other.is_empty(), "{name}: answers other than the backend or the page: {other:?}");
        assert!(ok > 100 && page > 10, "{name}: ok {ok}, page {page}");
    }
}

#[test]
fn a_drained_instance_gets_no_new_request_within_a_second_and_nothing_fails() {
    for (name, line) in PATHS {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let p = Proxy::builder(&body(&a, &b, "", "")).server(line).start();
        let loads = [
            Load::start(p.url("/"), 1_000_000, Duration::from_secs(60)),
            Load::start_fresh(p.url("/"), 1_000_000, Duration::from_secs(60)),
        ];
        assert!(wait_until(Duration::from_secs(5), || a.hits() > 50 && b.hits() > 50), "{name}");
        // Drain b by address, and give a weight that is accepted too.
        edit_config(&p, |t| {
            t.replace(
                "[clusters.web]\n",
                &format!("[clusters.web]\ninstances = {{ \"{}\" = {{ drain = true }}, \"{}\" = {{ weight = 3 }} }}\n", b.addr, a.addr),
            )
        });
        let written = Instant::now();
        reload(&p);
        // Requests already sent to b may still finish; then nothing new.
        let mut last = b.hits();
        let quiet = wait_until(Duration::from_secs(1), || {
            std::thread::sleep(Duration::from_millis(50));
            let now = b.hits();
            let still = now == last;
            last = now;
            still
        });
        let settled = b.hits();
        let a_before = a.hits();
        assert!(wait_until(Duration::from_secs(5), || a.hits() > a_before + 200), "{name}");
        assert!(quiet && written.elapsed() < Duration::from_secs(5), "{name}");
        assert_eq!(b.hits(), settled, "{name}: the drained instance got new requests");
        for l in loads {
            let r = l.finish();
            assert_eq!(r.failed, 0, "{name}: {:?}", r.failures);
        }
        let status = p.status();
        let backends = status["clusters"][0]["backends"].as_array().unwrap();
        let state = |addr: String| backends.iter().find(|x| x["address"] == addr.as_str()).unwrap().clone();
        assert_eq!(state(b.addr.to_string())["state"], "drained", "{name}");
        assert_eq!(state(a.addr.to_string())["weight"], 3, "{name}");
    }
}
