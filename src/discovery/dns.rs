//! DNS discovery: a cluster's backends from SRV records, or from the A and
//! AAAA records of a name with a fixed port, re-read on the answers' TTL.
//!
//! Each source owns one resolver (the configured nameservers, or the
//! system's `/etc/resolv.conf`) and publishes a whole normalised set per
//! refresh, like every other source. The resolver's cache is cleared before
//! each refresh: the refresh interval is ours (the TTL clamped to
//! `min_refresh`..`max_refresh`, ±10 % jitter), so an answer is never older
//! than the lookup that reports it.
//!
//! Failures split in two. A *negative* answer (NXDOMAIN, or an empty answer)
//! is the DNS saying "nothing here": it publishes the empty set, as a Consul
//! service that lost its last instance does. Everything else (a timeout,
//! SERVFAIL, REFUSED, an unreachable resolver) says nothing about the
//! backends: the last good set keeps serving, the error shows in `/status`,
//! a metric counts it, and one log line marks each change of state. The
//! next refresh comes sooner (`min_refresh`, doubling up to `max_refresh`),
//! and recovery needs nothing but an answer.
//!
//! SRV rules: records are grouped by priority and the lowest group with at
//! least one usable target serves alone (a target is usable when it has an
//! address: from the answer's additional section, or from a follow-up A/AAAA
//! lookup). A record's weight becomes its backend's weight; weight 0 becomes
//! 1, the smallest share that still takes traffic (a backend weight of 0
//! means "drained" here). A target of `.` ("no service") is skipped. One IP
//! on several ports gives several backends; a record repeated for the same
//! address and port keeps the largest weight.

use super::{normalise, Endpoint, EndpointSet};
use crate::config::DnsQuery;
use crate::metrics::Metrics;
use crate::status::{unix, DnsDetail, StatusBoard};
use async_trait::async_trait;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Follow-up address lookups for SRV targets run this many at a time.
const TARGET_LOOKUPS_AT_ONCE: usize = 16;

/// What one refresh found: the backends and what `/status` shows of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub endpoints: Vec<Endpoint>,
    /// SRV records, or A and AAAA records, in the answer.
    pub records: usize,
    /// The smallest TTL among the records used; None when there were none.
    pub ttl: Option<u32>,
    /// SRV: the priority of the group served.
    pub priority: Option<u16>,
    /// `ok`, or `nxdomain` for a name that does not exist.
    pub result: &'static str,
}

impl Answer {
    fn empty(result: &'static str) -> Answer {
        Answer { endpoints: Vec::new(), records: 0, ttl: None, priority: None, result }
    }
}

/// A failed refresh: the metric's `result` label and a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub result: &'static str,
    pub message: String,
}

/// Sort an error into the metric's `result` values. `Ok(answer)` for the
/// negative answers, which are results, not failures.
fn classify(e: &NetError, name: &str) -> Result<Answer, Failure> {
    let result = match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) if nr.response_code == ResponseCode::NXDomain => {
            return Ok(Answer::empty("nxdomain"))
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => return Ok(Answer::empty("ok")),
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => "servfail",
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => "refused",
        NetError::Timeout => "timeout",
        _ => "error",
    };
    Err(Failure { result, message: format!("lookup of {name}: {e}") })
}

/// The resolver for one source: the given nameservers (UDP, TCP when an
/// answer is truncated), or the system's configuration.
pub fn resolver(q: &DnsQuery) -> Result<TokioResolver, String> {
    let mut builder = if q.nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?
    } else {
        let servers = q
            .nameservers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut b = TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default());
        b.options_mut().use_hosts_file = ResolveHosts::Never;
        b
    };
    let o = builder.options_mut();
    o.timeout = q.timeout;
    o.attempts = 1;
    // Cleared before every refresh anyway; nothing to keep.
    o.cache_size = 0;
    o.preserve_intermediates = true;
    builder.build().map_err(|e| format!("cannot build a resolver: {e}"))
}

