//! DNS discovery against a real DNS server: dnsmasq on a free loopback port,
//! started, reconfigured, reloaded (SIGHUP re-reads its `--addn-hosts`
//! file) and restarted (its `srv-host` lines are read only at start) by the
//! tests themselves. Upstreams are real HTTP servers on 127.0.0.0/8.
//!
//! Outside CI a machine without dnsmasq skips these tests; in CI
//! (`SWITCHYARD_CI`) a missing dnsmasq fails them (.ci/run installs it).

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

// ---------------------------------------------------------------- dnsmasq

const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// dnsmasq on 127.0.0.1:`port`, authoritative for `test.` (an unknown name
/// there is NXDOMAIN; a name elsewhere is REFUSED: no upstream servers).
struct Dnsmasq {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Lines of the main config (`srv-host=`, `host-record=`, ...).
    conf: String,
}

fn have_dnsmasq() -> bool {
    if std::path::Path::new(DNSMASQ).exists() {
        return true;
    }
    assert!(std::env::var_os("SWITCHYARD_CI").is_none(), "{DNSMASQ} is missing; .ci/run installs dnsmasq-base");
    eprintln!("SKIPPED: {DNSMASQ} is not installed (apt-get install dnsmasq-base)");
    false
}

/// A port free for both UDP and TCP on 127.0.0.1.
fn free_dns_port() -> u16 {
    for _ in 0..50 {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for UDP and TCP");
}

impl Dnsmasq {
    fn start(conf: &str, hosts: &str) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        // dnsmasq drops root for `nobody` after start; it re-reads the
        // hosts file as that user on SIGHUP.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut d = Dnsmasq { child: None, port: free_dns_port(), dir, conf: conf.to_string() };
        d.write_hosts(hosts);
        d.spawn();
        d
    }

    fn hosts_path(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn write_hosts(&self, hosts: &str) {
        let p = self.hosts_path();
        write_atomic(&p, hosts);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("dnsmasq.conf");
        std::fs::write(&conf, format!("local=/test/\n{}\n", self.conf)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
        for _attempt in 0..20 {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("dnsmasq.log")).unwrap();
            let mut child = Command::new(DNSMASQ)
                .arg("--no-daemon")
                .arg("--no-resolv")
                .arg("--no-hosts")
                .arg(format!("--port={}", self.port))
                .arg("--listen-address=127.0.0.1")
                .arg("--bind-interfaces")
                .arg(format!("--conf-file={}", conf.display()))
                .arg(format!("--addn-hosts={}", self.hosts_path().display()))
                .arg("--pid-file=")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn dnsmasq");
            let up = wait_until(Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(Some(_))) || TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            });
            if up && matches!(child.try_wait(), Ok(None)) {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            // The port was just released by our own previous process (a
            // restart), or someone else took it: try again shortly.
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("dnsmasq did not start on port {}:\n{}", self.port, self.log());
    }

    /// Stop the process we started (by its PID).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restart with new main-config lines, on the same port.
    fn restart(&mut self, conf: &str) {
        self.stop();
        self.conf = conf.to_string();
        self.spawn();
    }

    /// Rewrite the hosts file and make dnsmasq re-read it (SIGHUP); returns
    /// once the log says it did.
    fn reload_hosts(&self, hosts: &str) {
        let reads = |log: &str| log.matches(&format!("read {}", self.hosts_path().display())).count();
        let before = reads(&self.log());
        self.write_hosts(hosts);
        let pid = self.child.as_ref().expect("dnsmasq running").id() as i32;
        unsafe {
            libc::kill(pid, libc::SIGHUP);
        }
        assert!(wait_until(Duration::from_secs(5), || reads(&self.log()) > before), "dnsmasq did not re-read its hosts file:\n{}", self.log());
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- helpers

/// `count` upstreams on one port, on 127.0.0.2, 127.0.0.3, ... (for A
/// records, whose port is the cluster's).
fn upstreams_on_one_port(count: usize) -> (u16, Vec<Upstream>) {
    'ports: for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.2:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let mut ls = vec![first];
        for i in 1..count {
            match TcpListener::bind((format!("127.0.0.{}", i + 2).as_str(), port)) {
                Ok(l) => ls.push(l),
                Err(_) => continue 'ports,
            }
        }
        let ups = ls.into_iter().enumerate().map(|(i, l)| Upstream::start_on(&format!("ip{}", i + 2), l)).collect();
        return (port, ups);
    }
    panic!("no port free on all of 127.0.0.2..");
}

fn srv_lines(name: &str, records: &[(&str, u16, u16, u16)]) -> String {
    records
        .iter()
        .map(|(target, port, prio, weight)| format!("srv-host={name},{target},{port},{prio},{weight}\n"))
        .collect()
}

fn cluster<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["clusters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no cluster {name}"))
}

/// The backend addresses (with weights) a cluster routes to now.
fn backends(p: &Proxy, name: &str) -> BTreeSet<(String, u64)> {
    let st = p.status();
    cluster(&st, name)["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_string(), b["weight"].as_u64().unwrap()))
        .collect()
}

fn addrs(p: &Proxy, name: &str) -> BTreeSet<String> {
    backends(p, name).into_iter().map(|(a, _)| a).collect()
}

fn set_of(addrs: &[SocketAddr]) -> BTreeSet<String> {
    addrs.iter().map(|a| a.to_string()).collect()
}

fn source<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    &status["sources"][name]
}

