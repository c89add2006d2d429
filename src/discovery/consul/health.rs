//! Lenient parsing of `/v1/health/service/<name>` answers.
//!
//! Consul (or anything between us and it) can send wrong types, missing
//! fields, duplicates, bad addresses or out-of-range ports. Each entry is
//! checked on its own: a bad instance is skipped with a reason and counted,
//! the rest of the set applies. Only a body that is not a JSON array fails as
//! a whole. Keys are matched case-insensitively; absent and `null` mean empty.
//!
//! An instance whose address is a host name is kept apart, as a
//! [`NamedConsulInstance`]: reconcile resolves the name through a DNS source
//! (as it does for host names in catalog files).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};

/// Aggregated health of an instance, Consul's ranking:
/// maintenance > critical > warning > passing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passing,
    Warning,
    Critical,
    Maintenance,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsulInstance {
    pub node: String,
    pub id: String,
    pub addr: SocketAddr,
    pub status: Status,
    pub weight_passing: u32,
    pub weight_warning: u32,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// An instance whose address is a host name: like a [`ConsulInstance`],
/// with the name and port in place of the socket address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedConsulInstance {
    pub node: String,
    pub id: String,
    pub host: String,
    pub port: u16,
    pub status: Status,
    pub weight_passing: u32,
    pub weight_warning: u32,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// One valid entry.
enum Entry {
    Ip(ConsulInstance),
    Named(NamedConsulInstance),
}

impl Entry {
    fn key(&self) -> (&str, &str) {
        match self {
            Entry::Ip(i) => (i.node.as_str(), i.id.as_str()),
            Entry::Named(n) => (n.node.as_str(), n.id.as_str()),
        }
    }
}

#[derive(Debug, Default)]
pub struct Parsed {
    /// Instances addressed by IP, sorted by (node, id).
    pub instances: Vec<ConsulInstance>,
    /// Instances addressed by host name, sorted by (node, id). A node and
    /// ID appear at most once across both lists.
    pub named: Vec<NamedConsulInstance>,
    /// (reason label, detail) per skipped entry.
    pub skipped: Vec<(&'static str, String)>,
}

fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key)
        .or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v))
        .filter(|v| !v.is_null())
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    get(obj, key).and_then(|v| v.as_str())
}

fn weight(v: Option<&Value>, default: u32) -> u32 {
    match v.and_then(|v| v.as_u64()) {
        Some(w) => w.min(65535) as u32,
        None => default,
    }
}

/// The aggregated status of an entry's checks (node checks included).
fn aggregate(checks: Option<&Value>) -> Status {
    let Some(Value::Array(checks)) = checks else { return Status::Passing };
    let mut worst = Status::Passing;
    for c in checks {
        let Some(c) = c.as_object() else { continue };
        let id = get_str(c, "CheckID").unwrap_or("");
        let s = if id == "_node_maintenance" || id.starts_with("_service_maintenance:") {
            Status::Maintenance
        } else {
            match get_str(c, "Status") {
                Some("passing") => Status::Passing,
                Some("warning") => Status::Warning,
                // critical, and anything unknown: not healthy.
                _ => Status::Critical,
            }
        };
        worst = worst.max(s);
    }
    worst
}

