//! One node of a keepalived pair: what "ready to hold a floating address"
//! means, how that is pushed to keepalived, and the SIGTERM hand-off.
//!
//! keepalived runs a `vrrp_script` at most once a second, far too slow to move
//! a VIP in under half a second, so Switchyard pushes instead: every
//! `ha.interval` it evaluates its readiness and, on a change only, writes `0`
//! (ready) or `1` (not ready) into `ha.track_file` (temp file + rename, so
//! keepalived never reads half a write). keepalived's `track_file` with a
//! negative weight turns a `1` into a lower priority: the VIP moves to the
//! peer by a *demote*, which loses no request, not by FAULT, which does.
//!
//! Ready means, all at once:
//! * not handing off (SIGTERM demotes first, then waits for the peer);
//! * every proxy listener accepts a TCP connection (probed from inside);
//! * every cluster has had a discovery result (fresh, or loaded from the
//!   Consul state file and younger than `ha.max_persisted_age`), and some
//!   cluster has a backend to send requests to;
//! * the last write of the track file succeeded (a node must not claim a
//!   readiness it cannot report).
//!
//! Losing Consul while serving the last good table is *not* a reason to give
//! up a VIP: both nodes share that failure, and demoting both would move
//! nothing while flapping. A SIGKILLed process cannot write anything; that is
//! detected outside, by keepalived's `track_process` (docs/ha.md).

use crate::config::HaSettings;
use crate::discovery::consul::ViewRx;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::status::unix;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;

/// Listener probes run at most this often (each is a connect and a close).
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// After `run --upgrade`, how long the new process holds back a "not ready"
/// while it warms up, so an upgrade does not demote the node.
const UPGRADE_HOLD: Duration = Duration::from_secs(10);

/// The readiness verdict and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    pub ready: bool,
    /// Empty when ready.
    pub reasons: Vec<String>,
}

/// What `/status` shows under `ha`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HaStatus {
    pub track_file: Option<String>,
    /// The value last written (`"0"` ready, `"1"` not ready), if any.
    pub written: Option<&'static str>,
    pub last_write_unix: Option<f64>,
    pub track_file_error: Option<String>,
    pub listener_error: Option<String>,
    pub handing_off: bool,
    pub vips_local: Vec<String>,
}

pub struct Ha {
    settings: HaSettings,
    /// Where to probe each proxy listener (an unspecified address is probed on loopback).
    probes: Vec<SocketAddr>,
    snapshot: Arc<Snapshot>,
    consul: Option<ViewRx>,
    metrics: Arc<Metrics>,
    handing_off: AtomicBool,
    /// Set on SIGQUIT: the sockets go to a new process, which now owns the
    /// track file and the Consul registration.
    retired: AtomicBool,
    listeners_ok: AtomicBool,
    wake: Notify,
    started: Instant,
    upgrade: bool,
    /// READY=1 sent to systemd (once the listeners first accept).
    notified: AtomicBool,
    status: Mutex<HaStatus>,
}

