//! The systemd units in `config/systemd/` (docs/ha.md, "Under systemd"):
//! systemd itself does not run here, so `systemd-analyze verify` checks the
//! files, every `switchyard` command line in them is parsed by this binary,
//! and the stop timeout covers the hand-off and drain of `config/pair.toml`
//! (the paths there are the ones the unit creates). What systemd hears over
//! `NOTIFY_SOCKET` is tested in `tests/ha.rs`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::bin;

const UNITS: [&str; 2] = ["switchyard.service", "switchyard-watch.service"];
const INSTALLED: &str = "/usr/local/bin/switchyard";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn unit(name: &str) -> String {
    let p = root().join("config/systemd").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `Key=value` lines of the `[Service]` section, in order.
fn service(text: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not Key=value: {line}"));
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn get<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

#[test]
fn every_switchyard_command_in_the_units_parses() {
    for name in UNITS {
        let s = service(&unit(name));
        let execs: Vec<&str> = ["ExecStartPre", "ExecStart", "ExecReload"].iter().flat_map(|k| get(&s, k)).collect();
        assert!(!execs.is_empty(), "{name}: no Exec lines");
        for line in execs {
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some(INSTALLED), "{name}: {line}");
            let args: Vec<&str> = words.collect();
            // `--help` comes last: clap parses (and refuses) every argument before it.
            let out = Command::new(bin()).args(&args).arg("--help").output().unwrap();
            assert!(out.status.success(), "{name}: `{line}` does not parse: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn the_proxy_unit_follows_an_upgrade_and_outwaits_the_hand_off() {
    let s = service(&unit("switchyard.service"));
    assert_eq!(get(&s, "Type"), ["notify"]);
    assert_eq!(get(&s, "NotifyAccess"), ["all"], "the process ExecReload= starts must be allowed to send MAINPID=");
    let reload = get(&s, "ExecReload");
    assert!(reload.last().is_some_and(|l| l.contains(" upgrade ")), "ExecReload= must end with `switchyard upgrade`: {reload:?}");
    assert!(reload.first().is_some_and(|l| l.contains(" check ")), "ExecReload= must check the config first: {reload:?}");
    assert!(get(&s, "KillMode").iter().all(|m| *m != "process"), "KillMode=process would leave the old process of an upgrade behind");

    let pair = switchyard::config::parse(&std::fs::read_to_string(root().join("config/pair.toml")).unwrap(), &root().join("config")).unwrap();
    let v = get(&s, "TimeoutStopSec")[0];
    let stop = v.parse::<u64>().map(Duration::from_secs).unwrap_or_else(|_| humantime::parse_duration(v).expect("TimeoutStopSec"));
    let needed = pair.ha.handoff_timeout + pair.ha.handoff_linger + pair.server.drain_timeout;
    assert!(stop > needed, "TimeoutStopSec {stop:?} must exceed hand-off + linger + drain of config/pair.toml ({needed:?})");
    // The runtime directory the unit creates (and keeps across restarts)
    // holds the pid file, the upgrade socket and the track file.
    let run_dir = format!("/run/{}", get(&s, "RuntimeDirectory")[0]);
    assert_eq!(get(&s, "RuntimeDirectoryPreserve"), ["yes"]);
    for (field, path) in [
        ("server.pid_file", pair.server.pid_file.clone()),
        ("server.upgrade_sock", pair.server.upgrade_sock.clone()),
        ("ha.track_file", pair.ha.track_file.as_ref().unwrap().display().to_string()),
    ] {
        assert!(path.starts_with(&format!("{run_dir}/")), "config/pair.toml {field} = {path:?} is outside {run_dir}");
    }
    let state_dir = format!("/var/lib/{}", get(&s, "StateDirectory")[0]);
    let state = pair.consul.as_ref().and_then(|c| c.state_file.as_ref()).expect("consul.state_file in config/pair.toml");
    assert!(state.starts_with(&state_dir), "consul.state_file {state:?} is outside {state_dir}");
}

#[test]
fn systemd_analyze_verifies_the_units() {
    let have = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have {
        assert!(std::env::var_os("SWITCHYARD_CI").is_none(), "systemd-analyze is missing; .ci/run installs systemd");
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = UNITS
        .iter()
        .map(|name| {
            let p = dir.path().join(name);
            std::fs::write(&p, unit(name).replace(INSTALLED, bin())).unwrap();
            p
        })
        .collect();
    let out = Command::new("systemd-analyze").arg("verify").args(&paths).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It reports unknown keys and bad values on stderr and still exits 0.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}
