//! Consul KV as the fleet's shared settings: the key layout, and the merge
//! of the config file's document with the keys under the prefix.
//!
//! Keys (relative to `consul.kv_prefix`, `switchyard/` by default):
//!
//! | Key | Value |
//! |---|---|
//! | `routes/<name>` | a whole route, as a `[[routes]]` entry (TOML or JSON) |
//! | `routes/<name>/<field>` | one field of a route: `hosts`, `path_prefix`, `cluster`, `maintenance` |
//! | `clusters/<name>` | a whole cluster, as a `[clusters.<name>]` table |
//! | `clusters/<name>/<field>` | one field of a cluster (see [`CLUSTER_FIELDS`]) |
//! | `instances/<cluster>/<instance>` | `{ weight = N }`, `{ drain = true }`, a bare number (weight) or `drain`; `<instance>` is a Consul service ID or `IP_PORT` (Consul keys cannot hold `:`) |
//! | `maintenance/<route>` | the route's maintenance table; an empty value turns it on with defaults |
//!
//! KV wins over the file; a deleted key reverts to the file's value. The
//! merged document is validated by the same validator as the file. A key
//! that does not parse, names something that does not exist, or makes the
//! document invalid is rejected alone: every other key still applies.

use crate::config::Config;
use crate::error::ConfigError;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Route fields a `routes/<name>/<field>` key may set.
pub const ROUTE_FIELDS: &[&str] = &["hosts", "path_prefix", "cluster", "maintenance"];
/// Cluster fields a `clusters/<name>/<field>` key may set. `panic_threshold`
/// and `allow_warning` go into the cluster's `consul` table.
pub const CLUSTER_FIELDS: &[&str] = &[
    "selection",
    "hash_header",
    "hash_cookie",
    "connect_timeout",
    "read_timeout",
    "write_timeout",
    "idle_timeout",
    "retries",
    "panic_threshold",
    "allow_warning",
];

/// A rejected key, as shown in `/status` `kv_errors`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvError {
    pub key: String,
    /// The start of the value (at most 80 characters).
    pub value: String,
    pub message: String,
}

/// A config file's document (valid on its own), which KV settings are
/// merged over, and the directory its relative paths are resolved against.
pub struct FileDoc {
    pub doc: toml::Table,
    pub base: std::path::PathBuf,
}

impl FileDoc {
    /// Read and validate the file: its document and its own config.
    pub fn load(path: &Path) -> Result<(FileDoc, Config), crate::error::ConfigErrors> {
        let (doc, config) = crate::config::validate::load_document(path)?;
        let base = crate::config::validate::base_dir(path).to_path_buf();
        Ok((FileDoc { doc, base }, config))
    }

    /// [`merge`] with the process environment.
    pub fn merge(&self, kv: &BTreeMap<String, Vec<u8>>) -> Result<Merged, Vec<ConfigError>> {
        merge(&self.doc, kv, &self.base, &crate::config::validate::process_env)
    }
}

/// The file's config merged with the keys that apply.
pub struct Merged {
    pub config: Config,
    pub errors: Vec<KvError>,
    /// Keys that apply.
    pub applied: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Route(String),
    Cluster(String),
}

#[derive(Debug, Clone)]
enum Op {
    Route(String, toml::Table),
    RouteField(String, String, toml::Value),
    Cluster(String, toml::Table),
    ClusterField(String, String, toml::Value),
    Instance(String, String, toml::Table),
}

impl Op {
    fn target(&self) -> Target {
        match self {
            Op::Route(n, _) | Op::RouteField(n, _, _) => Target::Route(n.clone()),
            Op::Cluster(n, _) | Op::ClusterField(n, _, _) | Op::Instance(n, _, _) => Target::Cluster(n.clone()),
        }
    }

    /// The field of its target that this op sets (None: the whole of it), as
    /// it appears in a validation error's path.
    fn field(&self) -> Option<&str> {
        match self {
            Op::Route(..) | Op::Cluster(..) => None,
            Op::RouteField(_, f, _) => Some(f),
            Op::ClusterField(_, f, _) if f == "panic_threshold" || f == "allow_warning" => Some("consul"),
            Op::ClusterField(_, f, _) => Some(f),
            Op::Instance(..) => Some("instances"),
        }
    }