/// The address to connect to for a listener bound to `addr`.
fn probe_target(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Whether this host (network namespace) holds `ip` on an interface other
/// than loopback: that is where keepalived adds a VIP while it is master. A
/// copy of the VIP on `lo` (the recipe in docs/ha.md keeps one there, so that
/// replies to requests accepted just before a move still leave) does not
/// count.
pub fn holds(ip: IpAddr) -> bool {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return false;
    }
    let mut found = false;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & (libc::IFF_LOOPBACK as u32) != 0 {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr = match family {
            libc::AF_INET => {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        if addr == ip {
            found = true;
            break;
        }
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// Replace `path` with `value` atomically (temp file in the same directory, then rename).
fn write_atomic(path: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".switchyard-track").tempfile_in(dir)?;
    tmp.write_all(value.as_bytes())?;
    tmp.as_file().sync_data()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl Ha {
    pub fn new(
        settings: HaSettings,
        listeners: &[SocketAddr],
        snapshot: Arc<Snapshot>,
        consul: Option<ViewRx>,
        metrics: Arc<Metrics>,
        upgrade: bool,
    ) -> Arc<Ha> {
        let status = HaStatus {
            track_file: settings.track_file.as_ref().map(|p| p.display().to_string()),
            ..HaStatus::default()
        };
        Arc::new(Ha {
            probes: listeners.iter().map(|&a| probe_target(a)).collect(),
            settings,
            snapshot,
            consul,
            metrics,
            handing_off: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            listeners_ok: AtomicBool::new(false),
            wake: Notify::new(),
            started: Instant::now(),
            upgrade,
            notified: AtomicBool::new(false),
            status: Mutex::new(status),
        })
    }

    pub fn settings(&self) -> &HaSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HaStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Readiness from everything but the track file itself.
    fn serving_verdict(&self) -> Verdict {
        let mut reasons = Vec::new();
        if self.handing_off.load(Ordering::Relaxed) {
            reasons.push("handing off (SIGTERM): demoted, waiting for the peer to take the floating addresses".to_string());
        }
        if !self.listeners_ok.load(Ordering::Relaxed) {
            let why = self.lock().listener_error.clone();
            reasons.push(why.unwrap_or_else(|| "listeners not probed yet".to_string()));
        }
        let table = self.snapshot.load();
        let pending = table.pending_clusters();
        if !pending.is_empty() {
            reasons.push(format!("waiting for a first discovery result for cluster(s): {}", pending.join(", ")));
        } else if !table.clusters.is_empty() && table.clusters.iter().all(|c| c.active.is_empty()) {
            reasons.push("no backend to serve: every cluster is empty".to_string());
        }
        if let (Some(rx), Some(max)) = (&self.consul, self.settings.max_persisted_age) {
            let view = rx.borrow().clone();
            let now = SystemTime::now();
            let old: Vec<String> = view
                .services
                .iter()
                .filter(|(_, s)| s.from_state_file)
                .filter(|(_, s)| now.duration_since(s.synced_at).unwrap_or_default() > max)
                .map(|(q, _)| q.service.clone())
                .collect();
            if !old.is_empty() {
                reasons.push(format!(
                    "serving only a persisted table older than ha.max_persisted_age ({}) for service(s): {}",
                    humantime::format_duration(max),
                    old.join(", ")
                ));
            }
        }
        Verdict {
            ready: reasons.is_empty(),
            reasons,
        }
    }

    /// The verdict `/readyz?vrrp` and `switchyard health` report.
    pub fn verdict(&self) -> Verdict {
        let mut v = self.serving_verdict();
        if let Some(e) = self.lock().track_file_error.clone() {
            v.ready = false;
            v.reasons.push(format!("cannot write ha.track_file: {e}"));
        }
        v
    }

    pub fn status(&self) -> HaStatus {
        let mut s = self.lock().clone();
        s.handing_off = self.handing_off.load(Ordering::Relaxed);
        s.vips_local = self.settings.vips.iter().filter(|ip| holds(**ip)).map(|ip| ip.to_string()).collect();
        s
    }

    async fn probe_listeners(&self) {
        let mut error = None;
        for &addr in &self.probes {
            match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    error = Some(format!("listener {addr} does not accept: {e}"));
                    break;
                }
                Err(_) => {
                    error = Some(format!("listener {addr} does not accept: no answer within {PROBE_TIMEOUT:?}"));
                    break;
                }
            }
        }
        let ok = error.is_none();
        self.listeners_ok.store(ok, Ordering::Relaxed);
        self.lock().listener_error = error;
        if ok && !self.retired() {
            self.notify_ready();
        }
    }

    /// Write the value for `ready` if it differs from the last one written
    /// (or the last write failed).
    fn push(&self, ready: bool) {
        let Some(path) = &self.settings.track_file else { return };
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let value = if ready { "0" } else { "1" };
        {
            let s = self.lock();
            if s.written == Some(value) && s.track_file_error.is_none() {
                return;
            }
        }
        let result = write_atomic(path, &format!("{value}\n"));
        let mut s = self.lock();
        match result {
            Ok(()) => {
                self.metrics.ha_track_file_writes.inc();
                if s.track_file_error.take().is_some() {
                    tracing::info!(path = %path.display(), "ha.track_file writable again");
                }
                tracing::info!(path = %path.display(), ready, "VRRP readiness written");
                s.written = Some(value);
                s.last_write_unix = Some(unix(SystemTime::now()));
            }
            Err(e) => {
                self.metrics.ha_track_file_errors.inc();
                let msg = format!("{}: {e}", path.display());
                if s.track_file_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(error = %msg, "cannot write ha.track_file; reporting not ready");
                }
                s.track_file_error = Some(msg);
                s.written = None;
            }
        }
    }

    /// Evaluate and push once.
    fn evaluate(&self) -> Verdict {
        let serving = self.serving_verdict();
        let held = self.upgrade && !serving.ready && self.lock().written.is_none() && self.started.elapsed() < UPGRADE_HOLD;
        if !held {
            self.push(serving.ready);
        }
        let v = self.verdict();
        self.metrics.ha_ready.set(i64::from(v.ready));
        v
    }

    /// Demote now (synchronously), before anything else happens on shutdown.
    pub fn demote(&self) {
        if !self.handing_off.swap(true, Ordering::Relaxed) {
            self.push(false);
            self.metrics.ha_ready.set(0);
            self.wake.notify_one();
        }
    }

    /// Tell systemd (when it started us with `Type=notify`) that the service
    /// is ready, once: after `run --upgrade` also that this process is now its
    /// main process. Without `NOTIFY_SOCKET` this does nothing.
    fn notify_ready(&self) {
        if self.notified.swap(true, Ordering::Relaxed) {
            return;
        }
        use sd_notify::NotifyState;
        let mut states = vec![NotifyState::Ready];
        if self.upgrade {
            states.insert(0, NotifyState::MainPid(std::process::id()));
        }
        if let Err(e) = sd_notify::notify(false, &states) {
            tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }

    /// SIGTERM or SIGINT: tell systemd the service is stopping.
    pub fn notify_stopping(&self) {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }

    /// SIGQUIT: a new process takes the sockets, the track file and the
    /// registration over; this one stops writing.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// The SIGTERM hand-off: demote, then wait until no floating address is
    /// held any more (the peer took them) or `ha.handoff_timeout` runs out,
    /// then keep accepting for `ha.handoff_linger`: packets from clients
    /// whose ARP cache still names this node keep arriving for a moment, and
    /// closing the listener then would refuse them (and reset connections
    /// waiting in its backlog). Without `ha.vips`, wait the whole timeout. Returns how long it took and
    /// whether the addresses were seen leaving.
    pub async fn handoff(&self) -> (Duration, bool) {
        let start = Instant::now();
        self.demote();
        let timeout = self.settings.handoff_timeout;
        let vips = &self.settings.vips;
        let held: Vec<_> = vips.iter().filter(|ip| holds(**ip)).collect();
        tracing::info!(timeout = ?timeout, holding = ?held, "SIGTERM: demoted; waiting for the peer to take the floating addresses");
        if vips.is_empty() {
            tokio::time::sleep(timeout).await;
            return (start.elapsed(), false);
        }
        let deadline = start + timeout;
        loop {
            if !vips.iter().any(|ip| holds(*ip)) {
                let took = start.elapsed();
                let linger = self.settings.handoff_linger;
                tracing::info!(took = ?took, linger = ?linger, "the peer holds the floating addresses; accepting a little longer for clients that have not heard its ARP yet");
                tokio::time::sleep(linger).await;
                tracing::info!("hand-off done; draining");
                return (took, true);
            }
            if Instant::now() >= deadline {
                tracing::warn!(timeout = ?timeout, "ha.handoff_timeout ran out with a floating address still local; draining anyway");
                return (start.elapsed(), false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The control-plane task: evaluate every `ha.interval`, probe listeners
/// every half second, push on a change.
pub struct HaTask(pub Arc<Ha>);

#[async_trait]
impl BackgroundService for HaTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let ha = &self.0;
        let mut last_probe: Option<Instant> = None;
        let mut last: Option<Verdict> = None;
        loop {
            if last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY) {
                ha.probe_listeners().await;
                last_probe = Some(Instant::now());
            }
            let v = ha.evaluate();
            if last.as_ref() != Some(&v) {
                if v.ready {
                    tracing::info!("ready for VRRP");
                } else {
                    tracing::info!(reasons = ?v.reasons, "not ready for VRRP");
                }
                last = Some(v);
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ha.wake.notified() => {}
                _ = tokio::time::sleep(ha.settings.interval) => {}
            }
        }
    }
}

/// `switchyard watch`: the outside observer of a proxy that can no longer
/// speak for itself. It follows the process named in `server.pid_file`
/// through a pidfd (the kernel wakes it the moment that process exits, SIGKILL
/// included) and then writes `1` to `ha.track_file`, unless the pid file now
/// names another live process (`run --upgrade` handed over), which it follows
/// instead. It never writes `0`: only the proxy knows when it is ready.
///
/// keepalived's own `track_process` does the same from inside keepalived, but
/// only when keepalived runs in the host's initial network namespace: the
/// kernel's process-event connector does not exist in any other, so a
/// keepalived in a container or a test namespace never hears of the exit.
pub fn watch(pid_file: &Path, track_file: &Path, poll: Duration) -> std::io::Result<()> {
    let mut demoted = false;
    let mut following: Option<i32> = None;
    // A process seen exiting; it may linger as a zombie until reaped, and a
    // zombie's pidfd stays readable.
    let mut exited: Option<i32> = None;
    loop {
        let pid = read_pid(pid_file).filter(|p| Some(*p) != exited);
        match pid.and_then(|p| PidFd::open(p).ok().map(|fd| (p, fd))) {
            Some((pid, fd)) => {
                if following != Some(pid) {
                    tracing::info!(pid, "watching the proxy");
                    following = Some(pid);
                    demoted = false;
                }
                // Wake on exit, or every `poll` to notice a newer pid file.
                if fd.wait_exit(poll)? {
                    tracing::info!(pid, "the proxy exited");
                    exited = Some(pid);
                    if read_pid(pid_file).is_some_and(|p| p != pid && PidFd::open(p).is_ok()) {
                        continue;
                    }
                    write_atomic(track_file, "1\n")?;
                    tracing::warn!(pid, path = %track_file.display(), "proxy gone: wrote 1 (not ready)");
                    demoted = true;
                }
            }
            None => {
                if !demoted {
                    write_atomic(track_file, "1\n")?;
                    tracing::warn!(pid_file = %pid_file.display(), "no running proxy: wrote 1 (not ready)");
                    demoted = true;
                }
                following = None;
                std::thread::sleep(poll.min(Duration::from_millis(100)));
            }
        }
    }
}

/// `switchyard upgrade`: start `run --upgrade` as a process of its own
/// session (it outlives this command), wait until it holds the sockets (it
/// writes its PID to `pid_file`), and return its PID. Under systemd this is
/// `ExecReload=`: the new process reports itself as the main PID.
pub fn spawn_upgrade(config: &Path, pid_file: &Path, timeout: Duration) -> Result<i32, String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["run", "--upgrade", "--config"]).arg(config).stdin(std::process::Stdio::null());
    // SAFETY: setsid(2) in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start `run --upgrade`: {e}"))?;
    let pid = child.id() as i32;
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("`run --upgrade` (pid {pid}) exited with {st} before it took the sockets over"));
        }
        if read_pid(pid_file) == Some(pid) {
            return Ok(pid);
        }
        if Instant::now() >= end {
            return Err(format!(
                "`run --upgrade` (pid {pid}) has not taken the sockets over after {}; it keeps trying on its own",
                humantime::format_duration(timeout)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|p| *p > 1)
}

/// A pidfd (Linux 5.3+): readable once the process has exited.
struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    fn open(pid: i32) -> std::io::Result<PidFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        Ok(PidFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// True once the process has exited; false after `timeout` otherwise.
    fn wait_exit(&self, timeout: Duration) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, its count, a timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_target_maps_unspecified_to_loopback() {
        assert_eq!(probe_target("0.0.0.0:80".parse().unwrap()), "127.0.0.1:80".parse().unwrap());
        assert_eq!(probe_target("[::]:80".parse().unwrap()), "[::1]:80".parse().unwrap());
        assert_eq!(probe_target("198.18.0.5:80".parse().unwrap()), "198.18.0.5:80".parse().unwrap());
    }

    #[test]
    fn loopback_does_not_count_as_holding_and_a_benchmark_address_is_not_held() {
        assert!(!holds("127.0.0.1".parse().unwrap()), "an address on lo is not a held VIP");
        // 198.18.0.0/15 is never configured on this host outside a test namespace.
        assert!(!holds("198.19.255.254".parse().unwrap()));
    }

    #[test]
    fn a_pidfd_wakes_when_its_process_exits() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let fd = PidFd::open(child.id() as i32).unwrap();
        assert!(!fd.wait_exit(Duration::from_millis(50)).unwrap());
        child.kill().unwrap();
        let t = Instant::now();
        assert!(fd.wait_exit(Duration::from_secs(5)).unwrap());
        assert!(t.elapsed() < Duration::from_secs(1));
        let _ = child.wait();
    }

    #[test]
    fn atomic_write_replaces_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vrrp");
        write_atomic(&p, "1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "1\n");
        write_atomic(&p, "0\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "0\n");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file is left behind");
        assert!(write_atomic(&dir.path().join("missing/vrrp"), "0\n").is_err());
    }
}