fn lookups(p: &Proxy, source: &str, result: &str) -> f64 {
    sample(&parse_metrics(&p.metrics()), "switchyard_dns_lookups_total", &[("source", source), ("result", result)]).unwrap_or(0.0)
}

/// Whether a source's lookups stop: no new one in a 700 ms window, within 5 s.
fn stops_counting(p: &Proxy, source: &str) -> bool {
    let count = || ["ok", "nxdomain", "timeout", "servfail", "refused", "error"].iter().map(|r| lookups(p, source, r)).sum::<f64>();
    wait_until(Duration::from_secs(5), || {
        let before = count();
        std::thread::sleep(Duration::from_millis(700));
        count() == before
    })
}

/// Wait until `cluster` routes to exactly `want`; the time it took.
fn wait_for_backends(p: &Proxy, cluster: &str, want: &BTreeSet<String>, limit: Duration) -> Duration {
    let t0 = Instant::now();
    assert!(
        wait_until(limit, || &addrs(p, cluster) == want),
        "cluster {cluster} did not move to {want:?} within {limit:?}; it has {:?}\n{}",
        addrs(p, cluster),
        p.stderr()
    );
    t0.elapsed()
}

/// Requests to `path` answered only by the upstreams named in `allowed`.
fn assert_served_by(p: &Proxy, path: &str, allowed: &[&str], n: usize) {
    for _ in 0..n {
        let (code, body) = p.fetch(path);
        assert_eq!(code, 200, "{path}: {body}");
        assert!(allowed.contains(&body.as_str()), "{path} answered by {body}, allowed {allowed:?}");
    }
}

const SRV: &str = "_http._tcp.web.test";

// ---------------------------------------------------------------- tests