    /// Whole definitions first, so field keys apply on top of them.
    fn phase(&self) -> u8 {
        match self {
            Op::Route(..) | Op::Cluster(..) => 0,
            _ => 1,
        }
    }
}

fn excerpt(value: &[u8]) -> String {
    let s = String::from_utf8_lossy(value);
    let mut out: String = s.chars().take(80).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

fn text(value: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(value).map(str::trim).map_err(|_| "the value is not UTF-8".to_string())
}

/// A table: a TOML document or a JSON object; empty is an empty table.
fn table(value: &[u8]) -> Result<toml::Table, String> {
    let t = text(value)?;
    if t.is_empty() {
        return Ok(toml::Table::new());
    }
    if t.starts_with('{') {
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(t) {
            return match toml::Value::try_from(json) {
                Ok(toml::Value::Table(tbl)) => Ok(tbl),
                Ok(_) => Err("expected a JSON object".into()),
                Err(e) => Err(format!("JSON that TOML cannot hold (null?): {e}")),
            };
        }
    }
    toml::from_str::<toml::Table>(t).map_err(|e| format!("neither TOML nor a JSON object: {}", e.to_string().trim_end()))
}

/// One value: a TOML literal (`3`, `0.3`, `true`, `"2s"`, `["a"]`, `{...}`),
/// or else the text itself as a string (`2s`, `least_connections`).
fn scalar(value: &[u8]) -> Result<toml::Value, String> {
    let t = text(value)?;
    if t.is_empty() {
        return Err("empty value".into());
    }
    if let Ok(mut doc) = toml::from_str::<toml::Table>(&format!("v = {t}")) {
        if let Some(v) = doc.remove("v") {
            return Ok(v);
        }
    }
    if t.starts_with('{') || t.starts_with('[') {
        if let Ok(json) = serde_json::from_str::<serde_json::Value>(t) {
            return toml::Value::try_from(json).map_err(|e| format!("JSON that TOML cannot hold (null?): {e}"));
        }
    }
    Ok(toml::Value::String(t.to_string()))
}

fn segment(s: &str) -> Result<String, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b)) {
        return Err(format!("invalid name {s:?} in the key"));
    }
    Ok(s.to_string())
}

/// Consul refuses `:` in keys, so an instance's address is written with `_`
/// before the port (`10.0.1.12_8000`); anything else is a service ID.
fn instance_name(seg: &str) -> String {
    if let Some((ip, port)) = seg.rsplit_once('_') {
        if ip.parse::<std::net::Ipv4Addr>().is_ok() && port.parse::<u16>().is_ok() {
            return format!("{ip}:{port}");
        }
    }
    seg.to_string()
}

fn parse_key(key: &str, value: &[u8]) -> Result<Op, String> {
    let parts: Vec<&str> = key.split('/').collect();
    let unknown = || {
        format!(
            "unknown key: expected routes/<name>[/<field>], clusters/<name>[/<field>], instances/<cluster>/<instance> or maintenance/<route>"
        )
    };
    match parts.as_slice() {
        ["routes", name] => {
            let name = segment(name)?;
            let mut t = table(value)?;
            if t.is_empty() {
                return Err("empty route: give at least `cluster`".into());
            }
            match t.get("name") {
                Some(toml::Value::String(n)) if *n != name => return Err(format!("name {n:?} differs from the key's {name:?}")),
                _ => {}
            }
            t.insert("name".into(), toml::Value::String(name.clone()));
            Ok(Op::Route(name, t))
        }
        ["routes", name, field] => {
            if !ROUTE_FIELDS.contains(field) {
                return Err(format!("unknown route field {field:?}, expected one of: {}", ROUTE_FIELDS.join(", ")));
            }
            let v = if *field == "maintenance" { toml::Value::Table(table(value)?) } else { scalar(value)? };
            Ok(Op::RouteField(segment(name)?, field.to_string(), v))
        }
        ["maintenance", route] => Ok(Op::RouteField(segment(route)?, "maintenance".into(), toml::Value::Table(table(value)?))),
        ["clusters", name] => {
            let t = table(value)?;
            if t.is_empty() {
                return Err("empty cluster: give a discovery source".into());
            }
            Ok(Op::Cluster(segment(name)?, t))
        }
        ["clusters", name, field] => {
            if !CLUSTER_FIELDS.contains(field) {
                return Err(format!("unknown cluster field {field:?}, expected one of: {}", CLUSTER_FIELDS.join(", ")));
            }
            Ok(Op::ClusterField(segment(name)?, field.to_string(), scalar(value)?))
        }
        ["instances", cluster, instance] => {
            let t = match scalar(value)? {
                toml::Value::Integer(w) => toml::Table::from_iter([("weight".to_string(), toml::Value::Integer(w))]),
                toml::Value::String(s) if s == "drain" => toml::Table::from_iter([("drain".to_string(), toml::Value::Boolean(true))]),
                toml::Value::Table(t) => t,
                _ => return Err("expected { weight = N }, { drain = true }, a number or `drain`".into()),
            };
            Ok(Op::Instance(segment(cluster)?, instance_name(&segment(instance)?), t))
        }
        _ => Err(unknown()),
    }
}

