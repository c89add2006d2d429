//! The compose stack cannot run here (no Docker engine), so this checks that
//! its parts agree: `docker/docker-compose.yml`, the keepalived template and
//! its renderer, the node entrypoint, `config/pair.toml` and the Django app
//! (addresses, VIPs, priorities, router ids, the Consul address, the service
//! name, the health path, state and track file paths).

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn compose() -> Value {
    let y: serde_yaml_ng::Value = serde_yaml_ng::from_str(&read("docker/docker-compose.yml")).expect("compose file is YAML");
    // Resolve `<<: *anchor` merges the way compose does.
    let mut y = y;
    y.apply_merge().expect("merge keys");
    serde_json::to_value(y).unwrap()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

/// Every disagreement, each naming the file and the field.
fn check(c: &Value, pair: &switchyard::config::Config, entrypoint: &str, urls: &str, register: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let svc = |name: &str| c["services"][name].clone();
    let addr = |name: &str| s(&svc(name), &["networks", "edge", "ipv4_address"]).unwrap_or("").to_string();
    let env = |name: &str, key: &str| s(&svc(name), &["environment", key]).unwrap_or("").to_string();
    let subnet = c["networks"]["edge"]["ipam"]["config"][0]["subnet"].as_str().unwrap_or("").to_string();
    let prefix = subnet.rsplit_once('.').map(|(p, _)| format!("{p}.")).unwrap_or_default();
    let services: Vec<String> = c["services"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let own: Vec<String> = services.iter().map(|n| addr(n)).collect();
    for n in &services {
        if !addr(n).starts_with(&prefix) {
            errs.push(format!("compose: services.{n}.networks.edge.ipv4_address {:?} is outside {subnet}", addr(n)));
        }
    }
    let consul_url = format!("http://{}:8500", addr("consul"));
    for (me, peer) in [("lb1", "lb2"), ("lb2", "lb1")] {
        for (key, want) in [("NODE", me.to_string()), ("SELF", addr(me)), ("PEER", addr(peer)), ("CONSUL_HTTP_ADDR", consul_url.clone())] {
            if env(me, key) != want {
                errs.push(format!("compose: services.{me}.environment.{key} is {:?}, expected {want:?}", env(me, key)));
            }
        }
        if s(&svc(me), &["hostname"]) != Some(me) {
            errs.push(format!("compose: services.{me}.hostname must be {me:?} (the Consul registration id is per hostname)"));
        }
        for key in ["VIP_A", "VIP_B", "VRID_A", "VRID_B", "IFACE"] {
            if env(me, key) != env(peer, key) {
                errs.push(format!("compose: services.{me}.environment.{key} {:?} differs from {peer}'s {:?}", env(me, key), env(peer, key)));
            }
        }
        let mounts: Vec<String> = svc(me)["volumes"].as_array().map(|v| v.iter().filter_map(|m| m.as_str().map(str::to_string)).collect()).unwrap_or_default();
        let state_dir = pair.consul.as_ref().and_then(|c| c.state_file.as_ref()).and_then(|p| p.parent()).map(|p| p.display().to_string()).unwrap_or_default();
        if !mounts.iter().any(|m| m.ends_with(&format!(":{state_dir}"))) {
            errs.push(format!("compose: services.{me}.volumes does not keep {state_dir} (consul.state_file in config/pair.toml) across restarts"));
        }
    }
    if env("lb1", "VRID_A") == env("lb1", "VRID_B") {
        errs.push("compose: VRID_A and VRID_B must differ".into());
    }
    let prio = |me: &str, k: &str| env(me, k).parse::<u32>().unwrap_or(0);
    if !(prio("lb1", "PRIO_A") > prio("lb2", "PRIO_A") && prio("lb2", "PRIO_B") > prio("lb1", "PRIO_B")) {
        errs.push("compose: lb1 must have the higher PRIO_A and lb2 the higher PRIO_B".into());
    }
    let mut vips = Vec::new();
    for key in ["VIP_A", "VIP_B"] {
        let v = env("lb1", key);
        let (bare, len) = v.split_once('/').unwrap_or((v.as_str(), ""));
        if !bare.starts_with(&prefix) || Some(len) != subnet.split('/').nth(1) {
            errs.push(format!("compose: {key} {v:?} must be an address in {subnet} with its prefix length"));
        }
        if own.iter().any(|a| a == bare) {
            errs.push(format!("compose: {key} {bare} is a service's own address"));
        }
        vips.push(bare.to_string());
    }
    let cfg_vips: Vec<String> = pair.ha.vips.iter().map(|v| v.to_string()).collect();
    if cfg_vips != vips {
        errs.push(format!("config/pair.toml: ha.vips {cfg_vips:?} differ from the compose VIPs {vips:?}"));
    }
    let track = pair.ha.track_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    if !entrypoint.contains(&format!("TRACK_FILE={track} ")) {
        errs.push(format!("docker/pair/entrypoint.sh: keepalived's TRACK_FILE is not ha.track_file {track:?}"));
    }
    for dir in [Path::new(&track).parent(), Path::new(&pair.server.pid_file).parent()].into_iter().flatten() {
        if !entrypoint.contains(&format!("mkdir -p {}", dir.display())) && !entrypoint.contains(&format!(" {}", dir.display())) {
            errs.push(format!("docker/pair/entrypoint.sh does not create {}", dir.display()));
        }
    }
    if pair.listeners.iter().all(|l| !l.address.ip().is_unspecified()) {
        errs.push("config/pair.toml: a node must listen on 0.0.0.0 (or [::]) to serve whichever VIP it holds".into());
    }
    let service = pair.clusters.values().find_map(|c| match &c.discovery {
        switchyard::config::DiscoverySpec::Consul(q) => Some(q.service.clone()),
        _ => None,
    });
    // The app servers: registered under the service the pair routes to, at
    // their own address, with the health path the app serves.
    let health_in_urls = urls.lines().find_map(|l| l.strip_prefix("HEALTH_PATH = ").map(|v| v.trim_matches('"').to_string()));
    let health_in_register = register.lines().find_map(|l| l.strip_prefix("HEALTH_PATH = ").map(|v| v.trim_matches('"').to_string()));
    if health_in_register.as_deref().map(|p| p.trim_start_matches('/')) != health_in_urls.as_deref() {
        errs.push(format!("docker/django: register.py checks {health_in_register:?}, shop/urls.py serves {health_in_urls:?}"));
    }
    let apps: Vec<&String> = services.iter().filter(|n| n.starts_with("app")).collect();
    if apps.len() < 2 {
        errs.push("compose: two app servers expected".into());
    }
    for a in apps {
        if Some(env(a, "SERVICE_NAME")) != service {
            errs.push(format!("compose: services.{a}.environment.SERVICE_NAME {:?} is not the pair's Consul service {service:?}", env(a, "SERVICE_NAME")));
        }
        if env(a, "SERVICE_ADDRESS") != addr(a) {
            errs.push(format!("compose: services.{a}.environment.SERVICE_ADDRESS {:?} is not its address {:?}", env(a, "SERVICE_ADDRESS"), addr(a)));
        }
        if env(a, "CONSUL_HTTP_ADDR") != consul_url {
            errs.push(format!("compose: services.{a}.environment.CONSUL_HTTP_ADDR is not {consul_url:?}"));
        }
    }
    errs
}

fn pair_config() -> switchyard::config::Config {
    switchyard::config::parse(&read("config/pair.toml"), &root().join("config")).unwrap_or_else(|e| panic!("config/pair.toml: {e:?}"))
}

#[test]
fn the_compose_stack_the_keepalived_template_and_the_pair_config_agree() {
    let c = compose();
    let errs = check(&c, &pair_config(), &read("docker/pair/entrypoint.sh"), &read("docker/django/shop/urls.py"), &read("docker/django/register.py"));
    assert!(errs.is_empty(), "{errs:#?}");
    // The entrypoint's keys cover every placeholder of the template: render it
    // with lb1's environment plus what the entrypoint adds.
    let envs = c["services"]["lb1"]["environment"].as_object().unwrap().clone();
    let mut args: Vec<String> = envs.iter().filter(|(k, _)| k.as_str() != "CONSUL_HTTP_ADDR").map(|(k, v)| format!("{k}={}", v.as_str().unwrap())).collect();
    args.extend(["TRACK_FILE=/run/switchyard/vrrp", "CONFIG=/etc/switchyard/pair.toml", "NOTIFY=/usr/local/lib/switchyard/notify.sh /tmp/x"].map(String::from));
    let out = Command::new("sh")
        .arg(root().join("docker/keepalived/render.sh"))
        .args(&args)
        .stdin(std::fs::File::open(root().join("docker/keepalived/keepalived.conf.in")).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = String::from_utf8(out.stdout).unwrap();
    assert!(conf.contains("unicast_src_ip 198.18.0.11") && conf.contains("198.18.0.100/24 dev eth0"), "{conf}");
    for name in ["NODE", "SELF", "PEER", "VIP_A", "PRIO_A", "VRID_A", "TRACK_FILE", "CONFIG", "NOTIFY", "IFACE"] {
        assert!(read("docker/pair/entrypoint.sh").contains(&format!("{name}=")), "entrypoint passes {name}");
    }
}

#[test]
fn a_disagreement_is_named() {
    let mut c = compose();
    c["services"]["lb2"]["environment"]["PEER"] = Value::from("198.18.0.13");
    c["services"]["app2"]["environment"]["SERVICE_NAME"] = Value::from("webb");
    c["services"]["lb1"]["environment"]["VIP_A"] = Value::from("198.18.0.21/24");
    let errs = check(&c, &pair_config(), &read("docker/pair/entrypoint.sh"), &read("docker/django/shop/urls.py"), &read("docker/django/register.py"));
    let all = errs.join("\n");
    assert!(all.contains("services.lb2.environment.PEER is \"198.18.0.13\", expected \"198.18.0.11\""), "{all}");
    assert!(all.contains("services.app2.environment.SERVICE_NAME \"webb\""), "{all}");
    assert!(all.contains("VIP_A 198.18.0.21 is a service's own address"), "{all}");
    // A renderer given too little refuses, naming the placeholder.
    let out = Command::new("sh")
        .arg(root().join("docker/keepalived/render.sh"))
        .arg("NODE=lb1")
        .stdin(std::fs::File::open(root().join("docker/keepalived/keepalived.conf.in")).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no value for @IFACE@"));
}
