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
