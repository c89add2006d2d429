//! Tests of the Consul double itself (tests/support/consul.rs): blocking
//! semantics, per-service indexes, ACLs, faults, the agent API and the wire
//! format, so that tests of our Consul client can trust it.

mod support;

use serde_json::Value;
use std::io::Read;
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use support::consul::*;
use support::{raw_exchange, wait_until};

// ---------------------------------------------------------------- helpers

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Resp {
    fn h(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
    fn index(&self) -> u64 {
        self.h("x-consul-index").expect("X-Consul-Index").parse().unwrap()
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn entries(&self) -> Vec<Value> {
        self.json().as_array().unwrap().clone()
    }
    fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .entries()
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    }
}

fn http(timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(timeout).no_proxy().build().unwrap()
}

fn send(rb: reqwest::blocking::RequestBuilder) -> Resp {
    let r = rb.send().unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.text().unwrap();
    Resp { status, headers, body }
}

fn get(c: &ConsulDouble, path: &str) -> Resp {
    send(http(Duration::from_secs(15)).get(format!("{}{path}", c.url())))
}

fn get_with(c: &ConsulDouble, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut rb = http(Duration::from_secs(15)).get(format!("{}{path}", c.url()));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    send(rb)
}

fn put(c: &ConsulDouble, path: &str, body: &str) -> Resp {
    send(http(Duration::from_secs(15)).put(format!("{}{path}", c.url())).body(body.to_string()))
}

/// GET on another thread; returns the response and the instant it arrived.
fn spawn_get(c: &ConsulDouble, path: &str) -> JoinHandle<(Resp, Instant)> {
    let url = format!("{}{path}", c.url());
    std::thread::spawn(move || {
        let r = send(http(Duration::from_secs(15)).get(url));
        (r, Instant::now())
    })
}

fn wait_held(c: &ConsulDouble, n: usize) {
    assert!(
        wait_until(Duration::from_secs(3), || c.held_queries() == n),
        "expected {n} held queries, have {}",
        c.held_queries()
    );
}

fn web(c: &ConsulDouble, n: usize) {
    for i in 1..=n {
        c.register(Instance::new(&format!("n{i}"), &format!("web-{i}"), "web", &format!("10.0.0.{i}"), 8080));
    }
}

// ---------------------------------------------------------------- blocking

#[test]
fn blocking_query_times_out_after_wait_plus_jitter_with_same_index() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let first = get(&c, "/v1/health/service/web");
    let i = first.index();
    assert_eq!(i, c.index_of("web"));
    let t = Instant::now();
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=2s"));
    wait_held(&c, 1);
    let (r, at) = h.join().unwrap();
    let took = at.duration_since(t);
    assert_eq!(r.status, 200);
    assert!(took >= Duration::from_secs(2), "returned after {took:?}");
    assert!(took < Duration::from_millis(2125 + 300), "returned after {took:?} (wait 2s + jitter ≤ 125ms)");
    assert_eq!(r.index(), i, "a timed-out query returns the same index");
    assert_eq!(r.ids(), vec!["web-1"]);
    assert_eq!(c.held_queries(), 0);
}

#[test]
fn register_during_held_query_wakes_it_promptly_with_higher_index() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let i = get(&c, "/v1/health/service/web").index();
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=10s"));
    wait_held(&c, 1);
    let t = Instant::now();
    c.register(Instance::new("n2", "web-2", "web", "10.0.0.2", 8080));
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) < Duration::from_millis(500), "woke after {:?}", at.duration_since(t));
    assert!(r.index() > i);
    assert_eq!(r.index(), c.index_of("web"));
    assert_eq!(r.ids(), vec!["web-1", "web-2"]);
}

#[test]
fn health_flip_on_another_service_does_not_wake_a_watcher() {
    let c = ConsulDouble::start();
    web(&c, 1);
    c.register(Instance::new("n9", "api-1", "api", "10.0.0.9", 9090));
    let i = get(&c, "/v1/health/service/web").index();
    let api_before = c.index_of("api");
    let t = Instant::now();
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=1s"));
    wait_held(&c, 1);
    c.set_health("n9", "api-1", "critical");
    c.register(Instance::new("n9", "api-2", "api", "10.0.0.9", 9091));
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) >= Duration::from_secs(1), "woken early by another service");
    assert_eq!(r.index(), i);
    assert_eq!(c.index_of("web"), i);
    assert!(c.index_of("api") > api_before);
}

#[test]
fn node_health_flip_wakes_watchers_of_services_on_that_node() {
    let c = ConsulDouble::start();
    web(&c, 2);
    let i = get(&c, "/v1/health/service/web").index();
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=10s&passing"));
    wait_held(&c, 1);
    c.set_node_health("n1", "critical");
    let (r, _) = h.join().unwrap();
    assert!(r.index() > i);
    assert_eq!(r.ids(), vec!["web-2"], "a critical serfHealth fails ?passing");
}

#[test]
fn index_zero_or_absent_answers_at_once() {
    let c = ConsulDouble::start();
    web(&c, 1);
    for q in ["?index=0&wait=10s", "?wait=10s", ""] {
        let t = Instant::now();
        let r = get(&c, &format!("/v1/health/service/web{q}"));
        assert_eq!(r.status, 200);
        assert!(t.elapsed() < Duration::from_millis(500), "{q} blocked for {:?}", t.elapsed());
        assert!(r.index() >= 1);
    }
}

#[test]
fn passing_filter_applies_after_blocking() {
    let c = ConsulDouble::start();
    web(&c, 2);
    let i = get(&c, "/v1/health/service/web?passing").index();
    let h = spawn_get(&c, &format!("/v1/health/service/web?passing&index={i}&wait=10s"));
    wait_held(&c, 1);
    c.set_health("n1", "web-1", "critical");
    let (r, _) = h.join().unwrap();
    let j = r.index();
    assert!(j > i);
    assert_eq!(r.ids(), vec!["web-2"]);
    // A change to an instance that ?passing already hides still wakes the caller.
    let h = spawn_get(&c, &format!("/v1/health/service/web?passing&index={j}&wait=10s"));
    wait_held(&c, 1);
    c.set_health("n1", "web-1", "warning");
    let (r, _) = h.join().unwrap();
    assert!(r.index() > j);
    assert_eq!(r.ids(), vec!["web-2"]);
}

#[test]
fn passing_values_maintenance_and_warning() {
    let c = ConsulDouble::start();
    web(&c, 3);
    c.set_health("n2", "web-2", "warning");
    c.set_maintenance("n3", "web-3", true);
    for q in ["passing", "passing=1", "passing=true", "passing=T"] {
        assert_eq!(get(&c, &format!("/v1/health/service/web?{q}")).ids(), vec!["web-1"], "{q}");
    }
    for q in ["", "?passing=false", "?passing=0"] {
        assert_eq!(get(&c, &format!("/v1/health/service/web{q}")).ids().len(), 3, "{q}");
    }
    let all = get(&c, "/v1/health/service/web").entries();
    let e3 = all.iter().find(|e| e["Service"]["ID"] == "web-3").unwrap();
    let maint = e3["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ch| ch["CheckID"] == "_service_maintenance:web-3")
        .expect("maintenance check");
    assert_eq!(maint["Status"], "critical");
    assert_eq!(maint["Name"], "Service Maintenance Mode");
    c.set_maintenance("n3", "web-3", false);
    assert_eq!(get(&c, "/v1/health/service/web?passing").ids(), vec!["web-1", "web-3"]);
}

#[test]
fn catalog_services_index_ignores_health_flips_but_moves_on_register() {
    let c = ConsulDouble::start();
    c.register(Instance::new("n1", "web-1", "web", "10.0.0.1", 80).tags(&["v1"]));
    c.register(Instance::new("n2", "web-2", "web", "10.0.0.2", 80).tags(&["v2", "v1"]));
    let r = get(&c, "/v1/catalog/services");
    let i = r.index();
    let j = r.json();
    assert_eq!(j["consul"], serde_json::json!([]), "the server's own consul service is listed");
    let mut tags: Vec<String> = j["web"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
    tags.sort();
    assert_eq!(tags, vec!["v1", "v2"]);

    c.set_health("n1", "web-1", "critical");
    c.set_node_health("n2", "critical");
    assert_eq!(get(&c, "/v1/catalog/services").index(), i);
    let t = Instant::now();
    let r = get(&c, &format!("/v1/catalog/services?index={i}&wait=300ms"));
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.index(), i);

    let h = spawn_get(&c, &format!("/v1/catalog/services?index={i}&wait=10s"));
    wait_held(&c, 1);
    c.register(Instance::new("n3", "db-1", "db", "10.0.0.3", 5432));
    let (r, _) = h.join().unwrap();
    assert!(r.index() > i);
    assert!(r.json().get("db").is_some());
    assert_eq!(c.services_index(), r.index());
}

#[test]
fn missing_service_answers_with_the_last_extinction_index() {
    let c = ConsulDouble::start();
    c.register(Instance::new("n1", "tmp-1", "tmp", "10.0.0.1", 80));
    c.deregister("n1", "tmp-1");
    let e = c.index_of("ghost");
    assert_eq!(e, c.raft_index(), "the extinction happened on the last write");
    assert_eq!(c.index_of("tmp"), e);
    let r = get(&c, "/v1/health/service/ghost");
    assert_eq!(r.body, "[]", "empty is [] not null");
    assert_eq!(r.index(), e);
    // Another service appearing does not move the extinction index...
    c.register(Instance::new("n1", "other-1", "other", "10.0.0.1", 81));
    assert_eq!(c.index_of("ghost"), e);
    let h = spawn_get(&c, &format!("/v1/health/service/ghost?index={e}&wait=10s"));
    wait_held(&c, 1);
    c.register(Instance::new("n1", "other-2", "other", "10.0.0.1", 82));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c.held_queries(), 1, "not woken by an unrelated registration");
    // ...but its extinction does.
    c.deregister("n1", "other-1");
    c.deregister("n1", "other-2");
    let (r, _) = h.join().unwrap();
    assert!(r.index() > e);
    assert_eq!(r.body, "[]");
}

#[test]
fn reset_indexes_releases_held_queries_with_their_old_answer_and_index() {
    let c = ConsulDouble::start();
    web(&c, 2);
    let i = get(&c, "/v1/health/service/web").index();
    let si = get(&c, "/v1/catalog/services").index();
    let h1 = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=10s"));
    let h2 = spawn_get(&c, &format!("/v1/catalog/services?index={si}&wait=10s"));
    wait_held(&c, 2);
    let t = Instant::now();
    c.reset_indexes();
    let (r1, at1) = h1.join().unwrap();
    let (r2, at2) = h2.join().unwrap();
    assert!(at1.duration_since(t) < Duration::from_millis(500));
    assert!(at2.duration_since(t) < Duration::from_millis(500));
    // Consul's abandon channel: the held query answers what it had computed
    // before the restore, with the index the client sent.
    assert_eq!(r1.index(), i, "released early with the index it held on");
    assert_eq!(r2.index(), si);
    assert_eq!(r1.ids(), vec!["web-1", "web-2"]);
    assert_eq!(c.held_queries(), 0);
    // Only the next read shows the restore: same data, lower index.
    let r = get(&c, "/v1/health/service/web");
    assert!(r.index() < i && r.index() >= 2, "{} vs {i}: index 1 is Consul's floor, never a restored index", r.index());
    assert_eq!(r.ids(), vec!["web-1", "web-2"], "same data, lower index");
    let low = r.index();
    // A read sent after the restore with the old index is not released by
    // it: it is held like any query above the current index, to the end of
    // its wait, and then answers the current (lower) index.
    let t = Instant::now();
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=1s"));
    wait_held(&c, 1);
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) >= Duration::from_secs(1), "held for its whole wait: {:?}", at.duration_since(t));
    assert_eq!(r.index(), low);
    c.register(Instance::new("n3", "web-3", "web", "10.0.0.3", 8080));
    assert!(get(&c, "/v1/health/service/web").index() > low);
}