/// An SRV name and an A name resolve at start; changes to either (the A
/// record by a hosts reload, the SRV records by a server restart) move
/// traffic within 2 s under continuous load, with zero failed requests.
/// The records carry a TTL of 60 s while `max_refresh` is 500 ms: a
/// resolver cache that kept answers for their TTL would fail this.
#[test]
fn srv_and_a_names_follow_record_changes_under_load() {
    if !have_dnsmasq() {
        return;
    }
    let srv_ups: Vec<Upstream> = (0..3).map(|i| Upstream::start(&format!("s{i}"))).collect();
    let (a_port, a_ups) = upstreams_on_one_port(2);
    let srv_conf = |idx: &[usize]| {
        let recs: Vec<(&str, u16, u16, u16)> = idx.iter().map(|&i| ("lo.test", srv_ups[i].addr.port(), 0, 1)).collect();
        format!("local-ttl=60\nhost-record=lo.test,127.0.0.1\n{}", srv_lines(SRV, &recs))
    };
    let mut dns = Dnsmasq::start(&srv_conf(&[0, 1]), "127.0.0.2 a.test\n");
    let body = format!(
        "[dns]\nnameservers = [\"{ns}\"]\nmin_refresh = \"200ms\"\nmax_refresh = \"500ms\"\n\
         [[routes]]\ncluster = \"web\"\n[[routes]]\npath_prefix = \"/a\"\ncluster = \"a\"\n\
         [clusters.web]\ndns = {{ name = \"{SRV}.\" }}\n\
         [clusters.a]\ndns = {{ name = \"a.test.\", port = {a_port} }}\n",
        ns = dns.addr()
    );
    let p = Proxy::start(&body);
    wait_for_backends(&p, "web", &set_of(&[srv_ups[0].addr, srv_ups[1].addr]), Duration::from_secs(5));
    wait_for_backends(&p, "a", &set_of(&[a_ups[0].addr]), Duration::from_secs(5));
    assert_served_by(&p, "/", &["s0", "s1"], 6);
    assert_served_by(&p, "/a", &["ip2"], 3);
    let st = p.status();
    let src = source(&st, &format!("dns:{SRV}."));
    assert_eq!(src["kind"], "dns");
    assert_eq!(src["state"], "ok");
    assert_eq!(src["dns"]["records"], 2);
    assert_eq!(src["dns"]["ttl_seconds"], 60, "{src}");
    assert!(src["dns"]["next_refresh_unix"].as_f64().unwrap() > 0.0);
    assert_eq!(source(&st, &format!("dns:a.test.:{a_port}"))["dns"]["records"], 1);
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_dns_records", &[("source", &format!("dns:{SRV}."))]), Some(2.0));
    assert!(sample(&m, "switchyard_dns_last_success_timestamp_seconds", &[("source", &format!("dns:{SRV}."))]).unwrap() > 1.0e9);

    let loads = [Load::start(p.url("/"), 100_000, Duration::from_secs(60)), Load::start(p.url("/a"), 100_000, Duration::from_secs(60))];
    let mut worst = Duration::ZERO;
    for round in 0..3 {
        // The A record moves between the two addresses (hosts file + SIGHUP).
        let (to, other) = if round % 2 == 0 { (1, 0) } else { (0, 1) };
        let t0 = Instant::now();
        dns.reload_hosts(&format!("127.0.0.{} a.test\n", to + 2));
        wait_for_backends(&p, "a", &set_of(&[a_ups[to].addr]), Duration::from_secs(2));
        worst = worst.max(t0.elapsed());
        assert_served_by(&p, "/a", &[a_ups[to].name()], 3);
        let _ = other;
    }
    for idx in [&[1usize, 2][..], &[0, 2], &[2]] {
        // SRV records are read at start only: restart the server.
        let t0 = Instant::now();
        dns.restart(&srv_conf(idx));
        let want: Vec<SocketAddr> = idx.iter().map(|&i| srv_ups[i].addr).collect();
        wait_for_backends(&p, "web", &set_of(&want), Duration::from_secs(2));
        worst = worst.max(t0.elapsed());
        let names: Vec<&str> = idx.iter().map(|&i| srv_ups[i].name()).collect();
        assert_served_by(&p, "/", &names, 4);
    }
    assert!(worst < Duration::from_secs(2), "worst propagation {worst:?}");
    assert!(wait_until(Duration::from_secs(20), || loads.iter().map(|l| l.count()).sum::<u64>() >= 1000));
    let reports: Vec<LoadReport> = loads.into_iter().map(|l| l.finish()).collect();
    let (ok, failed): (u64, u64) = (reports.iter().map(|r| r.ok).sum(), reports.iter().map(|r| r.failed).sum());
    eprintln!("DNS changes: worst propagation {worst:?}; {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "{reports:?}");
}

/// With the DNS server stopped, the last good set keeps serving (zero failed
/// requests), the error shows in /status and the metric, and one log line
/// marks it; with the server back, changes are followed again.
#[test]
fn a_stopped_server_keeps_the_last_good_set_and_recovery_is_automatic() {
    if !have_dnsmasq() {
        return;
    }
    let ups: Vec<Upstream> = (0..3).map(|i| Upstream::start(&format!("s{i}"))).collect();
    let conf = |idx: &[usize]| {
        let recs: Vec<(&str, u16, u16, u16)> = idx.iter().map(|&i| ("lo.test", ups[i].addr.port(), 0, 1)).collect();
        format!("host-record=lo.test,127.0.0.1\n{}", srv_lines(SRV, &recs))
    };
    let mut dns = Dnsmasq::start(&conf(&[0, 1]), "");
    let body = format!(
        "[[routes]]\ncluster = \"web\"\n[clusters.web]\ndns = {{ name = \"{SRV}.\", nameservers = [\"{}\"], min_refresh = \"100ms\", max_refresh = \"400ms\", timeout = \"300ms\" }}\n",
        dns.addr()
    );
    let p = Proxy::start(&body);
    let first = set_of(&[ups[0].addr, ups[1].addr]);
    wait_for_backends(&p, "web", &first, Duration::from_secs(5));
    let src_name = format!("dns:{SRV}.");
    let load = Load::start(p.url("/"), 100_000, Duration::from_secs(60));

    dns.stop();
    let failures = |p: &Proxy| ["timeout", "error", "refused", "servfail"].iter().map(|r| lookups(p, &src_name, r)).sum::<f64>();
    assert!(wait_until(Duration::from_secs(5), || failures(&p) >= 4.0), "lookups did not fail repeatedly: {}", p.metrics());
    let st = p.status();
    let src = source(&st, &src_name);
    assert_eq!(src["state"], "error", "{src}");
    assert!(src["last_error"].as_str().unwrap().contains(SRV), "{src}");
    assert!(src["dns"]["last_result"] == "timeout" || src["dns"]["last_result"] == "error", "{src}");
    assert_eq!(addrs(&p, "web"), first, "the last good set keeps serving");
    assert_served_by(&p, "/", &["s0", "s1"], 6);
    let warned = p.stderr().lines().filter(|l| l.contains("DNS lookup failed") && l.contains(&src_name)).count();
    assert_eq!(warned, 1, "one log line for the outage, not one per retry:\n{}", p.stderr());

    let t0 = Instant::now();
    dns.restart(&conf(&[2]));
    wait_for_backends(&p, "web", &set_of(&[ups[2].addr]), Duration::from_secs(2));
    eprintln!("back after the restart in {:?}", t0.elapsed());
    assert_served_by(&p, "/", &["s2"], 4);
    assert!(wait_until(Duration::from_secs(2), || source(&p.status(), &src_name)["state"] == "ok"));
    assert!(p.stderr().contains("DNS lookups answer again"));
    let report = load.finish();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok > 50, "{report:?}");
}

