//! The Consul double: an in-process fake Consul HTTP agent (CE, one server
//! agent in datacenter `dc1`, node `consul-double`) that follows
//! the Consul behaviour described in `docs/consul.md` (section numbers in
//! brackets below refer to that document).
//!
//! Why a double and not a mock: the client under test must survive Consul's
//! real behaviour (long polls that return unchanged, indexes that go
//! backwards, silent ACL filtering, faults), so the double keeps a small Raft
//! style catalog with *per-table and per-service indexes* and answers on the
//! wire exactly as Consul does: Go-canonical header names
//! (`X-Consul-Knownleader`), Go-cased JSON, plain-text error bodies.
//!
//! Model (see the contract sections in brackets):
//! * Every catalog write is one Raft write: the global index moves by one.
//!   Tables (nodes, services, checks) record the index of their last change;
//!   each service name records the index of the last change to its instances
//!   or their checks, or to a node hosting it [3.2]. A service that does not
//!   exist answers with the "last extinction" index [3.2]. Like Consul,
//!   a write that changes nothing (same definition, same check status and
//!   output) consumes a Raft index but moves no table or service index.
//! * Blocking queries [3.1]: `index` absent or 0 answers at once; otherwise the
//!   query is held until the watched index is > `index`, or until `wait`
//!   (default 5m, cut to 10m, `0` means default) plus jitter of up to wait/16.
//!   A timed-out query returns the current (usually unchanged) result.
//!   A query whose index is above every index in the catalog is held like
//!   any other. `reset_indexes()` (snapshot restore) and `wipe()` (rebuilt
//!   cluster) release every query held at that moment, at once, with the
//!   result and index it had before (Consul's abandon channel); reads sent
//!   afterwards are not released.
//!   Activating a fault that answers every request (`Status`, `StatusBody`,
//!   `Garbage`, `WrongTypes`) also releases held queries, which then answer
//!   with the fault.
//! * Instances registered through [`ConsulDouble::register`] get a service
//!   check `service:<id>` that starts **passing** (test convenience); their
//!   node gets a passing `serfHealth` check. Instances registered through the
//!   agent API follow Consul: checks start **critical**.
//! * `GET /v1/health/state/:state` [5.4]: a flat array of every check in the
//!   datacenter (node checks such as `serfHealth`, service checks,
//!   maintenance checks), filtered by status unless `:state` is `any`, in
//!   Consul's check-ID-index order (node, then check ID). It blocks on the
//!   **checks-table index**, which moves on every check create, update or
//!   delete anywhere in the datacenter (health flips, output changes that
//!   reach the catalog, registrations that add checks, deregistrations and
//!   maintenance toggles that remove them) and on nothing else: not on a
//!   write that changes nothing, not on a service or node change that
//!   leaves every check as it was. Each check's `ModifyIndex` is the index
//!   of the write that last changed it. ACLs: node checks need node:read,
//!   service checks node:read and service:read (limited and anonymous
//!   tokens have neither). No agent cache (`?cached` is accepted and
//!   ignored, as in Consul), no streaming. Deliberately stricter than
//!   Consul: a state other than exactly `any`/`passing`/`warning`/`critical`
//!   answers 400 `Invalid check status: "<x>"` (Consul itself sends the
//!   unknown state to the status index and answers 200 `[]`; the Go client
//!   refuses such a state before sending). An empty state answers 400
//!   `Missing check state`, as in Consul.
//! * KV store [5.5]: `GET`/`PUT`/`DELETE /v1/kv/<key>` on the same Raft
//!   state as the catalog (`wipe()` empties it, `reset_indexes()` remaps its
//!   indexes). Every PUT and DELETE is one Raft write. As in Consul since
//!   1.6, a PUT that changes nothing (same value, same flags) moves neither
//!   the key's ModifyIndex nor any KV index and wakes nobody; nor does a
//!   delete of a missing key. A key blocks on its ModifyIndex. A missing key
//!   answers 404 with an empty body and the KV table index (the last KV
//!   change) in `X-Consul-Index`; once held, it stays held until the key
//!   appears, whatever else is written (Consul's `ErrNotFound`). A prefix
//!   (`?recurse`, `?keys`) blocks on the highest ModifyIndex under it,
//!   counting tombstones: a deleted key, or the prefix of a recursive delete
//!   (one tombstone for the subtree), remembers the delete's index. With
//!   nothing under it, live or dead, or for the empty prefix, it reports the
//!   table index. `kv_gc_tombstones()` reaps the tombstones, after which a
//!   prefix's index can go backwards. Also: `?flags`, `?cas` (`0`: only if
//!   absent; `N`: only if the ModifyIndex is N; a CAS delete never deletes
//!   with 0, and answers `true` for a missing key, as Consul does), `?raw`,
//!   `?keys` with `?separator` (or `seperator`), 413 for a Content-Length
//!   above 512 KiB, 400 for conflicting flags, a missing key name, and the
//!   key validation of Consul's newest releases (no leading `/`, only
//!   alphanumerics and `,-_./`, no `../`, no cacheable file extension such
//!   as `.json`). ACLs: the full token reads and writes; limited and
//!   anonymous tokens have neither `key:read` nor `key:write`, so single-key
//!   reads and every write answer 403 `Permission denied: ...` while prefix
//!   reads drop entries silently (404 once nothing is left, the filtered
//!   header for limited tokens only). Not modelled: sessions and locks
//!   (`acquire`/`release` answer 500 saying so; `LockIndex` is always 0),
//!   the transaction API, `acl.enable_key_list_policy`, Go's `ServeMux`
//!   path cleaning (its 301 for `//`, `.` and `..` segments), and the
//!   radix-tree granularity of Consul's watches: a query held on a prefix
//!   with nothing under it is re-evaluated on every write and returns once
//!   the table index passes its index, where Consul waits for a write near
//!   the prefix. `?cached` is ignored, as Consul ignores it for KV.
//! * The agent's own node `consul-double` hosts Consul's `consul` service
//!   (port 8300), as on a real server agent [5.2]; it shows up in
//!   `/v1/catalog/services`.
//! * ACLs [2.2]: with `require_token(Some(t))`, `t` has full rights; tokens
//!   added with `add_limited_token` exist but lack `service:read`/`write`
//!   (list endpoints answer 200 with entries removed and
//!   `X-Consul-Results-Filtered-By-Acls: true`; agent writes answer 403
//!   `Permission denied: ...`); any other token answers 403 `ACL not found`.
//!   **A request with no token runs as the anonymous token** (as in Consul):
//!   list endpoints answer 200 with everything filtered and *without* the
//!   filtered header, agent reads/writes answer 403 `Permission denied`.
//!   `anonymous_acl_not_found(true)` makes token-less requests answer 403
//!   `ACL not found` instead. `/v1/status/*` needs no ACL.
//! * Agent API [5.6]: services registered there appear in the catalog under
//!   node `consul-double` at once (the anti-entropy lag is not modelled).
//!   TTL checks expire to critical with `TTL expired...`; status changes reach
//!   the catalog at once, output-only changes after `check_update_interval`
//!   (5 min by default, `interval/2 + rand(interval)` like Consul).
//! * Connections: at most 200 concurrent TCP connections per client IP
//!   (`set_max_conns_per_client`); beyond that the raw connlimit 429 is written
//!   and the connection closed [2.3].
//! * gzip [2.3]: bodies of at least 1400 bytes are gzip-encoded when the
//!   request accepts gzip. The encoder emits *stored* deflate blocks (valid
//!   gzip, no compression) because no compression crate is available here.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// The agent's node name, datacenter and version.
pub const NODE_NAME: &str = "consul-double";
pub const DATACENTER: &str = "dc1";
pub const VERSION: &str = "1.19.0";
/// `default_query_time` / `max_query_time` [3.1].
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// `limits.http_max_conns_per_client` [2.3].
pub const DEFAULT_MAX_CONNS_PER_CLIENT: usize = 200;
/// gziphandler's default minimum size [2.3].
pub const GZIP_MIN_SIZE: usize = 1400;
/// Body of the connlimit 429 (go-connlimit), including its newline.
pub const CONNLIMIT_TEXT: &str = "Your IP is issuing too many concurrent connections, please rate limit your calls\n";
pub const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";
const SERVICE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";
const NODE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.";
const MAX_CHECK_OUTPUT: usize = 4096;

// ---------------------------------------------------------------- public types

/// One service instance, keyed by (node, id).
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub node: String,
    pub node_address: String,
    pub id: String,
    pub service: String,
    /// May be "" (clients then use `node_address`).
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// (passing, warning); None means Consul's default {1, 1}.
    pub weights: Option<(u32, u32)>,
}

impl Instance {
    /// Node address and service address are both `ip`.
    pub fn new(node: &str, id: &str, service: &str, ip: &str, port: u16) -> Instance {
        Instance {
            node: node.into(),
            node_address: ip.into(),
            id: id.into(),
            service: service.into(),
            address: ip.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weights: None,
        }
    }
    pub fn tags(mut self, tags: &[&str]) -> Self {
        self.tags = tags.iter().map(|t| t.to_string()).collect();
        self
    }
    pub fn meta(mut self, k: &str, v: &str) -> Self {
        self.meta.insert(k.into(), v.into());
        self
    }
    pub fn weights(mut self, passing: u32, warning: u32) -> Self {
        self.weights = Some((passing, warning));
        self
    }
    pub fn service_address(mut self, a: &str) -> Self {
        self.address = a.into();
        self
    }
    pub fn node_address(mut self, a: &str) -> Self {
        self.node_address = a.into();
        self
    }
}

/// Faults persist until `fault(Fault::None)`.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Every request answers this code with a Consul-like plain-text body:
    /// 500 `No cluster leader`, 429 the connlimit text (and closes the
    /// connection), 403 `ACL not found`, 503 the leader-only rate-limit text,
    /// 404 empty, others `Unexpected response code <n>`.
    Status(u16),
    /// Like `Status`, with your own body.
    StatusBody(u16, String),
    /// Delay every request by this much before handling it.
    Slow(Duration),
    /// Successful GETs answer 200 with `X-Consul-Index` but a body that is not
    /// JSON (the real body cut in half). Writes are unaffected.
    Garbage,
    /// Successful GETs answer 200 with valid JSON of the wrong shape; see
    /// `wrong_types` for the exact bodies. Writes are unaffected.
    WrongTypes,
    /// `X-Consul-Index: 0` on every indexed answer (blocking works as usual).
    IndexZero,
    /// No `X-Consul-Index` header at all.
    IndexMissing,
    /// Accept and read the request, never answer.
    Hang,
    /// No cluster leader (extension): default and `?consistent` reads answer
    /// 500 `No cluster leader` at once (the client agent's 7 s
    /// `rpc_hold_timeout` is not modelled), `?stale` reads keep working with
    /// `X-Consul-Knownleader: false` and a growing `X-Consul-Lastcontact`;
    /// `/v1/status/leader` answers `""`. KV writes, which need the leader,
    /// answer 500 `No cluster leader`. Agent-local endpoints keep working.
    NoLeader,
}

/// One HTTP request as the double saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub seq: u64,
    pub method: String,
    /// The path as sent (not percent-decoded).
    pub path: String,
    /// The raw query string ("" when none).
    pub query: String,
    /// Header names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The request body as received (empty for a GET).
    pub body: Bytes,
    pub peer: SocketAddr,
    pub received: Instant,
    /// None while the request is held (or hangs forever).
    pub answered: Option<Instant>,
    pub status: Option<u16>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The first value of a query parameter ("" for a bare `?stale`).
    pub fn param(&self, name: &str) -> Option<String> {
        Query::parse(&self.query).get(name).map(|s| s.to_string())
    }
    pub fn has_param(&self, name: &str) -> bool {
        Query::parse(&self.query).has(name)
    }
    /// The token Consul would use, in its precedence order:
    /// `?token=`, then `X-Consul-Token`, then `Authorization: Bearer`.
    pub fn token(&self) -> Option<String> {
        let t = token_of(&Query::parse(&self.query), &self.headers);
        (!t.is_empty()).then_some(t)
    }
    pub fn duration(&self) -> Option<Duration> {
        self.answered.map(|a| a.duration_since(self.received))
    }
}

// ---------------------------------------------------------------- catalog

#[derive(Clone, Debug)]
struct NodeRec {
    id: String,
    address: String,
    meta: BTreeMap<String, String>,
    create: u64,
    modify: u64,
}

#[derive(Clone, Debug, PartialEq)]
struct SvcDef {
    id: String,
    service: String,
    tags: Vec<String>,
    address: String,
    port: i64,
    meta: BTreeMap<String, String>,
    weights: (i64, i64),
    tagged: BTreeMap<String, (String, i64)>,
    eto: bool,
}

impl SvcDef {
    fn from_instance(i: &Instance) -> SvcDef {
        let w = i.weights.unwrap_or((1, 1));
        let mut d = SvcDef {
            id: i.id.clone(),
            service: i.service.clone(),
            tags: i.tags.clone(),
            address: i.address.clone(),
            port: i.port as i64,
            meta: i.meta.clone(),
            weights: (w.0 as i64, w.1 as i64),
            tagged: BTreeMap::new(),
            eto: false,
        };
        d.autofill_tagged();
        d
    }
    /// The agent fills lan/wan tagged addresses from an IP service address.
    fn autofill_tagged(&mut self) {
        if let Ok(ip) = self.address.parse::<IpAddr>() {
            let (lan, wan) = if ip.is_ipv4() { ("lan_ipv4", "wan_ipv4") } else { ("lan_ipv6", "wan_ipv6") };
            for k in [lan, wan] {
                self.tagged.entry(k.to_string()).or_insert((self.address.clone(), self.port));
            }
        }
    }
}

#[derive(Clone, Debug)]
struct SvcRec {
    def: SvcDef,
    create: u64,
    modify: u64,
}

#[derive(Clone, Debug)]
struct CheckRec {
    node: String,
    check_id: String,
    name: String,
    status: String,
    notes: String,
    output: String,
    service_id: String,
    service_name: String,
    service_tags: Vec<String>,
    typ: String,
    interval: String,
    timeout: String,
    create: u64,
    modify: u64,
}

impl CheckRec {
    fn same(&self, o: &CheckRec) -> bool {
        self.node == o.node
            && self.check_id == o.check_id
            && self.name == o.name
            && self.status == o.status
            && self.notes == o.notes
            && self.output == o.output
            && self.service_id == o.service_id
            && self.service_name == o.service_name
            && self.service_tags == o.service_tags
            && self.typ == o.typ
            && self.interval == o.interval
            && self.timeout == o.timeout
    }
}

struct Catalog {
    global: u64,
    idx_nodes: u64,
    idx_services: u64,
    idx_checks: u64,
    svc_index: HashMap<String, u64>,
    extinction: Option<u64>,
    nodes: BTreeMap<String, NodeRec>,
    services: BTreeMap<(String, String), SvcRec>,
    checks: BTreeMap<(String, String), CheckRec>,
    kv: Kv,
}

fn serf_check(node: &str, status: &str) -> CheckRec {
    CheckRec {
        node: node.into(),
        check_id: "serfHealth".into(),
        name: "Serf Health Status".into(),
        status: status.into(),
        notes: String::new(),
        output: if status == "passing" {
            "Agent alive and reachable".into()
        } else {
            "Agent not live or unreachable".into()
        },
        service_id: String::new(),
        service_name: String::new(),
        service_tags: Vec::new(),
        typ: String::new(),
        interval: String::new(),
        timeout: String::new(),
        create: 0,
        modify: 0,
    }
}

impl Catalog {
    fn new() -> Catalog {
        let mut c = Catalog {
            // The first Raft writes of a real cluster are internal (raft
            // configuration, autopilot, ...): start a little above zero.
            global: 10,
            idx_nodes: 0,
            idx_services: 0,
            idx_checks: 0,
            svc_index: HashMap::new(),
            extinction: None,
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            kv: Kv::default(),
        };
        let idx = c.next();
        c.ensure_node(NODE_NAME, "127.0.0.1", idx);
        let mut meta = BTreeMap::new();
        for (k, v) in [
            ("non_voter", "false"),
            ("raft_version", "3"),
            ("read_replica", "false"),
            ("serf_protocol_current", "2"),
            ("serf_protocol_max", "5"),
            ("serf_protocol_min", "1"),
            ("version", VERSION),
        ] {
            meta.insert(k.to_string(), v.to_string());
        }
        let consul = SvcDef {
            id: "consul".into(),
            service: "consul".into(),
            tags: Vec::new(),
            address: String::new(),
            port: 8300,
            meta,
            weights: (1, 1),
            tagged: BTreeMap::new(),
            eto: false,
        };
        c.ensure_service(NODE_NAME, consul, idx);
        c
    }

    fn next(&mut self) -> u64 {
        self.global += 1;
        self.global
    }

    fn service_exists(&self, name: &str) -> bool {
        self.services.values().any(|s| s.def.service == name)
    }

    /// `maxIndexForService` [C-STATE].
    fn service_index(&self, name: &str, with_checks: bool) -> u64 {
        let exists = self.service_exists(name);
        if !exists {
            if let Some(e) = self.extinction {
                return e;
            }
        }
        if let Some(i) = self.svc_index.get(name) {
            return *i;
        }
        let mut m = self.idx_nodes.max(self.idx_services);
        if with_checks {
            m = m.max(self.idx_checks);
        }
        m
    }

    fn bump_service(&mut self, name: &str, idx: u64) {
        self.svc_index.insert(name.to_string(), idx);
    }