#[test]
fn a_held_query_above_the_current_index_waits_until_the_index_passes_it() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let i = get(&c, "/v1/health/service/web").index();
    let ahead = i + 3;
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={ahead}&wait=10s"));
    wait_held(&c, 1);
    // Changes that leave the index at or below `ahead` do not release it.
    let mut n = 0;
    while c.index_of("web") < ahead {
        n += 1;
        assert!(n <= 10, "check output changes do not move the service index");
        c.set_check_output("n1", "web-1", &format!("output {n}"));
        std::thread::sleep(Duration::from_millis(20));
        if c.index_of("web") <= ahead {
            assert_eq!(c.held_queries(), 1, "released at index {} <= {ahead}", c.index_of("web"));
        }
    }
    // The write that passes it does.
    if c.index_of("web") == ahead {
        c.set_check_output("n1", "web-1", "past");
    }
    let (r, _) = h.join().unwrap();
    assert!(r.index() > ahead);
}

#[test]
fn wipe_replaces_the_catalog_and_releases_held_queries_like_a_restore() {
    let c = ConsulDouble::start();
    web(&c, 2);
    for n in 0..20 {
        c.set_check_output("n1", "web-1", &format!("output {n}"));
    }
    let i = get(&c, "/v1/health/service/web").index();
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=10s"));
    wait_held(&c, 1);
    let t = Instant::now();
    c.wipe();
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) < Duration::from_millis(500));
    assert_eq!((r.index(), r.ids()), (i, vec!["web-1".to_string(), "web-2".to_string()]));
    let r = get(&c, "/v1/health/service/web");
    assert!(r.index() < i, "a new cluster's indexes start low: {} vs {i}", r.index());
    assert_eq!(r.body, "[]");
    c.register(Instance::new("n3", "web-3", "web", "10.0.0.3", 8080));
    let r = get(&c, "/v1/health/service/web");
    assert_eq!(r.ids(), vec!["web-3"]);
    assert!(r.index() < i);
}

#[test]
fn output_only_change_moves_the_index_without_changing_backends() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let i = get(&c, "/v1/health/service/web").index();
    c.register(Instance::new("n1", "web-1", "web", "10.0.0.1", 8080)); // identical: no change
    assert_eq!(c.index_of("web"), i, "an identical upsert moves nothing");
    c.set_check_output("n1", "web-1", "HTTP GET: 200 OK");
    assert!(c.index_of("web") > i);
}

// ---------------------------------------------------------------- ACL

#[test]
fn acl_unknown_token_403_limited_token_filtered_anonymous_filtered_silently() {
    let c = ConsulDouble::start();
    web(&c, 1);
    c.require_token(Some("root"));
    c.add_limited_token("weak");
    let path = "/v1/health/service/web";

    let r = get_with(&c, path, &[("X-Consul-Token", "wrong")]);
    assert_eq!((r.status, r.body.as_str()), (403, "ACL not found"));
    let r = get_with(&c, "/v1/catalog/services", &[("Authorization", "Bearer wrong")]);
    assert_eq!((r.status, r.body.as_str()), (403, "ACL not found"));

    for h in [("X-Consul-Token", "root"), ("Authorization", "Bearer root")] {
        let r = get_with(&c, path, &[h]);
        assert_eq!(r.status, 200);
        assert_eq!(r.ids(), vec!["web-1"]);
        assert_eq!(r.h("x-consul-results-filtered-by-acls"), None);
        assert_eq!(r.h("x-consul-default-acl-policy").as_deref(), Some("deny"));
    }

    let r = get_with(&c, path, &[("X-Consul-Token", "weak")]);
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
    assert_eq!(r.h("x-consul-results-filtered-by-acls").as_deref(), Some("true"));
    let r = get_with(&c, "/v1/catalog/services", &[("X-Consul-Token", "weak")]);
    assert_eq!((r.status, r.body.as_str()), (200, "{}"));
    assert_eq!(r.h("x-consul-results-filtered-by-acls").as_deref(), Some("true"));

    // No token: the anonymous token, filtered silently (no header) [2.2].
    let r = get(&c, path);
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
    assert_eq!(r.h("x-consul-results-filtered-by-acls"), None);

    // Single-object writes refuse.
    let r = send(
        http(Duration::from_secs(5))
            .put(format!("{}/v1/agent/service/register", c.url()))
            .header("X-Consul-Token", "weak")
            .body(r#"{"Name":"lb"}"#),
    );
    assert_eq!(r.status, 403);
    assert!(r.body.starts_with("Permission denied: token with AccessorID '"), "{}", r.body);
    assert!(r.body.ends_with("lacks permission 'service:write' on \"lb\""), "{}", r.body);

    // status/leader needs no ACL; ?token= works but is recorded as such.
    assert_eq!(get_with(&c, "/v1/status/leader", &[("X-Consul-Token", "wrong")]).status, 200);
    c.clear_requests();
    assert_eq!(get(&c, &format!("{path}?token=root")).ids(), vec!["web-1"]);
    let rec = c.requests();
    assert_eq!(rec.len(), 1);
    assert!(rec[0].has_param("token"));
    assert_eq!(rec[0].token().as_deref(), Some("root"));

    c.anonymous_acl_not_found(true);
    let r = get(&c, path);
    assert_eq!((r.status, r.body.as_str()), (403, "ACL not found"));

    c.require_token(None);
    let r = get_with(&c, path, &[("X-Consul-Token", "anything")]);
    assert_eq!(r.ids(), vec!["web-1"]);
    assert_eq!(r.h("x-consul-default-acl-policy").as_deref(), Some("allow"));
}

// ---------------------------------------------------------------- faults

#[test]
fn every_fault_behaves_as_documented() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let path = "/v1/health/service/web";

    for (code, body) in [(500, "No cluster leader"), (429, CONNLIMIT_TEXT), (403, "ACL not found")] {
        c.fault(Fault::Status(code));
        let r = get(&c, path);
        assert_eq!((r.status, r.body.as_str()), (code, body));
        assert_eq!(get(&c, "/v1/status/leader").status, code, "every endpoint");
    }
    c.fault(Fault::StatusBody(502, "bad gateway".into()));
    assert_eq!(get(&c, path).status, 502);

    c.fault(Fault::Slow(Duration::from_millis(300)));
    let t = Instant::now();
    assert_eq!(get(&c, path).status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    c.fault(Fault::Garbage);
    let r = get(&c, path);
    assert_eq!(r.status, 200);
    assert!(r.index() >= 1);
    assert!(serde_json::from_str::<Value>(&r.body).is_err(), "{}", r.body);

    c.fault(Fault::WrongTypes);
    let r = get(&c, path);
    assert_eq!(r.status, 200);
    let e = r.entries();
    assert!(e.iter().any(|e| e["Service"]["Port"].is_string()));
    assert!(e.iter().any(|e| e["Service"].is_null()));
    assert!(e.iter().any(|e| e["Service"]["Port"] == 70000));
    assert_eq!(e.iter().filter(|e| e["Service"]["ID"] == "web-1").count(), 2, "duplicates");
    assert_eq!(get(&c, "/v1/catalog/services").json()["wrongtypes"], 42);

    c.fault(Fault::IndexZero);
    assert_eq!(get(&c, path).h("x-consul-index").as_deref(), Some("0"));
    c.fault(Fault::IndexMissing);
    let r = get(&c, path);
    assert_eq!(r.status, 200);
    assert_eq!(r.h("x-consul-index"), None);

    c.fault(Fault::Hang);
    c.clear_requests();
    let t = Instant::now();
    let err = http(Duration::from_millis(300)).get(format!("{}{path}", c.url())).send();
    assert!(err.is_err());
    assert!(t.elapsed() < Duration::from_secs(2));
    let rec = c.requests();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].status, None, "recorded but never answered");

    c.fault(Fault::NoLeader);
    let r = get(&c, path);
    assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
    let r = get(&c, &format!("{path}?stale"));
    assert_eq!(r.status, 200);
    assert_eq!(r.h("x-consul-knownleader").as_deref(), Some("false"));
    assert_eq!(get(&c, "/v1/status/leader").body, "\"\"");

    c.fault(Fault::None);
    let r = get(&c, path);
    assert_eq!(r.ids(), vec!["web-1"]);
    assert_eq!(r.h("x-consul-knownleader").as_deref(), Some("true"));
}

#[test]
fn a_fault_releases_held_queries() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let i = get(&c, "/v1/health/service/web").index();
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=10s"));
    wait_held(&c, 1);
    let t = Instant::now();
    c.fault(Fault::Status(500));
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) < Duration::from_millis(500));
    assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
}

// ---------------------------------------------------------------- agent API

#[test]
fn agent_registration_ttl_check_lifecycle() {
    let c = ConsulDouble::start();
    let r = put(
        &c,
        "/v1/agent/service/register",
        r#"{"Name":"lb","ID":"lb-1","Address":"127.0.0.1","Port":8080,"Tags":["edge"],"Check":{"TTL":"10s"}}"#,
    );
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    let svc = &c.agent_services()[0];
    assert_eq!(svc["ID"], "lb-1");
    assert_eq!(svc["Checks"][0]["CheckID"], "service:lb-1");
    assert_eq!(svc["Checks"][0]["Status"], "critical", "a new TTL check starts critical");
    assert_eq!(svc["Checks"][0]["Name"], "Service 'lb' check");

    let all = get(&c, "/v1/health/service/lb");
    let e = &all.entries()[0];
    assert_eq!(e["Node"]["Node"], NODE_NAME);
    assert_eq!(e["Service"]["TaggedAddresses"]["lan_ipv4"]["Port"], 8080);
    assert_eq!(get(&c, "/v1/health/service/lb?passing").body, "[]");

    let i = all.index();
    let r = put(&c, "/v1/agent/check/pass/service:lb-1?note=all%20good", "");
    assert_eq!(r.status, 200);
    assert_eq!(c.agent_services()[0]["Checks"][0]["Status"], "passing");
    assert_eq!(c.agent_services()[0]["Checks"][0]["Output"], "all good");
    let r = get(&c, "/v1/health/service/lb?passing");
    assert_eq!(r.ids(), vec!["lb-1"]);
    assert!(r.index() > i, "the status change reached the catalog at once");

    let r = put(&c, "/v1/agent/check/pass/nope", "");
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "Unknown check ID \"nope\". Ensure that the check ID is passed, not the check name.");
    let r = put(&c, "/v1/agent/service/deregister/nope", "");
    assert_eq!(r.status, 404);
    assert_eq!(r.body, "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name.");

    // Maintenance.
    let r = put(&c, "/v1/agent/service/maintenance/lb-1", "");
    assert_eq!((r.status, r.body.as_str()), (400, "Missing value for enable"));
    assert_eq!(put(&c, "/v1/agent/service/maintenance/nope?enable=true", "").status, 404);
    assert_eq!(put(&c, "/v1/agent/service/maintenance/lb-1?enable=true&reason=drain", "").status, 200);
    assert_eq!(get(&c, "/v1/health/service/lb?passing").body, "[]");
    let e = &get(&c, "/v1/health/service/lb").entries()[0];
    let m = e["Checks"].as_array().unwrap().iter().find(|c| c["CheckID"] == "_service_maintenance:lb-1").unwrap();
    assert_eq!(m["Notes"], "drain");
    assert_eq!(put(&c, "/v1/agent/service/maintenance/lb-1?enable=false", "").status, 200);
    assert_eq!(get(&c, "/v1/health/service/lb?passing").ids(), vec!["lb-1"]);

    // Agent restart: registrations are forgotten.
    c.set_agent_restart();
    assert!(c.agent_services().is_empty());
    let r = put(&c, "/v1/agent/check/pass/service:lb-1", "");
    assert_eq!(r.status, 404);
    assert!(r.body.starts_with("Unknown check ID \"service:lb-1\""));
    assert_eq!(get(&c, "/v1/health/service/lb").body, "[]");
}