/// SRV weights become backend weights (with `weighted` selection, traffic
/// follows them); only the lowest priority group with a usable target
/// serves, and the next group takes over when the first has no address.
#[test]
fn srv_weights_split_traffic_and_priority_groups_fail_over() {
    if !have_dnsmasq() {
        return;
    }
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::start(&format!("s{i}"))).collect();
    let port = |i: usize| ups[i].addr.port();
    // Group 0: s0 weight 1, s1 weight 3. Group 1: s2 weight 0, s3 weight 1.
    let conf = |group0_target: &str| {
        format!(
            "host-record=lo.test,127.0.0.1\n{}",
            srv_lines(SRV, &[(group0_target, port(0), 0, 1), (group0_target, port(1), 0, 3), ("lo.test", port(2), 1, 0), ("lo.test", port(3), 1, 1)])
        )
    };
    let mut dns = Dnsmasq::start(&conf("lo.test"), "");
    let body = format!(
        "[[routes]]\ncluster = \"web\"\n[clusters.web]\nselection = \"weighted\"\ndns = {{ name = \"{SRV}.\", nameservers = [\"{}\"], min_refresh = \"200ms\", max_refresh = \"500ms\" }}\n",
        dns.addr()
    );
    let p = Proxy::start(&body);
    let want: BTreeSet<(String, u64)> = [(ups[0].addr.to_string(), 1), (ups[1].addr.to_string(), 3)].into_iter().collect();
    assert!(wait_until(Duration::from_secs(5), || backends(&p, "web") == want), "{:?}", backends(&p, "web"));
    assert_eq!(source(&p.status(), &format!("dns:{SRV}."))["dns"]["priority"], 0);
    let n = 400;
    let before: Vec<u64> = ups.iter().map(|u| u.hits()).collect();
    let mut counts: HashMap<String, u64> = HashMap::new();
    for _ in 0..n {
        let (code, body) = p.fetch("/");
        assert_eq!(code, 200);
        *counts.entry(body).or_default() += 1;
    }
    let share1 = counts.get("s1").copied().unwrap_or(0) as f64 / n as f64;
    eprintln!("weights 1:3 -> {counts:?}");
    // 3 of 4 within ±5 points.
    assert!((0.70..=0.80).contains(&share1), "s1 (weight 3) got {share1} of the traffic: {counts:?}");
    assert_eq!(ups[2].hits() + ups[3].hits(), before[2] + before[3], "the priority-1 group took traffic while group 0 had targets");

    // Group 0's target loses its address: group 1 takes over, its weight 0
    // record as weight 1.
    dns.restart(&conf("gone.test"));
    let want: BTreeSet<(String, u64)> = [(ups[2].addr.to_string(), 1), (ups[3].addr.to_string(), 1)].into_iter().collect();
    assert!(wait_until(Duration::from_secs(3), || backends(&p, "web") == want), "{:?}", backends(&p, "web"));
    assert_eq!(source(&p.status(), &format!("dns:{SRV}."))["dns"]["priority"], 1);
    assert_served_by(&p, "/", &["s2", "s3"], 8);
    // And back.
    dns.restart(&conf("lo.test"));
    assert!(wait_until(Duration::from_secs(3), || backends(&p, "web").len() == 2 && addrs(&p, "web").contains(&ups[1].addr.to_string())));
    assert_served_by(&p, "/", &["s0", "s1"], 8);
}

/// 250 SRV records do not fit a UDP answer (dnsmasq caps UDP answers at its
/// EDNS packet size, 1232 bytes by default; 250 records take several KB), so
/// the resolver must retry over TCP on truncation to see all of them.
#[test]
fn a_250_record_srv_answer_yields_250_backends() {
    if !have_dnsmasq() {
        return;
    }
    let records: Vec<(&str, u16, u16, u16)> = (0..250).map(|i| ("lo.test", 20000 + i as u16, 0, 1)).collect();
    let dns = Dnsmasq::start(&format!("host-record=lo.test,127.0.0.1\n{}", srv_lines(SRV, &records)), "");
    let body = format!(
        "[[routes]]\ncluster = \"big\"\n[clusters.big]\ndns = {{ name = \"{SRV}.\", nameservers = [\"{}\"] }}\n",
        dns.addr()
    );
    let p = Proxy::start(&body);
    assert!(wait_until(Duration::from_secs(5), || backends(&p, "big").len() == 250), "{} backends\n{}", backends(&p, "big").len(), p.stderr());
    let want: BTreeSet<String> = (0..250).map(|i| format!("127.0.0.1:{}", 20000 + i)).collect();
    assert_eq!(addrs(&p, "big"), want);
    let st = p.status();
    assert_eq!(source(&st, &format!("dns:{SRV}."))["dns"]["records"], 250);
    assert_eq!(cluster(&st, "big")["active_backends"], 250);
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_dns_records", &[("source", &format!("dns:{SRV}."))]), Some(250.0));
}

