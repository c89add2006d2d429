//! Admin API and metrics: `/metrics` parses and its counters match the traffic
//! the test sent; `/status` describes the table; the access log records what
//! happened, and rotation/reopen work.

mod support;

use std::time::Duration;
use support::*;

#[test]
fn metrics_parse_and_match_the_traffic_sent() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let dead = dead_addr();
    let p = Proxy::start(&format!(
        "[[routes]]\nname = \"app\"\nhosts = [\"app.test\"]\ncluster = \"app\"\n\
         [clusters.app]\nstatic = [\"{}\", \"{}\", \"{}\"]\n",
        a.addr, b.addr, dead
    ));
    let (ok, missing) = (40u64, 7u64);
    for _ in 0..ok {
        let r = p.http.get(p.url("/")).header("host", "app.test").send().unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..missing {
        let r = p.http.get(p.url("/")).header("host", "other.test").send().unwrap();
        assert_eq!(r.status(), 404);
    }
    // A request is counted when its log phase runs, just after its response
    // went out: wait (bounded) for the last one to land before comparing.
    let counted = |t: &str| {
        let m = parse_metrics(t);
        let hist = sample(&m, "switchyard_request_duration_seconds_count", &[("cluster", "app")]).unwrap_or(0.0);
        let unrouted = sample(&m, "switchyard_requests_total", &[("route", ""), ("cluster", ""), ("code_class", "4xx")]).unwrap_or(0.0);
        hist >= ok as f64 && unrouted >= missing as f64
    };
    assert!(wait_until(Duration::from_secs(3), || counted(&p.metrics())));
    let text = p.metrics();
    let m = parse_metrics(&text);
    // Every metric has help and type lines.
    for name in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds",
        "switchyard_upstream_requests_total",
        "switchyard_backends",
        "switchyard_routing_generation",
        "switchyard_routing_swaps_total",
        "switchyard_downstream_connections",
        "switchyard_downstream_connections_parked",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "no help for {name}");
        assert!(text.contains(&format!("# TYPE {name} ")), "no type for {name}");
    }
    let req = |route: &str, cluster: &str, class: &str| {
        sample(&m, "switchyard_requests_total", &[("route", route), ("cluster", cluster), ("code_class", class)])
    };
    assert_eq!(req("app", "app", "2xx"), Some(ok as f64));
    assert_eq!(req("", "", "4xx"), Some(missing as f64));
    assert_eq!(req("app", "app", "5xx"), Some(0.0));
    let hist_count = sample(&m, "switchyard_request_duration_seconds_count", &[("cluster", "app")]);
    assert_eq!(hist_count, Some(ok as f64));
    let up = |backend: &str, outcome: &str| {
        sample(&m, "switchyard_upstream_requests_total", &[("cluster", "app"), ("backend", backend), ("outcome", outcome)]).unwrap_or(0.0)
    };
    let (a_s, b_s, d_s) = (a.addr.to_string(), b.addr.to_string(), dead.to_string());
    assert_eq!(up(&a_s, "ok") + up(&b_s, "ok"), ok as f64);
    assert_eq!(up(&a_s, "ok"), a.hits() as f64);
    assert!(up(&d_s, "connect_error") >= 1.0);
    assert_eq!(sample(&m, "switchyard_backends", &[("cluster", "app"), ("state", "active")]), Some(3.0));
    assert_eq!(sample(&m, "switchyard_routing_generation", &[]), Some(1.0));
    assert!(wait_until(Duration::from_secs(3), || {
        sample(&parse_metrics(&p.metrics()), "switchyard_requests_in_flight", &[]) == Some(0.0)
    }));
}

