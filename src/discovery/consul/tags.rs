//! Tag-driven routes: a Consul service that carries `switchyard.*` tags gets a
//! route and a cluster of its own, without touching the config file.
//!
//! Grammar (one setting per tag; keys are case-sensitive):
//!
//! | tag | meaning | default |
//! |---|---|---|
//! | `switchyard.host=api.example.com` | route on this host; repeatable; `*.example.com` allowed | any host |
//! | `switchyard.path=/api` | route on this path prefix (segment-aware) | `/` |
//! | `switchyard.selection=least_connections` | `round_robin`, `weighted`, `least_connections`, `consistent_hash` | `round_robin` |
//! | `switchyard.hash_header=X-User` / `switchyard.hash_cookie=sid` | consistent-hash key | — |
//! | `switchyard.connect_timeout=1s`, `switchyard.read_timeout=30s` | per-cluster timeouts | 2s / 30s |
//! | `switchyard.retries=1` | further attempts on other backends | 2 |
//! | `switchyard.panic_threshold=0.3` | panic threshold | 0.5 |
//!
//! A service opts in with at least one `switchyard.host` or `switchyard.path`
//! tag. Any malformed `switchyard.*` tag makes the whole set invalid: the
//! service keeps its last good route, and the error is reported. Since
//! `/v1/catalog/services` gives the union of all instances' tags, a tag set by
//! any instance applies to the service.

use crate::config::validate::host_pattern;
use crate::config::{ClusterSpec, ConsulQuery, DiscoverySpec, HashKey, HostPattern, RouteSpec, Selection};
use std::time::Duration;

pub const PREFIX: &str = "switchyard.";

/// Name used for an auto-route's route and cluster.
pub fn auto_name(service: &str) -> String {
    format!("consul.{service}")
}