/// Parse one entry or say why it is skipped.
fn entry(v: &Value) -> Result<Entry, (&'static str, String)> {
    let obj = v.as_object().ok_or(("malformed", "entry is not an object".to_string()))?;
    let svc = get(obj, "Service")
        .and_then(|s| s.as_object())
        .ok_or(("malformed", "entry has no Service object".to_string()))?;
    let node = get(obj, "Node").and_then(|n| n.as_object());
    let node_name = node.and_then(|n| get_str(n, "Node")).unwrap_or("").to_string();
    let id = get_str(svc, "ID")
        .or_else(|| get_str(svc, "Service"))
        .filter(|s| !s.is_empty())
        .ok_or(("malformed", format!("instance on node {node_name:?} has no Service.ID")))?
        .to_string();
    let port = match get(svc, "Port").and_then(|p| p.as_u64()) {
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => return Err(("bad_port", format!("{node_name}/{id}: port {p} out of range"))),
        None => return Err(("bad_port", format!("{node_name}/{id}: missing or non-numeric Service.Port"))),
    };
    let address = get_str(svc, "Address")
        .filter(|a| !a.is_empty())
        .or_else(|| node.and_then(|n| get_str(n, "Address")))
        .unwrap_or("");
    let ip: Option<IpAddr> = match address.trim_start_matches('[').trim_end_matches(']').parse() {
        Ok(ip) => Some(ip),
        Err(_) if address.is_empty() => {
            return Err(("no_address", format!("{node_name}/{id}: neither Service.Address nor Node.Address")))
        }
        Err(_) if crate::discovery::is_host_name(address) => None,
        Err(_) => {
            return Err(("bad_address", format!("{node_name}/{id}: address {address:?} is neither an IP address nor a host name")))
        }
    };
    if let Some(ip) = ip.filter(|ip| ip.is_unspecified() || ip.is_multicast()) {
        return Err(("bad_address", format!("{node_name}/{id}: address {ip} is not a unicast host")));
    }
    let weights = get(svc, "Weights").and_then(|w| w.as_object());
    let tags = match get(svc, "Tags") {
        Some(Value::Array(t)) => t.iter().filter_map(|t| t.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    };
    let meta = match get(svc, "Meta") {
        Some(Value::Object(m)) => m
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
            .collect(),
        _ => BTreeMap::new(),
    };
    let status = aggregate(get(obj, "Checks"));
    let weight_passing = weight(weights.and_then(|w| get(w, "Passing")), 1);
    let weight_warning = weight(weights.and_then(|w| get(w, "Warning")), 1);
    Ok(match ip {
        Some(ip) => Entry::Ip(ConsulInstance {
            node: node_name,
            id,
            addr: SocketAddr::new(ip, port),
            status,
            weight_passing,
            weight_warning,
            tags,
            meta,
        }),
        None => Entry::Named(NamedConsulInstance {
            node: node_name,
            id,
            host: address.to_string(),
            port,
            status,
            weight_passing,
            weight_warning,
            tags,
            meta,
        }),
    })
}

/// Parse a health answer. Fails only when the body is not a JSON array.
pub fn parse_health(body: &[u8]) -> Result<Parsed, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let Value::Array(entries) = v else {
        return Err("body is not a JSON array".to_string());
    };
    let mut out = Parsed::default();
    let mut seen = HashSet::new();
    for e in &entries {
        match entry(e) {
            Ok(inst) => {
                let (node, id) = inst.key();
                if !seen.insert((node.to_string(), id.to_string())) {
                    out.skipped.push(("duplicate", format!("{node}/{id} listed twice")));
                    continue;
                }
                match inst {
                    Entry::Ip(i) => out.instances.push(i),
                    Entry::Named(n) => out.named.push(n),
                }
            }
            Err(skip) => out.skipped.push(skip),
        }
    }
    out.instances.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    out.named.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_entries() {
        let body = br#"[
          {"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"web-1","Service":"web","Address":"","Port":8080,"Tags":null,"Meta":null},
           "Checks":[{"CheckID":"serfHealth","Status":"passing"},{"CheckID":"service:web-1","Status":"warning"}]},
          {"node":{"node":"n2","address":"10.0.0.2"},"service":{"id":"web-2","port":8080,"address":"10.0.0.22","weights":{"passing":5,"warning":0}},"checks":[]},
          {"Node":{"Node":"n3","Address":"10.0.0.3"},"Service":{"ID":"web-3","Port":"8080"}},
          {"Node":{"Node":"n4","Address":"10.0.0.4"},"Service":{"ID":"web-4","Port":70000}},
          {"Node":{"Node":"n5"},"Service":{"ID":"web-5","Port":80,"Address":"app5.internal"}},
          {"Node":{"Node":"n1","Address":"10.0.0.1"},"Service":{"ID":"web-1","Port":9999}},
          {"Node":{"Node":"n6","Address":"10.0.0.6"},"Service":null},
          42,
          {"Node":{"Node":"n7","Address":"10.0.0.7"},"Service":{"ID":"web-7","Port":80},
           "Checks":[{"CheckID":"_service_maintenance:web-7","Status":"critical"}]},
          {"Node":{"Node":"n8","Address":"10.0.0.8"},"Service":{"ID":"web-8","Port":80},
           "Checks":[{"CheckID":"serfHealth","Status":"critical"}]}
        ]"#;
        let p = parse_health(body).unwrap();
        let ids: Vec<&str> = p.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["web-1", "web-2", "web-7", "web-8"]);
        assert_eq!(p.instances[0].addr.to_string(), "10.0.0.1:8080", "Node.Address when Service.Address is empty");
        assert_eq!(p.instances[0].status, Status::Warning);
        assert_eq!(p.instances[1].addr.to_string(), "10.0.0.22:8080");
        assert_eq!((p.instances[1].weight_passing, p.instances[1].weight_warning), (5, 0));
        assert_eq!(p.instances[2].status, Status::Maintenance);
        assert_eq!(p.instances[3].status, Status::Critical, "node check counts");
        let reasons: Vec<&str> = p.skipped.iter().map(|s| s.0).collect();
        assert_eq!(reasons, vec!["bad_port", "bad_port", "duplicate", "malformed", "malformed"]);
        let named: Vec<(&str, &str, u16)> = p.named.iter().map(|n| (n.id.as_str(), n.host.as_str(), n.port)).collect();
        assert_eq!(named, vec![("web-5", "app5.internal", 80)], "a host name is kept, not skipped");
    }

    #[test]
    fn host_name_instances_are_kept_apart_with_their_attributes() {
        let body = br#"[
          {"Node":{"Node":"n2","Address":"10.0.0.2"},"Service":{"ID":"b","Port":81,"Address":"B.example.","Tags":["v2"],
           "Meta":{"az":"a"},"Weights":{"Passing":7,"Warning":2}},"Checks":[{"CheckID":"service:b","Status":"warning"}]},
          {"Node":{"Node":"n1","Address":"node1.example"},"Service":{"ID":"a","Port":80,"Address":""}},
          {"Node":{"Node":"n3","Address":"10.0.0.3"},"Service":{"ID":"c","Port":80}},
          {"Node":{"Node":"n4"},"Service":{"ID":"d","Port":80,"Address":"not a name!"}},
          {"Node":{"Node":"n5"},"Service":{"ID":"e","Port":80,"Address":"10.0.0"}},
          {"Node":{"Node":"n6"},"Service":{"ID":"f","Port":80,"Address":"web:80"}},
          {"Node":{"Node":"n3","Address":"10.0.0.3"},"Service":{"ID":"c","Port":80,"Address":"c.example"}},
          {"Node":{"Node":"n1"},"Service":{"ID":"a","Port":80,"Address":"10.0.0.1"}},
          {"Node":{"Node":"n7"},"Service":{"ID":"g","Port":80,"Address":"g.example"},
           "Checks":[{"CheckID":"_node_maintenance","Status":"critical"}]}
        ]"#;
        let p = parse_health(body).unwrap();
        let ips: Vec<(&str, String)> = p.instances.iter().map(|i| (i.id.as_str(), i.addr.to_string())).collect();
        assert_eq!(ips, vec![("c", "10.0.0.3:80".to_string())]);
        let named: Vec<(&str, &str, &str, u16, Status)> =
            p.named.iter().map(|n| (n.node.as_str(), n.id.as_str(), n.host.as_str(), n.port, n.status)).collect();
        assert_eq!(
            named,
            vec![
                ("n1", "a", "node1.example", 80, Status::Passing),
                ("n2", "b", "B.example.", 81, Status::Warning),
                ("n7", "g", "g.example", 80, Status::Maintenance),
            ],
            "sorted by node and ID; Node.Address when Service.Address is empty; the status as for any instance"
        );
        let b = &p.named[1];
        assert_eq!((b.weight_passing, b.weight_warning), (7, 2));
        assert_eq!(b.tags, vec!["v2".to_string()]);
        assert_eq!(b.meta.get("az").map(String::as_str), Some("a"));
        let skipped: Vec<(&str, bool)> = p.skipped.iter().map(|(r, d)| (*r, d.contains("listed twice"))).collect();
        assert_eq!(
            skipped,
            vec![("bad_address", false), ("bad_address", false), ("bad_address", false), ("duplicate", true), ("duplicate", true)],
            "addresses that are neither IPs nor host names are bad; a node and ID are unique across IPs and names"
        );
    }

    #[test]
    fn whole_body_failures() {
        assert!(parse_health(b"<html>").is_err());
        assert!(parse_health(b"{\"a\":1}").is_err());
        assert!(parse_health(b"[]").unwrap().instances.is_empty());
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_health(&bytes);
        }

        #[test]
        fn odd_values_never_panic(port in any::<i64>(), addr in ".{0,30}", w in any::<i64>(), status in ".{0,10}") {
            let body = serde_json::json!([{"Node": {"Node": "n", "Address": addr.clone()},
                "Service": {"ID": "x", "Port": port, "Address": addr, "Weights": {"Passing": w, "Warning": w}},
                "Checks": [{"CheckID": "c", "Status": status}]}]);
            let _ = parse_health(body.to_string().as_bytes());
        }
    }
}