#[test]
fn status_describes_routes_clusters_and_sources() {
    let a = Upstream::start("a");
    let p = Proxy::builder(
        "[[routes]]\nname = \"web\"\nhosts = [\"*.example.com\"]\npath_prefix = \"/app\"\ncluster = \"web\"\n\
         [clusters.web]\nfile = { catalog = \"cat.json\" }\nselection = \"least_connections\"\n",
    )
    .file("cat.json", &format!("{{\"web\": [{{\"address\": \"{}\", \"tags\": [\"v2\"], \"meta\": {{\"az\": \"b\"}}}}]}}", a.addr))
    .start();
    let st = p.status();
    assert_eq!(st["generation"], 1);
    assert_eq!(st["ready"], true);
    assert_eq!(st["routes"][0]["hosts"][0], "*.example.com");
    assert_eq!(st["routes"][0]["path_prefix"], "/app");
    let c = &st["clusters"][0];
    assert_eq!(c["name"], "web");
    assert_eq!(c["selection"], "least_connections");
    assert_eq!(c["discovery"], "file");
    assert_eq!(c["backends"][0]["address"], a.addr.to_string());
    assert_eq!(c["backends"][0]["tags"][0], "v2");
    assert_eq!(c["backends"][0]["meta"]["az"], "b");
    let src = format!("file:{}", p.path("cat.json").display());
    assert_eq!(st["sources"][&src]["state"], "ok");
    assert!(st["sources"][&src]["last_success_unix"].as_f64().unwrap() > 1.7e9);
    let r = p.http.get(p.admin_url("/nope")).send().unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn access_log_records_requests_and_rotates() {
    let a = Upstream::start("a");
    let p = Proxy::builder(&format!("[[routes]]\nname = \"r\"\ncluster = \"c\"\n[clusters.c]\nstatic = [\"{}\"]\n", a.addr))
        .access_log("[access_log]\npath = \"access.log\"\nmax_bytes = 4000\nkeep = 2")
        .start();
    let log = p.path("access.log");
    let r = p
        .http
        .get(p.url("/hello?secret=1"))
        .header("host", "www.example.com")
        .header("x-request-id", "log-test-1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let line_for = |id: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["request_id"] == id)
    };
    assert!(wait_until(Duration::from_secs(3), || line_for("log-test-1").is_some()));
    let v = line_for("log-test-1").unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["host"], "www.example.com");
    assert_eq!(v["path"], "/hello");
    assert_eq!(v["route"], "r");
    assert_eq!(v["cluster"], "c");
    assert_eq!(v["backend"], a.addr.to_string());
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["bytes_out"], 1);
    assert!(v["duration"].as_f64().unwrap() >= v["upstream_duration"].as_f64().unwrap());
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
    // Size rotation: ~400 bytes a line, 4000 bytes a file.
    for i in 0..40 {
        p.http.get(p.url("/")).header("x-request-id", format!("fill-{i}")).send().unwrap();
    }
    let rotated = p.path("access.log.1");
    assert!(wait_until(Duration::from_secs(3), || rotated.exists()));
    assert!(wait_until(Duration::from_secs(3), || p.path("access.log.2").exists()));
    assert!(!p.path("access.log.3").exists(), "keep = 2");
    // SIGHUP reopens: move the file away, signal, and the next line goes to a new file.
    std::fs::rename(&log, p.path("moved.log")).unwrap();
    p.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(3), || {
        p.http.get(p.url("/")).header("x-request-id", "after-hup").send().unwrap();
        line_for("after-hup").is_some()
    }));
    assert!(p.fetch("/").0 == 200, "SIGHUP must not stop the proxy");
}

#[test]
fn an_admin_token_guards_status_and_reload_but_not_the_health_checks() {
    let a = Upstream::start("a");
    let token = "s3cret-admin-token-0123456789";
    let p = Proxy::builder(&format!("[[routes]]\ncluster = \"c\"\n[clusters.c]\nstatic = [\"{}\"]\n", a.addr))
        .file("admin.token", &format!("{token}\n"))
        .admin("token_file = \"admin.token\"")
        .start();
    let get = |path: &str, auth: Option<&str>| {
        let mut r = p.http.get(p.admin_url(path));
        if let Some(t) = auth {
            r = r.bearer_auth(t);
        }
        r.send().unwrap()
    };
    for open in ["/healthz", "/readyz", "/readyz?vrrp", "/metrics"] {
        assert!(get(open, None).status().is_success() || get(open, None).status() == 503, "{open} stays open");
    }
    let denied = get("/status", None);
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.headers()["www-authenticate"], "Bearer");
    assert_eq!(get("/status", Some("wrong-token-of-the-same-size!")).status(), 401);
    assert_eq!(get("/status", Some(token)).status(), 200);
    assert_eq!(p.http.post(p.admin_url("/reload")).send().unwrap().status(), 401);
    // The operator commands send it from SWITCHYARD_ADMIN_TOKEN_FILE.
    let cmd = |with: bool| {
        let mut c = std::process::Command::new(bin());
        c.args(["reload", "--admin", &p.admin.to_string()]);
        if with {
            c.env("SWITCHYARD_ADMIN_TOKEN_FILE", p.path("admin.token"));
        } else {
            c.env_remove("SWITCHYARD_ADMIN_TOKEN_FILE");
        }
        c.output().unwrap()
    };
    let out = cmd(false);
    assert_ne!(out.status.code(), Some(0));
    let out = cmd(true);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // The token is in no answer and no log line.
    let everything = format!("{}{}{}", p.stderr(), p.metrics(), p.http.get(p.admin_url("/status")).bearer_auth(token).send().unwrap().text().unwrap());
    assert!(!everything.contains(token), "the admin token leaked");
}