/// One refresh: look the name up and turn the answer into backends.
pub async fn refresh(resolver: &TokioResolver, q: &DnsQuery) -> Result<Answer, Failure> {
    resolver.clear_cache();
    let work = async {
        match q.port {
            Some(port) => addresses(resolver, &q.name, port).await,
            None => srv(resolver, &q.name).await,
        }
    };
    match tokio::time::timeout(q.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Failure { result: "timeout", message: format!("lookup of {} took longer than {:?}", q.name, q.timeout) }),
    }
}

/// A and AAAA records of `name`: both asked; a name with neither is an
/// empty (or NXDOMAIN) answer.
async fn addresses(resolver: &TokioResolver, name: &str, port: u16) -> Result<Answer, Failure> {
    let (a, aaaa) = tokio::join!(resolver.lookup(name, RecordType::A), resolver.lookup(name, RecordType::AAAA));
    let mut records = Vec::new();
    let mut negatives = Vec::new();
    for r in [a, aaaa] {
        match r {
            Ok(l) => records.extend(l.answers().iter().filter_map(addr_of).collect::<Vec<_>>()),
            Err(e) => negatives.push(classify(&e, name)?),
        }
    }
    if records.is_empty() {
        // Both negative: NXDOMAIN when either said so.
        let nx = negatives.iter().any(|n| n.result == "nxdomain");
        return Ok(Answer::empty(if nx { "nxdomain" } else { "ok" }));
    }
    let ttl = records.iter().map(|(_, t)| *t).min();
    let mut by_addr: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for (ip, _) in &records {
        let addr = SocketAddr::new(*ip, port);
        by_addr.entry(addr).or_insert_with(|| Endpoint::new(addr));
    }
    Ok(Answer { endpoints: by_addr.into_values().collect(), records: records.len(), ttl, priority: None, result: "ok" })
}

/// An A or AAAA record's address and TTL.
fn addr_of(r: &Record) -> Option<(IpAddr, u32)> {
    match &r.data {
        RData::A(a) => Some((IpAddr::V4(a.0), r.ttl)),
        RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl)),
        _ => None,
    }
}

/// One SRV record, as used: its target as a lower-case name with a final dot.
#[derive(Debug, Clone, PartialEq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
    pub ttl: u32,
}

/// Target name → its addresses with their TTLs.
pub type Addresses = HashMap<String, Vec<(IpAddr, u32)>>;

/// What an SRV answer serves (pure; the rules are in the module doc): the
/// lowest priority group with a usable target, its backends, and the
/// smallest TTL among the SRV and address records used. None when no group
/// has a usable target.
pub fn srv_backends(records: &[SrvRecord], known: &Addresses) -> Option<(u16, Vec<Endpoint>, u32)> {
    let mut groups: BTreeMap<u16, Vec<&SrvRecord>> = BTreeMap::new();
    for s in records.iter().filter(|s| usable(s)) {
        groups.entry(s.priority).or_default().push(s);
    }
    for (priority, group) in groups {
        let mut by_addr: BTreeMap<SocketAddr, (u32, u32)> = BTreeMap::new();
        for s in group {
            let Some(addrs) = known.get(&s.target) else { continue };
            for (ip, attl) in addrs {
                let e = by_addr.entry(SocketAddr::new(*ip, s.port)).or_insert((0, u32::MAX));
                e.0 = e.0.max(u32::from(s.weight).max(1));
                e.1 = e.1.min(s.ttl.min(*attl));
            }
        }
        let Some(ttl) = by_addr.values().map(|(_, t)| *t).min() else { continue };
        let endpoints = by_addr.into_iter().map(|(addr, (weight, _))| Endpoint { weight, ..Endpoint::new(addr) }).collect();
        return Some((priority, endpoints, ttl));
    }
    None
}

/// A target of `.` means "no service here"; port 0 cannot be connected to.
fn usable(s: &SrvRecord) -> bool {
    s.target != "." && s.port != 0
}

