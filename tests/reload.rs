//! The live config file (README "Live reload"): SIGHUP and `switchyard
//! reload` re-read it under continuous load. A valid change (a new route, a
//! changed cluster, new file and Consul sources) serves within a second and
//! fails no request; an invalid file is refused with every error in
//! `/status` and the old table keeps serving; a start-time setting is
//! reported as needing a restart and the rest applies.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::consul::{ConsulDouble, Fault, Instance};
use support::*;

fn config_path(p: &Proxy) -> std::path::PathBuf {
    p.path("switchyard.toml")
}

/// Rewrite the proxy's config file with `edit` applied to its text.
fn edit_config(p: &Proxy, edit: impl FnOnce(String) -> String) {
    let path = config_path(p);
    let text = std::fs::read_to_string(&path).unwrap();
    write_atomic(&path, &edit(text));
}

/// The body an upstream answered a GET with, or the status when not 200.
fn who(p: &Proxy, path: &str) -> String {
    match p.fetch(path) {
        (200, body) => body,
        (code, _) => format!("status {code}"),
    }
}

/// Wait until `path` is answered by `name`; how long it took.
fn served_by(p: &Proxy, path: &str, name: &str, since: Instant, limit: Duration) -> Duration {
    assert!(
        wait_until(limit, || who(p, path) == name),
        "{path} is not served by {name} within {limit:?} (now: {}); log:\n{}",
        who(p, path),
        p.stderr()
    );
    since.elapsed()
}

fn last_reload(p: &Proxy) -> serde_json::Value {
    p.status()["config"]["last"].clone()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn reload_cli(p: &Proxy) -> (i32, String) {
    let out = Command::new(bin())
        .args(["reload", "--admin", &p.admin.to_string(), "--timeout", "15s"])
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn reloads(p: &Proxy, result: &str) -> f64 {
    sample(&parse_metrics(&p.metrics()), "switchyard_config_reloads_total", &[("result", result)]).unwrap_or(0.0)
}

#[test]
fn sighup_with_a_new_route_and_a_changed_cluster_fails_nothing_under_load() {
    let (a, b, c) = (Upstream::start("a"), Upstream::start("b"), Upstream::start("c"));
    let p = Proxy::start(&format!(
        "[[routes]]\nname = \"site\"\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{}\"]\n",
        a.addr
    ));
    assert_eq!(who(&p, "/api/x"), "a", "before the reload every path goes to web");
    let loads = [
        Load::start(p.url("/"), 1_000_000, Duration::from_secs(60)),
        Load::start_fresh(p.url("/"), 1_000_000, Duration::from_secs(60)),
    ];
    assert!(wait_until(Duration::from_secs(5), || loads.iter().all(|l| l.count() > 50)));
    let generation = p.generation();

    edit_config(&p, |t| {
        t.replace(&a.addr.to_string(), &b.addr.to_string()).replace(
            "[[routes]]\nname = \"site\"",
            &format!("[[routes]]\nname = \"api\"\npath_prefix = \"/api/\"\ncluster = \"api\"\n[clusters.api]\nstatic = [\"{}\"]\n\n[[routes]]\nname = \"site\"", c.addr),
        )
    });
    let sent = Instant::now();
    p.signal(libc::SIGHUP);
    let new_route = served_by(&p, "/api/x", "c", sent, Duration::from_secs(5));
    let changed = served_by(&p, "/", "b", sent, Duration::from_secs(5));
    let before = (loads[0].count(), loads[1].count());
    assert!(wait_until(Duration::from_secs(5), || loads[0].count() > before.0 + 100 && loads[1].count() > before.1 + 20));
    for l in loads {
        let r = l.finish();
        assert_eq!(r.failed, 0, "failed requests across the reload: {:?}", r.failures);
    }
    assert!(new_route < Duration::from_secs(1), "new route served {new_route:?} after SIGHUP");
    assert!(changed < Duration::from_secs(1), "changed cluster served {changed:?} after SIGHUP");
    assert!(p.generation() > generation);

    let last = last_reload(&p);
    assert_eq!(last["result"], "applied", "{last}");
    assert_eq!(last["active"], true, "{last}");
    assert_eq!(strings(&last["changes"]), ["route api added", "cluster api added", "cluster web changed"]);
    assert!(strings(&last["needs_restart"]).is_empty(), "{last}");
    assert_eq!(p.status()["config"]["last_trigger"], "SIGHUP");
    assert_eq!(reloads(&p, "applied"), 1.0);
    // A second SIGHUP with the same file changes nothing.
    p.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || reloads(&p, "unchanged") == 1.0));
    assert_eq!(last_reload(&p)["result"], "unchanged");
}

