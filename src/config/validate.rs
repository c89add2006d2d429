//! Turns the file schema into the typed [`Config`], collecting *every* error
//! with its field path and the offending value, so an operator fixes a broken
//! file in one pass instead of one error per restart.
//!
//! Each top-level section (and each route, listener and cluster) is
//! deserialised on its own, so a type error in one cluster does not hide a bad
//! address in another.

use super::file::*;
use super::*;
use crate::error::{ConfigError, ConfigErrors};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use std::sync::Arc;

/// Longest client-side timeout (`limits.keepalive_timeout`,
/// `limits.header_timeout`) accepted.
const MAX_CLIENT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Read and validate a config file. Relative paths inside it (catalog files,
/// the access log) are resolved against the file's own directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_document(path).map(|(_, config)| config)
}

/// [`load`], also returning the file's TOML document (which Consul KV
/// settings are merged over).
pub fn load_document(path: &Path) -> Result<(toml::Table, Config), ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )])
    })?;
    let doc = parse_toml(&text)?;
    let config = validate_table(&doc, base_dir(path), &process_env)?;
    Ok((doc, config))
}

/// The directory a config file's relative paths are resolved against.
pub fn base_dir(path: &Path) -> &Path {
    path.parent().unwrap_or_else(|| Path::new("."))
}

/// The process environment (empty values count as unset), for the
/// `CONSUL_*` defaults.
pub fn process_env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// Validate config text. `base` anchors relative paths. The `CONSUL_*`
/// environment variables fill in what the `[consul]` section leaves out.
pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
    parse_with_env(text, base, &process_env)
}

/// [`parse`] with an explicit environment, for tests.
pub fn parse_with_env(text: &str, base: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    validate_table(&parse_toml(text)?, base, env)
}

/// The TOML document of a config file, before validation.
pub fn parse_toml(text: &str) -> Result<toml::Table, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError::new("", format!("not valid TOML: {}", e.to_string().trim_end()))])
    })
}

/// Validate a config document: the file's, or the file's merged with the
/// settings from Consul KV (the same rules for both).
pub fn validate_table(table: &toml::Table, base: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        errors: Vec::new(),
        base,
    };
    for key in table.keys() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            v.err(
                key,
                format!(
                    "unknown section `{key}`, expected one of: {}",
                    TOP_LEVEL_KEYS.join(", ")
                ),
            );
        }
    }
    let server: ServerSection = v.section(&table, "server").unwrap_or_default();
    let admin: AdminSection = v.section(&table, "admin").unwrap_or_default();
    let access_log: AccessLogSection = v.section(&table, "access_log").unwrap_or_default();
    let listeners: Vec<ListenerSection> = v.list(&table, "listeners");
    let routes: Vec<RouteSection> = v.list(&table, "routes");
    let clusters: BTreeMap<String, ClusterSection> = v.named(&table, "clusters");
    let consul_section: Option<ConsulSection> = v.section(&table, "consul");
    let ha: HaSection = v.section(&table, "ha").unwrap_or_default();
    let forwarding: ForwardingSection = v.section(&table, "forwarding").unwrap_or_default();
    let limits: LimitsSection = v.section(&table, "limits").unwrap_or_default();
    let dns: DnsSection = v.section(&table, "dns").unwrap_or_default();
    let consul_needed = clusters.values().any(|c| c.consul.is_some());
    // With KV settings on, routes may all come from Consul.
    let routes_required = !consul_section.as_ref().is_some_and(|c| c.kv == Some(true));

    let listeners = v.listeners(listeners);
    let park_raw = server.park_idle_after.clone();
    let admin = v.admin(admin, &listeners);
    let server = v.server(server, &listeners);
    let access_log = v.access_log(access_log);
    let ha = v.ha(ha);
    let forwarding = Arc::new(v.forwarding(forwarding));
    let limits = v.limits(limits);
    v.park_before_keepalive(server.park_idle_after, &limits, park_raw.as_deref());
    let dns = v.dns_defaults(dns);
    let clusters = v.clusters(clusters, &dns);
    // Clusters that failed to deserialise still exist for the routes naming them.
    let cluster_names: Vec<String> = match table.get("clusters") {
        Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let routes = v.routes(routes, &cluster_names, routes_required);
    let consul = if consul_needed || consul_section.is_some() {
        let port = listeners.first().map(|l| l.address.port()).unwrap_or(0);
        Some(v.consul(consul_section.unwrap_or_default(), env, port))
    } else {
        None
    };

    if v.errors.is_empty() {
        Ok(Config {
            server,
            admin,
            access_log,
            listeners,
            routes,
            clusters,
            consul,
            ha,
            forwarding,
            limits,
            dns: DnsSettings {
                nameservers: dns.nameservers,
                min_refresh: dns.min_refresh,
                max_refresh: dns.max_refresh,
                timeout: dns.timeout,
            },
        })
    } else {
        Err(ConfigErrors(v.errors))
    }
}

struct Validator<'a> {
    errors: Vec<ConfigError>,
    base: &'a Path,
}

fn join(prefix: &str, inner: &str) -> String {
    if inner.is_empty() || inner == "." {
        prefix.to_string()
    } else {
        format!("{prefix}.{inner}")
    }
}