#[test]
fn agent_register_body_forms_and_validation() {
    let c = ConsulDouble::start();
    // snake_case, ID defaults to Name, several checks numbered.
    let r = put(
        &c,
        "/v1/agent/service/register",
        r#"{"name":"snake","port":9000,"enable_tag_override":true,"checks":[{"ttl":"5s"},{"ttl":"5s","status":"passing"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let s = &c.agent_services()[0];
    assert_eq!(s["ID"], "snake");
    let ids: Vec<&str> = s["Checks"].as_array().unwrap().iter().map(|c| c["CheckID"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["service:snake:1", "service:snake:2"]);
    assert_eq!(s["Checks"][1]["Status"], "passing");
    // Service.Address "" in the catalog: clients fall back to the node address.
    let e = &get(&c, "/v1/health/service/snake").entries()[0];
    assert_eq!(e["Service"]["Address"], "");
    assert_eq!(e["Node"]["Address"], "127.0.0.1");

    let r = put(&c, "/v1/agent/service/register", r#"{"Name":"x","Address":"0.0.0.0"}"#);
    assert_eq!((r.status, r.body.as_str()), (400, "Invalid service address"));
    let r = put(&c, "/v1/agent/service/register", r#"{"Port":1}"#);
    assert_eq!((r.status, r.body.as_str()), (400, "Missing service name"));
    let r = put(&c, "/v1/agent/service/register", r#"{"Name":"x","Weights":{"Passing":0,"Warning":1}}"#);
    assert_eq!((r.status, r.body.as_str()), (400, "Invalid Weights: Passing must be greater than 0"));
    let r = put(&c, "/v1/agent/service/register", "{not json");
    assert_eq!(r.status, 400);
    assert!(r.body.starts_with("Request decode failed"));
    let r = put(&c, "/v1/agent/check/update/service:snake:1", r#"{"Status":"bogus"}"#);
    assert_eq!((r.status, r.body.as_str()), (400, "Invalid check status: 'bogus'"));
    let r = put(&c, "/v1/agent/check/update/service:snake:1", r#"{"Status":"warning","Output":"slow"}"#);
    assert_eq!(r.status, 200);
    let e = &get(&c, "/v1/health/service/snake").entries()[0];
    let ch = e["Checks"].as_array().unwrap().iter().find(|c| c["CheckID"] == "service:snake:1").unwrap();
    assert_eq!((ch["Status"].as_str(), ch["Output"].as_str()), (Some("warning"), Some("slow")));
}

#[test]
fn ttl_expiry_and_deferred_output_sync() {
    let c = ConsulDouble::start();
    c.set_check_update_interval(Duration::from_millis(200));
    let r = put(&c, "/v1/agent/service/register", r#"{"Name":"ttl","Check":{"TTL":"400ms"}}"#);
    assert_eq!(r.status, 200);
    assert_eq!(put(&c, "/v1/agent/check/pass/service:ttl?note=a", "").status, 200);
    let catalog_check = |c: &ConsulDouble| -> Value {
        let e = &get(c, "/v1/health/service/ttl").entries()[0];
        e["Checks"].as_array().unwrap().iter().find(|c| c["CheckID"] == "service:ttl").unwrap().clone()
    };
    assert_eq!(catalog_check(&c)["Output"], "a");
    // Output-only change: agent at once, catalog only after the deferral.
    let i = c.index_of("ttl");
    assert_eq!(put(&c, "/v1/agent/check/pass/service:ttl?note=b", "").status, 200);
    assert_eq!(c.agent_services()[0]["Checks"][0]["Output"], "b");
    assert_eq!(catalog_check(&c)["Output"], "a");
    assert_eq!(c.index_of("ttl"), i);
    assert!(wait_until(Duration::from_secs(2), || catalog_check(&c)["Output"] == "b"));
    // Not refreshed within the TTL: critical.
    assert!(wait_until(Duration::from_secs(3), || catalog_check(&c)["Status"] == "critical"));
    assert_eq!(
        c.agent_services()[0]["Checks"][0]["Output"],
        "TTL expired (last output before timeout follows): b"
    );
}

#[test]
fn wrong_method_405_with_allow_header() {
    let c = ConsulDouble::start();
    let r = get(&c, "/v1/agent/service/register");
    assert_eq!((r.status, r.body.as_str()), (405, "method GET not allowed"));
    assert_eq!(r.h("allow").as_deref(), Some("OPTIONS,PUT"));
    let r = get(&c, "/v1/agent/check/pass/service:x");
    assert_eq!(r.status, 405);
    let r = put(&c, "/v1/health/service/web", "");
    assert_eq!(r.status, 405);
    assert_eq!(r.h("allow").as_deref(), Some("OPTIONS,GET"));
}

// ---------------------------------------------------------------- parameters

#[test]
fn bad_parameters_get_consul_texts() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let cases: &[(&str, u16, &str)] = &[
        ("?index=1&wait=abc", 400, "Invalid wait time"),
        ("?wait=10", 400, "Invalid wait time"),
        ("?index=abc", 400, "Invalid index"),
        ("?index=-1", 400, "Invalid index"),
        ("?passing=maybe", 400, "Invalid value for ?passing"),
        ("?stale&consistent", 400, "Cannot specify ?stale with ?consistent, conflicting semantics."),
        ("?cached&consistent", 400, "Cannot specify ?cached with ?consistent, conflicting semantics."),
        ("?dc=dc2", 500, "No path to datacenter"),
        ("?ns=team", 400, "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature"),
        (
            "?partition=p1",
            400,
            "Invalid query parameter: \"partition\" - Partitions are a Consul Enterprise feature",
        ),
    ];
    for (q, code, body) in cases {
        let r = get(&c, &format!("/v1/health/service/web{q}"));
        assert_eq!((r.status, r.body.as_str()), (*code, *body), "{q}");
    }
    for q in ["?dc=dc1", "?partition=default", "?stale", "?consistent", "?cached", "?wait=1m30s", "?pretty"] {
        assert_eq!(get(&c, &format!("/v1/health/service/web{q}")).status, 200, "{q}");
    }
    let r = get(&c, "/v1/health/service/");
    assert_eq!((r.status, r.body.as_str()), (400, "Missing service name"));
    for f in ["foo", "Service.Nope == \"x\"", "Service.Tags contains", "\"a\" in"] {
        let r = get(&c, &format!("/v1/health/service/web?filter={}", urlencode(f)));
        assert_eq!(r.status, 400, "{f}");
        assert!(r.body.starts_with("Failed to create boolean expression evaluator: "), "{f}: {}", r.body);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn tag_and_filter_selection() {
    let c = ConsulDouble::start();
    c.register(Instance::new("n1", "a", "web", "10.0.0.1", 80).tags(&["canary", "v2"]).meta("version", "2"));
    c.register(Instance::new("n2", "b", "web", "10.0.0.2", 80).tags(&["canary"]).meta("version", "1"));
    c.register(Instance::new("n3", "c", "web", "10.0.0.3", 80).tags(&["stable"]));
    let f = |expr: &str| get(&c, &format!("/v1/health/service/web?filter={}", urlencode(expr))).ids();
    assert_eq!(f("\"canary\" in Service.Tags"), vec!["a", "b"]);
    assert_eq!(f("Service.Tags contains \"canary\" and Service.Meta.version == \"2\""), vec!["a"]);
    assert_eq!(f("Service.Meta.version == \"1\" or Service.Tags contains \"stable\""), vec!["b", "c"]);
    assert_eq!(f("not (\"canary\" in Service.Tags)"), vec!["c"]);
    assert_eq!(f("Node.Node == \"n2\""), vec!["b"]);
    assert_eq!(get(&c, "/v1/health/service/web?tag=canary&tag=V2").ids(), vec!["a"], "all tags, case-insensitive");
    let rows = get(&c, "/v1/catalog/service/web?tag=canary").json();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    let r = get(&c, &format!("/v1/catalog/services?filter={}", urlencode("ServiceTags contains \"stable\"")));
    let j = r.json();
    assert_eq!(j.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["web"]);
    assert_eq!(j["web"], serde_json::json!(["stable"]));
}

#[test]
fn go_durations() {
    let s = 1_000_000_000i128;
    for (text, ns) in [
        ("10s", 10 * s),
        ("5m", 300 * s),
        ("1m30s", 90 * s),
        ("5000ms", 5 * s),
        ("300000ms", 300 * s),
        ("1ms", 1_000_000),
        ("1.5h", 5400 * s),
        ("0", 0),
        ("-1s", -s),
        ("1µs", 1000),
        ("2h45m", 9900 * s),
    ] {
        assert_eq!(parse_go_duration(text), Some(ns), "{text}");
    }
    for bad in ["", "abc", "10", "1x", ".s", "1.5.3s", "s", "--1s"] {
        assert_eq!(parse_go_duration(bad), None, "{bad}");
    }
}

// ---------------------------------------------------------------- wire format

#[test]
fn wire_format_headers_and_json_shapes() {
    let c = ConsulDouble::start();
    c.register(
        Instance::new("n1", "web-1", "web", "10.0.0.1", 8080)
            .service_address("")
            .tags(&["a"])
            .weights(10, 1),
    );
    c.register(Instance::new("n1", "api-1", "api", "10.0.0.1", 9090));
    let raw = raw_exchange(
        c.addr,
        b"GET /v1/health/service/web HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    for h in [
        "X-Consul-Index: ",
        "X-Consul-Knownleader: true",
        "X-Consul-Lastcontact: 0",
        "X-Consul-Effective-Consistency: leader",
        "X-Consul-Default-Acl-Policy: allow",
        "Content-Type: application/json",
    ] {
        assert!(raw.contains(h), "missing {h:?} in\n{raw}");
    }
    assert_eq!(get(&c, "/v1/health/service/web?stale").h("x-consul-effective-consistency").as_deref(), Some("stale"));
    assert_eq!(
        get(&c, "/v1/health/service/web?consistent").h("x-consul-effective-consistency").as_deref(),
        Some("consistent")
    );
    let cached = get(&c, "/v1/health/service/web?cached");
    assert_eq!(cached.h("x-cache").as_deref(), Some("MISS"));
    assert_eq!(get(&c, "/v1/health/service/web?cached").h("x-cache").as_deref(), Some("HIT"));

    let r = get(&c, "/v1/health/service/web");
    let e = &r.entries()[0];
    assert_eq!(e["Node"]["Address"], "10.0.0.1");
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    assert_eq!(e["Node"]["TaggedAddresses"]["lan_ipv4"], "10.0.0.1");
    assert!(e["Node"]["ID"].as_str().unwrap().len() == 36);
    assert_eq!(e["Service"]["Address"], "");
    assert_eq!(e["Service"]["Port"], 8080);
    assert_eq!(e["Service"]["Tags"], serde_json::json!(["a"]));
    assert_eq!(e["Service"]["Weights"], serde_json::json!({"Passing": 10, "Warning": 1}));
    assert_eq!(e["Service"]["EnableTagOverride"], false);
    let checks = e["Checks"].as_array().unwrap();
    let ids: Vec<&str> = checks.iter().map(|c| c["CheckID"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2, "node checks and this instance's checks only: {ids:?}");
    assert!(ids.contains(&"serfHealth") && ids.contains(&"service:web-1"));
    let serf = checks.iter().find(|c| c["CheckID"] == "serfHealth").unwrap();
    assert_eq!(serf["ServiceID"], "");
    for k in ["Node", "Name", "Status", "Notes", "Output", "ServiceName", "ServiceTags", "Type", "CreateIndex", "ModifyIndex"] {
        assert!(serf.get(k).is_some(), "check field {k}");
    }
    let api = &get(&c, "/v1/health/service/api").entries()[0];
    assert_eq!(api["Service"]["Weights"], serde_json::json!({"Passing": 1, "Warning": 1}), "default weights");

    let row = &get(&c, "/v1/catalog/service/web").json()[0];
    assert_eq!(row["ServiceAddress"], "");
    assert_eq!(row["Address"], "10.0.0.1");
    assert_eq!(row["ServicePort"], 8080);
    assert_eq!(row["ServiceWeights"]["Passing"], 10);
    assert_eq!(row["ServiceTags"], serde_json::json!(["a"]));
    assert_eq!(row["Node"], "n1");

    assert_eq!(get(&c, "/v1/status/leader").body, "\"127.0.0.1:8300\"");
    let me = get(&c, "/v1/agent/self").json();
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    assert_eq!(me["Config"]["NodeName"], NODE_NAME);
    assert_eq!(me["Config"]["Version"], VERSION);

    let r = get(&c, "/v1/nope");
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    assert!(get(&c, "/v1/health/service/web?pretty").body.contains("\n    "));
}

#[test]
fn gzip_for_large_bodies_when_accepted() {
    let c = ConsulDouble::start();
    web(&c, 12);
    let url = format!("{}/v1/health/service/web", c.url());
    let raw_client = reqwest::blocking::Client::builder().no_gzip().no_proxy().build().unwrap();
    let r = raw_client.get(&url).header("Accept-Encoding", "gzip").send().unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.headers()["vary"], "Accept-Encoding");
    let plain = gunzip_stored(&r.bytes().unwrap()).expect("valid gzip");
    let v: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 12);
    // A real inflater (reqwest's gzip support) reads it too.
    let decoded = get(&c, "/v1/health/service/web");
    assert_eq!(decoded.entries().len(), 12);
    let r = raw_client.get(&url).send().unwrap();
    assert!(r.headers().get("content-encoding").is_none(), "not without Accept-Encoding");
    let r = raw_client.get(format!("{}/v1/status/leader", c.url())).header("Accept-Encoding", "gzip").send().unwrap();
    assert!(r.headers().get("content-encoding").is_none(), "not below 1400 bytes");
}

// ---------------------------------------------------------------- connections

#[test]
fn connection_counts_and_per_client_limit() {
    let c = ConsulDouble::start();
    c.set_max_conns_per_client(3);
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(c.addr).unwrap()).collect();
    assert!(wait_until(Duration::from_secs(2), || c.open_connections() == 3));
    let mut extra = TcpStream::connect(c.addr).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = String::new();
    let _ = extra.read_to_string(&mut buf);
    assert!(buf.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{buf:?}");
    assert!(buf.ends_with(CONNLIMIT_TEXT));
    assert!(c.max_open_connections() >= 4);
    drop(held);
    drop(extra);
    assert!(wait_until(Duration::from_secs(2), || c.open_connections() == 0));
}

#[test]
fn stop_refuses_connections_and_restart_serves_the_same_state_on_the_same_port() {
    let mut c = ConsulDouble::start();
    web(&c, 2);
    let before = get(&c, "/v1/health/service/web");
    let i = before.index();
    let url = format!("{}/v1/health/service/web?index={i}&wait=10s", c.url());
    let h = std::thread::spawn(move || http(Duration::from_secs(15)).get(url).send().map(|r| r.status().as_u16()));
    wait_held(&c, 1);
    let addr = c.addr;
    c.stop();
    assert!(h.join().unwrap().is_err(), "the held query's connection is closed");
    assert!(TcpStream::connect(addr).is_err(), "connection refused while stopped");
    assert!(wait_until(Duration::from_secs(2), || c.held_queries() == 0 && c.open_connections() == 0));
    c.register(Instance::new("n3", "web-3", "web", "10.0.0.3", 8080)); // state changes while down
    c.restart();
    assert_eq!(c.addr, addr);
    let after = get(&c, "/v1/health/service/web");
    assert_eq!(after.ids(), vec!["web-1", "web-2", "web-3"]);
    assert!(after.index() > i);
}

#[test]
fn requests_are_recorded_with_timing_and_status() {
    let c = ConsulDouble::start();
    web(&c, 1);
    get_with(&c, "/v1/health/service/web?stale&passing", &[("X-Consul-Token", "t1")]);
    put(&c, "/v1/agent/check/pass/nope", "");
    let rec = c.requests();
    assert_eq!(rec.len(), 2);
    assert_eq!(rec[0].method, "GET");
    assert_eq!(rec[0].path, "/v1/health/service/web");
    assert_eq!(rec[0].query, "stale&passing");
    assert_eq!(rec[0].header("X-Consul-Token"), Some("t1"));
    assert!(rec[0].headers.iter().all(|(k, _)| k == &k.to_lowercase()));
    assert_eq!(rec[0].token().as_deref(), Some("t1"));
    assert!(!rec[0].has_param("token"));
    assert_eq!(rec[0].status, Some(200));
    assert!(rec[0].answered.unwrap() >= rec[0].received);
    assert_eq!((rec[1].method.as_str(), rec[1].status), ("PUT", Some(404)));
    c.clear_requests();
    assert!(c.requests().is_empty());

    // A request in flight survives clear_requests and is completed in place.
    let i = c.index_of("web");
    let h = spawn_get(&c, &format!("/v1/health/service/web?index={i}&wait=10s"));
    wait_held(&c, 1);
    c.clear_requests();
    let rec = c.requests();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].status, None);
    c.register(Instance::new("n2", "web-2", "web", "10.0.0.2", 8080));
    let _ = h.join().unwrap();
    assert!(wait_until(Duration::from_secs(1), || c.requests()[0].status == Some(200)));
}

#[test]
fn a_client_that_gives_up_releases_its_held_query_and_connection() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let i = get(&c, "/v1/health/service/web").index();
    let url = format!("{}/v1/health/service/web?index={i}&wait=10s", c.url());
    let r = http(Duration::from_millis(300)).get(url).send();
    assert!(r.is_err(), "client timed out");
    assert!(wait_until(Duration::from_secs(2), || c.held_queries() == 0 && c.open_connections() == 0));
}

#[test]
fn instances_are_keyed_by_node_and_id_and_order_is_shuffled() {
    let c = ConsulDouble::start();
    c.register(Instance::new("n1", "web", "web", "10.0.0.1", 80));
    c.register(Instance::new("n2", "web", "web", "10.0.0.2", 80));
    let e = get(&c, "/v1/health/service/web").entries();
    assert_eq!(e.len(), 2, "the same service ID on two nodes is two instances");
    c.deregister("n1", "web");
    let e = get(&c, "/v1/health/service/web").entries();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0]["Node"]["Node"], "n2");

    web(&c, 6);
    let order = || -> Vec<String> {
        get(&c, "/v1/health/service/web")
            .entries()
            .iter()
            .map(|e| format!("{}/{}", e["Node"]["Node"], e["Service"]["ID"]))
            .collect()
    };
    let first = order();
    assert!((0..30).any(|_| order() != first), "entry order never changed in 30 reads");
}

// ---------------------------------------------------------------- /v1/health/state

/// (ServiceName, CheckID) → (Status, ModifyIndex) of a `/v1/health/state` body.
fn check_map(r: &Resp) -> std::collections::BTreeMap<(String, String), (String, u64)> {
    r.entries()
        .iter()
        .map(|c| {
            (
                (
                    format!("{}/{}", c["Node"].as_str().unwrap(), c["ServiceName"].as_str().unwrap()),
                    c["CheckID"].as_str().unwrap().to_string(),
                ),
                (c["Status"].as_str().unwrap().to_string(), c["ModifyIndex"].as_u64().unwrap()),
            )
        })
        .collect()
}

fn check_ids(r: &Resp) -> Vec<String> {
    r.entries()
        .iter()
        .map(|c| format!("{}:{}", c["Node"].as_str().unwrap(), c["CheckID"].as_str().unwrap()))
        .collect()
}

#[test]
fn health_state_blocks_on_the_checks_index_a_flip_anywhere_wakes_a_no_op_does_not() {
    let c = ConsulDouble::start();
    web(&c, 2);
    c.register(Instance::new("n9", "api-1", "api", "10.0.0.9", 9090));
    let r = get(&c, "/v1/health/state/any");
    let i = r.index();
    assert_eq!(i, c.checks_index(), "X-Consul-Index is the checks-table index");

    // Writes that change no check: no-op writes, and catalog changes that
    // leave every check as it was (a port change moves the services index).
    let t = Instant::now();
    let h = spawn_get(&c, &format!("/v1/health/state/any?index={i}&wait=1s"));
    wait_held(&c, 1);
    let raft = c.raft_index();
    let services = c.services_index();
    c.set_health("n1", "web-1", "passing"); // already passing
    c.set_node_health("n2", "passing"); // already passing
    c.register(Instance::new("n9", "api-1", "api", "10.0.0.9", 9090)); // identical
    c.set_maintenance("n1", "web-1", false); // not in maintenance
    c.register(Instance::new("n9", "api-1", "api", "10.0.0.9", 9191)); // port only
    assert!(c.raft_index() >= raft + 5, "each write consumed a Raft index");
    assert!(c.services_index() > services, "the port change moved the services table");
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(c.held_queries(), 1, "no check changed: still held");
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) >= Duration::from_secs(1), "woken early after {:?}", at.duration_since(t));
    assert_eq!(r.index(), i, "a timed-out query returns the same index");
    assert_eq!(c.checks_index(), i);

    // A health flip of any service wakes it at once.
    for (k, flip) in [
        ("service check of api", Box::new(|c: &ConsulDouble| c.set_health("n9", "api-1", "critical")) as Box<dyn Fn(&ConsulDouble)>),
        ("service check of web", Box::new(|c: &ConsulDouble| c.set_health("n2", "web-2", "warning"))),
        ("node check", Box::new(|c: &ConsulDouble| c.set_node_health("n1", "critical"))),
        ("maintenance on", Box::new(|c: &ConsulDouble| c.set_maintenance("n1", "web-1", true))),
        ("maintenance off", Box::new(|c: &ConsulDouble| c.set_maintenance("n1", "web-1", false))),
        ("output only", Box::new(|c: &ConsulDouble| c.set_check_output("n9", "api-1", "dial tcp: refused"))),
    ] {
        let before = c.checks_index();
        let h = spawn_get(&c, &format!("/v1/health/state/any?index={before}&wait=10s"));
        wait_held(&c, 1);
        let t = Instant::now();
        flip(&c);
        let (r, at) = h.join().unwrap();
        assert!(at.duration_since(t) < Duration::from_millis(500), "{k}: woke after {:?}", at.duration_since(t));
        assert!(r.index() > before, "{k}");
        assert_eq!(r.index(), c.checks_index(), "{k}");
        assert_eq!(r.index(), c.raft_index(), "{k}: the index of the write that changed the check");
    }
    let r = get(&c, "/v1/health/state/critical");
    assert_eq!(check_ids(&r), vec!["n1:serfHealth", "n9:service:api-1"]);
}

#[test]
fn health_state_moves_on_registration_and_deregistration_of_checks() {
    let c = ConsulDouble::start();
    web(&c, 1);
    let i = get(&c, "/v1/health/state/any").index();

    // A new instance on a new node: its service check and the node's serfHealth.
    let h = spawn_get(&c, &format!("/v1/health/state/any?index={i}&wait=10s"));
    wait_held(&c, 1);
    c.register(Instance::new("n2", "db-1", "db", "10.0.0.2", 5432));
    let (r, _) = h.join().unwrap();
    let j = r.index();
    assert!(j > i);
    let ids = check_ids(&r);
    assert!(ids.contains(&"n2:service:db-1".to_string()) && ids.contains(&"n2:serfHealth".to_string()), "{ids:?}");
    let db = r.entries().into_iter().find(|c| c["CheckID"] == "service:db-1").unwrap();
    assert_eq!((db["CreateIndex"].as_u64(), db["ModifyIndex"].as_u64()), (Some(j), Some(j)));

    // A second instance on an existing node: only its service check is new.
    let h = spawn_get(&c, &format!("/v1/health/state/any?index={j}&wait=10s"));
    wait_held(&c, 1);
    c.register(Instance::new("n2", "db-2", "db", "10.0.0.2", 5433));
    let (r, _) = h.join().unwrap();
    let k = r.index();
    assert!(k > j);
    assert!(check_ids(&r).contains(&"n2:service:db-2".to_string()));

    // Deregistration removes the instance's checks.
    let h = spawn_get(&c, &format!("/v1/health/state/any?index={k}&wait=10s"));
    wait_held(&c, 1);
    c.deregister("n2", "db-1");
    let (r, _) = h.join().unwrap();
    let l = r.index();
    assert!(l > k);
    assert!(!check_ids(&r).contains(&"n2:service:db-1".to_string()));

    // Through the agent API: register with a check, TTL pass, deregister.
    let h = spawn_get(&c, &format!("/v1/health/state/any?index={l}&wait=10s"));
    wait_held(&c, 1);
    let body = r#"{"Name":"lb","ID":"lb-1","Port":8080,"Check":{"TTL":"30s"}}"#;
    assert_eq!(put(&c, "/v1/agent/service/register", body).status, 200);
    let (r, _) = h.join().unwrap();
    let m = r.index();
    assert!(m > l);
    let lb = r.entries().into_iter().find(|c| c["CheckID"] == "service:lb-1").unwrap();
    assert_eq!((lb["Node"].as_str(), lb["Status"].as_str()), (Some(NODE_NAME), Some("critical")));
    assert_eq!(put(&c, "/v1/agent/service/register", body).status, 200, "identical re-registration");
    assert_eq!(c.checks_index(), m, "an identical re-registration moves no check");
    assert_eq!(put(&c, "/v1/agent/check/pass/service:lb-1", "").status, 200);
    let n = c.checks_index();
    assert!(n > m);
    // Output-only change: reaches the catalog (and the checks index) only
    // after check_update_interval's deferral.
    c.set_check_update_interval(Duration::from_millis(200));
    assert_eq!(put(&c, "/v1/agent/check/pass/service:lb-1?note=busy", "").status, 200);
    assert_eq!(c.checks_index(), n, "deferred");
    let h = spawn_get(&c, &format!("/v1/health/state/passing?index={n}&wait=10s"));
    let (r, _) = h.join().unwrap();
    assert!(r.index() > n);
    let lb = r.entries().into_iter().find(|c| c["CheckID"] == "service:lb-1").unwrap();
    assert_eq!((lb["Output"].as_str(), lb["ModifyIndex"].as_u64()), (Some("busy"), Some(r.index())));
    let n = r.index();
    assert_eq!(put(&c, "/v1/agent/service/deregister/lb-1", "").status, 200);
    assert!(c.checks_index() > n);
    assert!(!check_ids(&get(&c, "/v1/health/state/any")).contains(&format!("{NODE_NAME}:service:lb-1")));
}

#[test]
fn health_state_per_check_modify_index_tells_which_service_changed() {
    let c = ConsulDouble::start();
    web(&c, 2);
    c.register(Instance::new("n3", "api-1", "api", "10.0.0.3", 9090));
    let before = get(&c, "/v1/health/state/any");
    let a = check_map(&before);
    let creates: Vec<u64> = before.entries().iter().map(|c| c["CreateIndex"].as_u64().unwrap()).collect();
    c.set_health("n2", "web-2", "critical");
    let after = get(&c, "/v1/health/state/any");
    let b = check_map(&after);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "same checks");
    let changed: Vec<_> = b.iter().filter(|(k, v)| a.get(*k) != Some(*v)).collect();
    assert_eq!(changed.len(), 1, "exactly one check changed: {changed:?}");
    let ((svc, cid), (status, modify)) = changed[0];
    assert_eq!((svc.as_str(), cid.as_str(), status.as_str()), ("n2/web", "service:web-2", "critical"));
    assert!(*modify > a[&(svc.clone(), cid.clone())].1);
    assert_eq!(*modify, after.index(), "the changed check carries the new X-Consul-Index");
    let creates_after: Vec<u64> = after.entries().iter().map(|c| c["CreateIndex"].as_u64().unwrap()).collect();
    assert_eq!(creates, creates_after, "CreateIndex never moves");
    let max_modify = after.entries().iter().map(|c| c["ModifyIndex"].as_u64().unwrap()).max().unwrap();
    assert_eq!(max_modify, after.index());

    // Back to passing: the ModifyIndex moves again.
    c.set_health("n2", "web-2", "passing");
    let again = check_map(&get(&c, "/v1/health/state/any"));
    let key = ("n2/web".to_string(), "service:web-2".to_string());
    assert_eq!(again[&key].0, "passing");
    assert!(again[&key].1 > *modify);
}

