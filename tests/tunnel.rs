//! Upgraded connections (WebSocket) have their own idle timeout,
//! `tunnel_timeout`, not the cluster's `read_timeout`: a socket silent for
//! 90 s behind a cluster with a 2 s `read_timeout` still carries messages,
//! and a short `tunnel_timeout` does close a silent one.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use support::*;

/// A WebSocket handshake through the proxy; the stream after the 101.
fn upgraded(p: &Proxy) -> TcpStream {
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET /ws/chat HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed during the handshake: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    assert_eq!(got, msg);
    Ok(())
}

fn proxy(up: &Upstream, cluster_extra: &str) -> Proxy {
    Proxy::start(&format!("[[routes]]\ncluster = \"web\"\n{}", static_cluster("web", &[up.addr], cluster_extra)))
}

#[test]
fn an_idle_websocket_outlives_read_timeout() {
    let up = Upstream::start("ws");
    let p = proxy(&up, "read_timeout = \"2s\"");
    let mut s = upgraded(&p);
    echo(&mut s, b"\x81\x05hello").unwrap();
    // Silence 45 times the cluster's read_timeout: the idle time is what is
    // under test here, so it is waited out, not polled.
    std::thread::sleep(Duration::from_secs(90));
    echo(&mut s, b"\x81\x05again").expect("the tunnel is still open after 90 s of silence");
    // Plain requests on the same cluster still time out at read_timeout.
    up.set_delay(Duration::from_secs(4));
    let t0 = Instant::now();
    assert_eq!(p.fetch("/slow").0, 504);
    assert!(t0.elapsed() < Duration::from_millis(3500), "{:?}", t0.elapsed());
}

#[test]
fn tunnel_timeout_closes_a_silent_websocket() {
    let up = Upstream::start("ws");
    let p = proxy(&up, "tunnel_timeout = \"2s\"");
    let mut s = upgraded(&p);
    echo(&mut s, b"\x81\x02hi").unwrap();
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut b = [0u8; 16];
    let r = s.read(&mut b);
    let took = t0.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "closed, not answered: {r:?}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(10), "closed after {took:?}");
}