    fn bump_node_services(&mut self, node: &str, idx: u64) {
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|((n, _), _)| n == node)
            .map(|(_, s)| s.def.service.clone())
            .collect();
        for n in names {
            self.bump_service(&n, idx);
        }
    }

    /// A service name lost an instance (or was renamed away from).
    fn service_left(&mut self, name: &str, idx: u64) {
        if self.service_exists(name) {
            self.bump_service(name, idx);
        } else {
            self.svc_index.remove(name);
            self.extinction = Some(idx);
        }
    }

    fn ensure_node(&mut self, node: &str, address: &str, idx: u64) -> bool {
        match self.nodes.get_mut(node) {
            Some(n) if n.address == address => false,
            Some(n) => {
                n.address = address.to_string();
                n.modify = idx;
                self.idx_nodes = idx;
                self.bump_node_services(node, idx);
                true
            }
            None => {
                let mut meta = BTreeMap::new();
                meta.insert("consul-network-segment".to_string(), String::new());
                if node == NODE_NAME {
                    meta.insert("consul-version".to_string(), VERSION.to_string());
                }
                self.nodes.insert(
                    node.to_string(),
                    NodeRec {
                        id: uuid_from(&format!("node/{node}")),
                        address: address.to_string(),
                        meta,
                        create: idx,
                        modify: idx,
                    },
                );
                self.idx_nodes = idx;
                self.ensure_check(serf_check(node, "passing"), idx);
                true
            }
        }
    }

    fn ensure_service(&mut self, node: &str, def: SvcDef, idx: u64) -> bool {
        let key = (node.to_string(), def.id.clone());
        let old = self.services.get(&key).cloned();
        if let Some(o) = &old {
            if o.def == def {
                return false;
            }
        }
        let create = old.as_ref().map(|o| o.create).unwrap_or(idx);
        let name = def.service.clone();
        let tags = def.tags.clone();
        self.services.insert(key, SvcRec { def: def.clone(), create, modify: idx });
        self.idx_services = idx;
        self.bump_service(&name, idx);
        if let Some(o) = old {
            if o.def.service != name {
                self.service_left(&o.def.service, idx);
            }
        }
        // Keep the service's checks' ServiceName/ServiceTags in step.
        let mut touched = false;
        for c in self.checks.values_mut() {
            if c.node == node && c.service_id == def.id && (c.service_name != name || c.service_tags != tags) {
                c.service_name = name.clone();
                c.service_tags = tags.clone();
                c.modify = idx;
                touched = true;
            }
        }
        if touched {
            self.idx_checks = idx;
        }
        true
    }

    fn ensure_check(&mut self, mut rec: CheckRec, idx: u64) -> bool {
        let key = (rec.node.clone(), rec.check_id.clone());
        if let Some(e) = self.checks.get(&key) {
            if e.same(&rec) {
                return false;
            }
            rec.create = e.create;
        } else {
            rec.create = idx;
        }
        rec.modify = idx;
        let node = rec.node.clone();
        let sid = rec.service_id.clone();
        let sname = rec.service_name.clone();
        self.checks.insert(key, rec);
        self.idx_checks = idx;
        if sid.is_empty() {
            self.bump_node_services(&node, idx);
        } else {
            let name = self
                .services
                .get(&(node, sid))
                .map(|s| s.def.service.clone())
                .unwrap_or(sname);
            self.bump_service(&name, idx);
        }
        true
    }

    fn delete_check(&mut self, node: &str, check_id: &str, idx: u64) -> bool {
        let Some(rec) = self.checks.remove(&(node.to_string(), check_id.to_string())) else {
            return false;
        };
        self.idx_checks = idx;
        if rec.service_id.is_empty() {
            // deleteCheckTxn also bumps the services table for node checks.
            self.bump_node_services(node, idx);
            self.idx_services = idx;
        } else if let Some(s) = self.services.get(&(node.to_string(), rec.service_id.clone())) {
            let n = s.def.service.clone();
            self.bump_service(&n, idx);
        }
        true
    }

    fn delete_service(&mut self, node: &str, id: &str, idx: u64) -> bool {
        let Some(old) = self.services.remove(&(node.to_string(), id.to_string())) else {
            return false;
        };
        self.idx_services = idx;
        let before = self.checks.len();
        self.checks.retain(|(n, _), c| !(n == node && c.service_id == id));
        if self.checks.len() != before {
            self.idx_checks = idx;
        }
        self.service_left(&old.def.service, idx);
        true
    }

    /// Snapshot restore: every stored index is mapped, order-preserving,
    /// into `2..=limit` (1 is never used: Consul's floor value that no real
    /// blocking query carries).
    fn reset_indexes(&mut self, limit: u64) {
        let limit = limit.max(2);
        let mut all: Vec<u64> = vec![self.global, self.idx_nodes, self.idx_services, self.idx_checks];
        all.extend(self.svc_index.values().copied());
        all.extend(self.extinction);
        for n in self.nodes.values() {
            all.extend([n.create, n.modify]);
        }
        for s in self.services.values() {
            all.extend([s.create, s.modify]);
        }
        for c in self.checks.values() {
            all.extend([c.create, c.modify]);
        }
        all.push(self.kv.table);
        for e in self.kv.entries.values() {
            all.extend([e.create, e.modify]);
        }
        all.extend(self.kv.tombstones.values().copied());
        all.sort_unstable();
        all.dedup();
        let n = all.len() as u64;
        let map = |v: u64| -> u64 {
            let rank = all.binary_search(&v).unwrap() as u64;
            2 + rank * (limit - 2) / (n - 1).max(1)
        };
        self.global = map(self.global);
        self.idx_nodes = map(self.idx_nodes);
        self.idx_services = map(self.idx_services);
        self.idx_checks = map(self.idx_checks);
        for v in self.svc_index.values_mut() {
            *v = map(*v);
        }
        self.extinction = self.extinction.map(map);
        for x in self.nodes.values_mut() {
            (x.create, x.modify) = (map(x.create), map(x.modify));
        }
        for x in self.services.values_mut() {
            (x.create, x.modify) = (map(x.create), map(x.modify));
        }
        for x in self.checks.values_mut() {
            (x.create, x.modify) = (map(x.create), map(x.modify));
        }
        self.kv.table = map(self.kv.table);
        for x in self.kv.entries.values_mut() {
            (x.create, x.modify) = (map(x.create), map(x.modify));
        }
        for v in self.kv.tombstones.values_mut() {
            *v = map(*v);
        }
    }
}

// ---------------------------------------------------------------- KV store

/// `kv_max_value_size` [5.5].
pub const KV_MAX_VALUE_SIZE: u64 = 512 * 1024;

/// One KV entry (`structs.DirEntry`). Sessions are not modelled, so
/// `LockIndex` is always 0 and `Session` is never set.
#[derive(Clone, Debug)]
struct KvRec {
    flags: u64,
    /// Empty for a key written without a body (JSON `null`).
    value: Vec<u8>,
    create: u64,
    modify: u64,
}

/// The state store's `kvs` and `tombstones` tables [5.5].
#[derive(Default)]
struct Kv {
    entries: BTreeMap<String, KvRec>,
    /// The graveyard: a deleted key, or the prefix of a recursive delete
    /// (one tombstone for the whole subtree, none for the empty prefix),
    /// mapped to the index of the delete. It keeps a prefix's index from
    /// sliding back until the tombstones are reaped.
    tombstones: BTreeMap<String, u64>,
    /// `kvsMaxIndex`: the last index at which either table changed. Reaping
    /// tombstones does not move it.
    table: u64,
}

/// The entries of `m` whose key starts with `prefix`, in key order.
fn under<'a, V>(m: &'a BTreeMap<String, V>, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    m.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

impl Kv {
    /// `kvsSetTxn`: an entry that would not change (same value, same flags)
    /// is not rewritten, so neither its ModifyIndex nor the table index
    /// moves and no watcher wakes (Consul 1.6 and later); the caller has
    /// consumed the Raft index all the same.
    fn set(&mut self, key: &str, flags: u64, value: &[u8], idx: u64) {
        let create = match self.entries.get(key) {
            Some(e) if e.flags == flags && e.value == value => return,
            Some(e) => e.create,
            None => idx,
        };
        let rec = KvRec {
            flags,
            value: value.to_vec(),
            create,
            modify: idx,
        };
        self.entries.insert(key.to_string(), rec);
        self.table = idx;
    }

    /// `kvsSetCASTxn`: `cas` 0 writes only if the key is absent, N only if
    /// its ModifyIndex is N.
    fn set_cas(&mut self, key: &str, flags: u64, value: &[u8], cas: u64, idx: u64) -> bool {
        let ok = match self.entries.get(key) {
            None => cas == 0,
            Some(e) => cas != 0 && e.modify == cas,
        };
        if ok {
            self.set(key, flags, value, idx);
        }
        ok
    }

    /// `kvsDeleteTxn`: deleting a missing key changes nothing.
    fn delete(&mut self, key: &str, idx: u64) {
        if self.entries.remove(key).is_some() {
            self.tombstones.insert(key.to_string(), idx);
            self.table = idx;
        }
    }

    /// `kvsDeleteCASTxn`: deletes only if the key's ModifyIndex is `cas`
    /// (never for 0: no entry has ModifyIndex 0). A missing key answers
    /// true, as in Consul: there is nothing left to delete.
    fn delete_cas(&mut self, key: &str, cas: u64, idx: u64) -> bool {
        match self.entries.get(key) {
            None => true,
            Some(e) if e.modify == cas => {
                self.delete(key, idx);
                true
            }
            Some(_) => false,
        }
    }

    /// `kvsDeleteTreeTxn`: one tombstone for the prefix (none for the empty
    /// prefix, whose readers see the table index anyway).
    fn delete_tree(&mut self, prefix: &str, idx: u64) {
        let doomed: Vec<String> = under(&self.entries, prefix).map(|(k, _)| k.clone()).collect();
        if doomed.is_empty() {
            return;
        }
        for k in doomed {
            self.entries.remove(&k);
        }
        if !prefix.is_empty() {
            self.tombstones.insert(prefix.to_string(), idx);
        }
        self.table = idx;
    }

    /// The index of a single-key read (`KVS.Get`): the key's ModifyIndex,
    /// or the table index when it is missing.
    fn key_index(&self, key: &str) -> u64 {
        self.entries.get(key).map_or(self.table, |e| e.modify)
    }

    /// The index of a prefix read (`kvsListTxn`): the highest ModifyIndex
    /// under the prefix, tombstones included; the table index when nothing,
    /// live or dead, is under it, or when the prefix is empty.
    fn prefix_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.table;
        }
        let live = under(&self.entries, prefix).map(|(_, e)| e.modify).max().unwrap_or(0);
        let dead = under(&self.tombstones, prefix).map(|(_, i)| *i).max().unwrap_or(0);
        match live.max(dead) {
            0 => self.table,
            i => i,
        }
    }
}

// ---------------------------------------------------------------- agent-local state

#[derive(Clone, Debug)]
struct AgentSvc {
    def: SvcDef,
}

#[derive(Clone, Debug)]
struct AgentCheck {
    id: String,
    name: String,
    service_id: String,
    service_name: String,
    status: String,
    output: String,
    notes: String,
    typ: String,
    ttl: Option<Duration>,
    ttl_deadline: Option<Instant>,
    /// Output last given through a TTL update (for "TTL expired ... follows").
    last_ttl_output: String,
    /// A deferred output-only sync is due at this time.
    defer_at: Option<Instant>,
    interval: String,
    timeout: String,
    definition: Value,
}

impl AgentCheck {
    /// The critical check that maintenance mode adds (`_service_maintenance:<id>` or `_node_maintenance`).
    fn maintenance(id: &str, name: &str, service_id: String, service_name: String, reason: &str) -> AgentCheck {
        AgentCheck {
            id: id.to_string(),
            name: name.into(),
            service_id,
            service_name,
            status: "critical".into(),
            output: String::new(),
            notes: reason.to_string(),
            typ: "maintenance".into(),
            ttl: None,
            ttl_deadline: None,
            last_ttl_output: String::new(),
            defer_at: None,
            interval: String::new(),
            timeout: String::new(),
            definition: json!({}),
        }
    }
}

#[derive(Default)]
struct Agent {
    services: BTreeMap<String, AgentSvc>,
    checks: BTreeMap<String, AgentCheck>,
}

// ---------------------------------------------------------------- shared state

struct State {
    cat: Catalog,
    agent: Agent,
    acl_master: Option<String>,
    acl_limited: BTreeSet<String>,
    anon_not_found: bool,
    fault: Fault,
    leader_lost_at: Option<Instant>,
    requests: Vec<Recorded>,
    next_seq: u64,
    abandon: u64,
    /// Lowest X-Consul-Index handed out since the last restore.
    min_handed: u64,
    cache_seen: HashSet<String>,
    max_conns_per_client: usize,
    check_update_interval: Duration,
    streaming: bool,
}

struct Shared {
    st: Mutex<State>,
    tx: tokio::sync::watch::Sender<u64>,
    held: AtomicUsize,
    open: AtomicUsize,
    max_open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    shutdown: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Wake every held query so it re-evaluates.
    fn notify(&self) {
        self.tx.send_modify(|v| *v = v.wrapping_add(1));
    }
    fn write<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = {
            let mut st = self.lock();
            f(&mut st)
        };
        self.notify();
        r
    }
}

// ---------------------------------------------------------------- the double

struct ServerHandle {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

pub struct ConsulDouble {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<ServerHandle>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

impl ConsulDouble {
    /// Listen on 127.0.0.1:0 on its own thread and tokio runtime.
    pub fn start() -> ConsulDouble {
        Self::start_on(StdListener::bind("127.0.0.1:0").unwrap())
    }

    /// Serve on a listener made elsewhere (e.g. inside a network namespace).
    pub fn start_on(listener: StdListener) -> ConsulDouble {
        let addr = listener.local_addr().unwrap();
        let (tx, _rx) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(Shared {
            st: Mutex::new(State {
                cat: Catalog::new(),
                agent: Agent::default(),
                acl_master: None,
                acl_limited: BTreeSet::new(),
                anon_not_found: false,
                fault: Fault::None,
                leader_lost_at: None,
                requests: Vec::new(),
                next_seq: 0,
                abandon: 0,
                min_handed: u64::MAX,
                cache_seen: HashSet::new(),
                max_conns_per_client: DEFAULT_MAX_CONNS_PER_CLIENT,
                check_update_interval: Duration::from_secs(300),
                streaming: false,
            }),
            tx,
            held: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            shutdown: AtomicBool::new(false),
        });
        let server = spawn_server(shared.clone(), listener);
        let sh = shared.clone();
        let ticker = std::thread::spawn(move || {
            while !sh.shutdown.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                let changed = {
                    let mut st = sh.lock();
                    st.tick(Instant::now())
                };
                if changed {
                    sh.notify();
                }
            }
        });
        ConsulDouble {
            addr,
            shared,
            server: Some(server),
            ticker: Some(ticker),
        }
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    // ------------------------------------------------------------ catalog writes

    /// Upsert by (node, id): one Raft write. The node is created (with a
    /// passing serfHealth) or its address updated; a new instance gets a
    /// passing `service:<id>` check. Re-registering an identical instance
    /// consumes a Raft index but moves no service or table index (Consul's
    /// `IsSame` short-cut), so it wakes no watcher.
    pub fn register(&self, inst: Instance) {
        self.shared.write(|st| {
            let c = &mut st.cat;
            let idx = c.next();
            c.ensure_node(&inst.node, &inst.node_address, idx);
            c.ensure_service(&inst.node, SvcDef::from_instance(&inst), idx);
            let key = (inst.node.clone(), format!("service:{}", inst.id));
            if !c.checks.contains_key(&key) {
                c.ensure_check(service_check(&inst.node, &inst.id, &inst.service, &inst.tags, "passing"), idx);
            }
        })
    }

    /// Remove one instance and its checks: one Raft write.
    pub fn deregister(&self, node: &str, service_id: &str) {
        self.shared.write(|st| {
            let idx = st.cat.next();
            st.cat.delete_service(node, service_id, idx);
        })
    }

    /// Set the status of the instance's `service:<id>` check (created if the
    /// instance has none). Panics if the instance does not exist. Setting the
    /// status it already has moves no index and wakes no watcher, as in
    /// Consul's `ensureCheckTxn`; to nudge watchers without changing
    /// backends use `set_check_output`.
    pub fn set_health(&self, node: &str, service_id: &str, status: &str) {
        assert!(valid_status(status), "bad status {status:?}");
        self.shared.write(|st| {
            let c = &mut st.cat;
            let svc = c
                .services
                .get(&(node.to_string(), service_id.to_string()))
                .unwrap_or_else(|| panic!("no instance {node}/{service_id}"))
                .def
                .clone();
            let idx = c.next();
            let mut rec = c
                .checks
                .get(&(node.to_string(), format!("service:{service_id}")))
                .cloned()
                .unwrap_or_else(|| service_check(node, service_id, &svc.service, &svc.tags, status));
            rec.status = status.to_string();
            c.ensure_check(rec, idx);
        })
    }

    /// Change only the Output of the instance's service check: the service's
    /// index moves while addresses, ports and weights stay the same.
    pub fn set_check_output(&self, node: &str, service_id: &str, output: &str) {
        self.shared.write(|st| {
            let c = &mut st.cat;
            let key = (node.to_string(), format!("service:{service_id}"));
            let mut rec = c.checks.get(&key).cloned().unwrap_or_else(|| panic!("no check {key:?}"));
            let idx = c.next();
            rec.output = output.to_string();
            c.ensure_check(rec, idx);
        })
    }

    /// Set the node's serfHealth status. Panics if the node does not exist.
    pub fn set_node_health(&self, node: &str, status: &str) {
        assert!(valid_status(status), "bad status {status:?}");
        self.shared.write(|st| {
            let c = &mut st.cat;
            assert!(c.nodes.contains_key(node), "no node {node}");
            let idx = c.next();
            c.ensure_check(serf_check(node, status), idx);
        })
    }

    /// Add (on) or remove (off) the critical `_service_maintenance:<id>` check.
    pub fn set_maintenance(&self, node: &str, service_id: &str, on: bool) {
        self.shared.write(|st| {
            let c = &mut st.cat;
            let svc = c
                .services
                .get(&(node.to_string(), service_id.to_string()))
                .unwrap_or_else(|| panic!("no instance {node}/{service_id}"))
                .def
                .clone();
            let idx = c.next();
            if on {
                c.ensure_check(
                    service_maint_check(node, &svc.id, &svc.service, &svc.tags, SERVICE_MAINT_REASON),
                    idx,
                );
            } else {
                c.delete_check(node, &format!("_service_maintenance:{service_id}"), idx);
            }
        })
    }

    /// Add or remove the critical `_node_maintenance` check (extension).
    pub fn set_node_maintenance(&self, node: &str, on: bool) {
        self.shared.write(|st| {
            let c = &mut st.cat;
            assert!(c.nodes.contains_key(node), "no node {node}");
            let idx = c.next();
            if on {
                c.ensure_check(node_maint_check(node, NODE_MAINT_REASON), idx);
            } else {
                c.delete_check(node, "_node_maintenance", idx);
            }
        })
    }