/// NXDOMAIN for a name that had records publishes the empty set (the cluster
/// answers 503, as a Consul service without instances does), counted as
/// `nxdomain`; the name coming back restores traffic. REFUSED and a server
/// that never answers (timeout) are failures, not empty sets.
#[test]
fn nxdomain_empties_the_cluster_while_refused_and_timeouts_do_not() {
    if !have_dnsmasq() {
        return;
    }
    let (port, ups) = upstreams_on_one_port(1);
    let dns = Dnsmasq::start("", "127.0.0.2 a.test\n");
    // A "server" that reads queries and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_tcp = TcpListener::bind(silent.local_addr().unwrap()).ok();
    let body = format!(
        "[dns]\nnameservers = [\"{ns}\"]\nmin_refresh = \"100ms\"\nmax_refresh = \"300ms\"\ntimeout = \"200ms\"\n\
         [[routes]]\ncluster = \"a\"\n\
         [clusters.a]\ndns = {{ name = \"a.test.\", port = {port} }}\n\
         [clusters.refused]\ndns = {{ name = \"a.example.\", port = {port} }}\n\
         [clusters.silent]\ndns = {{ name = \"s.test.\", port = {port}, nameservers = [\"{silent}\"] }}\n",
        ns = dns.addr(),
        silent = silent.local_addr().unwrap()
    );
    let p = Proxy::start(&body);
    wait_for_backends(&p, "a", &set_of(&[ups[0].addr]), Duration::from_secs(5));
    assert_served_by(&p, "/", &["ip2"], 3);
    let a_src = format!("dns:a.test.:{port}");

    dns.reload_hosts("");
    wait_for_backends(&p, "a", &BTreeSet::new(), Duration::from_secs(2));
    assert_eq!(p.fetch("/").0, 503);
    assert!(lookups(&p, &a_src, "nxdomain") >= 1.0);
    let st = p.status();
    assert_eq!(source(&st, &a_src)["state"], "ok", "NXDOMAIN is an answer");
    assert_eq!(source(&st, &a_src)["dns"]["last_result"], "nxdomain");
    assert_eq!(cluster(&st, "a")["discovered"], true);
    assert!(p.stderr().contains("publishing the empty set"), "{}", p.stderr());

    dns.reload_hosts("127.0.0.2 a.test\n");
    wait_for_backends(&p, "a", &set_of(&[ups[0].addr]), Duration::from_secs(2));
    assert_served_by(&p, "/", &["ip2"], 3);

    // Neither failure ever produced a set: both clusters are still pending.
    let refused_src = format!("dns:a.example.:{port}");
    assert!(wait_until(Duration::from_secs(3), || lookups(&p, &refused_src, "refused") >= 2.0), "{}", p.metrics());
    let silent_src = format!("dns:s.test.:{port}");
    assert!(wait_until(Duration::from_secs(3), || lookups(&p, &silent_src, "timeout") >= 2.0), "{}", p.metrics());
    assert_eq!(source(&p.status(), &silent_src)["dns"]["last_result"], "timeout");
    let st = p.status();
    assert_eq!(cluster(&st, "refused")["discovered"], false);
    assert_eq!(cluster(&st, "silent")["discovered"], false);
    assert_eq!(st["ready"], false, "clusters without a first answer keep /readyz false");
    drop(silent_tcp);
}

/// A bad `dns` field is refused by `check` (exit 64) with the field named.
#[test]
fn bad_dns_fields_are_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        r#"
[dns]
min_refresh = "10ms"
nameservers = []
[[listeners]]
address = "127.0.0.1:8080"
[[routes]]
cluster = "web"
[clusters.web]
dns = { name = "bad name!", nameservers = ["nowhere:53"], port = 0, max_refresh = "2h", timeout = "5 minutes" }
[clusters.both]
dns = { name = "a.test." }
static = ["127.0.0.1:1"]
[clusters.typo]
dns = { name = "a.test.", prot = 80 }
"#,
    )
    .unwrap();
    let out = Command::new(bin()).args(["check", "--config"]).arg(&cfg).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for needle in [
        "dns.min_refresh: invalid duration \"10ms\"",
        "dns.nameservers: empty list",
        "clusters.web.dns.name: invalid DNS name \"bad name!\"",
        "clusters.web.dns.nameservers[0]: invalid nameserver \"nowhere:53\"",
        "clusters.web.dns.port: invalid value 0",
        "clusters.web.dns.max_refresh: invalid duration \"2h\"",
        "clusters.web.dns.timeout: invalid duration \"5 minutes\"",
        "clusters.both: set exactly one discovery source",
        "clusters.typo.dns.prot: unknown field `prot`",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
}

/// SRV targets whose addresses are not in the answer's additional section
/// (here: a target that is a CNAME) are looked up with A/AAAA queries.
#[test]
fn srv_targets_without_glue_are_looked_up() {
    if !have_dnsmasq() {
        return;
    }
    let ups: Vec<Upstream> = (0..2).map(|i| Upstream::start(&format!("s{i}"))).collect();
    let dns = Dnsmasq::start(
        &format!(
            "cname=alias.test,lo.test\nhost-record=lo.test,127.0.0.1\n{}",
            srv_lines(SRV, &[("alias.test", ups[0].addr.port(), 0, 1), ("lo.test", ups[1].addr.port(), 0, 1)])
        ),
        "",
    );
    let body = format!("[[routes]]\ncluster = \"web\"\n[clusters.web]\ndns = {{ name = \"{SRV}.\", nameservers = [\"{}\"] }}\n", dns.addr());
    let p = Proxy::start(&body);
    wait_for_backends(&p, "web", &set_of(&[ups[0].addr, ups[1].addr]), Duration::from_secs(5));
    assert_served_by(&p, "/", &["s0", "s1"], 4);
}

