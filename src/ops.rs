//! Operator commands that talk to a running instance's admin API:
//! `switchyard health` (readiness with an exit code, bounded by a timeout)
//! and `switchyard status` (generation and digest, or `--compare` two nodes).

use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// Exit codes of `health` and `status --compare`.
pub const EXIT_OK: u8 = 0;
pub const EXIT_NOT_OK: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

/// `127.0.0.1:9901` or `http://host:port` → a base URL without a trailing slash.
pub fn base_url(admin: &str) -> String {
    let a = admin.trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_string()
    } else {
        format!("http://{a}")
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

/// The admin token these commands send (`Authorization: Bearer`), from the
/// file named by `SWITCHYARD_ADMIN_TOKEN_FILE`, when set.
pub fn admin_token() -> Option<String> {
    let path = std::env::var_os("SWITCHYARD_ADMIN_TOKEN_FILE")?;
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

fn with_token(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match admin_token() {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// GET `url` within `timeout`: (status code, JSON body).
pub fn get_json(url: &str, timeout: Duration) -> Result<(u16, Value), String> {
    runtime()?.block_on(async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let resp = with_token(client.get(url)).send().await.map_err(|e| format!("{url}: {e}"))?;
        let code = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| format!("{url}: reading the body: {e}"))?;
        if code == 401 {
            return Err(format!("{url}: 401: this admin API needs its token; set SWITCHYARD_ADMIN_TOKEN_FILE to the file admin.token_file names"));
        }
        let v = serde_json::from_slice(&body).map_err(|e| format!("{url}: answered {code} with a body that is not JSON: {e}"))?;
        Ok((code, v))
    })
}

/// `switchyard reload`: POST /reload, print the outcome. 0 applied or
/// unchanged, 1 refused, 2 no answer.
pub fn reload(admin: &str, timeout: Duration) -> u8 {
    let url = format!("{}/reload", base_url(admin));
    let answer = runtime().and_then(|rt| {
        rt.block_on(async {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(timeout)
                .build()
                .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
            let resp = with_token(client.post(&url)).send().await.map_err(|e| format!("{url}: {e}"))?;
            let code = resp.status().as_u16();
            let body = resp.bytes().await.map_err(|e| format!("{url}: reading the body: {e}"))?;
            serde_json::from_slice::<Value>(&body)
                .map(|v| (code, v))
                .map_err(|_| format!("{url}: answered {code}: {}", String::from_utf8_lossy(&body).trim()))
        })
    });
    let (code, v) = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("switchyard reload: {e}");
            return EXIT_UNREACHABLE;
        }
    };
    let list = |key: &str| -> Vec<String> {
        v.get(key).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect()).unwrap_or_default()
    };
    let result = v.get("result").and_then(Value::as_str).unwrap_or("unknown");
    match result {
        "applied" | "unchanged" => {
            let serial = v.get("serial").and_then(Value::as_u64).map(|s| format!(" (reload {s})")).unwrap_or_default();
            println!("{result}{serial}");
            for c in list("changes") {
                println!("  {c}");
            }
            if result == "applied" && v.get("active").and_then(Value::as_bool) != Some(true) {
                println!("  not serving yet: waiting for the first results of its new sources (see /status config)");
            }
            for f in list("needs_restart") {
                println!("  needs a restart or `switchyard upgrade`, ignored: {f}");
            }
            EXIT_OK
        }
        _ => {
            println!("refused ({code}); the running config keeps serving");
            for e in list("errors") {
                println!("  {e}");
            }
            EXIT_NOT_OK
        }
    }
}

/// `switchyard health`: 0 ready, 1 not ready (reasons printed), 2 no answer.
pub fn health(admin: &str, vrrp: bool, timeout: Duration) -> u8 {
    let url = format!("{}/readyz{}", base_url(admin), if vrrp { "?vrrp" } else { "" });
    match get_json(&url, timeout) {
        Ok((200, _)) => {
            println!("ready");
            EXIT_OK
        }
        Ok((code, v)) => {
            let reasons: Vec<String> = match v.get("reasons").and_then(Value::as_array) {
                Some(r) => r.iter().filter_map(Value::as_str).map(str::to_string).collect(),
                None => v.get("reason").and_then(Value::as_str).map(str::to_string).into_iter().collect(),
            };
            println!("not ready ({code})");
            for r in reasons {
                println!("  {r}");
            }
            EXIT_NOT_OK
        }
        Err(e) => {
            eprintln!("switchyard health: {e}");
            EXIT_UNREACHABLE
        }
    }
}

