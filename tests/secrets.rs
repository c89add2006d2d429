//! Secrets never leak: after a run at `trace` log level that exercises
//! Consul errors (ACL denied, 500s, garbage, an outage), a recovery, reloads
//! that change the token (valid and invalid), the KV commands with a token
//! Consul refuses, and admin requests with a wrong bearer token, none of the
//! known secret values appears in the proxy's log, the access log, `/status`,
//! `/metrics`, the CLI's output or `switchyard check`.

mod support;

use std::process::Command;
use std::time::Duration;
use support::consul::{ConsulDouble, Fault};
use support::*;

/// The Consul token the proxy holds (from its token file).
const CONSUL_TOKEN: &str = "c0ffee11-5ec2-4e7a-b0b0-consul-token-one";
/// A token given to the KV commands through `CONSUL_HTTP_TOKEN`.
const CLI_TOKEN: &str = "d00dfeed-5ec2-4e7a-b0b0-cli-token-two";
/// A literal token put into the config by a reload.
const RELOAD_TOKEN: &str = "beefcafe-5ec2-4e7a-b0b0-reload-token-3";
/// The admin API's bearer token.
const ADMIN_TOKEN: &str = "admin-bearer-5ec2-4e7a-b0b0-token-four";
const SECRETS: [&str; 4] = [CONSUL_TOKEN, CLI_TOKEN, RELOAD_TOKEN, ADMIN_TOKEN];

fn body(consul: &ConsulDouble, up: &Upstream, extra_consul: &str) -> String {
    format!(
        "[consul]\naddresses = [\"{}\"]\ntoken_file = \"consul.token\"\nwait = \"1s\"\nmin_interval = \"20ms\"\nkv = true\n\
         state_file = \"consul-state.json\"\n{extra_consul}\n\
         [[routes]]\ncluster = \"web\"\n[clusters.web]\nstatic = [\"{}\"]\n\
         [[routes]]\npath_prefix = \"/app/\"\ncluster = \"app\"\n[clusters.app]\nconsul = {{ service = \"app\" }}\n",
        consul.addr, up.addr
    )
}

fn assert_clean(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} shows a secret ({s}):\n{text}");
        // Nor a recognisable part of one.
        assert!(!text.contains(&s[..18]), "{what} shows part of a secret ({s}):\n{text}");
    }
}