async fn srv(resolver: &TokioResolver, name: &str) -> Result<Answer, Failure> {
    let lookup = match resolver.lookup(name, RecordType::SRV).await {
        Ok(l) => l,
        Err(e) => return classify(&e, name),
    };
    let records: Vec<SrvRecord> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(SrvRecord { priority: s.priority, weight: s.weight, port: s.port, target: key(&s.target), ttl: r.ttl }),
            _ => None,
        })
        .collect();
    // Addresses the answer brought along, by target name.
    let mut known = Addresses::new();
    for r in lookup.additionals() {
        if let Some(a) = addr_of(r) {
            known.entry(key(&r.name)).or_default().push(a);
        }
    }
    let mut missing: Vec<String> = records.iter().filter(|s| usable(s) && !known.contains_key(&s.target)).map(|s| s.target.clone()).collect();
    missing.sort();
    missing.dedup();
    for chunk in missing.chunks(TARGET_LOOKUPS_AT_ONCE) {
        let mut set = tokio::task::JoinSet::new();
        for t in chunk {
            let (r, t) = (resolver.clone(), t.clone());
            set.spawn(async move {
                let (a, aaaa) = tokio::join!(r.lookup(t.as_str(), RecordType::A), r.lookup(t.as_str(), RecordType::AAAA));
                (t, a, aaaa)
            });
        }
        while let Some(joined) = set.join_next().await {
            let Ok((t, a, aaaa)) = joined else { continue };
            let mut found = Vec::new();
            for r in [a, aaaa] {
                match r {
                    Ok(l) => found.extend(l.answers().iter().filter_map(addr_of)),
                    // A target without addresses is not usable; a failed
                    // lookup fails the refresh (half a set is no set).
                    Err(e) => {
                        classify(&e, &t)?;
                    }
                }
            }
            known.insert(t, found);
        }
    }
    let min_srv_ttl = records.iter().map(|s| s.ttl).min();
    Ok(match srv_backends(&records, &known) {
        Some((priority, endpoints, ttl)) => Answer { endpoints, records: records.len(), ttl: Some(ttl), priority: Some(priority), result: "ok" },
        None => Answer { records: records.len(), ttl: min_srv_ttl, ..Answer::empty("ok") },
    })
}

/// A name as a lookup key: lower case, with the final dot.
fn key(n: &Name) -> String {
    let mut n = n.to_lowercase();
    n.set_fqdn(true);
    n.to_string()
}

/// The wait before the next refresh: after an answer, its TTL clamped to
/// the bounds; after `failures` failures in a row, `min_refresh` doubled
/// per failure up to `max_refresh`. Then ±10 % jitter, still within bounds.
pub fn next_delay(q: &DnsQuery, ttl: Option<u32>, failures: u32, jitter: f64) -> Duration {
    let base = if failures > 0 {
        q.min_refresh.saturating_mul(1u32 << (failures - 1).min(16))
    } else {
        Duration::from_secs(u64::from(ttl.unwrap_or(0)))
    };
    let base = base.clamp(q.min_refresh, q.max_refresh);
    base.mul_f64(jitter.clamp(0.9, 1.1)).clamp(q.min_refresh, q.max_refresh)
}

/// Refreshes one DNS name and publishes each new set.
pub struct DnsSource {
    query: DnsQuery,
    name: String,
    tx: watch::Sender<Option<EndpointSet>>,
    metrics: Arc<Metrics>,
    status: Arc<StatusBoard>,
}

impl DnsSource {
    pub fn new(query: DnsQuery, metrics: Arc<Metrics>, status: Arc<StatusBoard>) -> (Self, watch::Receiver<Option<EndpointSet>>) {
        let (tx, rx) = watch::channel(None);
        let name = query.source_name();
        let servers = if query.nameservers.is_empty() {
            "system resolver".to_string()
        } else {
            query.nameservers.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
        };
        status.register_source(&name, "dns", &format!("{} {} via {servers}", record_type(&query), query.name));
        status.source_dns(&name, detail(&query, None, None, None));
        (DnsSource { query, name, tx, metrics, status }, rx)
    }

