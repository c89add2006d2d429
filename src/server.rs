//! Wiring: turn a validated [`Config`] into a running Pingora server with the
//! proxy listeners, the admin listener and the control plane (sources,
//! reconcile, signal handling, drain).

use crate::accesslog::AccessLog;
use crate::admin::Admin;
use crate::config::Config;
use crate::ha::{Ha, HaTask};
use crate::metrics::Metrics;
use crate::proxy::{Core, Proxy, ProxyApp};
use crate::discovery::consul::register::{Heartbeat, Registration};
use crate::discovery::consul::ConsulSource;
use crate::live::LiveConfig;
use crate::reconcile::Reconciler;
use crate::routing::StateRegistry;
use crate::status::StatusBoard;
use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use pingora::services::ServiceWithDependents;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything `run` needs besides the config: extra services (the demo's
/// sample upstreams) to host in the same process, and whether to take the
/// listening sockets over from a running instance.
#[derive(Default)]
pub struct Extras {
    pub services: Vec<Box<dyn ServiceWithDependents>>,
    /// `run --upgrade`: ask the process in `server.pid_file` to hand its
    /// sockets over (SIGQUIT), and take them.
    pub upgrade: bool,
    /// The file the config came from, re-read on SIGHUP and `POST /reload`.
    pub config_path: Option<std::path::PathBuf>,
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Build the server. Errors are operator-facing messages.
pub fn build(config: Config, extras: Extras) -> Result<(Server, Arc<Ha>), String> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(StatusBoard::new());
    let states = Arc::new(StateRegistry::new(metrics.clone()));

    let access_log = AccessLog::start(&config.access_log, metrics.clone())
        .map_err(|e| format!("cannot open access log: {e}"))?;

    let mut tasks: Vec<Arc<dyn BackgroundService + Send + Sync>> = Vec::new();
    let mut consul_view = None;
    let queries = config.consul_queries();
    let kv_enabled = config.consul.as_ref().is_some_and(|s| s.kv_prefix.is_some());
    let consul_running = config.consul.as_ref().is_some_and(|s| !queries.is_empty() || s.auto_routes || kv_enabled);
    let live = LiveConfig::new(config.clone(), extras.config_path.clone(), consul_running, metrics.clone());
    if let Some(settings) = config.consul.as_ref().filter(|_| consul_running) {
        let reserved = config.clusters.keys().cloned().collect();
        let (kv_tx, kv_rx) = match kv_enabled {
            true => {
                let (tx, rx) = tokio::sync::watch::channel(None);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let (src, rx) = ConsulSource::new(settings, queries, reserved, Some(live.subscribe()), kv_tx, metrics.clone(), status.clone())
            .map_err(|e| format!("consul: {e}"))?;
        tasks.push(Arc::new(src));
        consul_view = Some(rx);
        if let Some(rx) = kv_rx {
            // Settings persisted in the state file serve from the first table.
            if let Some(set) = rx.borrow().clone() {
                live.start_with_kv(set);
            }
            tasks.push(Arc::new(crate::live::KvFollower { live: live.clone(), rx }));
        }
    }
    let reconciler = Reconciler::new(live.clone(), consul_view.clone(), states, metrics.clone(), status.clone())
        .map_err(|e| format!("cannot build the first routing table: {e}"))?;
    let snapshot = reconciler.snapshot();
    tasks.push(Arc::new(reconciler));
    let listen: Vec<_> = config.listeners.iter().map(|l| l.address).collect();
    let ha = Ha::new(config.ha.clone(), &listen, snapshot.clone(), consul_view, metrics.clone(), extras.upgrade);
    tasks.push(Arc::new(HaTask(ha.clone())));
    tasks.push(Arc::new(Signals {
        access_log: access_log.clone(),
        live: live.clone(),
    }));
    let registration = match config.consul.as_ref().and_then(|c| c.register.clone().map(|r| (c, r))) {
        Some((c, r)) => {
            let client = Arc::new(
                crate::discovery::consul::client::ConsulClient::new(c, metrics.clone()).map_err(|e| format!("consul: {e}"))?,
            );
            let reg = Arc::new(Registration::new(client, r, snapshot.clone()));
            tasks.push(Arc::new(Heartbeat(reg.clone())));
            Some(reg)
        }
        None => None,
    };
    tasks.push(Arc::new(Drain {
        metrics: metrics.clone(),
        access_log: access_log.clone(),
        timeout: config.server.drain_timeout,
        registration,
        ha: ha.clone(),
    }));

    let mut conf = ServerConf::default();
    conf.threads = config.server.threads;
    conf.work_stealing = config.server.work_stealing;
    conf.grace_period_seconds = Some(ceil_secs(config.server.drain_timeout));
    conf.graceful_shutdown_timeout_seconds = Some(ceil_secs(config.server.shutdown_timeout));
    conf.upstream_keepalive_pool_size = config.server.upstream_keepalive_pool;
    conf.pid_file = config.server.pid_file.clone();
    conf.upgrade_sock = config.server.upgrade_sock.clone();
    conf.max_retries = 11;
    let opt = extras.upgrade.then(|| pingora::server::configuration::Opt {
        upgrade: true,
        ..Default::default()
    });
    if extras.upgrade {
        ask_to_hand_over(&config.server.pid_file)?;
    }
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // Takes the listening sockets over from the old process on upgrade
    // (Pingora waits a few seconds for them, then exits if none came).
    server.bootstrap();
    write_pid_file(&config.server.pid_file);

    // TLS listeners' certificates, loaded (and checked) now.
    let mut tls_certs = Vec::new();
    for l in &config.listeners {
        if let Some(t) = &l.tls {
            let certs = crate::tls::ListenerCerts::load(l.address.to_string(), t.certificates.clone(), t.refuse_without_sni, metrics.clone())
                .map_err(|e| format!("listener {}: {e}", l.address))?;
            tls_certs.push((l.address, certs));
        }
    }
    live.set_tls(tls_certs.iter().map(|(_, c)| c.clone()).collect());
    let max_connections = config.limits.max_connections;
    tracing::info!(
        max_connections = max_connections.unwrap_or_else(crate::config::default_max_connections),
        from = if max_connections.is_some() { "limits.max_connections" } else { "half the open-file limit" },
        "client connections served at once"
    );
    // Pingora's server options are per service: one proxy service per h2c setting.
    for h2c in [true, false] {
        let listeners: Vec<_> = config.listeners.iter().filter(|l| l.h2c == h2c).collect();
        if listeners.is_empty() {
            continue;
        }
        let addrs: Vec<_> = listeners.iter().map(|l| l.address).collect();
        let core = Core::new(snapshot.clone(), metrics.clone(), access_log.clone());
        let proxy = Proxy::new(core.clone());
        let mut app = HttpProxy::new(proxy, server.configuration.clone());
        let mut opts = HttpServerOptions::default();
        opts.h2c = h2c;
        app.server_options = Some(opts);
        app.handle_init_modules();
        let express = config.server.express.then_some(core);
        let app = ProxyApp::new(app, snapshot.clone(), &server.configuration, express, &metrics, config.server.park_idle_after);
        let names: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let mut svc = Service::new(format!("proxy {}", names.join(" ")), app);
        for l in &listeners {
            let buffers = L4BufferSettings {
                read: Some(l.read_buffer),
                write: None,
            };
            let mut lc = ListenerConfig::tcp(l.address.to_string()).l4_buffer(buffers);
            if let Some((_, certs)) = tls_certs.iter().find(|(a, _)| *a == l.address) {
                lc = lc.tls(certs.settings());
            }
            svc.add_listener(lc);
        }
        server.add_service(svc);
    }

    let admin = Admin {
        live: live.clone(),
        snapshot: snapshot.clone(),
        metrics: metrics.clone(),
        status: status.clone(),
        ha: ha.clone(),
    };
    let mut admin_svc = Service::new("admin".to_string(), HttpServer::new_app(admin));
    admin_svc.add_tcp(&config.admin.listen.to_string());
    server.add_service(admin_svc);

    tasks.push(Arc::new(crate::tls::TlsWatch(tls_certs.into_iter().map(|(_, c)| c).collect())));
    let mut control = background_service("control plane", ControlPlane { tasks });
    control.threads = Some(1);
    server.add_service(control);

    for s in extras.services {
        server.add_boxed_service(s);
    }
    Ok((server, ha))
}

/// `run --upgrade`: send SIGQUIT to the process named in the pid file, so
/// it sends its listening sockets to `server.upgrade_sock`, where this
/// process's bootstrap picks them up. Both accept on them for a few seconds;
/// then the old one drains and exits.
fn ask_to_hand_over(pid_file: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| format!("--upgrade: cannot read server.pid_file {pid_file}: {e}"))?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| format!("--upgrade: server.pid_file {pid_file} holds {:?}, not a process id", text.trim()))?;
    if pid == std::process::id() as i32 {
        return Err(format!("--upgrade: server.pid_file {pid_file} names this process"));
    }
    // SAFETY: kill(2) with a positive pid and a valid signal number has no
    // memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGQUIT) } != 0 {
        return Err(format!(
            "--upgrade: cannot signal process {pid} from {pid_file}: {}",
            std::io::Error::last_os_error()
        ));
    }
    tracing::info!(pid, "upgrade: asked the running process to hand its listening sockets over");
    Ok(())
}