fn get(p: &Proxy, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut r = p.http.get(p.admin_url(path));
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    let r = r.send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// Run the CLI; `--config` goes to the commands that read the file.
fn cli(p: &Proxy, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut c = Command::new(bin());
    c.args(args);
    if args[0] != "reload" {
        c.arg("--config").arg(p.path("switchyard.toml"));
    }
    for var in ["CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_ADDR"] {
        c.env_remove(var);
    }
    c.envs(env.iter().copied());
    let out = c.output().unwrap();
    format!("exit {:?}\n{}{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn no_secret_reaches_logs_status_metrics_or_the_cli() {
    let consul = ConsulDouble::start();
    // Every request with our token is refused at first: ACL errors to log.
    consul.require_token(Some("some-other-token"));
    consul.register(support::consul::Instance::new("n1", "app-1", "app", "127.0.0.1", 1));
    let up = Upstream::start("web");
    let p = Proxy::builder(&body(&consul, &up, ""))
        .file("consul.token", CONSUL_TOKEN)
        .file("admin.token", ADMIN_TOKEN)
        .admin("token_file = \"admin.token\"")
        .log_level("trace")
        .start();
    let sent_token = || consul.requests().iter().any(|r| r.header("x-consul-token") == Some(CONSUL_TOKEN));
    assert!(wait_until(Duration::from_secs(5), sent_token), "the proxy used its token");
    assert!(wait_until(Duration::from_secs(5), || p.stderr().contains("403")), "ACL errors were logged:\n{}", p.stderr());

    // More kinds of failure, each seen by the watcher.
    for fault in [Fault::Status(500), Fault::Garbage, Fault::Status(429)] {
        let before = consul.requests().len();
        consul.fault(fault);
        assert!(wait_until(Duration::from_secs(5), || consul.requests().len() > before + 2));
    }
    consul.fault(Fault::None);
    // Recovery: the right token now works.
    consul.require_token(Some(CONSUL_TOKEN));
    consul.kv_put("switchyard/clusters/web/retries", b"1");
    let kv_keys = || serde_json::from_str::<serde_json::Value>(&get(&p, "/status", Some(ADMIN_TOKEN)).1).unwrap()["config"]["kv"]["keys"].as_u64();
    assert!(wait_until(Duration::from_secs(10), || kv_keys() == Some(1)), "{}", p.stderr());

    // A reload that puts a literal token in the file: a restart-only field,
    // listed by name, never by value.
    let running = std::fs::read_to_string(p.path("switchyard.toml")).unwrap();
    let reloaded = running.replace("token_file = \"consul.token\"", &format!("token = \"{RELOAD_TOKEN}\""));
    assert_ne!(reloaded, running);
    std::fs::write(p.path("switchyard.toml"), &reloaded).unwrap();
    let admin_env = [("SWITCHYARD_ADMIN_TOKEN_FILE", p.path("admin.token").display().to_string())];
    let admin_env: Vec<(&str, &str)> = admin_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = cli(&p, &["reload", "--admin", &p.admin.to_string()], &admin_env);
    assert!(out.contains("consul.token"), "the changed field is named: {out}");
    assert_clean("switchyard reload", &out);
    // An invalid reload whose broken field sits next to the token.
    let broken = std::fs::read_to_string(p.path("switchyard.toml")).unwrap().replace("wait = \"1s\"", "wait = \"soon\"");
    std::fs::write(p.path("switchyard.toml"), &broken).unwrap();
    let out = cli(&p, &["reload", "--admin", &p.admin.to_string()], &admin_env);
    assert!(out.contains("consul.wait"), "{out}");
    assert_clean("switchyard reload (refused)", &out);
    assert_clean("switchyard check", &cli(&p, &["check"], &[]));

    // The KV commands with the file's (now refused) token, then with a
    // config without a token, where the environment's applies (refused too).
    std::fs::write(p.path("switchyard.toml"), &reloaded).unwrap();
    let out = cli(&p, &["kv", "set", "clusters/web/retries", "2"], &[("CONSUL_HTTP_TOKEN", CLI_TOKEN)]);
    assert!(!out.contains("exit Some(0)"), "refused: {out}");
    assert_clean("switchyard kv set (refused)", &out);
    assert!(consul.requests().iter().any(|r| r.header("x-consul-token") == Some(RELOAD_TOKEN)));
    std::fs::write(p.path("switchyard.toml"), reloaded.replace(&format!("token = \"{RELOAD_TOKEN}\""), "")).unwrap();
    let out = cli(&p, &["kv", "list"], &[("CONSUL_HTTP_TOKEN", CLI_TOKEN)]);
    assert!(!out.contains("exit Some(0)"), "refused: {out}");
    assert_clean("switchyard kv list (refused)", &out);
    assert!(consul.requests().iter().any(|r| r.header("x-consul-token") == Some(CLI_TOKEN)));

    // The admin API with a wrong bearer token, then the right one.
    let (code, text) = get(&p, "/status", Some("wrong-token-wrong-token"));
    assert_eq!(code, 401, "{text}");
    assert_clean("a 401 answer", &text);
    let (code, status) = get(&p, "/status", Some(ADMIN_TOKEN));
    assert_eq!(code, 200);
    assert!(status.contains("needs_restart") && status.contains("kv_errors"), "{status}");
    assert_clean("/status", &status);
    assert_clean("/metrics", &get(&p, "/metrics", None).1);

    // Traffic with credentials of its own is the client's business, not ours
    // to log: the access log has no header values beyond the id.
    assert_eq!(p.fetch("/").0, 200);
    let log = p.stderr();
    assert!(log.lines().count() > 50, "a trace-level log was written ({} lines)", log.lines().count());
    assert!(log.contains("TRACE") || log.contains("DEBUG"), "at trace level");
    assert_clean("the proxy's log (trace level)", &log);
    assert_clean("the access log", &std::fs::read_to_string(p.path("access.log")).unwrap_or_default());
    assert_clean("the state file", &std::fs::read_to_string(p.path("consul-state.json")).unwrap_or_default());
}
