//! Soak: two Switchyard processes (the express path and Pingora's HttpProxy)
//! in front of the same Consul-discovered backends for `SOAK_SECONDS`
//! (default 600), under steady client load, while
//!
//! * Consul churns: an instance registers, fails its check, passes again,
//!   deregisters, every `SOAK_CHURN_MS` (default 500 ms);
//! * Consul fails: every 60 s, 5 s of 500 `No cluster leader`, then 5 s of
//!   hung reads, then 5 s of a cut-off (non-JSON) body;
//! * backends die: every 20 s one of two always-registered backends is
//!   stopped without telling Consul (connections refused) and started again
//!   on its port 5 s later.
//!
//! Every 10 s it prints, per proxy, RSS, open file descriptors, and requests
//! served and failed so far. It exits non-zero if any client request failed,
//! or if RSS or file descriptors grew after warm-up (the first minute) by
//! more than `SOAK_RSS_GROWTH_MIB` (default 8) or 50 descriptors.
//!
//! Run: `benches/soak.sh` (or `cargo bench --bench soak`). Not in the test
//! suite: it takes ten minutes.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};
use support::consul::{ConsulDouble, Fault, Instance};
use support::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

struct Sample {
    at: Duration,
    rss: f64,
    fds: usize,
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let total = Duration::from_secs(env_u64("SOAK_SECONDS", 600));
    let churn_every = Duration::from_millis(env_u64("SOAK_CHURN_MS", 500));
    let max_growth = env_u64("SOAK_RSS_GROWTH_MIB", 8) as f64;
    let warm_up = Duration::from_secs(60).min(total / 4);