#[test]
fn health_state_filters_by_state_and_has_go_shapes() {
    let c = ConsulDouble::start();
    assert_eq!(get(&c, "/v1/health/state/critical").body, "[]", "empty is [] not null");
    web(&c, 3);
    c.set_health("n2", "web-2", "warning");
    c.set_maintenance("n3", "web-3", true);

    let any = get(&c, "/v1/health/state/any");
    assert_eq!(
        check_ids(&any),
        vec![
            format!("{NODE_NAME}:serfHealth"),
            "n1:serfHealth".into(),
            "n1:service:web-1".into(),
            "n2:serfHealth".into(),
            "n2:service:web-2".into(),
            "n3:_service_maintenance:web-3".into(),
            "n3:serfHealth".into(),
            "n3:service:web-3".into(),
        ],
        "every check in the datacenter, by node then check ID"
    );
    let passing = get(&c, "/v1/health/state/passing");
    assert_eq!(passing.entries().len(), 6);
    assert!(passing.entries().iter().all(|c| c["Status"] == "passing"));
    assert_eq!(check_ids(&get(&c, "/v1/health/state/warning")), vec!["n2:service:web-2"]);
    assert_eq!(check_ids(&get(&c, "/v1/health/state/critical")), vec!["n3:_service_maintenance:web-3"]);
    for s in ["passing", "warning", "critical"] {
        assert_eq!(get(&c, &format!("/v1/health/state/{s}")).index(), any.index(), "{s}: same checks-table index");
    }

    let e = any.entries();
    let serf = e.iter().find(|c| c["Node"] == "n1" && c["CheckID"] == "serfHealth").unwrap();
    assert_eq!(serf["Name"], "Serf Health Status");
    assert_eq!(serf["ServiceID"], "");
    assert_eq!(serf["ServiceName"], "");
    assert_eq!(serf["ServiceTags"], serde_json::json!([]));
    assert_eq!(serf["Definition"], serde_json::json!({}));
    for k in [
        "Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID", "ServiceName", "ServiceTags", "Type",
        "Definition", "CreateIndex", "ModifyIndex",
    ] {
        assert!(e.iter().all(|c| c.get(k).is_some()), "field {k}");
    }
    let svc = e.iter().find(|c| c["CheckID"] == "service:web-1").unwrap();
    assert_eq!((svc["ServiceID"].as_str(), svc["ServiceName"].as_str()), (Some("web-1"), Some("web")));
    let maint = e.iter().find(|c| c["CheckID"] == "_service_maintenance:web-3").unwrap();
    assert_eq!((maint["Status"].as_str(), maint["ServiceName"].as_str()), (Some("critical"), Some("web")));

    // filter and node-meta, like the other read endpoints.
    let f = |expr: &str| check_ids(&get(&c, &format!("/v1/health/state/any?filter={}", urlencode(expr))));
    assert_eq!(f("ServiceID == \"web-2\""), vec!["n2:service:web-2"]);
    assert_eq!(f("ServiceName == \"web\" and Status != \"passing\"").len(), 2);
    assert_eq!(f("CheckID == \"serfHealth\"").len(), 4);
    assert_eq!(f("ServiceName is empty and Node == \"n3\""), vec!["n3:serfHealth"]);
    for bad in ["Nope == \"x\"", "Definition.HTTP == \"x\"", "Status =="] {
        let r = get(&c, &format!("/v1/health/state/any?filter={}", urlencode(bad)));
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.body.starts_with("Failed to create boolean expression evaluator: "), "{bad}: {}", r.body);
    }
    let r = get(&c, "/v1/health/state/any?node-meta=consul-version:1.19.0");
    assert_eq!(check_ids(&r), vec![format!("{NODE_NAME}:serfHealth")]);

    // Wire details.
    let r = get(&c, "/v1/health/state/any?stale");
    assert_eq!(r.h("x-consul-effective-consistency").as_deref(), Some("stale"));
    assert_eq!(r.h("x-consul-knownleader").as_deref(), Some("true"));
    assert_eq!(r.h("content-type").as_deref(), Some("application/json"));
    let r = get(&c, "/v1/health/state/any?cached");
    assert_eq!(r.status, 200);
    assert_eq!(r.h("x-cache"), None, "no agent cache for this endpoint");
    assert_eq!(r.h("x-consul-effective-consistency").as_deref(), Some("leader"));
    assert!(get(&c, "/v1/health/state/any?pretty").body.contains("\n    "));
}

