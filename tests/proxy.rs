//! Proxy behaviour against real upstreams: distribution, retries, error
//! statuses, forwarded headers, protocols, absolute-form, drain.

mod support;

use std::time::{Duration, Instant};
use support::*;

#[test]
fn round_robin_spreads_evenly() {
    let ups: Vec<Upstream> = (0..3).map(|i| Upstream::start(&format!("u{i}"))).collect();
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let p = Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &addrs, "")));
    for _ in 0..300 {
        assert_eq!(p.fetch("/").0, 200);
    }
    // Sequential requests on one proxy thread: round robin is exact.
    for u in &ups {
        assert_eq!(u.hits(), 100, "{} got {}", u.name(), u.hits());
        // Upstream keep-alive: 100 sequential requests reuse pooled connections.
        assert!(u.connections() <= 2, "{} saw {} connections for 100 requests", u.name(), u.connections());
    }
}

#[test]
fn weighted_follows_catalog_weights() {
    let ups: Vec<Upstream> = (0..3).map(|i| Upstream::start(&format!("w{i}"))).collect();
    let cat = catalog_json(&[("web", vec![(ups[0].addr, 1), (ups[1].addr, 2), (ups[2].addr, 3)])]);
    let p = Proxy::builder(
        "[[routes]]\ncluster = \"web\"\n[clusters.web]\nfile = { catalog = \"catalog.json\" }\nselection = \"weighted\"\n",
    )
    .file("catalog.json", &cat)
    .start();
    for _ in 0..600 {
        assert_eq!(p.fetch("/").0, 200);
    }
    // Tolerance: ±2 % of the total per backend (the schedule itself is exact).
    for (u, want) in ups.iter().zip([100u64, 200, 300]) {
        let got = u.hits();
        assert!(got.abs_diff(want) <= 12, "{}: got {got}, want {want}±12", u.name());
    }
}

#[test]
fn least_connections_avoids_the_slow_backend() {
    let slow = Upstream::start("slow");
    slow.set_delay(Duration::from_millis(200));
    let fast = Upstream::start("fast");
    let p = Proxy::start(&format!(
        "[[routes]]\ncluster = \"web\"\n{}",
        static_cluster("web", &[slow.addr, fast.addr], "selection = \"least_connections\"")
    ));
    let url = p.url("/");
    let loads: Vec<Load> = (0..4).map(|_| Load::start(url.clone(), 200, Duration::from_millis(1500))).collect();
    let reports: Vec<LoadReport> = loads.into_iter().map(|l| l.join()).collect();
    let failed: u64 = reports.iter().map(|r| r.failed).sum();
    assert_eq!(failed, 0, "{reports:?}");
    // Round robin would give the slow one half of all requests; least-connections
    // sends it only a trickle while it is busy.
    assert!(fast.hits() > 5 * slow.hits(), "fast {} slow {}", fast.hits(), slow.hits());
}

#[test]
fn consistent_hash_on_cookie_is_sticky() {
    let ups: Vec<Upstream> = (0..3).map(|i| Upstream::start(&format!("h{i}"))).collect();
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let p = Proxy::start(&format!(
        "[[routes]]\ncluster = \"web\"\n{}",
        static_cluster("web", &addrs, "selection = \"consistent_hash\"\nhash_cookie = \"sessionid\"")
    ));
    let mut seen = std::collections::HashSet::new();
    for user in 0..30 {
        let cookie = format!("theme=dark; sessionid=user{user}");
        let first = p.http.get(p.url("/")).header("cookie", &cookie).send().unwrap().text().unwrap();
        for _ in 0..5 {
            let again = p.http.get(p.url("/")).header("cookie", &cookie).send().unwrap().text().unwrap();
            assert_eq!(first, again, "user{user} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "30 users should land on all 3 backends: {seen:?}");
}

#[test]
fn dead_backend_is_retried_on_another_without_client_error() {
    let live = Upstream::start("live");
    let dead = dead_addr();
    // Retries alone, without outlier ejection passing the dead one over.
    let p = Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[dead, live.addr], "outlier = false")));
    for _ in 0..50 {
        let (code, body) = p.fetch("/");
        assert_eq!((code, body.as_str()), (200, "live"));
    }
    assert_eq!(live.hits(), 50);
    let m = parse_metrics(&p.metrics());
    let dead_s = dead.to_string();
    let errs = sample(&m, "switchyard_upstream_requests_total", &[("cluster", "web"), ("backend", &dead_s), ("outcome", "connect_error")]).unwrap();
    assert!(errs >= 20.0, "dead backend should have been tried ~25 times, saw {errs}");
}

#[test]
fn reset_before_response_is_retried_for_get_but_not_post() {
    let reset = ResetUpstream::start();
    let live = Upstream::start("live");
    let p = Proxy::start(&format!(
        "[[routes]]\ncluster = \"web\"\n{}",
        static_cluster("web", &[reset.addr, live.addr], "selection = \"round_robin\"")
    ));
    for _ in 0..10 {
        assert_eq!(p.fetch("/").0, 200);
    }
    assert!(reset.hits() >= 4, "reset backend was picked {} times", reset.hits());
    // A POST that reaches the resetting backend must not be replayed elsewhere.
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(p.http.post(p.url("/")).body("x=1").send().unwrap().status().as_u16());
    }
    assert!(codes.contains(&502), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
}

#[test]
fn error_statuses_404_502_503_504() {
    let slow = Upstream::start("slow");
    slow.set_delay(Duration::from_millis(1500));
    let dead1 = dead_addr();
    let dead2 = dead_addr();
    let body = format!(
        "[[routes]]\nhosts = [\"dead.test\"]\ncluster = \"dead\"\n\
         [[routes]]\nhosts = [\"slow.test\"]\ncluster = \"slow\"\n\
         [[routes]]\nhosts = [\"empty.test\"]\ncluster = \"empty\"\n\
         {}{}\
         [clusters.empty]\nfile = {{ catalog = \"catalog.json\" }}\n",
        static_cluster("dead", &[dead1, dead2], ""),
        static_cluster("slow", &[slow.addr], "read_timeout = \"300ms\"\nretries = 0"),
    );
    let p = Proxy::builder(&body).file("catalog.json", "{\"empty\": []}").start();
    let get = |host: &str| {
        let r = p.http.get(p.url("/x")).header("host", host).send().unwrap();
        let code = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let ctype = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_string());
        (code, retry_after, ctype, r.text().unwrap())
    };
    let (c, _, t, b) = get("nothing.test");
    assert_eq!(c, 404);
    assert!(t.unwrap().starts_with("text/plain") && b.contains("no route"), "{b}");
    let (c, _, _, b) = get("dead.test");
    assert_eq!(c, 502, "{b}");
    assert!(b.contains("upstream failed"));
    let (c, ra, _, b) = get("empty.test");
    assert_eq!(c, 503);
    assert_eq!(ra.as_deref(), Some("5"));
    assert!(b.contains("no backend"));
    let t0 = Instant::now();
    let (c, _, _, b) = get("slow.test");
    assert_eq!(c, 504, "{b}");
    assert!(t0.elapsed() < Duration::from_millis(1400), "504 should come at the 300 ms read timeout");
    // Counted per route and class (in the log phase, just after each response).
    let counts = || {
        let m = parse_metrics(&p.metrics());
        (
            sample(&m, "switchyard_requests_total", &[("route", ""), ("cluster", ""), ("code_class", "4xx")]),
            sample(&m, "switchyard_requests_total", &[("route", "route0"), ("cluster", "dead"), ("code_class", "5xx")]),
        )
    };
    assert!(wait_until(Duration::from_secs(3), || counts() == (Some(1.0), Some(1.0))), "{:?}", counts());
}