    /// Publish an answer; returns the TTL it asks for.
    fn publish(&self, a: Answer, took: Duration) -> Option<u32> {
        let had = self.tx.borrow().as_ref().map(|s| s.len());
        let set = normalise(a.endpoints.clone());
        let changed = self.tx.send_if_modified(|cur| {
            if cur.as_ref() == Some(&set) {
                false
            } else {
                *cur = Some(set.clone());
                true
            }
        });
        let m = &self.metrics.dns;
        m.lookups.with_label_values(&[self.name.as_str(), a.result]).inc();
        m.last_success.with_label_values(&[self.name.as_str()]).set(unix(SystemTime::now()));
        m.records.with_label_values(&[self.name.as_str()]).set(a.records as i64);
        self.metrics.discovery_update(&self.name, if changed { "ok" } else { "unchanged" });
        self.status.source_ok(&self.name, SystemTime::now());
        if changed {
            match had {
                Some(n) if n > 0 && set.is_empty() => tracing::warn!(
                    source = %self.name, result = a.result,
                    "the name has no usable records any more: publishing the empty set (as a deregistration)"
                ),
                _ => tracing::info!(source = %self.name, backends = set.len(), records = a.records, ttl = ?a.ttl, priority = ?a.priority, took_us = took.as_micros() as u64, "DNS answer changed"),
            }
        }
        a.ttl
    }

    fn fail(&self, f: &Failure, previous: Option<&str>) {
        self.metrics.dns.lookups.with_label_values(&[self.name.as_str(), f.result]).inc();
        self.metrics.discovery_update(&self.name, "error");
        self.status.source_error(&self.name, f.message.clone());
        // Once when lookups start failing, not per retry (nor when the kind
        // of failure changes: a stopped server may alternate between a
        // refused connection and a timeout).
        if previous.is_none() {
            tracing::warn!(source = %self.name, result = f.result, error = %f.message, "DNS lookup failed; the last good set (if any) keeps serving");
        } else {
            tracing::debug!(source = %self.name, result = f.result, error = %f.message, "DNS lookup failed again");
        }
    }
}

fn record_type(q: &DnsQuery) -> &'static str {
    if q.port.is_some() {
        "A/AAAA"
    } else {
        "SRV"
    }
}

fn detail(q: &DnsQuery, a: Option<&Answer>, next: Option<SystemTime>, last_result: Option<&'static str>) -> DnsDetail {
    DnsDetail {
        name: q.name.clone(),
        record_type: record_type(q),
        nameservers: q.nameservers.iter().map(|s| s.to_string()).collect(),
        records: a.map(|a| a.records),
        backends: a.map(|a| a.endpoints.len()),
        priority: a.and_then(|a| a.priority),
        ttl_seconds: a.and_then(|a| a.ttl),
        next_refresh_unix: next.map(unix),
        last_result,
    }
}