#[test]
fn health_state_bad_state_and_bad_parameters() {
    let c = ConsulDouble::start();
    web(&c, 1);
    for bad in ["bogus", "PASSING", "Any", "maintenance", "passing/extra", "ok"] {
        let r = get(&c, &format!("/v1/health/state/{bad}"));
        assert_eq!((r.status, r.body.clone()), (400, format!("Invalid check status: \"{bad}\"")), "{bad}");
        assert_eq!(r.h("x-consul-index"), None);
    }
    let r = get(&c, "/v1/health/state/");
    assert_eq!((r.status, r.body.as_str()), (400, "Missing check state"));
    let cases: &[(&str, u16, &str)] = &[
        ("?index=1&wait=abc", 400, "Invalid wait time"),
        ("?index=abc", 400, "Invalid index"),
        ("?stale&consistent", 400, "Cannot specify ?stale with ?consistent, conflicting semantics."),
        ("?cached&consistent", 400, "Cannot specify ?cached with ?consistent, conflicting semantics."),
        ("?dc=dc2", 500, "No path to datacenter"),
        ("?ns=team", 400, "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature"),
    ];
    for (q, code, body) in cases {
        let r = get(&c, &format!("/v1/health/state/any{q}"));
        assert_eq!((r.status, r.body.as_str()), (*code, *body), "{q}");
    }
    for q in ["?dc=dc1", "?consistent", "?wait=1m30s", "?passing", "?near=_agent"] {
        assert_eq!(get(&c, &format!("/v1/health/state/passing{q}")).status, 200, "{q}");
    }
    let r = put(&c, "/v1/health/state/any", "");
    assert_eq!(r.status, 405);
    assert_eq!(r.h("allow").as_deref(), Some("OPTIONS,GET"));
}

#[test]
fn health_state_acl_faults_and_reset() {
    let c = ConsulDouble::start();
    web(&c, 2);
    let all = get(&c, "/v1/health/state/any").entries().len();
    assert_eq!(all, 5);

    // ACLs: node checks need node:read, service checks service:read too.
    c.require_token(Some("root"));
    c.add_limited_token("weak");
    let r = get_with(&c, "/v1/health/state/any", &[("X-Consul-Token", "root")]);
    assert_eq!(r.entries().len(), all);
    assert_eq!(r.h("x-consul-results-filtered-by-acls"), None);
    let r = get_with(&c, "/v1/health/state/any", &[("X-Consul-Token", "weak")]);
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
    assert_eq!(r.h("x-consul-results-filtered-by-acls").as_deref(), Some("true"));
    assert_eq!(r.index(), c.checks_index(), "ACL filtering does not change the index");
    let r = get(&c, "/v1/health/state/any");
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
    assert_eq!(r.h("x-consul-results-filtered-by-acls"), None, "masked for anonymous");
    let r = get_with(&c, "/v1/health/state/any", &[("X-Consul-Token", "wrong")]);
    assert_eq!((r.status, r.body.as_str()), (403, "ACL not found"));
    let r = get_with(
        &c,
        &format!("/v1/health/state/any?filter={}", urlencode("Status == \"nope\"")),
        &[("X-Consul-Token", "weak")],
    );
    assert_eq!(r.h("x-consul-results-filtered-by-acls"), None, "the filter ran before ACL filtering");
    c.require_token(None);

    // Faults.
    c.fault(Fault::Status(500));
    let r = get(&c, "/v1/health/state/any");
    assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
    c.fault(Fault::Garbage);
    let r = get(&c, "/v1/health/state/any");
    assert_eq!(r.status, 200);
    assert!(r.index() >= 1);
    assert!(serde_json::from_str::<Value>(&r.body).is_err(), "{}", r.body);
    c.fault(Fault::WrongTypes);
    let e = get(&c, "/v1/health/state/any").entries();
    assert_eq!(e.iter().filter(|x| x["CheckID"] == "service:web-1").count(), 2, "duplicates");
    assert!(e.iter().any(|x| x["Status"].is_number()));
    assert!(e.iter().any(|x| x["ModifyIndex"].is_string()));
    assert!(e.iter().any(|x| x.is_null()));
    c.fault(Fault::IndexZero);
    assert_eq!(get(&c, "/v1/health/state/any").h("x-consul-index").as_deref(), Some("0"));
    c.fault(Fault::IndexMissing);
    assert_eq!(get(&c, "/v1/health/state/any").h("x-consul-index"), None);
    c.fault(Fault::NoLeader);
    assert_eq!(get(&c, "/v1/health/state/any").status, 500);
    assert_eq!(get(&c, "/v1/health/state/any?cached").status, 500, "no cache to answer from");
    let r = get(&c, "/v1/health/state/any?stale");
    assert_eq!(r.status, 200);
    assert_eq!(r.h("x-consul-knownleader").as_deref(), Some("false"));
    c.fault(Fault::None);

    // A fault releases a held query.
    let i = get(&c, "/v1/health/state/any").index();
    let h = spawn_get(&c, &format!("/v1/health/state/any?index={i}&wait=10s"));
    wait_held(&c, 1);
    c.fault(Fault::Status(503));
    let (r, _) = h.join().unwrap();
    assert_eq!(r.status, 503);
    c.fault(Fault::None);

    // Snapshot restore: released at once with the old answer and index;
    // the next read has a lower index and the same checks.
    let r = get(&c, "/v1/health/state/any");
    let i = r.index();
    let before = check_ids(&r);
    let h = spawn_get(&c, &format!("/v1/health/state/any?index={i}&wait=10s"));
    wait_held(&c, 1);
    let t = Instant::now();
    c.reset_indexes();
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) < Duration::from_millis(500));
    assert_eq!(r.index(), i);
    assert_eq!(check_ids(&r), before);
    let r = get(&c, "/v1/health/state/any");
    assert!(r.index() < i && r.index() >= 2, "{} vs {i}", r.index());
    assert_eq!(check_ids(&r), before);
    assert!(r.entries().iter().all(|c| c["ModifyIndex"].as_u64().unwrap() <= r.index()));
    let low = r.index();
    c.set_health("n1", "web-1", "critical");
    assert!(get(&c, "/v1/health/state/any").index() > low);
}