#[test]
fn forwarded_headers_and_request_id() {
    let up = Upstream::start("h");
    for (path, server) in PATHS {
        let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], ""))).server(server).start();
        let r = p
            .http
            .get(p.url("/path?q=1"))
            .header("host", "www.example.com")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", "for=203.0.113.7;proto=https")
            .header("x-request-id", "req-abc_123")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["x-request-id"], "req-abc_123");
        let (target, h) = up.last_request().unwrap();
        assert_eq!(target, "/path?q=1");
        // No trusted proxies by default: a client cannot choose its address,
        // scheme or host as the backend sees them.
        assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{path}: a spoofed list is replaced");
        assert_eq!(h["x-forwarded-proto"], "http", "{path}: the client must not choose the scheme");
        assert_eq!(h["x-forwarded-host"], "www.example.com", "{path}");
        assert!(!h.contains_key("forwarded"), "{path}: an untrusted Forwarded is removed: {h:?}");
        assert_eq!(h["host"], "www.example.com");
        assert_eq!(h["x-request-id"], "req-abc_123");
        // An insane id is replaced by a generated one.
        let r = p.http.get(p.url("/")).header("x-request-id", "a b\tc").send().unwrap();
        let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(generated.len(), 32);
        assert_eq!(up.last_request().unwrap().1["x-request-id"], generated.as_str());
    }
}

#[test]
fn trusted_proxies_extend_forwarding_headers() {
    let up = Upstream::start("h");
    for (path, server) in PATHS {
        let body = format!(
            "[forwarding]\ntrusted_proxies = [\"127.0.0.0/8\", \"::1\"]\nforwarded = true\n[[routes]]\ncluster = \"web\"\n{}",
            static_cluster("web", &[up.addr], "")
        );
        let p = Proxy::builder(&body).server(server).start();
        let r = p
            .http
            .get(p.url("/"))
            .header("host", "www.example.com")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "shop.example")
            .header("forwarded", "for=203.0.113.7;proto=https")
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let (_, h) = up.last_request().unwrap();
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1", "{path}");
        assert_eq!(h["x-forwarded-proto"], "https", "{path}: the trusted front proxy's scheme");
        assert_eq!(h["x-forwarded-host"], "shop.example", "{path}");
        assert_eq!(h["forwarded"], "for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host=\"www.example.com\"", "{path}");
        // Without headers of its own, the trusted peer gets this hop's.
        p.http.get(p.url("/")).header("host", "www.example.com").send().unwrap();
        let (_, h) = up.last_request().unwrap();
        assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{path}");
        assert_eq!(h["x-forwarded-proto"], "http", "{path}");
    }
}

#[test]
fn hop_by_hop_headers_are_stripped() {
    let up = Upstream::start("h");
    for (path, server) in PATHS {
        let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], ""))).server(server).start();
        let resp = raw_exchange(
            p.addr,
            b"GET /hop HTTP/1.1\r\nHost: a.test\r\nConnection: close, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n\
              TE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\n\
              X-Kept: k\r\n\r\n",
            Duration::from_secs(3),
        );
        assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
        let (target, h) = up.last_request().unwrap();
        assert_eq!(target, "/hop");
        for name in ["x-secret", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"] {
            assert!(!h.contains_key(name), "{path}: {name} reached the backend: {h:?}");
        }
        assert!(h.get("connection").is_none_or(|v| !v.to_str().unwrap().to_ascii_lowercase().contains("x-secret")), "{path}: {h:?}");
        assert_eq!(h["x-kept"], "k", "{path}: an end-to-end header is kept");
    }
}

#[test]
fn absolute_form_is_never_an_open_proxy() {
    let up = Upstream::start("app");
    let p = Proxy::start(&format!(
        "[[routes]]\ncluster = \"web\"\n[[routes]]\nhosts = [\"www.example.com\"]\ncluster = \"web\"\n{}",
        static_cluster("web", &[up.addr], "")
    ));
    // Absolute-form for a host no route names: 404, even though an any-host route exists.
    let resp = raw_exchange(
        p.addr,
        b"GET http://evil.test/steal HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert_eq!(up.hits(), 0);
    // Absolute-form for a configured host: routed, sent upstream in origin-form.
    let resp = raw_exchange(
        p.addr,
        b"GET http://www.example.com/page?x=1 HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (target, h) = up.last_request().unwrap();
    assert_eq!(target, "/page?x=1");
    assert_eq!(h["host"], "www.example.com");
}

#[test]
fn malformed_request_gets_400_and_others_are_unaffected() {
    let up = Upstream::start("ok");
    let p = Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")));
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ] {
        let resp = raw_exchange(p.addr, garbage, Duration::from_secs(3));
        assert!(
            resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
            "{:?} -> {resp:?}",
            String::from_utf8_lossy(garbage)
        );
        assert_eq!(p.fetch("/").0, 200, "proxy must keep serving others");
    }
    assert_eq!(up.hits(), 4, "no malformed request may reach the backend");
}

#[test]
fn h2c_downstream_works() {
    let up = Upstream::start("h2");
    let p = Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")));
    let client = reqwest::blocking::Client::builder().http2_prior_knowledge().no_proxy().build().unwrap();
    for _ in 0..5 {
        let r = client.get(p.url("/h2")).header("x-request-id", "h2-id").send().unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().unwrap(), "h2");
    }
    let (target, h) = up.last_request().unwrap();
    assert_eq!(target, "/h2");
    assert_eq!(h["x-request-id"], "h2-id");
    assert!(h.contains_key("host"), "an HTTP/1.1 upstream needs Host");
}

