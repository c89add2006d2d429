//! Operator commands on the KV settings: `switchyard kv get|set|delete|list`,
//! `drain` / `undrain`, `maintenance`. They talk to the Consul agent with
//! the config file's `[consul]` settings (address, token, TLS), exactly as
//! the watcher does.
//!
//! Every write is validated first: the prefix is read, the new value put in
//! place, and the whole set merged over the config file with the same merge
//! and validator the proxy runs. A value the proxy would reject is refused
//! here with its field named, and nothing is written. Writes use
//! check-and-set on the index read, so two operators cannot overwrite each
//! other silently.

use crate::discovery::consul::client::{ClientError, ConsulClient};
use crate::discovery::consul::kv;
use crate::kvconfig::FileDoc;
use crate::metrics::Metrics;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;
pub const EXIT_CONFIG: u8 = 64;

const TIMEOUT: Duration = Duration::from_secs(10);

/// What a command needs: the agent client, the prefix, and the file's
/// document to validate against.
struct Ctx {
    client: ConsulClient,
    prefix: String,
    file: FileDoc,
    rt: tokio::runtime::Runtime,
}

/// Every key under the prefix as read: value and `ModifyIndex` (for
/// check-and-set).
type Entries = BTreeMap<String, (Vec<u8>, u64)>;

fn values(all: &Entries) -> BTreeMap<String, Vec<u8>> {
    all.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect()
}