/// The table content a `/status` answer shows, in the shape the node digests
/// (`RoutingTable::normalised`): recomputing the digest from it checks that
/// both agree.
pub fn normalised_from_status(status: &Value) -> Value {
    let pick = |v: &Value, keys: &[&str]| -> Value {
        let mut m = serde_json::Map::new();
        for k in keys {
            m.insert(k.to_string(), v.get(*k).cloned().unwrap_or(Value::Null));
        }
        Value::Object(m)
    };
    let routes: Vec<Value> = status
        .get("routes")
        .and_then(Value::as_array)
        .map(|rs| rs.iter().map(|r| pick(r, &["name", "hosts", "path_prefix", "cluster", "maintenance"])).collect())
        .unwrap_or_default();
    let clusters: Vec<Value> = status
        .get("clusters")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let backends: Vec<Value> = c
                        .get("backends")
                        .and_then(Value::as_array)
                        .map(|bs| bs.iter().map(|b| pick(b, &["address", "weight", "state"])).collect())
                        .unwrap_or_default();
                    let mut m = pick(c, &["name", "selection", "discovered"]);
                    m["backends"] = Value::Array(backends);
                    m
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({ "routes": routes, "clusters": clusters })
}

/// The objects of the array `v[list]`, keyed by their `id` field.
fn keyed(v: &Value, list: &str, id: &str) -> BTreeMap<String, Value> {
    v.get(list)
        .and_then(Value::as_array)
        .map(|xs| {
            xs.iter()
                .map(|x| (x.get(id).and_then(Value::as_str).unwrap_or("").to_string(), x.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// Where two normalised tables differ, one line per difference.
pub fn diff(a: &Value, b: &Value, names: (&str, &str)) -> Vec<String> {
    let mut out = Vec::new();
    let by_name = |v: &Value, key: &str| keyed(v, key, "name");
    let ra: Vec<_> = a.get("routes").and_then(Value::as_array).cloned().unwrap_or_default();
    let rb: Vec<_> = b.get("routes").and_then(Value::as_array).cloned().unwrap_or_default();
    if ra != rb {
        let (ma, mb) = (by_name(a, "routes"), by_name(b, "routes"));
        for (n, r) in &ma {
            match mb.get(n) {
                None => out.push(format!("route {n:?}: only on {}", names.0)),
                Some(o) if o != r => out.push(format!("route {n:?}: {} has {r}, {} has {o}", names.0, names.1)),
                _ => {}
            }
        }
        for n in mb.keys().filter(|n| !ma.contains_key(*n)) {
            out.push(format!("route {n:?}: only on {}", names.1));
        }
        if out.is_empty() {
            out.push("routes: same routes in a different match order".to_string());
        }
    }
    let (ca, cb) = (by_name(a, "clusters"), by_name(b, "clusters"));
    for (n, c) in &ca {
        let Some(o) = cb.get(n) else {
            out.push(format!("cluster {n:?}: only on {}", names.0));
            continue;
        };
        for k in ["selection", "discovered"] {
            if c.get(k) != o.get(k) {
                out.push(format!("cluster {n:?}: {k} is {} on {}, {} on {}", c[k], names.0, o[k], names.1));
            }
        }
        let (ba, bb) = (keyed(c, "backends", "address"), keyed(o, "backends", "address"));
        for (addr, x) in &ba {
            match bb.get(addr) {
                None => out.push(format!("cluster {n:?}: backend {addr} only on {}", names.0)),
                Some(y) if y != x => out.push(format!(
                    "cluster {n:?}: backend {addr} is weight {} {} on {}, weight {} {} on {}",
                    x["weight"], x["state"], names.0, y["weight"], y["state"], names.1
                )),
                _ => {}
            }
        }
        for addr in bb.keys().filter(|k| !ba.contains_key(*k)) {
            out.push(format!("cluster {n:?}: backend {addr} only on {}", names.1));
        }
    }
    for n in cb.keys().filter(|n| !ca.contains_key(*n)) {
        out.push(format!("cluster {n:?}: only on {}", names.1));
    }
    out
}

/// `switchyard status [--compare A B]`.
pub fn status(admins: &[String], timeout: Duration) -> u8 {
    let mut answers = Vec::new();
    for a in admins {
        let url = format!("{}/status", base_url(a));
        match get_json(&url, timeout) {
            Ok((200, v)) => answers.push((a.as_str(), v)),
            Ok((code, _)) => {
                eprintln!("switchyard status: {url} answered {code}");
                return EXIT_UNREACHABLE;
            }
            Err(e) => {
                eprintln!("switchyard status: {e}");
                return EXIT_UNREACHABLE;
            }
        }
    }
    for (a, v) in &answers {
        let own = crate::routing::digest(&normalised_from_status(v));
        let shown = v.get("digest").and_then(Value::as_str).unwrap_or("");
        let note = if own == shown { "" } else { " (table changed while reading, or versions differ)" };
        println!(
            "{a}: generation {} digest {shown}{note} ready {}",
            v.get("generation").unwrap_or(&Value::Null),
            v.get("ready").unwrap_or(&Value::Null)
        );
    }
    if let [(na, a), (nb, b)] = answers.as_slice() {
        let d = diff(&normalised_from_status(a), &normalised_from_status(b), (na, nb));
        if d.is_empty() {
            println!("same table");
            return EXIT_OK;
        }
        println!("tables differ:");
        for line in d {
            println!("  {line}");
        }
        return EXIT_NOT_OK;
    }
    EXIT_OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(backends: Value) -> Value {
        json!({
            "generation": 7,
            "routes": [{ "name": "web", "hosts": [], "path_prefix": "/", "cluster": "web", "extra": 1 }],
            "clusters": [{ "name": "web", "selection": "round_robin", "discovered": true, "in_flight": 3, "backends": backends }],
        })
    }

    #[test]
    fn base_url_accepts_an_address_or_a_url() {
        assert_eq!(base_url("127.0.0.1:9901"), "http://127.0.0.1:9901");
        assert_eq!(base_url("http://198.18.0.2:9901/"), "http://198.18.0.2:9901");
    }

    #[test]
    fn same_tables_have_no_difference_whatever_the_volatile_fields() {
        let a = status(json!([{ "address": "127.0.0.1:1", "weight": 1, "state": "active", "in_flight": 9 }]));
        let mut b = a.clone();
        b["generation"] = json!(99);
        b["clusters"][0]["backends"][0]["in_flight"] = json!(0);
        let (na, nb) = (normalised_from_status(&a), normalised_from_status(&b));
        assert_eq!(crate::routing::digest(&na), crate::routing::digest(&nb));
        assert!(diff(&na, &nb, ("a", "b")).is_empty());
    }

    #[test]
    fn differences_name_the_cluster_and_backend() {
        let a = status(json!([
            { "address": "127.0.0.1:1", "weight": 1, "state": "active" },
            { "address": "127.0.0.1:2", "weight": 1, "state": "active" },
        ]));
        let b = status(json!([
            { "address": "127.0.0.1:1", "weight": 0, "state": "drained" },
            { "address": "127.0.0.1:3", "weight": 1, "state": "active" },
        ]));
        let (na, nb) = (normalised_from_status(&a), normalised_from_status(&b));
        assert_ne!(crate::routing::digest(&na), crate::routing::digest(&nb));
        let d = diff(&na, &nb, ("lb1", "lb2"));
        assert_eq!(
            d,
            vec![
                "cluster \"web\": backend 127.0.0.1:1 is weight 1 \"active\" on lb1, weight 0 \"drained\" on lb2",
                "cluster \"web\": backend 127.0.0.1:2 only on lb1",
                "cluster \"web\": backend 127.0.0.1:3 only on lb2",
            ]
        );
    }
}