#[test]
fn websocket_upgrade_passes_through() {
    use std::io::{Read, Write};
    let up = Upstream::start("ws");
    let p = Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")));
    let mut s = std::net::TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nearly",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "connection closed during handshake: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Bytes sent with the handshake, before the 101, wait for it and then
    // go through the tunnel.
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"early");
    for msg in [&b"ping-1"[..], b"second message", b"\x81\x05hello"] {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits() {
    let up = Upstream::start("slow");
    up.set_delay(Duration::from_millis(800));
    let mut p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")))
        .server("drain_timeout = \"5s\"")
        .start();
    let url = p.url("/");
    let inflight = std::thread::spawn(move || {
        let c = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
        let r = c.get(url).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    assert!(wait_until(Duration::from_secs(3), || up.hits() == 1));
    let t0 = Instant::now();
    p.signal(libc::SIGTERM);
    let (code, body) = inflight.join().unwrap();
    assert_eq!((code, body.as_str()), (200, "slow"), "in-flight request must complete");
    let exit = p.wait_exit(Duration::from_secs(7));
    assert_eq!(exit, Some(0), "stderr:\n{}", p.stderr());
    // Exits once drained, well before the 5 s bound.
    assert!(t0.elapsed() < Duration::from_secs(4), "took {:?}", t0.elapsed());
    assert!(std::net::TcpStream::connect(p.addr).is_err(), "listener must be closed");
}

#[test]
fn drain_timeout_bounds_shutdown() {
    let up = Upstream::start("stuck");
    up.set_delay(Duration::from_secs(20));
    let mut p = Proxy::builder(&format!(
        "[[routes]]\ncluster = \"web\"\n{}",
        static_cluster("web", &[up.addr], "read_timeout = \"60s\"")
    ))
    .server("drain_timeout = \"1s\"")
    .start();
    let url = p.url("/");
    let _client = std::thread::spawn(move || {
        let c = reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().unwrap();
        let _ = c.get(url).send();
    });
    assert!(wait_until(Duration::from_secs(3), || up.hits() == 1));
    let t0 = Instant::now();
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn requests_shorter_than_the_h2_preface_are_answered_on_h2c_listeners() {
    // Listeners accept h2c by default. An HTTP/2 client starts with a 24-byte
    // preface; a complete HTTP/1.0 request can be shorter (18 bytes here, the
    // kind a health checker sends) and must not wait for more bytes.
    let up = Upstream::start("short");
    let p = Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")));
    let t0 = Instant::now();
    let resp = raw_exchange(p.addr, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(3));
    assert!(resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"), "{resp:?}");
    assert!(resp.ends_with("short"), "{resp:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "took {:?}", t0.elapsed());
    // Keep-alive on the HTTP/1 path still works: three requests, one connection.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    for path in ["/a", "/b", "/c"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"short") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert_eq!(up.last_request().unwrap().0, path);
    }
    assert!(up.connections() <= 2);
}

/// The express path (plain bodiless HTTP/1.1) and Pingora's general proxy
/// answer alike: same status, body and headers to the client, same request
/// (target, forwarding headers, hop-by-hop headers removed) to the backend.
#[test]
fn express_and_general_paths_answer_alike() {
    let up = Upstream::start("alike");
    let body = format!(
        "[[routes]]\nhosts = [\"www.example.com\"]\ncluster = \"web\"\n{}",
        static_cluster("web", &[up.addr], "")
    );
    let express = Proxy::builder(&body).server("express = true").start();
    let general = Proxy::builder(&body).server("express = false").start();
    let cookie = "c".repeat(3000); // a head longer than the 2 KiB read-ahead
    let requests = [
        "GET /p?q=1 HTTP/1.1\r\nHost: www.example.com\r\nX-Forwarded-For: 203.0.113.7\r\nX-Request-Id: id-1\r\nConnection: close\r\n\r\n".to_string(),
        format!("GET /long HTTP/1.1\r\nHost: www.example.com\r\nCookie: s={cookie}\r\nX-Request-Id: id-2\r\nConnection: close\r\n\r\n"),
        "HEAD /h HTTP/1.1\r\nHost: www.example.com\r\nX-Request-Id: id-3\r\nConnection: close\r\n\r\n".to_string(),
        "DELETE /d HTTP/1.1\r\nHost: www.example.com\r\nContent-Length: 0\r\nX-Request-Id: id-4\r\nConnection: close\r\n\r\n".to_string(),
        "GET /none HTTP/1.1\r\nHost: nothing.example.com\r\nX-Request-Id: id-5\r\nConnection: close\r\n\r\n".to_string(),
    ];
    // The response without its Date header (which differs by the second).
    let normalise = |raw: String| -> Vec<String> {
        raw.split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("date:")).map(|l| l.to_ascii_lowercase()).collect()
    };
    let upstream_view = |h: &http::HeaderMap| -> Vec<(String, String)> {
        let mut v: Vec<_> = h.iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("?").to_string())).collect();
        v.sort();
        v
    };
    for req in &requests {
        let mut answers = Vec::new();
        for p in [&express, &general] {
            let before = up.hits();
            let raw = raw_exchange(p.addr, req.as_bytes(), Duration::from_secs(5));
            let seen = (up.hits() > before).then(|| up.last_request().unwrap());
            answers.push((normalise(raw), seen.map(|(t, h)| (t, upstream_view(&h)))));
        }
        assert!(answers[0].0[0].starts_with("http/1.1 "), "{:?}", answers[0].0);
        assert_eq!(answers[0], answers[1], "request: {}", &req[..req.len().min(60)]);
    }
    let (_, h) = up.last_request().unwrap();
    assert!(h.get("connection").is_none() || h["connection"] != "close", "the client's Connection header is hop-by-hop");
    // Every request above went through the express path on one proxy only.
    let express_count = |p: &Proxy| sample(&parse_metrics(&p.metrics()), "switchyard_requests_express_total", &[]);
    assert_eq!(express_count(&express), Some(requests.len() as f64));
    assert_eq!(express_count(&general), Some(0.0));
}

/// Response framing on the express path matches Pingora's general proxy for
/// what backends really send: chunked bodies, close-delimited bodies,
/// 204/304 without a body, HTTP/1.0 responses, `Connection: close`, and 1xx
/// before the final response. The client sees the same status, headers and
/// decoded body from both, twice in a row (so a backend connection that must
/// not be reused is not).
#[test]
fn express_and_general_paths_frame_responses_alike() {
    // Bodies larger than one read from the backend, with a length and chunked.
    let big: String = (0..300_000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let big_length: &'static [u8] =
        Box::leak(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big}", big.len()).into_bytes().into_boxed_slice());
    let mut chunked = String::from("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    for piece in big.as_bytes().chunks(7_777) {
        chunked.push_str(&format!("{:x}\r\n{}\r\n", piece.len(), std::str::from_utf8(piece).unwrap()));
    }
    chunked.push_str("0\r\n\r\n");
    let big_chunked: &'static [u8] = Box::leak(chunked.into_bytes().into_boxed_slice());
    let cases: Vec<(&str, &'static [u8], bool)> = vec![
        ("chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", false),
        ("chunk extensions and trailers", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n", false),
        ("large, with a length", big_length, false),
        ("large, chunked", big_chunked, false),
        ("a coding other than chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot-really-gzip", true),
        ("an invalid response", b"HTTP/1.1 2x0 OK\r\nContent-Length: 1\r\n\r\nx", true),
        ("duplicate lengths that disagree", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", true),
        ("a length next to chunked", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", true),
        ("backend Date and Connection replaced", b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2001 00:00:00 GMT\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nd", false),
        ("close-delimited", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nclose-delimited body", true),
        ("204", b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", false),
        ("304", b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n", false),
        ("http/1.0", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
        ("connection close", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye", true),
        ("103 then 200", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody", false),
    ];
    for (what, response, close) in cases {
        let up = RawUpstream::start(response, close);
        let body = format!("[[routes]]\ncluster = \"raw\"\n{}", static_cluster("raw", &[up.addr], ""));
        let express = Proxy::builder(&body).server("express = true").start();
        let general = Proxy::builder(&body).server("express = false").start();
        let req = b"GET /f HTTP/1.1\r\nHost: f.example.com\r\nX-Request-Id: rid-1\r\nConnection: close\r\n\r\n";
        for round in 0..2 {
            let e = parse_raw_response(&raw_exchange(express.addr, req, Duration::from_secs(5)));
            let g = parse_raw_response(&raw_exchange(general.addr, req, Duration::from_secs(5)));
            assert!(e.0.starts_with("HTTP/1."), "{what}: {:?}", e.0);
            if what.starts_with("large") {
                assert!(e.2 == big, "{what}: the whole body ({} bytes of {})", e.2.len(), big.len());
            }
            assert!(e == g, "{what} (round {round}): express vs general:\n{:?}\n{:?}\nbodies {} / {} bytes", (&e.0, &e.1), (&g.0, &g.1), e.2.len(), g.2.len());
        }
        let served = |p: &Proxy| sample(&parse_metrics(&p.metrics()), "switchyard_requests_express_total", &[]);
        assert_eq!(served(&express), Some(2.0), "{what}: the express proxy served both");
    }
}

/// Keep-alive connections to backends die: closed while idle in the pool,
/// or just as they are reused. Neither may cost the client an error: the
/// pool drops connections it sees closed, and a request that fails on a
/// reused connection before any response byte is retried on a new one (even
/// with a single backend).
#[test]
fn dead_keepalive_connections_cost_no_client_error() {
    let cases: [(&str, RawUpstream); 2] = [
        ("closed after each answer", RawUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true)),
        ("dies when reused", RawUpstream::start_dropping_reused(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")),
    ];
    for (what, up) in cases {
        let body = format!("[[routes]]\ncluster = \"raw\"\n{}", static_cluster("raw", &[up.addr], "retries = 1"));
        let p = Proxy::start(&body);
        for i in 0..20 {
            let (code, text) = p.fetch("/");
            assert_eq!((code, text.as_str()), (200, "ok"), "{what}: request {i}");
        }
        let served = sample(&parse_metrics(&p.metrics()), "switchyard_requests_express_total", &[]);
        assert_eq!(served, Some(20.0), "{what}");
    }
}

/// Read one response with a `Content-Length` body from `s` (the connection
/// stays open); None if the connection closed or stalled first.
fn read_one_response(s: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                .unwrap_or(0);
            if body.len() >= len {
                return Some(text);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A 404 (no route) or 503 (no backends) that Switchyard answers itself
/// keeps the client's keep-alive connection open on both paths; a 502 after
/// failed attempts closes it on both (as Pingora does after a proxy failure).
#[test]
fn local_answers_keep_the_connection_alike_on_both_paths() {
    use std::io::Write;
    let up = Upstream::start("ka");
    let dead = dead_addr();
    let body = format!(
        "[[routes]]\nhosts = [\"www.example.com\"]\ncluster = \"web\"\n\
         [[routes]]\nhosts = [\"empty.example.com\"]\ncluster = \"empty\"\n\
         [[routes]]\nhosts = [\"dead.example.com\"]\ncluster = \"dead\"\n{}{}\
         [clusters.empty]\nfile = {{ catalog = \"catalog.json\" }}\n",
        static_cluster("web", &[up.addr], ""),
        static_cluster("dead", &[dead], "retries = 0"),
    );
    let cases = [("nothing.example.com", 404, true), ("empty.example.com", 503, true), ("dead.example.com", 502, false)];
    for express in [true, false] {
        let p = Proxy::builder(&body)
            .server(&format!("express = {express}"))
            .file("catalog.json", "{\"empty\": []}")
            .start();
        for (host, code, stays_open) in cases {
            let mut s = std::net::TcpStream::connect(p.addr).unwrap();
            s.write_all(format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).unwrap();
            let first = read_one_response(&mut s).unwrap_or_default();
            assert!(first.starts_with(&format!("HTTP/1.1 {code} ")), "express={express} {host}: {first}");
            let keep = first.to_ascii_lowercase().contains("connection: keep-alive");
            assert_eq!(keep, stays_open, "express={express} {host}: {first}");
            if stays_open {
                s.write_all(b"GET /y HTTP/1.1\r\nHost: www.example.com\r\n\r\n").unwrap();
                let second = read_one_response(&mut s).unwrap_or_default();
                assert!(second.starts_with("HTTP/1.1 200 "), "express={express} {host}: second request on the connection: {second}");
            }
        }
    }
}

/// With two worker threads, each connection's socket is moved to the
/// reactor of the runtime that serves it. Connections spread over both
/// threads keep working on both paths (express GETs, a POST through
/// `HttpProxy`) and keep the client's address for `X-Forwarded-For`.
#[test]
fn two_worker_threads_serve_both_paths_with_the_client_address() {
    use std::io::Write;
    let up = Upstream::start("two");
    let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")))
        .threads(2)
        .start();
    for c in 0..16 {
        let mut s = std::net::TcpStream::connect(p.addr).unwrap();
        for i in 0..5 {
            s.write_all(format!("GET /c{c}/{i} HTTP/1.1\r\nHost: t.example.com\r\n\r\n").as_bytes()).unwrap();
            let r = read_one_response(&mut s).unwrap_or_default();
            assert!(r.starts_with("HTTP/1.1 200 ") && r.ends_with("two"), "connection {c}, GET {i}: {r}");
            let (target, h) = up.last_request().unwrap();
            assert_eq!((target.as_str(), h["x-forwarded-for"].to_str().unwrap()), (format!("/c{c}/{i}").as_str(), "127.0.0.1"));
        }
        s.write_all(format!("POST /c{c}/post HTTP/1.1\r\nHost: t.example.com\r\nContent-Length: 2\r\n\r\nhi").as_bytes()).unwrap();
        let r = read_one_response(&mut s).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 200 "), "connection {c}, POST: {r}");
        let (target, h) = up.last_request().unwrap();
        assert_eq!((target.as_str(), h["x-forwarded-for"].to_str().unwrap()), (format!("/c{c}/post").as_str(), "127.0.0.1"));
    }
    let served = sample(&parse_metrics(&p.metrics()), "switchyard_requests_express_total", &[]);
    assert_eq!(served, Some(80.0), "the GETs took the express path, the POSTs did not");
}

/// A body without framing is a stream: each piece reaches the client as the
/// backend sends it, not when the next one comes or the backend closes.
#[test]
fn close_delimited_bodies_reach_the_client_as_they_come() {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    for express in [true, false] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (release, released) = mpsc::channel::<()>();
        let backend = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst").unwrap();
            // Hold the rest back until the test has seen the first piece (at most 10 s).
            let _ = released.recv_timeout(Duration::from_secs(10));
            let _ = c.write_all(b"second");
        });
        let body = format!("[[routes]]\ncluster = \"raw\"\n{}", static_cluster("raw", &[addr], "retries = 0"));
        let p = Proxy::builder(&body).server(&format!("express = {express}")).start();
        let mut s = std::net::TcpStream::connect(p.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /stream HTTP/1.1\r\nHost: s.example.com\r\nConnection: close\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("first") {
            match s.read(&mut buf) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let before = String::from_utf8_lossy(&got).into_owned();
        assert!(before.contains("first") && !before.contains("second"), "express={express}: the first piece, alone: {before:?}");
        release.send(()).unwrap();
        backend.join().unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        got.extend_from_slice(&rest);
        let (status, _, body) = parse_raw_response(&String::from_utf8_lossy(&got));
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "firstsecond"), "express={express}");
    }
}

/// On SIGTERM, idle keep-alive connections are closed at once, while a
/// request in flight is still being answered and keeps the process up (so
/// the proxy closed them, not its exit). `parked`: they are parked first and
/// the parker closes them; else each is in a task of its own, which must
/// follow the shutdown signal.
fn sigterm_closes_idle_connections(parked: bool) {
    use std::io::{Read, Write};
    let fast = Upstream::start("fast");
    let slow = Upstream::start("slow");
    slow.set_delay(Duration::from_millis(1500));
    let park = if parked { "50ms" } else { "off" };
    let mut p = Proxy::builder(&format!(
        "[[routes]]\nhosts = [\"slow.example.com\"]\ncluster = \"slow\"\n[[routes]]\ncluster = \"fast\"\n{}{}",
        static_cluster("fast", &[fast.addr], ""),
        static_cluster("slow", &[slow.addr], "")
    ))
    .server(&format!("drain_timeout = \"5s\"\npark_idle_after = \"{park}\""))
    .start();
    let mut idle: Vec<std::net::TcpStream> = (0..5)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(p.addr).unwrap();
            s.write_all(b"GET /ka HTTP/1.1\r\nHost: fast.example.com\r\n\r\n").unwrap();
            let r = read_one_response(&mut s).unwrap_or_default();
            assert!(r.starts_with("HTTP/1.1 200 ") && r.to_ascii_lowercase().contains("connection: keep-alive"), "connection {i}: {r}");
            s
        })
        .collect();
    if parked {
        let parked = || sample(&parse_metrics(&p.metrics()), "switchyard_downstream_connections_parked", &[]);
        assert!(wait_until(Duration::from_secs(5), || parked() == Some(5.0)), "parked {:?}", parked());
    }
    let url = p.url("/slow");
    let inflight = std::thread::spawn(move || {
        let c = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
        let r = c.get(url).header("host", "slow.example.com").send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    assert!(wait_until(Duration::from_secs(3), || slow.hits() == 1));
    let t0 = Instant::now();
    p.signal(libc::SIGTERM);
    for (i, s) in idle.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0)), "idle connection {i} (parked: {parked}) closed on shutdown");
    }
    let closed_after = t0.elapsed();
    assert!(closed_after < Duration::from_millis(1000), "idle connections (parked: {parked}) closed after {closed_after:?}, before the request in flight ended");
    assert_eq!(inflight.join().unwrap(), (200, "slow".to_string()), "the request in flight is answered");
    assert_eq!(p.wait_exit(Duration::from_secs(7)), Some(0), "stderr:\n{}", p.stderr());
}

#[test]
fn sigterm_closes_idle_keepalive_connections_at_once() {
    sigterm_closes_idle_connections(false);
}

#[test]
fn sigterm_closes_parked_connections_at_once() {
    sigterm_closes_idle_connections(true);
}

/// Idle client connections are parked after `park_idle_after` (no task,
/// a bare socket) and served again when their client sends, on both paths
/// and with two worker threads (one runtime each, and one work-stealing
/// runtime): the client address survives the move
/// (X-Forwarded-For), a connection parks again after each request, a client
/// that hangs up while parked is closed and uncounted, and a new connection
/// on an h2c listener parked before its first bytes can still speak HTTP/1
/// or HTTP/2.
#[test]
fn idle_connections_are_parked_and_served_again() {
    use std::io::{Read, Write};
    let up = Upstream::start("parked");
    for (express, stealing) in [(true, false), (false, false), (true, true)] {
        let p = Proxy::builder(&format!("[[routes]]\ncluster = \"c\"\n{}", static_cluster("c", &[up.addr], "")))
            .server(&format!("express = {express}\nwork_stealing = {stealing}\npark_idle_after = \"100ms\""))
            .threads(2)
            .start();
        let express = format!("{express} (work stealing: {stealing})");
        let gauge = |name: &str| sample(&parse_metrics(&p.metrics()), name, &[]).unwrap_or(-1.0);
        let parked = || gauge("switchyard_downstream_connections_parked");
        let request = |s: &mut std::net::TcpStream, what: &str| {
            s.write_all(b"GET /p HTTP/1.1\r\nHost: parked.example.com\r\n\r\n").unwrap();
            let r = read_one_response(s).unwrap_or_default();
            assert!(r.starts_with("HTTP/1.1 200 ") && r.ends_with("parked"), "express {express}, {what}: {r:?}");
            let (_, headers) = up.last_request().unwrap();
            assert_eq!(headers.get("x-forwarded-for").map(|v| v.to_str().unwrap()), Some("127.0.0.1"), "express {express}, {what}");
        };
        let mut conns: Vec<std::net::TcpStream> = (0..3).map(|_| std::net::TcpStream::connect(p.addr).unwrap()).collect();
        for (i, s) in conns.iter_mut().enumerate() {
            request(s, &format!("connection {i}, first request"));
        }
        assert!(wait_until(Duration::from_secs(5), || parked() == 3.0), "express {express}: parked {}", parked());
        for round in 0..2 {
            for (i, s) in conns.iter_mut().enumerate() {
                request(s, &format!("connection {i}, after parking (round {round})"));
            }
            assert!(wait_until(Duration::from_secs(5), || parked() == 3.0), "express {express}: parked again {}", parked());
        }
        assert_eq!(gauge("switchyard_downstream_connections"), 3.0, "express {express}");
        drop(conns.pop());
        assert!(
            wait_until(Duration::from_secs(5), || parked() == 2.0 && gauge("switchyard_downstream_connections") == 2.0),
            "express {express}: a hang-up while parked is closed: parked {}, open {}",
            parked(),
            gauge("switchyard_downstream_connections")
        );
        // New connections, nothing sent: parked before their first bytes.
        let mut h1 = std::net::TcpStream::connect(p.addr).unwrap();
        let mut h2 = std::net::TcpStream::connect(p.addr).unwrap();
        assert!(wait_until(Duration::from_secs(5), || parked() == 4.0), "express {express}: new connections parked {}", parked());
        request(&mut h1, "a new connection's first request after parking");
        // HTTP/2 prior knowledge: the preface and an empty SETTINGS frame;
        // the server's preface is a SETTINGS frame (type 4) of its own.
        h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").unwrap();
        h2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut frame = [0u8; 9];
        h2.read_exact(&mut frame).unwrap();
        assert_eq!(frame[3], 4, "express {express}: HTTP/2 after parking answers with SETTINGS: {frame:?}");
    }
}

/// Requests that arrive just before, at and just after the moment their
/// connection is parked are all served: nothing sent around a park is lost.
#[test]
fn requests_around_the_park_moment_are_all_served() {
    use std::io::Write;
    let up = Upstream::start("edge");
    let p = Proxy::builder(&format!("[[routes]]\ncluster = \"c\"\n{}", static_cluster("c", &[up.addr], "")))
        .server("park_idle_after = \"20ms\"")
        .start();
    let mut s = std::net::TcpStream::connect(p.addr).unwrap();
    // Pauses of 14 to 26 ms against a park after 20 ms, 3 times each.
    for i in 0..39u64 {
        std::thread::sleep(Duration::from_millis(14 + i % 13));
        s.write_all(b"GET /e HTTP/1.1\r\nHost: edge.example.com\r\n\r\n").unwrap();
        let r = read_one_response(&mut s).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 200 ") && r.ends_with("edge"), "request {i} after a {} ms pause: {r:?}", 14 + i % 13);
    }
    assert_eq!(up.hits(), 39);
    // The pauses reached the park moment: some requests woke a parked
    // connection (how many depends on the machine's load).
    let parks = sample(&parse_metrics(&p.metrics()), "switchyard_downstream_parks_total", &[]).unwrap();
    assert!(parks >= 1.0, "parks: {parks}");
}

/// Requests sent back to back on one connection are all answered, in order,
/// on both paths: bodiless ones, one with a body, and a HEAD that closes.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start("p");
    for (path, server) in PATHS {
        let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], ""))).server(server).start();
        let before = up.hits();
        let resp = raw_exchange(
            p.addr,
            b"GET /1 HTTP/1.1\r\nHost: a\r\nX-Request-Id: pipe-1\r\n\r\n\
              GET /2 HTTP/1.1\r\nHost: a\r\nX-Request-Id: pipe-2\r\n\r\n\
              POST /3 HTTP/1.1\r\nHost: a\r\nX-Request-Id: pipe-3\r\nContent-Length: 5\r\n\r\nhello\
              GET /4 HTTP/1.1\r\nHost: a\r\nX-Request-Id: pipe-4\r\n\r\n\
              HEAD /5 HTTP/1.1\r\nHost: a\r\nX-Request-Id: pipe-5\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        );
        let ids: Vec<&str> = resp
            .split("\r\n")
            .filter_map(|l| l.strip_prefix("x-request-id: ").or_else(|| l.strip_prefix("X-Request-Id: ")))
            .collect();
        assert_eq!(ids, ["pipe-1", "pipe-2", "pipe-3", "pipe-4", "pipe-5"], "{path}: every request answered, in order:\n{resp}");
        assert_eq!(resp.matches("HTTP/1.1 200").count(), 5, "{path}: {resp}");
        assert_eq!(up.hits(), before + 5, "{path}");
    }
}

/// `[limits]` on both paths: too many or too large headers get 431, a long
/// target 414, a declared body over the limit 413 (before any `100
/// Continue`), each counted by reason; none reaches the backend, and a
/// request within the limits still does.
#[test]
fn requests_over_the_limits_are_refused_with_the_right_status() {
    let up = Upstream::start("ok");
    for (path, server) in PATHS {
        let body = format!(
            "[limits]\nmax_header_bytes = 4096\nmax_headers = 20\nmax_uri_bytes = 1024\nmax_body_bytes = 1000\n[[routes]]\ncluster = \"web\"\n{}",
            static_cluster("web", &[up.addr], "")
        );
        let p = Proxy::builder(&body).server(server).start();
        let before = up.hits();
        let ask = |req: String| raw_exchange(p.addr, req.as_bytes(), Duration::from_secs(3));
        let big_header = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "b".repeat(5000));
        let many: String = (0..25).map(|i| format!("X-H{i}: v\r\n")).collect();
        let many_headers = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}Connection: close\r\n\r\n");
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", "u".repeat(2000));
        let big_body = "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n".to_string();
        for (req, status, what) in [
            (big_header, "431", "one large header"),
            (many_headers, "431", "too many headers"),
            (long_uri, "414", "a long target"),
            (big_body, "413", "a 10 GB body"),
        ] {
            let resp = ask(req);
            assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{path}: {what}: {resp}");
            assert!(!resp.contains("100 Continue"), "{path}: {what}: {resp}");
        }
        assert_eq!(up.hits(), before, "{path}: nothing reached the backend");
        let ok = format!("GET /{} HTTP/1.1\r\nHost: a\r\nX-Fine: {}\r\nConnection: close\r\n\r\n", "u".repeat(900), "f".repeat(3000));
        assert!(ask(ok).starts_with("HTTP/1.1 200"), "{path}: within the limits");
        let m = parse_metrics(&p.metrics());
        for (reason, n) in [("headers_too_large", 2.0), ("uri_too_long", 1.0), ("body_too_large", 1.0)] {
            assert_eq!(sample(&m, "switchyard_requests_rejected_total", &[("reason", reason)]), Some(n), "{path}: {reason}");
        }
    }
}

/// With `count_5xx = true`, a backend answering 5xx is ejected like a dead
/// one (both paths); by default a 5xx is the application's and counts for
/// nothing.
#[test]
fn count_5xx_ejects_a_backend_that_answers_5xx() {
    let up = Upstream::start("alive");
    let busy = RawUpstream::start(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy", false);
    for (path, server) in PATHS {
        for (count, want_503) in [(true, 3), (false, 30)] {
            let outlier = format!("retries = 1\noutlier = {{ consecutive_failures = 3, base_ejection = \"30s\", count_5xx = {count} }}");
            let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr, busy.addr], &outlier))).server(server).start();
            let statuses: Vec<u16> = (0..60).map(|_| p.fetch("/").0).collect();
            let n503 = statuses.iter().filter(|&&s| s == 503).count();
            assert_eq!(n503, want_503, "{path} count_5xx = {count}: {statuses:?}");
            assert_eq!(n503 + statuses.iter().filter(|&&s| s == 200).count(), 60, "{path}: {statuses:?}");
            let m = parse_metrics(&p.metrics());
            let ejections = sample(&m, "switchyard_outlier_ejections_total", &[("cluster", "web"), ("backend", &busy.addr.to_string())]);
            assert_eq!(ejections.unwrap_or(0.0), if count { 1.0 } else { 0.0 }, "{path} count_5xx = {count}");
        }
    }
}