#[async_trait]
impl BackgroundService for DnsSource {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut failures = 0u32;
        let mut failing: Option<&'static str> = None;
        let mut last: Option<Answer> = None;
        let mut resolver_ = None;
        loop {
            let started = std::time::Instant::now();
            // Built once; a failure to build (an unreadable resolv.conf) is
            // retried like a failed lookup.
            let built = match resolver_.take() {
                Some(r) => Ok(r),
                None => resolver(&self.query).map_err(|message| Failure { result: "error", message }),
            };
            let outcome = match built {
                Ok(r) => {
                    let out = tokio::select! {
                        _ = shutdown.changed() => return,
                        out = refresh(&r, &self.query) => out,
                    };
                    resolver_ = Some(r);
                    out
                }
                Err(f) => Err(f),
            };
            let ttl = match outcome {
                Ok(a) => {
                    if failing.take().is_some() {
                        tracing::info!(source = %self.name, "DNS lookups answer again");
                    }
                    failures = 0;
                    let ttl = self.publish(a.clone(), started.elapsed());
                    last = Some(a);
                    ttl
                }
                Err(f) => {
                    self.fail(&f, failing);
                    failing = Some(f.result);
                    failures = failures.saturating_add(1);
                    None
                }
            };
            let delay = next_delay(&self.query, ttl, failures, rand::random_range(0.9..1.1));
            let next = SystemTime::now() + delay;
            let result = failing.or(last.as_ref().map(|a| a.result));
            self.status.source_dns(&self.name, detail(&self.query, last.as_ref(), Some(next), result));
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(min: u64, max: u64) -> DnsQuery {
        DnsQuery {
            name: "web.test.".into(),
            port: None,
            nameservers: vec![],
            min_refresh: Duration::from_secs(min),
            max_refresh: Duration::from_secs(max),
            timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn refresh_follows_the_ttl_within_bounds_with_jitter() {
        let q = q(1, 30);
        assert_eq!(next_delay(&q, Some(10), 0, 1.0), Duration::from_secs(10));
        assert_eq!(next_delay(&q, Some(0), 0, 1.0), Duration::from_secs(1), "TTL 0 (Consul DNS): min_refresh");
        assert_eq!(next_delay(&q, Some(3600), 0, 1.0), Duration::from_secs(30));
        assert_eq!(next_delay(&q, None, 0, 1.0), Duration::from_secs(1));
        assert_eq!(next_delay(&q, Some(10), 0, 1.1), Duration::from_secs(11));
        assert_eq!(next_delay(&q, Some(10), 0, 0.9), Duration::from_secs(9));
        assert_eq!(next_delay(&q, Some(10), 0, 5.0), Duration::from_secs(11), "jitter is bounded to 10 %");
        assert_eq!(next_delay(&q, Some(30), 0, 1.1), Duration::from_secs(30), "jitter stays within max_refresh");
        // Failing: min_refresh doubling up to max_refresh.
        assert_eq!(next_delay(&q, None, 1, 1.0), Duration::from_secs(1));
        assert_eq!(next_delay(&q, None, 3, 1.0), Duration::from_secs(4));
        assert_eq!(next_delay(&q, None, 40, 1.0), Duration::from_secs(30));
    }

    fn rec(priority: u16, weight: u16, port: u16, target: &str) -> SrvRecord {
        SrvRecord { priority, weight, port, target: target.into(), ttl: 30 }
    }

    #[test]
    fn srv_rules_priority_weights_and_ports() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let known: Addresses = [
            ("a.".to_string(), vec![(ip("10.0.0.1"), 5)]),
            ("b.".to_string(), vec![(ip("10.0.0.2"), 60), (ip("fd00::2"), 60)]),
            ("empty.".to_string(), vec![]),
        ]
        .into_iter()
        .collect();
        let recs = vec![
            // Priority 0: nothing usable (no address, "no service", port 0).
            rec(0, 5, 80, "empty."),
            rec(0, 5, 80, "."),
            rec(0, 5, 0, "a."),
            rec(0, 5, 80, "unknown."),
            // Priority 1 serves: same IP on two ports, weight 0 as 1, a
            // repeated record keeping the larger weight, both families.
            rec(1, 0, 80, "a."),
            rec(1, 3, 81, "a."),
            rec(1, 2, 81, "a."),
            rec(1, 7, 90, "b."),
            // Priority 2 never serves while 1 has targets.
            rec(2, 1, 80, "b."),
        ];
        let (prio, eps, ttl) = srv_backends(&recs, &known).unwrap();
        assert_eq!(prio, 1);
        assert_eq!(ttl, 5, "the smallest TTL among the records used");
        let got: Vec<(String, u32)> = eps.iter().map(|e| (e.addr.to_string(), e.weight)).collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:80".to_string(), 1),
                ("10.0.0.1:81".to_string(), 3),
                ("10.0.0.2:90".to_string(), 7),
                ("[fd00::2]:90".to_string(), 7),
            ]
        );
        assert_eq!(srv_backends(&recs[..4], &known), None, "no usable target anywhere");
    }

    #[test]
    fn source_names() {
        let mut a = q(1, 30);
        assert_eq!(a.source_name(), "dns:web.test.");
        a.port = Some(8080);
        assert_eq!(a.source_name(), "dns:web.test.:8080");
    }
}
