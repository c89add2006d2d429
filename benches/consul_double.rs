//! The Consul double (`tests/support/consul.rs`) as a standalone process, for
//! `benches/e2e.sh` (scenario `swaps`, Consul variant): it registers one
//! service's instances, all passing, and then changes the catalog at a fixed
//! rate so that Switchyard publishes a new routing snapshot on every change,
//! without ever leaving the service without a healthy instance.
//!
//! ```text
//! consul_double --port-file FILE --service NAME --instances IP:PORT[,IP:PORT...]
//!               [--changes-per-sec R] [--duration-secs N] [--mode health|meta]
//!               [--active-file FILE] [--max-changes N]
//! ```
//!
//! * `--port-file FILE`: once the double listens and the instances are
//!   registered, its address (`127.0.0.1:PORT`) is written to FILE (atomically:
//!   a temporary file, then a rename).
//! * `--service NAME`, `--instances LIST`: instance i is node `node-i`,
//!   service ID `NAME-i`, at the given IP:PORT, with a passing check.
//! * `--changes-per-sec R` (default 10, 0–1000): the change rate. Changes are
//!   paced on a fixed schedule; a late change never causes a burst.
//! * `--mode health` (default, needs at least two instances): each change
//!   flips the check of the last instance between critical and passing; the
//!   others stay passing, so at least half of the instances always pass.
//!   `--mode meta`: each change re-registers the first instance with its meta
//!   `v` alternating between `a` and `b` (addresses and health unchanged).
//! * `--active-file FILE`: change only while FILE exists. When it disappears,
//!   the catalog is put back as registered (one more change if needed) and
//!   `consul_double: paused changes=N` is printed. Without it, changes start at
//!   once.
//! * `--duration-secs N` (default 60, at most 86400): exit after N seconds.
//!   SIGTERM and SIGINT make it exit at once (within about 20 ms).
//! * `--max-changes N`: stop changing after N changes (default: rate × duration).
//!
//! The last line printed is always `consul_double: changes=N`.
//!
//! Run by `cargo bench` (no arguments, or only cargo's `--bench`), it prints its
//! usage and exits 0.

#[allow(dead_code)]
#[path = "../tests/support/consul.rs"]
mod consul;

use consul::{ConsulDouble, Instance};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: consul_double --port-file FILE --service NAME --instances IP:PORT[,IP:PORT...] \
[--changes-per-sec R] [--duration-secs N] [--mode health|meta] [--active-file FILE] [--max-changes N] \
(see benches/consul_double.rs; used by benches/e2e.sh)";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Health,
    Meta,
}

#[derive(Debug)]
struct Args {
    port_file: PathBuf,
    service: String,
    instances: Vec<SocketAddr>,
    rate: u32,
    duration: Duration,
    mode: Mode,
    active_file: Option<PathBuf>,
    max_changes: u64,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut port_file = None;
    let mut service = None;
    let mut instances: Option<Vec<SocketAddr>> = None;
    let mut rate = 10u32;
    let mut duration_secs = 60u64;
    let mut mode = Mode::Health;
    let mut active_file = None;
    let mut max_changes = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--port-file" => port_file = Some(PathBuf::from(value()?)),
            "--service" => service = Some(value()?),
            "--instances" => {
                let list = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse::<SocketAddr>().map_err(|e| format!("--instances: {s:?}: {e}")))
                    .collect::<Result<Vec<_>, _>>()?;
                instances = Some(list);
            }
            "--changes-per-sec" => {
                rate = value()?.parse().map_err(|e| format!("--changes-per-sec: {e}"))?;
                if rate > 1000 {
                    return Err("--changes-per-sec must be 0-1000".into());
                }
            }
            "--duration-secs" => {
                duration_secs = value()?.parse().map_err(|e| format!("--duration-secs: {e}"))?;
                if !(1..=86_400).contains(&duration_secs) {
                    return Err("--duration-secs must be 1-86400".into());
                }
            }
            "--mode" => {
                mode = match value()?.as_str() {
                    "health" => Mode::Health,
                    "meta" => Mode::Meta,
                    m => return Err(format!("--mode: {m:?}: expected health or meta")),
                }
            }
            "--active-file" => active_file = Some(PathBuf::from(value()?)),
            "--max-changes" => max_changes = Some(value()?.parse().map_err(|e| format!("--max-changes: {e}"))?),
            "--bench" => {} // passed by `cargo bench`
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let port_file = port_file.ok_or("--port-file is required")?;
    let service = service.ok_or("--service is required")?;
    if service.is_empty() || service.contains(['/', '?', '#', ' ']) {
        return Err(format!("--service: invalid name {service:?}"));
    }
    let instances = instances.ok_or("--instances is required")?;
    if instances.is_empty() {
        return Err("--instances: at least one IP:PORT".into());
    }
    if mode == Mode::Health && instances.len() < 2 {
        return Err("--mode health needs at least two instances (one always stays passing); use --mode meta".into());
    }
    Ok(Args {
        port_file,
        service,
        instances,
        rate,
        duration: Duration::from_secs(duration_secs),
        mode,
        active_file,
        max_changes: max_changes.unwrap_or(rate as u64 * duration_secs),
    })
}