fn open(config: &Path) -> Result<Ctx, (u8, String)> {
    let (file, c) = FileDoc::load(config).map_err(|e| {
        let errors: Vec<String> = e.0.iter().map(|e| e.to_string()).collect();
        (EXIT_CONFIG, format!("{}:\n  {}", config.display(), errors.join("\n  ")))
    })?;
    let settings = c.consul.ok_or((EXIT_CONFIG, format!("{}: no [consul] section: these commands need the Consul agent", config.display())))?;
    let prefix = settings
        .kv_prefix
        .clone()
        .ok_or((EXIT_CONFIG, format!("{}: consul.kv is off: set `kv = true` in [consul] (the proxy would ignore these keys)", config.display())))?;
    let client = ConsulClient::new(&settings, Arc::new(Metrics::new())).map_err(|e| (EXIT_CONFIG, format!("consul: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (EXIT_FAILED, format!("cannot start a runtime: {e}")))?;
    Ok(Ctx { client, prefix, file, rt })
}

fn unreachable(e: ClientError) -> (u8, String) {
    let code = match e {
        ClientError::Connect(_) | ClientError::Timeout => EXIT_UNREACHABLE,
        _ => EXIT_FAILED,
    };
    (code, format!("consul: {e}"))
}

impl Ctx {
    fn path(&self, key: &str) -> String {
        format!("/v1/kv/{}{}", self.prefix, key)
    }

    /// Every key under the prefix (relative), with its index.
    fn read_all(&self) -> Result<Entries, (u8, String)> {
        let path = format!("/v1/kv/{}", self.prefix);
        let r = self.rt.block_on(self.client.request(reqwest::Method::GET, "kv", &path, &[("recurse", None)], None, TIMEOUT));
        match r {
            Ok(resp) => kv::parse_entries(&resp.body, &self.prefix).map_err(|e| (EXIT_FAILED, format!("consul: bad KV answer: {e}"))),
            Err(ClientError::Http { status: 404, .. }) => Ok(BTreeMap::new()),
            Err(e) => Err(unreachable(e)),
        }
    }

    /// The proxy's merge of these keys over the config file.
    fn merge(&self, kv: &BTreeMap<String, Vec<u8>>) -> Result<crate::kvconfig::Merged, String> {
        self.file.merge(kv).map_err(|errs| errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
    }

    /// The proxy's verdict on the prefix with `key` set to `value` (None:
    /// deleted): Err with the reason when it would reject that key.
    fn validate(&self, all: &Entries, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        let mut kv = values(all);
        let before = self.merge(&kv)?;
        match value {
            Some(v) => kv.insert(key.to_string(), v.to_vec()),
            None => kv.remove(key),
        };
        let after = self.merge(&kv)?;
        if let Some(e) = after.errors.iter().find(|e| e.key == key) {
            return Err(e.message.clone());
        }
        // A delete (or a change) must not break keys that applied before.
        let broken: Vec<String> = after
            .errors
            .iter()
            .filter(|e| !before.errors.iter().any(|b| b.key == e.key))
            .map(|e| format!("{}{}: {}", self.prefix, e.key, e.message))
            .collect();
        if !broken.is_empty() {
            return Err(format!("other keys would be rejected then:\n  {}", broken.join("\n  ")));
        }
        Ok(())
    }

    /// Validated, check-and-set write (`value` None: delete). `expect`: the
    /// index the caller saw (None: what was just read).
    fn write(&self, key: &str, value: Option<&[u8]>) -> Result<(), (u8, String)> {
        check_key(key)?;
        let all = self.read_all()?;
        if let Err(e) = self.validate(&all, key, value) {
            return Err((EXIT_FAILED, format!("refused, nothing written: {}{key}: {e}", self.prefix)));
        }
        let cas = all.get(key).map(|(_, index)| *index).unwrap_or(0);
        if value.is_none() && cas == 0 {
            return Ok(());
        }
        let cas_s = cas.to_string();
        let params = [("cas", Some(cas_s.as_str()))];
        let (method, body) = match value {
            Some(v) => (reqwest::Method::PUT, Some(v.to_vec())),
            None => (reqwest::Method::DELETE, None),
        };
        let r = self.rt.block_on(self.client.request(method, "kv", &self.path(key), &params, body, TIMEOUT)).map_err(unreachable)?;
        if r.body.as_ref().trim_ascii() != b"true" {
            return Err((
                EXIT_FAILED,
                format!("not written: {}{key} changed since it was read (check-and-set on index {cas} failed); read it again and retry", self.prefix),
            ));
        }
        Ok(())
    }
}

/// Keys the agent accepts and the proxy understands the shape of.
fn check_key(key: &str) -> Result<(), (u8, String)> {
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_./-,".contains(&b)) {
        return Err((
            EXIT_FAILED,
            format!("invalid key {key:?}: letters, digits and _ . / - , only, relative to the prefix (`:` in an address is written `_`)"),
        ));
    }
    Ok(())
}

fn report(r: Result<(), (u8, String)>, ok: impl FnOnce()) -> u8 {
    match r {
        Ok(()) => {
            ok();
            EXIT_OK
        }
        Err((code, msg)) => {
            eprintln!("switchyard: {msg}");
            code
        }
    }
}

pub fn list(config: &Path) -> u8 {
    let r = open(config).and_then(|c| {
        let all = c.read_all()?;
        let merged = c.merge(&values(&all)).map_err(|e| (EXIT_FAILED, e))?;
        for (k, (value, _)) in &all {
            let shown = String::from_utf8_lossy(value).replace('\n', "\\n");
            let verdict = merged.errors.iter().find(|x| &x.key == k).map(|x| format!("   # rejected: {}", x.message)).unwrap_or_default();
            println!("{}{k} = {shown}{verdict}", c.prefix);
        }
        if all.is_empty() {
            println!("(no keys under {})", c.prefix);
        }
        Ok(())
    });
    report(r, || {})
}

pub fn get(config: &Path, key: &str) -> u8 {
    let r = open(config).and_then(|c| {
        let all = c.read_all()?;
        match all.get(key) {
            Some((value, _)) => {
                println!("{}", String::from_utf8_lossy(value));
                Ok(())
            }
            None => Err((EXIT_FAILED, format!("{}{key}: no such key", c.prefix))),
        }
    });
    report(r, || {})
}

pub fn set(config: &Path, key: &str, value: &str) -> u8 {
    let r = open(config).and_then(|c| c.write(key, Some(value.as_bytes())).map(|()| c.prefix));
    match r {
        Ok(prefix) => {
            println!("set {prefix}{key}");
            EXIT_OK
        }
        Err((code, msg)) => {
            eprintln!("switchyard: {msg}");
            code
        }
    }
}

pub fn delete(config: &Path, key: &str) -> u8 {
    let r = open(config).and_then(|c| c.write(key, None).map(|()| c.prefix));
    match r {
        Ok(prefix) => {
            println!("deleted {prefix}{key}");
            EXIT_OK
        }
        Err((code, msg)) => {
            eprintln!("switchyard: {msg}");
            code
        }
    }
}

/// The key of an instance override: an `ip:port` is written `ip_port`.
pub fn instance_key(cluster: &str, instance: &str) -> String {
    let inst = match instance.parse::<std::net::SocketAddrV4>() {
        Ok(a) => format!("{}_{}", a.ip(), a.port()),
        Err(_) => instance.to_string(),
    };
    format!("instances/{cluster}/{inst}")
}

/// `drain` (on) / `undrain` (off). With `admins` and `wait`: return once
/// every admin API shows the instance drained with nothing in flight.
pub fn drain(config: &Path, cluster: &str, instance: &str, on: bool, wait: bool, admins: &[String], timeout: Duration) -> u8 {
    let key = instance_key(cluster, instance);
    let r = open(config).and_then(|c| c.write(&key, on.then_some(b"drain".as_slice())));
    if let Err((code, msg)) = r {
        eprintln!("switchyard: {msg}");
        return code;
    }
    println!("{} {instance} in cluster {cluster}", if on { "draining" } else { "undrained" });
    if !(on && wait) || admins.is_empty() {
        return EXIT_OK;
    }
    let deadline = Instant::now() + timeout;
    for admin in admins {
        let url = format!("{}/status", crate::ops::base_url(admin));
        loop {
            match crate::ops::get_json(&url, Duration::from_secs(2)) {
                Ok((200, v)) => match instance_state(&v, cluster, instance) {
                    Some((state, in_flight)) if state == "drained" && in_flight == 0 => {
                        println!("  {admin}: drained, nothing in flight");
                        break;
                    }
                    Some((state, in_flight)) if Instant::now() >= deadline => {
                        eprintln!("switchyard: {admin}: still {state} with {in_flight} in flight after {}", humantime::format_duration(timeout));
                        return EXIT_FAILED;
                    }
                    None if Instant::now() >= deadline => {
                        eprintln!("switchyard: {admin}: cluster {cluster} has no instance {instance}");
                        return EXIT_FAILED;
                    }
                    _ => {}
                },
                Ok((code, _)) if Instant::now() >= deadline => {
                    eprintln!("switchyard: {admin}: /status answered {code}");
                    return EXIT_UNREACHABLE;
                }
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("switchyard: {e}");
                    return EXIT_UNREACHABLE;
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    EXIT_OK
}

/// (state, in_flight) of an instance in `/status`, by `ip:port` (service
/// IDs are not shown there; give the address to `--wait`).
fn instance_state(status: &Value, cluster: &str, instance: &str) -> Option<(String, u64)> {
    let c = status.get("clusters")?.as_array()?.iter().find(|c| c.get("name").and_then(Value::as_str) == Some(cluster))?;
    let b = c.get("backends")?.as_array()?.iter().find(|b| b.get("address").and_then(Value::as_str) == Some(instance))?;
    Some((b.get("state")?.as_str()?.to_string(), b.get("in_flight")?.as_u64()?))
}

pub fn maintenance(config: &Path, route: &str, on: bool, body: Option<&str>, retry_after: Option<Duration>) -> u8 {
    let key = format!("maintenance/{route}");
    let mut value = String::new();
    if let Some(b) = body {
        value.push_str(&format!("body = {}\n", toml::Value::String(b.to_string())));
    }
    if let Some(r) = retry_after {
        value.push_str(&format!("retry_after = \"{}s\"\n", r.as_secs()));
    }
    let r = open(config).and_then(|c| {
        // A route that exists nowhere is a typo: say so instead of writing.
        let all = c.read_all()?;
        let merged = c.merge(&values(&all)).map_err(|e| (EXIT_FAILED, e))?;
        if on && !merged.config.routes.iter().any(|r| r.name == route) {
            let names: Vec<&str> = merged.config.routes.iter().map(|r| r.name.as_str()).collect();
            return Err((EXIT_FAILED, format!("refused, nothing written: no route {route:?} (routes: {})", names.join(", "))));
        }
        c.write(&key, on.then_some(value.as_bytes()))
    });
    report(r, || println!("maintenance {} for route {route}", if on { "on" } else { "off" }))
}
