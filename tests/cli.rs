//! The command line: `check` lists every error and exits 64; valid configs
//! print a summary; `run` refuses an invalid config without starting; every
//! config shipped in `config/` passes `check`.

mod support;

use std::process::Command;
use support::*;

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(bin()).args(["check", "--config"]).arg(path).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BROKEN: &str = r#"
[server]
threads = 0
drain_timeout = "soon"

[admin]
listen = "localhost:9901"

[access_log]
format = "xml"

[[listeners]]
address = "0.0.0.0:99999"

[[routes]]
hosts = ["api.example.com:443"]
path_prefix = "api"
cluster = "missing"

[[routes]]
name = "dup"
cluster = "web"
[[routes]]
name = "dup"
path_prefix = "/x"
cluster = "web"

[clusters.web]
static = ["10.0.0.1", "10.0.0.2:80"]
selection = "random"
retries = 99
connect_timeout = "-1s"
frobnicate = true

[clusters.both]
static = ["10.0.0.3:80"]
file = { catalog = "c.json" }

[clusters.hash]
file = { catalog = "c.json" }
selection = "consistent_hash"
hash_header = "bad header"

[unknown_section]
x = 1
"#;

#[test]
fn check_reports_every_error_with_its_field_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, BROKEN).unwrap();
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, 64, "stdout: {stdout}\nstderr: {stderr}");
    let expected = [
        "unknown_section: unknown section `unknown_section`",
        "server.threads: invalid value 0",
        "server.drain_timeout: invalid duration \"soon\"",
        "admin.listen: invalid socket address \"localhost:9901\"",
        "access_log.format: invalid value \"xml\"",
        "listeners[0].address: invalid socket address \"0.0.0.0:99999\"",
        "routes[0].hosts[0]: invalid host \"api.example.com:443\"",
        "routes[0].path_prefix: invalid value \"api\"",
        "routes[0].cluster: unknown cluster \"missing\"",
        "routes[2].name: duplicate route name \"dup\"",
        "clusters.web.frobnicate: unknown field `frobnicate`",
        "clusters.both: set exactly one discovery source",
        "clusters.hash.hash_header: invalid header name \"bad header\"",
    ];
    for e in expected {
        assert!(stderr.contains(e), "missing {e:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("unknown cluster \"web\""), "a cluster with errors is still defined:\n{stderr}");
    // `web` failed to deserialise as a whole (unknown field), so its other
    // problems surface once that is fixed:
    let fixed = BROKEN.replace("frobnicate = true\n", "");
    std::fs::write(&path, fixed).unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 64);
    for e in [
        "clusters.web.static[0]: invalid socket address \"10.0.0.1\"",
        "clusters.web.selection: invalid value \"random\"",
        "clusters.web.retries: invalid value 99",
        "clusters.web.connect_timeout: invalid duration \"-1s\"",
    ] {
        assert!(stderr.contains(e), "missing {e:?} in:\n{stderr}");
    }
    let count_line = stderr.lines().next().unwrap();
    assert!(count_line.contains("error(s)"), "{count_line}");
}

#[test]
fn run_refuses_an_invalid_config_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    let port = free_port();
    std::fs::write(
        &path,
        format!("[[listeners]]\naddress = \"127.0.0.1:{port}\"\n[[routes]]\ncluster = \"nope\"\n"),
    )
    .unwrap();
    let out = Command::new(bin()).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("routes[0].cluster: unknown cluster \"nope\""), "{stderr}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn check_of_a_missing_file_names_it() {
    let (code, _, stderr) = check(std::path::Path::new("/nonexistent/switchyard.toml"));
    assert_eq!(code, 64);
    assert!(stderr.contains("cannot read config file /nonexistent/switchyard.toml"), "{stderr}");
}

#[test]
fn every_shipped_config_passes_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let (code, stdout, stderr) = check(&path);
        assert_eq!(code, 0, "{}:\n{stderr}", path.display());
        assert!(stdout.contains(": ok") && stdout.contains("routes:"), "{stdout}");
        checked += 1;
    }
    assert!(checked >= 1, "no config files found in {}", dir.display());
}

#[test]
fn version_and_help() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("switchyard {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["run", "check", "demo", "--log-format", "--log-level"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn demo_serves_both_sample_upstreams_and_follows_its_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(bin())
        .args(["demo", "--listen", &listen, "--admin", &admin, "--dir"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{listen}/");
    let ok = wait_until(std::time::Duration::from_secs(15), || {
        http.get(&url).send().map(|r| r.status() == 200).unwrap_or(false)
    });
    if !ok {
        let _ = child.kill();
        panic!("demo did not come up");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(http.get(&url).send().unwrap().text().unwrap());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.contains("hello from upstream-a\n"));
    // Remove upstream-b from the demo catalog, as the instructions say.
    let cat_path = dir.path().join("catalog.json");
    let cat = std::fs::read_to_string(&cat_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cat).unwrap();
    v["web"].as_array_mut().unwrap().truncate(1);
    std::fs::write(&cat_path, serde_json::to_string(&v).unwrap()).unwrap();
    let moved = wait_until(std::time::Duration::from_secs(2), || {
        (0..4).all(|_| http.get(&url).send().unwrap().text().unwrap() == "hello from upstream-a\n")
    });
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(moved);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains(&format!("curl -s http://{listen}/")), "{printed}");
    assert!(printed.contains("catalog.json"), "{printed}");
}