/// Passive outlier detection on both paths: a dead backend is passed over
/// after `consecutive_failures` failed attempts in a row, instead of costing
/// every other request a failed first attempt; `max_ejected_percent` keeps
/// the rest of the pool; `outlier = false` turns it off.
#[test]
fn a_dead_backend_is_ejected_after_failures_in_a_row() {
    let up = Upstream::start("alive");
    let dead = dead_addr();
    let dead2 = (0..20).map(|_| dead_addr()).find(|a| *a != dead).expect("a second free port");
    let errors = |p: &Proxy, b: std::net::SocketAddr| {
        let m = parse_metrics(&p.metrics());
        (
            sample(&m, "switchyard_upstream_requests_total", &[("cluster", "web"), ("backend", &b.to_string()), ("outcome", "connect_error")]),
            sample(&m, "switchyard_outlier_ejections_total", &[("cluster", "web"), ("backend", &b.to_string())]),
        )
    };
    for (path, server) in PATHS {
        let outlier = "retries = 1\noutlier = { consecutive_failures = 3, base_ejection = \"30s\" }";
        let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr, dead], outlier))).server(server).start();
        for i in 0..60 {
            assert_eq!(p.fetch("/").0, 200, "{path}: request {i}");
        }
        assert_eq!(errors(&p, dead), (Some(3.0), Some(1.0)), "{path}: three failed attempts, then ejected");
        let st = p.status();
        let b = st["clusters"][0]["backends"].as_array().unwrap().iter().find(|b| b["address"] == dead.to_string()).unwrap().clone();
        assert!(b["ejected_for_ms"].as_u64().is_some_and(|ms| ms > 20_000 && ms <= 30_000), "{path}: {b}");
        assert!(p.stderr().contains("backend ejected"), "{path}: {}", p.stderr());

        // Off: every other request tries the dead backend first.
        let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr, dead], "retries = 1\noutlier = false")))
            .server(server)
            .start();
        for _ in 0..60 {
            assert_eq!(p.fetch("/").0, 200);
        }
        assert!(errors(&p, dead).0.is_some_and(|n| n >= 25.0), "{path}: {:?}", errors(&p, dead));
        // Retried attempts are counted, not logged one warning each.
        assert!(!p.stderr().contains("Fail to proxy"), "{path}: {}", p.stderr());

        // Two dead backends, at most half ejected: one stays in the pool.
        let p = Proxy::builder(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[dead, dead2], outlier))).server(server).start();
        for _ in 0..20 {
            assert_eq!(p.fetch("/").0, 502);
        }
        let ejected = [errors(&p, dead).1, errors(&p, dead2).1];
        assert_eq!(ejected.iter().map(|e| e.unwrap_or(0.0)).sum::<f64>(), 1.0, "{path}: {ejected:?}");
    }
}