impl Validator<'_> {
    fn err(&mut self, path: impl Into<String>, msg: impl Into<String>) {
        self.errors.push(ConfigError::new(path, msg));
    }

    fn de<T: DeserializeOwned>(&mut self, value: toml::Value, path: &str) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(t) => Some(t),
            Err(e) => {
                let inner = e.path().to_string();
                self.err(join(path, &inner), e.into_inner().to_string().trim_end().to_string());
                None
            }
        }
    }

    fn section<T: DeserializeOwned>(&mut self, table: &toml::Table, key: &str) -> Option<T> {
        let value = table.get(key)?.clone();
        self.de(value, key)
    }

    fn list<T: DeserializeOwned>(&mut self, table: &toml::Table, key: &str) -> Vec<T> {
        match table.get(key) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| self.de(item.clone(), &format!("{key}[{i}]")))
                .collect(),
            Some(other) => {
                self.err(
                    key,
                    format!("expected an array of tables ([[{key}]]), found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    fn named<T: DeserializeOwned>(&mut self, table: &toml::Table, key: &str) -> BTreeMap<String, T> {
        match table.get(key) {
            None => BTreeMap::new(),
            Some(toml::Value::Table(items)) => items
                .iter()
                .filter_map(|(name, item)| {
                    self.de(item.clone(), &format!("{key}.{name}"))
                        .map(|t| (name.clone(), t))
                })
                .collect(),
            Some(other) => {
                self.err(
                    key,
                    format!("expected a table of named entries ([{key}.NAME]), found {}", other.type_str()),
                );
                BTreeMap::new()
            }
        }
    }

    fn socket_addr(&mut self, path: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    path,
                    format!("invalid socket address {value:?}: expected IP:PORT, e.g. 127.0.0.1:8080 or [::1]:8080"),
                );
                None
            }
        }
    }

    /// `server.park_idle_after`: `off`, or a duration (shorter than
    /// `limits.keepalive_timeout`, checked with the limits).
    fn park_idle_after(&mut self, value: Option<String>) -> Option<Duration> {
        const PATH: &str = "server.park_idle_after";
        match value.as_deref() {
            None => Some(DEFAULT_PARK_IDLE_AFTER),
            Some("off") => None,
            Some(_) => Some(self.duration(PATH, value.as_ref(), DEFAULT_PARK_IDLE_AFTER)),
        }
    }

    /// A connection idle for `limits.keepalive_timeout` is closed, so
    /// `park_idle_after` must be shorter to mean anything.
    fn park_before_keepalive(&mut self, park: Option<Duration>, limits: &Limits, raw: Option<&str>) {
        if let (Some(p), Some(v)) = (park, raw) {
            if p >= limits.keepalive_timeout {
                self.err(
                    "server.park_idle_after",
                    format!(
                        "invalid duration {v:?}: must be less than limits.keepalive_timeout ({}) (or \"off\")",
                        humantime::format_duration(limits.keepalive_timeout)
                    ),
                );
            }
        }
    }

    fn duration(&mut self, path: &str, value: Option<&String>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value) {
            Ok(d) if d.is_zero() => {
                self.err(path, format!("invalid duration {value:?}: must be greater than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    path,
                    format!("invalid duration {value:?}: {e} (examples: \"500ms\", \"2s\", \"1m\")"),
                );
                default
            }
        }
    }

    fn listeners(&mut self, sections: Vec<ListenerSection>) -> Vec<Listener> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (i, l) in sections.into_iter().enumerate() {
            let path = format!("listeners[{i}].address");
            let ListenerSection { address, h2c, read_buffer, tls } = l;
            let tls = tls.and_then(|t| self.listener_tls(&format!("listeners[{i}].tls"), t));
            let read_buffer = read_buffer.unwrap_or(DEFAULT_READ_BUFFER);
            if read_buffer > 1 << 20 {
                self.err(format!("listeners[{i}].read_buffer"), format!("invalid value {read_buffer}: at most 1048576 bytes"));
            }
            if let Some(addr) = self.socket_addr(&path, &address) {
                if !seen.insert(addr) {
                    self.err(&path, format!("duplicate listener address {address:?}"));
                }
                out.push(Listener {
                    address: addr,
                    h2c: h2c.unwrap_or(true),
                    read_buffer: read_buffer.min(1 << 20),
                    tls,
                });
            }
        }
        if out.is_empty() && !self.errors.iter().any(|e| e.path.starts_with("listeners")) {
            self.err("listeners", "at least one [[listeners]] entry with an address is required");
        }
        out
    }

    /// Every pair must load and match now, so `check` catches a broken one.
    fn listener_tls(&mut self, p: &str, t: TlsSection) -> Option<ListenerTls> {
        let TlsSection { cert, key, certificates, without_sni } = t;
        let refuse = match without_sni.as_deref() {
            None | Some("default") => false,
            Some("refuse") => true,
            Some(other) => {
                self.err(format!("{p}.without_sni"), format!("invalid value {other:?}: expected \"default\" or \"refuse\""));
                false
            }
        };
        let mut files = Vec::new();
        let pairs = std::iter::once((p.to_string(), cert, key))
            .chain(certificates.into_iter().enumerate().map(|(j, c)| (format!("{p}.certificates[{j}]"), c.cert, c.key)));
        let mut ok = true;
        for (at, cert, key) in pairs {
            let f = crate::tls::CertFiles { cert: self.base.join(cert), key: self.base.join(key) };
            if let Err(e) = crate::tls::load_pair(&f) {
                self.err(format!("{at}.cert"), e);
                ok = false;
            }
            files.push(f);
        }
        ok.then_some(ListenerTls { certificates: files, refuse_without_sni: refuse })
    }

    fn outlier(&mut self, p: &str, o: Option<OutlierSection>) -> Option<Outlier> {
        let d = Outlier::default();
        let t = match o {
            None | Some(OutlierSection::On(true)) => return Some(d),
            Some(OutlierSection::On(false)) => return None,
            Some(OutlierSection::With(t)) => t,
        };
        let OutlierTable { consecutive_failures, base_ejection, max_ejection, max_ejected_percent, count_5xx } = t;
        let n = consecutive_failures.unwrap_or(d.consecutive_failures);
        if !(1..=1000).contains(&n) {
            self.err(format!("{p}.consecutive_failures"), format!("invalid value {n}: must be between 1 and 1000"));
        }
        let pct = max_ejected_percent.unwrap_or(d.max_ejected_percent);
        if pct > 100 {
            self.err(format!("{p}.max_ejected_percent"), format!("invalid value {pct}: must be between 0 and 100"));
        }
        let base = self.duration(&format!("{p}.base_ejection"), base_ejection.as_ref(), d.base_ejection);
        let max = self.duration(&format!("{p}.max_ejection"), max_ejection.as_ref(), d.max_ejection.max(base));
        if max < base {
            self.err(format!("{p}.max_ejection"), format!("invalid value {:?}: shorter than base_ejection", max_ejection.unwrap_or_default()));
        }
        Some(Outlier {
            consecutive_failures: n.clamp(1, 1000),
            base_ejection: base,
            max_ejection: max.max(base),
            max_ejected_percent: pct.min(100),
            count_5xx: count_5xx.unwrap_or(d.count_5xx),
        })
    }

    fn health_check(&mut self, p: &str, h: HealthCheckSection) -> HealthCheck {
        let HealthCheckSection { path, host, interval, timeout, expect, healthy_threshold, unhealthy_threshold } = h;
        let path = path.unwrap_or_else(|| "/".to_string());
        if !path.starts_with('/') || path.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            self.err(format!("{p}.path"), format!("invalid path {path:?}: must start with '/' and hold no spaces or control characters"));
        }
        if let Some(h) = &host {
            if !crate::proxy::headers::is_host(h.as_bytes()) {
                self.err(format!("{p}.host"), format!("invalid host {h:?}: a host name or address, optionally with :port"));
            }
        }
        let interval = self.duration(&format!("{p}.interval"), interval.as_ref(), Duration::from_secs(5));
        let timeout = self.duration(&format!("{p}.timeout"), timeout.as_ref(), Duration::from_secs(2));
        if timeout > interval {
            self.err(format!("{p}.timeout"), format!("invalid value {:?}: longer than interval ({interval:?})", timeout));
        }
        let mut ranges = Vec::new();
        for (i, e) in expect.unwrap_or_else(|| vec!["200-399".to_string()]).iter().enumerate() {
            let parse = |v: &str| v.trim().parse::<u16>().ok().filter(|s| (100..=599).contains(s));
            let range = match e.split_once('-') {
                Some((a, b)) => parse(a).zip(parse(b)).filter(|(a, b)| a <= b),
                None => parse(e).map(|s| (s, s)),
            };
            match range {
                Some(r) => ranges.push(r),
                None => self.err(format!("{p}.expect[{i}]"), format!("invalid status {e:?}: a status (\"200\") or a range (\"200-399\") between 100 and 599")),
            }
        }
        if ranges.is_empty() {
            self.err(format!("{p}.expect"), "empty list: name at least one passing status");
        }
        let mut threshold = |name: &str, v: Option<u32>, d: u32| {
            let v = v.unwrap_or(d);
            if !(1..=100).contains(&v) {
                self.err(format!("{p}.{name}"), format!("invalid value {v}: must be between 1 and 100"));
            }
            v.clamp(1, 100)
        };
        let healthy_threshold = threshold("healthy_threshold", healthy_threshold, 2);
        let unhealthy_threshold = threshold("unhealthy_threshold", unhealthy_threshold, 3);
        HealthCheck { path, host, interval, timeout: timeout.min(interval), expect: ranges, healthy_threshold, unhealthy_threshold }
    }

    fn slow_start(&mut self, p: &str, s: SlowStartSection) -> Option<SlowStart> {
        let (window, curve) = match s {
            SlowStartSection::Window(w) => (Some(w), None),
            SlowStartSection::With(SlowStartTable { window, curve }) => (window, curve),
        };
        let Some(window) = window else {
            self.err(format!("{p}.window"), "missing: how long a backend's share ramps, e.g. \"30s\"");
            return None;
        };
        let window = self.duration(&format!("{p}.window"), Some(&window), Duration::from_secs(30));
        let curve = match curve.as_deref() {
            None | Some("linear") => SlowStartCurve::Linear,
            Some("aggressive") => SlowStartCurve::Aggressive,
            Some(other) => {
                self.err(format!("{p}.curve"), format!("invalid value {other:?}: use \"linear\" or \"aggressive\""));
                SlowStartCurve::Linear
            }
        };
        Some(SlowStart { window, curve })
    }

    fn backend_tls(&mut self, p: &str, t: BackendTlsSection) -> Option<BackendTls> {
        let BackendTlsSection { server_name, ca, verify, client_cert, client_key } = t;
        let verify = verify.unwrap_or(true);
        let server_name = server_name.unwrap_or_default();
        if server_name.is_empty() && verify {
            self.err(
                format!("{p}.server_name"),
                "required while `verify = true`: the name the backends' certificates must carry (backends are addressed by IP)",
            );
        } else if !server_name.is_empty() && rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            self.err(format!("{p}.server_name"), format!("invalid value {server_name:?}: expected a DNS name or an IP address"));
        }
        let ca = ca.map(|c| self.base.join(c));
        let client = match (client_cert, client_key) {
            (Some(cert), Some(key)) => Some(crate::tls::CertFiles { cert: self.base.join(cert), key: self.base.join(key) }),
            (None, None) => None,
            (Some(_), None) => {
                self.err(format!("{p}.client_key"), "missing: `client_cert` needs its `client_key`");
                None
            }
            (None, Some(_)) => {
                self.err(format!("{p}.client_cert"), "missing: `client_key` needs its `client_cert`");
                None
            }
        };
        let material = match crate::tls::BackendTlsMaterial::load(ca.as_deref(), client.as_ref()) {
            Ok(m) => m,
            Err((field, e)) => {
                self.err(format!("{p}.{field}"), e);
                return None;
            }
        };
        Some(BackendTls { server_name, verify, ca, client, material: Arc::new(material) })
    }

    fn admin(&mut self, s: AdminSection, listeners: &[Listener]) -> AdminSettings {
        let AdminSection { listen, token_file } = s;
        let token = token_file.and_then(|f| {
            let path = self.base.join(&f);
            match std::fs::read_to_string(&path) {
                Ok(t) if t.trim().len() >= 16 => Some(Secret(t.trim().to_string())),
                Ok(_) => {
                    self.err("admin.token_file", format!("{}: the token must be at least 16 characters", path.display()));
                    None
                }
                Err(e) => {
                    self.err("admin.token_file", format!("cannot read {}: {e}", path.display()));
                    None
                }
            }
        });
        let default: SocketAddr = "127.0.0.1:9901".parse().expect("valid literal");
        let listen = match listen {
            None => default,
            Some(v) => self.socket_addr("admin.listen", &v).unwrap_or(default),
        };
        let clash = |l: &Listener| {
            l.address.port() == listen.port()
                && (l.address.ip() == listen.ip() || l.address.ip().is_unspecified() || listen.ip().is_unspecified())
        };
        if listeners.iter().any(clash) {
            self.err(
                "admin.listen",
                format!("{listen} is also a proxy listener; the admin API needs its own address"),
            );
        }
        AdminSettings { listen, token }
    }

    fn server(&mut self, s: ServerSection, listeners: &[Listener]) -> ServerSettings {
        let ServerSection {
            threads,
            work_stealing,
            drain_timeout,
            shutdown_timeout,
            pid_file,
            upgrade_sock,
            upstream_keepalive_pool,
            express,
            park_idle_after,
        } = s;
        let default_threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let threads = match threads {
            None => default_threads,
            Some(t) if (1..=256).contains(&t) => t,
            Some(t) => {
                self.err("server.threads", format!("invalid value {t}: must be between 1 and 256"));
                default_threads
            }
        };
        // Unique per instance by default: Pingora's shared /tmp defaults would let
        // one instance hand its sockets to another on upgrade.
        let port = listeners.first().map(|l| l.address.port()).unwrap_or(0);
        let pool = upstream_keepalive_pool.unwrap_or(1024);
        if pool == 0 {
            self.err("server.upstream_keepalive_pool", "invalid value 0: must be at least 1");
        }
        ServerSettings {
            threads,
            work_stealing: work_stealing.unwrap_or(false),
            express: express.unwrap_or(true),
            park_idle_after: self.park_idle_after(park_idle_after),
            drain_timeout: self.duration(
                "server.drain_timeout",
                drain_timeout.as_ref(),
                Duration::from_secs(10),
            ),
            shutdown_timeout: self.duration(
                "server.shutdown_timeout",
                shutdown_timeout.as_ref(),
                Duration::from_secs(2),
            ),
            pid_file: pid_file.unwrap_or_else(|| format!("/tmp/switchyard-{port}.pid")),
            upgrade_sock: upgrade_sock
                .unwrap_or_else(|| format!("/tmp/switchyard-{port}-upgrade.sock")),
            upstream_keepalive_pool: pool.max(1),
        }
    }

    fn ha(&mut self, s: HaSection) -> HaSettings {
        let HaSection {
            track_file,
            interval,
            vips,
            handoff_timeout,
            handoff_linger,
            max_persisted_age,
        } = s;
        let d = HaSettings::default();
        let interval = self.duration("ha.interval", interval.as_ref(), d.interval);
        if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&interval) {
            self.err("ha.interval", format!("invalid duration {interval:?}: must be between 10ms and 10s"));
        }
        let track_file = match track_file.as_deref() {
            None => None,
            Some("") => {
                self.err("ha.track_file", "invalid value \"\": must be a file path");
                None
            }
            // Not checked for existence here (the directory may be created
            // at boot, after `check` ran): a write that fails is logged,
            // counted, shown in /status and reported as not ready.
            Some(p) => Some(self.base.join(p)),
        };
        let mut addrs = Vec::new();
        for (i, vip) in vips.iter().enumerate() {
            match vip.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_unspecified() || ip.is_loopback() => self.err(
                    format!("ha.vips[{i}]"),
                    format!("invalid address {vip:?}: a floating address cannot be unspecified or loopback"),
                ),
                Ok(ip) => addrs.push(ip),
                Err(_) => self.err(format!("ha.vips[{i}]"), format!("invalid IP address {vip:?}")),
            }
        }
        let max_persisted_age = match max_persisted_age.as_deref() {
            Some("off") => None,
            None => d.max_persisted_age,
            v => Some(self.duration("ha.max_persisted_age", v.map(str::to_string).as_ref(), Duration::from_secs(3600))),
        };
        HaSettings {
            track_file,
            interval,
            vips: addrs,
            handoff_timeout: self.duration("ha.handoff_timeout", handoff_timeout.as_ref(), d.handoff_timeout),
            handoff_linger: self.duration("ha.handoff_linger", handoff_linger.as_ref(), d.handoff_linger),
            max_persisted_age,
        }
    }

    fn access_log(&mut self, s: AccessLogSection) -> AccessLogSettings {
        let AccessLogSection {
            enabled,
            format,
            path,
            max_bytes,
            keep,
            buffer_lines,
        } = s;
        let format = match format.as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                self.err(
                    "access_log.format",
                    format!("invalid value {other:?}: expected \"json\" or \"text\""),
                );
                LogFormat::Json
            }
        };
        let target = match path.as_deref() {
            None | Some("-") => LogTarget::Stdout,
            Some("") => {
                self.err("access_log.path", "invalid value \"\": use \"-\" for stdout or a file path");
                LogTarget::Stdout
            }
            Some(p) => LogTarget::File {
                path: self.base.join(p),
                max_bytes: max_bytes.unwrap_or(0),
                keep: keep.unwrap_or(5),
            },
        };
        let buffer_lines = buffer_lines.unwrap_or(16384);
        if buffer_lines == 0 {
            self.err("access_log.buffer_lines", "invalid value 0: must be at least 1");
        }
        AccessLogSettings {
            enabled: enabled.unwrap_or(true),
            format,
            target,
            buffer_lines: buffer_lines.max(1),
        }
    }

    fn clusters(&mut self, sections: BTreeMap<String, ClusterSection>, dns_defaults: &DnsDefaults) -> BTreeMap<String, ClusterSpec> {
        let mut out = BTreeMap::new();
        for (name, c) in sections {
            let p = format!("clusters.{name}");
            if !valid_name(&name) {
                self.err(
                    &p,
                    format!("invalid cluster name {name:?}: use letters, digits, '-', '_' or '.'"),
                );
            }
            let ClusterSection {
                static_,
                file,
                consul,
                dns,
                selection,
                hash_header,
                hash_cookie,
                connect_timeout,
                read_timeout,
                write_timeout,
                idle_timeout,
                tunnel_timeout,
                retries,
                instances,
                tls,
                outlier,
                health_check,
                slow_start,
            } = c;
            let sources = [static_.is_some(), file.is_some(), consul.is_some(), dns.is_some()].iter().filter(|&&b| b).count();
            let discovery = match (static_, file, consul) {
                _ if sources > 1 => {
                    self.err(&p, "set exactly one discovery source (`static`, `file`, `consul` or `dns`), not several");
                    None
                }
                (None, None, None) if dns.is_some() => dns.map(|d| DiscoverySpec::Dns(self.dns_query(&format!("{p}.dns"), d, dns_defaults))),
                (None, None, None) => {
                    self.err(&p, "missing discovery source: set `static = [\"IP:PORT\", ...]`, `file = { catalog = \"...\" }`, `consul = { service = \"...\" }` or `dns = { name = \"...\" }`");
                    None
                }
                (None, None, Some(c)) => {
                    let ConsulDiscoverySection { service, tags, allow_warning, filter, panic_threshold } = c;
                    let service = service.unwrap_or_else(|| name.clone());
                    if service.is_empty() || service.contains(['/', '?', '#', ' ']) {
                        self.err(format!("{p}.consul.service"), format!("invalid service name {service:?}"));
                    }
                    for (i, t) in tags.iter().enumerate() {
                        if t.is_empty() || t.contains(['&', '#']) {
                            self.err(format!("{p}.consul.tags[{i}]"), format!("invalid tag {t:?}"));
                        }
                    }
                    let threshold = panic_threshold.unwrap_or(0.5);
                    if !(0.0..=1.0).contains(&threshold) {
                        self.err(format!("{p}.consul.panic_threshold"), format!("invalid value {threshold}: must be between 0.0 and 1.0"));
                    }
                    if filter.as_deref() == Some("") {
                        self.err(format!("{p}.consul.filter"), "invalid value \"\": omit the field for no filter");
                    }
                    Some(DiscoverySpec::Consul(ConsulQuery {
                        service,
                        tags,
                        allow_warning: allow_warning.unwrap_or(false),
                        filter,
                        panic_permille: (threshold.clamp(0.0, 1.0) * 1000.0).round() as u32,
                    }))
                }
                (Some(list), None, None) => {
                    let mut addrs = Vec::new();
                    let mut names: Vec<DnsQuery> = Vec::new();
                    for (i, a) in list.iter().enumerate() {
                        let ap = format!("{p}.static[{i}]");
                        if let Some((host, port)) = host_and_port(a) {
                            let q = DnsQuery {
                                name: host.to_string(),
                                port: Some(port),
                                nameservers: dns_defaults.nameservers.clone(),
                                min_refresh: dns_defaults.min_refresh,
                                max_refresh: dns_defaults.max_refresh,
                                timeout: dns_defaults.timeout,
                            };
                            if names.contains(&q) {
                                self.err(&ap, format!("duplicate backend {a:?}"));
                            } else {
                                names.push(q);
                            }
                        } else if let Some(addr) = self.socket_addr(&ap, a) {
                            if addrs.contains(&addr) {
                                self.err(&ap, format!("duplicate backend {a:?}"));
                            } else {
                                addrs.push(addr);
                            }
                        }
                    }
                    if list.is_empty() {
                        self.err(format!("{p}.static"), "empty backend list: a static cluster needs at least one address");
                    }
                    if names.is_empty() {
                        Some(DiscoverySpec::Static(addrs))
                    } else {
                        Some(DiscoverySpec::StaticNames { addrs, names })
                    }
                }
                (None, Some(f), None) => {
                    let FileDiscoverySection { catalog, service } = f;
                    if catalog.is_empty() {
                        self.err(format!("{p}.file.catalog"), "invalid value \"\": a file path is required");
                    }
                    let service = service.unwrap_or_else(|| name.clone());
                    if service.is_empty() {
                        self.err(format!("{p}.file.service"), "invalid value \"\": a service name is required");
                    }
                    Some(DiscoverySpec::File {
                        catalog: self.base.join(catalog),
                        service,
                    })
                }
                _ => None,
            };
            let selection = self.selection(&p, selection, hash_header, hash_cookie);
            if slow_start.is_some() && matches!(selection, Selection::ConsistentHash(_)) {
                self.err(format!("{p}.slow_start"), "not available with selection = \"consistent_hash\": a key's backend must not depend on time (remove slow_start)");
            }
            let retries = retries.unwrap_or(2);
            if retries > 10 {
                self.err(format!("{p}.retries"), format!("invalid value {retries}: must be between 0 and 10"));
            }
            let spec = ClusterSpec {
                name: name.clone(),
                discovery: discovery.unwrap_or(DiscoverySpec::Static(Vec::new())),
                selection,
                connect_timeout: self.duration(&format!("{p}.connect_timeout"), connect_timeout.as_ref(), Duration::from_secs(2)),
                read_timeout: self.duration(&format!("{p}.read_timeout"), read_timeout.as_ref(), Duration::from_secs(30)),
                write_timeout: self.duration(&format!("{p}.write_timeout"), write_timeout.as_ref(), Duration::from_secs(30)),
                idle_timeout: self.duration(&format!("{p}.idle_timeout"), idle_timeout.as_ref(), UPSTREAM_IDLE_TIMEOUT),
                tunnel_timeout: self.duration(&format!("{p}.tunnel_timeout"), tunnel_timeout.as_ref(), TUNNEL_TIMEOUT),
                retries: retries.min(10),
                instances: self.instances(&p, instances),
                tls: tls.and_then(|t| self.backend_tls(&format!("{p}.tls"), t)),
                outlier: self.outlier(&format!("{p}.outlier"), outlier),
                health_check: health_check.map(|h| self.health_check(&format!("{p}.health_check"), h)),
                slow_start: slow_start.and_then(|s| self.slow_start(&format!("{p}.slow_start"), s)),
            };
            // A cluster with errors stays known, so routes pointing at it report only their own.
            out.insert(name, spec);
        }
        // A DNS source is named by its DNS name (and port) in /status and
        // metrics: two clusters may share one only with the same settings.
        let mut named: BTreeMap<String, (&String, &DnsQuery)> = BTreeMap::new();
        let queries = out.iter().flat_map(|(cluster, spec)| match &spec.discovery {
            DiscoverySpec::Dns(q) => vec![(cluster, q)],
            DiscoverySpec::StaticNames { names, .. } => names.iter().map(|q| (cluster, q)).collect(),
            _ => Vec::new(),
        });
        for (cluster, q) in queries {
            match named.get(&q.source_name()) {
                Some((other, oq)) if *oq != q => self.err(
                    format!("clusters.{cluster}.dns"),
                    format!("cluster {other:?} asks for the same name{} with other nameservers or refresh settings; give both the same", if q.port.is_some() { " and port" } else { "" }),
                ),
                Some(_) => {}
                None => {
                    named.insert(q.source_name(), (cluster, q));
                }
            }
        }
        out
    }

    /// The `[dns]` section: defaults for every DNS source.
    fn dns_defaults(&mut self, s: DnsSection) -> DnsDefaults {
        let DnsSection { nameservers, min_refresh, max_refresh, timeout } = s;
        let nameservers = self.nameservers("dns.nameservers", nameservers).unwrap_or_default();
        let (min_refresh, max_refresh) = self.refresh_bounds("dns", min_refresh, max_refresh, DNS_MIN_REFRESH, DNS_MAX_REFRESH);
        let timeout = self.dns_timeout("dns.timeout", timeout, DNS_TIMEOUT);
        DnsDefaults { nameservers, min_refresh, max_refresh, timeout }
    }

    /// A cluster's `dns = { ... }`, its unset fields taken from `[dns]`.
    fn dns_query(&mut self, p: &str, d: DnsDiscoverySection, defaults: &DnsDefaults) -> DnsQuery {
        let DnsDiscoverySection { name, port, nameservers, min_refresh, max_refresh, timeout } = d;
        if !dns_name_ok(&name) {
            self.err(
                format!("{p}.name"),
                format!("invalid DNS name {name:?}: letters, digits, '-' and '_' in dot-separated labels of at most 63 characters, at most 253 in all (e.g. \"_http._tcp.web.example.\")"),
            );
        }
        if port == Some(0) {
            self.err(format!("{p}.port"), "invalid value 0: must be between 1 and 65535");
        }
        let nameservers = self.nameservers(&format!("{p}.nameservers"), nameservers).unwrap_or_else(|| defaults.nameservers.clone());
        let (min_refresh, max_refresh) = self.refresh_bounds(p, min_refresh, max_refresh, defaults.min_refresh, defaults.max_refresh);
        let timeout = self.dns_timeout(&format!("{p}.timeout"), timeout, defaults.timeout);
        DnsQuery { name, port, nameservers, min_refresh, max_refresh, timeout }
    }

    /// `IP` or `IP:PORT` each (port 53 by default); None when not given.
    fn nameservers(&mut self, p: &str, list: Option<Vec<String>>) -> Option<Vec<SocketAddr>> {
        let list = list?;
        if list.is_empty() {
            self.err(p, "empty list: omit the field to use the system's resolver (/etc/resolv.conf)");
        }
        let mut out = Vec::new();
        for (i, a) in list.iter().enumerate() {
            let parsed = a.parse::<SocketAddr>().ok().or_else(|| {
                a.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Some(s) if s.port() != 0 && !s.ip().is_unspecified() => out.push(s),
                _ => self.err(format!("{p}[{i}]"), format!("invalid nameserver {a:?}: expected IP or IP:PORT, e.g. \"127.0.0.1:8600\"")),
            }
        }
        Some(out)
    }

    fn refresh_bounds(&mut self, p: &str, min: Option<String>, max: Option<String>, dmin: Duration, dmax: Duration) -> (Duration, Duration) {
        let min_d = self.duration(&format!("{p}.min_refresh"), min.as_ref(), dmin);
        let max_d = self.duration(&format!("{p}.max_refresh"), max.as_ref(), dmax);
        if min_d < Duration::from_millis(100) {
            self.err(format!("{p}.min_refresh"), format!("invalid duration {:?}: must be at least 100ms", min.unwrap_or_default()));
            return (dmin, dmax);
        }
        if max_d > Duration::from_secs(3600) {
            self.err(format!("{p}.max_refresh"), format!("invalid duration {:?}: must be at most 1h", max.unwrap_or_default()));
            return (dmin, dmax);
        }
        if max_d < min_d {
            self.err(format!("{p}.max_refresh"), format!("invalid duration {:?}: must not be less than min_refresh ({min_d:?})", max.unwrap_or_default()));
            return (dmin, dmax.max(dmin));
        }
        (min_d, max_d)
    }

    fn dns_timeout(&mut self, p: &str, value: Option<String>, default: Duration) -> Duration {
        let d = self.duration(p, value.as_ref(), default);
        if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&d) {
            self.err(p, format!("invalid duration {:?}: must be between 10ms and 60s", value.unwrap_or_default()));
            return default;
        }
        d
    }

    fn consul(&mut self, s: ConsulSection, env: &dyn Fn(&str) -> Option<String>, listen_port: u16) -> ConsulSettings {
        let ConsulSection {
            addresses,
            token,
            token_file,
            datacenter,
            stale,
            max_stale,
            wait,
            max_watches,
            min_interval,
            noop_interval,
            state_file,
            stale_after,
            tls,
            auto_routes,
            register,
            kv,
            kv_prefix,
        } = s;
        let kv_prefix = match (kv.unwrap_or(false), kv_prefix) {
            (false, Some(_)) => {
                self.err("consul.kv_prefix", "set `kv = true` too, or remove it");
                None
            }
            (false, None) => None,
            (true, p) => {
                let p = p.unwrap_or_else(|| "switchyard/".into());
                let ok = !p.starts_with('/') && p.ends_with('/') && p.len() > 1 && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_./-".contains(&b));
                if !ok {
                    self.err("consul.kv_prefix", format!("invalid value {p:?}: letters, digits, '_', '.', '/', '-', ending in '/', not starting with '/'"));
                }
                Some(p)
            }
        };
        let env_bool = |k: &str| env(k).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let https_default = env_bool("CONSUL_HTTP_SSL").unwrap_or(false);
        let (raw, from) = match addresses {
            Some(a) => (a, "consul.addresses"),
            None => match env("CONSUL_HTTP_ADDR") {
                Some(a) => (vec![a], "CONSUL_HTTP_ADDR"),
                None => (vec!["127.0.0.1:8500".to_string()], "consul.addresses"),
            },
        };
        let mut addrs = Vec::new();
        for (i, a) in raw.iter().enumerate() {
            let path = if from == "CONSUL_HTTP_ADDR" { from.to_string() } else { format!("consul.addresses[{i}]") };
            match consul_base_url(a, https_default) {
                Ok(u) => addrs.push(u),
                Err(m) => self.err(path, m),
            }
        }
        if addrs.is_empty() && !raw.is_empty() {
            // errors already reported
        } else if raw.is_empty() {
            self.err("consul.addresses", "at least one agent address is required");
        }
        // Token: the file's own settings win over the environment; within each,
        // a token file wins over a literal token (the Go client's rule).
        let (token, token_file) = match (token, token_file) {
            (_, Some(f)) => (None, Some(self.base.join(f))),
            (Some(t), None) => (Some(t), None),
            (None, None) => match (env("CONSUL_HTTP_TOKEN_FILE"), env("CONSUL_HTTP_TOKEN")) {
                (Some(f), _) => (None, Some(PathBuf::from(f))),
                (None, t) => (t, None),
            },
        };
        let token = match &token_file {
            Some(f) => match std::fs::read_to_string(f) {
                Ok(t) => Some(t.trim().to_string()).filter(|t| !t.is_empty()),
                Err(e) => {
                    self.err("consul.token_file", format!("cannot read token file {}: {e}", f.display()));
                    None
                }
            },
            None => token,
        };
        let t = tls.unwrap_or_default();
        let path_or_env = |v: Option<String>, var: &str| v.map(|p| self.base.join(p)).or_else(|| env(var).map(PathBuf::from));
        let tls = ConsulTls {
            ca_file: path_or_env(t.ca_file, "CONSUL_CACERT"),
            ca_path: path_or_env(t.ca_path, "CONSUL_CAPATH"),
            cert_file: path_or_env(t.cert_file, "CONSUL_CLIENT_CERT"),
            key_file: path_or_env(t.key_file, "CONSUL_CLIENT_KEY"),
            server_name: t.server_name.or_else(|| env("CONSUL_TLS_SERVER_NAME")),
            verify: t.verify.or_else(|| env_bool("CONSUL_HTTP_SSL_VERIFY")).unwrap_or(true),
        };
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            self.err("consul.tls", "client certificate and key go together: set both cert_file and key_file (or CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY), or neither");
        }
        for (field, p) in [("ca_file", &tls.ca_file), ("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
            if let Some(p) = p {
                if !p.is_file() {
                    self.err(format!("consul.tls.{field}"), format!("no such file {}", p.display()));
                }
            }
        }
        if let Some(p) = &tls.ca_path {
            if !p.is_dir() {
                self.err("consul.tls.ca_path", format!("no such directory {}", p.display()));
            }
        }
        let wait = self.duration("consul.wait", wait.as_ref(), Duration::from_secs(300));
        if wait > Duration::from_secs(600) {
            self.err("consul.wait", format!("invalid duration {wait:?}: Consul caps blocking waits at 10m"));
        } else if wait < Duration::from_secs(1) {
            self.err(
                "consul.wait",
                format!("invalid duration {wait:?}: must be at least 1s (a shorter wait turns every watch into a polling loop against the agent)"),
            );
        }
        let max_watches = max_watches.unwrap_or(64);
        if !(6..=190).contains(&max_watches) {
            self.err(
                "consul.max_watches",
                format!("invalid value {max_watches}: must be between 6 and 190 (the whole connection budget towards the agent, which allows 200 per client; 4 go to short reads and writes)"),
            );
        }
        ConsulSettings {
            addresses: addrs,
            token: token.map(Secret),
            token_file,
            datacenter,
            stale: stale.unwrap_or(true),
            max_stale: self.duration("consul.max_stale", max_stale.as_ref(), Duration::from_secs(2)),
            wait: wait.min(Duration::from_secs(600)),
            max_watches,
            min_interval: self.duration("consul.min_interval", min_interval.as_ref(), Duration::from_millis(50)),
            noop_interval: self.duration("consul.noop_interval", noop_interval.as_ref(), Duration::from_secs(1)),
            state_file: state_file.map(|f| self.base.join(f)),
            stale_after: self.duration("consul.stale_after", stale_after.as_ref(), Duration::from_secs(60)),
            tls,
            auto_routes: auto_routes.unwrap_or(true),
            register: self.register(register.unwrap_or_default(), listen_port),
            kv_prefix,
        }
    }

    fn register(&mut self, r: RegisterSection, listen_port: u16) -> Option<RegisterSettings> {
        let RegisterSection { enabled, name, id, address, port, tags, ttl, deregister_after } = r;
        if !enabled.unwrap_or(true) {
            return None;
        }
        let name = name.unwrap_or_else(|| "switchyard".into());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let port = port.unwrap_or(listen_port);
        let id = id.unwrap_or_else(|| format!("{name}-{host}-{port}"));
        for (field, v) in [("name", &name), ("id", &id)] {
            if v.is_empty() || v.contains(['/', ' ', '?', '#']) {
                self.err(format!("consul.register.{field}"), format!("invalid value {v:?}"));
            }
        }
        if let Some(a) = &address {
            if a == "0.0.0.0" || a == "::" || a.is_empty() {
                self.err("consul.register.address", format!("invalid value {a:?}: Consul refuses unspecified addresses; omit it to use the node address"));
            }
        }
        let ttl = self.duration("consul.register.ttl", ttl.as_ref(), Duration::from_secs(10));
        let deregister_after = self.duration("consul.register.deregister_after", deregister_after.as_ref(), Duration::from_secs(60));
        if deregister_after < Duration::from_secs(60) {
            self.err("consul.register.deregister_after", format!("invalid duration {deregister_after:?}: Consul's minimum is 1m"));
        }
        Some(RegisterSettings { name, id, address, port, tags, ttl, deregister_after })
    }

    fn selection(
        &mut self,
        p: &str,
        selection: Option<String>,
        hash_header: Option<String>,
        hash_cookie: Option<String>,
    ) -> Selection {
        let sel = match selection.as_deref() {
            None | Some("round_robin") => Selection::RoundRobin,
            Some("weighted") => Selection::Weighted,
            Some("least_connections") => Selection::LeastConnections,
            Some("consistent_hash") => {
                let key = match (&hash_header, &hash_cookie) {
                    (Some(h), None) => match http::HeaderName::from_bytes(h.as_bytes()) {
                        Ok(name) => Some(HashKey::Header(name)),
                        Err(_) => {
                            self.err(format!("{p}.hash_header"), format!("invalid header name {h:?}"));
                            None
                        }
                    },
                    (None, Some(c)) if !c.is_empty() && !c.contains([';', '=', ' ']) => {
                        Some(HashKey::Cookie(c.clone()))
                    }
                    (None, Some(c)) => {
                        self.err(format!("{p}.hash_cookie"), format!("invalid cookie name {c:?}"));
                        None
                    }
                    _ => {
                        self.err(
                            format!("{p}.selection"),
                            "\"consistent_hash\" needs exactly one of `hash_header` or `hash_cookie`",
                        );
                        None
                    }
                };
                return Selection::ConsistentHash(
                    key.unwrap_or(HashKey::Cookie(String::new())),
                );
            }
            Some(other) => {
                self.err(
                    format!("{p}.selection"),
                    format!("invalid value {other:?}: expected \"round_robin\", \"weighted\", \"least_connections\" or \"consistent_hash\""),
                );
                Selection::RoundRobin
            }
        };
        if hash_header.is_some() {
            self.err(format!("{p}.hash_header"), "only valid with selection = \"consistent_hash\"");
        }
        if hash_cookie.is_some() {
            self.err(format!("{p}.hash_cookie"), "only valid with selection = \"consistent_hash\"");
        }
        sel
    }

    /// A list of networks, each a CIDR or a single address.
    fn networks(&mut self, p: &str, list: &[String]) -> Vec<ipnet::IpNet> {
        let mut nets = Vec::new();
        for (i, a) in list.iter().enumerate() {
            match a.parse::<ipnet::IpNet>().or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from)) {
                Ok(n) => nets.push(n.trunc()),
                Err(_) => self.err(format!("{p}[{i}]"), format!("invalid network {a:?}: expected a CIDR such as \"10.0.0.0/8\" or an address")),
            }
        }
        nets
    }

    fn limits(&mut self, s: LimitsSection) -> Limits {
        let LimitsSection { max_header_bytes, max_headers, max_uri_bytes, max_body_bytes, keepalive_timeout, header_timeout, max_connections } = s;
        let d = Limits::default();
        let mut timeout = |field: &str, v: Option<String>, default: Duration| {
            let path = format!("limits.{field}");
            let t = self.duration(&path, v.as_ref(), default);
            if t > MAX_CLIENT_TIMEOUT {
                self.err(path, format!("invalid duration {:?}: must be at most 1h", v.unwrap_or_default()));
                return default;
            }
            t
        };
        let keepalive = timeout("keepalive_timeout", keepalive_timeout, d.keepalive_timeout);
        let header_timeout = timeout("header_timeout", header_timeout, d.header_timeout);
        let mut within = |field: &str, v: Option<u64>, default: u64, min: u64, max: u64| -> u64 {
            match v {
                None => default,
                Some(v) if (min..=max).contains(&v) => v,
                Some(v) => {
                    self.err(format!("limits.{field}"), format!("invalid value {v}: must be between {min} and {max}"));
                    default
                }
            }
        };
        Limits {
            // Pingora itself reads at most 1 MiB of head and 256 headers.
            max_header_bytes: within("max_header_bytes", max_header_bytes, d.max_header_bytes as u64, 1024, 1024 * 1024) as usize,
            max_headers: within("max_headers", max_headers, d.max_headers as u64, 8, 256) as usize,
            max_uri_bytes: within("max_uri_bytes", max_uri_bytes, d.max_uri_bytes as u64, 256, 1024 * 1024) as usize,
            max_body_bytes: within("max_body_bytes", max_body_bytes, d.max_body_bytes, 0, u64::MAX),
            keepalive_timeout: keepalive,
            header_timeout,
            max_connections: max_connections.map(|v| within("max_connections", Some(v), 1024, 1, 1_000_000) as usize),
        }
    }

    fn forwarding(&mut self, s: ForwardingSection) -> ForwardingSettings {
        let ForwardingSection { trusted_proxies, forwarded } = s;
        ForwardingSettings {
            trusted_proxies: self.networks("forwarding.trusted_proxies", &trusted_proxies),
            forwarded: forwarded.unwrap_or(false),
        }
    }

    fn maintenance(&mut self, p: &str, m: MaintenanceSection) -> Option<Maintenance> {
        let MaintenanceSection { enabled, body, retry_after, allow } = m;
        let retry = self.duration(&format!("{p}.retry_after"), retry_after.as_ref(), Duration::from_secs(60));
        if retry_after.is_some() && (retry.subsec_nanos() != 0 || retry > Duration::from_secs(86_400)) {
            self.err(format!("{p}.retry_after"), format!("invalid value {:?}: whole seconds, at most 1 day", retry_after.unwrap_or_default()));
        }
        if let Some(b) = &body {
            if b.len() > 64 * 1024 {
                self.err(format!("{p}.body"), format!("invalid value: {} bytes, at most 65536", b.len()));
            }
        }
        let nets = self.networks(&format!("{p}.allow"), &allow);
        enabled.unwrap_or(true).then(|| Maintenance {
            body: bytes::Bytes::from(body.unwrap_or_else(|| MAINTENANCE_BODY.to_string())),
            retry_after_secs: retry.as_secs(),
            allow: nets,
        })
    }

    fn instances(&mut self, p: &str, sections: BTreeMap<String, InstanceSection>) -> BTreeMap<String, InstanceOverride> {
        let mut out = BTreeMap::new();
        for (key, i) in sections {
            let at = format!("{p}.instances.{key}");
            if key.is_empty() || key.len() > 256 || key.contains(['/', ' ']) {
                self.err(&at, format!("invalid instance {key:?}: a Consul service ID or an ip:port address"));
            }
            let InstanceSection { weight, drain } = i;
            if let Some(w) = weight.filter(|w| *w > crate::discovery::file::MAX_WEIGHT) {
                self.err(format!("{at}.weight"), format!("invalid value {w}: must be between 0 and {}", crate::discovery::file::MAX_WEIGHT));
            }
            if weight.is_none() && drain.is_none() {
                self.err(&at, "set `weight` or `drain`");
            }
            out.insert(key, InstanceOverride { weight, drain: drain.unwrap_or(false) });
        }
        out
    }

    fn routes(&mut self, sections: Vec<RouteSection>, clusters: &[String], required: bool) -> Vec<RouteSpec> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        let mut keys: HashSet<(Option<HostPattern>, String)> = HashSet::new();
        for (i, r) in sections.into_iter().enumerate() {
            let p = format!("routes[{i}]");
            let RouteSection {
                name,
                hosts,
                path_prefix,
                cluster,
                maintenance,
                https_redirect,
            } = r;
            let maintenance = maintenance.and_then(|m| self.maintenance(&format!("{p}.maintenance"), m));
            let https_redirect = match https_redirect {
                None | Some(HttpsRedirectSection::On(false)) => None,
                Some(HttpsRedirectSection::On(true)) => Some(HttpsRedirect { port: 443, status: 308 }),
                Some(HttpsRedirectSection::With(t)) => {
                    let status = t.status.unwrap_or(308);
                    if ![301, 302, 307, 308].contains(&status) {
                        self.err(format!("{p}.https_redirect.status"), format!("invalid value {status}: expected 301, 302, 307 or 308"));
                    }
                    let port = t.port.unwrap_or(443);
                    if port == 0 {
                        self.err(format!("{p}.https_redirect.port"), "invalid value 0: expected a port from 1 to 65535");
                    }
                    Some(HttpsRedirect { port, status })
                }
            };
            let name = name.unwrap_or_else(|| format!("route{i}"));
            if !valid_name(&name) {
                self.err(format!("{p}.name"), format!("invalid route name {name:?}: use letters, digits, '-', '_' or '.'"));
            }
            if !names.insert(name.clone()) {
                self.err(format!("{p}.name"), format!("duplicate route name {name:?}"));
            }
            if !clusters.contains(&cluster) {
                let known: Vec<&str> = clusters.iter().map(|s| s.as_str()).collect();
                self.err(
                    format!("{p}.cluster"),
                    format!("unknown cluster {cluster:?} (defined: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") }),
                );
            }
            let path_prefix = path_prefix.unwrap_or_else(|| "/".to_string());
            if !path_prefix.starts_with('/') || path_prefix.contains(['?', '#', ' ']) {
                self.err(
                    format!("{p}.path_prefix"),
                    format!("invalid value {path_prefix:?}: must start with '/' and hold no '?', '#' or spaces"),
                );
            }
            let mut patterns = Vec::new();
            for (j, h) in hosts.iter().enumerate() {
                match host_pattern(h) {
                    Some(pat) => patterns.push(pat),
                    None => self.err(
                        format!("{p}.hosts[{j}]"),
                        format!("invalid host {h:?}: expected a DNS name such as \"api.example.com\" or \"*.example.com\" (no port, no scheme)"),
                    ),
                }
            }
            let host_keys: Vec<Option<HostPattern>> = if patterns.is_empty() {
                vec![None]
            } else {
                patterns.iter().cloned().map(Some).collect()
            };
            for k in host_keys {
                let shown = match &k {
                    None => "*".to_string(),
                    Some(HostPattern::Exact(h)) => h.clone(),
                    Some(HostPattern::Suffix(s)) => format!("*{s}"),
                };
                if !keys.insert((k, path_prefix.clone())) {
                    self.err(
                        &p,
                        format!("host {shown:?} with path_prefix {path_prefix:?} is already matched by an earlier route"),
                    );
                }
            }
            out.push(RouteSpec {
                name,
                hosts: patterns,
                path_prefix,
                cluster,
                maintenance,
                https_redirect,
            });
        }
        if required && out.is_empty() && !self.errors.iter().any(|e| e.path.starts_with("routes")) {
            self.err("routes", "at least one [[routes]] entry is required");
        }
        out
    }
}