// ---------------------------------------------------------------- KV [5.5]

fn put_bytes(c: &ConsulDouble, path: &str, body: Vec<u8>) -> Resp {
    send(http(Duration::from_secs(15)).put(format!("{}{path}", c.url())).body(body))
}

fn delete(c: &ConsulDouble, path: &str) -> Resp {
    send(http(Duration::from_secs(15)).delete(format!("{}{path}", c.url())))
}

/// The only entry of a single-key read.
fn kv_entry(r: &Resp) -> Value {
    let e = r.entries();
    assert_eq!(e.len(), 1, "{}", r.body);
    e[0].clone()
}

/// The `Key`s of a `?recurse` read, in answer order.
fn kv_keys(r: &Resp) -> Vec<String> {
    r.entries().iter().map(|e| e["Key"].as_str().unwrap().to_string()).collect()
}

/// `c` stays with `n` held queries for `d` (a bounded negative check).
fn still_held(c: &ConsulDouble, n: usize, d: Duration) -> bool {
    !wait_until(d, || c.held_queries() != n)
}

#[test]
fn kv_base64_is_go_std_encoding_with_padding() {
    // RFC 4648 test vectors, and bytes that use '+' and '/'.
    for (raw, b64) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_encode(raw.as_bytes()), b64, "{raw:?}");
    }
    assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
}

#[test]
fn kv_put_get_delete_round_trip_with_indexes() {
    let c = ConsulDouble::start();
    let raft = c.raft_index();
    let r = put(&c, "/v1/kv/app/config", "v1");
    assert_eq!((r.status, r.body.as_str()), (200, "true"));
    assert_eq!(r.h("content-type").as_deref(), Some("application/json"));
    assert_eq!(c.raft_index(), raft + 1, "one Raft write");
    let r = get(&c, "/v1/kv/app/config");
    assert_eq!(r.status, 200);
    let e = kv_entry(&r);
    assert_eq!(e["Key"], "app/config");
    assert_eq!(e["Value"], "djE=", "base64 of v1");
    assert_eq!((e["Flags"].as_u64(), e["LockIndex"].as_u64()), (Some(0), Some(0)));
    assert!(e.get("Session").is_none(), "no session, no field: {e}");
    let created = e["CreateIndex"].as_u64().unwrap();
    assert_eq!(e["ModifyIndex"].as_u64(), Some(created));
    assert_eq!(created, raft + 1);
    assert_eq!(r.index(), created, "a key's index is its ModifyIndex");
    assert_eq!(c.kv_indexes("app/config"), Some((created, created)));

    // An update keeps CreateIndex and moves ModifyIndex; flags are stored.
    let r = put(&c, "/v1/kv/app/config?flags=42", "v2");
    assert_eq!(r.body, "true");
    let e = kv_entry(&get(&c, "/v1/kv/app/config"));
    let modified = e["ModifyIndex"].as_u64().unwrap();
    assert!(modified > created);
    assert_eq!((e["CreateIndex"].as_u64(), e["Flags"].as_u64()), (Some(created), Some(42)));
    assert_eq!(e["Value"], "djI=");

    // The same value and flags again: a Raft write that changes nothing
    // (Consul 1.6+), so the key keeps its ModifyIndex.
    let raft = c.raft_index();
    assert_eq!(put(&c, "/v1/kv/app/config?flags=42", "v2").body, "true");
    assert_eq!(c.raft_index(), raft + 1);
    assert_eq!(get(&c, "/v1/kv/app/config").index(), modified);
    // Other flags are a change.
    put(&c, "/v1/kv/app/config", "v2");
    assert!(get(&c, "/v1/kv/app/config").index() > modified);

    // An empty body is stored as no value: JSON null.
    put(&c, "/v1/kv/app/empty", "");
    assert_eq!(kv_entry(&get(&c, "/v1/kv/app/empty"))["Value"], Value::Null);
    assert_eq!(c.kv_get("app/empty"), Some(Vec::new()));

    // Delete: true, then a 404 with an empty body that still carries the
    // index headers.
    let r = delete(&c, "/v1/kv/app/config");
    assert_eq!((r.status, r.body.as_str()), (200, "true"));
    let deleted_at = c.raft_index();
    let r = get(&c, "/v1/kv/app/config");
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    assert_eq!(r.h("content-type"), None);
    assert_eq!(r.index(), deleted_at, "a missing key reports the KV table index: the delete");
    assert_eq!(r.h("x-consul-knownleader").as_deref(), Some("true"));
    assert_eq!(r.h("x-consul-lastcontact").as_deref(), Some("0"));
    // Deleting a missing key answers true and changes nothing.
    assert_eq!(delete(&c, "/v1/kv/app/config").body, "true");
    assert_eq!(get(&c, "/v1/kv/app/config").index(), deleted_at);

    // The helpers are Raft writes seen on the wire.
    let i = c.kv_put("app/helper", b"from a test");
    assert_eq!(i, c.raft_index());
    let e = kv_entry(&get(&c, "/v1/kv/app/helper"));
    assert_eq!(e["ModifyIndex"].as_u64(), Some(i));
    assert_eq!(e["Value"], base64_encode(b"from a test"));
    assert_eq!(c.kv_put("app/helper", b"from a test"), i, "identical: ModifyIndex kept");
    assert_eq!(c.kv_get("app/helper").as_deref(), Some(&b"from a test"[..]));
    c.kv_delete("app/helper");
    assert_eq!(c.kv_get("app/helper"), None);
    assert_eq!(get(&c, "/v1/kv/app/helper").status, 404);

    // Reads and writes are recorded, writes with their bodies.
    c.clear_requests();
    put(&c, "/v1/kv/app/rec?flags=7", "payload");
    get(&c, "/v1/kv/app/rec?raw");
    let rec = c.requests();
    assert_eq!(rec.len(), 2);
    assert_eq!(
        (rec[0].method.as_str(), rec[0].path.as_str(), rec[0].query.as_str()),
        ("PUT", "/v1/kv/app/rec", "flags=7")
    );
    assert_eq!(&rec[0].body[..], b"payload");
    assert_eq!((rec[1].method.as_str(), rec[1].query.as_str(), rec[1].status), ("GET", "raw", Some(200)));
    assert!(rec[1].body.is_empty());
}

#[test]
fn kv_missing_key_404_carries_the_index_and_a_held_read_wakes_when_it_is_created() {
    let c = ConsulDouble::start();
    let r = get(&c, "/v1/kv/cfg/flag");
    assert_eq!((r.status, r.index()), (404, 1), "an empty KV store: Consul's floor of 1");
    c.kv_put("cfg/other", b"x");
    let r = get(&c, "/v1/kv/cfg/flag");
    assert_eq!(r.status, 404);
    let i = r.index();
    assert_eq!(i, c.kv_index(""), "the KV table index");
    let t = Instant::now();
    let h = spawn_get(&c, &format!("/v1/kv/cfg/flag?index={i}&wait=10s"));
    wait_held(&c, 1);
    // Writes elsewhere move the table index but the key is still missing:
    // the result has not changed, so the query stays held.
    c.kv_put("cfg/other", b"y");
    c.kv_put("cfg/flag/sub", b"a key below is not the key");
    assert!(still_held(&c, 1, Duration::from_millis(300)));
    let created = c.kv_put("cfg/flag", b"on");
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) < Duration::from_secs(5));
    assert_eq!((r.status, r.index()), (200, created));
    assert_eq!(kv_entry(&r)["Value"], base64_encode(b"on"));

    // A held read on an existing key wakes when it is deleted: 404, higher index.
    let h = spawn_get(&c, &format!("/v1/kv/cfg/flag?index={created}&wait=10s"));
    wait_held(&c, 1);
    c.kv_put("cfg/other", b"z");
    assert!(still_held(&c, 1, Duration::from_millis(200)), "another key's write does not move this key's index");
    c.kv_delete("cfg/flag");
    let (r, _) = h.join().unwrap();
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    assert_eq!(r.index(), c.raft_index());
}

#[test]
fn kv_wait_timeout_returns_the_unchanged_index() {
    let c = ConsulDouble::start();
    let i = c.kv_put("cfg/a", b"1");
    let t = Instant::now();
    let h = spawn_get(&c, &format!("/v1/kv/cfg/a?index={i}&wait=1s"));
    wait_held(&c, 1);
    let (r, at) = h.join().unwrap();
    let took = at.duration_since(t);
    assert!(took >= Duration::from_secs(1), "returned after {took:?}");
    assert!(took < Duration::from_millis(1063 + 300), "returned after {took:?} (wait 1s + jitter ≤ 62.5ms)");
    assert_eq!((r.status, r.index()), (200, i));
    assert_eq!(kv_entry(&r)["Value"], base64_encode(b"1"));
    // The same for a prefix.
    let h = spawn_get(&c, &format!("/v1/kv/cfg/?recurse&index={i}&wait=500ms"));
    wait_held(&c, 1);
    let (r, _) = h.join().unwrap();
    assert_eq!((r.status, r.index(), kv_keys(&r)), (200, i, vec!["cfg/a".to_string()]));
}

#[test]
fn kv_recurse_blocks_on_the_prefix_a_write_under_it_wakes_one_outside_does_not() {
    let c = ConsulDouble::start();
    c.kv_put("svc/a", b"1");
    let b = c.kv_put("svc/b", b"2");
    c.kv_put("svcx", b"shares the prefix text, not the prefix");
    c.kv_put("other/x", b"3");
    let r = get(&c, "/v1/kv/svc/?recurse");
    assert_eq!(r.status, 200);
    assert_eq!(kv_keys(&r), vec!["svc/a", "svc/b"], "key order");
    assert_eq!(r.index(), b, "the highest ModifyIndex under the prefix");
    assert_eq!(c.kv_index("svc/"), b);

    let h = spawn_get(&c, &format!("/v1/kv/svc/?recurse&index={b}&wait=10s"));
    wait_held(&c, 1);
    c.kv_put("other/y", b"4");
    c.kv_put("svcx", b"changed");
    assert!(still_held(&c, 1, Duration::from_millis(300)), "writes outside the prefix");
    let n = c.kv_put("svc/c", b"5");
    let (r, _) = h.join().unwrap();
    assert_eq!(r.index(), n);
    assert_eq!(kv_keys(&r), vec!["svc/a", "svc/b", "svc/c"]);
    // A missing prefix is a 404 with an index, like a missing key.
    let r = get(&c, "/v1/kv/nothing/?recurse");
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    assert_eq!(r.index(), c.kv_index(""), "nothing under it: the table index");
    // The empty prefix lists everything.
    assert_eq!(kv_keys(&get(&c, "/v1/kv/?recurse")), vec!["other/x", "other/y", "svc/a", "svc/b", "svc/c", "svcx"]);
}