    // ------------------------------------------------------------ KV [5.5]

    /// `PUT /v1/kv/<key>` with `value` and flags 0: one Raft write. Returns
    /// the key's ModifyIndex afterwards: the new Raft index, or the old one
    /// when the key already held exactly this value and flags (Consul then
    /// writes nothing and wakes nobody, though the Raft index is consumed).
    /// Panics on a key the HTTP API would refuse.
    pub fn kv_put(&self, key: &str, value: &[u8]) -> u64 {
        self.kv_put_flags(key, value, 0)
    }

    /// `kv_put` with `?flags=`.
    pub fn kv_put_flags(&self, key: &str, value: &[u8], flags: u64) -> u64 {
        if let Err(e) = validate_kv_key(key) {
            panic!("kv_put {key:?}: {e}");
        }
        self.shared.write(|st| {
            let idx = st.cat.next();
            st.cat.kv.set(key, flags, value, idx);
            st.cat.kv.entries[key].modify
        })
    }

    /// `DELETE /v1/kv/<key>`: one Raft write; a key that existed leaves a
    /// tombstone at this index.
    pub fn kv_delete(&self, key: &str) {
        self.shared.write(|st| {
            let idx = st.cat.next();
            st.cat.kv.delete(key, idx);
        })
    }

    /// The key's value (empty for a key written without one), or None.
    pub fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.lock().cat.kv.entries.get(key).map(|e| e.value.clone())
    }

    /// The key's (CreateIndex, ModifyIndex), or None.
    pub fn kv_indexes(&self, key: &str) -> Option<(u64, u64)> {
        self.shared.lock().cat.kv.entries.get(key).map(|e| (e.create, e.modify))
    }

    /// The index a `?recurse` read of `prefix` would carry now (before the
    /// floor of 1): the highest ModifyIndex under it, tombstones included,
    /// else the KV table index.
    pub fn kv_index(&self, prefix: &str) -> u64 {
        self.shared.lock().cat.kv.prefix_index(prefix)
    }

    /// Extension: how many tombstones the graveyard holds.
    pub fn kv_tombstones(&self) -> usize {
        self.shared.lock().cat.kv.tombstones.len()
    }

    /// The leader's tombstone reap (after `tombstone_ttl`, 15 min in Consul),
    /// for every tombstone at once: one Raft write. A prefix whose newest
    /// change was a delete then reports the highest ModifyIndex still under
    /// it, which can be lower than the index it reported before. The reap
    /// moves no KV index and fires no KV watch, so, as in Consul, it wakes
    /// no held query; the lower index shows on the next read.
    pub fn kv_gc_tombstones(&self) {
        let mut st = self.shared.lock();
        st.cat.next();
        st.cat.kv.tombstones.clear();
    }

    // ------------------------------------------------------------ ACL

    /// Some(t): ACLs on (default policy deny), `t` is the only full token.
    /// None: ACLs off (tokens are accepted and ignored).
    pub fn require_token(&self, token: Option<&str>) {
        self.shared.write(|st| st.acl_master = token.map(|t| t.to_string()))
    }

    /// A valid token without service:read / service:write.
    pub fn add_limited_token(&self, token: &str) {
        self.shared.write(|st| {
            st.acl_limited.insert(token.to_string());
        })
    }

    /// Extension: revoke a limited token (it then answers `ACL not found`).
    pub fn revoke_token(&self, token: &str) {
        self.shared.write(|st| {
            st.acl_limited.remove(token);
        })
    }

    /// Extension: token-less requests answer 403 `ACL not found` instead of
    /// running as the anonymous token.
    pub fn anonymous_acl_not_found(&self, on: bool) {
        self.shared.write(|st| st.anon_not_found = on)
    }

    // ------------------------------------------------------------ faults

    pub fn fault(&self, f: Fault) {
        self.shared.write(|st| {
            st.leader_lost_at = if f == Fault::NoLeader {
                Some(st.leader_lost_at.unwrap_or_else(Instant::now))
            } else {
                None
            };
            st.fault = f;
        })
    }

    /// Snapshot restore: every index drops, order-preserving, into
    /// `2..min(X-Consul-Index handed out since the last restore)`, so every
    /// watcher sees its index go backwards (index 1 is never used; if 2 was
    /// already handed out, values collapse to 2). Every held blocking query
    /// is released at once, answering what it had computed before the
    /// restore with the index it was holding on (as Consul does); a read
    /// sent after the restore sees the lower indexes, and one that carries
    /// an index above them is held until `wait` runs out or the indexes
    /// climb past it.
    pub fn reset_indexes(&self) {
        self.shared.write(|st| {
            let limit = if st.min_handed == u64::MAX { st.cat.global } else { st.min_handed };
            st.cat.reset_indexes(limit.saturating_sub(1));
            st.min_handed = u64::MAX;
            st.abandon += 1;
        })
    }

    /// A rebuilt cluster: the catalog is replaced by a fresh, empty one (only
    /// the agent's own node and the `consul` service, indexes restarting
    /// low, as on new servers) and every held query is released as on a
    /// snapshot restore. Agent-API services stay registered on the agent
    /// but are not in the new catalog until registered again.
    pub fn wipe(&self) {
        self.shared.write(|st| {
            st.cat = Catalog::new();
            st.min_handed = u64::MAX;
            st.abandon += 1;
        })
    }

    /// Extension: connections allowed per client IP (0 = unlimited).
    pub fn set_max_conns_per_client(&self, n: usize) {
        self.shared.lock().max_conns_per_client = n;
    }

    /// Extension: `check_update_interval` for deferred output-only syncs.
    pub fn set_check_update_interval(&self, d: Duration) {
        self.shared.lock().check_update_interval = d;
    }

    /// Extension: answer blocking/cached health reads as the streaming
    /// backend does: no `X-Consul-Lastcontact` / `X-Consul-Knownleader`,
    /// `X-Consul-Query-Backend: streaming`.
    pub fn set_streaming(&self, on: bool) {
        self.shared.lock().streaming = on;
    }

    // ------------------------------------------------------------ observation

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Forget answered requests; requests still in flight (held queries,
    /// hung requests) stay, and are completed in place when they answer.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.retain(|r| r.answered.is_none());
    }

    pub fn held_queries(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    pub fn max_open_connections(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    /// Extension: restart the high-water mark from the current count.
    pub fn reset_max_open_connections(&self) {
        self.shared.max_open.store(self.open_connections(), Ordering::SeqCst);
    }

    /// The index a `/v1/health/service/<service>` read would carry now
    /// (before the floor of 1).
    pub fn index_of(&self, service: &str) -> u64 {
        self.shared.lock().cat.service_index(service, true)
    }

    /// Extension: the services-table index (`/v1/catalog/services`).
    pub fn services_index(&self) -> u64 {
        self.shared.lock().cat.idx_services
    }

    /// Extension: the checks-table index (`/v1/health/state/:state`).
    pub fn checks_index(&self) -> u64 {
        self.shared.lock().cat.idx_checks
    }

    /// Extension: the global Raft index.
    pub fn raft_index(&self) -> u64 {
        self.shared.lock().cat.global
    }

    /// Services registered through the agent API, sorted by ID:
    /// `{"ID","Service","Tags","Address","Port","Meta","Weights":{..},
    ///   "Checks":[{"CheckID","Name","Status","Output","Notes","Type","TTL"}]}`.
    pub fn agent_services(&self) -> Vec<Value> {
        let st = self.shared.lock();
        st.agent
            .services
            .values()
            .map(|s| {
                let checks: Vec<Value> = st
                    .agent
                    .checks
                    .values()
                    .filter(|c| c.service_id == s.def.id)
                    .map(|c| {
                        json!({
                            "CheckID": c.id, "Name": c.name, "Status": c.status, "Output": c.output,
                            "Notes": c.notes, "Type": c.typ,
                            "TTL": c.ttl.map(go_duration_string).unwrap_or_default(),
                        })
                    })
                    .collect();
                json!({
                    "ID": s.def.id, "Service": s.def.service, "Tags": s.def.tags, "Address": s.def.address,
                    "Port": s.def.port, "Meta": s.def.meta,
                    "Weights": {"Passing": s.def.weights.0, "Warning": s.def.weights.1},
                    "Checks": checks,
                })
            })
            .collect()
    }

    /// The agent restarted with an empty data dir: it forgets every service
    /// and check registered through the agent API, and anti-entropy removes
    /// them from the catalog. check/pass then answers 404.
    pub fn set_agent_restart(&self) {
        self.shared.write(|st| {
            let ids: Vec<String> = st.agent.services.keys().cloned().collect();
            let node_checks: Vec<String> = st
                .agent
                .checks
                .values()
                .filter(|c| c.service_id.is_empty())
                .map(|c| c.id.clone())
                .collect();
            st.agent = Agent::default();
            for id in ids {
                let idx = st.cat.next();
                st.cat.delete_service(NODE_NAME, &id, idx);
            }
            for cid in node_checks {
                let idx = st.cat.next();
                st.cat.delete_check(NODE_NAME, &cid, idx);
            }
        })
    }

    /// Close the listener and every open connection (connection refused).
    /// State is kept.
    pub fn stop(&mut self) {
        if let Some(h) = self.server.take() {
            let _ = h.stop.send(());
            let _ = h.thread.join();
        }
    }

    /// Listen again on the same port with the same state.
    pub fn restart(&mut self) {
        if self.server.is_some() {
            return;
        }
        let end = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match StdListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < end => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot listen again on {}: {e}", self.addr),
            }
        };
        self.server = Some(spawn_server(self.shared.clone(), listener));
    }
}

impl Drop for ConsulDouble {
    fn drop(&mut self) {
        self.stop();
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
    }
}

fn valid_status(s: &str) -> bool {
    matches!(s, "passing" | "warning" | "critical")
}

fn service_check(node: &str, id: &str, service: &str, tags: &[String], status: &str) -> CheckRec {
    CheckRec {
        node: node.into(),
        check_id: format!("service:{id}"),
        name: format!("Service '{service}' check"),
        status: status.into(),
        notes: String::new(),
        output: String::new(),
        service_id: id.into(),
        service_name: service.into(),
        service_tags: tags.to_vec(),
        typ: "ttl".into(),
        interval: String::new(),
        timeout: String::new(),
        create: 0,
        modify: 0,
    }
}

fn service_maint_check(node: &str, id: &str, service: &str, tags: &[String], reason: &str) -> CheckRec {
    CheckRec {
        node: node.into(),
        check_id: format!("_service_maintenance:{id}"),
        name: "Service Maintenance Mode".into(),
        status: "critical".into(),
        notes: reason.into(),
        output: String::new(),
        service_id: id.into(),
        service_name: service.into(),
        service_tags: tags.to_vec(),
        typ: "maintenance".into(),
        interval: String::new(),
        timeout: String::new(),
        create: 0,
        modify: 0,
    }
}

fn node_maint_check(node: &str, reason: &str) -> CheckRec {
    CheckRec {
        node: node.into(),
        check_id: "_node_maintenance".into(),
        name: "Node Maintenance Mode".into(),
        status: "critical".into(),
        notes: reason.into(),
        output: String::new(),
        service_id: String::new(),
        service_name: String::new(),
        service_tags: Vec::new(),
        typ: "maintenance".into(),
        interval: String::new(),
        timeout: String::new(),
        create: 0,
        modify: 0,
    }
}

/// A stable UUID-shaped string derived from `seed`.
fn uuid_from(seed: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut a = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut a);
    let x = a.finish();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    (seed, 7u8).hash(&mut b);
    let y = b.finish();
    let h = format!("{x:016x}{y:016x}");
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

// ---------------------------------------------------------------- agent logic on State

impl State {
    fn agent_check_rec(&self, c: &AgentCheck) -> CheckRec {
        let tags = self
            .agent
            .services
            .get(&c.service_id)
            .map(|s| s.def.tags.clone())
            .unwrap_or_default();
        CheckRec {
            node: NODE_NAME.into(),
            check_id: c.id.clone(),
            name: c.name.clone(),
            status: c.status.clone(),
            notes: c.notes.clone(),
            output: c.output.clone(),
            service_id: c.service_id.clone(),
            service_name: c.service_name.clone(),
            service_tags: tags,
            typ: c.typ.clone(),
            interval: c.interval.clone(),
            timeout: c.timeout.clone(),
            create: 0,
            modify: 0,
        }
    }

    /// Anti-entropy for one service and its checks: one Raft write.
    fn sync_agent_service(&mut self, id: &str) {
        let Some(svc) = self.agent.services.get(id).cloned() else { return };
        let recs: Vec<CheckRec> = self
            .agent
            .checks
            .values()
            .filter(|c| c.service_id == id)
            .map(|c| self.agent_check_rec(c))
            .collect();
        let idx = self.cat.next();
        self.cat.ensure_node(NODE_NAME, "127.0.0.1", idx);
        self.cat.ensure_service(NODE_NAME, svc.def, idx);
        for r in recs {
            self.cat.ensure_check(r, idx);
        }
    }

    fn sync_agent_check(&mut self, cid: &str) {
        let Some(c) = self.agent.checks.get(cid).cloned() else { return };
        let rec = self.agent_check_rec(&c);
        if let Some(x) = self.agent.checks.get_mut(cid) {
            x.defer_at = None;
        }
        let idx = self.cat.next();
        self.cat.ensure_check(rec, idx);
    }

    /// `local.State.UpdateCheck`: status changes sync at once, output-only
    /// changes are deferred.
    fn update_agent_check(&mut self, cid: &str, status: &str, output: &str, now: Instant) {
        let interval = self.check_update_interval;
        let Some(c) = self.agent.checks.get_mut(cid) else { return };
        if c.status == status && c.output == output {
            return;
        }
        if c.status == status && !interval.is_zero() {
            c.output = output.to_string();
            if c.defer_at.is_none() {
                let half = interval / 2;
                let stagger = {
                    let n = interval.as_nanos().min(u64::MAX as u128) as u64;
                    Duration::from_nanos(rand::rng().random_range(0..n.max(1)))
                };
                c.defer_at = Some(now + half + stagger);
            }
            return;
        }
        c.status = status.to_string();
        c.output = output.to_string();
        self.sync_agent_check(cid);
    }

    /// TTL expiry and deferred syncs. Returns true when something changed.
    fn tick(&mut self, now: Instant) -> bool {
        let mut changed = false;
        let expired: Vec<(String, String)> = self
            .agent
            .checks
            .values()
            .filter(|c| c.ttl_deadline.is_some_and(|d| d <= now))
            .map(|c| {
                let out = if c.last_ttl_output.is_empty() {
                    "TTL expired".to_string()
                } else {
                    format!("TTL expired (last output before timeout follows): {}", c.last_ttl_output)
                };
                (c.id.clone(), out)
            })
            .collect();
        for (cid, out) in expired {
            if let Some(c) = self.agent.checks.get_mut(&cid) {
                c.ttl_deadline = None;
            }
            self.update_agent_check(&cid, "critical", &out, now);
            changed = true;
        }
        let due: Vec<String> = self
            .agent
            .checks
            .values()
            .filter(|c| c.defer_at.is_some_and(|d| d <= now))
            .map(|c| c.id.clone())
            .collect();
        for cid in due {
            self.sync_agent_check(&cid);
            changed = true;
        }
        changed
    }

    fn record(&mut self, mut r: Recorded) -> u64 {
        self.next_seq += 1;
        r.seq = self.next_seq;
        self.requests.push(r);
        self.next_seq
    }

    fn answered(&mut self, seq: u64, status: u16) {
        if let Some(r) = self.requests.iter_mut().rev().find(|r| r.seq == seq) {
            r.answered = Some(Instant::now());
            r.status = Some(status);
        }
    }
}

// ---------------------------------------------------------------- HTTP server

fn spawn_server(shared: Arc<Shared>, listener: StdListener) -> ServerHandle {
    listener.set_nonblocking(true).unwrap();
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                tokio::select! {
                    _ = &mut rx => break,
                    acc = listener.accept() => {
                        let Ok((stream, peer)) = acc else { continue };
                        tokio::spawn(serve_conn(shared.clone(), stream, peer));
                    }
                }
            }
        });
        // Dropping the runtime drops every connection task: sockets close.
        drop(rt);
    });
    ServerHandle { stop: tx, thread }
}

struct ConnGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
        let mut m = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

async fn serve_conn(shared: Arc<Shared>, mut stream: tokio::net::TcpStream, peer: SocketAddr) {
    let now_open = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_open.fetch_max(now_open, Ordering::SeqCst);
    let per_ip = {
        let mut m = shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(peer.ip()).or_insert(0);
        *n += 1;
        *n
    };
    let _guard = ConnGuard {
        shared: shared.clone(),
        ip: peer.ip(),
    };
    let limit = shared.lock().max_conns_per_client;
    if limit > 0 && per_ip > limit {
        let raw = format!(
            "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            CONNLIMIT_TEXT.len(),
            CONNLIMIT_TEXT
        );
        let _ = stream.write_all(raw.as_bytes()).await;
        let _ = stream.shutdown().await;
        return;
    }
    let sh = shared.clone();
    let svc = service_fn(move |req| {
        let sh = sh.clone();
        async move { Ok::<_, Infallible>(handle(sh, req, peer).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// A parsed query string (Go `url.Values` semantics: repeated keys, bare keys
/// have the value "").
#[derive(Clone, Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: &str) -> Query {
        Query(
            raw.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (pct_decode(k, true), pct_decode(v, true))
                })
                .collect(),
        )
    }
    pub fn has(&self, k: &str) -> bool {
        self.0.iter().any(|(a, _)| a == k)
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
    }
    pub fn all(&self, k: &str) -> Vec<&str> {
        self.0.iter().filter(|(a, _)| a == k).map(|(_, v)| v.as_str()).collect()
    }
}

fn pct_decode(s: &str, plus: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn token_of(q: &Query, headers: &[(String, String)]) -> String {
    if let Some(t) = q.get("token") {
        if !t.is_empty() {
            return t.to_string();
        }
    }
    let h = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str());
    if let Some(t) = h("x-consul-token") {
        if !t.is_empty() {
            return t.to_string();
        }
    }
    if let Some(a) = h("authorization") {
        let parts: Vec<&str> = a.split(' ').collect();
        if parts.len() > 1 && parts[0].eq_ignore_ascii_case("bearer") {
            let value = parts[1..].join(" ");
            return value.trim().split(' ').next().unwrap_or("").trim().to_string();
        }
    }
    String::new()
}

struct Ctx {
    method: String,
    path: String,
    q: Query,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Ctx {
    fn header(&self, n: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    close: bool,
    /// Set by Consul's `wrap` (registered endpoints): adds the ACL policy header.
    wrapped: bool,
}

impl Reply {
    fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into().into_bytes(),
            close: false,
            wrapped: true,
        }
    }
    fn empty(status: u16) -> Reply {
        Reply::text(status, "")
    }
    fn json(v: &Value, pretty: bool) -> Reply {
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: go_json(v, pretty),
            close: false,
            wrapped: true,
        }
    }
    fn with_headers(mut self, h: Vec<(String, String)>) -> Reply {
        self.headers.extend(h);
        self
    }
}

