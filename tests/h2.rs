//! `[limits]` on HTTP/2 client connections over cleartext (h2c, prior
//! knowledge), spoken as raw frames: the idle connection gets a GOAWAY and
//! is closed after `keepalive_timeout`, a stream in progress holds it open,
//! and a connection without a request within `header_timeout` is closed.
//! Over TLS (ALPN `h2`): tests/tls.rs.

mod support;

use std::time::{Duration, Instant};
use support::*;

fn connect(p: &Proxy) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    s
}

/// See [`h2_limits_hold`], on both request paths (HTTP/2 goes to Pingora on
/// both; what differs is how the first bytes are told from HTTP/1). No
/// closed HTTP/2 connection counts as a `header_timeout` rejection.
#[test]
fn h2c_connections_keep_keepalive_timeout_and_header_timeout() {
    for (path, server) in PATHS {
        let up = Upstream::start("h2c");
        let p = Proxy::builder(&format!(
            "[limits]\nkeepalive_timeout = \"2s\"\nheader_timeout = \"1s\"\n[[routes]]\ncluster = \"web\"\n{}",
            static_cluster("web", &[up.addr], "")
        ))
        .server(server)
        .start();
        h2_limits_hold(|| connect(&p), "http", "a", &up, path);
        let m = parse_metrics(&p.metrics());
        assert_eq!(sample(&m, "switchyard_requests_rejected_total", &[("reason", "header_timeout")]), Some(0.0), "{path}");
    }
}

/// A real HTTP/2 client (reqwest, prior knowledge): its idle connection is
/// closed after `keepalive_timeout` (not before half of it), and its next
/// request opens a new one and is served.
#[test]
fn a_real_h2c_client_comes_back_after_its_idle_connection_closed() {
    let up = Upstream::start("back");
    let p = Proxy::start(&format!("[limits]\nkeepalive_timeout = \"1s\"\n[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")));
    let client = reqwest::blocking::Client::builder().http2_prior_knowledge().no_proxy().timeout(Duration::from_secs(5)).build().unwrap();
    let open = || sample(&parse_metrics(&p.metrics()), "switchyard_downstream_connections", &[]).unwrap_or(-1.0);
    for round in 0..2 {
        let r = client.get(p.url("/again")).send().unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.text().unwrap(), "back", "round {round}");
        let t0 = Instant::now();
        assert!(wait_until(Duration::from_millis(500), || open() == 1.0), "round {round}: open");
        assert!(!wait_until(Duration::from_millis(400), || open() == 0.0), "round {round}: still open at half the idle time");
        assert!(wait_until(Duration::from_secs(4), || open() == 0.0), "round {round}: closed after the idle time: {} open", open());
        assert!(t0.elapsed() >= Duration::from_millis(800), "round {round}: closed after {:?}", t0.elapsed());
    }
    assert_eq!(up.hits(), 2);
}

/// The limits are read live: after a reload from `keepalive_timeout = "30s"`
/// to `"1s"`, an HTTP/2 connection opened before it gets its GOAWAY about
/// 1 s after its next request.
#[test]
fn a_reloaded_keepalive_timeout_applies_to_open_h2c_connections() {
    use std::io::Write;
    let up = Upstream::start("live");
    let p = Proxy::start(&format!("[limits]\nkeepalive_timeout = \"30s\"\n[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], "")));
    let mut s = connect(&p);
    s.write_all(H2_PREFACE).unwrap();
    s.write_all(&h2_get(1, "http", "a", "/before")).unwrap();
    let seen = h2_read_to_close(&mut s, Duration::from_millis(500), true, true);
    assert_eq!(seen.response(1).1, "live", "{seen:?}");
    let path = p.path("switchyard.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &text.replace("keepalive_timeout = \"30s\"", "keepalive_timeout = \"1s\""));
    let out = std::process::Command::new(bin())
        .args(["reload", "--admin", &p.admin.to_string(), "--timeout", "15s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    s.write_all(&h2_get(3, "http", "a", "/after")).unwrap();
    let seen = h2_read_to_close(&mut s, Duration::from_secs(5), true, true);
    let (ok, body, end) = seen.response(3);
    assert!(ok && body == "live", "{seen:?}");
    let (at, last, _) = seen.goaway().unwrap_or_else(|| panic!("a GOAWAY: {seen:?}"));
    let after = at - end.unwrap();
    assert!(after >= Duration::from_millis(700) && after < Duration::from_secs(3), "GOAWAY {after:?} after the request");
    assert!(seen.closed.is_some(), "closed: {seen:?}");
    assert!(last == 3 || last == 0x7fff_ffff, "{last}");
}