#[test]
fn kv_a_delete_wakes_a_prefix_and_tombstones_keep_its_index_until_gc() {
    let c = ConsulDouble::start();
    let a = c.kv_put("svc/a", b"1");
    let b = c.kv_put("svc/b", b"2");
    let h = spawn_get(&c, &format!("/v1/kv/svc/?recurse&index={b}&wait=10s"));
    wait_held(&c, 1);
    assert_eq!(delete(&c, "/v1/kv/svc/b").body, "true");
    let d = c.raft_index();
    let (r, _) = h.join().unwrap();
    assert_eq!((r.index(), kv_keys(&r)), (d, vec!["svc/a".to_string()]), "woken by the delete");
    // The tombstone holds the prefix at the delete's index, above every
    // live key, through writes elsewhere.
    c.kv_put("other/x", b"3");
    let r = get(&c, "/v1/kv/svc/?recurse");
    assert_eq!(r.index(), d);
    assert!(r.index() > a);
    assert_eq!(get(&c, "/v1/kv/svc/?keys").index(), d);
    assert_eq!(c.kv_tombstones(), 1);
    // A read held at that index is not released by the reap.
    let h = spawn_get(&c, &format!("/v1/kv/svc/?recurse&index={d}&wait=10s"));
    wait_held(&c, 1);
    let raft = c.raft_index();
    c.kv_gc_tombstones();
    assert_eq!((c.raft_index(), c.kv_tombstones()), (raft + 1, 0), "the reap is one Raft write");
    assert!(still_held(&c, 1, Duration::from_millis(200)));
    // Once reaped, the index goes back to the highest live key.
    let r = get(&c, "/v1/kv/svc/?recurse");
    assert_eq!((r.index(), kv_keys(&r)), (a, vec!["svc/a".to_string()]));
    assert!(r.index() < d, "went backwards: {} < {d}", r.index());
    let n = c.kv_put("svc/c", b"4");
    let (r, _) = h.join().unwrap();
    assert_eq!(r.index(), n);

    // A recursive delete leaves one tombstone, for the prefix.
    c.kv_put("tree/a/1", b"x");
    c.kv_put("tree/b/2", b"y");
    let r = delete(&c, "/v1/kv/tree/?recurse");
    assert_eq!(r.body, "true");
    let t = c.raft_index();
    assert_eq!(c.kv_tombstones(), 1);
    assert_eq!((c.kv_get("tree/a/1"), c.kv_get("tree/b/2")), (None, None));
    let r = get(&c, "/v1/kv/tree/?recurse");
    assert_eq!((r.status, r.index()), (404, t));
    // Deleting everything leaves no tombstone: the table index covers it.
    delete(&c, "/v1/kv/?recurse");
    assert_eq!(c.kv_tombstones(), 1);
    assert_eq!(get(&c, "/v1/kv/?keys").body, "[]");
    assert_eq!(c.kv_index(""), c.raft_index());
}

#[test]
fn kv_check_and_set_on_put_and_delete() {
    let c = ConsulDouble::start();
    // cas=0: only if absent.
    assert_eq!(put(&c, "/v1/kv/lock?cas=0", "first").body, "true");
    let i = c.kv_indexes("lock").unwrap().1;
    let raft = c.raft_index();
    assert_eq!(put(&c, "/v1/kv/lock?cas=0", "second").body, "false");
    assert_eq!(c.raft_index(), raft + 1, "a failed CAS is still a Raft write");
    assert_eq!(c.kv_get("lock").as_deref(), Some(&b"first"[..]));
    assert_eq!(get(&c, "/v1/kv/lock").index(), i, "a failed CAS moves nothing");
    // cas=N: only if the ModifyIndex is N.
    assert_eq!(put(&c, &format!("/v1/kv/lock?cas={}", i + 100), "wrong").body, "false");
    assert_eq!(put(&c, &format!("/v1/kv/nope?cas={i}"), "absent").body, "false", "cas>0 on a missing key");
    assert_eq!(c.kv_get("nope"), None);
    assert_eq!(put(&c, &format!("/v1/kv/lock?cas={i}&flags=3"), "third").body, "true");
    let e = kv_entry(&get(&c, "/v1/kv/lock"));
    assert_eq!((e["Value"].as_str(), e["Flags"].as_u64()), (Some("dGhpcmQ="), Some(3)));
    let j = e["ModifyIndex"].as_u64().unwrap();
    assert!(j > i);
    assert_eq!(put(&c, &format!("/v1/kv/lock?cas={i}"), "stale").body, "false", "the old index no longer matches");

    // DELETE: cas=0 never deletes; a wrong index does not; the right one does.
    assert_eq!(delete(&c, "/v1/kv/lock?cas=0").body, "false");
    assert_eq!(delete(&c, &format!("/v1/kv/lock?cas={i}")).body, "false");
    assert!(c.kv_get("lock").is_some());
    assert_eq!(delete(&c, &format!("/v1/kv/lock?cas={j}")).body, "true");
    assert_eq!(c.kv_get("lock"), None);
    // On a missing key Consul's CAS delete answers true: nothing is left to delete.
    assert_eq!(delete(&c, "/v1/kv/lock?cas=5").body, "true");
}

#[test]
fn kv_bad_requests_get_consul_texts_and_write_nothing() {
    let c = ConsulDouble::start();
    c.kv_put("k", b"v");
    let raft = c.raft_index();
    let r = put(&c, "/v1/kv/k?cas=0&acquire=s1", "x");
    assert_eq!((r.status, r.body.as_str()), (400, "Conflicting flags: acquire=s1&cas=0\n"));
    let r = put(&c, "/v1/kv/k?release=s1&acquire=s1", "x");
    assert_eq!((r.status, r.body.as_str()), (400, "Conflicting flags: acquire=s1&release=s1\n"));
    let r = delete(&c, "/v1/kv/k?recurse&cas=3");
    assert_eq!((r.status, r.body.as_str()), (400, "Conflicting flags: cas=3&recurse=\n"));
    let r = put(&c, "/v1/kv/k?flags=abc", "x");
    assert_eq!((r.status, r.body.as_str()), (500, "strconv.ParseUint: parsing \"abc\": invalid syntax"));
    let r = put(&c, "/v1/kv/k?cas=99999999999999999999", "x");
    assert_eq!(r.status, 500);
    assert_eq!(r.body, "strconv.ParseUint: parsing \"99999999999999999999\": value out of range");
    for path in ["/v1/kv/", "/v1/kv/?raw"] {
        let r = get(&c, path);
        assert_eq!((r.status, r.body.as_str()), (400, "Missing key name"), "{path}");
    }
    assert_eq!(put(&c, "/v1/kv/", "x").body, "Missing key name");
    assert_eq!(delete(&c, "/v1/kv/").body, "Missing key name");
    for (path, body) in [
        ("/v1/kv//lead", "key must not begin with a '/'"),
        (
            "/v1/kv/a%20b",
            "key contains invalid character ' ' at position 1. Only alphanumeric characters and ,-_./ are allowed",
        ),
        (
            "/v1/kv/cfg/x%3Dy",
            "key contains invalid character '=' at position 5. Only alphanumeric characters and ,-_./ are allowed",
        ),
        ("/v1/kv/cfg/routes.JSON", "key contains suspicious file extension '.json' that may be cached by proxies"),
        ("/v1/kv/a/..%2Fb", "URL path contains invalid traversal sequence"),
    ] {
        for r in [get(&c, path), put(&c, path, "x"), delete(&c, path)] {
            assert_eq!((r.status, r.body.as_str()), (400, body), "{path}");
        }
    }
    // Comma is in Consul's safe set; `./` alone is no traversal.
    assert_eq!(put(&c, "/v1/kv/a,b/./c", "ok").body, "true");
    let r = send(http(Duration::from_secs(5)).post(format!("{}/v1/kv/k", c.url())));
    assert_eq!(r.status, 405);
    assert_eq!(r.h("allow").as_deref(), Some("OPTIONS,GET,PUT,DELETE"));
    let r = put(&c, "/v1/kv/k?acquire=0d9f9d47-5b2d-4b5c-8c6a-9c1e2c3d4e5f", "x");
    assert_eq!(r.status, 500, "sessions are not modelled: {}", r.body);
    assert!(r.body.contains("does not model sessions"), "{}", r.body);
    let r = put(&c, "/v1/kv/k?stale&consistent", "x");
    assert_eq!((r.status, r.body.as_str()), (400, "Cannot specify ?stale with ?consistent, conflicting semantics."));
    assert_eq!(put(&c, "/v1/kv/k?dc=dc9", "x").body, "No path to datacenter");
    assert_eq!(c.raft_index(), raft + 1, "only the comma key was written");
    assert_eq!(c.kv_get("k").as_deref(), Some(&b"v"[..]));
}

#[test]
fn kv_values_over_512_kib_get_413_by_content_length() {
    let c = ConsulDouble::start();
    let raft = c.raft_index();
    c.clear_requests();
    let r = put_bytes(&c, "/v1/kv/big", vec![b'x'; 512 * 1024 + 1]);
    assert_eq!(r.status, 413);
    assert_eq!(
        r.body,
        "Request body(524289 bytes) too large, max size: 524288 bytes. \
         See https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
    );
    // The request arrived whole and nothing was written.
    let rec = c.requests();
    assert_eq!((rec.len(), rec[0].body.len()), (1, 512 * 1024 + 1));
    assert_eq!((c.kv_get("big"), c.raft_index()), (None, raft));
    // Exactly the limit is accepted.
    assert_eq!(put_bytes(&c, "/v1/kv/big", vec![b'y'; 512 * 1024]).body, "true");
    assert_eq!(c.kv_get("big").map(|v| v.len()), Some(512 * 1024));
    // As in Consul, only the declared length is checked: a chunked body of
    // any size is stored.
    let mut req =
        b"PUT /v1/kv/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    let chunk = vec![b'z'; 600 * 1024];
    req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    req.extend_from_slice(&chunk);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let raw = raw_exchange(c.addr, &req, Duration::from_secs(5));
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(c.kv_get("chunked").map(|v| v.len()), Some(600 * 1024));
}