/// The document with the given ops applied; ops that cannot apply
/// (naming a route or cluster that does not exist) come back as errors.
/// Also the name of each route, by its index in the merged `routes`.
fn build(file: &toml::Table, ops: &[(&String, &Op)]) -> (toml::Table, Vec<(String, String)>, Vec<String>) {
    let mut doc = file.clone();
    let mut failed = Vec::new();
    let mut routes: Vec<toml::Value> = match doc.remove("routes") {
        Some(toml::Value::Array(a)) => a,
        _ => Vec::new(),
    };
    let route_name = |i: usize, r: &toml::Value| r.get("name").and_then(toml::Value::as_str).map(str::to_string).unwrap_or_else(|| format!("route{i}"));
    let mut clusters: toml::Table = match doc.remove("clusters") {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    for (key, op) in ops {
        let find = |routes: &Vec<toml::Value>, name: &str| routes.iter().enumerate().position(|(i, r)| route_name(i, r) == name);
        match op {
            Op::Route(name, t) => match find(&routes, name) {
                Some(i) => routes[i] = toml::Value::Table(t.clone()),
                None => routes.push(toml::Value::Table(t.clone())),
            },
            Op::RouteField(name, field, v) => match find(&routes, name).and_then(|i| routes[i].as_table_mut()) {
                Some(r) => {
                    r.insert(field.clone(), v.clone());
                }
                None => failed.push((key.to_string(), format!("no route {name:?} in the file or in KV"))),
            },
            Op::Cluster(name, t) => {
                clusters.insert(name.clone(), toml::Value::Table(t.clone()));
            }
            Op::ClusterField(name, field, v) => match clusters.get_mut(name).and_then(toml::Value::as_table_mut) {
                Some(c) if matches!(field.as_str(), "panic_threshold" | "allow_warning") => match c.get_mut("consul").and_then(toml::Value::as_table_mut) {
                    Some(q) => {
                        q.insert(field.clone(), v.clone());
                    }
                    None => failed.push((key.to_string(), format!("{field} applies to Consul clusters only; {name:?} is not one"))),
                },
                Some(c) => {
                    c.insert(field.clone(), v.clone());
                }
                None => failed.push((key.to_string(), format!("no cluster {name:?} in the file or in KV"))),
            },
            Op::Instance(cluster, instance, t) => match clusters.get_mut(cluster).and_then(toml::Value::as_table_mut) {
                Some(c) => {
                    let inst = c.entry("instances").or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    match inst.as_table_mut() {
                        Some(i) => {
                            i.insert(instance.clone(), toml::Value::Table(t.clone()));
                        }
                        None => failed.push((key.to_string(), format!("clusters.{cluster}.instances is not a table"))),
                    }
                }
                None => failed.push((key.to_string(), format!("no cluster {cluster:?} in the file or in KV"))),
            },
        }
    }
    let names = routes.iter().enumerate().map(|(i, r)| route_name(i, r)).collect();
    doc.insert("routes".into(), toml::Value::Array(routes));
    doc.insert("clusters".into(), toml::Value::Table(clusters));
    (doc, failed, names)
}

/// Which target (and which of its fields) a validation error's path points at.
fn blame(path: &str, route_names: &[String]) -> Option<(Target, Option<String>)> {
    let field = |rest: &str| rest.split(['.', '[']).find(|s| !s.is_empty()).map(str::to_string);
    if let Some(rest) = path.strip_prefix("routes[") {
        let (i, rest) = rest.split_once(']')?;
        let i: usize = i.parse().ok()?;
        return route_names.get(i).cloned().map(|n| (Target::Route(n), field(rest)));
    }
    let rest = path.strip_prefix("clusters.")?;
    let (name, rest) = rest.split_once('.').unwrap_or((rest, ""));
    Some((Target::Cluster(name.to_string()), field(rest)))
}

/// The live ops to blame for an error at `target`/`field`: those that set
/// that field; else the whole definition; else everything on the target.
fn culprits(ops: &[(&String, Op)], live: &[bool], target: &Target, field: Option<&str>) -> Vec<usize> {
    let on: Vec<usize> = (0..ops.len()).filter(|&i| live[i] && ops[i].1.target() == *target).collect();
    let exact: Vec<usize> = on.iter().copied().filter(|&i| field.is_some() && ops[i].1.field() == field).collect();
    if !exact.is_empty() {
        return exact;
    }
    let whole: Vec<usize> = on.iter().copied().filter(|&i| ops[i].1.field().is_none()).collect();
    if !whole.is_empty() {
        return whole;
    }
    on
}

/// Merge the file's document (valid on its own) with the KV keys. Never
/// fails: a key that does not apply is in `errors`, and with none that
/// apply the result is the file's config.
pub fn merge(
    file: &toml::Table,
    kv: &BTreeMap<String, Vec<u8>>,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Merged, Vec<ConfigError>> {
    let mut errors: Vec<KvError> = Vec::new();
    let reject = |errors: &mut Vec<KvError>, key: &str, message: String| {
        errors.push(KvError { key: key.to_string(), value: excerpt(&kv[key]), message });
    };
    let mut ops: Vec<(&String, Op)> = Vec::new();
    for (key, value) in kv {
        match parse_key(key, value) {
            Ok(op) => ops.push((key, op)),
            Err(e) => reject(&mut errors, key, e),
        }
    }
    ops.sort_by_key(|(k, op)| (op.phase(), (*k).clone()));
    let mut live: Vec<bool> = vec![true; ops.len()];
    // Each round either succeeds or rejects at least one key.
    for _ in 0..=ops.len() {
        let active: Vec<(&String, &Op)> = ops.iter().zip(&live).filter(|(_, on)| **on).map(|((k, op), _)| (*k, op)).collect();
        let (doc, failed, route_names) = build(file, &active);
        if !failed.is_empty() {
            for (key, msg) in failed {
                if let Some(i) = ops.iter().position(|(k, _)| **k == key) {
                    live[i] = false;
                }
                reject(&mut errors, &key, msg);
            }
            continue;
        }
        let errs = match crate::config::validate::validate_table(&doc, base, env) {
            Ok(config) => {
                let applied = live.iter().filter(|on| **on).count();
                errors.sort_by(|a, b| a.key.cmp(&b.key));
                return Ok(Merged { config, errors, applied });
            }
            Err(e) => e.0,
        };
        // Reject the keys that touch what each error points at.
        let mut blamed: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for e in &errs {
            let hits = match blame(&e.path, &route_names) {
                Some((target, field)) => culprits(&ops, &live, &target, field.as_deref()),
                None => Vec::new(),
            };
            for i in hits {
                blamed.entry(i).or_default().push(e.to_string());
            }
        }
        if blamed.is_empty() {
            return incremental(file, kv, ops, live, errors, base, env);
        }
        // Errors no key is blamed for are looked at again next round (and,
        // if they stay, go the slow way).
        for (i, msgs) in blamed {
            live[i] = false;
            reject(&mut errors, ops[i].0, msgs.join("; "));
        }
    }
    incremental(file, kv, ops, live, errors, base, env)
}

/// The slow path, for errors no key can be blamed for by its path: add the
/// keys one at a time, keeping each that leaves the document valid.
fn incremental(
    file: &toml::Table,
    kv: &BTreeMap<String, Vec<u8>>,
    ops: Vec<(&String, Op)>,
    live: Vec<bool>,
    mut errors: Vec<KvError>,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Merged, Vec<ConfigError>> {
    let mut kept: Vec<(&String, &Op)> = Vec::new();
    for ((key, op), on) in ops.iter().zip(&live) {
        if !on {
            continue;
        }
        let mut trial = kept.clone();
        trial.push((key, op));
        let (doc, failed, _) = build(file, &trial);
        let verdict = match failed.into_iter().next() {
            Some((_, msg)) => Err(msg),
            None => crate::config::validate::validate_table(&doc, base, env)
                .map(|_| ())
                .map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")),
        };
        match verdict {
            Ok(()) => kept.push((key, op)),
            Err(msg) => errors.push(KvError { key: key.to_string(), value: excerpt(&kv[key.as_str()]), message: msg }),
        }
    }
    let (doc, _, _) = build(file, &kept);
    let config = crate::config::validate::validate_table(&doc, base, env).map_err(|e| e.0)?;
    errors.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Merged { config, errors, applied: kept.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiscoverySpec;

    const FILE: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"
[consul]
addresses = ["127.0.0.1:8500"]
kv = true
[[routes]]
name = "site"
cluster = "web"
[clusters.web]
static = ["127.0.0.1:9000", "127.0.0.1:9001"]
[clusters.api]
consul = { service = "api" }
"#;

    fn run(keys: &[(&str, &str)]) -> Merged {
        let file = crate::config::validate::parse_toml(FILE).unwrap();
        let kv: BTreeMap<String, Vec<u8>> = keys.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        merge(&file, &kv, Path::new("."), &|_| None).unwrap()
    }

    fn rejected(m: &Merged) -> Vec<&str> {
        m.errors.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn every_key_kind_applies() {
        let m = run(&[
            ("routes/shop", "path_prefix = \"/shop/\"\ncluster = \"shop\""),
            ("clusters/shop", r#"{"static": ["127.0.0.1:9100"], "retries": 1}"#),
            ("clusters/web/connect_timeout", "750ms"),
            ("clusters/web/retries", "4"),
            ("clusters/web/selection", "least_connections"),
            ("clusters/api/panic_threshold", "0.25"),
            ("routes/site/hosts", "[\"www.example.com\"]"),
            ("maintenance/shop", "body = \"later\"\nretry_after = \"5s\""),
            ("instances/web/127.0.0.1_9000", "drain"),
            ("instances/web/127.0.0.1_9001", "7"),
            ("instances/api/api-1", "{\"weight\": 2}"),
        ]);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.applied, 11);
        let c = &m.config;
        let shop = c.routes.iter().find(|r| r.name == "shop").unwrap();
        assert_eq!(shop.path_prefix, "/shop/");
        assert_eq!(shop.maintenance.as_ref().unwrap().retry_after_secs, 5);
        assert_eq!(c.clusters["shop"].retries, 1);
        let web = &c.clusters["web"];
        assert_eq!((web.connect_timeout.as_millis(), web.retries, web.selection.name()), (750, 4, "least_connections"));
        assert!(web.instances["127.0.0.1:9000"].drain);
        assert_eq!(web.instances["127.0.0.1:9001"].weight, Some(7));
        assert!(matches!(&c.clusters["api"].discovery, DiscoverySpec::Consul(q) if q.panic_permille == 250));
        assert_eq!(c.routes[0].hosts.len(), 1);
    }

    #[test]
    fn an_invalid_key_is_rejected_alone_with_its_reason() {
        let m = run(&[
            ("clusters/web/connect_timeout", "soon"),
            ("clusters/web/retries", "3"),
            ("clusters/web/colour", "blue"),
            ("clusters/nope/retries", "1"),
            ("routes/shop", "cluster = \"missing\""),
            ("routes/ok", "path_prefix = \"/ok/\"\ncluster = \"web\""),
            ("instances/web/127.0.0.1_9000", "{ weight = 99999 }"),
            ("clusters/web/panic_threshold", "0.2"),
            ("bogus", "1"),
            ("routes/bad", "not toml ["),
        ]);
        assert_eq!(
            rejected(&m),
            [
                "bogus",
                "clusters/nope/retries",
                "clusters/web/colour",
                "clusters/web/connect_timeout",
                "clusters/web/panic_threshold",
                "instances/web/127.0.0.1_9000",
                "routes/bad",
                "routes/shop",
            ]
        );
        let msg = |k: &str| m.errors.iter().find(|e| e.key == k).unwrap().message.clone();
        assert!(msg("clusters/web/connect_timeout").contains("clusters.web.connect_timeout"), "{}", msg("clusters/web/connect_timeout"));
        assert!(msg("routes/shop").contains("unknown cluster \"missing\""), "{}", msg("routes/shop"));
        assert!(msg("clusters/nope/retries").contains("no cluster \"nope\""));
        assert!(msg("clusters/web/colour").contains("unknown cluster field"));
        assert!(msg("instances/web/127.0.0.1_9000").contains("99999"));
        assert_eq!(m.errors.iter().find(|e| e.key == "clusters/web/connect_timeout").unwrap().value, "soon");
        // The others apply.
        assert_eq!(m.config.clusters["web"].retries, 3);
        assert!(m.config.routes.iter().any(|r| r.name == "ok"));
        assert_eq!(m.config.clusters["web"].connect_timeout.as_secs(), 2, "the file's value stays");
    }

    #[test]
    fn each_key_kind_has_its_invalid_values_named() {
        let cases: &[(&str, &str, &str)] = &[
            ("routes/shop", "", "empty route"),
            ("routes/shop", "name = \"other\"\ncluster = \"web\"", "differs from the key"),
            ("routes/site/path_prefix", "nope", "routes[0].path_prefix"),
            ("routes/site/colour", "red", "unknown route field"),
            ("routes/ghost/hosts", "[\"a.example\"]", "no route \"ghost\""),
            ("clusters/shop", "", "empty cluster"),
            ("clusters/shop", "retries = \"many\"", "clusters.shop"),
            ("clusters/web/retries", "99", "clusters.web.retries"),
            ("clusters/web/panic_threshold", "0.3", "Consul clusters only"),
            ("clusters/api/panic_threshold", "2", "clusters.api.consul.panic_threshold"),
            ("instances/web/127.0.0.1_9000", "maybe", "expected { weight = N }"),
            ("instances/ghost/x", "drain", "no cluster \"ghost\""),
            ("maintenance/site", "retry_after = \"1.5s\"", "routes[0].maintenance.retry_after"),
            ("maintenance/site", "allow = [\"not-a-net\"]", "routes[0].maintenance.allow[0]"),
            ("maintenance/ghost", "", "no route \"ghost\""),
            ("routes/site/cluster", "nope", "unknown cluster \"nope\""),
        ];
        for (key, value, want) in cases {
            let m = run(&[(key, value), ("clusters/web/idle_timeout", "5s")]);
            let e = m.errors.iter().find(|e| e.key == *key).unwrap_or_else(|| panic!("{key} = {value:?} was accepted"));
            assert!(e.message.contains(want), "{key} = {value:?}: {}", e.message);
            assert_eq!(m.config.clusters["web"].idle_timeout.as_secs(), 5, "{key}: the other key still applies");
        }
        let file = crate::config::validate::parse_toml(FILE).unwrap();
        let kv = BTreeMap::from([("clusters/web/retries".to_string(), vec![0xff, 0xfe])]);
        let m = merge(&file, &kv, Path::new("."), &|_| None).unwrap();
        assert_eq!(m.errors[0].message, "the value is not UTF-8");
    }

    #[test]
    fn a_fleet_can_be_configured_from_kv_alone() {
        let file = crate::config::validate::parse_toml(
            "[[listeners]]\naddress = \"127.0.0.1:8080\"\n[consul]\naddresses = [\"127.0.0.1:8500\"]\nkv = true\n",
        )
        .unwrap();
        let kv: BTreeMap<String, Vec<u8>> = [
            ("routes/site", "cluster = \"web\""),
            ("clusters/web", "consul = { service = \"web\" }"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let m = merge(&file, &kv, Path::new("."), &|_| None).unwrap();
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.config.routes.len(), 1);
        assert!(matches!(m.config.clusters["web"].discovery, DiscoverySpec::Consul(_)));
    }
}