fn instance(args: &Args, i: usize, meta_v: &str) -> Instance {
    let a = args.instances[i];
    Instance::new(&format!("node-{i}"), &format!("{}-{i}", args.service), &args.service, &a.ip().to_string(), a.port())
        .meta("v", meta_v)
}

/// The catalog change of one step: `on` = the changed state, `!on` = as registered.
fn apply(consul: &ConsulDouble, args: &Args, on: bool) {
    match args.mode {
        Mode::Health => {
            let i = args.instances.len() - 1;
            let status = if on { "critical" } else { "passing" };
            consul.set_health(&format!("node-{i}"), &format!("{}-{i}", args.service), status);
        }
        Mode::Meta => consul.register(instance(args, 0, if on { "b" } else { "a" })),
    }
}

fn write_port_file(path: &PathBuf, addr: SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{addr}\n"))?;
    std::fs::rename(&tmp, path)
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` runs every bench target with `--bench` (and perhaps a filter):
    // without our own options there is nothing to do.
    let has = |flag: &str| raw.iter().any(|a| a == flag);
    if raw.is_empty() || (has("--bench") && !has("--port-file")) {
        println!("{USAGE}");
        println!("consul_double: nothing to do without --port-file (changes=0)");
        return;
    }
    if has("-h") || has("--help") {
        println!("{USAGE}");
        return;
    }
    let args = match parse(&raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("consul_double: {e}\n{USAGE}");
            std::process::exit(64);
        }
    };
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }

    let t0 = Instant::now();
    let consul = ConsulDouble::start();
    for i in 0..args.instances.len() {
        consul.register(instance(&args, i, "a"));
    }
    if let Err(e) = write_port_file(&args.port_file, consul.addr) {
        eprintln!("consul_double: cannot write {}: {e}", args.port_file.display());
        std::process::exit(1);
    }
    println!(
        "consul_double: listening on {}; service {:?} with {} passing instance(s); mode {:?}; {} change(s)/s; {} s at most",
        consul.url(),
        args.service,
        args.instances.len(),
        args.mode,
        args.rate,
        args.duration.as_secs()
    );

    let interval = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let end = t0 + args.duration;
    let mut changes = 0u64;
    let mut on = false; // whether the catalog is in the changed state
    let mut active = false;
    let mut next = Instant::now();
    let mut last_clear = Instant::now();
    // Every iteration sleeps at least 1 ms, so this cap is never reached before `end`.
    let max_iterations = args.duration.as_millis() as u64 + 1000;
    for _ in 0..max_iterations {
        let now = Instant::now();
        if STOP.load(Ordering::SeqCst) || now >= end {
            break;
        }
        // The double records every request; keep that bounded.
        if now.duration_since(last_clear) >= Duration::from_secs(1) {
            consul.clear_requests();
            last_clear = now;
        }
        let want_active = args.active_file.as_ref().is_none_or(|f| f.exists());
        if want_active && !active {
            active = true;
            next = now;
            println!("consul_double: changing (changes so far: {changes})");
        } else if !want_active && active {
            active = false;
            if on {
                apply(&consul, &args, false);
                on = false;
                changes += 1;
            }
            println!("consul_double: paused changes={changes}");
        }
        let mut sleep = Duration::from_millis(20);
        if let (true, Some(iv)) = (active, interval) {
            if changes < args.max_changes && now >= next {
                on = !on;
                apply(&consul, &args, on);
                changes += 1;
                next += iv;
                if next <= now {
                    next = now + iv; // fell behind: no burst to catch up
                }
            }
            sleep = sleep.min(next.saturating_duration_since(Instant::now()));
        }
        std::thread::sleep(sleep.max(Duration::from_millis(1)));
    }
    drop(consul);
    println!("consul_double: changes={changes}");
}