#[test]
fn kv_keys_with_and_without_separator() {
    let c = ConsulDouble::start();
    let r = get(&c, "/v1/kv/?keys");
    assert_eq!((r.status, r.body.as_str()), (200, "[]"), "the root listing is never a 404");
    assert_eq!(r.index(), 1);
    for k in ["a/b", "a/c/d", "a/c/e", "a/f/g", "b/x", "b"] {
        c.kv_put(k, b"v");
    }
    let keys = |path: &str| -> Vec<String> {
        let r = get(&c, path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        serde_json::from_str(&r.body).unwrap()
    };
    assert_eq!(keys("/v1/kv/?keys"), vec!["a/b", "a/c/d", "a/c/e", "a/f/g", "b", "b/x"]);
    assert_eq!(keys("/v1/kv/?keys&separator=/"), vec!["a/", "b", "b/"]);
    assert_eq!(keys("/v1/kv/a/?keys&separator=/"), vec!["a/b", "a/c/", "a/f/"]);
    assert_eq!(keys("/v1/kv/a/?keys&seperator=/"), vec!["a/b", "a/c/", "a/f/"], "Consul's old spelling");
    assert_eq!(keys("/v1/kv/a/c?keys"), vec!["a/c/d", "a/c/e"], "a prefix, not a directory");
    assert_eq!(keys("/v1/kv/a/?keys&recurse"), vec!["a/b", "a/c/d", "a/c/e", "a/f/g"]);
    // The index counts every key under the prefix, cut or not.
    let n = c.kv_put("a/f/h", b"v");
    let r = get(&c, "/v1/kv/a/?keys&separator=/");
    assert_eq!(r.index(), n);
    assert_eq!(keys("/v1/kv/a/?keys&separator=/"), vec!["a/b", "a/c/", "a/f/"]);
    let r = get(&c, "/v1/kv/zz/?keys");
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    assert_eq!(r.index(), c.kv_index(""));
}

#[test]
fn kv_raw_answers_the_bare_value() {
    let c = ConsulDouble::start();
    let i = c.kv_put("cfg/routes", b"line 1\nline <2> & \"3\"\n");
    let r = get(&c, "/v1/kv/cfg/routes?raw");
    assert_eq!((r.status, r.body.as_str()), (200, "line 1\nline <2> & \"3\"\n"));
    assert_eq!(r.h("content-type").as_deref(), Some("text/plain"));
    assert_eq!(r.h("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(r.h("content-security-policy").as_deref(), Some("sandbox"));
    assert_eq!(r.index(), i);
    assert_eq!(get(&c, "/v1/kv/cfg/missing?raw").status, 404);
    let r = get(&c, "/v1/kv/cfg/?recurse&raw");
    assert_eq!(kv_keys(&r), vec!["cfg/routes"], "raw is for single keys only");
    c.kv_put("cfg/empty", b"");
    let r = get(&c, "/v1/kv/cfg/empty?raw");
    assert_eq!((r.status, r.body.as_str()), (200, ""));
}

#[test]
fn kv_acls_full_token_reads_and_writes_limited_and_anonymous_neither() {
    let c = ConsulDouble::start();
    c.kv_put("app/a", b"1");
    c.require_token(Some("root"));
    c.add_limited_token("weak");
    let root = [("X-Consul-Token", "root")];
    let weak = [("X-Consul-Token", "weak")];
    let with = |rb: reqwest::blocking::RequestBuilder, h: &[(&str, &str)]| {
        send(h.iter().fold(rb, |rb, (k, v)| rb.header(*k, *v)))
    };
    let url = |p: &str| format!("{}{p}", c.url());
    let client = http(Duration::from_secs(5));

    let r = with(client.put(url("/v1/kv/app/b")).body("2"), &root);
    assert_eq!((r.status, r.body.as_str()), (200, "true"));
    assert_eq!(kv_keys(&get_with(&c, "/v1/kv/app/?recurse", &root)), vec!["app/a", "app/b"]);

    // Limited token: writes and single-key reads refuse, naming the right.
    let raft = c.raft_index();
    let r = with(client.put(url("/v1/kv/app/a")).body("evil"), &weak);
    assert_eq!(r.status, 403);
    assert!(r.body.starts_with("Permission denied: token with AccessorID '"), "{}", r.body);
    assert!(r.body.ends_with("lacks permission 'key:write' on \"app/a\""), "{}", r.body);
    let r = with(client.delete(url("/v1/kv/app/?recurse")), &weak);
    assert_eq!(r.status, 403);
    assert!(r.body.ends_with("lacks permission 'key:write' on \"app/\""), "{}", r.body);
    assert_eq!((c.raft_index(), c.kv_get("app/a").as_deref()), (raft, Some(&b"1"[..])), "nothing written");
    let r = get_with(&c, "/v1/kv/app/a", &weak);
    assert_eq!(r.status, 403);
    assert!(r.body.ends_with("lacks permission 'key:read' on \"app/a\""), "{}", r.body);
    assert_eq!(r.h("x-consul-index"), None, "refused before any index");
    // ... prefix reads filter silently, and say so to a real token.
    let r = get_with(&c, "/v1/kv/app/?recurse", &weak);
    assert_eq!((r.status, r.body.as_str()), (404, ""));
    assert!(r.index() >= 1);
    assert_eq!(r.h("x-consul-results-filtered-by-acls").as_deref(), Some("true"));
    let r = get_with(&c, "/v1/kv/?keys", &weak);
    assert_eq!((r.status, r.body.as_str()), (200, "[]"));
    assert_eq!(r.h("x-consul-results-filtered-by-acls").as_deref(), Some("true"));

    // Anonymous: the same refusals, in the anonymous token's words, and no
    // filtered header.
    let r = get(&c, "/v1/kv/app/a");
    assert_eq!(r.status, 403);
    assert_eq!(r.body, "Permission denied: anonymous token lacks permission 'key:read' on \"app/a\"");
    let r = put(&c, "/v1/kv/app/a", "x");
    assert_eq!(r.status, 403);
    assert_eq!(r.body, "Permission denied: anonymous token lacks permission 'key:write' on \"app/a\"");
    let r = get(&c, "/v1/kv/app/?recurse");
    assert_eq!(r.status, 404);
    assert_eq!(r.h("x-consul-results-filtered-by-acls"), None);

    // Unknown token.
    let nope = [("X-Consul-Token", "nope")];
    for r in [get_with(&c, "/v1/kv/app/a", &nope), with(client.put(url("/v1/kv/app/a")).body("x"), &nope)] {
        assert_eq!((r.status, r.body.as_str()), (403, "ACL not found"));
    }
    assert_eq!(kv_entry(&get_with(&c, "/v1/kv/app/a", &root))["Value"], base64_encode(b"1"));
}

#[test]
fn kv_faults_apply_like_everywhere() {
    let c = ConsulDouble::start();
    c.kv_put("cfg/a", b"abcdefgh");
    let raft = c.raft_index();

    c.fault(Fault::Status(500));
    let r = get(&c, "/v1/kv/cfg/a");
    assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
    assert_eq!(put(&c, "/v1/kv/cfg/a", "x").status, 500);
    assert_eq!((c.raft_index(), c.kv_get("cfg/a").as_deref()), (raft, Some(&b"abcdefgh"[..])));

    // A fault that answers every request releases a held KV query.
    c.fault(Fault::None);
    let i = get(&c, "/v1/kv/cfg/a").index();
    let h = spawn_get(&c, &format!("/v1/kv/cfg/a?index={i}&wait=10s"));
    wait_held(&c, 1);
    let t = Instant::now();
    c.fault(Fault::Status(500));
    let (r, at) = h.join().unwrap();
    assert!(at.duration_since(t) < Duration::from_millis(500));
    assert_eq!(r.status, 500);

    // Hang: the write is recorded, with its body, never answered, never applied.
    c.fault(Fault::Hang);
    c.clear_requests();
    let err = http(Duration::from_millis(300)).put(format!("{}/v1/kv/cfg/a", c.url())).body("hung").send();
    assert!(err.is_err());
    let rec = c.requests();
    assert_eq!(rec.len(), 1);
    assert_eq!((rec[0].method.as_str(), &rec[0].body[..], rec[0].status), ("PUT", &b"hung"[..], None));
    assert_eq!(c.raft_index(), raft);

    c.fault(Fault::Slow(Duration::from_millis(300)));
    let t = Instant::now();
    assert_eq!(get(&c, "/v1/kv/cfg/a").status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    c.fault(Fault::Garbage);
    let r = get(&c, "/v1/kv/cfg/a");
    assert_eq!(r.status, 200);
    assert!(r.index() >= 1);
    assert!(serde_json::from_str::<Value>(&r.body).is_err(), "{}", r.body);
    assert_eq!(get(&c, "/v1/kv/cfg/a?raw").body, "abcd", "the raw value cut in half");
    assert_eq!(get(&c, "/v1/kv/cfg/missing").status, 404, "only successful reads are garbled");
    assert_eq!(put(&c, "/v1/kv/cfg/b", "written").body, "true", "writes are unaffected");

    c.fault(Fault::WrongTypes);
    let r = get(&c, "/v1/kv/cfg/?recurse");
    let e = r.entries();
    assert_eq!(e.iter().filter(|e| e["Key"] == "cfg/a").count(), 2, "duplicates");
    assert!(e.iter().any(|e| e["Key"] == "wrongtypes-value-not-base64"));
    assert!(e.iter().any(|e| e["ModifyIndex"].is_string()));
    assert!(e.iter().any(|e| e.is_null()));
    let k: Vec<Value> = get(&c, "/v1/kv/cfg/?keys").entries();
    assert!(k.contains(&serde_json::json!(42)) && k.contains(&Value::Null), "{k:?}");
    assert_eq!(get(&c, "/v1/kv/cfg/a?raw").body, "abcdefgh");

    c.fault(Fault::IndexZero);
    assert_eq!(get(&c, "/v1/kv/cfg/a").h("x-consul-index").as_deref(), Some("0"));
    assert_eq!(get(&c, "/v1/kv/cfg/missing").h("x-consul-index").as_deref(), Some("0"));
    c.fault(Fault::IndexMissing);
    let r = get(&c, "/v1/kv/cfg/a");
    assert_eq!((r.status, r.h("x-consul-index")), (200, None));
    assert_eq!(get(&c, "/v1/kv/cfg/missing").h("x-consul-index"), None);

    c.fault(Fault::NoLeader);
    let raft = c.raft_index();
    let r = get(&c, "/v1/kv/cfg/a");
    assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"));
    let r = get(&c, "/v1/kv/cfg/a?stale");
    assert_eq!(r.status, 200);
    assert_eq!(r.h("x-consul-knownleader").as_deref(), Some("false"));
    assert_eq!(r.h("x-consul-effective-consistency").as_deref(), Some("stale"));
    let r = get(&c, "/v1/kv/cfg/missing?stale");
    assert_eq!((r.status, r.h("x-consul-knownleader").as_deref()), (404, Some("false")));
    let r = put(&c, "/v1/kv/cfg/a?stale", "x");
    assert_eq!((r.status, r.body.as_str()), (500, "No cluster leader"), "writes need the leader");
    assert_eq!(delete(&c, "/v1/kv/cfg/a").status, 500);
    assert_eq!(c.raft_index(), raft);

    c.fault(Fault::None);
    assert_eq!(kv_entry(&get(&c, "/v1/kv/cfg/a"))["Value"], base64_encode(b"abcdefgh"));
}

#[test]
fn kv_reset_indexes_and_wipe_release_held_kv_queries() {
    let c = ConsulDouble::start();
    web(&c, 1);
    c.kv_put("cfg/a", b"1");
    let i = c.kv_put("cfg/b", b"2");
    let missing = get(&c, "/v1/kv/cfg/none").index();
    let h1 = spawn_get(&c, &format!("/v1/kv/cfg/b?index={i}&wait=10s"));
    let h2 = spawn_get(&c, &format!("/v1/kv/cfg/?recurse&index={i}&wait=10s"));
    let h3 = spawn_get(&c, &format!("/v1/kv/cfg/none?index={missing}&wait=10s"));
    wait_held(&c, 3);
    let t = Instant::now();
    c.reset_indexes();
    for (h, want, status) in [(h1, i, 200), (h2, i, 200), (h3, missing, 404)] {
        let (r, at) = h.join().unwrap();
        assert!(at.duration_since(t) < Duration::from_millis(500));
        assert_eq!((r.status, r.index()), (status, want), "released with the index it held on");
    }
    // The next read sees the remapped, lower indexes; data is unchanged.
    let r = get(&c, "/v1/kv/cfg/?recurse");
    assert!(r.index() < i && r.index() >= 2, "{} vs {i}", r.index());
    assert_eq!(kv_keys(&r), vec!["cfg/a", "cfg/b"]);
    let e = kv_entry(&get(&c, "/v1/kv/cfg/b"));
    assert!(e["CreateIndex"].as_u64() <= e["ModifyIndex"].as_u64());
    assert_eq!(e["ModifyIndex"].as_u64(), Some(r.index()));

    // A rebuilt cluster has an empty KV store.
    let i = get(&c, "/v1/kv/cfg/b").index();
    let h = spawn_get(&c, &format!("/v1/kv/cfg/b?index={i}&wait=10s"));
    wait_held(&c, 1);
    c.wipe();
    let (r, _) = h.join().unwrap();
    assert_eq!((r.status, r.index()), (200, i));
    let r = get(&c, "/v1/kv/cfg/b");
    assert_eq!(r.status, 404);
    assert!(r.index() <= i);
    assert_eq!((c.kv_get("cfg/a"), c.kv_tombstones()), (None, 0));
}