#[test]
fn an_invalid_file_is_refused_with_every_error_and_the_old_table_serves() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let p = Proxy::start(&format!("[[routes]]\nname = \"site\"\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{}\"]\n", a.addr));
    let load = Load::start(p.url("/"), 1_000_000, Duration::from_secs(60));
    let generation = p.generation();
    // Two mistakes: a route to a cluster that does not exist, and a bad timeout.
    edit_config(&p, |t| {
        t.replace(&a.addr.to_string(), &b.addr.to_string())
            .replace("cluster = \"web\"\n[clusters.web]", "cluster = \"nope\"\n[clusters.web]\nconnect_timeout = \"soon\"")
    });
    p.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || reloads(&p, "refused") == 1.0), "{}", p.stderr());
    let last = last_reload(&p);
    assert_eq!(last["result"], "refused");
    let errors = strings(&last["errors"]);
    assert!(errors.iter().any(|e| e.contains("routes[0].cluster") && e.contains("nope")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("clusters.web.connect_timeout") && e.contains("soon")), "{errors:?}");
    let log = p.stderr();
    assert!(log.contains("config reload refused") && log.contains("connect_timeout"), "every error is logged:\n{log}");
    assert_eq!(who(&p, "/"), "a", "the old table still serves");
    assert_eq!(p.generation(), generation, "nothing was swapped");

    // The CLI says the same, with exit status 1.
    let (code, out) = reload_cli(&p);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused") && out.contains("routes[0].cluster"), "{out}");
    // Fixed: applied, exit 0.
    edit_config(&p, |t| t.replace("cluster = \"nope\"", "cluster = \"web\"").replace("connect_timeout = \"soon\"", "connect_timeout = \"1s\""));
    let (code, out) = reload_cli(&p);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("applied") && out.contains("cluster web changed"), "{out}");
    assert_eq!(who(&p, "/"), "b", "`switchyard reload` returns once the new table serves");
    let r = load.finish();
    assert_eq!(r.failed, 0, "{:?}", r.failures);
}

#[test]
fn a_listener_change_needs_a_restart_and_the_rest_applies() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let p = Proxy::builder(&format!("[[routes]]\nname = \"site\"\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{}\"]\n", a.addr))
        .server(&format!("pid_file = \"{{dir}}/switchyard.pid\"\nupgrade_sock = \"{{dir}}/upgrade.sock\""))
        .start();
    let other = free_port();
    edit_config(&p, |t| {
        t.replace(&format!("address = \"{}\"", p.addr), &format!("address = \"127.0.0.1:{other}\""))
            .replace("threads = 1", "threads = 2")
            .replace(&a.addr.to_string(), &b.addr.to_string())
    });
    let (code, out) = reload_cli(&p);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ignored: listeners") && out.contains("ignored: server.threads"), "{out}");
    assert_eq!(who(&p, "/"), "b", "the cluster change applied");
    assert!(std::net::TcpStream::connect(("127.0.0.1", other)).is_err(), "no new listener was bound");
    let last = last_reload(&p);
    assert_eq!(strings(&last["needs_restart"]), ["listeners", "server.threads"], "{last}");
    let m = parse_metrics(&p.metrics());
    assert_eq!(sample(&m, "switchyard_config_restart_pending", &[]), Some(2.0));
    assert!(p.stderr().contains("applies only after a restart"), "{}", p.stderr());
}