fn fault_reply(f: &Fault) -> Option<Reply> {
    match f {
        Fault::Status(code) => {
            let body = match code {
                500 => "No cluster leader".to_string(),
                429 => CONNLIMIT_TEXT.to_string(),
                403 => "ACL not found".to_string(),
                503 => "rate limit exceeded for operation that can only be performed by the leader, try again later"
                    .to_string(),
                404 => String::new(),
                c => format!("Unexpected response code {c}"),
            };
            let mut r = Reply::text(*code, body);
            r.close = *code == 429;
            Some(r)
        }
        Fault::StatusBody(code, body) => Some(Reply::text(*code, body.clone())),
        _ => None,
    }
}

fn answers_now(f: &Fault) -> bool {
    matches!(f, Fault::Status(_) | Fault::StatusBody(..) | Fault::Garbage | Fault::WrongTypes)
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let raw_path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let seq = sh.lock().record(Recorded {
        seq: 0,
        method: method.clone(),
        path: raw_path.clone(),
        query: raw_query.clone(),
        headers: headers.clone(),
        body: body.clone(),
        peer,
        received: Instant::now(),
        answered: None,
        status: None,
    });
    let fault = sh.lock().fault.clone();
    match fault {
        Fault::Hang => std::future::pending::<()>().await,
        Fault::Slow(d) => tokio::time::sleep(d).await,
        _ => {}
    }
    let ctx = Ctx {
        method,
        path: pct_decode(&raw_path, false),
        q: Query::parse(&raw_query),
        headers,
        body,
    };
    let fault = sh.lock().fault.clone();
    let mut reply = match fault_reply(&fault) {
        Some(r) => r,
        None => route(&sh, &ctx).await,
    };
    finalize(&sh, &ctx, &mut reply);
    sh.lock().answered(seq, reply.status);
    let mut b = Response::builder().status(reply.status);
    for (k, v) in &reply.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    if reply.close {
        b = b.header("Connection", "close");
    }
    b.body(Full::new(Bytes::from(reply.body))).unwrap()
}

fn finalize(sh: &Arc<Shared>, ctx: &Ctx, r: &mut Reply) {
    if r.wrapped {
        let policy = if sh.lock().acl_master.is_some() { "deny" } else { "allow" };
        r.headers.push(("X-Consul-Default-Acl-Policy".into(), policy.into()));
    }
    r.headers.push(("Vary".into(), "Accept-Encoding".into()));
    let has_ct = r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if !has_ct && !r.body.is_empty() {
        r.headers.push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
    }
    if r.body.len() >= GZIP_MIN_SIZE && accepts_gzip(ctx.header("accept-encoding").unwrap_or("")) {
        r.body = gzip_stored(&r.body);
        r.headers.push(("Content-Encoding".into(), "gzip".into()));
    }
}

fn accepts_gzip(ae: &str) -> bool {
    ae.split(',').any(|part| {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim();
        if !coding.eq_ignore_ascii_case("gzip") {
            return false;
        }
        for p in it {
            if let Some(q) = p.trim().strip_prefix("q=") {
                return q.trim().parse::<f64>().map(|q| q > 0.0).unwrap_or(false);
            }
        }
        true
    })
}

// ---------------------------------------------------------------- routing

const GET: &[&str] = &["GET"];
const PUT: &[&str] = &["PUT"];
const KV_METHODS: &[&str] = &["GET", "PUT", "DELETE"];

fn method_check(ctx: &Ctx, allowed: &[&str]) -> Option<Reply> {
    if allowed.contains(&ctx.method.as_str()) {
        return None;
    }
    let mut allow = vec!["OPTIONS"];
    allow.extend_from_slice(allowed);
    let allow = allow.join(",");
    if ctx.method == "OPTIONS" {
        return Some(Reply::empty(200).with_headers(vec![("Allow".into(), allow)]));
    }
    Some(Reply::text(405, format!("method {} not allowed", ctx.method)).with_headers(vec![("Allow".into(), allow)]))
}

async fn route(sh: &Arc<Shared>, ctx: &Ctx) -> Reply {
    let p = ctx.path.as_str();
    let (allowed, which): (&[&str], Ep) = if let Some(rest) = p.strip_prefix("/v1/health/service/") {
        (GET, Ep::Health(rest.to_string()))
    } else if let Some(rest) = p.strip_prefix("/v1/health/state/") {
        (GET, Ep::HealthState(rest.to_string()))
    } else if p == "/v1/catalog/services" {
        (GET, Ep::CatalogServices)
    } else if let Some(rest) = p.strip_prefix("/v1/catalog/service/") {
        (GET, Ep::CatalogService(rest.to_string()))
    } else if p == "/v1/status/leader" {
        (GET, Ep::Leader)
    } else if p == "/v1/status/peers" {
        (GET, Ep::Peers)
    } else if p == "/v1/agent/self" {
        (GET, Ep::AgentSelf)
    } else if p == "/v1/agent/services" {
        (GET, Ep::AgentServices)
    } else if p == "/v1/agent/checks" {
        (GET, Ep::AgentChecks)
    } else if p == "/v1/agent/service/register" {
        (PUT, Ep::Register)
    } else if let Some(rest) = p.strip_prefix("/v1/agent/service/deregister/") {
        (PUT, Ep::Deregister(rest.to_string()))
    } else if let Some(rest) = p.strip_prefix("/v1/agent/service/maintenance/") {
        (PUT, Ep::ServiceMaint(rest.to_string()))
    } else if p == "/v1/agent/maintenance" {
        (PUT, Ep::NodeMaint)
    } else if let Some(rest) = p.strip_prefix("/v1/agent/check/pass/") {
        (PUT, Ep::Ttl("passing", rest.to_string()))
    } else if let Some(rest) = p.strip_prefix("/v1/agent/check/warn/") {
        (PUT, Ep::Ttl("warning", rest.to_string()))
    } else if let Some(rest) = p.strip_prefix("/v1/agent/check/fail/") {
        (PUT, Ep::Ttl("critical", rest.to_string()))
    } else if let Some(rest) = p.strip_prefix("/v1/agent/check/update/") {
        (PUT, Ep::CheckUpdate(rest.to_string()))
    } else if let Some(rest) = p.strip_prefix("/v1/kv/") {
        (KV_METHODS, Ep::Kv(rest.to_string()))
    } else if p == "/" {
        let mut r = Reply::text(200, "Consul Agent");
        r.wrapped = false;
        return r;
    } else {
        let mut r = Reply::empty(404);
        r.wrapped = false;
        return r;
    };
    if let Some(r) = method_check(ctx, allowed) {
        return r;
    }
    match which {
        Ep::Health(name) => read_endpoint(sh, ctx, ReadKind::Health(name)).await,
        Ep::HealthState(state) => read_endpoint(sh, ctx, ReadKind::HealthState(state)).await,
        Ep::CatalogServices => read_endpoint(sh, ctx, ReadKind::CatalogServices).await,
        Ep::CatalogService(name) => read_endpoint(sh, ctx, ReadKind::CatalogService(name)).await,
        Ep::Leader => {
            let st = sh.lock();
            let leader = if st.fault == Fault::NoLeader { "" } else { "127.0.0.1:8300" };
            let fault = st.fault.clone();
            drop(st);
            mangle_simple(&fault, json!(leader), ReadKind::Leader, ctx)
        }
        Ep::Peers => {
            let fault = sh.lock().fault.clone();
            mangle_simple(&fault, json!(["127.0.0.1:8300"]), ReadKind::Peers, ctx)
        }
        Ep::AgentSelf => {
            let (who, fault) = {
                let st = sh.lock();
                (resolve(&st, ctx), st.fault.clone())
            };
            match who {
                Who::NotFound => Reply::text(403, "ACL not found"),
                Who::Anonymous => Reply::text(403, perm_denied(&who, "agent:read", NODE_NAME)),
                _ => mangle_simple(&fault, agent_self_json(), ReadKind::AgentSelf, ctx),
            }
        }
        Ep::AgentServices | Ep::AgentChecks => {
            let st = sh.lock();
            let who = resolve(&st, ctx);
            if who == Who::NotFound {
                return Reply::text(403, "ACL not found");
            }
            let mut m = Map::new();
            let mut filtered = false;
            if matches!(which, Ep::AgentServices) {
                for s in st.agent.services.values() {
                    if !who.service_read() {
                        filtered = true;
                        continue;
                    }
                    m.insert(s.def.id.clone(), agent_service_json(&s.def));
                }
            } else {
                for c in st.agent.checks.values() {
                    if !who.service_read() {
                        filtered = true;
                        continue;
                    }
                    m.insert(c.id.clone(), check_json(&st.agent_check_rec(c)));
                }
            }
            let fault = st.fault.clone();
            drop(st);
            let mut r = mangle_simple(&fault, Value::Object(m), ReadKind::AgentServices, ctx);
            if filtered && who.gets_filtered_header() {
                r.headers.push(("X-Consul-Results-Filtered-By-Acls".into(), "true".into()));
            }
            r
        }
        Ep::Register => {
            let r = sh.lock().agent_register(ctx);
            sh.notify();
            r
        }
        Ep::Deregister(id) => {
            let r = sh.lock().agent_deregister(ctx, &id);
            sh.notify();
            r
        }
        Ep::ServiceMaint(id) => {
            let r = sh.lock().agent_service_maint(ctx, &id);
            sh.notify();
            r
        }
        Ep::NodeMaint => {
            let r = sh.lock().agent_node_maint(ctx);
            sh.notify();
            r
        }
        Ep::Ttl(status, id) => {
            let note = ctx.q.get("note").unwrap_or("").to_string();
            let r = sh.lock().agent_ttl(ctx, &id, status, &note);
            sh.notify();
            r
        }
        Ep::CheckUpdate(id) => {
            let r = sh.lock().agent_check_update(ctx, &id);
            sh.notify();
            r
        }
        Ep::Kv(key) => kv_endpoint(sh, ctx, &key).await,
    }
}

enum Ep {
    Health(String),
    HealthState(String),
    CatalogServices,
    CatalogService(String),
    Leader,
    Peers,
    AgentSelf,
    AgentServices,
    AgentChecks,
    Register,
    Deregister(String),
    ServiceMaint(String),
    NodeMaint,
    Ttl(&'static str, String),
    CheckUpdate(String),
    Kv(String),
}

// ---------------------------------------------------------------- ACL

#[derive(Clone, Debug, PartialEq)]
enum Who {
    Off,
    Full,
    Limited(String),
    Anonymous,
    NotFound,
}

impl Who {
    fn service_read(&self) -> bool {
        matches!(self, Who::Off | Who::Full)
    }
    fn node_read(&self) -> bool {
        matches!(self, Who::Off | Who::Full)
    }
    fn service_write(&self) -> bool {
        matches!(self, Who::Off | Who::Full)
    }
    fn key_read(&self) -> bool {
        matches!(self, Who::Off | Who::Full)
    }
    fn key_write(&self) -> bool {
        matches!(self, Who::Off | Who::Full)
    }
    /// The filtered-by-ACLs header is masked for anonymous callers.
    fn gets_filtered_header(&self) -> bool {
        matches!(self, Who::Limited(_))
    }
}

fn resolve(st: &State, ctx: &Ctx) -> Who {
    let Some(master) = &st.acl_master else { return Who::Off };
    let tok = token_of(&ctx.q, &ctx.headers);
    if tok.is_empty() {
        return if st.anon_not_found { Who::NotFound } else { Who::Anonymous };
    }
    if &tok == master {
        Who::Full
    } else if st.acl_limited.contains(&tok) {
        Who::Limited(tok)
    } else {
        Who::NotFound
    }
}

fn perm_denied(who: &Who, perm: &str, on: &str) -> String {
    match who {
        Who::Limited(t) => format!(
            "Permission denied: token with AccessorID '{}' lacks permission '{perm}' on \"{on}\"",
            uuid_from(&format!("accessor/{t}"))
        ),
        _ => format!("Permission denied: anonymous token lacks permission '{perm}' on \"{on}\""),
    }
}

// ---------------------------------------------------------------- reads

#[derive(Clone, Debug)]
enum ReadKind {
    Health(String),
    HealthState(String),
    CatalogServices,
    CatalogService(String),
    Leader,
    Peers,
    AgentSelf,
    AgentServices,
    KvEntries,
    KvKeys,
}

struct ReadOpts {
    stale: bool,
    consistent: bool,
    cached: bool,
    index: u64,
    wait: Option<Duration>,
    pretty: bool,
}

/// `parseEntMeta` (CE) then `parse`: consistency, then wait, then index.
fn parse_read(ctx: &Ctx) -> Result<ReadOpts, Reply> {
    parse_ent_meta(ctx)?;
    parse_query(ctx)
}

/// `parseEntMeta` on CE: namespaces and partitions other than `default` are
/// refused.
fn parse_ent_meta(ctx: &Ctx) -> Result<(), Reply> {
    let q = &ctx.q;
    if ctx.header("x-consul-namespace").is_some_and(|v| !v.is_empty()) {
        return Err(Reply::text(
            400,
            "Invalid header: \"X-Consul-Namespace\" - Namespaces are a Consul Enterprise feature",
        ));
    }
    if q.get("ns").is_some_and(|v| !v.is_empty()) {
        return Err(Reply::text(
            400,
            "Invalid query parameter: \"ns\" - Namespaces are a Consul Enterprise feature",
        ));
    }
    if ctx.header("x-consul-partition").is_some_and(|v| !v.is_empty() && v != "default") {
        return Err(Reply::text(
            400,
            "Invalid header: \"X-Consul-Partition\" - Partitions are a Consul Enterprise feature",
        ));
    }
    if q.get("partition").is_some_and(|v| !v.is_empty() && v != "default") {
        return Err(Reply::text(
            400,
            "Invalid query parameter: \"partition\" - Partitions are a Consul Enterprise feature",
        ));
    }
    Ok(())
}

/// `parse`: consistency, then wait, then index.
fn parse_query(ctx: &Ctx) -> Result<ReadOpts, Reply> {
    let q = &ctx.q;
    let mut stale = q.has("stale");
    let consistent = q.has("consistent");
    let cached = q.has("cached");
    if let Some(ms) = q.get("max_stale").filter(|v| !v.is_empty()) {
        match parse_go_duration(ms) {
            Some(d) => {
                if d > 0 {
                    stale = true;
                }
            }
            None => return Err(Reply::text(400, format!("Invalid max_stale value {}", go_quote(ms)))),
        }
    }
    if stale && consistent {
        return Err(Reply::text(400, "Cannot specify ?stale with ?consistent, conflicting semantics."));
    }
    if cached && consistent {
        return Err(Reply::text(400, "Cannot specify ?cached with ?consistent, conflicting semantics."));
    }
    let mut wait = None;
    if let Some(w) = q.get("wait").filter(|v| !v.is_empty()) {
        match parse_go_duration(w) {
            // 0 falls back to the default wait; a negative wait times out
            // at once (modelled as 1 ns).
            Some(ns) if ns < 0 => wait = Some(Duration::from_nanos(1)),
            Some(ns) => wait = Some(Duration::from_nanos(ns.min(u64::MAX as i128) as u64)),
            None => return Err(Reply::text(400, "Invalid wait time")),
        }
    }
    let mut index = 0;
    if let Some(i) = q.get("index").filter(|v| !v.is_empty()) {
        match i.parse::<u64>() {
            Ok(v) if !i.starts_with('+') => index = v,
            _ => return Err(Reply::text(400, "Invalid index")),
        }
    }
    Ok(ReadOpts {
        stale,
        consistent,
        cached,
        index,
        wait,
        pretty: q.has("pretty"),
    })
}

/// `blockingquery.Query`: returns (index, value) once the index is above
/// `min`, the wait expires, the state is abandoned, or a fault must answer.
async fn block<T, F>(sh: &Arc<Shared>, min: u64, wait: Option<Duration>, compute: F) -> (u64, T)
where
    F: FnMut(&State) -> (u64, T),
{
    block_query(sh, min, wait, |_| false, compute).await
}

/// `blockingquery.Query` for a query that can find nothing (`ErrNotFound`,
/// `absent` says which results are such): once a held query has found
/// nothing twice in a row, the result has not changed whatever its index
/// says, so it keeps holding at that index until something is found, the
/// wait expires or the state is abandoned. The first pass answers at once
/// if its index is above `min`, found or not.
async fn block_query<T, A, F>(
    sh: &Arc<Shared>,
    mut min: u64,
    wait: Option<Duration>,
    absent: A,
    mut compute: F,
) -> (u64, T)
where
    A: Fn(&T) -> bool,
    F: FnMut(&State) -> (u64, T),
{
    let mut rx = sh.tx.subscribe();
    let (abandon0, mut cur) = {
        let st = sh.lock();
        (st.abandon, compute(&st))
    };
    if min == 0 {
        return cur;
    }
    let mut was_absent = absent(&cur.1);
    let mut timeout = match wait {
        None => DEFAULT_WAIT,
        Some(d) if d.is_zero() => DEFAULT_WAIT,
        Some(d) => d.min(MAX_WAIT),
    };
    let jitter_range = (timeout / 16).as_nanos() as u64;
    if jitter_range > 0 {
        let j = rand::rng().random_range(0..jitter_range);
        timeout += Duration::from_nanos(j);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    sh.held.fetch_add(1, Ordering::SeqCst);
    struct Held<'a>(&'a AtomicUsize);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _held = Held(&sh.held);
    loop {
        if cur.0.max(1) > min {
            return cur;
        }
        tokio::select! {
            r = rx.changed() => { if r.is_err() { return cur; } }
            _ = tokio::time::sleep_until(deadline) => return cur,
        }
        let st = sh.lock();
        if st.abandon != abandon0 {
            // Consul's blockingquery: when the state store is abandoned
            // (snapshot restore) a held query returns at once with the
            // result it had computed before the restore, index unchanged.
            // The client only learns of the restore from its next read.
            return cur;
        }
        cur = compute(&st);
        let now_absent = absent(&cur.1);
        if now_absent && was_absent {
            min = cur.0;
        }
        was_absent = now_absent;
        if answers_now(&st.fault) {
            return cur;
        }
    }
}

struct Listing {
    value: Value,
    /// Entries removed by ACL filtering.
    acl_filtered: bool,
    /// For `/health/service`: whether each entry's checks all pass.
    passing: Vec<bool>,
}

async fn read_endpoint(sh: &Arc<Shared>, ctx: &Ctx, kind: ReadKind) -> Reply {
    let mut opts = match parse_read(ctx) {
        Ok(o) => o,
        Err(r) => return r,
    };
    if let ReadKind::Health(n) | ReadKind::CatalogService(n) = &kind {
        if n.is_empty() {
            return Reply::text(400, "Missing service name");
        }
    }
    if let ReadKind::HealthState(s) = &kind {
        if s.is_empty() {
            return Reply::text(400, "Missing check state");
        }
        // Stricter than Consul (which answers 200 [] here): see the module doc.
        if !matches!(s.as_str(), "any" | "passing" | "warning" | "critical") {
            return Reply::text(400, format!("Invalid check status: {}", go_quote(s)));
        }
        // HealthChecksInState always makes a plain RPC: `?cached` was
        // parsed (and rejected with `?consistent`) but has no effect.
        opts.cached = false;
    }
    // RPC: forward to the datacenter, then resolve the token, then compile
    // the filter, then block.
    let (who, leader_lost) = {
        let st = sh.lock();
        match rpc_start(&st, ctx, opts.stale || opts.cached) {
            Ok(who) => (who, st.leader_lost_at),
            Err(r) => return r,
        }
    };
    let schema = match kind {
        ReadKind::Health(_) => Schema::Health,
        ReadKind::HealthState(_) => Schema::Check,
        _ => Schema::ServiceNode,
    };
    let filter = match ctx.q.get("filter").filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => match compile_filter(f, schema) {
            Ok(e) => Some(e),
            Err(e) => return Reply::text(400, format!("Failed to create boolean expression evaluator: {e}")),
        },
    };
    let tags: Vec<String> = ctx.q.all("tag").iter().map(|t| t.to_string()).collect();
    let node_meta: Vec<(String, String)> = ctx
        .q
        .all("node-meta")
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once(':').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let sel = Selection {
        tags,
        node_meta,
        filter,
        service_read: who.service_read(),
        node_read: who.node_read(),
    };
    let (idx, listing) = block(sh, opts.index, opts.wait, |st| match &kind {
        ReadKind::Health(n) => (st.cat.service_index(n, true), health_listing(&st.cat, n, &sel)),
        ReadKind::HealthState(s) => (st.cat.idx_checks, state_listing(&st.cat, s, &sel)),
        ReadKind::CatalogService(n) => (st.cat.service_index(n, false), catalog_service_listing(&st.cat, n, &sel)),
        _ => (st.cat.idx_services, catalog_services_listing(&st.cat, &sel)),
    })
    .await;
    let (fault, streaming, cache_hit) = {
        let mut st = sh.lock();
        let hit = if opts.cached {
            let mut key = ctx.path.clone();
            for (k, v) in &ctx.q.0 {
                if k != "index" && k != "wait" {
                    key.push_str(&format!("&{k}={v}"));
                }
            }
            Some(!st.cache_seen.insert(key))
        } else {
            None
        };
        (st.fault.clone(), st.streaming, hit)
    };
    if let Some(r) = fault_reply(&fault) {
        return r;
    }
    // Response meta (setMeta), set before the passing filter can still fail.
    let is_streaming = streaming && matches!(kind, ReadKind::Health(_)) && (opts.index > 0 || opts.cached);
    let filtered = listing.acl_filtered && who.gets_filtered_header();
    let mut h = query_meta(sh, &fault, leader_lost, idx, &opts, is_streaming, filtered);
    if let Some(hit) = cache_hit {
        h.push(("X-Cache".into(), if hit { "HIT" } else { "MISS" }.into()));
        if hit {
            h.push(("Age".into(), "0".into()));
        }
    }
    let mut value = listing.value;
    if let ReadKind::Health(_) = kind {
        let passing = match bool_param(&ctx.q, "passing") {
            Ok(p) => p,
            Err(()) => return Reply::text(400, "Invalid value for ?passing").with_headers(h),
        };
        if let Value::Array(entries) = value {
            let mut kept: Vec<Value> = entries
                .into_iter()
                .zip(listing.passing.iter())
                .filter(|(_, ok)| !passing || **ok)
                .map(|(e, _)| e)
                .collect();
            kept.shuffle(&mut rand::rng());
            value = Value::Array(kept);
        }
    }
    mangle(&fault, &kind, &value, opts.pretty).with_headers(h)
}

