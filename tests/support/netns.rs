//! A small lab of network namespaces on one bridge, for tests that need real
//! hosts: addresses only from 198.18.0.0/15 (the benchmarking range, never
//! routed on the internet), names unique per test process, everything deleted
//! on drop. Processes run inside a namespace through `setns` in the child
//! before exec; sockets made by the test itself (upstreams, the Consul double,
//! the load client) are created on a thread that entered the namespace.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The prefix all lab addresses share (a /24 out of 198.18.0.0/15).
pub const NET: &str = "198.18.0";

/// Whether a failure to build the lab must fail the test (CI runs as root,
/// where a skip would hide a regression) or may skip it.
pub fn must_run() -> bool {
    std::env::var_os("SWITCHYARD_CI").is_some()
}

/// Skip (outside CI) or fail (in CI) with one clear message.
pub fn unavailable(why: &str) -> Option<Lab> {
    if must_run() {
        panic!("network-namespace test cannot run in CI: {why}");
    }
    eprintln!("SKIPPED: {why} (needs root, iproute2 and keepalived; CI runs it)");
    None
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    /// Namespaces `<prefix>-<host>` for each host, plus a bridge namespace;
    /// host i gets `198.18.0.<addr>` on its `eth0`.
    pub fn new(hosts: &[(&str, u8)]) -> Result<Lab, String> {
        let prefix = format!("sy{}", std::process::id());
        let mut lab = Lab {
            prefix: prefix.clone(),
            namespaces: Vec::new(),
        };
        let br = lab.add_ns("br")?;
        lab.ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        lab.ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for (i, (host, addr)) in hosts.iter().enumerate() {
            let ns = lab.add_ns(host)?;
            let port = format!("p{i}");
            lab.ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            lab.ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            lab.ip(&["-n", &ns, "addr", "add", &format!("{NET}.{addr}/24"), "dev", "eth0"])?;
            lab.ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(lab)
    }

    fn add_ns(&mut self, host: &str) -> Result<String, String> {
        let name = format!("{}-{host}", self.prefix);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        Ok(name)
    }

    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        run(Command::new("ip").args(args))
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Run `f` on a new thread inside `host`'s namespace (sockets it makes stay there).
    pub fn within<T: Send + 'static>(&self, host: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.ns(host);
        std::thread::spawn(move || {
            enter(&ns);
            f()
        })
        .join()
        .expect("thread in namespace")
    }

    /// A command that runs inside `host`'s namespace.
    pub fn command(&self, host: &str, program: &str) -> Command {
        let file = File::open(format!("/run/netns/{}", self.ns(host))).expect("namespace file");
        let mut cmd = Command::new(program);
        // SAFETY: setns(2) on an open namespace fd is async-signal-safe; the
        // fd stays open until exec because `file` is moved into the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

/// Move the calling thread into a named namespace.
pub fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    // SAFETY: a valid namespace fd and the matching type.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A child process that is ended (by its PID) when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, name: &str, log: &std::path::Path) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            child: Some(child),
            name: name.to_string(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the PID of our own child.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Wait (bounded) for the process to exit; its exit code, or None.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// One answered (or failed) request of a [`VipLoad`].
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// Start to answer (or failure), retry included.
    pub took: Duration,
    /// The proxy that forwarded it (the upstream's `x-peer`), or the error.
    pub result: Result<String, String>,
}

/// Requests to one address from inside the client namespace: either a new
/// connection per request or one kept-alive connection, until stopped (or a
/// count and time cap). On a kept-alive connection that is reset or closed
/// before any byte of the response, the request is sent again once on a new
/// connection, as HTTP clients do for an idempotent request on a reused
/// connection; those retries are counted, not failed.
pub struct VipLoad {
    stop: Arc<AtomicBool>,
    pub retries: Arc<AtomicU64>,
    samples: Arc<Mutex<Vec<Sample>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

fn exchange(s: &mut TcpStream, host: &str) -> Result<String, (bool, String)> {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| (true, format!("send: {e}")))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => return Err((buf.is_empty(), format!("closed after {} bytes", buf.len()))),
            Ok(n) => n,
            Err(e) => return Err((buf.is_empty(), format!("read after {} bytes: {e}", buf.len()))),
        };
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some(end) = text.find("\r\n\r\n") else { continue };
        let head = &text[..end];
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        if buf.len() < end + 4 + len {
            continue;
        }
        let status = head.split(' ').nth(1).unwrap_or("");
        if status != "200" {
            return Err((false, format!("status {status}")));
        }
        let peer = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-peer:").map(|v| v.trim().to_string()))
            .unwrap_or_default();
        return Ok(peer);
    }
}

/// Longer than the kernel's first SYN retransmission (1 s), as any real
/// client's: a SYN lost while a VIP moves is a slow request, not a failed one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    let io = Duration::from_secs(2).min(timeout * 2);
    s.set_read_timeout(Some(io)).unwrap();
    s.set_write_timeout(Some(io)).unwrap();
    let _ = s.set_nodelay(true);
    Ok(s)
}

impl VipLoad {
    pub fn start(ns: String, addr: SocketAddr, keep_alive: bool, pace: Duration, max_time: Duration) -> VipLoad {
        Self::start_with(ns, addr, keep_alive, pace, max_time, CONNECT_TIMEOUT)
    }

    /// A prober, not a client: a new connection every `pace` with a short
    /// timeout, so one lost SYN does not hide the moment a VIP answers again.
    pub fn probe(ns: String, addr: SocketAddr, pace: Duration, max_time: Duration) -> VipLoad {
        Self::start_with(ns, addr, false, pace, max_time, Duration::from_millis(100))
    }

    fn start_with(ns: String, addr: SocketAddr, keep_alive: bool, pace: Duration, max_time: Duration, connect_timeout: Duration) -> VipLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let retries = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (st, rt, sa) = (stop.clone(), retries.clone(), samples.clone());
        let handle = std::thread::spawn(move || {
            enter(&ns);
            let end = Instant::now() + max_time;
            let host = addr.ip().to_string();
            let mut conn: Option<TcpStream> = None;
            let mut n = 0u64;
            while !st.load(Ordering::SeqCst) && Instant::now() < end && n < 1_000_000 {
                n += 1;
                let at = Instant::now();
                let reused = conn.is_some();
                let mut result = match conn.take() {
                    Some(c) => Ok(c),
                    None => connect(addr, connect_timeout),
                }
                .and_then(|mut c| match exchange(&mut c, &host) {
                    Ok(peer) => {
                        if keep_alive {
                            conn = Some(c);
                        }
                        Ok(peer)
                    }
                    Err((before_response, e)) => Err(if reused && before_response { format!("retry:{e}") } else { e }),
                });
                if let Err(e) = &result {
                    if let Some(e) = e.strip_prefix("retry:") {
                        rt.fetch_add(1, Ordering::SeqCst);
                        let _ = e;
                        result = connect(addr, connect_timeout).and_then(|mut c| match exchange(&mut c, &host) {
                            Ok(peer) => {
                                if keep_alive {
                                    conn = Some(c);
                                }
                                Ok(peer)
                            }
                            Err((_, e)) => Err(format!("retried: {e}")),
                        });
                    }
                }
                sa.lock().unwrap().push(Sample { at, took: at.elapsed(), result });
                std::thread::sleep(pace);
            }
        });
        VipLoad {
            stop,
            retries,
            samples,
            handle: Some(handle),
        }
    }

    /// Everything recorded so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.samples()
    }
}

impl Drop for VipLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