/// Record this process's id (for `run --upgrade`); a failure is logged only.
fn write_pid_file(path: &str) {
    if let Err(e) = std::fs::write(path, format!("{}\n", std::process::id())) {
        tracing::warn!(path, error = %e, "cannot write server.pid_file; `run --upgrade` will not find this process");
    }
}

/// Signals, with the hand-off in front of Pingora's graceful shutdown:
/// * SIGTERM: demote (when `[ha]` is set), wait for the peer to take the
///   floating addresses, then let Pingora stop accepting and drain;
/// * SIGQUIT: hand the listening sockets to a new process (`run --upgrade`);
/// * SIGINT: demote and stop at once.
struct HaSignals {
    ha: Arc<Ha>,
}

#[async_trait]
impl ShutdownSignalWatch for HaSignals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listening sockets to the new process");
                self.ha.retire();
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                self.ha.notify_stopping();
                if self.ha.settings().enabled() {
                    tokio::select! {
                        _ = self.ha.handoff() => {}
                        _ = int.recv() => {
                            tracing::info!("SIGINT during the hand-off: stopping now");
                            return ShutdownSignal::FastShutdown;
                        }
                    }
                }
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                self.ha.notify_stopping();
                self.ha.demote();
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// Runs the control-plane tasks on one runtime thread.
struct ControlPlane {
    tasks: Vec<Arc<dyn BackgroundService + Send + Sync>>,
}

