//! The HA pair, proven with real parts: network namespaces `client`, `lb1`,
//! `lb2` and `up` on one bridge (198.18.0.0/24), two Switchyard nodes that
//! discover from the Consul double, real keepalived in each LB namespace
//! rendered from the shipped template, `switchyard watch` beside each proxy,
//! and a client loading both VIPs over new and kept-alive connections.
//!
//! On lb1 it injects, one after the other: SIGKILL of Switchyard, SIGTERM
//! (graceful hand-off), `run --upgrade`, SIGKILL of keepalived, link down,
//! and Consul unreachable. For each it measures how long until VIP-A answers
//! from lb2 and the failed requests on each VIP, and asserts the bounds of
//! docs/ha.md. Needs root (CI runs it as root and fails if it cannot).

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::consul::{ConsulDouble, Instance};
use support::netns::*;
use support::*;

const CLIENT: u8 = 10;
const LB1: u8 = 11;
const LB2: u8 = 12;
const UP: u8 = 20;
const VIP_A: u8 = 100;
const VIP_B: u8 = 101;

fn ip(last: u8) -> String {
    format!("{NET}.{last}")
}

struct Node {
    host: &'static str,
    dir: PathBuf,
    proxy: Option<Proc>,
    watcher: Option<Proc>,
    keepalived: Option<Proc>,
}

impl Node {
    fn config(&self) -> PathBuf {
        self.dir.join("switchyard.toml")
    }
    fn log(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }
    fn track(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("vrrp")).ok().map(|s| s.trim().to_string())
    }
}

/// Render the shipped keepalived template for one node with the shipped renderer.
fn render(node: &Node, self_ip: u8, peer_ip: u8, prio_a: u8, prio_b: u8, iface: &str) -> Result<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let template = std::fs::File::open(root.join("docker/keepalived/keepalived.conf.in")).unwrap();
    let notify = node.dir.join("notify.sh");
    std::fs::copy(root.join("docker/keepalived/notify.sh"), &notify).unwrap();
    let vars = [
        ("NODE", node.host.to_string()),
        ("IFACE", iface.to_string()),
        ("SELF", ip(self_ip)),
        ("PEER", ip(peer_ip)),
        ("VIP_A", format!("{}/24", ip(VIP_A))),
        ("VIP_B", format!("{}/24", ip(VIP_B))),
        ("PRIO_A", prio_a.to_string()),
        ("PRIO_B", prio_b.to_string()),
        ("VRID_A", "51".to_string()),
        ("VRID_B", "52".to_string()),
        ("TRACK_FILE", node.dir.join("vrrp").display().to_string()),
        ("CONFIG", node.config().display().to_string()),
        ("NOTIFY", format!("{} {}", notify.display(), node.log("vrrp-events").display())),
    ];
    let out = Command::new("sh")
        .arg(root.join("docker/keepalived/render.sh"))
        .args(vars.iter().map(|(k, v)| format!("{k}={v}")))
        .stdin(template)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).unwrap())
}