/// The server side of an RPC before it runs: forward to the datacenter (500
/// for an unknown one), to the leader unless the read may be served stale
/// (500 without a leader), then resolve the token (403 for an unknown one).
fn rpc_start(st: &State, ctx: &Ctx, allow_stale: bool) -> Result<Who, Reply> {
    if let Some(dc) = ctx.q.get("dc") {
        if !dc.is_empty() && dc != DATACENTER {
            return Err(Reply::text(500, "No path to datacenter"));
        }
    }
    if st.fault == Fault::NoLeader && !allow_stale {
        return Err(Reply::text(500, "No cluster leader"));
    }
    let who = resolve(st, ctx);
    if who == Who::NotFound {
        return Err(Reply::text(403, "ACL not found"));
    }
    Ok(who)
}

/// `setMeta` for an indexed read: `X-Consul-Index` (as the index faults
/// have it), the leader headers (absent on streaming answers), the
/// effective consistency, the query backend, and the filtered-by-ACLs flag
/// (`filtered`: entries were hidden from a caller who may be told).
fn query_meta(
    sh: &Arc<Shared>,
    fault: &Fault,
    leader_lost: Option<Instant>,
    idx: u64,
    opts: &ReadOpts,
    is_streaming: bool,
    filtered: bool,
) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = Vec::new();
    match fault {
        Fault::IndexZero => h.push(("X-Consul-Index".into(), "0".into())),
        Fault::IndexMissing => {}
        _ => {
            h.push(("X-Consul-Index".into(), idx.max(1).to_string()));
            let mut st = sh.lock();
            st.min_handed = st.min_handed.min(idx.max(1));
        }
    }
    if !is_streaming {
        let (known, last) = match (*fault == Fault::NoLeader, leader_lost) {
            (true, Some(t)) => ("false", t.elapsed().as_millis().to_string()),
            _ => ("true", "0".to_string()),
        };
        h.push(("X-Consul-Lastcontact".into(), last));
        h.push(("X-Consul-Knownleader".into(), known.into()));
    }
    let consistency = if opts.consistent {
        "consistent"
    } else if opts.stale || opts.cached {
        "stale"
    } else {
        "leader"
    };
    h.push(("X-Consul-Effective-Consistency".into(), consistency.into()));
    h.push((
        "X-Consul-Query-Backend".into(),
        if is_streaming { "streaming" } else { "blocking-query" }.into(),
    ));
    if filtered {
        h.push(("X-Consul-Results-Filtered-By-Acls".into(), "true".into()));
    }
    h
}

/// Non-indexed GETs under `Garbage` / `WrongTypes`.
fn mangle_simple(fault: &Fault, v: Value, kind: ReadKind, ctx: &Ctx) -> Reply {
    mangle(fault, &kind, &v, ctx.q.has("pretty"))
}

/// A GET's JSON body as the body faults have it.
fn mangle(fault: &Fault, kind: &ReadKind, v: &Value, pretty: bool) -> Reply {
    match fault {
        Fault::Garbage => garbage(v),
        Fault::WrongTypes => Reply::json(&wrong_types(kind, v), pretty),
        _ => Reply::json(v, pretty),
    }
}

fn garbage(v: &Value) -> Reply {
    let full = go_json(v, false);
    let mut cut = full[..full.len() / 2].to_vec();
    if cut.is_empty() || serde_json::from_slice::<Value>(&cut).is_ok() {
        cut = b"<html><body>upstream sent garbage".to_vec();
    }
    Reply {
        status: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: cut,
        close: false,
        wrapped: true,
    }
}

/// The `WrongTypes` bodies: valid JSON of the wrong shape.
///
/// * `/v1/health/service`: every real entry twice (exact duplicates), then
///   synthetic entries with IDs `wrongtypes-port-string` (Port "8080"),
///   `wrongtypes-service-null` (Service null), `wrongtypes-port-70000`,
///   `wrongtypes-hostname` (Service.Address a hostname),
///   `wrongtypes-weights-string` (Weights.Passing "1"), `wrongtypes-node-null`
///   (Node null).
/// * `/v1/health/state`: every real check twice (exact duplicates), then
///   synthetic checks with CheckIDs `wrongtypes-status-number` (Status 2),
///   `wrongtypes-modifyindex-string` (ModifyIndex "12"),
///   `wrongtypes-servicetags-string` (ServiceTags "a,b"), then a `null`.
/// * `/v1/catalog/services`: each service maps to its tags joined by "," (a
///   string, not an array), plus `"wrongtypes": 42`.
/// * `/v1/catalog/service`: every row twice, plus rows with ServicePort "80"
///   and 70000.
/// * `/v1/status/leader`: `{"Leader": "127.0.0.1:8300"}`; `/v1/status/peers`:
///   `"127.0.0.1:8300"`; `/v1/agent/self`: `{"Config": "dc1"}`;
///   `/v1/agent/services|checks`: `["wrongtypes"]`.
/// * `/v1/kv/<key>` (one key or `?recurse`): every real entry twice, then
///   entries with Keys `wrongtypes-value-not-base64` (Value `"not base64!"`),
///   `wrongtypes-modifyindex-string` (ModifyIndex `"12"`) and
///   `wrongtypes-flags-negative` (Flags -1), then a `null`. `?keys`: every
///   name twice, then `42` and `null`. `?raw` answers are not JSON and are
///   left as they are.
fn wrong_types(kind: &ReadKind, real: &Value) -> Value {
    match kind {
        ReadKind::Health(name) => {
            let entries = real.as_array().cloned().unwrap_or_default();
            let mut out = Vec::new();
            for e in &entries {
                out.push(e.clone());
                out.push(e.clone());
            }
            let template = entries.first().cloned().unwrap_or_else(|| {
                json!({
                    "Node": {"ID": uuid_from("node/wrongtypes"), "Node": "wrongtypes-node", "Address": "10.9.9.9",
                             "Datacenter": DATACENTER, "TaggedAddresses": {}, "Meta": {}, "CreateIndex": 1, "ModifyIndex": 1},
                    "Service": {"ID": "x", "Service": name, "Tags": [], "Address": "10.9.9.9", "Meta": {}, "Port": 8080,
                                "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
                                "CreateIndex": 1, "ModifyIndex": 1},
                    "Checks": []
                })
            });
            let variant = |id: &str, f: &dyn Fn(&mut Value)| -> Value {
                let mut e = template.clone();
                e["Service"]["ID"] = json!(id);
                f(&mut e);
                e
            };
            out.push(variant("wrongtypes-port-string", &|e: &mut Value| e["Service"]["Port"] = json!("8080")));
            out.push(variant("wrongtypes-service-null", &|e: &mut Value| e["Service"] = Value::Null));
            out.push(variant("wrongtypes-port-70000", &|e: &mut Value| e["Service"]["Port"] = json!(70000)));
            out.push(variant("wrongtypes-hostname", &|e: &mut Value| {
                e["Service"]["Address"] = json!("backend-1.example.internal")
            }));
            out.push(variant("wrongtypes-weights-string", &|e: &mut Value| {
                e["Service"]["Weights"] = json!({"Passing": "1", "Warning": 1})
            }));
            out.push(variant("wrongtypes-node-null", &|e: &mut Value| e["Node"] = Value::Null));
            Value::Array(out)
        }
        ReadKind::HealthState(_) => {
            let checks = real.as_array().cloned().unwrap_or_default();
            let mut out = Vec::new();
            for c in &checks {
                out.push(c.clone());
                out.push(c.clone());
            }
            let template = checks.first().cloned().unwrap_or_else(|| {
                check_json(&service_check("wrongtypes-node", "wrongtypes", "wrongtypes", &[], "passing"))
            });
            let variant = |id: &str, f: &dyn Fn(&mut Value)| -> Value {
                let mut c = template.clone();
                c["CheckID"] = json!(id);
                f(&mut c);
                c
            };
            out.push(variant("wrongtypes-status-number", &|c: &mut Value| c["Status"] = json!(2)));
            out.push(variant("wrongtypes-modifyindex-string", &|c: &mut Value| c["ModifyIndex"] = json!("12")));
            out.push(variant("wrongtypes-servicetags-string", &|c: &mut Value| c["ServiceTags"] = json!("a,b")));
            out.push(Value::Null);
            Value::Array(out)
        }
        ReadKind::CatalogServices => {
            let mut m = Map::new();
            if let Some(obj) = real.as_object() {
                for (k, v) in obj {
                    let tags: Vec<String> = v
                        .as_array()
                        .map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect())
                        .unwrap_or_default();
                    m.insert(k.clone(), json!(tags.join(",")));
                }
            }
            m.insert("wrongtypes".into(), json!(42));
            Value::Object(m)
        }
        ReadKind::CatalogService(_) => {
            let rows = real.as_array().cloned().unwrap_or_default();
            let mut out = Vec::new();
            for r in &rows {
                out.push(r.clone());
                out.push(r.clone());
            }
            if let Some(t) = rows.first() {
                let mut a = t.clone();
                a["ServiceID"] = json!("wrongtypes-port-string");
                a["ServicePort"] = json!("80");
                out.push(a);
                let mut b = t.clone();
                b["ServiceID"] = json!("wrongtypes-port-70000");
                b["ServicePort"] = json!(70000);
                out.push(b);
            } else {
                out.push(json!({"ServiceID": "wrongtypes-port-string", "ServicePort": "80", "Address": "10.9.9.9"}));
            }
            Value::Array(out)
        }
        ReadKind::Leader => json!({"Leader": "127.0.0.1:8300"}),
        ReadKind::Peers => json!("127.0.0.1:8300"),
        ReadKind::AgentSelf => json!({"Config": DATACENTER}),
        ReadKind::AgentServices => json!(["wrongtypes"]),
        ReadKind::KvEntries => {
            let entries = real.as_array().cloned().unwrap_or_default();
            let mut out = Vec::new();
            for e in &entries {
                out.push(e.clone());
                out.push(e.clone());
            }
            if let Some(t) = entries.first() {
                let variant = |key: &str, field: &str, v: Value| -> Value {
                    let mut e = t.clone();
                    e["Key"] = json!(key);
                    e[field] = v;
                    e
                };
                out.push(variant("wrongtypes-value-not-base64", "Value", json!("not base64!")));
                out.push(variant("wrongtypes-modifyindex-string", "ModifyIndex", json!("12")));
                out.push(variant("wrongtypes-flags-negative", "Flags", json!(-1)));
            }
            out.push(Value::Null);
            Value::Array(out)
        }
        ReadKind::KvKeys => {
            let mut out = Vec::new();
            for k in real.as_array().cloned().unwrap_or_default() {
                out.push(k.clone());
                out.push(k);
            }
            out.push(json!(42));
            out.push(Value::Null);
            Value::Array(out)
        }
    }
}

/// `getBoolQueryParam`: bare → true, else `strconv.ParseBool`.
fn bool_param(q: &Query, k: &str) -> Result<bool, ()> {
    match q.get(k) {
        None => Ok(false),
        Some("") => Ok(true),
        Some(v) => parse_go_bool(v).ok_or(()),
    }
}

fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

struct Selection {
    tags: Vec<String>,
    node_meta: Vec<(String, String)>,
    filter: Option<Expr>,
    service_read: bool,
    node_read: bool,
}

impl Selection {
    fn keeps(&self, cat: &Catalog, node: &str, svc: &SvcDef) -> bool {
        let tags_ok = self
            .tags
            .iter()
            .all(|t| svc.tags.iter().any(|x| x.to_lowercase() == t.to_lowercase()));
        tags_ok && self.node_meta_ok(cat, node)
    }
    fn node_meta_ok(&self, cat: &Catalog, node: &str) -> bool {
        self.node_meta.iter().all(|(k, v)| {
            cat.nodes
                .get(node)
                .and_then(|n| n.meta.get(k))
                .is_some_and(|x| x == v)
        })
    }
}

fn entry_checks<'a>(cat: &'a Catalog, node: &str, sid: &str) -> Vec<&'a CheckRec> {
    cat.checks
        .values()
        .filter(|c| c.node == node && (c.service_id.is_empty() || c.service_id == sid))
        .collect()
}