    let consul = ConsulDouble::start();
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::start(&format!("u{i}"))).collect();
    let mut churn = Churn::start(&consul, &ups, vec![0, 1]);
    // Two backends that stay registered and passing, and get killed.
    let mut steady: Vec<Option<Upstream>> = (0..2).map(|i| Some(Upstream::start(&format!("k{i}")))).collect();
    let steady_addrs: Vec<_> = steady.iter().map(|u| u.as_ref().unwrap().addr).collect();
    for (i, a) in steady_addrs.iter().enumerate() {
        consul.register(Instance::new(&format!("node-k{i}"), &format!("k{i}"), "web", &a.ip().to_string(), a.port()));
    }
    let config = format!(
        "[consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"50ms\"\nstate_file = \"consul-state.json\"\n\
         [consul.register]\nenabled = false\n\
         [[routes]]\ncluster = \"web\"\n\
         [clusters.web]\nconsul = {{ service = \"web\" }}\nconnect_timeout = \"500ms\"\nretries = 2\n",
        consul.addr
    );
    let proxies: Vec<(&str, Proxy)> = PATHS
        .iter()
        .map(|(name, server)| (*name, Proxy::builder(&config).server(server).threads(1).start()))
        .collect();
    for (name, p) in &proxies {
        assert!(wait_until(Duration::from_secs(10), || p.fetch("/").0 == 200), "{name} never served");
    }
    // Per proxy: two keep-alive clients and one opening a connection per request.
    let loads: Vec<Vec<Load>> = proxies
        .iter()
        .map(|(_, p)| {
            vec![
                Load::start(p.url("/"), u64::MAX, total + Duration::from_secs(30)),
                Load::start(p.url("/"), u64::MAX, total + Duration::from_secs(30)),
                Load::start_fresh(p.url("/"), u64::MAX, total + Duration::from_secs(30)),
            ]
        })
        .collect();

    let start = Instant::now();
    let mut samples: Vec<Vec<Sample>> = proxies.iter().map(|_| Vec::new()).collect();
    let (mut next_sample, mut next_churn, mut next_kill) = (Duration::ZERO, churn_every, Duration::from_secs(20));
    let mut revive: Option<(usize, Duration)> = None;
    let (mut events, mut kills, mut fault_windows) = (0usize, 0usize, 0usize);
    let mut fault_now = "none";
    println!("soak: {:?}, churn every {churn_every:?}, Consul faults every 60 s, a backend killed every 20 s", total);
    println!("| t (s) | path | RSS (MiB) | fds | requests | Consul fault |");
    println!("|---:|---|---:|---:|---:|---|");
    while start.elapsed() < total {
        let t = start.elapsed();
        // Consul faults: 5 s each of 500, hang, garbage, in every minute from 30 s.
        let phase = t.as_secs() % 60;
        let fault = match phase {
            30..=34 => "500",
            35..=39 => "hang",
            40..=44 => "garbage",
            _ => "none",
        };
        if fault != fault_now {
            consul.fault(match fault {
                "500" => Fault::Status(500),
                "hang" => Fault::Hang,
                "garbage" => Fault::Garbage,
                _ => Fault::None,
            });
            if fault == "500" {
                fault_windows += 1;
            }
            fault_now = fault;
        }
        // Churn only while Consul answers (writes to the double work anyway;
        // the proxies see them once it recovers).
        if t >= next_churn {
            churn.step(events, &consul, &ups);
            events += 1;
            next_churn = t + churn_every;
        }
        if t >= next_kill && revive.is_none() {
            let i = kills % 2;
            steady[i] = None; // stopped: its port refuses connections
            kills += 1;
            revive = Some((i, t + Duration::from_secs(5)));
            next_kill = t + Duration::from_secs(20);
        }
        if let Some((i, when)) = revive {
            if t >= when {
                let listener = (0..50).find_map(|_| {
                    TcpListener::bind(steady_addrs[i]).ok().or_else(|| {
                        std::thread::sleep(Duration::from_millis(20));
                        None
                    })
                });
                steady[i] = Some(Upstream::start_on(&format!("k{i}"), listener.expect("rebind a killed backend's port")));
                revive = None;
            }
        }
        if t >= next_sample {
            for (k, (name, p)) in proxies.iter().enumerate() {
                let pid = p.pid();
                let s = Sample { at: t, rss: rss_mib(pid), fds: open_fds(pid) };
                let done: u64 = loads[k].iter().map(|l| l.count()).sum();
                println!("| {} | {name} | {:.1} | {} | {done} | {fault_now} |", t.as_secs(), s.rss, s.fds);
                samples[k].push(s);
            }
            next_sample = t + Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    consul.fault(Fault::None);
    let mut failed_total = 0;
    let mut grew = Vec::new();
    for (k, ((name, p), loads)) in proxies.iter().zip(loads).enumerate() {
        let reports: Vec<LoadReport> = loads.into_iter().map(|l| l.finish()).collect();
        let ok: u64 = reports.iter().map(|r| r.ok).sum();
        let failed: u64 = reports.iter().map(|r| r.failed).sum();
        failed_total += failed;
        let after: Vec<&Sample> = samples[k].iter().filter(|s| s.at >= warm_up).collect();
        let (rss0, rss_max) = (after.first().map_or(0.0, |s| s.rss), after.iter().map(|s| s.rss).fold(0.0, f64::max));
        let (fd0, fd_max) = (after.first().map_or(0, |s| s.fds), after.iter().map(|s| s.fds).max().unwrap_or(0));
        println!("{name}: {ok} ok, {failed} failed; after warm-up RSS {rss0:.1} -> max {rss_max:.1} MiB, fds {fd0} -> max {fd_max}");
        // The warnings logged, by message (the text after the level and target).
        let log = p.stderr();
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for l in log.lines().filter(|l| l.contains("WARN")) {
            let msg = l.split_once(": ").map_or(l, |(_, m)| m);
            let msg: String = msg.split(|c| c == '=' ).next().unwrap_or(msg).rsplit_once(' ').map_or(msg, |(m, _)| m).chars().take(90).collect();
            *kinds.entry(msg).or_default() += 1;
        }
        for (msg, n) in &kinds {
            println!("  {name} warnings: {n} x {msg}");
        }
        for r in &reports {
            for f in &r.failures {
                println!("  {name} failure: {f}");
            }
        }
        if rss_max - rss0 > max_growth || fd_max > fd0 + 50 {
            grew.push(*name);
        }
    }
    println!("{events} churn events, {kills} backend kills, {fault_windows} Consul fault windows in {:?}", start.elapsed());
    drop(steady);
    if failed_total > 0 || !grew.is_empty() {
        println!("SOAK FAILED: {failed_total} failed requests; grew after warm-up: {grew:?}");
        std::process::exit(1);
    }
    println!("soak ok");
}
