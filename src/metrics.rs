//! Every metric Switchyard exports, defined in one place with its help text.
//!
//! Metrics are a write-only sink: nothing in the process reads them to make a
//! decision. Per-request handles (route × code class, cluster histogram,
//! backend outcomes) are resolved once when a routing table is built, so the
//! request path never looks up a label set. Label values are route, cluster
//! and backend names from config and discovery, so cardinality is bounded by
//! the configuration; series of removed backends are deleted.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::{SystemTime, UNIX_EPOCH};

pub const PREFIX: &str = "switchyard";

/// The HTTP status classes used as `code_class` label values.
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upstream attempt outcomes used as `outcome` label values.
pub const OUTCOMES: [&str; 5] = ["ok", "connect_error", "timeout", "error", "tls_error"];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub outlier_ejections: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub backend_health: IntGaugeVec,
    pub backends: IntGaugeVec,
    pub routing_generation: IntGauge,
    pub routing_swaps: IntCounter,
    pub discovery_updates: IntCounterVec,
    pub discovery_last_success: prometheus::GaugeVec,
    pub downstream_connections: IntGauge,
    pub downstream_connections_parked: IntGauge,
    pub downstream_parks: IntCounter,
    pub requests_in_flight: IntGauge,
    pub requests_express: IntCounter,
    /// By reason: headers_too_large, uri_too_long, body_too_large.
    pub requests_rejected: IntCounterVec,
    pub downstream_connections_refused: IntCounter,
    pub access_log_dropped: IntCounter,
    pub routing_build_errors: IntCounter,
    pub consul_requests: IntCounterVec,
    pub consul_watch_errors: IntCounterVec,
    pub consul_instances_skipped: IntCounterVec,
    pub discovery_staleness: prometheus::GaugeVec,
    pub panic_mode: IntGaugeVec,
    pub consul_tag_errors: IntCounterVec,
    pub consul_index_rewinds: IntCounter,
    pub consul_recovery_wakes: IntCounter,
    pub routing_build: Histogram,
    pub routing_table_info: IntGaugeVec,
    pub ha_ready: IntGauge,
    pub ha_track_file_writes: IntCounter,
    pub ha_track_file_errors: IntCounter,
    pub config_reloads: IntCounterVec,
    pub config_restart_pending: IntGauge,
    pub config_last_reload_success: prometheus::Gauge,
    pub kv_rejected_keys: IntGauge,
    pub tls_certificate_expiry: prometheus::GaugeVec,
    pub tls_reload_errors: IntGaugeVec,
    pub dns: DnsMetrics,
}

/// The DNS sources' metrics (src/discovery/dns.rs), labelled by source name.
pub struct DnsMetrics {
    pub lookups: IntCounterVec,
    pub last_success: prometheus::GaugeVec,
    pub records: IntGaugeVec,
}

/// Lookup outcomes used as `result` label values of `switchyard_dns_lookups_total`.
pub const DNS_RESULTS: [&str; 6] = ["ok", "nxdomain", "timeout", "servfail", "refused", "error"];