/// Normalise an agent address to a base URL without a trailing slash.
fn consul_base_url(a: &str, https_default: bool) -> Result<String, String> {
    let a = a.trim();
    if a.starts_with("unix://") {
        return Err(format!("unsupported agent address {a:?}: unix sockets are not supported; use host:port"));
    }
    let url = if a.contains("://") {
        a.to_string()
    } else if https_default {
        format!("https://{a}")
    } else {
        format!("http://{a}")
    };
    let uri: http::Uri = url.parse().map_err(|_| format!("invalid agent address {a:?}: expected host:port or http(s)://host:port"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("invalid agent address {a:?}: scheme must be http or https")),
    }
    if uri.authority().is_none() || uri.host().unwrap_or("").is_empty() {
        return Err(format!("invalid agent address {a:?}: no host"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// `[dns]` after validation: what a cluster's `dns` leaves unset.
struct DnsDefaults {
    nameservers: Vec<SocketAddr>,
    min_refresh: Duration,
    max_refresh: Duration,
    timeout: Duration,
}

/// A static backend given as `HOST:PORT` with a DNS name for the host (an
/// address such as `10.0.0.1:80` or `[::1]:80` is not one).
fn host_and_port(a: &str) -> Option<(&str, u16)> {
    if a.parse::<SocketAddr>().is_ok() {
        return None;
    }
    let (host, port) = a.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (!numeric && dns_name_ok(host)).then_some((host, port))
}

/// A DNS name as a query takes it: labels of letters, digits, '-' and '_',
/// an optional final dot.
fn dns_name_ok(name: &str) -> bool {
    let body = name.strip_suffix('.').unwrap_or(name);
    !body.is_empty()
        && body.len() <= 253
        && body.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Parse a route host: `name.example.com` or `*.example.com`, case-folded.
pub fn host_pattern(h: &str) -> Option<HostPattern> {
    let h = h.to_ascii_lowercase();
    let (wild, rest) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest.to_string()),
        None => (false, h.clone()),
    };
    let ok = !rest.is_empty()
        && rest.len() <= 253
        && rest.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        return None;
    }
    Some(if wild {
        HostPattern::Suffix(format!(".{rest}"))
    } else {
        HostPattern::Exact(rest)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        match parse(text, Path::new("/etc/sy")) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const MINIMAL: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"
[[routes]]
cluster = "web"
[clusters.web]
static = ["127.0.0.1:8001"]
"#;

    #[test]
    fn maintenance_and_instance_overrides_are_validated_by_field() {
        let ok = MINIMAL
            .replace("cluster = \"web\"\n", "cluster = \"web\"\nmaintenance = { retry_after = \"2m\", allow = [\"10.1.2.3/8\", \"::1\"] }\n")
            .replace("[clusters.web]\n", "[clusters.web]\ninstances = { \"web-1\" = { drain = true }, \"10.0.0.1:80\" = { weight = 5 } }\n");
        let c = parse(&ok, Path::new("/etc/sy")).unwrap();
        let m = c.routes[0].maintenance.as_ref().unwrap();
        assert_eq!(m.retry_after_secs, 120);
        assert_eq!(&m.body[..], MAINTENANCE_BODY.as_bytes());
        assert!(!m.applies_to(Some("10.9.9.9".parse().unwrap())), "inside 10.0.0.0/8");
        assert!(!m.applies_to(Some("::ffff:10.0.0.1".parse().unwrap())), "v4-mapped");
        assert!(m.applies_to(Some("192.0.2.1".parse().unwrap())));
        assert!(m.applies_to(None));
        assert!(c.clusters["web"].instances["web-1"].drain);
        assert_eq!(c.clusters["web"].instances["10.0.0.1:80"].weight, Some(5));
        let off = MINIMAL.replace("cluster = \"web\"\n", "cluster = \"web\"\nmaintenance = { enabled = false }\n");
        assert!(parse(&off, Path::new("/etc/sy")).unwrap().routes[0].maintenance.is_none());

        let bad = MINIMAL
            .replace("cluster = \"web\"\n", "cluster = \"web\"\nmaintenance = { retry_after = \"1.5s\", allow = [\"10.0.0.0/33\"] }\n")
            .replace("[clusters.web]\n", "[clusters.web]\ninstances = { \"a\" = { weight = 70000 }, \"b\" = {} }\n");
        let e = errs(&bad);
        assert!(e.iter().any(|e| e.contains("routes[0].maintenance.retry_after") && e.contains("1.5s")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("routes[0].maintenance.allow[0]") && e.contains("10.0.0.0/33")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("clusters.web.instances.a.weight") && e.contains("70000")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("clusters.web.instances.b") && e.contains("`weight` or `drain`")), "{e:?}");
    }

    #[test]
    fn limits_section() {
        let c = parse(MINIMAL, Path::new("/etc/sy")).unwrap();
        assert_eq!(c.limits, Limits::default());
        assert_eq!((c.limits.max_header_bytes, c.limits.max_body_bytes), (32 * 1024, 64 * 1024 * 1024));
        let c = parse(&format!("[limits]\nmax_uri_bytes = 2048\nmax_body_bytes = 0\n{MINIMAL}"), Path::new("/etc/sy")).unwrap();
        assert_eq!((c.limits.max_uri_bytes, c.limits.max_body_bytes), (2048, 0));
        let e = errs(&format!("[limits]\nmax_headers = 1000\nmax_header_bytes = 10\nmax_body = 5\n{MINIMAL}"));
        assert!(e.iter().any(|e| e.contains("limits") && e.contains("max_body")), "unknown field named: {e:?}");
        let e = errs(&format!("[limits]\nmax_headers = 1000\nmax_header_bytes = 10\n{MINIMAL}"));
        assert!(e.iter().any(|e| e.contains("limits.max_headers") && e.contains("1000")), "{e:?}");
        assert!(e.iter().any(|e| e.contains("limits.max_header_bytes") && e.contains("10")), "{e:?}");
        let c = parse(&format!("[limits]\nkeepalive_timeout = \"750ms\"\n{MINIMAL}"), Path::new("/etc/sy")).unwrap();
        assert_eq!(c.limits.keepalive_timeout, Duration::from_millis(750));
        let c = parse(&format!("[limits]\nmax_connections = 2\n{MINIMAL}"), Path::new("/etc/sy")).unwrap();
        assert_eq!((c.limits.max_connections, Limits::default().max_connections), (Some(2), None));
        let e = errs(&format!("[limits]\nmax_connections = 0\n{MINIMAL}"));
        assert!(e.iter().any(|e| e.contains("limits.max_connections") && e.contains("invalid value 0")), "{e:?}");
        assert!(crate::config::default_max_connections() >= 64);
        let c = parse(&format!("[limits]\nheader_timeout = \"2s\"\n{MINIMAL}"), Path::new("/etc/sy")).unwrap();
        assert_eq!((c.limits.header_timeout, Limits::default().header_timeout), (Duration::from_secs(2), Duration::from_secs(10)));
        for field in ["keepalive_timeout", "header_timeout"] {
            for bad in ["0s", "2h", "soon"] {
                let e = errs(&format!("[limits]\n{field} = \"{bad}\"\n{MINIMAL}"));
                assert!(e.iter().any(|e| e.contains(&format!("limits.{field}")) && e.contains(bad)), "{field} {bad}: {e:?}");
            }
        }
    }

    #[test]
    fn forwarding_section() {
        let c = parse(MINIMAL, Path::new("/etc/sy")).unwrap();
        assert!(c.forwarding.trusted_proxies.is_empty() && !c.forwarding.forwarded, "trust no one by default");
        let ok = format!("[forwarding]\ntrusted_proxies = [\"10.1.2.3/8\", \"2001:db8::1\"]\nforwarded = true\n{MINIMAL}");
        let c = parse(&ok, Path::new("/etc/sy")).unwrap();
        assert_eq!(c.forwarding.trusted_proxies, vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::1/128".parse().unwrap()]);
        assert!(c.forwarding.forwarded);
        assert!(c.forwarding.trusts("10.9.9.9".parse().unwrap()) && !c.forwarding.trusts("11.0.0.1".parse().unwrap()));
        let e = errs(&format!("[forwarding]\ntrusted_proxies = [\"10.0.0.0/8\", \"lb.example\"]\nforwarded = \"yes\"\n{MINIMAL}"));
        assert!(e.iter().any(|e| e.contains("forwarding") && e.contains("forwarded")), "{e:?}");
        let e = errs(&format!("[forwarding]\ntrusted_proxies = [\"10.0.0.0/8\", \"lb.example\"]\n{MINIMAL}"));
        assert!(e.iter().any(|e| e.contains("forwarding.trusted_proxies[1]") && e.contains("lb.example")), "{e:?}");
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL, Path::new("/etc/sy")).unwrap();
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.clusters["web"].retries, 2);
        assert_eq!(c.server.pid_file, "/tmp/switchyard-8080.pid");
        assert!(c.listeners[0].h2c);
    }

    #[test]
    fn park_idle_after_is_a_duration_below_the_keepalive_timeout_or_off() {
        let with = |v: &str| MINIMAL.replace("[[listeners]]", &format!("[server]\npark_idle_after = {v:?}\n[[listeners]]"));
        assert_eq!(parse(MINIMAL, Path::new("/etc/sy")).unwrap().server.park_idle_after, Some(DEFAULT_PARK_IDLE_AFTER));
        let c = parse(&with("250ms"), Path::new("/etc/sy")).unwrap();
        assert_eq!(c.server.park_idle_after, Some(Duration::from_millis(250)));
        assert_eq!(parse(&with("off"), Path::new("/etc/sy")).unwrap().server.park_idle_after, None);
        let e = errs(&with("60s"));
        assert!(e.iter().any(|e| e.contains("server.park_idle_after") && e.contains("\"60s\"") && e.contains("less than limits.keepalive_timeout (1m)")), "{e:?}");
        let short = with("5s").replace("[[listeners]]", "[limits]\nkeepalive_timeout = \"5s\"\n[[listeners]]");
        assert!(errs(&short).iter().any(|e| e.contains("server.park_idle_after") && e.contains("(5s)")));
        assert!(parse(&with("4s").replace("[[listeners]]", "[limits]\nkeepalive_timeout = \"5s\"\n[[listeners]]"), Path::new("/etc/sy")).is_ok());
        let e = errs(&with("never"));
        assert!(e.iter().any(|e| e.contains("server.park_idle_after") && e.contains("invalid duration \"never\"")), "{e:?}");
        let e = errs(&with("0s"));
        assert!(e.iter().any(|e| e.contains("server.park_idle_after") && e.contains("greater than zero")), "{e:?}");
    }

    #[test]
    fn every_error_is_reported_with_path_and_value() {
        let text = r#"
[server]
drain_timeout = "5 parsecs"
[[listeners]]
address = "127.0.0.1:80800"
[[routes]]
cluster = "nope"
path_prefix = "api"
hosts = ["bad host"]
[clusters.web]
static = ["1.2.3.4"]
selection = "fastest"
bogus = 1
[clusters.api]
file = { catalog = "c.json" }
static = ["127.0.0.1:1"]
"#;
        let e = errs(text);
        let joined = e.join("\n");
        for needle in [
            "server.drain_timeout: invalid duration \"5 parsecs\"",
            "listeners[0].address: invalid socket address \"127.0.0.1:80800\"",
            "routes[0].cluster: unknown cluster \"nope\"",
            "routes[0].path_prefix: invalid value \"api\"",
            "routes[0].hosts[0]: invalid host \"bad host\"",
            "clusters.web.bogus: unknown field `bogus`",
            "clusters.api: set exactly one discovery source",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in:\n{joined}");
        }
    }

    #[test]
    fn relative_catalog_is_anchored_at_config_dir() {
        let text = MINIMAL.replace("static = [\"127.0.0.1:8001\"]", "file = { catalog = \"cat.json\" }");
        let c = parse(&text, Path::new("/etc/sy")).unwrap();
        assert_eq!(
            c.clusters["web"].discovery,
            DiscoverySpec::File {
                catalog: "/etc/sy/cat.json".into(),
                service: "web".into()
            }
        );
    }

    #[test]
    fn duplicate_route_keys_are_rejected() {
        let text = format!("{MINIMAL}\n[[routes]]\ncluster = \"web\"\n");
        let e = errs(&text).join("\n");
        assert!(e.contains("routes[1]: host \"*\" with path_prefix \"/\" is already matched"), "{e}");
    }

    #[test]
    fn consistent_hash_needs_a_key() {
        let text = MINIMAL.replace("[clusters.web]", "[clusters.web]\nselection = \"consistent_hash\"");
        let e = errs(&text).join("\n");
        assert!(e.contains("clusters.web.selection: \"consistent_hash\" needs exactly one"), "{e}");
    }

    #[test]
    fn consul_env_conventions() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("token");
        std::fs::write(&tf, "from-file\n").unwrap();
        let tf_s = tf.display().to_string();
        let text = MINIMAL.replace("static = [\"127.0.0.1:8001\"]", "consul = { service = \"web\" }");
        let env_map = [
            ("CONSUL_HTTP_ADDR", "consul.internal:8501"),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_HTTP_TOKEN", "from-env"),
            ("CONSUL_HTTP_TOKEN_FILE", tf_s.as_str()),
            ("CONSUL_TLS_SERVER_NAME", "server.dc1.consul"),
            ("CONSUL_HTTP_SSL_VERIFY", "false"),
        ];
        let env = |k: &str| env_map.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        let c = parse_with_env(&text, Path::new("/etc/sy"), &env).unwrap();
        let consul = c.consul.unwrap();
        assert_eq!(consul.addresses, vec!["https://consul.internal:8501".to_string()]);
        assert_eq!(consul.token.as_ref().map(|t| t.0.as_str()), Some("from-file"), "token file wins");
        assert_eq!(consul.tls.server_name.as_deref(), Some("server.dc1.consul"));
        assert!(!consul.tls.verify);
        assert!(consul.stale);
        assert_eq!(consul.wait, Duration::from_secs(300));
        // The file's settings win over the environment.
        let text2 = format!("{text}\n[consul]\naddresses = [\"10.0.0.1:8500\", \"http://10.0.0.2:8500/\"]\ntoken = \"lit\"\n");
        let consul = parse_with_env(&text2, Path::new("/etc/sy"), &|_| None).unwrap().consul.unwrap();
        assert_eq!(consul.addresses, vec!["http://10.0.0.1:8500".to_string(), "http://10.0.0.2:8500".to_string()]);
        assert_eq!(consul.token.as_ref().map(|t| t.0.as_str()), Some("lit"));
        // Only one of client cert / key: an error naming both.
        let env3 = |k: &str| (k == "CONSUL_CLIENT_CERT").then(|| "/etc/hosts".to_string());
        let e = parse_with_env(&text, Path::new("/etc/sy"), &env3).unwrap_err().to_string();
        assert!(e.contains("consul.tls: client certificate and key go together"), "{e}");
        let e = parse_with_env(&format!("{text}\n[consul]\naddresses = [\"unix:///tmp/c.sock\"]\nwait = \"20m\"\n"), Path::new("/"), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("consul.addresses[0]: unsupported agent address"), "{e}");
        assert!(e.contains("consul.wait: invalid duration"), "{e}");
        let e = parse_with_env(&format!("{text}\n[consul]\nwait = \"5ms\"\n"), Path::new("/"), &|_| None).unwrap_err().to_string();
        assert!(e.contains("consul.wait: invalid duration 5ms: must be at least 1s"), "{e}");
    }

    #[test]
    fn dns_clusters_take_unset_fields_from_the_dns_section() {
        let text = MINIMAL.replace("static = [\"127.0.0.1:8001\"]", "dns = { name = \"_http._tcp.web.\" }\n[clusters.api]\ndns = { name = \"api.test\", port = 8080, nameservers = [\"::1\"], max_refresh = \"10s\" }")
            + "\n[dns]\nnameservers = [\"127.0.0.1:8600\", \"127.0.0.2\"]\nmin_refresh = \"2s\"\n";
        let c = parse(&text, Path::new("/etc/sy")).unwrap();
        let DiscoverySpec::Dns(web) = &c.clusters["web"].discovery else { panic!() };
        assert_eq!(web.port, None);
        assert_eq!(web.nameservers, vec!["127.0.0.1:8600".parse().unwrap(), "127.0.0.2:53".parse().unwrap()]);
        assert_eq!((web.min_refresh, web.max_refresh, web.timeout), (Duration::from_secs(2), DNS_MAX_REFRESH, DNS_TIMEOUT));
        let DiscoverySpec::Dns(api) = &c.clusters["api"].discovery else { panic!() };
        assert_eq!(api.nameservers, vec!["[::1]:53".parse().unwrap()]);
        assert_eq!((api.port, api.min_refresh, api.max_refresh), (Some(8080), Duration::from_secs(2), Duration::from_secs(10)));
        // No nameservers anywhere: the system's resolver.
        let plain = MINIMAL.replace("static = [\"127.0.0.1:8001\"]", "dns = { name = \"web.test.\", port = 80 }");
        let DiscoverySpec::Dns(q) = &parse(&plain, Path::new("/")).unwrap().clusters["web"].discovery else { panic!() };
        assert!(q.nameservers.is_empty());
        assert_eq!((q.min_refresh, q.max_refresh), (DNS_MIN_REFRESH, DNS_MAX_REFRESH));
        // A cluster's max below the section's min is named at the cluster.
        let e = errs(&text.replace("max_refresh = \"10s\"", "max_refresh = \"1s\""));
        assert!(e.iter().any(|e| e.contains("clusters.api.dns.max_refresh") && e.contains("not be less than min_refresh")), "{e:?}");
        // Two clusters, one source name, different settings.
        let e = errs(&text.replace("api.test\", port = 8080", "_http._tcp.web.\""));
        assert!(e.iter().any(|e| e.contains("clusters.web.dns: cluster \"api\" asks for the same name")), "{e:?}");
    }

    #[test]
    fn host_names_in_static_lists_become_dns_queries() {
        let text = MINIMAL.replace("static = [\"127.0.0.1:8001\"]", "static = [\"127.0.0.1:8001\", \"web1.internal:8080\", \"[::1]:80\"]")
            + "\n[dns]\nnameservers = [\"127.0.0.1:8600\"]\n";
        let c = parse(&text, Path::new("/")).unwrap();
        let DiscoverySpec::StaticNames { addrs, names } = &c.clusters["web"].discovery else { panic!("{:?}", c.clusters["web"].discovery) };
        assert_eq!(addrs.len(), 2);
        assert_eq!((names[0].name.as_str(), names[0].port), ("web1.internal", Some(8080)));
        assert_eq!(names[0].nameservers, vec!["127.0.0.1:8600".parse().unwrap()]);
        assert_eq!(c.dns_queries().len(), 1);
        // All addresses: the plain static spec, as before.
        assert!(matches!(parse(MINIMAL, Path::new("/")).unwrap().clusters["web"].discovery, DiscoverySpec::Static(_)));
        let e = errs(&MINIMAL.replace("static = [\"127.0.0.1:8001\"]", "static = [\"a.test:80\", \"a.test:80\", \"a.test:0\", \"1.2.3:80\", \"bad host:80\"]"));
        for needle in ["clusters.web.static[1]: duplicate backend", "clusters.web.static[2]: invalid socket address", "clusters.web.static[3]: invalid socket address", "clusters.web.static[4]: invalid socket address"] {
            assert!(e.iter().any(|e| e.contains(needle)), "{needle}: {e:?}");
        }
    }

    #[test]
    fn toml_syntax_error_is_reported() {
        let e = errs("[[listeners]\naddress=").join("\n");
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn host_patterns() {
        assert_eq!(host_pattern("API.Example.com"), Some(HostPattern::Exact("api.example.com".into())));
        assert_eq!(host_pattern("*.example.com"), Some(HostPattern::Suffix(".example.com".into())));
        assert_eq!(host_pattern("example.com:80"), None);
        assert_eq!(host_pattern("http://x"), None);
        assert_eq!(host_pattern("*"), None);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// Arbitrary text never panics the config loader.
        #[test]
        fn config_parser_never_panics(text in ".{0,400}") {
            let _ = parse(&text, Path::new("/tmp"));
        }

        /// Valid TOML with arbitrary values in every field never panics.
        #[test]
        fn config_values_never_panic(a in ".{0,30}", b in ".{0,30}", n in any::<i64>()) {
            let text = format!(
                "[server]\nthreads = {n}\ndrain_timeout = {a:?}\n[[listeners]]\naddress = {b:?}\n[[routes]]\nhosts = [{a:?}]\npath_prefix = {b:?}\ncluster = {a:?}\n[clusters.x]\nstatic = [{b:?}]\nselection = {a:?}\nretries = {n}\n"
            );
            let _ = parse(&text, Path::new("/tmp"));
        }
    }
}