/// The instances of service `name` that a per-service listing shows, in the
/// catalog's order, with their nodes: the ones `sel` keeps (node-meta, tag)
/// and the token may read. True: some were hidden by ACLs.
fn readable_instances<'a>(cat: &'a Catalog, name: &str, sel: &Selection) -> (Vec<(&'a str, &'a NodeRec, &'a SvcRec)>, bool) {
    let mut out = Vec::new();
    let mut acl_filtered = false;
    for ((node, _), s) in cat.services.iter().filter(|(_, s)| s.def.service == name) {
        if !sel.keeps(cat, node, &s.def) {
            continue;
        }
        if !sel.service_read {
            acl_filtered = true;
            continue;
        }
        if let Some(n) = cat.nodes.get(node) {
            out.push((node.as_str(), n, s));
        }
    }
    (out, acl_filtered)
}

fn health_listing(cat: &Catalog, name: &str, sel: &Selection) -> Listing {
    let mut out = Vec::new();
    let mut passing = Vec::new();
    let (instances, acl_filtered) = readable_instances(cat, name, sel);
    for (node, n, s) in instances {
        let checks = entry_checks(cat, node, &s.def.id);
        let entry = json!({
            "Node": node_json(node, n),
            "Service": service_json(s),
            "Checks": checks.iter().map(|c| check_json(c)).collect::<Vec<_>>(),
        });
        if let Some(f) = &sel.filter {
            if !f.eval(&|path: &[String]| health_field(&entry, path)) {
                continue;
            }
        }
        passing.push(checks.iter().all(|c| c.status == "passing"));
        out.push(entry);
    }
    Listing {
        value: Value::Array(out),
        acl_filtered,
        passing,
    }
}

/// `Health.ChecksInState`: every check in the datacenter whose status is
/// `state` (all of them for `any`), in the check table's ID-index order
/// (node, then check ID, both case-insensitive); `node-meta` in the state
/// store, then the `filter` expression, then ACL filtering (node checks need
/// node:read; service checks node:read and service:read), so that
/// `X-Consul-Results-Filtered-By-Acls` only counts entries the filter kept.
fn state_listing(cat: &Catalog, state: &str, sel: &Selection) -> Listing {
    let mut rows: Vec<&CheckRec> = cat
        .checks
        .values()
        .filter(|c| state == "any" || c.status == state)
        .filter(|c| sel.node_meta_ok(cat, &c.node))
        .collect();
    rows.sort_by_cached_key(|c| (c.node.to_lowercase(), c.check_id.to_lowercase()));
    let mut out = Vec::new();
    let mut acl_filtered = false;
    for c in rows {
        let v = check_json(c);
        if let Some(f) = &sel.filter {
            if !f.eval(&|path: &[String]| row_field(&v, path)) {
                continue;
            }
        }
        if !(sel.node_read && (c.service_id.is_empty() || sel.service_read)) {
            acl_filtered = true;
            continue;
        }
        out.push(v);
    }
    Listing {
        value: Value::Array(out),
        acl_filtered,
        passing: Vec::new(),
    }
}

fn catalog_service_listing(cat: &Catalog, name: &str, sel: &Selection) -> Listing {
    let mut out = Vec::new();
    let (instances, acl_filtered) = readable_instances(cat, name, sel);
    for (node, n, s) in instances {
        let row = service_node_json(node, n, s);
        if let Some(f) = &sel.filter {
            if !f.eval(&|path: &[String]| row_field(&row, path)) {
                continue;
            }
        }
        out.push(row);
    }
    Listing {
        value: Value::Array(out),
        acl_filtered,
        passing: Vec::new(),
    }
}

fn catalog_services_listing(cat: &Catalog, sel: &Selection) -> Listing {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut acl_filtered = false;
    for ((node, _), s) in cat.services.iter() {
        if !sel.keeps(cat, node, &s.def) {
            continue;
        }
        if !sel.service_read {
            acl_filtered = true;
            continue;
        }
        if let Some(f) = &sel.filter {
            let Some(n) = cat.nodes.get(node) else { continue };
            let row = service_node_json(node, n, s);
            if !f.eval(&|path: &[String]| row_field(&row, path)) {
                continue;
            }
        }
        m.entry(s.def.service.clone()).or_default().extend(s.def.tags.iter().cloned());
    }
    let mut obj = Map::new();
    for (k, v) in m {
        obj.insert(k, json!(v.into_iter().collect::<Vec<_>>()));
    }
    Listing {
        value: Value::Object(obj),
        acl_filtered,
        passing: Vec::new(),
    }
}

// ---------------------------------------------------------------- JSON shapes

fn tagged_node(addr: &str) -> Value {
    let mut m = Map::new();
    m.insert("lan".into(), json!(addr));
    m.insert("wan".into(), json!(addr));
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => {
            m.insert("lan_ipv4".into(), json!(addr));
            m.insert("wan_ipv4".into(), json!(addr));
        }
        Ok(IpAddr::V6(_)) => {
            m.insert("lan_ipv6".into(), json!(addr));
            m.insert("wan_ipv6".into(), json!(addr));
        }
        Err(_) => {}
    }
    Value::Object(m)
}

fn node_json(name: &str, n: &NodeRec) -> Value {
    json!({
        "ID": n.id, "Node": name, "Address": n.address, "Datacenter": DATACENTER,
        "TaggedAddresses": tagged_node(&n.address), "Meta": n.meta,
        "CreateIndex": n.create, "ModifyIndex": n.modify,
    })
}

fn tagged_svc(t: &BTreeMap<String, (String, i64)>) -> Value {
    let mut m = Map::new();
    for (k, (a, p)) in t {
        m.insert(k.clone(), json!({"Address": a, "Port": p}));
    }
    Value::Object(m)
}

fn service_json(s: &SvcRec) -> Value {
    let d = &s.def;
    let mut v = json!({
        "ID": d.id, "Service": d.service, "Tags": d.tags, "Address": d.address, "Meta": d.meta,
        "Port": d.port, "Weights": {"Passing": d.weights.0, "Warning": d.weights.1},
        "EnableTagOverride": d.eto,
        "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "Connect": {},
        "CreateIndex": s.create, "ModifyIndex": s.modify,
    });
    if !d.tagged.is_empty() {
        v["TaggedAddresses"] = tagged_svc(&d.tagged);
    }
    v
}

fn agent_service_json(d: &SvcDef) -> Value {
    let mut v = json!({
        "ID": d.id, "Service": d.service, "Tags": d.tags, "Meta": d.meta, "Port": d.port,
        "Address": d.address, "Weights": {"Passing": d.weights.0, "Warning": d.weights.1},
        "EnableTagOverride": d.eto, "Datacenter": DATACENTER,
    });
    if !d.tagged.is_empty() {
        v["TaggedAddresses"] = tagged_svc(&d.tagged);
    }
    v
}

fn check_json(c: &CheckRec) -> Value {
    json!({
        "Node": c.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status, "Notes": c.notes,
        "Output": c.output, "ServiceID": c.service_id, "ServiceName": c.service_name,
        "ServiceTags": c.service_tags, "Type": c.typ, "Interval": c.interval, "Timeout": c.timeout,
        "ExposedPort": 0, "Definition": {}, "CreateIndex": c.create, "ModifyIndex": c.modify,
    })
}

fn service_node_json(node: &str, n: &NodeRec, s: &SvcRec) -> Value {
    let d = &s.def;
    let mut v = json!({
        "ID": n.id, "Node": node, "Address": n.address, "Datacenter": DATACENTER,
        "TaggedAddresses": tagged_node(&n.address), "NodeMeta": n.meta,
        "ServiceKind": "", "ServiceID": d.id, "ServiceName": d.service, "ServiceTags": d.tags,
        "ServiceAddress": d.address,
        "ServiceWeights": {"Passing": d.weights.0, "Warning": d.weights.1},
        "ServiceMeta": d.meta, "ServicePort": d.port, "ServiceEnableTagOverride": d.eto,
        "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}}, "ServiceConnect": {},
        "CreateIndex": s.create, "ModifyIndex": s.modify,
    });
    if !d.tagged.is_empty() {
        v["ServiceTaggedAddresses"] = tagged_svc(&d.tagged);
    }
    v
}

fn agent_self_json() -> Value {
    json!({
        "Config": {
            "Datacenter": DATACENTER, "PrimaryDatacenter": DATACENTER, "NodeName": NODE_NAME,
            "NodeID": uuid_from(&format!("node/{NODE_NAME}")), "Revision": "double", "Server": true,
            "Version": VERSION, "BuildDate": "2024-06-12T00:00:00Z",
        },
        "DebugConfig": {"Datacenter": DATACENTER, "NodeName": NODE_NAME},
        "Member": {
            "Name": NODE_NAME, "Addr": "127.0.0.1", "Port": 8301,
            "Tags": {"dc": DATACENTER, "role": "consul", "build": format!("{VERSION}:double"), "vsn": "2"},
            "Status": 1,
        },
        "Stats": {},
        "Meta": {"consul-network-segment": "", "consul-version": VERSION},
    })
}

/// Go's `json.Marshal` / `MarshalIndent(v, "", "    ")` + "\n", with Go's
/// HTML-safe escaping of <, > and &.
fn go_json(v: &Value, pretty: bool) -> Vec<u8> {
    let s = if pretty {
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        serde::Serialize::serialize(v, &mut ser).unwrap();
        buf.push(b'\n');
        String::from_utf8(buf).unwrap()
    } else {
        serde_json::to_string(v).unwrap()
    };
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out.into_bytes()
}

fn go_quote(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

// ---------------------------------------------------------------- KV endpoints [5.5]

/// `validateKVKey` of Consul's newest releases: no leading `/`, only
/// alphanumerics and `,-_./`, no `../`, and no name ending in an extension
/// that proxies might cache.
pub fn validate_kv_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key cannot be empty".into());
    }
    if key.starts_with('/') {
        return Err("key must not begin with a '/'".into());
    }
    for (i, r) in key.char_indices() {
        if !(r.is_ascii_alphanumeric() || matches!(r, ',' | '-' | '_' | '.' | '/')) {
            return Err(format!(
                "key contains invalid character '{r}' at position {i}. \
                 Only alphanumeric characters and ,-_./ are allowed"
            ));
        }
    }
    if key.contains("../") {
        return Err("key contains path traversal sequence".into());
    }
    const SUSPICIOUS: &[&str] = &[
        ".js", ".css", ".html", ".htm", ".xml", ".json", ".txt", ".log", ".php", ".asp", ".jsp", ".cgi", ".pl", ".py",
        ".rb", ".sh", ".exe", ".dll", ".bat", ".cmd", ".com", ".scr", ".vbs", ".pdf", ".doc", ".docx", ".xls", ".xlsx",
        ".ppt", ".pptx", ".zip", ".rar", ".tar", ".gz", ".7z", ".bz2", ".jpg", ".jpeg", ".png", ".gif", ".svg", ".ico",
        ".bmp", ".mp3", ".mp4", ".avi", ".mov", ".wmv", ".flv", ".swf", ".woff", ".woff2", ".ttf", ".eot", ".otf",
    ];
    let lower = key.to_lowercase();
    if let Some(ext) = SUSPICIOUS.iter().find(|ext| lower.ends_with(**ext)) {
        return Err(format!("key contains suspicious file extension '{ext}' that may be cached by proxies"));
    }
    Ok(())
}

/// Standard base64 with padding, as Go's `encoding/json` writes a `[]byte`.
pub fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        // A chunk of k bytes gives k + 1 characters, padded to 4 with '='.
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `DirEntry` as Go marshals it in CE (no `Session` without a lock).
fn kv_entry_json(key: &str, e: &KvRec) -> Value {
    json!({
        "LockIndex": 0, "Key": key, "Flags": e.flags,
        "Value": if e.value.is_empty() { Value::Null } else { json!(base64_encode(&e.value)) },
        "CreateIndex": e.create, "ModifyIndex": e.modify,
    })
}

/// Go's `url.Values.Encode`: keys sorted, each name and value `QueryEscape`d.
fn go_encode_query(q: &Query) -> String {
    fn esc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in &q.0 {
        by_key.entry(k).or_default().push(v);
    }
    let mut parts = Vec::new();
    for (k, vs) in by_key {
        for v in vs {
            parts.push(format!("{}={}", esc(k), esc(v)));
        }
    }
    parts.join("&")
}

/// `conflictingFlags`: more than one of `flags` present is a 400 that quotes
/// the whole query, re-encoded.
fn conflicting_flags(q: &Query, flags: &[&str]) -> Option<Reply> {
    if flags.iter().filter(|f| q.has(f)).count() < 2 {
        return None;
    }
    Some(Reply::text(400, format!("Conflicting flags: {}\n", go_encode_query(q))))
}

/// `strconv.ParseUint(s, 10, 64)`. Consul hands its error back as is, so the
/// agent answers 500 with Go's text.
fn parse_go_uint(s: &str) -> Result<u64, Reply> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Reply::text(500, format!("strconv.ParseUint: parsing {}: invalid syntax", go_quote(s))));
    }
    s.parse::<u64>()
        .map_err(|_| Reply::text(500, format!("strconv.ParseUint: parsing {}: value out of range", go_quote(s))))
}

/// A query parameter parsed with `parse_go_uint`, if present.
fn uint_param(q: &Query, k: &str) -> Result<Option<u64>, Reply> {
    match q.has(k) {
        true => parse_go_uint(q.get(k).unwrap_or("")).map(Some),
        false => Ok(None),
    }
}

/// Sessions are not modelled, so neither are locks.
const NO_SESSIONS: &str = "the Consul double does not model sessions: acquire and release are not supported";

/// `KVSEndpoint`: `parse`, the traversal checks on the (decoded) path, the
/// key check, then the method's handler.
async fn kv_endpoint(sh: &Arc<Shared>, ctx: &Ctx, key: &str) -> Reply {
    let opts = match parse_query(ctx) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let p = ctx.path.as_str();
    if p.contains("../") || p.contains("..\\") {
        return Reply::text(400, "URL path contains invalid traversal sequence");
    }
    if ["%2e%2e%2f", "%2e%2e/", "..%2f", "%2e%2e%5c", "%252e%252e%252f"].iter().any(|t| p.contains(t)) {
        return Reply::text(400, "URL path contains encoded traversal sequence");
    }
    if !key.is_empty() {
        if let Err(e) = validate_kv_key(key) {
            return Reply::text(400, e);
        }
    }
    match ctx.method.as_str() {
        "GET" => kv_read(sh, ctx, key, opts).await,
        "PUT" => {
            let r = sh.lock().kv_put(ctx, key);
            sh.notify();
            r
        }
        _ => {
            let r = sh.lock().kv_delete(ctx, key);
            sh.notify();
            r
        }
    }
}

/// What one pass of a KV read found, among the entries the token may read.
struct KvFound {
    entries: Vec<(String, KvRec)>,
    /// `?keys`: the names, cut after the separator.
    keys: Vec<String>,
    acl_filtered: bool,
}

/// `KVSGet` (`KVS.Get`, or `KVS.List` with `?recurse`) and `KVSGetKeys`
/// (`KVS.ListKeys`, with `?keys`).
async fn kv_read(sh: &Arc<Shared>, ctx: &Ctx, key: &str, mut opts: ReadOpts) -> Reply {
    let list_keys = ctx.q.has("keys");
    let recurse = list_keys || ctx.q.has("recurse");
    if !recurse && key.is_empty() {
        return Reply::text(400, "Missing key name");
    }
    if let Err(r) = parse_ent_meta(ctx) {
        return r;
    }
    // KV reads never use the agent cache: `?cached` was parsed (and refused
    // with `?consistent`) but has no effect.
    opts.cached = false;
    let (who, leader_lost) = {
        let st = sh.lock();
        match rpc_start(&st, ctx, opts.stale) {
            Ok(who) => (who, st.leader_lost_at),
            Err(r) => return r,
        }
    };
    // A single key is checked in the query function's first pass, found or
    // not: the refusal answers at once, without an index.
    if !recurse && !who.key_read() {
        return Reply::text(403, perm_denied(&who, "key:read", key));
    }
    let sep = if ctx.q.has("separator") {
        ctx.q.get("separator").unwrap_or("")
    } else {
        ctx.q.get("seperator").unwrap_or("")
    };
    let compute = |st: &State| -> (u64, KvFound) {
        let kv = &st.cat.kv;
        if !recurse {
            let entries = kv.entries.get(key).map(|e| (key.to_string(), e.clone())).into_iter().collect();
            let found = KvFound {
                entries,
                keys: Vec::new(),
                acl_filtered: false,
            };
            return (kv.key_index(key), found);
        }
        let all: Vec<(&String, &KvRec)> = under(&kv.entries, key).collect();
        let readable: Vec<(&String, &KvRec)> = all.iter().copied().filter(|_| who.key_read()).collect();
        let mut keys = Vec::new();
        if list_keys {
            let mut seen = HashSet::new();
            for (k, _) in &readable {
                match k[key.len()..].find(sep) {
                    Some(i) if !sep.is_empty() => {
                        let cut = &k[..key.len() + i + sep.len()];
                        if seen.insert(cut) {
                            keys.push(cut.to_string());
                        }
                    }
                    _ => keys.push(k.to_string()),
                }
            }
        }
        let found = KvFound {
            entries: readable.iter().map(|(k, e)| (k.to_string(), (*e).clone())).collect(),
            keys,
            acl_filtered: readable.len() != all.len(),
        };
        (kv.prefix_index(key), found)
    };
    // Only `KVS.Get` reports a missing key as `ErrNotFound`; an empty list is
    // an ordinary result.
    let absent = |f: &KvFound| !recurse && f.entries.is_empty();
    let (idx, found) = block_query(sh, opts.index, opts.wait, absent, compute).await;
    let fault = sh.lock().fault.clone();
    if let Some(r) = fault_reply(&fault) {
        return r;
    }
    let filtered = found.acl_filtered && who.gets_filtered_header();
    let h = query_meta(sh, &fault, leader_lost, idx, &opts, false, filtered);
    if list_keys {
        // The root listing is never a 404.
        if found.keys.is_empty() && !key.is_empty() {
            return Reply::empty(404).with_headers(h);
        }
        return mangle(&fault, &ReadKind::KvKeys, &json!(found.keys), opts.pretty).with_headers(h);
    }
    let Some((_, first)) = found.entries.first() else {
        return Reply::empty(404).with_headers(h);
    };
    if !recurse && ctx.q.has("raw") {
        // The bare value, typed so that no browser sniffs it. Under
        // `Garbage` it is cut in half like the JSON bodies.
        let mut body = first.value.clone();
        if fault == Fault::Garbage {
            body.truncate(body.len() / 2);
        }
        let mut r = Reply::empty(200).with_headers(h);
        r.body = body;
        r.headers.extend([
            ("Content-Type".to_string(), "text/plain".to_string()),
            ("X-Content-Type-Options".to_string(), "nosniff".to_string()),
            ("Content-Security-Policy".to_string(), "sandbox".to_string()),
        ]);
        return r;
    }
    let v = Value::Array(found.entries.iter().map(|(k, e)| kv_entry_json(k, e)).collect());
    mangle(&fault, &ReadKind::KvEntries, &v, opts.pretty).with_headers(h)
}

