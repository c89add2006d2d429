//! Routing benchmarks: the rebuild path and the per-request path, kept apart
//! (as `pingora-ketama/benches/simple.rs` keeps `build` and `select` apart)
//! because they answer different questions:
//!
//! * `build/*` — how long reconcile holds a new snapshot back after a
//!   discovery change. `RoutingTable::build` is pure and runs off the request
//!   path, but it runs on every change of every source, so it must stay cheap
//!   at a realistic size (here 100 clusters × 100 backends).
//! * `request/*` — what every single request pays to find its route and pick
//!   a backend. This is the only routing work on the hot path, so it must be
//!   negligible next to the rest of the proxy's per-request CPU cost.
//!
//! Run with `cargo bench --bench routing`; results are in BENCHMARKS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use pingora::http::RequestHeader;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use switchyard::config::Config;
use switchyard::discovery::{normalise, Discovered, Endpoint};
use switchyard::metrics::Metrics;
use switchyard::routing::{RoutingTable, StateRegistry};

const CLUSTERS: usize = 100;
const BACKENDS: usize = 100;
/// Precomputed requests we cycle through (a power of two, so `& (N - 1)`).
const REQUESTS: usize = 1024;
const POLICIES: [&str; 4] = ["round_robin", "weighted", "least_connections", "consistent_hash"];

/// Generated TOML, parsed by the real validator (`config::parse`) so the
/// benchmark exercises the same `Config` a deployment would get: one
/// file-discovered cluster `cN` per route, route `rN` for host `cN.example.com`.
fn config(policy: &str) -> Config {
    let mut toml = String::from("[[listeners]]\naddress = \"127.0.0.1:8080\"\n\n");
    for c in 0..CLUSTERS {
        toml.push_str(&format!(
            "[[routes]]\nname = \"r{c}\"\nhosts = [\"c{c}.example.com\"]\ncluster = \"c{c}\"\n\n"
        ));
    }
    for c in 0..CLUSTERS {
        toml.push_str(&format!(
            "[clusters.c{c}]\nfile = {{ catalog = \"c.json\", service = \"c{c}\" }}\nselection = \"{policy}\"\n"
        ));
        if policy == "consistent_hash" {
            toml.push_str("hash_header = \"x-user\"\n");
        }
        toml.push('\n');
    }
    switchyard::config::parse(&toml, Path::new("/tmp")).expect("generated config is valid")
}

/// What the file source would have published: 100 endpoints per cluster at
/// 10.0.C.B:8080, weights 1..=4 so the weighted schedule and the hash ring
/// are not degenerate. Built directly; no file I/O in the benchmark.
fn discovered() -> Discovered {
    (0..CLUSTERS)
        .map(|c| {
            let eps = (0..BACKENDS)
                .map(|b| {
                    let addr = SocketAddr::from((Ipv4Addr::new(10, 0, c as u8, b as u8 + 1), 8080));
                    Endpoint { weight: 1 + (b % 4) as u32, ..Endpoint::new(addr) }
                })
                .collect();
            (format!("c{c}"), normalise(eps))
        })
        .collect()
}

/// Requests spread over all clusters (host `cK.example.com`, K = i mod 100),
/// each with its own `x-user` key, so the consistent-hash ring is walked from
/// different points and the router sees every host, not one cached entry.
fn requests() -> Vec<RequestHeader> {
    (0..REQUESTS)
        .map(|i| {
            let mut req = RequestHeader::build("GET", b"/path", None).unwrap();
            req.insert_header("host", format!("c{}.example.com", i % CLUSTERS)).unwrap();
            req.insert_header("x-user", format!("user{i}")).unwrap();
            req
        })
        .collect()
}

/// The Host header bytes, as the proxy reads them for an origin-form request.
fn host(req: &RequestHeader) -> Option<&[u8]> {
    req.headers.get(http::header::HOST).map(|v| v.as_bytes())
}

/// Rebuild path. One `StateRegistry` lives across all iterations, as in
/// reconcile: after the first build every backend, cluster and metric series
/// already exists and is looked up, not created — the steady state of a
/// discovery update. The old table is dropped inside the timed loop, which
/// reconcile also pays when it publishes a new one.
fn bench_build(c: &mut Criterion) {
    let disc = discovered();
    let mut g = c.benchmark_group("build");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    for policy in POLICIES {
        let cfg = config(policy);
        let states = StateRegistry::new(Arc::new(Metrics::new()));
        let mut generation = 0u64;
        g.bench_function(BenchmarkId::new(format!("{CLUSTERS}x{BACKENDS}"), policy), |b| {
            b.iter(|| {
                generation += 1;
                RoutingTable::build(black_box(&cfg), black_box(&disc), &states, generation).unwrap()
            })
        });
        // The common case in reconcile: one cluster's set changed, the other 99
        // (and the route matcher) are reused from the previous table.
        let prev = RoutingTable::build(&cfg, &disc, &states, 0).unwrap();
        let mut changed = disc.clone();
        let mut eps = changed["c0"].as_ref().clone();
        eps.pop();
        changed.insert("c0".into(), normalise(eps));
        g.bench_function(BenchmarkId::new(format!("{CLUSTERS}x{BACKENDS}/one_changed"), policy), |b| {
            b.iter(|| {
                generation += 1;
                RoutingTable::build_from(Some(&prev), black_box(&cfg), black_box(&changed), &Default::default(), &states, generation).unwrap()
            })
        });
    }
    g.finish();
}

