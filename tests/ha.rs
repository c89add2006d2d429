//! One node of a pair, on loopback: VRRP readiness (`/readyz?vrrp`, the
//! keepalived track file, `switchyard health`), the SIGTERM hand-off, `run
//! --upgrade` under load, and the table digest two nodes compare.
//! The pair itself, with keepalived in network namespaces, is in `tests/pair.rs`.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn track(p: &Proxy) -> Option<String> {
    std::fs::read_to_string(p.path("vrrp")).ok().map(|s| s.trim().to_string())
}

fn vrrp(p: &Proxy) -> (u16, serde_json::Value) {
    let r = p.http.get(p.admin_url("/readyz?vrrp")).send().unwrap();
    let code = r.status().as_u16();
    (code, serde_json::from_str(&r.text().unwrap()).unwrap())
}

fn health(p: &Proxy) -> (i32, String) {
    let out = Command::new(bin())
        .args(["health", "--vrrp", "--timeout", "2s", "--admin"])
        .arg(p.admin.to_string())
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn file_cluster(extra: &str) -> String {
    format!(
        "[[routes]]\ncluster = \"web\"\n[clusters.web]\nfile = {{ catalog = \"catalog.json\" }}\n\
         [ha]\ntrack_file = \"vrrp\"\ninterval = \"20ms\"\n{extra}\n"
    )
}

#[test]
fn vrrp_readiness_follows_the_table_and_reaches_the_track_file() {
    let a = Upstream::start("a");
    // No catalog yet: the cluster is pending, so the node must not hold a VIP.
    let p = Proxy::start(&file_cluster(""));
    assert!(wait_until(Duration::from_secs(5), || track(&p).as_deref() == Some("1")), "track file: {:?}", track(&p));
    let (code, body) = vrrp(&p);
    assert_eq!(code, 503, "{body}");
    assert!(body["reasons"].to_string().contains("first discovery result for cluster(s): web"), "{body}");
    let (exit, out) = health(&p);
    assert_eq!(exit, 1, "{out}");
    assert!(out.contains("web"), "{out}");

    write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![(a.addr, 1)])]));
    assert!(wait_until(Duration::from_secs(5), || track(&p).as_deref() == Some("0")), "track file: {:?}", track(&p));
    let (code, body) = vrrp(&p);
    assert_eq!(code, 200, "{body}");
    assert_eq!(health(&p).0, 0);
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_ha_ready", &[]), Some(1.0));
    let writes = sample(&m, "switchyard_ha_track_file_writes_total", &[]).unwrap();
    assert!(writes >= 2.0, "{writes}");

    // An emptied catalog leaves nothing to serve: give the VIP up.
    write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![])]));
    assert!(wait_until(Duration::from_secs(5), || track(&p).as_deref() == Some("1")));
    assert!(vrrp(&p).1["reasons"].to_string().contains("no backend to serve"));

    // Written only on a change: a steady state does not rewrite the file.
    let writes = |p: &Proxy| sample(&parse_metrics(&p.metrics()), "switchyard_ha_track_file_writes_total", &[]).unwrap();
    let before = writes(&p);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(300) {
        assert_eq!(track(&p).as_deref(), Some("1"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(writes(&p), before, "no rewrite without a change");
}

#[test]
fn a_track_file_that_cannot_be_written_means_not_ready() {
    let a = Upstream::start("a");
    let p = Proxy::builder(&file_cluster(""))
        .file("catalog.json", &catalog_json(&[("web", vec![(a.addr, 1)])]))
        .start();
    assert!(wait_until(Duration::from_secs(5), || track(&p).as_deref() == Some("0")));
    // A directory where the file should be: every rename onto it fails.
    std::fs::remove_file(p.path("vrrp")).unwrap();
    std::fs::create_dir(p.path("vrrp")).unwrap();
    // Force a change so the node tries to write.
    write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![])]));
    assert!(wait_until(Duration::from_secs(5), || {
        sample(&parse_metrics(&p.metrics()), "switchyard_ha_track_file_errors_total", &[]).unwrap_or(0.0) >= 1.0
    }));
    write_atomic(&p.path("catalog.json"), &catalog_json(&[("web", vec![(a.addr, 1)])]));
    // Serving again, but it cannot say so: still not ready, and it says why.
    assert!(wait_until(Duration::from_secs(5), || p.status()["clusters"][0]["active_backends"] == 1));
    let (code, body) = vrrp(&p);
    assert_eq!(code, 503, "{body}");
    assert!(body["reasons"].to_string().contains("cannot write ha.track_file"), "{body}");
    let st = p.status();
    assert!(st["ha"]["status"]["track_file_error"].as_str().unwrap().contains("vrrp"), "{st}");
    assert!(p.stderr().contains("cannot write ha.track_file"));
    // Writable again: ready again, with no restart.
    std::fs::remove_dir(p.path("vrrp")).unwrap();
    assert!(wait_until(Duration::from_secs(5), || track(&p).as_deref() == Some("0")));
    assert_eq!(vrrp(&p).0, 200);
}