impl DnsMetrics {
    fn register(registry: &Registry) -> Self {
        let lookups = IntCounterVec::new(
            opts("dns_lookups_total", "DNS refreshes by source and result: ok (an answer, possibly empty), nxdomain (the name does not exist: the empty set is published), timeout, servfail, refused, error (unreachable resolver or any other failure: the last good set stays)."),
            &["source", "result"],
        )
        .expect("valid metric");
        let last_success = prometheus::GaugeVec::new(
            opts("dns_last_success_timestamp_seconds", "Unix time of each DNS source's last answer (ok or nxdomain)."),
            &["source"],
        )
        .expect("valid metric");
        let records = IntGaugeVec::new(
            opts("dns_records", "Records in each DNS source's last answer: SRV records for an SRV name, A and AAAA records for an address name."),
            &["source"],
        )
        .expect("valid metric");
        for c in [Box::new(lookups.clone()) as Box<dyn prometheus::core::Collector>, Box::new(last_success.clone()), Box::new(records.clone())] {
            registry.register(c).expect("metric names are unique");
        }
        DnsMetrics { lookups, last_success, records }
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(PREFIX)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            opts("requests_total", "Requests answered, by route, cluster and status class. Requests no route matched have route=\"\" and cluster=\"\"."),
            &["route", "cluster", "code_class"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from the request's arrival to the end of its response, by cluster.",
            )
            .namespace(PREFIX)
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["cluster"],
        )
        .expect("valid metric");
        let upstream_requests = IntCounterVec::new(
            opts("upstream_requests_total", "Attempts to forward a request to a backend, by outcome: ok (a response header arrived), connect_error, timeout, error (reset or protocol error), tls_error (the TLS handshake with the backend failed)."),
            &["cluster", "backend", "outcome"],
        )
        .expect("valid metric");
        let outlier_ejections = IntCounterVec::new(
            opts("outlier_ejections_total", "Times a backend was ejected by passive outlier detection (failed attempts in a row); selection passes it over until the ejection ends."),
            &["cluster", "backend"],
        )
        .expect("valid metric");
        let health_checks = IntCounterVec::new(
            opts("health_checks_total", "Active health checks done, by cluster and result (pass: the backend answered an expected status in time; fail: anything else)."),
            &["cluster", "result"],
        )
        .expect("valid metric");
        let backend_health = IntGaugeVec::new(
            opts("backend_health", "Verdict of a backend's active health checks: 1 passing, 0 failing (absent until the first check)."),
            &["cluster", "backend"],
        )
        .expect("valid metric");
        let backends = IntGaugeVec::new(
            opts("backends", "Backends per cluster in the serving table, by state: active (receives new requests), drained (weight 0: known, receives nothing new) or unhealthy (failing or awaiting its first active health check)."),
            &["cluster", "state"],
        )
        .expect("valid metric");
        let routing_generation = IntGauge::with_opts(opts(
            "routing_generation",
            "Generation number of the routing table currently serving.",
        ))
        .expect("valid metric");
        let routing_swaps = IntCounter::with_opts(opts(
            "routing_swaps_total",
            "Routing tables published (each a new generation).",
        ))
        .expect("valid metric");
        let discovery_updates = IntCounterVec::new(
            opts("discovery_updates_total", "Results from discovery sources: ok (new set published), unchanged (valid, same set), error (rejected; the last good set stays)."),
            &["source", "result"],
        )
        .expect("valid metric");
        let discovery_last_success = prometheus::GaugeVec::new(
            opts("discovery_last_success_timestamp_seconds", "Unix time of the last valid result from each discovery source."),
            &["source"],
        )
        .expect("valid metric");
        let downstream_connections = IntGauge::with_opts(opts(
            "downstream_connections",
            "Client connections currently open (served; refused ones over limits.max_connections are not counted).",
        ))
        .expect("valid metric");
        let downstream_connections_parked = IntGauge::with_opts(opts(
            "downstream_connections_parked",
            "Open client connections parked: idle for server.park_idle_after, held as a bare socket until the client sends again (counted in switchyard_downstream_connections too).",
        ))
        .expect("valid metric");
        let downstream_parks = IntCounter::with_opts(opts(
            "downstream_parks_total",
            "Times an idle client connection was parked (each wakes at most once: its rate is the rate of parked connections served again or closed).",
        ))
        .expect("valid metric");
        let downstream_connections_refused = IntCounter::with_opts(opts(
            "downstream_connections_refused_total",
            "Client connections refused because limits.max_connections were open: answered 503 (HTTP/1) or closed (HTTP/2 over TLS), not counted in switchyard_downstream_connections.",
        ))
        .expect("valid metric");
        let requests_in_flight = IntGauge::with_opts(opts(
            "requests_in_flight",
            "Requests currently being handled.",
        ))
        .expect("valid metric");
        let requests_express = IntCounter::with_opts(opts(
            "requests_express_total",
            "Requests served by the express path (plain bodiless HTTP/1.1); the rest went through Pingora's general proxy.",
        ))
        .expect("valid metric");
        let requests_rejected = IntCounterVec::new(
            opts(
                "requests_rejected_total",
                "Requests refused for exceeding [limits], by reason: headers_too_large (431), uri_too_long (414), body_too_large (413), counted in switchyard_requests_total too; header_timeout (408: a head not complete within limits.header_timeout, not counted there; an HTTP/2 connection closed without a first request in time is not counted); or as malformed (400): bad_request_line, bad_framing (including a bad chunk in a body), bad_host, counted there too except those refused before Pingora read them (a bad request line, a bad chunk, a request behind one).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for r in ["headers_too_large", "uri_too_long", "body_too_large", "header_timeout", "bad_request_line", "bad_framing", "bad_host"] {
            requests_rejected.with_label_values(&[r]);
        }
        let access_log_dropped = IntCounter::with_opts(opts(
            "access_log_dropped_total",
            "Access log lines dropped because the writer fell behind (the request itself was served).",
        ))
        .expect("valid metric");
        let routing_build_errors = IntCounter::with_opts(opts(
            "routing_build_errors_total",
            "Routing table builds that failed; the previous table kept serving.",
        ))
        .expect("valid metric");
        let consul_requests = IntCounterVec::new(
            opts("consul_requests_total", "Requests to the Consul agent, by endpoint and HTTP status (or connect_error, timeout, bad_body)."),
            &["endpoint", "code"],
        )
        .expect("valid metric");
        let consul_watch_errors = IntCounterVec::new(
            opts("consul_watch_errors_total", "Failed or anomalous Consul watch reads, by service and kind: connect, timeout, forbidden, rate_limited, server_error, http_error, bad_body, index_reset. The last good set keeps serving."),
            &["service", "kind"],
        )
        .expect("valid metric");
        let consul_instances_skipped = IntCounterVec::new(
            opts("consul_instances_skipped_total", "Instances in Consul answers that were skipped as invalid (the rest of the set applied), by service and reason."),
            &["service", "reason"],
        )
        .expect("valid metric");
        let discovery_staleness = prometheus::GaugeVec::new(
            opts("discovery_staleness_seconds", "Seconds since the last successful read of each Consul-watched service."),
            &["service"],
        )
        .expect("valid metric");
        let panic_mode = IntGaugeVec::new(
            opts("panic_mode", "1 while a cluster routes over all registered instances because too few are healthy."),
            &["cluster"],
        )
        .expect("valid metric");
        let consul_tag_errors = IntCounterVec::new(
            opts("consul_tag_errors_total", "Catalog updates in which a service's switchyard.* tags were malformed; that service kept its last good route."),
            &["service"],
        )
        .expect("valid metric");
        let consul_index_rewinds = IntCounter::with_opts(opts(
            "consul_index_rewinds_total",
            "Times Consul's indexes were seen going backwards (a snapshot restore or a rebuilt cluster); each time every watch re-read without blocking.",
        ))
        .expect("valid metric");
        let consul_recovery_wakes = IntCounter::with_opts(opts(
            "consul_recovery_wakes_total",
            "Times the agent answered again (GET /v1/status/leader) while watches were backing off, waking them before their backoff ran out.",
        ))
        .expect("valid metric");
        let routing_build = Histogram::with_opts(
            HistogramOpts::new("routing_build_seconds", "Time reconcile takes to build and publish one routing table (inputs to swap).")
                .namespace(PREFIX)
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
        )
        .expect("valid metric");
        let routing_table_info = IntGaugeVec::new(
            opts("routing_table_info", "1 for the routing table being served, labelled with the digest of its content (routes, clusters, backends, weights and states; not generations or timestamps). Two nodes fed the same catalog show the same digest."),
            &["digest"],
        )
        .expect("valid metric");
        let ha_ready = IntGauge::with_opts(opts(
            "ha_ready",
            "1 while this node is ready to hold a floating address (GET /readyz?vrrp answers 200), else 0.",
        ))
        .expect("valid metric");
        let ha_track_file_writes = IntCounter::with_opts(opts(
            "ha_track_file_writes_total",
            "Times the VRRP readiness was written to ha.track_file (only on a change).",
        ))
        .expect("valid metric");
        let ha_track_file_errors = IntCounter::with_opts(opts(
            "ha_track_file_errors_total",
            "Failed writes of ha.track_file. While the last write failed the node reports itself not ready.",
        ))
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            opts("config_reloads_total", "Config file reloads (SIGHUP, POST /reload), by result: applied (a new config serves), unchanged (valid, nothing live changed), refused (invalid; the running config keeps serving)."),
            &["result"],
        )
        .expect("valid metric");
        let config_restart_pending = IntGauge::with_opts(opts(
            "config_restart_pending",
            "Settings in the config file that differ from the running ones and apply only after a restart or `switchyard upgrade` (listed in /status config.needs_restart).",
        ))
        .expect("valid metric");
        let config_last_reload_success = prometheus::Gauge::with_opts(opts(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last config reload that was not refused (0: none since start).",
        ))
        .expect("valid metric");
        let kv_rejected_keys = IntGauge::with_opts(opts(
            "kv_rejected_keys",
            "Consul KV settings keys rejected right now (each listed in /status kv_errors); every other key applies.",
        ))
        .expect("valid metric");
        let tls_certificate_expiry = prometheus::GaugeVec::new(
            opts("tls_certificate_expiry_timestamp_seconds", "Unix time at which each serving TLS certificate expires (not_after), by certificate file."),
            &["name"],
        )
        .expect("valid metric");
        let tls_reload_errors = IntGaugeVec::new(
            opts("tls_reload_errors", "1 while a TLS listener's certificate files on disk do not load (the previous certificates keep serving; /status tls says why)."),
            &["listener"],
        )
        .expect("valid metric");
        for c in [
            Box::new(routing_build.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tls_certificate_expiry.clone()),
            Box::new(tls_reload_errors.clone()),
            Box::new(kv_rejected_keys.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_restart_pending.clone()),
            Box::new(config_last_reload_success.clone()),
            Box::new(routing_table_info.clone()),
            Box::new(ha_ready.clone()),
            Box::new(ha_track_file_writes.clone()),
            Box::new(ha_track_file_errors.clone()),
            Box::new(consul_tag_errors.clone()),
            Box::new(consul_index_rewinds.clone()),
            Box::new(consul_recovery_wakes.clone()),
            Box::new(consul_requests.clone()),
            Box::new(consul_watch_errors.clone()),
            Box::new(consul_instances_skipped.clone()),
            Box::new(discovery_staleness.clone()),
            Box::new(panic_mode.clone()),
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_requests.clone()),
            Box::new(outlier_ejections.clone()),
            Box::new(health_checks.clone()),
            Box::new(backend_health.clone()),
            Box::new(backends.clone()),
            Box::new(routing_generation.clone()),
            Box::new(routing_swaps.clone()),
            Box::new(discovery_updates.clone()),
            Box::new(discovery_last_success.clone()),
            Box::new(downstream_connections.clone()),
            Box::new(downstream_connections_parked.clone()),
            Box::new(downstream_parks.clone()),
            Box::new(downstream_connections_refused.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(requests_express.clone()),
            Box::new(requests_rejected.clone()),
            Box::new(access_log_dropped.clone()),
            Box::new(routing_build_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let dns = DnsMetrics::register(&registry);
        Metrics {
            dns,
            registry,
            requests,
            request_duration,
            upstream_requests,
            outlier_ejections,
            health_checks,
            backend_health,
            backends,
            routing_generation,
            routing_swaps,
            discovery_updates,
            discovery_last_success,
            downstream_connections,
            downstream_connections_parked,
            downstream_parks,
            downstream_connections_refused,
            requests_in_flight,
            requests_express,
            requests_rejected,
            access_log_dropped,
            routing_build_errors,
            consul_requests,
            consul_watch_errors,
            consul_instances_skipped,
            discovery_staleness,
            panic_mode,
            consul_tag_errors,
            consul_index_rewinds,
            consul_recovery_wakes,
            routing_build,
            routing_table_info,
            ha_ready,
            ha_track_file_writes,
            ha_track_file_errors,
            config_reloads,
            config_restart_pending,
            config_last_reload_success,
            kv_rejected_keys,
            tls_certificate_expiry,
            tls_reload_errors,
        }
    }

    pub fn consul_request(&self, endpoint: &str, code: &str) {
        self.consul_requests.with_label_values(&[endpoint, code]).inc();
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let enc = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = enc.encode(&self.registry.gather(), &mut buf);
        buf
    }

    pub fn discovery_update(&self, source: &str, result: &str) {
        self.discovery_updates.with_label_values(&[source, result]).inc();
        if result != "error" {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            self.discovery_last_success.with_label_values(&[source]).set(now);
        }
    }

    /// Per-route handles: one counter per status class.
    pub fn route_handles(&self, route: &str, cluster: &str) -> RouteMetrics {
        RouteMetrics {
            by_class: CODE_CLASSES.map(|c| self.requests.with_label_values(&[route, cluster, c])),
        }
    }

    pub fn cluster_histogram(&self, cluster: &str) -> Histogram {
        self.request_duration.with_label_values(&[cluster])
    }

    pub fn backend_handles(&self, cluster: &str, backend: &str) -> BackendMetrics {
        BackendMetrics {
            by_outcome: OUTCOMES.map(|o| self.upstream_requests.with_label_values(&[cluster, backend, o])),
            ejections: self.outlier_ejections.with_label_values(&[cluster, backend]),
        }
    }

    pub fn forget_backend(&self, cluster: &str, backend: &str) {
        for o in OUTCOMES {
            let _ = self.upstream_requests.remove_label_values(&[cluster, backend, o]);
        }
        let _ = self.outlier_ejections.remove_label_values(&[cluster, backend]);
    }

    /// A backend no longer checked: drop its health verdict series.
    pub fn forget_health(&self, cluster: &str, backend: &str) {
        let _ = self.backend_health.remove_label_values(&[cluster, backend]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
}

impl RouteMetrics {
    pub fn record(&self, status: u16) {
        let i = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class[i].inc();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    ConnectError = 1,
    Timeout = 2,
    Error = 3,
    /// The TLS handshake with the backend failed (its certificate did not verify, say).
    TlsError = 4,
}

#[derive(Clone)]
pub struct BackendMetrics {
    by_outcome: [IntCounter; 5],
    pub ejections: IntCounter,
}

impl BackendMetrics {
    pub fn record(&self, outcome: Outcome) {
        self.by_outcome[outcome as usize].inc();
    }
}