/// A chunked request body in pieces of 100 bytes, `len` bytes in all, with
/// its last chunk.
fn chunked_post(len: usize, close: bool) -> Vec<u8> {
    let mut req = format!("POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n{}\r\n", if close { "Connection: close\r\n" } else { "" }).into_bytes();
    let mut left = len;
    while left > 0 {
        let n = left.min(100);
        req.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        req.extend(std::iter::repeat_n(b'x', n));
        req.extend_from_slice(b"\r\n");
        left -= n;
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// `limits.max_body_bytes` also holds for a chunked body, counted as it
/// streams, on both paths: at the limit it reaches the backend whole; one
/// byte over, the client gets 413 and its connection closes, the backend
/// never receives the whole body (its connection is dropped, not pooled),
/// it counts as `body_too_large`, and the next requests — a GET and another
/// chunked POST, on new connections — are served.
#[test]
fn chunked_bodies_over_the_limit_are_cut_with_413() {
    let up = Upstream::start("ok");
    for (path, server) in PATHS {
        let body = format!("[limits]\nmax_body_bytes = 1000\n[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], ""));
        let p = Proxy::builder(&body).server(server).start();
        let ask = |req: &[u8]| raw_exchange(p.addr, req, Duration::from_secs(5));
        let before = up.bodies().len();
        let at = ask(&chunked_post(1000, true));
        assert!(at.starts_with("HTTP/1.1 200"), "{path}: a body at the limit: {at}");
        let over = ask(&chunked_post(1001, false));
        assert!(over.starts_with("HTTP/1.1 413"), "{path}: a body one byte over: {over}");
        let (_, headers, text) = parse_raw_response(&over);
        assert!(headers.contains(&("connection".into(), "close".into())), "{path}: {headers:?}");
        assert_eq!(text, "request body too large\n", "{path}");
        let big = ask(&chunked_post(50_000, true));
        assert!(big.is_empty() || big.starts_with("HTTP/1.1 413"), "{path}: a body far over: {big}");
        assert_eq!(p.fetch("/canary"), (200, "ok".to_string()), "{path}: the canary after");
        assert!(ask(&chunked_post(999, true)).starts_with("HTTP/1.1 200"), "{path}: a body below the limit after");
        let got: Vec<usize> = up.bodies()[before..].to_vec();
        assert_eq!(got, [1000, 0, 999], "{path}: complete bodies the backend received");
        let m = parse_metrics(&p.metrics());
        let rejected = sample(&m, "switchyard_requests_rejected_total", &[("reason", "body_too_large")]);
        assert!(rejected == Some(2.0), "{path}: counted: {rejected:?}");
    }
}

/// Wait for the proxy to close `s` (bounded by `limit`); how long it took.
/// None: still open at `limit`, or bytes came instead.
fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> Option<Duration> {
    use std::io::Read;
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    match s.read(&mut [0u8; 64]) {
        Ok(0) => Some(t0.elapsed()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(t0.elapsed()),
        _ => None,
    }
}

/// `limits.keepalive_timeout` on both paths, with idle connections parked
/// (the parker closes them) and not: an idle keep-alive connection is closed
/// after it, and one whose client comes back within it is served.
#[test]
fn idle_keepalive_connections_close_after_keepalive_timeout() {
    use std::io::Write;
    let up = Upstream::start("ka");
    for (path, server) in PATHS {
        for park in ["100ms", "off"] {
            let p = Proxy::builder(&format!("[limits]\nkeepalive_timeout = \"1s\"\n[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")))
                .server(&format!("{server}\npark_idle_after = \"{park}\""))
                .start();
            let what = format!("{path}, parking {park}");
            let mut s = std::net::TcpStream::connect(p.addr).unwrap();
            let ask = |s: &mut std::net::TcpStream, i: u32| {
                s.write_all(b"GET /k HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
                let r = read_one_response(s).unwrap_or_default();
                assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ka"), "{what}: request {i}: {r}");
            };
            ask(&mut s, 1);
            // Back within the timeout (twice 0.6 s: more than it in all).
            for i in 2..4 {
                assert_eq!(closed_within(&mut s, Duration::from_millis(600)), None, "{what}: open before request {i}");
                ask(&mut s, i);
            }
            let took = closed_within(&mut s, Duration::from_secs(5));
            assert!(took.is_some_and(|t| t >= Duration::from_millis(700)), "{what}: closed after the idle timeout: {took:?}");
        }
    }
}

/// `limits.header_timeout` on both paths (idle connections parked early, so
/// the parker holds the deadlines too): a head trickled a line every 200 ms
/// gets 408 and a close about 1 s after its first byte — on a new
/// connection and on a kept-alive one idle for longer than that before; a
/// new connection that sends nothing is closed quietly after it; a slow
/// head that is whole in time is served. Each 408 counts as
/// `header_timeout`; none reaches the backend.
#[test]
fn heads_not_complete_within_header_timeout_get_408() {
    use std::io::Write;
    let up = Upstream::start("ok");
    for (path, server) in PATHS {
        let p = Proxy::builder(&format!("[limits]\nheader_timeout = \"1s\"\n[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")))
            .server(&format!("{server}\npark_idle_after = \"200ms\""))
            .start();
        let hits = up.hits();
        let slow = |s: &mut std::net::TcpStream, what: &str| {
            s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let (got, took) = trickle(s, b"GET /slow HTTP/1.1\r\nHost: a\r\n", 40);
            assert!(got.starts_with("HTTP/1.1 408 "), "{path}, {what}: {got}");
            assert!(got.to_ascii_lowercase().contains("connection: close"), "{path}, {what}: {got}");
            assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{path}, {what}: answered after {took:?}");
        };
        slow(&mut std::net::TcpStream::connect(p.addr).unwrap(), "a new connection");
        // Kept alive, idle (and parked) for 1.5 s, then slow.
        let mut s = std::net::TcpStream::connect(p.addr).unwrap();
        s.write_all(b"GET /ka HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert!(read_one_response(&mut s).is_some_and(|r| r.starts_with("HTTP/1.1 200")), "{path}");
        assert_eq!(closed_within(&mut s, Duration::from_millis(1500)), None, "{path}: kept alive");
        slow(&mut s, "a kept-alive connection");
        // Nothing sent: closed without a word.
        let mut idle = std::net::TcpStream::connect(p.addr).unwrap();
        let took = closed_within(&mut idle, Duration::from_secs(5));
        assert!(took.is_some_and(|t| t >= Duration::from_millis(900) && t < Duration::from_secs(3)), "{path}: idle new connection closed after {took:?}");
        // Slow, but whole within the time.
        let mut ok = std::net::TcpStream::connect(p.addr).unwrap();
        for piece in ["GET /fine HTTP/1.1\r\n", "Host: a\r\n", "Connection: close\r\n"] {
            ok.write_all(piece.as_bytes()).unwrap();
            assert_eq!(closed_within(&mut ok, Duration::from_millis(150)), None, "{path}: nothing before the head is whole");
        }
        ok.write_all(b"\r\n").unwrap();
        let r = read_one_response(&mut ok).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: a slow head in time: {r}");
        assert_eq!(up.hits(), hits + 2, "{path}: only the whole heads reached the backend");
        let m = parse_metrics(&p.metrics());
        assert_eq!(sample(&m, "switchyard_requests_rejected_total", &[("reason", "header_timeout")]), Some(2.0), "{path}");
    }
}

/// `limits.max_connections` on both paths: with 2 connections open (kept
/// alive), a third gets 503 with `Retry-After` and `Connection: close` and
/// is closed, counted in `switchyard_downstream_connections_refused_total`
/// and not as open; once one of the two closes, a new connection is served.
#[test]
fn connections_over_max_connections_get_503() {
    use std::io::Write;
    let up = Upstream::start("ok");
    for (path, server) in PATHS {
        let p = Proxy::builder(&format!("[limits]\nmax_connections = 2\n[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")))
            .server(server)
            .start();
        let gauge = |name: &str| sample(&parse_metrics(&p.metrics()), name, &[]).unwrap_or(-1.0);
        // The start-up probes' connections are gone.
        assert!(wait_until(Duration::from_secs(5), || gauge("switchyard_downstream_connections") == 0.0), "{path}");
        let ask = |s: &mut std::net::TcpStream| {
            s.write_all(b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
            read_one_response(s).unwrap_or_default()
        };
        let mut open: Vec<std::net::TcpStream> = (0..2).map(|_| std::net::TcpStream::connect(p.addr).unwrap()).collect();
        for (i, s) in open.iter_mut().enumerate() {
            let r = ask(s);
            assert!(r.starts_with("HTTP/1.1 200"), "{path}: connection {i}: {r}");
        }
        let over = raw_exchange(p.addr, b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n", Duration::from_secs(3));
        assert!(over.starts_with("HTTP/1.1 503 "), "{path}: the third connection: {over}");
        let (_, headers, body) = parse_raw_response(&over);
        assert!(headers.contains(&("connection".into(), "close".into())) && headers.iter().any(|(k, _)| k == "retry-after"), "{path}: {headers:?}");
        assert_eq!(body, "too many connections\n", "{path}");
        assert_eq!(gauge("switchyard_downstream_connections"), 2.0, "{path}: the refused one is not counted");
        assert_eq!(gauge("switchyard_downstream_connections_refused_total"), 1.0, "{path}");
        drop(open.pop());
        assert!(wait_until(Duration::from_secs(5), || gauge("switchyard_downstream_connections") == 1.0), "{path}");
        let mut again = std::net::TcpStream::connect(p.addr).unwrap();
        let r = ask(&mut again);
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: a new connection once one closed: {r}");
        let r = ask(&mut open[0]);
        assert!(r.starts_with("HTTP/1.1 200"), "{path}: the first connection still served: {r}");
    }
}