/// The pre-flight a rendered config must pass before keepalived runs: each
/// `interface` exists in the node's namespace, each VIP lies in that
/// interface's subnet and is nobody's own address, and keepalived's own
/// config test accepts the file.
fn preflight(lab: &Lab, host: &str, conf: &str, path: &Path) -> Result<(), String> {
    let mut ifaces = Vec::new();
    let mut vips = Vec::new();
    let mut in_vips = false;
    for line in conf.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if let Some(i) = line.strip_prefix("interface ") {
            ifaces.push(i.trim().to_string());
        }
        if line.starts_with("virtual_ipaddress") {
            in_vips = true;
            continue;
        }
        if in_vips {
            if line.starts_with('}') {
                in_vips = false;
            } else if let Some(addr) = line.split_whitespace().next() {
                vips.push(addr.to_string());
            }
        }
    }
    for i in &ifaces {
        let out = Command::new("ip").args(["-n", &lab.ns(host), "-o", "-4", "addr", "show", "dev", i]).output().unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || shown.is_empty() {
            return Err(format!("{host}: keepalived.conf names interface {i:?}, which {host} does not have"));
        }
    }
    let own = [CLIENT, LB1, LB2, UP].map(ip);
    for v in &vips {
        let bare = v.split('/').next().unwrap();
        let ok = v.ends_with("/24") && bare.starts_with(&format!("{NET}.")) && bare.parse::<std::net::Ipv4Addr>().is_ok();
        if !ok {
            return Err(format!("{host}: VIP {v:?} is not an address/24 in {NET}.0/24, the subnet of its interface"));
        }
        if own.contains(&bare.to_string()) {
            return Err(format!("{host}: VIP {v:?} is a host's own address"));
        }
    }
    std::fs::write(path, conf).unwrap();
    let out = Command::new("keepalived").args(["-t", "-f"]).arg(path).output().unwrap();
    if !out.status.success() {
        return Err(format!("{host}: keepalived -t rejects {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn has_addr(lab: &Lab, host: &str, addr: u8) -> bool {
    let out = Command::new("ip").args(["-n", &lab.ns(host), "-o", "-4", "addr", "show", "dev", "eth0"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {}/", ip(addr)))
}

/// Fields drop in order: processes first, then the namespaces they ran in.
struct Pair {
    nodes: [Node; 2],
    consul: ConsulDouble,
    _ups: Vec<Upstream>,
    lab: Lab,
}

impl Pair {
    fn start_proxy(&mut self, i: usize, upgrade: bool) {
        let n = &self.nodes[i];
        let mut cmd = self.lab.command(n.host, bin());
        cmd.args(["run", "--config"]).arg(n.config());
        if upgrade {
            cmd.arg("--upgrade");
        }
        cmd.args(["--log-level", "info,pingora=warn"]);
        let p = Proc::spawn(cmd, "switchyard", &n.log("switchyard"));
        let old = self.nodes[i].proxy.replace(p);
        if let Some(mut old) = old {
            // The old process hands over and exits by itself; keep waiting here.
            let code = old.wait(Duration::from_secs(20));
            assert_eq!(code, Some(0), "old proxy after upgrade\n{}", self.logs());
        }
    }

    fn start_keepalived(&mut self, i: usize) {
        let n = &self.nodes[i];
        let mut cmd = self.lab.command(n.host, "keepalived");
        cmd.args(["-n", "-l", "-D", "-P", "-f"])
            .arg(n.dir.join("keepalived.conf"))
            .arg("-p")
            .arg(n.dir.join("keepalived.pid"))
            .arg("-r")
            .arg(n.dir.join("vrrp.pid"));
        let k = Proc::spawn(cmd, "keepalived", &n.log("keepalived"));
        self.nodes[i].keepalived = Some(k);
    }

    fn start_watcher(&mut self, i: usize) {
        let n = &self.nodes[i];
        let mut cmd = Command::new(bin());
        cmd.args(["watch", "--config"]).arg(n.config());
        let w = Proc::spawn(cmd, "watch", &n.log("watch"));
        self.nodes[i].watcher = Some(w);
    }

    fn ready(&self, i: usize) -> bool {
        self.nodes[i].track().as_deref() == Some("0")
    }

    /// VIP-A on lb1 and VIP-B on lb2 only, both nodes ready.
    fn steady(&self) -> bool {
        self.ready(0)
            && self.ready(1)
            && has_addr(&self.lab, "lb1", VIP_A)
            && !has_addr(&self.lab, "lb2", VIP_A)
            && has_addr(&self.lab, "lb2", VIP_B)
            && !has_addr(&self.lab, "lb1", VIP_B)
    }

    fn wait_steady(&self, why: &str) {
        assert!(wait_until(Duration::from_secs(20), || self.steady()), "no steady state ({why})\n{}", self.logs());
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            for what in ["switchyard", "keepalived", "watch", "vrrp-events"] {
                let text = std::fs::read_to_string(n.log(what)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                out.push_str(&format!("--- {} {what}.log (last lines)\n", n.host));
                for l in tail.iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

struct Outcome {
    event: &'static str,
    /// When VIP-A first answered from lb2 after the injection (the answer's
    /// arrival, not its request's start: a request whose SYN was lost is
    /// answered a second later).
    failover: Option<Duration>,
    failed_a: usize,
    /// Of `failed_a`: new connections reset by lb2 before any answer that
    /// started within 5 ms before VIP-A first answered from lb2 — their SYN
    /// reached lb1 and their request lb2, which knows no such connection.
    /// Moving an address without connection state can always do this to a
    /// connection opened at that instant.
    reset_at_move: usize,
    failed_b: usize,
    retries: u64,
    answered: usize,
    /// The slowest answered request (a SYN retransmission shows as about 1 s).
    slowest: Duration,
    errors: Vec<String>,
}

/// Load both VIPs, inject, watch for `window`, and count.
fn scenario(pair: &mut Pair, event: &'static str, window: Duration, inject: impl FnOnce(&mut Pair)) -> Outcome {
    let client = pair.lab.ns("client");
    let pace = Duration::from_millis(2);
    let cap = Duration::from_secs(60);
    let a: SocketAddr = format!("{}:80", ip(VIP_A)).parse().unwrap();
    let b: SocketAddr = format!("{}:80", ip(VIP_B)).parse().unwrap();
    let loads = [
        VipLoad::start(client.clone(), a, false, pace, cap),
        VipLoad::start(client.clone(), a, true, pace, cap),
        VipLoad::start(client.clone(), b, false, pace, cap),
        VipLoad::start(client.clone(), b, true, pace, cap),
        VipLoad::probe(client.clone(), a, Duration::from_millis(5), cap),
    ];
    assert!(
        wait_until(Duration::from_secs(5), || loads.iter().all(|l| l.samples().iter().filter(|s| s.result.is_ok()).count() > 20)),
        "load does not flow before {event}"
    );
    let t0 = Instant::now();
    inject(pair);
    std::thread::sleep(window.saturating_sub(t0.elapsed()));
    let end = Instant::now();
    let retries: u64 = loads.iter().map(|l| l.retries.load(std::sync::atomic::Ordering::SeqCst)).sum();
    let samples: Vec<Vec<Sample>> = loads.into_iter().map(|l| l.finish()).collect();
    let during = |s: &Sample| s.at >= t0 && s.at <= end;
    let lb2 = ip(LB2);
    // The clients and the prober all count for when VIP-A answers from lb2;
    // only the clients' failures count.
    let failover = [&samples[0], &samples[1], &samples[4]]
        .into_iter()
        .flatten()
        .filter(|s| during(s) && s.result.as_deref() == Ok(lb2.as_str()))
        .map(|s| (s.at + s.took).duration_since(t0))
        .min();
    let failed = |set: &[Vec<Sample>]| set.iter().flatten().filter(|s| during(s) && s.result.is_err()).count();
    let reset_at_move = match failover {
        None => 0,
        Some(f) => samples[..2]
            .iter()
            .flatten()
            .filter(|s| during(s))
            .filter(|s| s.result.as_ref().err().is_some_and(|e| e.contains("after 0 bytes") && e.contains("reset")))
            .filter(|s| {
                let start = s.at.duration_since(t0);
                start <= f && f - start <= Duration::from_millis(5)
            })
            .count(),
    };
    let errors = samples[..4]
        .iter()
        .flatten()
        .filter(|s| during(s))
        .filter_map(|s| s.result.as_ref().err().map(|e| format!("+{:?} {e}", s.at.duration_since(t0))))
        .take(10)
        .collect();
    let o = Outcome {
        event,
        failover,
        failed_a: failed(&samples[..2]),
        reset_at_move,
        failed_b: failed(&samples[2..4]),
        retries,
        answered: samples[..4].iter().flatten().filter(|s| during(s) && s.result.is_ok()).count(),
        slowest: samples[..4].iter().flatten().filter(|s| during(s) && s.result.is_ok()).map(|s| s.took).max().unwrap_or_default(),
        errors,
    };
    eprintln!(
        "| {} | {} | {} ({} reset at the move) | {} | {} | {} | {} |",
        o.event,
        o.failover.map(|d| format!("{}", d.as_millis())).unwrap_or_else(|| "stays on lb1".into()),
        o.failed_a,
        o.reset_at_move,
        o.failed_b,
        o.retries,
        o.slowest.as_millis(),
        o.answered
    );
    o
}

#[test]
fn the_pair_fails_over_hands_off_and_upgrades_without_losing_the_other_vip() {
    let root_ok = unsafe { libc::geteuid() } == 0;
    if !root_ok {
        unavailable("not root: cannot create network namespaces");
        return;
    }
    if Command::new("keepalived").arg("--version").output().is_err() {
        unavailable("keepalived is not installed");
        return;
    }
    let lab = match Lab::new(&[("client", CLIENT), ("lb1", LB1), ("lb2", LB2), ("up", UP)]) {
        Ok(l) => l,
        Err(e) => {
            unavailable(&format!("cannot build the namespaces: {e}"));
            return;
        }
    };
    // Each LB keeps both VIPs on `lo` and answers ARP only for addresses on
    // the asking interface (docs/ha.md): a reply to a request lb1 accepted
    // just before VIP-A moved still leaves lb1, since the address stays local.
    for host in ["lb1", "lb2"] {
        let ns = lab.ns(host);
        for (key, value) in [("net.ipv4.conf.all.arp_ignore", "1"), ("net.ipv4.conf.all.arp_announce", "2")] {
            let out = lab.command(host, "sysctl").args(["-qw", &format!("{key}={value}")]).output().unwrap();
            assert!(out.status.success(), "sysctl {key} in {ns}: {}", String::from_utf8_lossy(&out.stderr));
        }
        for vip in [VIP_A, VIP_B] {
            lab.ip(&["-n", &ns, "addr", "add", &format!("{}/32", ip(vip)), "dev", "lo"]).unwrap();
        }
    }
    // Root-owned and not world-writable, so keepalived's script security
    // accepts the notify hook copied into it.
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();

    // Upstreams and the Consul double live in `up`.
    let up_ip = ip(UP);
    let listeners: Vec<TcpListener> = lab.within("up", move || (0..3).map(|_| TcpListener::bind(format!("{up_ip}:0")).unwrap()).collect());
    let mut listeners = listeners.into_iter();
    let consul = ConsulDouble::start_on(listeners.next().unwrap());
    let ups: Vec<Upstream> = ["app1", "app2"].iter().map(|n| Upstream::start_on(n, listeners.next().unwrap())).collect();
    for (i, u) in ups.iter().enumerate() {
        consul.register(Instance::new("app-node", &format!("web-{i}"), "web", &ip(UP), u.addr.port()));
    }

    let mk = |host: &'static str| {
        let dir = base.path().join(host);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "[server]\nthreads = 1\ndrain_timeout = \"3s\"\npid_file = \"{d}/switchyard.pid\"\nupgrade_sock = \"{d}/upgrade.sock\"\n\
             [admin]\nlisten = \"127.0.0.1:9901\"\n[access_log]\nenabled = false\n\
             [[listeners]]\naddress = \"0.0.0.0:80\"\n\
             [[routes]]\ncluster = \"web\"\n[clusters.web]\nconsul = {{ service = \"web\" }}\n\
             [consul]\naddresses = [\"{consul}\"]\nstate_file = \"{d}/consul-state.json\"\n\
             [consul.register]\nid = \"switchyard-{host}\"\n\
             [ha]\ntrack_file = \"{d}/vrrp\"\nvips = [\"{a}\", \"{b}\"]\nhandoff_timeout = \"2s\"\n",
            d = dir.display(),
            consul = consul.url(),
            a = ip(VIP_A),
            b = ip(VIP_B),
        );
        std::fs::write(dir.join("switchyard.toml"), config).unwrap();
        Node {
            host,
            dir,
            proxy: None,
            watcher: None,
            keepalived: None,
        }
    };
    let nodes = [mk("lb1"), mk("lb2")];

    // Pre-flight: the shipped template renders and passes for both nodes; a
    // wrong interface or VIP is caught with a message that names it.
    for (n, (me, peer, pa, pb)) in nodes.iter().zip([(LB1, LB2, 200, 100), (LB2, LB1, 100, 200)]) {
        let conf = render(n, me, peer, pa, pb, "eth0").unwrap();
        preflight(&lab, n.host, &conf, &n.dir.join("keepalived.conf")).unwrap_or_else(|e| panic!("{e}"));
    }
    let wrong = render(&nodes[0], LB1, LB2, 200, 100, "eth9").unwrap();
    let e = preflight(&lab, "lb1", &wrong, &nodes[0].dir.join("wrong.conf")).unwrap_err();
    assert!(e.contains("interface \"eth9\""), "{e}");
    let off_net = render(&nodes[0], LB1, LB2, 200, 100, "eth0").unwrap().replace(&format!("{}/24", ip(VIP_A)), "203.0.113.7/24");
    let e = preflight(&lab, "lb1", &off_net, &nodes[0].dir.join("wrong.conf")).unwrap_err();
    assert!(e.contains("203.0.113.7"), "{e}");

    let mut pair = Pair {
        lab,
        nodes,
        consul,
        _ups: ups,
    };
    for i in 0..2 {
        pair.start_proxy(i, false);
        pair.start_watcher(i);
    }
    assert!(wait_until(Duration::from_secs(15), || pair.ready(0) && pair.ready(1)), "nodes not ready\n{}", pair.logs());
    for i in 0..2 {
        pair.start_keepalived(i);
    }
    pair.wait_steady("start");
    eprintln!("| event | VIP-A from lb2 after (ms) | failed on VIP-A | failed on VIP-B | retried on a reused connection | slowest answer (ms) | answered |");
    eprintln!("|---|---|---|---|---|---|---|");
    let mut outcomes = Vec::new();

    // 1. Switchyard SIGKILLed: only the watcher can tell keepalived.
    let o = scenario(&mut pair, "SIGKILL switchyard", Duration::from_secs(2), |p| {
        p.nodes[0].proxy.as_ref().unwrap().signal(libc::SIGKILL);
    });
    assert!(o.failover.is_some_and(|d| d < Duration::from_millis(500)), "crash failover {:?}\n{}", o.failover, pair.logs());
    assert_eq!(o.failed_b, 0, "VIP-B during a crash of lb1: {:?}", o.errors);
    outcomes.push(o);
    pair.nodes[0].proxy.as_mut().unwrap().wait(Duration::from_secs(5));
    pair.nodes[0].proxy = None;
    pair.start_proxy(0, false);
    pair.wait_steady("after the crash");

    // 2. SIGTERM: demote, wait for lb2 to hold VIP-A, drain, exit.
    let o = scenario(&mut pair, "SIGTERM switchyard (hand-off)", Duration::from_secs(4), |p| {
        p.nodes[0].proxy.as_ref().unwrap().signal(libc::SIGTERM);
    });
    assert!(o.failover.is_some(), "VIP-A moved to lb2\n{}", pair.logs());
    assert_eq!((o.failed_a - o.reset_at_move, o.failed_b), (0, 0), "graceful hand-off: {:?}\n{}", o.errors, pair.logs());
    assert!(o.reset_at_move <= 1, "at most the one connection opened as the VIP moved: {:?}", o.errors);
    outcomes.push(o);
    let code = pair.nodes[0].proxy.as_mut().unwrap().wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{}", pair.logs());
    pair.nodes[0].proxy = None;
    pair.start_proxy(0, false);
    pair.wait_steady("after the hand-off");

    // 3. run --upgrade on lb1: the VIP stays, nothing fails.
    let o = scenario(&mut pair, "run --upgrade", Duration::from_secs(3), |p| p.start_proxy(0, true));
    assert_eq!(o.failover, None, "an upgrade must not move VIP-A\n{}", pair.logs());
    assert_eq!((o.failed_a, o.failed_b), (0, 0), "upgrade: {:?}\n{}", o.errors, pair.logs());
    outcomes.push(o);
    pair.wait_steady("after the upgrade");

    // 4. keepalived SIGKILLed: its adverts stop, lb2 takes VIP-A.
    let o = scenario(&mut pair, "SIGKILL keepalived", Duration::from_secs(3), |p| {
        p.nodes[0].keepalived.as_ref().unwrap().signal(libc::SIGKILL);
    });
    assert!(o.failover.is_some(), "VIP-A moved to lb2\n{}", pair.logs());
    assert_eq!(o.failed_b, 0, "VIP-B: {:?}", o.errors);
    outcomes.push(o);
    pair.nodes[0].keepalived.as_mut().unwrap().wait(Duration::from_secs(5));
    // A killed keepalived leaves its addresses behind; a restart cleans up
    // what it owns, but remove them first as an operator would.
    let ns = pair.lab.ns("lb1");
    let _ = pair.lab.ip(&["-n", &ns, "addr", "del", &format!("{}/24", ip(VIP_A)), "dev", "eth0"]);
    pair.start_keepalived(0);
    pair.wait_steady("after keepalived's restart");

    // 5. lb1's link goes down.
    let o = scenario(&mut pair, "link down on lb1", Duration::from_secs(3), |p| {
        let ns = p.lab.ns("lb1");
        p.lab.ip(&["-n", &ns, "link", "set", "eth0", "down"]).unwrap();
    });
    assert!(o.failover.is_some(), "VIP-A moved to lb2\n{}", pair.logs());
    assert_eq!(o.failed_b, 0, "VIP-B: {:?}", o.errors);
    outcomes.push(o);
    let ns = pair.lab.ns("lb1");
    pair.lab.ip(&["-n", &ns, "link", "set", "eth0", "up"]).unwrap();
    pair.wait_steady("after the link came back");

    // 6. Consul unreachable: both nodes serve their last good (persisted)
    // table and keep their VIPs.
    let o = scenario(&mut pair, "Consul unreachable", Duration::from_secs(3), |p| p.consul.stop());
    assert_eq!(o.failover, None, "losing Consul must not move VIP-A\n{}", pair.logs());
    assert_eq!((o.failed_a, o.failed_b), (0, 0), "Consul loss: {:?}", o.errors);
    assert!(pair.steady(), "both nodes still ready and holding their VIPs\n{}", pair.logs());
    outcomes.push(o);
    assert!(outcomes.iter().all(|o| o.answered > 100));
}