#[test]
fn a_reload_adds_file_and_consul_sources_and_changes_a_consul_query_without_a_gap() {
    let consul = ConsulDouble::start();
    let (a, b, c) = (Upstream::start("a"), Upstream::start("b"), Upstream::start("c"));
    consul.register(Instance::new("node-a", "web-a", "web", "127.0.0.1", a.addr.port()));
    consul.register(Instance::new("node-c", "api-c", "api", "127.0.0.1", c.addr.port()));
    let p = Proxy::builder(&format!(
        "[consul]\naddresses = [\"{}\"]\nwait = \"2s\"\nmin_interval = \"50ms\"\nauto_routes = false\n\
         [[routes]]\nname = \"site\"\ncluster = \"web\"\n[clusters.web]\nconsul = {{ service = \"web\" }}\n",
        consul.addr
    ))
    .file("catalog.json", &catalog_json(&[("files", vec![(b.addr, 1)])]))
    .start();
    assert!(wait_until(Duration::from_secs(5), || who(&p, "/") == "a"));
    let loads = [
        Load::start(p.url("/"), 1_000_000, Duration::from_secs(60)),
        Load::start_fresh(p.url("/"), 1_000_000, Duration::from_secs(60)),
    ];
    assert!(wait_until(Duration::from_secs(5), || loads.iter().all(|l| l.count() > 50)));
    // The web cluster's query changes (a new watch), and two routes with new
    // sources arrive: a Consul service and a catalog file.
    edit_config(&p, |t| {
        t.replace("consul = { service = \"web\" }", "consul = { service = \"web\", panic_threshold = 0.2 }").replace(
            "[[routes]]\nname = \"site\"",
            "[[routes]]\nname = \"api\"\npath_prefix = \"/api/\"\ncluster = \"api\"\n[clusters.api]\nconsul = { service = \"api\" }\n\n\
             [[routes]]\nname = \"files\"\npath_prefix = \"/files/\"\ncluster = \"files\"\n[clusters.files]\nfile = { catalog = \"catalog.json\", service = \"files\" }\n\n\
             [[routes]]\nname = \"site\"",
        )
    });
    // New watches' first reads take a while: the running table must keep
    // serving from the old watch meanwhile, not switch to a cluster with no
    // result yet.
    consul.fault(Fault::Slow(Duration::from_millis(300)));
    let sent = Instant::now();
    let (code, out) = reload_cli(&p);
    let took = sent.elapsed();
    consul.fault(Fault::None);
    assert_eq!(code, 0, "{out}\n{}", p.stderr());
    // The reload answers once the new table serves: both new routes at once.
    assert_eq!(who(&p, "/api/x"), "c", "{out}");
    assert_eq!(who(&p, "/files/x"), "b", "{out}");
    assert!(took < Duration::from_secs(1), "reload to serving took {took:?}");
    let before = (loads[0].count(), loads[1].count());
    assert!(wait_until(Duration::from_secs(5), || loads[0].count() > before.0 + 100 && loads[1].count() > before.1 + 20));
    for l in loads {
        let r = l.finish();
        assert_eq!(r.failed, 0, "failed requests while the web query changed: {:?}", r.failures);
    }
    // The old web query's watch stopped: only the new one reads web.
    let status = p.status();
    let sources: Vec<String> = status["sources"].as_object().unwrap().keys().cloned().collect();
    assert!(sources.iter().any(|s| s.starts_with("file:")), "{sources:?}");
    assert!(status["config"]["activated_without_result"].as_array().unwrap().is_empty(), "{status}");
    assert_eq!(status["config"]["active_serial"], 1);
}