/// One built table per policy, with the same registry kept alive beside it.
fn table(policy: &str, disc: &Discovered) -> (RoutingTable, StateRegistry) {
    let states = StateRegistry::new(Arc::new(Metrics::new()));
    let t = RoutingTable::build(&config(policy), disc, &states, 1).unwrap();
    (t, states)
}

/// Per-request path, split three ways so a regression can be located:
/// * `route_and_pick/<policy>`: what `request_filter` + `upstream_peer` do —
///   `router.find` on Host and path, route → cluster, then `Cluster::pick`
///   with nothing tried yet (first attempt);
/// * `router_only`: host normalisation + exact-host map + path prefix scan
///   (policy-independent, so measured once);
/// * `pick_only/<policy>`: selection alone, clusters rotating as above.
///
/// Nothing is in flight during the benchmark, so least_connections scans all
/// 100 backends and finds a tie each time — its worst case for the scan.
fn bench_request(c: &mut Criterion) {
    let disc = discovered();
    let reqs = requests();
    let mut g = c.benchmark_group("request");

    for policy in POLICIES {
        let (t, _states) = table(policy, &disc);
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("route_and_pick", policy), |b| {
            b.iter(|| {
                let req = &reqs[i & (REQUESTS - 1)];
                i += 1;
                let ri = t.router.find(host(req), req.uri.path(), false).unwrap();
                let ci = t.routes[ri].cluster as usize;
                black_box(t.clusters[ci].pick(req, &[]))
            })
        });
    }

    let (t, _states) = table("round_robin", &disc);
    let mut i = 0usize;
    g.bench_function("router_only", |b| {
        b.iter(|| {
            let req = &reqs[i & (REQUESTS - 1)];
            i += 1;
            black_box(t.router.find(host(req), req.uri.path(), false))
        })
    });

    for policy in POLICIES {
        let (t, _states) = table(policy, &disc);
        // Cluster of each request, resolved ahead so only `pick` is timed.
        let cis: Vec<usize> = reqs
            .iter()
            .map(|r| t.routes[t.router.find(host(r), r.uri.path(), false).unwrap()].cluster as usize)
            .collect();
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("pick_only", policy), |b| {
            b.iter(|| {
                let k = i & (REQUESTS - 1);
                i += 1;
                black_box(t.clusters[cis[k]].pick(&reqs[k], &[]))
            })
        });
    }
    g.finish();
}

/// A 1,000-record SRV answer (src/discovery/dns.rs): turning the records
/// into backends (`srv_backends` + `normalise`), and the table rebuild when a
/// DNS cluster's whole set changes to such an answer (every backend new, as
/// when all ports change), weighted by the SRV weights. The lookup itself is
/// measured against a real server in `tests/dns.rs`.
fn bench_dns(c: &mut Criterion) {
    use switchyard::discovery::dns::{srv_backends, Addresses, SrvRecord};
    const N: u16 = 1000;
    let answer = |base: u16| -> Vec<SrvRecord> {
        (0..N)
            .map(|i| SrvRecord { priority: 0, weight: 1 + i % 4, port: base + i, target: format!("t{}.test.", i % 50), ttl: 30 })
            .collect()
    };
    let known: Addresses = (0..50u8).map(|t| (format!("t{t}.test."), vec![(Ipv4Addr::new(10, 1, 0, t + 1).into(), 30)])).collect();
    let (a, b) = (answer(20000), answer(40000));
    let mut g = c.benchmark_group("dns");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("srv_answer_1000/to_backends", |bn| {
        bn.iter(|| normalise(srv_backends(black_box(&a), black_box(&known)).unwrap().1))
    });
    let toml = "[[listeners]]\naddress = \"127.0.0.1:8080\"\n[[routes]]\ncluster = \"web\"\n[clusters.web]\nselection = \"weighted\"\ndns = { name = \"_http._tcp.web.test.\" }\n";
    let cfg = switchyard::config::parse(toml, Path::new("/tmp")).expect("valid");
    let sets: Vec<Discovered> = [&a, &b]
        .iter()
        .map(|r| [("web".to_string(), normalise(srv_backends(r, &known).unwrap().1))].into_iter().collect())
        .collect();
    assert_eq!(sets[0]["web"].len(), 1000);
    let states = StateRegistry::new(Arc::new(Metrics::new()));
    let mut prev = RoutingTable::build(&cfg, &sets[1], &states, 0).unwrap();
    let mut generation = 0u64;
    g.bench_function("srv_answer_1000/rebuild_all_new", |bn| {
        bn.iter(|| {
            generation += 1;
            let t = RoutingTable::build_from(Some(&prev), &cfg, &sets[(generation % 2) as usize], &Default::default(), &states, generation).unwrap();
            states.retain_changed(&prev, &t);
            prev = t;
        })
    });
    // The same answer with one record's port changed: 999 backends keep
    // their state, one is new.
    let mut a2 = a.clone();
    a2[0].port = 60000;
    let one: Vec<Discovered> = [&a, &a2]
        .iter()
        .map(|r| [("web".to_string(), normalise(srv_backends(r, &known).unwrap().1))].into_iter().collect())
        .collect();
    let mut prev = RoutingTable::build(&cfg, &one[1], &states, 0).unwrap();
    g.bench_function("srv_answer_1000/rebuild_one_changed", |bn| {
        bn.iter(|| {
            generation += 1;
            let t = RoutingTable::build_from(Some(&prev), &cfg, &one[(generation % 2) as usize], &Default::default(), &states, generation).unwrap();
            states.retain_changed(&prev, &t);
            prev = t;
        })
    });
    g.finish();
}

criterion_group!(benches, bench_build, bench_request, bench_dns);
criterion_main!(benches);