#[async_trait]
impl BackgroundService for ControlPlane {
    async fn start(&self, shutdown: ShutdownWatch) {
        let handles: Vec<_> = self
            .tasks
            .iter()
            .map(|t| {
                let t = t.clone();
                let s = shutdown.clone();
                tokio::spawn(async move { t.start(s).await })
            })
            .collect();
        for h in handles {
            let _ = h.await;
        }
    }
}

/// SIGHUP reopens the access log file and re-reads the config file.
struct Signals {
    access_log: AccessLog,
    live: Arc<LiveConfig>,
}

#[async_trait]
impl BackgroundService for Signals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = hup.recv() => {
                    tracing::info!("SIGHUP: reopening the access log and re-reading the config file");
                    self.access_log.reopen();
                    self.live.reload("SIGHUP");
                }
            }
        }
    }
}

/// On graceful shutdown (SIGTERM), exit as soon as in-flight requests are
/// done, or when the drain timeout runs out, whichever is first. Pingora on its
/// own would always wait the whole grace period.
struct Drain {
    metrics: Arc<Metrics>,
    access_log: AccessLog,
    timeout: Duration,
    registration: Option<Arc<Registration>>,
    ha: Arc<Ha>,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() || !*shutdown.borrow() {
            return;
        }
        let start = Instant::now();
        let deadline = start + self.timeout;
        // After an upgrade hand-over the new process owns the registration.
        let registration = self.registration.as_ref().filter(|_| !self.ha.retired());
        if let Some(r) = registration {
            r.maintenance().await;
        }
        tracing::info!(in_flight = self.metrics.requests_in_flight.get(), timeout = ?self.timeout, "draining");
        let mut last_report = start;
        while self.metrics.requests_in_flight.get() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if last_report.elapsed() >= Duration::from_secs(1) {
                last_report = Instant::now();
                tracing::info!(in_flight = self.metrics.requests_in_flight.get(), "draining");
            }
        }
        let left = self.metrics.requests_in_flight.get();
        if left > 0 {
            tracing::warn!(in_flight = left, "drain timeout reached; exiting with requests in flight");
        } else {
            tracing::info!(took = ?start.elapsed(), "drained; exiting");
        }
        if let Some(r) = registration {
            r.deregister().await;
        }
        self.access_log.flush(Duration::from_secs(2));
        std::process::exit(0);
    }
}

/// Build and run until shutdown.
pub fn run(config: Config, extras: Extras) -> Result<(), String> {
    let (server, ha) = build(config, extras)?;
    server.run(RunArgs {
        shutdown_signal: Box::new(HaSignals { ha }),
    });
    Ok(())
}
