//! Test support: real HTTP upstreams on ephemeral loopback ports, a handle on a
//! real `switchyard` process, catalog writers and a load client.
//!
//! Everything here is bounded: waits poll a condition with a deadline, load
//! loops stop on a flag *and* a count/time cap, and processes are ended by the
//! PID we started.

#![allow(dead_code)]

pub mod consul;
pub mod netns;
pub mod tls;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Poll `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback port nothing listens on (bound once, then released).
/// The two request paths, as `[server]` lines: every edge behaviour is
/// tested through both.
pub const PATHS: [(&str, &str); 2] = [("express", "express = true"), ("HttpProxy", "express = false")];

/// A `[clusters.NAME]` section with a static backend list and `extra` lines.
pub fn static_cluster(name: &str, addrs: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[clusters.{name}]\nstatic = [{}]\n{extra}\n", list.join(", "))
}

/// A process's resident memory (VmRSS), MiB; 0 when it is gone.
pub fn rss_mib(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

pub fn dead_addr() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn free_port() -> u16 {
    dead_addr().port()
}

// ---------------------------------------------------------------- upstreams

#[derive(Default)]
struct UpState {
    name: String,
    hits: AtomicU64,
    connections: AtomicU64,
    delay_ms: AtomicU64,
    last: Mutex<Option<(String, http::HeaderMap)>>,
    /// Status `/healthz` answers (0: 200); health checks are counted apart.
    health_status: AtomicU64,
    health_hits: AtomicU64,
    /// Lengths of the request bodies received complete.
    bodies: Mutex<Vec<usize>>,
}

/// A real HTTP/1.1 server (hyper) that answers with its own name, counts
/// requests, remembers the last request's target and headers, optionally
/// delays, and echoes bytes after an `Upgrade` (for WebSocket pass-through).
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn serve(req: Request<Incoming>, st: Arc<UpState>, peer: SocketAddr) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/healthz" {
        st.health_hits.fetch_add(1, Ordering::SeqCst);
        let status = match st.health_status.load(Ordering::SeqCst) {
            0 => 200,
            s => s as u16,
        };
        return Ok(Response::builder().status(status).body(Full::new(Bytes::from_static(b"health"))).unwrap());
    }
    st.hits.fetch_add(1, Ordering::SeqCst);
    *st.last.lock().unwrap() = Some((req.uri().to_string(), req.headers().clone()));
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if req.headers().get("upgrade").is_some() {
        let mut req = req;
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if let Ok(body) = req.into_body().collect().await {
        st.bodies.lock().unwrap().push(body.to_bytes().len());
    }
    Ok(Response::builder()
        .header("x-upstream", st.name.as_str())
        // Who connected: which proxy of a pair forwarded this request.
        .header("x-peer", peer.ip().to_string())
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(st.name.clone())))
        .unwrap())
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        Self::start_on(name, StdListener::bind("127.0.0.1:0").unwrap())
    }

    /// Serve on a listener made elsewhere (e.g. inside a network namespace).
    pub fn start_on(name: &str, std_listener: StdListener) -> Upstream {
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let state = Arc::new(UpState {
            name: name.to_string(),
            ..Default::default()
        });
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        acc = listener.accept() => {
                            let Ok((stream, peer)) = acc else { continue };
                            st.connections.fetch_add(1, Ordering::SeqCst);
                            let st = st.clone();
                            tokio::spawn(async move {
                                let svc = service_fn(move |req| serve(req, st.clone(), peer));
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .with_upgrades()
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        Upstream {
            addr,
            state,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Make `/healthz` answer `status` (200: healthy).
    pub fn set_health(&self, status: u16) {
        self.state.health_status.store(status as u64, Ordering::SeqCst);
    }

    /// `/healthz` requests received (active health checks).
    pub fn health_hits(&self) -> u64 {
        self.state.health_hits.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, d: Duration) {
        self.state.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Lengths of the request bodies received complete, in order (0 for
    /// a request without a body).
    pub fn bodies(&self) -> Vec<usize> {
        self.state.bodies.lock().unwrap().clone()
    }

    /// Target and headers of the last request received.
    pub fn last_request(&self) -> Option<(String, http::HeaderMap)> {
        self.state.last.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backend that accepts, reads the request, and resets the connection
/// before sending a single response byte.
pub struct ResetUpstream {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl ResetUpstream {
    pub fn start() -> ResetUpstream {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = c.read(&mut buf);
                        h.fetch_add(1, Ordering::SeqCst);
                        // SO_LINGER 0: close with RST.
                        let sock = socket_linger_zero(&c);
                        drop(c);
                        let _ = sock;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ResetUpstream { addr, hits, stop }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

fn socket_linger_zero(c: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

impl Drop for ResetUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------- catalogs

/// Render a catalog: service → [(addr, weight)].
pub fn catalog_json(services: &[(&str, Vec<(SocketAddr, u32)>)]) -> String {
    let mut m = serde_json::Map::new();
    for (name, insts) in services {
        let v: Vec<serde_json::Value> = insts
            .iter()
            .map(|(a, w)| serde_json::json!({ "address": a.ip().to_string(), "port": a.port(), "weight": w }))
            .collect();
        m.insert(name.to_string(), serde_json::Value::Array(v));
    }
    serde_json::to_string_pretty(&serde_json::Value::Object(m)).unwrap()
}

/// Replace a file atomically (write a temp file, rename over).
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------- the proxy

/// Environment variables that would change how the proxy reaches Consul.
pub const CONSUL_ENV: &[&str] = &[
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
    "CONSUL_CAPATH",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_TLS_SERVER_NAME",
];

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchyard")
}

/// A running `switchyard run` with its own temp dir, ports and config.
pub struct Proxy {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub http: reqwest::blocking::Client,
}

pub struct ProxyBuilder {
    env: Vec<(String, String)>,
    threads: u32,
    server: String,
    body: String,
    files: Vec<(String, String)>,
    access_log: String,
    admin: String,
    log_level: String,
}

impl ProxyBuilder {
    /// Worker threads (default 1).
    pub fn threads(mut self, n: u32) -> Self {
        self.threads = n;
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Extra lines for the `[server]` section.
    pub fn server(mut self, lines: &str) -> Self {
        self.server.push_str(lines);
        self.server.push('\n');
        self
    }

    /// Write a file into the proxy's directory before start (e.g. a catalog).
    pub fn file(mut self, name: &str, text: &str) -> Self {
        self.files.push((name.into(), text.into()));
        self
    }

    /// Extra lines for the `[admin]` section.
    pub fn admin(mut self, lines: &str) -> Self {
        self.admin.push_str(lines);
        self.admin.push('\n');
        self
    }

    /// The `--log-level` filter (default `info,pingora=warn`).
    pub fn log_level(mut self, filter: &str) -> Self {
        self.log_level = filter.into();
        self
    }

    /// Replace the `[access_log]` section.
    pub fn access_log(mut self, section: &str) -> Self {
        self.access_log = section.into();
        self
    }

    pub fn start(self) -> Proxy {
        let mut dir = tempfile::tempdir().unwrap();
        for (name, text) in &self.files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        for _attempt in 0..5 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            // Two free ports, never the same one twice.
            let admin_port = (0..20).map(|_| free_port()).find(|p| *p != addr.port()).expect("a second free port");
            let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
            let config = format!(
                "[server]\nthreads = {threads}\n{server}\n[admin]\nlisten = \"{admin}\"\n{admin_extra}\n{log}\n\n[[listeners]]\naddress = \"{addr}\"\n\n{body}\n",
                threads = self.threads,
                server = self.server,
                admin_extra = self.admin,
                log = self.access_log,
                body = self.body
            );
            // `{dir}` in any section stands for the proxy's own directory.
            let config = config.replace("{dir}", &dir.path().display().to_string());
            let cfg = dir.path().join("switchyard.toml");
            std::fs::write(&cfg, &config).unwrap();
            let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
            let mut cmd = Command::new(bin());
            for var in CONSUL_ENV {
                cmd.env_remove(var);
            }
            cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let child = cmd
                .args(["run", "--config"])
                .arg(&cfg)
                .args(["--log-level", &self.log_level])
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn switchyard");
            let http = reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .no_proxy()
                .build()
                .unwrap();
            let mut p = Proxy {
                child: Some(child),
                addr,
                admin,
                dir,
                http,
            };
            if p.wait_listening() {
                return p;
            }
            // Port raced with someone else, or startup failed: try new ports.
            let log = p.stderr();
            p.kill();
            if !log.contains("Address already in use") {
                panic!("switchyard did not start:\n{log}");
            }
            dir = p.take_dir();
        }
        panic!("switchyard did not start after 5 attempts");
    }
}

impl Proxy {
    /// `body` holds the `[[routes]]` and `[clusters.*]` sections.
    pub fn builder(body: &str) -> ProxyBuilder {
        ProxyBuilder {
            env: Vec::new(),
            threads: 1,
            server: String::new(),
            body: body.to_string(),
            files: Vec::new(),
            access_log: "[access_log]\npath = \"access.log\"".into(),
            admin: String::new(),
            log_level: "info,pingora=warn".into(),
        }
    }

    pub fn start(body: &str) -> Proxy {
        Self::builder(body).start()
    }

    fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    fn wait_listening(&mut self) -> bool {
        let admin = self.admin;
        let addr = self.addr;
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            if TcpStream::connect(admin).is_ok() && TcpStream::connect(addr).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Start `switchyard run --upgrade` on this proxy's config: it takes the
    /// sockets over, and this `Proxy` then follows the new process (the old
    /// one is returned, to wait for its exit).
    pub fn upgrade(&mut self) -> Child {
        let stderr = std::fs::OpenOptions::new().append(true).open(self.dir.path().join("stderr.log")).unwrap();
        let mut cmd = Command::new(bin());
        for var in CONSUL_ENV {
            cmd.env_remove(var);
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(self.dir.path().join("switchyard.toml"))
            .args(["--upgrade", "--log-level", "info,pingora=info"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn switchyard --upgrade");
        self.child.replace(child).expect("a running proxy")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.http.get(self.url(path)).send().unwrap()
    }

    /// GET and return (status, body).
    pub fn fetch(&self, path: &str) -> (u16, String) {
        let r = self.get(path);
        let s = r.status().as_u16();
        (s, r.text().unwrap_or_default())
    }

    /// Generation of the routing table serving now.
    pub fn generation(&self) -> u64 {
        self.status()["generation"].as_u64().unwrap()
    }

    /// Wait for a routing table newer than `prev`, then check that a few
    /// requests all land on `allowed` (backend names). Returns the time from
    /// `since` until the new table was seen, or None past `limit`.
    pub fn wait_for_set<T>(&self, prev: u64, allowed: &std::collections::HashSet<T>, since: Instant, limit: Duration) -> Option<Duration>
    where
        T: std::borrow::Borrow<str> + Eq + std::hash::Hash + std::fmt::Debug,
    {
        if !wait_until(limit, || self.generation() > prev) {
            return None;
        }
        let took = since.elapsed();
        for _ in 0..allowed.len() * 3 {
            let (code, body) = self.fetch("/");
            assert_eq!(code, 200);
            assert!(allowed.contains(body.as_str()), "{body} answered after the swap; allowed {allowed:?}");
        }
        Some(took)
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.http.get(self.admin_url("/status")).send().unwrap().text().unwrap()).unwrap()
    }

    pub fn metrics(&self) -> String {
        self.http.get(self.admin_url("/metrics")).send().unwrap().text().unwrap()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- metrics

/// Parse Prometheus text format strictly enough to catch malformed output:
/// returns (name, labels, value) per sample; panics on a line that is not
/// a comment, blank, or `name{labels} value`.
pub fn parse_metrics(text: &str) -> Vec<(String, Vec<(String, String)>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            if line.starts_with("# ") {
                let mut parts = line.splitn(4, ' ');
                let _ = parts.next();
                let kind = parts.next().unwrap();
                assert!(kind == "HELP" || kind == "TYPE", "bad comment line {line:?}");
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((n, rest)) => {
                let rest = rest.strip_suffix('}').unwrap_or_else(|| panic!("bad labels in {line:?}"));
                let mut labels = Vec::new();
                for pair in split_labels(rest) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label in {line:?}"));
                    let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or_else(|| panic!("unquoted label in {line:?}"));
                    labels.push((k.to_string(), v.to_string()));
                }
                (n.to_string(), labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        out.push((name, labels, value));
    }
    out
}

fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_q = false;
    let mut esc = false;
    for c in s.chars() {
        if esc {
            cur.push(c);
            esc = false;
            continue;
        }
        match c {
            '\\' => {
                esc = true;
                cur.push(c)
            }
            '"' => {
                in_q = !in_q;
                cur.push(c)
            }
            ',' if !in_q => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The value of one sample with exactly these labels (order-insensitive).
pub fn sample(samples: &[(String, Vec<(String, String)>, f64)], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
}

// ---------------------------------------------------------------- load

/// Results of a background load loop.
#[derive(Default, Debug)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub failures: Vec<String>,
}

/// Sends GETs in a loop on one keep-alive connection until stopped, or until
/// `max_requests` / `max_time` (whichever first).
pub struct Load {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<LoadReport>>,
}

impl Load {
    /// Like [`Load::start`], with a new connection for every request.
    pub fn start_fresh(url: String, max_requests: u64, max_time: Duration) -> Load {
        Self::start_with(url, max_requests, max_time, false)
    }

    pub fn start(url: String, max_requests: u64, max_time: Duration) -> Load {
        Self::start_with(url, max_requests, max_time, true)
    }

    fn start_with(url: String, max_requests: u64, max_time: Duration, keep_alive: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let handle = std::thread::spawn(move || {
            let mut client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).no_proxy();
            if !keep_alive {
                client = client.pool_max_idle_per_host(0);
            }
            let client = client.build().unwrap();
            let end = Instant::now() + max_time;
            let mut rep = LoadReport::default();
            while !s.load(Ordering::SeqCst) && Instant::now() < end && rep.ok + rep.failed < max_requests {
                match client.get(&url).send() {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes();
                        rep.ok += 1;
                    }
                    Ok(r) => {
                        rep.failed += 1;
                        if rep.failures.len() < 20 {
                            rep.failures.push(format!("status {}", r.status()));
                        }
                    }
                    Err(e) => {
                        rep.failed += 1;
                        if rep.failures.len() < 20 {
                            rep.failures.push(e.to_string());
                        }
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
            }
            rep
        });
        Load {
            stop,
            count,
            handle: Some(handle),
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    pub fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// A raw HTTP/1.1 exchange on a fresh connection: send bytes, read until the
/// peer closes or `timeout`. For requests reqwest won't send (absolute-form,
/// garbage, upgrades).
pub fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Load {
    /// Wait for the loop to reach its own count or time cap.
    pub fn join(mut self) -> LoadReport {
        self.handle.take().unwrap().join().unwrap()
    }
}

/// A backend that answers every request with the same raw bytes, to test
/// response framing (chunked, close-delimited, 204/304, HTTP/1.0). After
/// each response it closes the connection if `close` is set, else waits for
/// the next request. Serves for at most 120 s; stops when dropped.
pub struct RawUpstream {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl RawUpstream {
    pub fn start(response: &'static [u8], close: bool) -> RawUpstream {
        Self::start_with(response, close, false)
    }

    /// Answers the first request on each connection and keeps it open, then
    /// reads the second and closes without answering: a keep-alive connection
    /// that dies just as it is reused.
    pub fn start_dropping_reused(response: &'static [u8]) -> RawUpstream {
        Self::start_with(response, false, true)
    }

    fn start_with(response: &'static [u8], close: bool, drop_second: bool) -> RawUpstream {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                match l.accept() {
                    Ok((c, _)) => {
                        std::thread::spawn(move || raw_serve(c, response, close, drop_second, end));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawUpstream { addr, stop }
    }
}

fn raw_serve(mut c: TcpStream, response: &[u8], close: bool, drop_second: bool, end: Instant) {
    let mut answered = 0;
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        // One response per complete request head (no request bodies here).
        while let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.drain(..p + 4);
            if drop_second && answered == 1 {
                return; // closed without an answer
            }
            if c.write_all(response).is_err() || close {
                return;
            }
            answered += 1;
        }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A raw HTTP/1.1 response split into (status line, lower-cased headers
/// sorted, without `date`, body with chunked framing removed).
pub fn parse_raw_response(raw: &str) -> (String, Vec<(String, String)>, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("").to_string();
    let mut headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(k, _)| k != "date")
        .collect();
    headers.sort();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
        }
        out
    } else {
        body.to_string()
    };
    (status, headers, body)
}

// ---------------------------------------------------------------- churn

/// The churn cycle shared by the Consul churn tests and bench: register a
/// spare instance, fail a live one, pass a failed one, deregister a live one.
/// Instance `i` is `ups[i]`, registered in service `web` as ID `u{i}` on node
/// `node-u{i}`; at least two instances stay live with four upstreams.
pub struct Churn {
    pub live: Vec<usize>,
    pub down: Vec<usize>,
}

impl Churn {
    /// Register `ups[i]` for each `i` in `live`.
    pub fn start(consul: &consul::ConsulDouble, ups: &[Upstream], live: Vec<usize>) -> Churn {
        for &i in &live {
            Churn::register(consul, ups, i);
        }
        Churn { live, down: Vec::new() }
    }

    pub fn register(consul: &consul::ConsulDouble, ups: &[Upstream], i: usize) {
        let a = ups[i].addr;
        consul.register(consul::Instance::new(&format!("node-u{i}"), &format!("u{i}"), "web", &a.ip().to_string(), a.port()));
    }

    /// Make event `e` of the cycle; returns the instance it moved and whether
    /// that instance now takes traffic (true) or no longer does (false).
    pub fn step(&mut self, e: usize, consul: &consul::ConsulDouble, ups: &[Upstream]) -> (usize, bool) {
        match e % 4 {
            0 => {
                let i = (0..ups.len()).find(|i| !self.live.contains(i) && !self.down.contains(i)).expect("a spare instance");
                Churn::register(consul, ups, i);
                self.live.push(i);
                (i, true)
            }
            1 => {
                let i = self.live.remove(0);
                consul.set_health(&format!("node-u{i}"), &format!("u{i}"), "critical");
                self.down.push(i);
                (i, false)
            }
            2 => {
                let i = self.down.remove(0);
                consul.set_health(&format!("node-u{i}"), &format!("u{i}"), "passing");
                self.live.push(i);
                (i, true)
            }
            _ => {
                let i = self.live.remove(0);
                consul.deregister(&format!("node-u{i}"), &format!("u{i}"));
                (i, false)
            }
        }
    }

    /// Names of the instances that should take traffic now.
    pub fn allowed<'a>(&self, ups: &'a [Upstream]) -> std::collections::HashSet<&'a str> {
        self.live.iter().map(|&i| ups[i].name()).collect()
    }
}

/// A slow client: after `first` (the start of a request head), one more
/// header line each time a read waits out its timeout (set by the caller,
/// e.g. 200 ms), at most `max_lines`. Returns what the peer sent until it
/// closed (or 2 s passed after its first byte or the last line), and the
/// time from `first` to its first byte (or to the close).
pub fn trickle<S: Read + Write>(s: &mut S, first: &[u8], max_lines: usize) -> (String, Duration) {
    let t0 = Instant::now();
    let _ = s.write_all(first).and_then(|_| s.flush());
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut answered: Option<Duration> = None;
    let (mut lines, mut last) = (0, Instant::now());
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answered.get_or_insert(t0.elapsed());
                got.extend_from_slice(&buf[..n]);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                let quiet_since = answered.map(|a| t0 + a).unwrap_or(last);
                if answered.is_some() || lines == max_lines {
                    if quiet_since.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                    continue;
                }
                let _ = s.write_all(format!("X-Trickle-{lines}: {}\r\n", "t".repeat(8)).as_bytes()).and_then(|_| s.flush());
                lines += 1;
                last = Instant::now();
            }
            Err(_) => break,
        }
    }
    let took = answered.unwrap_or_else(|| t0.elapsed());
    (String::from_utf8_lossy(&got).into_owned(), took)
}

/// An HTTP/2 client's preface and an empty SETTINGS frame.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// HTTP/2 frame types (RFC 9113 section 6).
pub const H2_DATA: u8 = 0;
pub const H2_HEADERS: u8 = 1;
pub const H2_SETTINGS: u8 = 4;
pub const H2_PING: u8 = 6;
pub const H2_GOAWAY: u8 = 7;

/// One HTTP/2 frame.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A GET request on `stream`: one HEADERS frame (END_HEADERS, END_STREAM),
/// the pseudo-headers as HPACK literals of static-table names.
pub fn h2_get(stream: u32, scheme: &str, authority: &str, path: &str) -> Vec<u8> {
    let scheme = match scheme {
        "https" => 0x87,
        _ => 0x86,
    };
    let mut block = vec![0x82, scheme];
    for (name, value) in [(4u8, path), (1, authority)] {
        assert!(value.len() < 127);
        block.extend_from_slice(&[name, value.len() as u8]);
        block.extend_from_slice(value.as_bytes());
    }
    h2_frame(H2_HEADERS, 0x5, stream, &block)
}

/// A frame as received: type, flags, stream, payload, and when (since the
/// read began).
#[derive(Debug, Clone)]
pub struct H2Got {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
    pub at: Duration,
}

/// What a raw HTTP/2 client read until the peer closed.
#[derive(Debug, Default)]
pub struct H2Seen {
    pub frames: Vec<H2Got>,
    /// Time until the peer closed (end of stream or an error); None: still
    /// open when the read gave up.
    pub closed: Option<Duration>,
}

impl H2Seen {
    /// The response on `stream`: whether its HEADERS say 200 (HPACK static
    /// index 8, as h2 encodes it), its body, and when it ended (END_STREAM).
    pub fn response(&self, stream: u32) -> (bool, String, Option<Duration>) {
        let mine = self.frames.iter().filter(|f| f.stream == stream);
        let ok = mine.clone().any(|f| f.kind == H2_HEADERS && f.payload.first() == Some(&0x88));
        let body: Vec<u8> = mine.clone().filter(|f| f.kind == H2_DATA).flat_map(|f| f.payload.clone()).collect();
        let end = mine.filter(|f| matches!(f.kind, H2_DATA | H2_HEADERS) && f.flags & 1 == 1).map(|f| f.at).next();
        (ok, String::from_utf8_lossy(&body).into_owned(), end)
    }

    /// The first GOAWAY: when, its last stream id and error code.
    pub fn goaway(&self) -> Option<(Duration, u32, u32)> {
        self.frames.iter().find(|f| f.kind == H2_GOAWAY && f.payload.len() >= 8).map(|f| {
            let last = u32::from_be_bytes(f.payload[0..4].try_into().unwrap()) & 0x7fff_ffff;
            let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
            (f.at, last, code)
        })
    }
}

/// Read HTTP/2 frames until the peer closes or `limit` passes, as a polite
/// client: the server's SETTINGS (`ack_settings`) and PINGs (`ack_pings`)
/// are acknowledged (not: a client gone quiet, or one that has not sent
/// its whole preface, after which an acknowledgement would be garbage).
/// The stream's read timeout (set by the caller, e.g. 100 ms) paces the
/// checks of `limit`.
pub fn h2_read_to_close<S: Read + Write>(s: &mut S, limit: Duration, ack_settings: bool, ack_pings: bool) -> H2Seen {
    let t0 = Instant::now();
    let mut seen = H2Seen::default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    while t0.elapsed() < limit {
        match s.read(&mut chunk) {
            Ok(0) => {
                seen.closed = Some(t0.elapsed());
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => {
                seen.closed = Some(t0.elapsed());
                break;
            }
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let f = H2Got {
                kind: buf[3],
                flags: buf[4],
                stream: u32::from_be_bytes(buf[5..9].try_into().unwrap()) & 0x7fff_ffff,
                payload: buf[9..9 + len].to_vec(),
                at: t0.elapsed(),
            };
            buf.drain(..9 + len);
            let ack = match f.kind {
                H2_SETTINGS if f.flags & 1 == 0 && ack_settings => Some(h2_frame(H2_SETTINGS, 1, 0, &[])),
                H2_PING if f.flags & 1 == 0 && ack_pings => Some(h2_frame(H2_PING, 1, 0, &f.payload)),
                _ => None,
            };
            if let Some(a) = ack {
                let _ = s.write_all(&a).and_then(|_| s.flush());
            }
            seen.frames.push(f);
        }
    }
    seen
}

/// `[limits]` on HTTP/2 client connections, made by `connect` (read
/// timeout 100 ms) to a proxy with `keepalive_timeout = "2s"` and
/// `header_timeout = "1s"` in front of `up`, which this sets to delay 3 s
/// at the end. Checked at once, each on a connection of its own:
/// * after one request, the idle connection gets a GOAWAY (NO_ERROR) 2 s
///   after the response and is closed: at once when the client answers the
///   PING that follows it, about 1 s later when it does not;
/// * a connection that sends its preface and SETTINGS but no request, only
///   part of its preface, or nothing, is closed about 1 s after it opened,
///   without a GOAWAY.
///
/// Then: a request the upstream answers in 3 s (longer than the idle time)
/// is answered, and the GOAWAY comes 2 s after it.
pub fn h2_limits_hold<S: Read + Write + Send>(connect: impl Fn() -> S + Sync, scheme: &str, authority: &str, up: &Upstream, what: &str) {
    let ms = Duration::from_millis;
    std::thread::scope(|sc| {
        let idle = |ack_pings: bool| {
            let connect = &connect;
            sc.spawn(move || {
                let mut s = connect();
                s.write_all(H2_PREFACE).unwrap();
                s.write_all(&h2_get(1, scheme, authority, "/idle")).unwrap();
                s.flush().unwrap();
                h2_read_to_close(&mut s, Duration::from_secs(8), true, ack_pings)
            })
        };
        let quiet = |first: &'static [u8]| {
            let connect = &connect;
            sc.spawn(move || {
                let mut s = connect();
                s.write_all(first).unwrap();
                s.flush().unwrap();
                h2_read_to_close(&mut s, Duration::from_secs(5), first == H2_PREFACE, true)
            })
        };
        let (polite, silent) = (idle(true), idle(false));
        let quiet: Vec<_> = [("preface and SETTINGS", H2_PREFACE), ("half a preface", &H2_PREFACE[..12]), ("nothing", &b""[..])]
            .into_iter()
            .map(|(how, first)| (how, quiet(first)))
            .collect();
        for (who, seen, grace) in [("a client answering PINGs", polite, ms(0)..ms(700)), ("a client not answering PINGs", silent, ms(800)..ms(2000))] {
            let seen = seen.join().unwrap();
            let (ok, body, end) = seen.response(1);
            assert!(ok && body == up.name(), "{what}, {who}: the request is answered: {seen:?}");
            let end = end.unwrap();
            let (at, last, code) = seen.goaway().unwrap_or_else(|| panic!("{what}, {who}: a GOAWAY: {seen:?}"));
            assert!(at - end >= ms(1700) && at - end < ms(4000), "{what}, {who}: GOAWAY {:?} after the response", at - end);
            assert_eq!(code, 0, "{what}, {who}: GOAWAY with NO_ERROR");
            assert!(last == 1 || last == 0x7fff_ffff, "{what}, {who}: GOAWAY's last stream {last}");
            let closed = seen.closed.unwrap_or_else(|| panic!("{what}, {who}: closed after the GOAWAY: {seen:?}"));
            assert!(grace.contains(&(closed - at)), "{what}, {who}: closed {:?} after the GOAWAY, not within {grace:?}", closed - at);
        }
        for (how, seen) in quiet {
            let seen = seen.join().unwrap();
            let closed = seen.closed.unwrap_or_else(|| panic!("{what}, {how}: closed: {seen:?}"));
            assert!(closed >= ms(800) && closed < ms(1900), "{what}, {how}: closed after {closed:?}: {seen:?}");
            assert!(seen.goaway().is_none(), "{what}, {how}: closed without a GOAWAY: {seen:?}");
        }
    });
    up.set_delay(Duration::from_secs(3));
    let mut s = connect();
    s.write_all(H2_PREFACE).unwrap();
    s.write_all(&h2_get(1, scheme, authority, "/slow")).unwrap();
    s.flush().unwrap();
    let seen = h2_read_to_close(&mut s, Duration::from_secs(10), true, true);
    let (ok, body, end) = seen.response(1);
    assert!(ok && body == up.name(), "{what}, a slow request: answered: {seen:?}");
    let end = end.unwrap();
    assert!(end >= ms(2900), "{what}, a slow request: answered after {end:?}");
    let (at, _, _) = seen.goaway().unwrap_or_else(|| panic!("{what}, a slow request: a GOAWAY after it: {seen:?}"));
    assert!(at > end && at - end >= ms(1700), "{what}, a slow request: no GOAWAY while it was in progress: at {at:?}, answered at {end:?}");
    assert!(seen.closed.is_some(), "{what}, a slow request: closed after the GOAWAY");
}