#[test]
fn sigterm_demotes_first_and_keeps_serving_through_the_handoff() {
    let a = Upstream::start("a");
    let mut p = Proxy::builder(&file_cluster("handoff_timeout = \"1500ms\""))
        .file("catalog.json", &catalog_json(&[("web", vec![(a.addr, 1)])]))
        .start();
    assert!(wait_until(Duration::from_secs(5), || track(&p).as_deref() == Some("0")));
    let load = Load::start_fresh(p.url("/"), 100_000, Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(5), || load.count() > 20));
    let t = Instant::now();
    p.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(2), || track(&p).as_deref() == Some("1")), "demoted at once");
    let demoted = t.elapsed();
    assert!(demoted < Duration::from_millis(500), "demote took {demoted:?}");
    // Through the hand-off window the node still accepts and answers.
    let at = load.count();
    assert!(wait_until(Duration::from_millis(1000), || load.count() > at + 20));
    assert_eq!(p.fetch("/").0, 200);
    let (code, body) = vrrp(&p);
    assert_eq!(code, 503);
    assert!(body["reasons"].to_string().contains("handing off"), "{body}");
    let window = t.elapsed();
    let rep = load.finish();
    assert!(window < Duration::from_millis(1500), "the checks ran inside the window: {window:?}");
    assert_eq!(rep.failed, 0, "{:?}", rep.failures);
    let code = p.wait_exit(Duration::from_secs(10));
    let took = t.elapsed();
    assert_eq!(code, Some(0), "{}", p.stderr());
    assert!(took >= Duration::from_millis(1500), "waited the hand-off: {took:?}");
    assert_eq!(track(&p).as_deref(), Some("1"), "an exited node stays demoted");
    assert!(p.stderr().contains("SIGTERM: demoted"), "{}", p.stderr());
}