/// Parse a service's tags. `Ok(None)`: the service does not opt in.
pub fn parse(service: &str, tags: &[String]) -> Result<Option<(RouteSpec, ClusterSpec)>, String> {
    let mut hosts: Vec<HostPattern> = Vec::new();
    let mut path: Option<String> = None;
    let mut selection: Option<String> = None;
    let mut hash_header: Option<String> = None;
    let mut hash_cookie: Option<String> = None;
    let mut connect_timeout = Duration::from_secs(2);
    let mut read_timeout = Duration::from_secs(30);
    let mut retries = 2u32;
    let mut panic = 0.5f64;
    let mut opted_in = false;
    let mut sorted: Vec<&String> = tags.iter().filter(|t| t.starts_with(PREFIX)).collect();
    sorted.sort();
    sorted.dedup();
    for tag in sorted {
        let rest = &tag[PREFIX.len()..];
        let (key, value) = rest
            .split_once('=')
            .ok_or_else(|| format!("tag {tag:?}: expected switchyard.KEY=VALUE"))?;
        let dur = |v: &str| {
            humantime::parse_duration(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("tag {tag:?}: invalid duration {v:?}"))
        };
        match key {
            "host" => {
                hosts.push(host_pattern(value).ok_or_else(|| format!("tag {tag:?}: invalid host {value:?}"))?);
                opted_in = true;
            }
            "path" => {
                if !value.starts_with('/') || value.contains(['?', '#', ' ']) {
                    return Err(format!("tag {tag:?}: path must start with '/'"));
                }
                if path.replace(value.to_string()).is_some() {
                    return Err(format!("tag {tag:?}: more than one switchyard.path"));
                }
                opted_in = true;
            }
            "selection" => selection = Some(value.to_string()),
            "hash_header" => hash_header = Some(value.to_string()),
            "hash_cookie" => hash_cookie = Some(value.to_string()),
            "connect_timeout" => connect_timeout = dur(value)?,
            "read_timeout" => read_timeout = dur(value)?,
            "retries" => {
                retries = value
                    .parse()
                    .ok()
                    .filter(|r| *r <= 10)
                    .ok_or_else(|| format!("tag {tag:?}: retries must be 0..=10"))?
            }
            "panic_threshold" => {
                panic = value
                    .parse()
                    .ok()
                    .filter(|p: &f64| (0.0..=1.0).contains(p))
                    .ok_or_else(|| format!("tag {tag:?}: panic_threshold must be 0.0..=1.0"))?
            }
            _ => return Err(format!("tag {tag:?}: unknown key {key:?}")),
        }
    }
    if !opted_in {
        return Ok(None);
    }
    let selection = match (selection.as_deref(), &hash_header, &hash_cookie) {
        (None | Some("round_robin"), None, None) => Selection::RoundRobin,
        (Some("weighted"), None, None) => Selection::Weighted,
        (Some("least_connections"), None, None) => Selection::LeastConnections,
        (Some("consistent_hash"), Some(h), None) => Selection::ConsistentHash(HashKey::Header(
            http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("switchyard.hash_header: invalid header {h:?}"))?,
        )),
        (Some("consistent_hash"), None, Some(c)) if !c.is_empty() => Selection::ConsistentHash(HashKey::Cookie(c.clone())),
        (Some(other), _, _) if !["round_robin", "weighted", "least_connections", "consistent_hash"].contains(&other) => {
            return Err(format!("switchyard.selection: unknown policy {other:?}"))
        }
        _ => return Err("switchyard.selection=consistent_hash needs exactly one of switchyard.hash_header or switchyard.hash_cookie (and only it uses them)".into()),
    };
    let name = auto_name(service);
    let route = RouteSpec {
        name: name.clone(),
        hosts,
        path_prefix: path.unwrap_or_else(|| "/".into()),
        cluster: name.clone(),
        maintenance: None,
        https_redirect: None,
    };
    let cluster = ClusterSpec {
        name,
        discovery: DiscoverySpec::Consul(ConsulQuery {
            service: service.to_string(),
            tags: Vec::new(),
            allow_warning: false,
            filter: None,
            panic_permille: (panic * 1000.0).round() as u32,
        }),
        selection,
        connect_timeout,
        read_timeout,
        write_timeout: Duration::from_secs(30),
        idle_timeout: crate::config::UPSTREAM_IDLE_TIMEOUT,
        tunnel_timeout: crate::config::TUNNEL_TIMEOUT,
        retries,
        instances: Default::default(),
        tls: None,
        outlier: Some(crate::config::Outlier::default()),
        health_check: None,
        slow_start: None,
    };
    Ok(Some((route, cluster)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn opt_in_and_settings() {
        assert!(parse("web", &t(&["v1", "prod"])).unwrap().is_none());
        let (r, c) = parse(
            "api",
            &t(&["switchyard.host=API.example.com", "switchyard.host=*.api.test", "switchyard.path=/v2", "switchyard.selection=least_connections", "switchyard.retries=1", "other"]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.name, "consul.api");
        assert_eq!(r.cluster, "consul.api");
        assert_eq!(r.path_prefix, "/v2");
        assert_eq!(r.hosts.len(), 2);
        assert_eq!(c.selection, Selection::LeastConnections);
        assert_eq!(c.retries, 1);
        let (_, c) = parse("s", &t(&["switchyard.path=/", "switchyard.selection=consistent_hash", "switchyard.hash_cookie=sid"])).unwrap().unwrap();
        assert_eq!(c.selection, Selection::ConsistentHash(HashKey::Cookie("sid".into())));
    }

    #[test]
    fn malformed_tags_are_errors() {
        for bad in [
            &["switchyard.host=bad host"][..],
            &["switchyard.path=api"],
            &["switchyard.path=/a", "switchyard.path=/b"],
            &["switchyard.host=a.b", "switchyard.selection=fastest"],
            &["switchyard.host=a.b", "switchyard.selection=consistent_hash"],
            &["switchyard.host=a.b", "switchyard.retries=99"],
            &["switchyard.host=a.b", "switchyard.read_timeout=soon"],
            &["switchyard.host=a.b", "switchyard.colour=blue"],
            &["switchyard.hostname"],
        ] {
            assert!(parse("x", &t(bad)).is_err(), "{bad:?}");
        }
    }
}