impl State {
    /// `KVSPut`, then `KVS.Apply` for a set or a check-and-set.
    fn kv_put(&mut self, ctx: &Ctx, key: &str) -> Reply {
        if let Err(r) = parse_ent_meta(ctx) {
            return r;
        }
        if key.is_empty() {
            return Reply::text(400, "Missing key name");
        }
        if let Some(r) = conflicting_flags(&ctx.q, &["cas", "acquire", "release"]) {
            return r;
        }
        let flags = match uint_param(&ctx.q, "flags") {
            Ok(f) => f.unwrap_or(0),
            Err(r) => return r,
        };
        let cas = match uint_param(&ctx.q, "cas") {
            Ok(c) => c,
            Err(r) => return r,
        };
        // Checked against the declared length only, as in Consul: a chunked
        // body of any size gets through.
        if let Some(n) = ctx.header("content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
            if n > KV_MAX_VALUE_SIZE {
                return Reply::text(
                    413,
                    format!(
                        "Request body({n} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. See \
                         https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size."
                    ),
                );
            }
        }
        let who = match rpc_start(self, ctx, false) {
            Ok(w) => w,
            Err(r) => return r,
        };
        if !who.key_write() {
            return Reply::text(403, perm_denied(&who, "key:write", key));
        }
        if ctx.q.has("acquire") || ctx.q.has("release") {
            return Reply::text(500, NO_SESSIONS);
        }
        let idx = self.cat.next();
        let written = match cas {
            Some(cas) => self.cat.kv.set_cas(key, flags, &ctx.body, cas, idx),
            None => {
                self.cat.kv.set(key, flags, &ctx.body, idx);
                true
            }
        };
        Reply::json(&json!(written), ctx.q.has("pretty"))
    }

    /// `KVSDelete`, then `KVS.Apply` for a delete, a check-and-set delete or
    /// a recursive delete.
    fn kv_delete(&mut self, ctx: &Ctx, key: &str) -> Reply {
        if let Err(r) = parse_ent_meta(ctx) {
            return r;
        }
        if let Some(r) = conflicting_flags(&ctx.q, &["recurse", "cas"]) {
            return r;
        }
        let recurse = ctx.q.has("recurse");
        if !recurse && key.is_empty() {
            return Reply::text(400, "Missing key name");
        }
        let cas = match uint_param(&ctx.q, "cas") {
            Ok(c) => c,
            Err(r) => return r,
        };
        let who = match rpc_start(self, ctx, false) {
            Ok(w) => w,
            Err(r) => return r,
        };
        // A recursive delete needs key:write on the whole prefix; Consul
        // words that refusal like a single key's.
        if !who.key_write() {
            return Reply::text(403, perm_denied(&who, "key:write", key));
        }
        let idx = self.cat.next();
        let answer = match cas {
            Some(cas) => self.cat.kv.delete_cas(key, cas, idx),
            None if recurse => {
                self.cat.kv.delete_tree(key, idx);
                true
            }
            None => {
                self.cat.kv.delete(key, idx);
                true
            }
        };
        Reply::json(&json!(answer), ctx.q.has("pretty"))
    }
}

// ---------------------------------------------------------------- agent endpoints

fn norm_key(k: &str) -> String {
    k.chars().filter(|c| *c != '_').flat_map(|c| c.to_lowercase()).collect()
}

/// Case- and underscore-insensitive field lookup (mapstructure + Consul's
/// snake_case translation).
fn field<'a>(obj: &'a Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    for n in names {
        let want = norm_key(n);
        if let Some((_, v)) = obj.iter().find(|(k, _)| norm_key(k) == want) {
            if !v.is_null() {
                return Some(v);
            }
        }
    }
    None
}

fn str_field(obj: &Map<String, Value>, names: &[&str]) -> Result<String, String> {
    match field(obj, names) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("'{}' expected type 'string', got unconvertible type '{}'", names[0], json_type(v))),
    }
}

fn int_field(obj: &Map<String, Value>, names: &[&str]) -> Result<Option<i64>, String> {
    match field(obj, names) {
        None => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(v) => Err(format!("'{}' expected type 'int', got unconvertible type '{}'", names[0], json_type(v))),
    }
}

fn dur_field(obj: &Map<String, Value>, names: &[&str]) -> Result<Option<Duration>, String> {
    match field(obj, names) {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => match parse_go_duration(s) {
            Some(ns) if ns > 0 => Ok(Some(Duration::from_nanos(ns as u64))),
            Some(_) => Ok(None),
            None => Err(format!("time: invalid duration {}", go_quote(s))),
        },
        Some(Value::Number(n)) => Ok(n.as_i64().filter(|v| *v > 0).map(|v| Duration::from_nanos(v as u64))),
        Some(v) => Err(format!("'{}' expected a duration, got '{}'", names[0], json_type(v))),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "float64",
        Value::String(_) => "string",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    }
}

struct CheckDef {
    id: String,
    name: String,
    notes: String,
    status: String,
    ttl: Option<Duration>,
    typ: String,
    interval: String,
    timeout: String,
    definition: Value,
}

fn parse_check(v: &Value) -> Result<Option<CheckDef>, Reply> {
    let decode = |e: String| Reply::text(400, format!("Request decode failed: {e}"));
    let Some(obj) = v.as_object() else {
        return Err(decode(format!("check: expected a map, got '{}'", json_type(v))));
    };
    if obj.values().all(|v| v.is_null()) {
        return Ok(None);
    }
    let s = |n: &[&str]| str_field(obj, n).map_err(decode);
    let ttl = dur_field(obj, &["TTL"]).map_err(decode)?;
    let interval = dur_field(obj, &["Interval"]).map_err(decode)?;
    let timeout = dur_field(obj, &["Timeout"]).map_err(decode)?;
    let http = s(&["HTTP"])?;
    let tcp = s(&["TCP"])?;
    let udp = s(&["UDP"])?;
    let grpc = s(&["GRPC"])?;
    let h2 = s(&["H2PING"])?;
    let script = field(obj, &["Args", "ScriptArgs"]).is_some();
    let alias = !s(&["AliasService"])?.is_empty() || !s(&["AliasNode"])?.is_empty();
    let interval_check = script || !http.is_empty() || !tcp.is_empty() || !udp.is_empty() || !grpc.is_empty() || !h2.is_empty();
    let invalid = |m: &str| Reply::text(400, format!("Invalid check: {m}"));
    if interval.is_some() && ttl.is_some() {
        return Err(invalid("Interval and TTL cannot both be specified"));
    }
    if interval_check && interval.is_none() {
        return Err(invalid("Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks"));
    }
    if interval_check && alias {
        return Err(invalid("Interval cannot be set for Alias checks"));
    }
    if alias && ttl.is_some() {
        return Err(invalid("TTL must be not be set for Alias checks"));
    }
    if !interval_check && !alias && ttl.is_none() {
        return Err(invalid("TTL must be > 0 for TTL checks"));
    }
    let typ = if ttl.is_some() {
        "ttl"
    } else if !http.is_empty() {
        "http"
    } else if !tcp.is_empty() {
        "tcp"
    } else if !udp.is_empty() {
        "udp"
    } else if !grpc.is_empty() {
        "grpc"
    } else if !h2.is_empty() {
        "h2ping"
    } else if script {
        "script"
    } else {
        "alias"
    };
    Ok(Some(CheckDef {
        id: s(&["CheckID", "ID"])?,
        name: s(&["Name"])?,
        notes: s(&["Notes"])?,
        status: s(&["Status"])?,
        ttl,
        typ: typ.into(),
        interval: interval.map(go_duration_string).unwrap_or_default(),
        timeout: timeout.map(go_duration_string).unwrap_or_default(),
        definition: v.clone(),
    }))
}

fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), String> {
    if meta.len() > 64 {
        return Err("Node metadata cannot contain more than 64 key/value pairs".into());
    }
    for (k, v) in meta {
        if k.is_empty() {
            return Err("Key cannot be blank".into());
        }
        if !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("Key contains invalid characters: {k}"));
        }
        if k.len() > 128 {
            return Err(format!("Key is too long (limit: 128 characters): {k}"));
        }
        if k.starts_with("consul-") {
            return Err(format!("Key prefix 'consul-' is reserved for internal use: {k}"));
        }
        if v.len() > 512 {
            return Err(format!("Value is too long (limit: 512 characters): {v}"));
        }
    }
    Ok(())
}

impl State {
    fn agent_register(&mut self, ctx: &Ctx) -> Reply {
        let decode = |e: String| Reply::text(400, format!("Request decode failed: {e}"));
        let v: Value = match serde_json::from_slice(&ctx.body) {
            Ok(v) => v,
            Err(e) => return decode(e.to_string()),
        };
        let Some(obj) = v.as_object() else {
            return decode(format!("expected a JSON object, got '{}'", json_type(&v)));
        };
        macro_rules! tri {
            ($e:expr) => {
                match $e {
                    Ok(x) => x,
                    Err(e) => return decode(e),
                }
            };
        }
        let name = tri!(str_field(obj, &["Name"]));
        let mut id = tri!(str_field(obj, &["ID"]));
        let address = tri!(str_field(obj, &["Address"]));
        let port = tri!(int_field(obj, &["Port"])).unwrap_or(0);
        let tags: Vec<String> = match field(obj, &["Tags"]) {
            None => Vec::new(),
            Some(Value::Array(a)) => {
                let mut t = Vec::new();
                for x in a {
                    match x.as_str() {
                        Some(s) => t.push(s.to_string()),
                        None => return decode(format!("'Tags[]' expected type 'string', got '{}'", json_type(x))),
                    }
                }
                t
            }
            Some(x) => return decode(format!("'Tags' expected a slice, got '{}'", json_type(x))),
        };
        let mut meta = BTreeMap::new();
        match field(obj, &["Meta"]) {
            None => {}
            Some(Value::Object(m)) => {
                for (k, x) in m {
                    match x.as_str() {
                        Some(s) => {
                            meta.insert(k.clone(), s.to_string());
                        }
                        None => return decode(format!("'Meta[{k}]' expected type 'string', got '{}'", json_type(x))),
                    }
                }
            }
            Some(x) => return decode(format!("'Meta' expected a map, got '{}'", json_type(x))),
        }
        let mut weights = (1i64, 1i64);
        let mut weights_given = false;
        match field(obj, &["Weights"]) {
            None => {}
            Some(Value::Object(w)) => {
                weights_given = true;
                weights = (
                    tri!(int_field(w, &["Passing"])).unwrap_or(0),
                    tri!(int_field(w, &["Warning"])).unwrap_or(0),
                );
            }
            Some(x) => return decode(format!("'Weights' expected a map, got '{}'", json_type(x))),
        }
        let mut tagged = BTreeMap::new();
        if let Some(Value::Object(t)) = field(obj, &["TaggedAddresses"]) {
            for (k, x) in t {
                if let Some(o) = x.as_object() {
                    let a = tri!(str_field(o, &["Address"]));
                    let p = tri!(int_field(o, &["Port"])).unwrap_or(0);
                    tagged.insert(k.clone(), (a, p));
                }
            }
        }
        let eto = matches!(field(obj, &["EnableTagOverride"]), Some(Value::Bool(true)));
        let mut check_defs = Vec::new();
        if let Some(c) = field(obj, &["Check"]) {
            match parse_check(c) {
                Ok(Some(d)) => check_defs.push(d),
                Ok(None) => {}
                Err(r) => return r,
            }
        }
        if let Some(cs) = field(obj, &["Checks"]) {
            let Some(arr) = cs.as_array() else {
                return decode(format!("'Checks' expected a slice, got '{}'", json_type(cs)));
            };
            for c in arr {
                match parse_check(c) {
                    Ok(Some(d)) => check_defs.push(d),
                    Ok(None) => {}
                    Err(r) => return r,
                }
            }
        }
        // Validation, in AgentRegisterService's order.
        if name.is_empty() {
            return Reply::text(400, "Missing service name");
        }
        if matches!(address.as_str(), "0.0.0.0" | "::" | "[::]") {
            return Reply::text(400, "Invalid service address");
        }
        if weights_given {
            if weights.0 < 1 {
                return Reply::text(400, "Invalid Weights: Passing must be greater than 0");
            }
            if weights.1 < 0 {
                return Reply::text(400, "Invalid Weights: Warning must be greater or equal than 0");
            }
            if weights.0 > 65535 || weights.1 > 65535 {
                return Reply::text(400, "Invalid Weights: Passing or Warning must be less or equal than 65535");
            }
        }
        if let Err(e) = validate_meta(&meta) {
            return Reply::text(400, format!("Invalid Service Meta: {e}"));
        }
        for c in &check_defs {
            if !c.status.is_empty() && !valid_status(&c.status) {
                return Reply::text(400, "Status for checks must 'passing', 'warning', 'critical'");
            }
        }
        let who = resolve(self, ctx);
        if who == Who::NotFound {
            return Reply::text(403, "ACL not found");
        }
        if !who.service_write() {
            return Reply::text(403, perm_denied(&who, "service:write", &name));
        }
        if id.is_empty() {
            id = name.clone();
        }
        let mut def = SvcDef {
            id: id.clone(),
            service: name.clone(),
            tags,
            address,
            port,
            meta,
            weights,
            tagged,
            eto,
        };
        def.autofill_tagged();
        let now = Instant::now();
        let n = check_defs.len();
        let mut new_ids = Vec::new();
        for (i, c) in check_defs.into_iter().enumerate() {
            let cid = if !c.id.is_empty() {
                c.id.clone()
            } else if n > 1 {
                format!("service:{id}:{}", i + 1)
            } else {
                format!("service:{id}")
            };
            let cname = if c.name.is_empty() { format!("Service '{name}' check") } else { c.name.clone() };
            let existing = self.agent.checks.get(&cid).cloned();
            let (status, output) = match &existing {
                Some(e) => (e.status.clone(), e.output.clone()),
                None => (
                    if c.status.is_empty() { "critical".to_string() } else { c.status.clone() },
                    String::new(),
                ),
            };
            self.agent.checks.insert(
                cid.clone(),
                AgentCheck {
                    id: cid.clone(),
                    name: cname,
                    service_id: id.clone(),
                    service_name: name.clone(),
                    status,
                    output,
                    notes: c.notes,
                    typ: c.typ,
                    ttl: c.ttl,
                    ttl_deadline: c.ttl.map(|t| now + t),
                    last_ttl_output: existing.map(|e| e.last_ttl_output).unwrap_or_default(),
                    defer_at: None,
                    interval: c.interval,
                    timeout: c.timeout,
                    definition: c.definition,
                },
            );
            new_ids.push(cid);
        }
        if ctx.q.has("replace-existing-checks") {
            let stale: Vec<String> = self
                .agent
                .checks
                .values()
                .filter(|c| c.service_id == id && !new_ids.contains(&c.id) && !c.id.starts_with("_service_maintenance:"))
                .map(|c| c.id.clone())
                .collect();
            for cid in stale {
                self.agent.checks.remove(&cid);
                let idx = self.cat.next();
                self.cat.delete_check(NODE_NAME, &cid, idx);
            }
        }
        self.agent.services.insert(id.clone(), AgentSvc { def });
        self.sync_agent_service(&id);
        Reply::empty(200)
    }

    fn vet_service(&self, ctx: &Ctx, id: &str) -> Result<String, Reply> {
        let who = resolve(self, ctx);
        if who == Who::NotFound {
            return Err(Reply::text(403, "ACL not found"));
        }
        let Some(s) = self.agent.services.get(id) else {
            return Err(Reply::text(
                404,
                format!("Unknown service ID {}. Ensure that the service ID is passed, not the service name.", go_quote(id)),
            ));
        };
        if !who.service_write() {
            return Err(Reply::text(403, perm_denied(&who, "service:write", &s.def.service)));
        }
        Ok(s.def.service.clone())
    }

    fn vet_check(&self, ctx: &Ctx, cid: &str) -> Result<(), Reply> {
        let who = resolve(self, ctx);
        if who == Who::NotFound {
            return Err(Reply::text(403, "ACL not found"));
        }
        let Some(c) = self.agent.checks.get(cid) else {
            return Err(Reply::text(
                404,
                format!("Unknown check ID {}. Ensure that the check ID is passed, not the check name.", go_quote(cid)),
            ));
        };
        if !who.service_write() {
            let (perm, on) = if c.service_id.is_empty() {
                ("node:write", NODE_NAME.to_string())
            } else {
                ("service:write", c.service_name.clone())
            };
            return Err(Reply::text(403, perm_denied(&who, perm, &on)));
        }
        Ok(())
    }

    fn agent_deregister(&mut self, ctx: &Ctx, id: &str) -> Reply {
        if let Err(r) = self.vet_service(ctx, id) {
            return r;
        }
        self.agent.services.remove(id);
        self.agent.checks.retain(|_, c| c.service_id != id);
        let idx = self.cat.next();
        self.cat.delete_service(NODE_NAME, id, idx);
        Reply::empty(200)
    }

    fn agent_service_maint(&mut self, ctx: &Ctx, id: &str) -> Reply {
        if !ctx.q.has("enable") {
            return Reply::text(400, "Missing value for enable");
        }
        let raw = ctx.q.get("enable").unwrap_or("");
        let Some(enable) = parse_go_bool(raw) else {
            return Reply::text(400, format!("Invalid value for enable: {}", go_quote(raw)));
        };
        let name = match self.vet_service(ctx, id) {
            Ok(n) => n,
            Err(r) => return r,
        };
        let cid = format!("_service_maintenance:{id}");
        if enable {
            if self.agent.checks.contains_key(&cid) {
                return Reply::empty(200);
            }
            let reason = ctx.q.get("reason").filter(|r| !r.is_empty()).unwrap_or(SERVICE_MAINT_REASON);
            self.agent.checks.insert(
                cid.clone(),
                AgentCheck::maintenance(&cid, "Service Maintenance Mode", id.to_string(), name, reason),
            );
            self.sync_agent_check(&cid);
        } else if self.agent.checks.remove(&cid).is_some() {
            let idx = self.cat.next();
            self.cat.delete_check(NODE_NAME, &cid, idx);
        }
        Reply::empty(200)
    }