/// A reload that switches a cluster to DNS starts its source and serves its
/// answer with no failed request; one that drops the DNS cluster stops it.
#[test]
fn a_reload_starts_and_stops_dns_sources() {
    if !have_dnsmasq() {
        return;
    }
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let dns = Dnsmasq::start(&format!("host-record=lo.test,127.0.0.1\n{}", srv_lines(SRV, &[("lo.test", b.addr.port(), 0, 1)])), "");
    let static_body = format!("[[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{}\"]\n", a.addr);
    let p = Proxy::start(&static_body);
    assert_served_by(&p, "/", &["a"], 2);
    let load = Load::start(p.url("/"), 100_000, Duration::from_secs(60));
    let cfg = p.path("switchyard.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let dns_cluster = format!("dns = {{ name = \"{SRV}.\", nameservers = [\"{}\"], min_refresh = \"100ms\", max_refresh = \"200ms\" }}", dns.addr());
    write_atomic(&cfg, &text.replace(&format!("static = [\"{}\"]", a.addr), &dns_cluster));
    let t0 = Instant::now();
    p.signal(libc::SIGHUP);
    wait_for_backends(&p, "web", &set_of(&[b.addr]), Duration::from_secs(3));
    eprintln!("reload to DNS served in {:?}", t0.elapsed());
    assert_served_by(&p, "/", &["b"], 3);
    let src = format!("dns:{SRV}.");
    assert!(lookups(&p, &src, "ok") >= 1.0);

    write_atomic(&cfg, &text);
    p.signal(libc::SIGHUP);
    wait_for_backends(&p, "web", &set_of(&[a.addr]), Duration::from_secs(3));
    // Stopped: its lookups stop counting (at 100-200 ms per refresh, a
    // running source counts at least two in 700 ms; one in progress at the
    // swap may still finish).
    assert!(stops_counting(&p, &src), "the dropped DNS source still runs");
    let report = load.finish();
    assert_eq!(report.failed, 0, "{report:?}");
}

/// A log line without its colour codes.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since midnight of a (plain) log line's timestamp.
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let t = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s) = (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A field `key=N` of a (plain) log line.
fn log_field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!(" {key}="))?;
    line[at + key.len() + 2..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A 1,000-record SRV answer: its lookup (over TCP), the table rebuild and
/// the time from a changed answer to the new set serving, measured from
/// the process's own log lines. Prints the numbers recorded in
/// BENCHMARKS.md; asserts only a loose bound.
#[test]
fn a_1000_record_answer_propagates_within_a_second() {
    if !have_dnsmasq() {
        return;
    }
    let conf = |base: u16| {
        let recs: Vec<(&str, u16, u16, u16)> = (0..1000).map(|i| ("lo.test", base + i as u16, 0, 1 + (i % 4) as u16)).collect();
        format!("host-record=lo.test,127.0.0.1\n{}", srv_lines(SRV, &recs))
    };
    let mut dns = Dnsmasq::start(&conf(20000), "");
    let body = format!(
        "[[routes]]\ncluster = \"big\"\n[clusters.big]\nselection = \"weighted\"\ndns = {{ name = \"{SRV}.\", nameservers = [\"{}\"], min_refresh = \"100ms\", max_refresh = \"100ms\" }}\n",
        dns.addr()
    );
    let t0 = Instant::now();
    let p = Proxy::start(&body);
    assert!(wait_until(Duration::from_secs(10), || backends(&p, "big").len() == 1000), "{}", p.stderr());
    let first = t0.elapsed();
    let mut rows = Vec::new();
    for round in 0..5u16 {
        let base = 30000 + (round % 2) * 2000;
        dns.restart(&conf(base));
        let t = Instant::now();
        let want: BTreeSet<String> = (0..1000).map(|i| format!("127.0.0.1:{}", base + i)).collect();
        assert!(wait_until(Duration::from_secs(3), || addrs(&p, "big") == want), "round {round}: not moved\n{}", p.stderr());
        rows.push(t.elapsed());
    }
    // From the log: each changed answer, how long its lookup took, and the
    // time from that line to the next published table (with its build time).
    let log = p.stderr();
    let lines: Vec<String> = log.lines().map(plain).collect();
    let mut measured = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !(l.contains("DNS answer changed") && l.contains("backends=1000")) {
            continue;
        }
        let Some(pubd) = lines[i + 1..].iter().find(|n| n.contains("routing table published")) else { continue };
        let (Some(a), Some(b)) = (log_time(l), log_time(pubd)) else { continue };
        measured.push((log_field(l, "took_us").unwrap_or(0), ((b - a) * 1e6) as u64, log_field(pubd, "took_us").unwrap_or(0)));
    }
    eprintln!("1000 SRV records: first set served {first:?} after the process was spawned");
    eprintln!("server restart -> new set in /status: {rows:?}");
    for (lookup, to_publish, build) in &measured {
        eprintln!("  lookup {lookup} us, answer -> table published {to_publish} us (of which build {build} us)");
    }
    assert!(measured.len() >= 5, "{measured:?}\n{log}");
    assert!(rows.iter().all(|d| *d < Duration::from_secs(1)), "{rows:?}");
}

/// `HOST:PORT` entries in a static list are resolved through the same DNS
/// sources (with the `[dns]` settings) and re-resolved on their TTL, next to
/// the entries given as IP addresses; a name that stops existing leaves the
/// rest serving. Zero failed requests under load throughout.
#[test]
fn host_names_in_static_lists_are_resolved_and_followed() {
    if !have_dnsmasq() {
        return;
    }
    let (port, ups) = upstreams_on_one_port(2);
    let fixed = Upstream::start("fixed");
    let dns = Dnsmasq::start("", "127.0.0.2 a.test\n");
    let body = format!(
        "[dns]\nnameservers = [\"{}\"]\nmin_refresh = \"100ms\"\nmax_refresh = \"300ms\"\n\
         [[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"a.test:{port}\", \"{}\"]\n",
        dns.addr(),
        fixed.addr
    );
    let p = Proxy::start(&body);
    wait_for_backends(&p, "web", &set_of(&[ups[0].addr, fixed.addr]), Duration::from_secs(5));
    let st = p.status();
    assert_eq!(cluster(&st, "web")["discovery"], "static");
    assert_eq!(source(&st, &format!("dns:a.test:{port}"))["state"], "ok");
    assert_served_by(&p, "/", &["ip2", "fixed"], 4);
    let load = Load::start(p.url("/"), 100_000, Duration::from_secs(60));

    dns.reload_hosts("127.0.0.3 a.test\n");
    wait_for_backends(&p, "web", &set_of(&[ups[1].addr, fixed.addr]), Duration::from_secs(2));
    assert_served_by(&p, "/", &["ip3", "fixed"], 4);
    dns.reload_hosts("");
    wait_for_backends(&p, "web", &set_of(&[fixed.addr]), Duration::from_secs(2));
    assert_served_by(&p, "/", &["fixed"], 3);
    let report = load.finish();
    assert_eq!(report.failed, 0, "{report:?}");
}

/// Host names in a catalog file are resolved through DNS sources (with the
/// `[dns]` settings) and followed on their TTL; each address gets the
/// instance's weight. Editing the file to name another host starts its
/// source. Zero failed requests under load throughout.
#[test]
fn host_names_in_catalog_files_are_resolved_and_followed() {
    if !have_dnsmasq() {
        return;
    }
    let (port, ups) = upstreams_on_one_port(3);
    let fixed = Upstream::start("fixed");
    let dns = Dnsmasq::start("", "127.0.0.2 a.test\n127.0.0.4 b.test\n");
    let catalog = |host: &str| {
        format!(
            r#"{{"web": [{{"address": "{host}", "port": {port}, "weight": 3}}, {{"address": "{}", "port": {}}}]}}"#,
            fixed.addr.ip(),
            fixed.addr.port()
        )
    };
    let body = format!(
        "[dns]\nnameservers = [\"{}\"]\nmin_refresh = \"100ms\"\nmax_refresh = \"300ms\"\n\
         [[routes]]\ncluster = \"web\"\n[clusters.web]\nfile = {{ catalog = \"catalog.json\" }}\nselection = \"weighted\"\n",
        dns.addr()
    );
    let p = Proxy::builder(&body).file("catalog.json", &catalog("a.test")).start();
    wait_for_backends(&p, "web", &set_of(&[ups[0].addr, fixed.addr]), Duration::from_secs(5));
    let want: BTreeSet<(String, u64)> = [(ups[0].addr.to_string(), 3), (fixed.addr.to_string(), 1)].into_iter().collect();
    assert_eq!(backends(&p, "web"), want, "the resolved address carries the instance's weight");
    assert_eq!(source(&p.status(), &format!("dns:a.test:{port}"))["state"], "ok");
    let load = Load::start(p.url("/"), 100_000, Duration::from_secs(60));

    dns.reload_hosts("127.0.0.3 a.test\n127.0.0.4 b.test\n");
    wait_for_backends(&p, "web", &set_of(&[ups[1].addr, fixed.addr]), Duration::from_secs(2));
    assert_served_by(&p, "/", &["ip3", "fixed"], 4);
    // The file now names another host: its source starts, the old one goes.
    write_atomic(&p.path("catalog.json"), &catalog("b.test"));
    wait_for_backends(&p, "web", &set_of(&[ups[2].addr, fixed.addr]), Duration::from_secs(2));
    assert_served_by(&p, "/", &["ip4", "fixed"], 4);
    assert!(stops_counting(&p, &format!("dns:a.test:{port}")), "the source of the host no longer named still runs");
    let report = load.finish();
    assert_eq!(report.failed, 0, "{report:?}");
}

/// A Consul instance whose service address is a host name is resolved
/// through a DNS source (with the `[dns]` settings): its address serves with
/// the instance's tags, meta and service ID (an override by that ID
/// applies), next to an instance registered by IP. A changed host record
/// moves traffic within 2 s; deregistering the instance takes its address
/// out and stops its source. Zero failed requests under load throughout.
#[test]
fn host_names_in_consul_addresses_are_resolved_and_followed() {
    use support::consul::{ConsulDouble, Instance};
    if !have_dnsmasq() {
        return;
    }
    let (port, ups) = upstreams_on_one_port(2);
    let fixed = Upstream::start("fixed");
    let dns = Dnsmasq::start("", "127.0.0.2 h.test\n");
    let consul = ConsulDouble::start();
    consul.register(Instance::new("node-fixed", "web-fixed", "web", &fixed.addr.ip().to_string(), fixed.addr.port()));
    consul.register(
        Instance::new("node-h", "web-h", "web", "127.0.0.9", port)
            .service_address("h.test")
            .weights(3, 1)
            .tags(&["v2"])
            .meta("az", "a"),
    );
    let body = format!(
        "[dns]\nnameservers = [\"{}\"]\nmin_refresh = \"100ms\"\nmax_refresh = \"300ms\"\n\
         [consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"50ms\"\n\
         [[routes]]\ncluster = \"web\"\n\
         [clusters.web]\nconsul = {{ service = \"web\" }}\nselection = \"weighted\"\n\
         instances = {{ \"web-h\" = {{ weight = 5 }} }}\n",
        dns.addr(),
        consul.addr
    );
    let p = Proxy::start(&body);
    let source_name = format!("dns:h.test:{port}");
    wait_for_backends(&p, "web", &set_of(&[ups[0].addr, fixed.addr]), Duration::from_secs(5));
    let want: BTreeSet<(String, u64)> = [(ups[0].addr.to_string(), 5), (fixed.addr.to_string(), 1)].into_iter().collect();
    assert_eq!(backends(&p, "web"), want, "the override by the instance's service ID applies to its resolved address");
    let st = p.status();
    let b = cluster(&st, "web")["backends"].as_array().unwrap().iter().find(|b| b["address"] == ups[0].addr.to_string()).unwrap().clone();
    assert_eq!((b["tags"].clone(), b["meta"]["az"].clone()), (serde_json::json!(["v2"]), serde_json::json!("a")), "{b}");
    assert_eq!(source(&st, &source_name)["state"], "ok", "{st}");
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_consul_instances_skipped_total", &[("service", "web"), ("reason", "hostname")]), None, "a host name is not skipped");
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").1 == "ip2"), "the named instance gets no traffic");
    assert_served_by(&p, "/", &["ip2", "fixed"], 6);
    let load = Load::start(p.url("/"), 100_000, Duration::from_secs(60));

    // The record changes: traffic follows.
    dns.reload_hosts("127.0.0.3 h.test\n");
    wait_for_backends(&p, "web", &set_of(&[ups[1].addr, fixed.addr]), Duration::from_secs(2));
    assert!(wait_until(Duration::from_secs(5), || p.fetch("/").1 == "ip3"), "the new address gets no traffic");
    assert_served_by(&p, "/", &["ip3", "fixed"], 6);

    // Deregistered in Consul: its address leaves and its source stops.
    consul.deregister("node-h", "web-h");
    wait_for_backends(&p, "web", &set_of(&[fixed.addr]), Duration::from_secs(2));
    assert_served_by(&p, "/", &["fixed"], 4);
    assert!(stops_counting(&p, &source_name), "the source of the deregistered instance still runs");
    let report = load.finish();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok > 0, "{report:?}");
}