#[test]
fn upgrade_takes_the_sockets_over_with_no_failed_request() {
    let a = Upstream::start("a");
    let mut p = Proxy::builder(&file_cluster(""))
        .server("pid_file = \"{dir}/switchyard.pid\"\nupgrade_sock = \"{dir}/upgrade.sock\"")
        .file("catalog.json", &catalog_json(&[("web", vec![(a.addr, 1)])]))
        .start();
    assert!(wait_until(Duration::from_secs(5), || track(&p).as_deref() == Some("0")));
    let old_pid = p.pid();
    assert_eq!(std::fs::read_to_string(p.path("switchyard.pid")).unwrap().trim(), old_pid.to_string());
    // The outside watcher, as deployed beside the proxy.
    let watch_log = std::fs::File::create(p.path("watch.log")).unwrap();
    let watcher = Command::new(bin())
        .args(["watch", "--log-format", "json", "--poll", "100ms", "--config"])
        .arg(p.path("switchyard.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(watch_log)
        .spawn()
        .unwrap();
    let _watcher = KillOnDrop(watcher);
    let watch_path = p.path("watch.log");
    let watching = |pid: i32| std::fs::read_to_string(&watch_path).unwrap_or_default().contains(&format!("\"pid\":{pid}"));
    assert!(wait_until(Duration::from_secs(5), || watching(old_pid)));
    let kept = Load::start(p.url("/"), 1_000_000, Duration::from_secs(40));
    let fresh = Load::start_fresh(p.url("/"), 1_000_000, Duration::from_secs(40));
    assert!(wait_until(Duration::from_secs(5), || kept.count() > 50 && fresh.count() > 50));

    let mut old = p.upgrade();
    let new_pid = p.pid();
    // The old process hands over, keeps accepting for a few seconds, drains, exits.
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = old.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.is_some_and(|s| s.success()), "old process: {status:?}\n{}", p.stderr());
    // The new one serves alone now, and records itself for the next upgrade.
    let (k, f) = (kept.count(), fresh.count());
    assert!(wait_until(Duration::from_secs(5), || kept.count() > k + 50 && fresh.count() > f + 50));
    assert_eq!(std::fs::read_to_string(p.path("switchyard.pid")).unwrap().trim(), new_pid.to_string());
    let (kept, fresh) = (kept.finish(), fresh.finish());
    assert_eq!(kept.failed, 0, "kept-alive: {:?}", kept.failures);
    assert_eq!(fresh.failed, 0, "new connections: {:?}", fresh.failures);
    assert!(kept.ok > 100 && fresh.ok > 100, "{} {}", kept.ok, fresh.ok);
    // The upgrade never demoted the node, and the watcher follows the new process.
    assert_eq!(track(&p).as_deref(), Some("0"));
    assert_eq!(vrrp(&p).0, 200);
    assert!(wait_until(Duration::from_secs(5), || watching(new_pid)));
    // A SIGKILLed proxy cannot say it is gone; the watcher does.
    p.signal(libc::SIGKILL);
    assert!(wait_until(Duration::from_secs(2), || track(&p).as_deref() == Some("1")), "{}", std::fs::read_to_string(p.path("watch.log")).unwrap());
}

/// A child this test started, ended by its PID when the test ends (or panics).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn systemd_hears_ready_then_the_upgraded_process_as_its_main_pid() {
    use std::os::unix::net::UnixDatagram;
    let a = Upstream::start("a");
    let sockdir = tempfile::tempdir().unwrap();
    let sock_path = sockdir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut p = Proxy::builder(&file_cluster(""))
        .env("NOTIFY_SOCKET", sock_path.to_str().unwrap())
        .server("pid_file = \"{dir}/switchyard.pid\"\nupgrade_sock = \"{dir}/upgrade.sock\"")
        .file("catalog.json", &catalog_json(&[("web", vec![(a.addr, 1)])]))
        .start();
    assert_eq!(recv().trim(), "READY=1");
    let old_pid = p.pid();
    let load = Load::start_fresh(p.url("/"), 1_000_000, Duration::from_secs(40));
    // ExecReload=: `switchyard upgrade` returns once the new process holds the sockets.
    // The new process inherits the command's stdout and stderr (under systemd:
    // the journal), so they go to files here, not to pipes this test would
    // wait on until the new process exits.
    let append = |name: &str| std::fs::OpenOptions::new().create(true).append(true).open(p.path(name)).unwrap();
    let status = Command::new(bin())
        .args(["upgrade", "--config"])
        .arg(p.path("switchyard.toml"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(append("upgrade.out"))
        .stderr(append("stderr.log"))
        .status()
        .unwrap();
    let stdout = std::fs::read_to_string(p.path("upgrade.out")).unwrap();
    assert!(status.success(), "{stdout}\n{}", p.stderr());
    let new_pid: i32 = std::fs::read_to_string(p.path("switchyard.pid")).unwrap().trim().parse().unwrap();
    // Ended by its PID when the test ends: it is not our child.
    struct KillPid(i32);
    impl Drop for KillPid {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _new = KillPid(new_pid);
    assert_ne!(new_pid, old_pid);
    assert!(stdout.contains(&format!("pid {new_pid}")), "{stdout}");
    assert_eq!(recv().trim(), format!("MAINPID={new_pid}\nREADY=1"));
    assert_eq!(p.wait_exit(Duration::from_secs(20)), Some(0), "the old process drains and exits");
    let n = load.count();
    assert!(wait_until(Duration::from_secs(5), || load.count() > n + 50));
    let rep = load.finish();
    assert_eq!(rep.failed, 0, "{:?}", rep.failures);
    // SIGTERM tells systemd the service is stopping.
    unsafe { libc::kill(new_pid, libc::SIGTERM) };
    assert_eq!(recv().trim(), "STOPPING=1");
}

#[test]
fn upgrade_without_a_running_instance_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\npid_file = \"{d}/none.pid\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[[listeners]]\naddress = \"127.0.0.1:{}\"\n\
             [[routes]]\ncluster = \"x\"\n[clusters.x]\nstatic = [\"127.0.0.1:1\"]\n",
            free_port(),
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(bin()).args(["run", "--upgrade", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--upgrade: cannot read server.pid_file") && err.contains("none.pid"), "{err}");
}

#[test]
fn two_nodes_fed_the_same_catalog_show_the_same_digest() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let catalog = catalog_json(&[("web", vec![(a.addr, 1), (b.addr, 2)])]);
    let body = "[[routes]]\ncluster = \"web\"\n[clusters.web]\nfile = { catalog = \"catalog.json\" }\nselection = \"weighted\"\n";
    let n1 = Proxy::builder(body).file("catalog.json", &catalog).start();
    let n2 = Proxy::builder(body).file("catalog.json", &catalog).start();
    // Different generations (n2 gets an extra swap), the same content.
    write_atomic(&n2.path("catalog.json"), &catalog_json(&[("web", vec![(a.addr, 1)])]));
    assert!(wait_until(Duration::from_secs(5), || n2.status()["clusters"][0]["backends"].as_array().unwrap().len() == 1));
    write_atomic(&n2.path("catalog.json"), &catalog);
    assert!(wait_until(Duration::from_secs(5), || n2.status()["clusters"][0]["backends"].as_array().unwrap().len() == 2));
    let (s1, s2) = (n1.status(), n2.status());
    assert_ne!(s1["generation"], s2["generation"]);
    assert_eq!(s1["digest"], s2["digest"]);
    assert_eq!(s1["digest"].as_str().unwrap().len(), 16);
    let info = |p: &Proxy| {
        parse_metrics(&p.metrics())
            .into_iter()
            .find(|(n, _, _)| n == "switchyard_routing_table_info")
            .map(|(_, l, v)| (l, v))
            .unwrap()
    };
    assert_eq!(info(&n1), (vec![("digest".to_string(), s1["digest"].as_str().unwrap().to_string())], 1.0));
    let compare = |x: &Proxy, y: &Proxy| {
        let out = Command::new(bin())
            .args(["status", "--compare"])
            .arg(x.admin.to_string())
            .arg(y.admin.to_string())
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = compare(&n1, &n2);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("same table"), "{out}");

    // Drain b on n2 only: the digests differ, and compare says where.
    write_atomic(&n2.path("catalog.json"), &catalog_json(&[("web", vec![(a.addr, 1), (b.addr, 0)])]));
    assert!(wait_until(Duration::from_secs(5), || n2.status()["digest"] != s1["digest"]));
    let (code, out) = compare(&n1, &n2);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("backend {} is weight 2 \"active\" on {}, weight 0 \"drained\" on {}", b.addr, n1.admin, n2.admin)), "{out}");
    // An unreachable node is exit 2, bounded by the timeout.
    let t = Instant::now();
    let out = Command::new(bin())
        .args(["status", "--timeout", "500ms", "--compare"])
        .arg(n1.admin.to_string())
        .arg(dead_addr().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(t.elapsed() < Duration::from_secs(5));
}