    fn agent_node_maint(&mut self, ctx: &Ctx) -> Reply {
        if !ctx.q.has("enable") {
            return Reply::text(400, "Missing value for enable");
        }
        let raw = ctx.q.get("enable").unwrap_or("");
        let Some(enable) = parse_go_bool(raw) else {
            return Reply::text(400, format!("Invalid value for enable: {}", go_quote(raw)));
        };
        let who = resolve(self, ctx);
        if who == Who::NotFound {
            return Reply::text(403, "ACL not found");
        }
        if !who.service_write() {
            return Reply::text(403, perm_denied(&who, "node:write", NODE_NAME));
        }
        let cid = "_node_maintenance".to_string();
        if enable {
            if !self.agent.checks.contains_key(&cid) {
                let reason = ctx.q.get("reason").filter(|r| !r.is_empty()).unwrap_or(NODE_MAINT_REASON);
                self.agent.checks.insert(
                    cid.clone(),
                    AgentCheck::maintenance(&cid, "Node Maintenance Mode", String::new(), String::new(), reason),
                );
                self.sync_agent_check(&cid);
            }
        } else if self.agent.checks.remove(&cid).is_some() {
            let idx = self.cat.next();
            self.cat.delete_check(NODE_NAME, &cid, idx);
        }
        Reply::empty(200)
    }

    /// `updateTTLCheck`.
    fn set_ttl(&mut self, cid: &str, status: &str, output: &str) -> Reply {
        let now = Instant::now();
        let Some(c) = self.agent.checks.get_mut(cid) else {
            return Reply::text(404, format!("Unknown check ID {}", go_quote(cid)));
        };
        let Some(ttl) = c.ttl else {
            return Reply::text(500, format!("CheckID {} does not have associated TTL", go_quote(cid)));
        };
        let output = if output.len() > MAX_CHECK_OUTPUT {
            let mut cut = MAX_CHECK_OUTPUT;
            while !output.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{} ... (captured {} of {} bytes)", &output[..cut], cut, output.len())
        } else {
            output.to_string()
        };
        c.ttl_deadline = Some(now + ttl);
        c.last_ttl_output = output.clone();
        self.update_agent_check(cid, status, &output, now);
        Reply::empty(200)
    }

    fn agent_ttl(&mut self, ctx: &Ctx, cid: &str, status: &str, note: &str) -> Reply {
        if let Err(r) = self.vet_check(ctx, cid) {
            return r;
        }
        self.set_ttl(cid, status, note)
    }

    fn agent_check_update(&mut self, ctx: &Ctx, cid: &str) -> Reply {
        let v: Value = match serde_json::from_slice(&ctx.body) {
            Ok(v) => v,
            Err(e) => return Reply::text(400, format!("Request decode failed: {e}")),
        };
        let Some(obj) = v.as_object() else {
            return Reply::text(400, "Request decode failed: expected a JSON object");
        };
        let status = str_field(obj, &["Status"]).unwrap_or_default();
        let output = str_field(obj, &["Output"]).unwrap_or_default();
        if !valid_status(&status) {
            return Reply::text(400, format!("Invalid check status: '{status}'"));
        }
        if let Err(r) = self.vet_check(ctx, cid) {
            return r;
        }
        self.set_ttl(cid, &status, &output)
    }
}

// ---------------------------------------------------------------- filter expressions (go-bexpr subset)

#[derive(Clone, Copy, Debug, PartialEq)]
enum Schema {
    /// `/v1/health/service` entries: `Node.*`, `Service.*`, `Checks.*`.
    Health,
    /// Catalog rows (`structs.ServiceNode`): `ServiceName`, `ServiceTags`, ...
    ServiceNode,
    /// `/v1/health/state` entries (`structs.HealthCheck`): `Status`, `ServiceName`, ...
    Check,
}

#[derive(Clone, Debug)]
enum Op {
    Eq,
    Ne,
    In,
    NotIn,
    IsEmpty,
    IsNotEmpty,
}

#[derive(Clone, Debug)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Match { sel: Vec<String>, op: Op, val: String },
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String, usize),
    Str(String, usize),
    Num(String, usize),
    Sym(&'static str, usize),
    End(usize),
}

impl Tok {
    fn pos(&self) -> usize {
        match self {
            Tok::Ident(_, p) | Tok::Str(_, p) | Tok::Num(_, p) | Tok::Sym(_, p) | Tok::End(p) => *p,
        }
    }
}

fn no_match(pos: usize, expected: &str) -> String {
    format!("1:{} ({}): no match found, expected: {}", pos + 1, pos, expected)
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let b: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '(' || c == ')' {
            out.push(Tok::Sym(if c == '(' { "(" } else { ")" }, i));
            i += 1;
        } else if c == '=' && b.get(i + 1) == Some(&'=') {
            out.push(Tok::Sym("==", i));
            i += 2;
        } else if c == '!' && b.get(i + 1) == Some(&'=') {
            out.push(Tok::Sym("!=", i));
            i += 2;
        } else if c == '"' || c == '`' {
            let start = i;
            i += 1;
            let mut s = String::new();
            loop {
                let Some(&d) = b.get(i) else {
                    return Err(no_match(start, "\"\\\"\", [^\"\\\\] or escape sequence"));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' && c == '"' {
                    let Some(&e) = b.get(i) else {
                        return Err(no_match(i, "escape sequence"));
                    };
                    i += 1;
                    s.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => other,
                    });
                } else {
                    s.push(d);
                }
            }
            out.push(Tok::Str(s, start));
        } else if c.is_ascii_digit() || (c == '-' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num(b[start..i].iter().collect(), start));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_' || b[i] == '.' || b[i] == '-') {
                i += 1;
            }
            out.push(Tok::Ident(b[start..i].iter().collect(), start));
        } else {
            return Err(no_match(i, "\"(\", \"not\", [ \\t\\r\\n] or [a-zA-Z]"));
        }
    }
    out.push(Tok::End(b.len()));
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    i: usize,
    schema: Schema,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.i]
    }
    fn kw(&self, k: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s, _) if s == k)
    }
    fn bump(&mut self) -> Tok {
        let t = self.toks[self.i].clone();
        if self.i + 1 < self.toks.len() {
            self.i += 1;
        }
        t
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut a = self.and()?;
        while self.kw("or") {
            self.bump();
            let b = self.and()?;
            a = Expr::Or(Box::new(a), Box::new(b));
        }
        Ok(a)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut a = self.not()?;
        while self.kw("and") {
            self.bump();
            let b = self.not()?;
            a = Expr::And(Box::new(a), Box::new(b));
        }
        Ok(a)
    }
    fn not(&mut self) -> Result<Expr, String> {
        if self.kw("not") {
            self.bump();
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        if matches!(self.peek(), Tok::Sym("(", _)) {
            self.bump();
            let e = self.or()?;
            match self.bump() {
                Tok::Sym(")", _) => return Ok(e),
                t => return Err(no_match(t.pos(), "\")\", \"and\", \"or\" or [ \\t\\r\\n]")),
            }
        }
        self.matcher()
    }
    fn value(&mut self) -> Result<String, String> {
        match self.bump() {
            Tok::Str(s, _) | Tok::Num(s, _) => Ok(s),
            Tok::Ident(s, _) if !s.contains('.') => Ok(s),
            t => Err(no_match(t.pos(), "\"-\", \"\\\"\", \"`\", [0-9] or [a-zA-Z]")),
        }
    }
    fn selector(&mut self) -> Result<Vec<String>, String> {
        match self.bump() {
            Tok::Ident(s, _) => {
                let path: Vec<String> = s.split('.').map(String::from).collect();
                if path.iter().any(|p| p.is_empty()) || !selector_valid(self.schema, &path) {
                    return Err(format!("Selector {} is not valid", go_quote(&s)));
                }
                Ok(path)
            }
            t => Err(no_match(t.pos(), "\"(\", \"not\", [ \\t\\r\\n] or [a-zA-Z]")),
        }
    }
    fn matcher(&mut self) -> Result<Expr, String> {
        if matches!(self.peek(), Tok::Str(..) | Tok::Num(..)) {
            let val = self.value()?;
            let negate = if self.kw("not") {
                self.bump();
                true
            } else {
                false
            };
            if !self.kw("in") {
                return Err(no_match(self.peek().pos(), "\"in\", \"not\" or [ \\t\\r\\n]"));
            }
            self.bump();
            let sel = self.selector()?;
            let op = if negate { Op::NotIn } else { Op::In };
            return Ok(Expr::Match { sel, op, val });
        }
        let sel = self.selector()?;
        let t = self.bump();
        let expected = "\"!=\", \"==\", \"contains\", \"in\", \"is\", \"matches\", \"not\" or [ \\t\\r\\n]";
        match t {
            Tok::Sym("==", _) => Ok(Expr::Match { sel, op: Op::Eq, val: self.value()? }),
            Tok::Sym("!=", _) => Ok(Expr::Match { sel, op: Op::Ne, val: self.value()? }),
            Tok::Ident(k, _) if k == "contains" => Ok(Expr::Match { sel, op: Op::In, val: self.value()? }),
            Tok::Ident(k, p) if k == "not" => {
                if self.kw("contains") {
                    self.bump();
                    Ok(Expr::Match { sel, op: Op::NotIn, val: self.value()? })
                } else {
                    Err(no_match(p + 4, "\"contains\", \"matches\" or [ \\t\\r\\n]"))
                }
            }
            Tok::Ident(k, p) if k == "is" => {
                let negate = if self.kw("not") {
                    self.bump();
                    true
                } else {
                    false
                };
                if !self.kw("empty") {
                    return Err(no_match(p + 3, "\"empty\", \"not\" or [ \\t\\r\\n]"));
                }
                self.bump();
                Ok(Expr::Match { sel, op: if negate { Op::IsNotEmpty } else { Op::IsEmpty }, val: String::new() })
            }
            Tok::Ident(k, _) if k == "matches" => {
                Err("the Consul double does not implement the \"matches\" operator".to_string())
            }
            t => Err(no_match(t.pos(), expected)),
        }
    }
}

fn compile_filter(src: &str, schema: Schema) -> Result<Expr, String> {
    let toks = lex(src)?;
    let mut p = Parser { toks, i: 0, schema };
    let e = p.or()?;
    match p.peek() {
        Tok::End(_) => Ok(e),
        t => Err(no_match(t.pos(), "\"and\", \"or\", [ \\t\\r\\n] or EOF")),
    }
}

fn selector_valid(schema: Schema, path: &[String]) -> bool {
    let p: Vec<&str> = path.iter().map(|s| s.as_str()).collect();
    match schema {
        Schema::Health => match p.as_slice() {
            ["Node", "ID" | "Node" | "Address" | "Datacenter" | "PeerName" | "Partition"] => true,
            ["Node", "TaggedAddresses" | "Meta"] | ["Node", "TaggedAddresses" | "Meta", _] => true,
            ["Service", "ID" | "Service" | "Kind" | "Address" | "Port" | "EnableTagOverride" | "Tags" | "PeerName"] => {
                true
            }
            ["Service", "Meta"] | ["Service", "Meta", _] => true,
            ["Service", "Weights", "Passing" | "Warning"] => true,
            ["Checks"] => true,
            [
                "Checks",
                "Node" | "CheckID" | "Name" | "Status" | "Notes" | "Output" | "ServiceID" | "ServiceName" | "Type",
            ] => true,
            _ => false,
        },
        Schema::ServiceNode => match p.as_slice() {
            [
                "ID" | "Node" | "Address" | "Datacenter" | "ServiceKind" | "ServiceID" | "ServiceName" | "ServiceTags"
                | "ServiceAddress" | "ServicePort" | "ServiceEnableTagOverride",
            ] => true,
            ["TaggedAddresses" | "NodeMeta" | "ServiceMeta"] | ["TaggedAddresses" | "NodeMeta" | "ServiceMeta", _] => {
                true
            }
            ["ServiceWeights", "Passing" | "Warning"] => true,
            _ => false,
        },
        // Definition and the Raft indexes are `bexpr:"-"` in Consul.
        Schema::Check => matches!(
            p.as_slice(),
            [
                "Node" | "CheckID" | "Name" | "Status" | "Notes" | "Output" | "ServiceID" | "ServiceName"
                    | "ServiceTags" | "Type" | "Interval" | "Timeout" | "ExposedPort" | "PeerName"
            ]
        ),
    }
}

fn json_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p.as_str())?;
    }
    Some(cur)
}

fn health_field(entry: &Value, path: &[String]) -> Option<Value> {
    if path[0] == "Checks" {
        let checks = entry.get("Checks")?.as_array()?;
        if path.len() == 1 {
            return Some(Value::Array(checks.clone()));
        }
        return Some(Value::Array(
            checks.iter().filter_map(|c| c.get(path[1].as_str()).cloned()).collect(),
        ));
    }
    json_path(entry, path).cloned()
}

fn row_field(row: &Value, path: &[String]) -> Option<Value> {
    json_path(row, path).cloned()
}

fn scalar_eq(v: &Value, want: &str) -> bool {
    match v {
        Value::String(s) => s == want,
        Value::Number(n) => want.parse::<f64>().ok() == n.as_f64(),
        Value::Bool(b) => parse_go_bool(want) == Some(*b),
        _ => false,
    }
}

impl Expr {
    fn eval(&self, get: &dyn Fn(&[String]) -> Option<Value>) -> bool {
        match self {
            Expr::And(a, b) => a.eval(get) && b.eval(get),
            Expr::Or(a, b) => a.eval(get) || b.eval(get),
            Expr::Not(a) => !a.eval(get),
            Expr::Match { sel, op, val } => {
                let v = get(sel);
                match op {
                    Op::Eq => v.is_some_and(|v| scalar_eq(&v, val)),
                    Op::Ne => !v.is_some_and(|v| scalar_eq(&v, val)),
                    Op::In | Op::NotIn => {
                        let hit = match v {
                            Some(Value::Array(a)) => a.iter().any(|x| scalar_eq(x, val)),
                            Some(Value::Object(m)) => m.contains_key(val.as_str()),
                            Some(Value::String(s)) => s.contains(val.as_str()),
                            _ => false,
                        };
                        hit == matches!(op, Op::In)
                    }
                    Op::IsEmpty | Op::IsNotEmpty => {
                        let empty = match v {
                            None | Some(Value::Null) => true,
                            Some(Value::Array(a)) => a.is_empty(),
                            Some(Value::Object(m)) => m.is_empty(),
                            Some(Value::String(s)) => s.is_empty(),
                            Some(_) => false,
                        };
                        empty == matches!(op, Op::IsEmpty)
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------- Go durations

/// Go's `time.ParseDuration`, in nanoseconds (may be negative).
/// None where Go returns an error.
pub fn parse_go_duration(s: &str) -> Option<i128> {
    let mut s = s;
    let mut neg = false;
    if let Some(c) = s.chars().next() {
        if c == '-' || c == '+' {
            neg = c == '-';
            s = &s[1..];
        }
    }
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !s.is_empty() {
        let b = s.as_bytes();
        if !(b[0] == b'.' || b[0].is_ascii_digit()) {
            return None;
        }
        let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let int_part = &s[..int_len];
        s = &s[int_len..];
        let mut frac_part = "";
        if s.starts_with('.') {
            s = &s[1..];
            let fl = s.bytes().take_while(|c| c.is_ascii_digit()).count();
            frac_part = &s[..fl];
            s = &s[fl..];
        }
        if int_part.is_empty() && frac_part.is_empty() {
            return None;
        }
        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map(|(i, _)| i)
            .unwrap_or(s.len());
        if unit_len == 0 {
            return None;
        }
        let unit = &s[..unit_len];
        s = &s[unit_len..];
        let mult: f64 = match unit {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let v: f64 = format!("{}.{}", if int_part.is_empty() { "0" } else { int_part }, if frac_part.is_empty() { "0" } else { frac_part })
            .parse()
            .ok()?;
        total += v * mult;
        if total > i64::MAX as f64 {
            return None;
        }
    }
    let t = total.round() as i128;
    Some(if neg { -t } else { t })
}

/// Go's `Duration.String()` for whole milliseconds and up (e.g. "10s", "1m30s", "500ms").
pub fn go_duration_string(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000_000_000 {
        if ns % 1_000_000 == 0 {
            return format!("{}ms", ns / 1_000_000);
        }
        return format!("{}ns", ns);
    }
    let secs = d.as_secs_f64();
    let h = (secs / 3600.0).floor() as u64;
    let m = ((secs - h as f64 * 3600.0) / 60.0).floor() as u64;
    let s = secs - h as f64 * 3600.0 - m as f64 * 60.0;
    let s = format!("{}", (s * 1e9).round() / 1e9);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

// ---------------------------------------------------------------- gzip (stored blocks)

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A valid gzip member whose deflate stream uses stored (uncompressed) blocks.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    if data.is_empty() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        out.push(if i + 1 == chunks.len() { 1 } else { 0 });
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// Decode a gzip member made of stored blocks (what `gzip_stored` writes),
/// checking the CRC. For tests of the double itself.
pub fn gunzip_stored(gz: &[u8]) -> Option<Vec<u8>> {
    if gz.len() < 18 || gz[0] != 0x1f || gz[1] != 0x8b || gz[2] != 8 || gz[3] != 0 {
        return None;
    }
    let mut i = 10;
    let mut out = Vec::new();
    loop {
        let hdr = *gz.get(i)?;
        if hdr & 0b110 != 0 {
            return None; // not a stored block
        }
        let len = u16::from_le_bytes([*gz.get(i + 1)?, *gz.get(i + 2)?]) as usize;
        let nlen = u16::from_le_bytes([*gz.get(i + 3)?, *gz.get(i + 4)?]);
        if nlen != !(len as u16) {
            return None;
        }
        out.extend_from_slice(gz.get(i + 5..i + 5 + len)?);
        i += 5 + len;
        if hdr & 1 == 1 {
            break;
        }
    }
    let crc = u32::from_le_bytes(gz.get(i..i + 4)?.try_into().ok()?);
    let size = u32::from_le_bytes(gz.get(i + 4..i + 8)?.try_into().ok()?);
    (crc == crc32(&out) && size as usize == out.len()).then_some(out)
}