/// A service whose only instance is addressed by host name is a good
/// answer (not "every instance invalid"), and the instance is kept in the
/// Consul state file: a restart while Consul is unreachable resolves the
/// persisted name again and serves it.
#[test]
fn host_name_instances_survive_a_restart_through_the_consul_state_file() {
    use support::consul::{ConsulDouble, Instance};
    if !have_dnsmasq() {
        return;
    }
    let (port, ups) = upstreams_on_one_port(1);
    let dns = Dnsmasq::start("", "127.0.0.2 h.test\n");
    let mut consul = ConsulDouble::start();
    consul.register(Instance::new("node-h", "web-h", "web", "h.test", port));
    let body = format!(
        "[dns]\nnameservers = [\"{}\"]\nmin_refresh = \"100ms\"\nmax_refresh = \"300ms\"\n\
         [consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"50ms\"\nstate_file = \"consul-state.json\"\n\
         [[routes]]\ncluster = \"web\"\n\
         [clusters.web]\nconsul = {{ service = \"web\" }}\n",
        dns.addr(),
        consul.addr
    );
    let mut p = Proxy::start(&body);
    wait_for_backends(&p, "web", &set_of(&[ups[0].addr]), Duration::from_secs(5));
    assert_served_by(&p, "/", &["ip2"], 3);
    assert_eq!(watch_errors(&p, "bad_body"), 0.0, "an answer with only named instances is a good answer");
    let state = p.path("consul-state.json");
    let saved = || std::fs::read_to_string(&state).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || saved().contains("\"named\"") && saved().contains("h.test")), "state file: {}", saved());
    let saved = saved();
    p.signal(libc::SIGINT);
    assert!(p.wait_exit(Duration::from_secs(5)).is_some());
    consul.stop();

    let p2 = Proxy::builder(&body).file("consul-state.json", &saved).start();
    wait_for_backends(&p2, "web", &set_of(&[ups[0].addr]), Duration::from_secs(5));
    assert_served_by(&p2, "/", &["ip2"], 3);
    assert_eq!(source(&p2.status(), &format!("dns:h.test:{port}"))["state"], "ok");
}

fn watch_errors(p: &Proxy, kind: &str) -> f64 {
    let m = parse_metrics(&p.metrics());
    sample(&m, "switchyard_consul_watch_errors_total", &[("service", "web"), ("kind", kind)]).unwrap_or(0.0)
}
