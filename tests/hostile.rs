//! The hostile-request corpus (`tests/hostile/cases.txt`) sent raw over
//! sockets through both request paths, in front of a strict counting
//! upstream: a raw-TCP HTTP/1.1 server that records every request exactly
//! (method, target, headers, body) and flags anything malformed or
//! ambiguous it receives as desynchronised.
//!
//! For each case: the case's bytes on a new connection, then two canary
//! requests on new connections, a GET (taken by the express path) and a
//! POST (taken by HttpProxy), each path having its own upstream pool: with
//! one worker thread, one of them goes out over the upstream connection
//! the case left in the pool (asserted for Switchyard). A case passes when
//! the answer is what the corpus expects, the backend saw exactly the
//! expected requests (none for a refused case), nothing reached it
//! desynchronised, and each canary got its own answer.
//!
//! The same runner compares other proxies (`benches/hostile.sh` runs
//! `compare_with_peers` with their addresses in the environment);
//! docs/hostile.md defines the outcomes and records that comparison.

mod support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const CORPUS: &str = include_str!("hostile/cases.txt");

/// How long a case may take to be answered before it counts as a hang.
const CASE_TIMEOUT: Duration = Duration::from_secs(3);
/// The same for a case whose outcome belongs to the client-side limits.
const OWNED_TIMEOUT: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------ corpus

#[derive(Debug, Clone)]
struct Case {
    id: String,
    desc: String,
    send: Vec<u8>,
    expect: Expect,
    /// (method, target) forms a normalising proxy may forward a refused case as.
    lenient: Vec<(String, String)>,
    owner: Option<String>,
    /// Switchyard's known verdict where it is weaker than the corpus, and why.
    switchyard: Option<(Verdict, String)>,
}

#[derive(Debug, Clone)]
enum Expect {
    Reject { statuses: Vec<u16>, close: bool },
    Forward(Vec<Want>),
}

#[derive(Debug, Clone, Default)]
struct Want {
    /// (method, target) pairs: the first, then `alt` ones.
    forms: Vec<(String, String)>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// The escape notation of the corpus: \r \n \t \0 \\ \xHH, and \{N*text}
/// for `text` (itself escaped) repeated N times.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    fn run(b: &[u8], at: &mut usize, nested: bool) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while *at < b.len() {
            let c = b[*at];
            *at += 1;
            if c == b'}' && nested {
                return Ok(out);
            }
            if c != b'\\' {
                out.push(c);
                continue;
            }
            let e = *b.get(*at).ok_or("a lone backslash at the end")?;
            *at += 1;
            match e {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'0' => out.push(0),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let hex = b.get(*at..*at + 2).ok_or("\\x needs two hex digits")?;
                    let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or(""), 16).map_err(|_| "\\x needs two hex digits")?;
                    out.push(v);
                    *at += 2;
                }
                b'{' => {
                    let star = b[*at..].iter().position(|&x| x == b'*').ok_or("\\{ needs N*")?;
                    let n: usize = std::str::from_utf8(&b[*at..*at + star]).unwrap_or("").parse().map_err(|_| "\\{N*: N is not a number")?;
                    *at += star + 1;
                    let inner = run(b, at, true)?;
                    for _ in 0..n {
                        out.extend_from_slice(&inner);
                    }
                }
                other => return Err(format!("unknown escape \\{}", other as char)),
            }
        }
        if nested {
            return Err("\\{ without its closing }".into());
        }
        Ok(out)
    }
    run(s.as_bytes(), &mut 0, false)
}

fn method_target(v: &str) -> Result<(String, String), String> {
    let (m, t) = v.split_once(' ').ok_or_else(|| format!("expected `METHOD TARGET`, got {v:?}"))?;
    Ok((m.to_string(), t.trim().to_string()))
}

fn parse_corpus(text: &str) -> Result<Vec<Case>, String> {
    let mut cases: Vec<Case> = Vec::new();
    let mut expect: Option<String> = None;
    let mut wants: Vec<Want> = Vec::new();
    let finish = |cases: &mut Vec<Case>, expect: &mut Option<String>, wants: &mut Vec<Want>| -> Result<(), String> {
        let Some(c) = cases.last_mut() else { return Ok(()) };
        let e = expect.take().ok_or_else(|| format!("[{}]: no `expect`", c.id))?;
        c.expect = match e.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["forward"] if !wants.is_empty() => Expect::Forward(std::mem::take(wants)),
            ["forward"] => return Err(format!("[{}]: `expect = forward` without a `request`", c.id)),
            ["reject", rest @ ..] if !rest.is_empty() && wants.is_empty() => {
                let mut statuses = Vec::new();
                let mut close = false;
                for s in rest {
                    match *s {
                        "close" => close = true,
                        s => statuses.push(s.parse::<u16>().ok().filter(|s| (400..600).contains(s)).ok_or_else(|| format!("[{}]: expect: bad status {s:?}", c.id))?),
                    }
                }
                Expect::Reject { statuses, close }
            }
            _ => return Err(format!("[{}]: expect: {e:?} is neither `forward` (with requests) nor `reject STATUS...`", c.id)),
        };
        if c.send.is_empty() {
            return Err(format!("[{}]: nothing to `send`", c.id));
        }
        Ok(())
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e: String| format!("line {}: {e}", n + 1);
        if let Some(id) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            finish(&mut cases, &mut expect, &mut wants).map_err(at)?;
            if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') || cases.iter().any(|c| c.id == id) {
                return Err(at(format!("case id {id:?}: letters, digits and '-', unique")));
            }
            cases.push(Case { id: id.into(), desc: String::new(), send: Vec::new(), expect: Expect::Forward(Vec::new()), lenient: Vec::new(), owner: None, switchyard: None });
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| at(format!("expected `key = value`, got {line:?}")))?;
        let (key, value) = (key.trim(), value.trim());
        let case = cases.last_mut().ok_or_else(|| at("a field before the first [case]".into()))?;
        fn want<'a>(wants: &'a mut [Want], key: &str, n: usize) -> Result<&'a mut Want, String> {
            wants.last_mut().ok_or_else(|| format!("line {}: `{key}` before any `request`", n + 1))
        }
        match key {
            "desc" => {
                if !case.desc.is_empty() {
                    case.desc.push(' ');
                }
                case.desc.push_str(value);
            }
            "send" => case.send.extend(unescape(value).map_err(at)?),
            "expect" => expect = Some(value.to_string()),
            "request" => wants.push(Want { forms: vec![method_target(value).map_err(at)?], ..Default::default() }),
            "alt" => want(&mut wants, key, n)?.forms.push(method_target(value).map_err(at)?),
            "header" => {
                let (name, v) = value.split_once(':').ok_or_else(|| at(format!("header: expected `name: value`, got {value:?}")))?;
                let v = unescape(v.trim()).map_err(at)?;
                want(&mut wants, key, n)?.headers.push((name.trim().to_ascii_lowercase(), v));
            }
            "body" => want(&mut wants, key, n)?.body.extend(unescape(value).map_err(at)?),
            "lenient" => case.lenient.push(method_target(value).map_err(at)?),
            "owner" => case.owner = Some(value.to_string()),
            "switchyard" => {
                let (v, why) = value.split_once(' ').unwrap_or((value, ""));
                let v = match v {
                    "WARN" => Verdict::Warn,
                    "FAIL" => Verdict::Fail,
                    _ => return Err(at(format!("switchyard: {v:?} is neither WARN nor FAIL"))),
                };
                if why.trim().is_empty() {
                    return Err(at("switchyard: the verdict needs its reason".into()));
                }
                case.switchyard = Some((v, why.trim().to_string()));
            }
            _ => return Err(at(format!("unknown key {key:?}"))),
        }
    }
    finish(&mut cases, &mut expect, &mut wants)?;
    Ok(cases)
}

// ---------------------------------------------------------- strict upstream

/// A request as the strict upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    conn: u64,
    method: String,
    target: String,
    /// Names in lower case, values as they came (without surrounding whitespace).
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Event {
    Request(Seen),
    /// Bytes that are no valid, unambiguous HTTP/1.1 request.
    Desync { conn: u64, reason: String, near: String },
    /// A connection ended (either side closed it).
    Closed { conn: u64 },
}

enum Parse {
    Partial,
    /// A request and the bytes it took.
    Done(Seen, usize),
    Bad(String),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The characters of a URI (RFC 3986) other than `#`, and `%` only before two hex digits.
fn valid_target(t: &[u8]) -> bool {
    let uri_char = |b: u8| b.is_ascii_alphanumeric() || b"-._~:/?[]@!$&'()*+,;=%".contains(&b);
    t.iter().enumerate().all(|(i, &b)| {
        uri_char(b) && (b != b'%' || t.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)))
    })
}

fn valid_host(h: &[u8]) -> bool {
    !h.is_empty() && h.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+;=:[]%".contains(&b))
}

/// Lines ended by CRLF, nothing else: a bare LF or CR anywhere is an error.
fn next_line(buf: &[u8], at: usize, max: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    match rest.iter().position(|&b| b == b'\n') {
        None => {
            if let Some(i) = rest.iter().position(|&b| b == b'\r') {
                if i + 1 < rest.len() {
                    return Err("bare CR".into());
                }
            }
            if rest.len() > max {
                return Err("line too long".into());
            }
            Ok(None)
        }
        Some(nl) => {
            if nl == 0 || rest[nl - 1] != b'\r' {
                return Err("bare LF".into());
            }
            let line = &rest[..nl - 1];
            if line.contains(&b'\r') {
                return Err("bare CR".into());
            }
            Ok(Some((line, at + nl + 1)))
        }
    }
}

/// One header line into (lower-case name, value).
fn header_line(line: &[u8]) -> Result<(String, Vec<u8>), String> {
    if line[0] == b' ' || line[0] == b'\t' {
        return Err("obsolete line folding".into());
    }
    let colon = line.iter().position(|&b| b == b':').ok_or("header line without a colon")?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(format!("bad field name {:?}", String::from_utf8_lossy(name)));
    }
    let value = line[colon + 1..].trim_ascii();
    if let Some(b) = value.iter().find(|&&b| !(b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)) {
        return Err(format!("control byte {b:#04x} in a field value"));
    }
    Ok((String::from_utf8_lossy(name).to_ascii_lowercase(), value.to_vec()))
}

/// Parse one request at the start of `buf`, as strictly as RFC 9110/9112
/// allow, refusing whatever two parsers could read differently.
fn strict_parse(buf: &[u8], conn: u64) -> Parse {
    match strict_parse_inner(buf, conn) {
        Ok(Some(done)) => Parse::Done(done.0, done.1),
        Ok(None) => Parse::Partial,
        Err(e) => Parse::Bad(e),
    }
}

fn strict_parse_inner(buf: &[u8], conn: u64) -> Result<Option<(Seen, usize)>, String> {
    const MAX_LINE: usize = 64 * 1024;
    let Some((line, mut at)) = next_line(buf, 0, MAX_LINE)? else { return Ok(None) };
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("request line is not METHOD SP TARGET SP VERSION: {:?}", String::from_utf8_lossy(line)));
    };
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        return Err("bad method".into());
    }
    if target.is_empty() || !valid_target(target) {
        return Err(format!("bad request target {:?}", String::from_utf8_lossy(target)));
    }
    if target == b"*" && method != b"OPTIONS" {
        return Err("asterisk form with a method other than OPTIONS".into());
    }
    if !(target[0] == b'/' || target == b"*" || target.starts_with(b"http://") || target.starts_with(b"https://")) {
        return Err("request target in no known form".into());
    }
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Err(format!("version {:?}", String::from_utf8_lossy(version))),
    };
    let mut headers = Vec::new();
    loop {
        let Some((line, next)) = next_line(buf, at, MAX_LINE)? else { return Ok(None) };
        at = next;
        if line.is_empty() {
            break;
        }
        headers.push(header_line(line)?);
        if headers.len() > 1000 {
            return Err("more than 1000 header fields".into());
        }
    }
    fn all<'a>(headers: &'a [(String, Vec<u8>)], n: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        headers.iter().filter(move |(k, _)| k == n).map(|(_, v)| v.as_slice())
    }
    if all(&headers, "host").count() > 1 {
        return Err("several Host fields".into());
    }
    if let Some(h) = all(&headers, "host").next() {
        if !valid_host(h) {
            return Err(format!("bad Host {:?}", String::from_utf8_lossy(h)));
        }
    }
    let cls: Vec<&[u8]> = all(&headers, "content-length").collect();
    let tes: Vec<&[u8]> = all(&headers, "transfer-encoding").collect();
    if cls.len() > 1 {
        return Err("several Content-Length fields".into());
    }
    if !cls.is_empty() && !tes.is_empty() {
        return Err("Content-Length with Transfer-Encoding".into());
    }
    let mut body = Vec::new();
    if let Some(cl) = cls.first() {
        if cl.is_empty() || cl.len() > 18 || !cl.iter().all(u8::is_ascii_digit) {
            return Err(format!("bad Content-Length {:?}", String::from_utf8_lossy(cl)));
        }
        let n: usize = std::str::from_utf8(cl).unwrap().parse().unwrap();
        if buf.len() < at + n {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + n]);
        at += n;
    } else if !tes.is_empty() {
        if http10 {
            return Err("Transfer-Encoding on HTTP/1.0".into());
        }
        if tes.len() > 1 || !tes[0].eq_ignore_ascii_case(b"chunked") {
            return Err(format!("Transfer-Encoding other than chunked: {:?}", tes.iter().map(|t| String::from_utf8_lossy(t)).collect::<Vec<_>>()));
        }
        loop {
            let Some((line, next)) = next_line(buf, at, 4096)? else { return Ok(None) };
            let (size, ext) = line.split_at(line.iter().position(|&b| b == b';').unwrap_or(line.len()));
            if size.is_empty() || size.len() > 15 || !size.iter().all(u8::is_ascii_hexdigit) {
                return Err(format!("bad chunk size {:?}", String::from_utf8_lossy(size)));
            }
            if !valid_chunk_ext(ext) {
                return Err(format!("bad chunk extension {:?}", String::from_utf8_lossy(ext)));
            }
            let n = usize::from_str_radix(std::str::from_utf8(size).unwrap(), 16).unwrap();
            at = next;
            if n == 0 {
                loop {
                    let Some((line, next)) = next_line(buf, at, MAX_LINE)? else { return Ok(None) };
                    at = next;
                    if line.is_empty() {
                        break;
                    }
                    let (name, _) = header_line(line)?;
                    if matches!(name.as_str(), "content-length" | "transfer-encoding" | "host") {
                        return Err(format!("{name} in the trailers"));
                    }
                }
                break;
            }
            if buf.len() < at + n + 2 {
                return Ok(None);
            }
            if &buf[at + n..at + n + 2] != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            body.extend_from_slice(&buf[at..at + n]);
            at += n + 2;
        }
    }
    let seen = Seen {
        conn,
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        headers,
        body,
    };
    Ok(Some((seen, at)))
}

/// `*( ";" token [ "=" ( token / quoted-string ) ] )`, without whitespace.
fn valid_chunk_ext(mut e: &[u8]) -> bool {
    while !e.is_empty() {
        let Some(rest) = e.strip_prefix(b";") else { return false };
        let name = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return false;
        }
        e = &rest[name..];
        if let Some(v) = e.strip_prefix(b"=") {
            if let Some(q) = v.strip_prefix(b"\"") {
                let mut i = 0;
                loop {
                    match q.get(i) {
                        None => return false,
                        Some(b'"') => break,
                        Some(b'\\') => i += 2,
                        Some(&b) if b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80 => i += 1,
                        Some(_) => return false,
                    }
                }
                e = &q[i + 1..];
            } else {
                let n = v.iter().take_while(|&&b| is_tchar(b)).count();
                if n == 0 {
                    return false;
                }
                e = &v[n..];
            }
        }
    }
    true
}

/// The strict counting upstream: every connection served by a thread of
/// its own, every request recorded and answered `200` with `seen METHOD
/// TARGET` as its body; anything [`strict_parse`] refuses is recorded as a
/// desync, answered `400` and the connection closed.
struct StrictUpstream {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
}

impl StrictUpstream {
    fn start() -> StrictUpstream {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn start_on(l: TcpListener) -> StrictUpstream {
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, st) = (events.clone(), stop.clone());
        std::thread::spawn(move || {
            let conns = Arc::new(AtomicU64::new(0));
            let end = Instant::now() + Duration::from_secs(1800);
            while !st.load(Ordering::SeqCst) && Instant::now() < end {
                match l.accept() {
                    Ok((c, _)) => {
                        let id = conns.fetch_add(1, Ordering::SeqCst) + 1;
                        let (ev, st) = (ev.clone(), st.clone());
                        std::thread::spawn(move || strict_serve(c, id, ev, st, end));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        StrictUpstream { addr, events, stop }
    }

    fn mark(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    fn since(&self, mark: usize) -> Vec<Event> {
        self.events.lock().unwrap()[mark..].to_vec()
    }
}

impl Drop for StrictUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn strict_serve(c: TcpStream, conn: u64, events: Arc<Mutex<Vec<Event>>>, stop: Arc<AtomicBool>, end: Instant) {
    strict_serve_requests(c, conn, &events, stop, end);
    events.lock().unwrap().push(Event::Closed { conn });
}

fn strict_serve_requests(mut c: TcpStream, conn: u64, events: &Mutex<Vec<Event>>, stop: Arc<AtomicBool>, end: Instant) {
    let _ = c.set_nonblocking(false);
    let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut served = 0u64;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        loop {
            match strict_parse(&buf, conn) {
                Parse::Partial => break,
                Parse::Done(seen, n) => {
                    buf.drain(..n);
                    served += 1;
                    let close = seen.headers.iter().any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case(b"close"));
                    let body = format!("seen {} {}", seen.method, seen.target);
                    let mut resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Seen: {conn}-{served}\r\n", body.len());
                    if close {
                        resp.push_str("Connection: close\r\n");
                    }
                    resp.push_str("\r\n");
                    if seen.method != "HEAD" {
                        resp.push_str(&body);
                    }
                    events.lock().unwrap().push(Event::Request(seen));
                    if c.write_all(resp.as_bytes()).is_err() || close {
                        return;
                    }
                }
                Parse::Bad(reason) => {
                    let near = String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned();
                    events.lock().unwrap().push(Event::Desync { conn, reason, near });
                    let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                }
            }
        }
        match c.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
    }
}

// ------------------------------------------------------------------ client

#[derive(Debug, Clone)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// What a client saw on one connection.
#[derive(Debug, Default)]
struct Exchange {
    /// Final responses, in order.
    responses: Vec<Response>,
    /// Interim (1xx) statuses.
    interim: Vec<u16>,
    /// The proxy closed (or reset) the connection.
    closed: bool,
    /// Neither enough responses nor a close before the deadline.
    timed_out: bool,
    /// Bytes that were no HTTP/1 response.
    garbage: Option<String>,
}

/// Parse one response at the start of `buf`. None: incomplete (`eof`: no
/// more bytes will come, so a close-delimited body ends here).
fn parse_response(buf: &[u8], eof: bool) -> Option<Result<(u16, Vec<u8>, usize), String>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = match status_line.strip_prefix("HTTP/1.").and_then(|s| s.get(2..5)).and_then(|s| s.parse::<u16>().ok()) {
        Some(s) => s,
        None => return Some(Err(status_line.chars().take(80).collect())),
    };
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = v.trim().parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.trim().eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let at = head_end + 4;
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Some(Ok((status, Vec::new(), at)));
    }
    if chunked {
        let mut body = Vec::new();
        let mut i = at;
        loop {
            let nl = buf[i..].windows(2).position(|w| w == b"\r\n")?;
            let size = String::from_utf8_lossy(&buf[i..i + nl]);
            let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).ok()?;
            i += nl + 2;
            if n == 0 {
                let end = buf[i..].windows(2).position(|w| w == b"\r\n")?;
                return Some(Ok((status, body, i + end + 2)));
            }
            if buf.len() < i + n + 2 {
                return None;
            }
            body.extend_from_slice(&buf[i..i + n]);
            i += n + 2;
        }
    }
    match length {
        Some(n) if buf.len() >= at + n => Some(Ok((status, buf[at..at + n].to_vec(), at + n))),
        Some(_) => None,
        None if eof => Some(Ok((status, buf[at..].to_vec(), buf.len()))),
        None => None,
    }
}

/// Where a proxy listens: cleartext, or TLS verified by this client config
/// (for the name `h`).
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    fn plain(addr: SocketAddr) -> Target {
        Target { addr, tls: None }
    }
}

/// A connection to a [`Target`], its handshake done.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn open(t: &Target) -> Option<Conn> {
        let s = TcpStream::connect_timeout(&t.addr, Duration::from_secs(2)).ok()?;
        let Some(config) = &t.tls else { return Some(Conn::Plain(s)) };
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
        let name = rustls::pki_types::ServerName::try_from("h").ok()?;
        let mut tls = rustls::StreamOwned::new(rustls::ClientConnection::new(config.clone(), name).ok()?, s);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).ok()?;
        }
        Some(Conn::Tls(Box::new(tls)))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// Send `bytes` on a new connection and read until `want` final responses,
/// a close, or `timeout`.
fn exchange(t: &Target, bytes: &[u8], want: usize, timeout: Duration) -> Exchange {
    let mut x = Exchange::default();
    let Some(mut s) = Conn::open(t) else {
        x.closed = true;
        x.garbage = Some("connect failed".into());
        return x;
    };
    // A proxy may answer and close before it has read everything.
    let _ = s.write_all(bytes);
    let _ = s.flush();
    let end = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let _ = s.tcp().set_read_timeout(Some(Duration::from_millis(20)));
    loop {
        let eof = match s.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                false
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => false,
            Err(_) => true,
        };
        while !buf.is_empty() {
            match parse_response(&buf, eof) {
                None => break,
                Some(Err(line)) => {
                    x.garbage = Some(line);
                    buf.clear();
                }
                Some(Ok((status, body, n))) => {
                    buf.drain(..n);
                    if status < 200 {
                        x.interim.push(status);
                    } else {
                        x.responses.push(Response { status, body });
                    }
                }
            }
        }
        if eof {
            if !buf.is_empty() && x.garbage.is_none() {
                x.garbage = Some(String::from_utf8_lossy(&buf[..buf.len().min(80)]).into_owned());
            }
            x.closed = true;
            return x;
        }
        if x.responses.len() >= want {
            return x;
        }
        if Instant::now() >= end {
            x.timed_out = true;
            return x;
        }
    }
}

// -------------------------------------------------------------- evaluation

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Pass,
    /// The outcome belongs to another part (`owner`) and did not happen here.
    Skip,
    Warn,
    Fail,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Skip => "SKIP",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

#[derive(Debug, Clone)]
struct Outcome {
    verdict: Verdict,
    /// What happened, in a few words (`400`, `forwarded GET /`, ...).
    what: String,
    /// Why it is not a pass.
    why: String,
    /// Whether a canary went over an upstream connection the case's
    /// requests used (None: the case left none open).
    canary_reused: Option<bool>,
}

/// Fields not compared: framing, hop-by-hop, and what a proxy adds.
const NOT_COMPARED: &[&str] = &[
    "content-length", "transfer-encoding", "connection", "keep-alive", "te", "upgrade", "expect", "http2-settings",
    "proxy-connection", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "forwarded",
    "x-request-id", "x-real-ip", "via",
];

fn show(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// `METHOD TARGET`, a long target cut short.
fn describe(r: &Seen) -> String {
    match r.target.char_indices().nth(40) {
        Some((i, _)) => format!("{} {}... ({} bytes)", r.method, &r.target[..i], r.target.len()),
        None => format!("{} {}", r.method, r.target),
    }
}

/// Why `seen` is not `want` (None: it is).
fn mismatch(seen: &Seen, want: &Want) -> Option<String> {
    if !want.forms.iter().any(|(m, t)| *m == seen.method && *t == seen.target) {
        return Some(format!("backend saw {} instead of {:?}", describe(seen), want.forms));
    }
    let mut got: Vec<(String, Vec<u8>)> = seen.headers.iter().filter(|(k, _)| !NOT_COMPARED.contains(&k.as_str())).cloned().collect();
    let mut wanted = want.headers.clone();
    got.sort();
    wanted.sort();
    if got != wanted {
        let fmt = |h: &[(String, Vec<u8>)]| h.iter().map(|(k, v)| format!("{k}: {}", show(v))).collect::<Vec<_>>().join(", ");
        return Some(format!("{}: headers [{}], expected [{}]", describe(seen), fmt(&got), fmt(&wanted)));
    }
    if seen.body != want.body {
        return Some(format!("{}: body {:?}, expected {:?}", describe(seen), show(&seen.body), show(&want.body)));
    }
    None
}

/// Run one case against the proxy at `addr` (whose backend is `up`);
/// `n` numbers the canary.
fn run_case(case: &Case, addr: &Target, up: &StrictUpstream, n: usize) -> Outcome {
    let mark = up.mark();
    let want = match &case.expect {
        Expect::Forward(w) => w.len(),
        Expect::Reject { .. } => 1,
    };
    let owned = case.owner.is_some();
    let x = exchange(addr, &case.send, want, if owned { OWNED_TIMEOUT } else { CASE_TIMEOUT });
    // Two canaries: a GET the express path takes, and a POST that goes
    // through HttpProxy (each path has its own upstream pool).
    let canary_targets = [format!("/canary-{n}"), format!("/canary-{n}-post")];
    let canaries = [
        exchange(addr, format!("GET {} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", canary_targets[0]).as_bytes(), 1, CASE_TIMEOUT),
        exchange(addr, format!("POST {} HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", canary_targets[1]).as_bytes(), 1, CASE_TIMEOUT),
    ];
    let events = up.since(mark);
    let mut seen: Vec<&Seen> = Vec::new();
    let mut desyncs = Vec::new();
    let mut canary_seen = [0, 0];
    let mut closed = Vec::new();
    let mut canary_reused = None;
    for e in &events {
        match e {
            Event::Request(r) if canary_targets.contains(&r.target) => {
                canary_seen[(r.target != canary_targets[0]) as usize] += 1;
                let open: Vec<u64> = seen.iter().map(|s| s.conn).filter(|c| !closed.contains(c)).collect();
                if !open.is_empty() {
                    canary_reused = Some(canary_reused.unwrap_or(false) || open.contains(&r.conn));
                }
            }
            Event::Request(r) => seen.push(r),
            Event::Desync { conn, reason, near } => desyncs.push(format!("{reason} (upstream connection {conn}) near {near:?}")),
            Event::Closed { conn } => closed.push(*conn),
        }
    }
    let statuses: Vec<String> = x.responses.iter().map(|r| r.status.to_string()).collect();
    let answered = if x.responses.is_empty() {
        match (&x.garbage, x.closed) {
            (Some(g), _) => format!("non-HTTP answer {g:?}"),
            (None, true) => "closed".to_string(),
            (None, false) => "no answer".to_string(),
        }
    } else {
        statuses.join("+")
    };
    let forwarded = seen.iter().map(|r| describe(r)).collect::<Vec<_>>().join(", ");
    let outcome = |verdict: Verdict, what: String, why: String| Outcome { verdict, what, why, canary_reused };
    let fail = |what: String, why: String| outcome(Verdict::Fail, what, why);

    // The backend and the canary first: these fail whatever the case expects.
    if !desyncs.is_empty() {
        return fail(format!("{answered}; desync"), format!("desynchronised at the backend: {}", desyncs.join("; ")));
    }
    for (i, (canary, method)) in canaries.iter().zip(["GET", "POST"]).enumerate() {
        let ok = canary.responses.len() == 1
            && canary.responses[0].status == 200
            && canary.responses[0].body == format!("seen {method} {}", canary_targets[i]).as_bytes()
            && canary_seen[i] == 1;
        if !ok {
            return fail(
                answered,
                format!(
                    "canary {method}: {:?}, backend saw it {} times (forwarded: {forwarded})",
                    canary.responses.first().map(|r| (r.status, show(&r.body))),
                    canary_seen[i]
                ),
            );
        }
    }
    match &case.expect {
        Expect::Reject { statuses, close } => {
            if seen.is_empty() {
                let status = x.responses.first().map(|r| r.status);
                return match status {
                    Some(s) if statuses.contains(&s) => outcome(Verdict::Pass, answered, String::new()),
                    Some(s) => outcome(Verdict::Warn, answered, format!("refused with {s}, expected {statuses:?}")),
                    None if *close && x.closed && x.garbage.is_none() => outcome(Verdict::Pass, answered, String::new()),
                    None if x.timed_out && owned => outcome(
                        Verdict::Skip,
                        answered,
                        format!("no answer within {OWNED_TIMEOUT:?}: left to the client-side {} (a header timeout)", case.owner.as_deref().unwrap_or("")),
                    ),
                    None if x.timed_out && !x.interim.is_empty() => outcome(Verdict::Warn, format!("{:?} then waits", x.interim), "answered 100 Continue and waits for the body".into()),
                    None if x.timed_out => fail(answered, format!("hang: no answer within {CASE_TIMEOUT:?}")),
                    None => outcome(Verdict::Warn, answered.clone(), format!("{answered} without a status, expected {statuses:?}")),
                };
            }
            // Forwarded a case the corpus refuses: a warning if it went as
            // one well-formed normalised request, else a failure.
            let normalised = seen.len() == 1 && case.lenient.iter().any(|(m, t)| *m == seen[0].method && *t == seen[0].target);
            let what = format!("{answered}; forwarded {forwarded}");
            if normalised {
                outcome(Verdict::Warn, what, "forwarded (normalised) what the corpus refuses".into())
            } else {
                fail(what, format!("reached the backend: {forwarded}"))
            }
        }
        Expect::Forward(wants) => {
            if seen.is_empty() && x.responses.first().is_some_and(|r| (400..500).contains(&r.status)) {
                return outcome(Verdict::Warn, answered, "refused a request the corpus forwards".into());
            }
            if seen.len() != wants.len() {
                let why = if x.timed_out && seen.len() < wants.len() { "hang: " } else { "" };
                return fail(format!("{answered}; forwarded {forwarded}"), format!("{why}backend saw {} requests, expected {}", seen.len(), wants.len()));
            }
            for (s, w) in seen.iter().zip(wants) {
                if let Some(why) = mismatch(s, w) {
                    return fail(format!("{answered}; forwarded {forwarded}"), format!("altered: {why}"));
                }
            }
            let ok = x.responses.len() == wants.len()
                && x.responses.iter().zip(seen.iter()).all(|(r, s)| r.status == 200 && (s.method == "HEAD" || r.body == format!("seen {} {}", s.method, s.target).as_bytes()));
            if !ok {
                return fail(answered, format!("the client got {:?}, not each request's own answer", x.responses.iter().map(|r| (r.status, show(&r.body))).collect::<Vec<_>>()));
            }
            outcome(Verdict::Pass, format!("forwarded {forwarded}"), String::new())
        }
    }
}

/// Run every case against each (name, address), printing a table; returns
/// outcomes per proxy, in corpus order.
fn run_all(cases: &[Case], proxies: &[(String, Target)], up: &StrictUpstream) -> Vec<Vec<Outcome>> {
    let mut n = 0;
    proxies
        .iter()
        .map(|(_, addr)| {
            cases
                .iter()
                .map(|c| {
                    n += 1;
                    run_case(c, addr, up, n)
                })
                .collect()
        })
        .collect()
}

/// The comparison table in markdown: one row per case, one column per
/// proxy, then the totals.
fn table(cases: &[Case], names: &[String], outcomes: &[Vec<Outcome>]) -> String {
    let mut t = format!("| case | {} |\n|---|{}\n", names.join(" | "), "---|".repeat(names.len()));
    for (i, c) in cases.iter().enumerate() {
        let cells: Vec<String> = outcomes
            .iter()
            .map(|o| {
                let o = &o[i];
                format!("{} {}", o.verdict.as_str(), o.what.replace('|', "\\|"))
            })
            .collect();
        t.push_str(&format!("| `{}` | {} |\n", c.id, cells.join(" | ")));
    }
    let totals: Vec<String> = outcomes
        .iter()
        .map(|o| {
            let count = |v: Verdict| o.iter().filter(|x| x.verdict == v).count();
            let mut s = format!("{} pass, {} warn, {} fail", count(Verdict::Pass), count(Verdict::Warn), count(Verdict::Fail));
            if count(Verdict::Skip) > 0 {
                s.push_str(&format!(", {} skip", count(Verdict::Skip)));
            }
            s
        })
        .collect();
    t.push_str(&format!("| **total** | {} |\n", totals.join(" | ")));
    t
}

/// Notes for every outcome that is not a pass.
fn notes(cases: &[Case], names: &[String], outcomes: &[Vec<Outcome>]) -> String {
    let mut s = String::new();
    for (p, name) in names.iter().enumerate() {
        for (i, c) in cases.iter().enumerate() {
            let o = &outcomes[p][i];
            if o.verdict != Verdict::Pass {
                s.push_str(&format!("- {name} `{}`: {} — {}\n", c.id, o.verdict.as_str(), o.why));
            }
        }
    }
    s
}

fn corpus() -> Vec<Case> {
    parse_corpus(CORPUS).unwrap_or_else(|e| panic!("tests/hostile/cases.txt: {e}"))
}

/// A Switchyard config in front of `up`: an HTTP/1-only listener (as the
/// peers' are: with h2c, the HTTP/2 preface starts a valid HTTP/2
/// connection), a route naming host `h` (so the absolute form for it is
/// served) and an any-host route, default limits.
fn switchyard_body(up: SocketAddr) -> String {
    // The first line belongs to the `[[listeners]]` table the builder writes.
    format!(
        "h2c = false\n\n[[routes]]\nname = \"h\"\nhosts = [\"h\"]\ncluster = \"web\"\n\n[[routes]]\nname = \"any\"\ncluster = \"web\"\n\n{}",
        static_cluster("web", &[up], "")
    )
}

// ------------------------------------------------------------------- tests

#[test]
fn the_corpus_parses_and_is_large_enough() {
    let cases = corpus();
    assert!(cases.len() >= 64, "{} cases", cases.len());
    let by_id: HashMap<&str, &Case> = cases.iter().map(|c| (c.id.as_str(), c)).collect();
    let cl_te = by_id["cl-te"];
    assert!(cl_te.send.starts_with(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"));
    assert!(matches!(&cl_te.expect, Expect::Reject { statuses, close: false } if statuses == &[400]));
    assert_eq!(by_id["nul-in-target"].send[6], 0);
    assert_eq!(by_id["uri-too-long"].send.len(), "GET / HTTP/1.1\r\nHost: h\r\n\r\n".len() + 9000);
    let Expect::Forward(w) = &by_id["chunked-then-pipelined"].expect else { panic!() };
    assert_eq!((w.len(), w[0].body.as_slice(), w[1].forms[0].1.as_str()), (2, &b"hello"[..], "/second"));
    // Errors name the line and the field.
    assert_eq!(unescape(r"a\{3*b\r}\x41").unwrap(), b"ab\rb\rb\rA");
    for (bad, says) in [
        ("[a]\nsend = x\n", "no `expect`"),
        ("[a]\nsend = x\nexpect = reject 200\n", "bad status"),
        ("[a]\nsend = x\nexpect = forward\n", "without a `request`"),
        ("[a]\nsend = \\q\nexpect = reject 400\n", "line 2: unknown escape"),
        ("[a]\nbody = x\n", "line 2: `body` before any `request`"),
        ("[a]\nsend = x\nexpect = reject 400\n[a]\n", "unique"),
        ("[a]\nswitchyard = WARN\n", "needs its reason"),
    ] {
        let e = parse_corpus(bad).unwrap_err();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
}

/// The strict upstream itself, spoken to directly: it records valid
/// requests exactly and flags the ambiguous ones.
#[test]
fn the_strict_upstream_flags_what_is_ambiguous() {
    let ok = |b: &[u8]| match strict_parse(b, 1) {
        Parse::Done(s, n) => (s, n),
        Parse::Partial => panic!("partial: {}", show(b)),
        Parse::Bad(e) => panic!("{e}: {}", show(b)),
    };
    let req = b"POST /a?b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;x=\"y z\"\r\nhello\r\n0\r\nT: 1\r\n\r\nGET";
    let (s, n) = ok(req);
    assert_eq!((s.method.as_str(), s.target.as_str(), s.body.as_slice(), n), ("POST", "/a?b", &b"hello"[..], req.len() - 3));
    assert_eq!(ok(b"GET / HTTP/1.0\r\n\r\n").0.headers.len(), 0);
    assert!(matches!(strict_parse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhel", 1), Parse::Partial));
    for bad in [
        &b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nx",
        b"GET / HTTP/1.1\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX : a\r\n\r\n",
        b"GET /a\0 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a#b HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
        b"POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
    ] {
        assert!(matches!(strict_parse(bad, 1), Parse::Bad(_)), "not flagged: {}", show(bad));
    }
    // Over a socket: answered and recorded; a desync is recorded and closes.
    let up = StrictUpstream::start();
    let x = exchange(&Target::plain(up.addr), b"GET /x HTTP/1.1\r\nHost: h\r\n\r\nGET /y HTTP/1.1\r\nHost: h\r\n\r\n", 2, Duration::from_secs(3));
    assert_eq!(x.responses.iter().map(|r| r.body.clone()).collect::<Vec<_>>(), [b"seen GET /x".to_vec(), b"seen GET /y".to_vec()]);
    let x = exchange(&Target::plain(up.addr), b"GET / HTTP/1.1\r\nHost: h\r\nX : a\r\n\r\n", 1, Duration::from_secs(3));
    assert_eq!(x.responses[0].status, 400);
    assert!(wait_until(Duration::from_secs(3), || up.since(0).iter().filter(|e| matches!(e, Event::Closed { .. })).count() == 2), "{:?}", up.since(0));
    let ev: Vec<Event> = up.since(0).into_iter().filter(|e| !matches!(e, Event::Closed { .. })).collect();
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert!(matches!(&ev[2], Event::Desync { conn: 2, reason, .. } if reason.starts_with("bad field name")), "{ev:?}");
}

/// A Switchyard listener terminating TLS for `h` with a fresh self-signed
/// certificate, and a client config that trusts it: the same config as
/// [`switchyard_body`] otherwise.
fn switchyard_tls(up: SocketAddr) -> (Proxy, Target) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["h".to_string()]).unwrap().self_signed(&key).unwrap();
    let p = Proxy::builder(&format!("tls = {{ cert = \"h.pem\", key = \"h.key\" }}\n{}", switchyard_body(up)))
        .file("h.pem", &cert.pem())
        .file("h.key", &key.serialize_pem())
        .start();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let target = Target { addr: p.addr, tls: Some(Arc::new(config)) };
    (p, target)
}

/// Every case through both request paths, and over TLS (HTTP/1.1, where
/// Pingora reads every byte itself): each passes (or is left to the
/// client-side limits, as its `owner` says, or gets the verdict its
/// `switchyard` line documents), the same on all three.
#[test]
fn hostile_requests_through_both_paths_and_tls() {
    let cases = corpus();
    let up = StrictUpstream::start();
    let three = switchyard_three(up.addr);
    let names: Vec<String> = three.iter().map(|(name, _, _)| name.clone()).collect();
    let outcomes = run_all(&cases, &three.iter().map(|(name, _, t)| (name.clone(), t.clone())).collect::<Vec<_>>(), &up);
    println!("{}", table(&cases, &names, &outcomes));
    let notes = notes(&cases, &names, &outcomes);
    println!("{notes}");
    let mut wrong = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        for (p, name) in names.iter().enumerate() {
            let o = &outcomes[p][i];
            let allowed = match &c.switchyard {
                Some((v, _)) => o.verdict == *v,
                None => o.verdict == Verdict::Pass || (o.verdict == Verdict::Skip && c.owner.is_some()),
            };
            if !allowed {
                wrong.push(format!("{name} `{}`: {} {} — {}", c.id, o.verdict.as_str(), o.what, o.why));
            }
        }
        for (p, name) in names.iter().enumerate() {
            // With one worker thread, a connection the case left open is
            // the one a canary goes out on: it was not poisoned.
            if outcomes[p][i].canary_reused == Some(false) {
                wrong.push(format!("{name} `{}`: no canary went over the upstream connection the case left open", c.id));
            }
        }
        for p in 1..names.len() {
            if outcomes[0][i].verdict != outcomes[p][i].verdict {
                wrong.push(format!("`{}`: {} on {}, {} on {}", c.id, outcomes[0][i].verdict.as_str(), names[0], outcomes[p][i].verdict.as_str(), names[p]));
            }
        }
    }
    assert!(wrong.is_empty(), "{} outcomes wrong:\n{}", wrong.len(), wrong.join("\n"));
    // Each kind of refusal is counted, on both paths.
    for (name, p, _) in &three {
        for reason in ["bad_request_line", "bad_framing", "bad_host"] {
            let n = rejected(p, reason);
            assert!(n >= 3.0, "{name}: switchyard_requests_rejected_total{{reason={reason}}} is {n}");
        }
    }
    // The pooled-connection check above is not vacuous: most forwarded cases leave one open.
    let reused = outcomes.iter().flatten().filter(|o| o.canary_reused == Some(true)).count();
    let forwarded = cases.iter().filter(|c| matches!(c.expect, Expect::Forward(_))).count();
    assert!(reused >= forwarded, "a canary reused the case's upstream connection {reused} times, for {forwarded} forwarded cases on three paths");
}

/// Switchyard's three ways in (both request paths, and TLS) in front of
/// `up`, by name.
fn switchyard_three(up: SocketAddr) -> Vec<(String, Proxy, Target)> {
    let mut all: Vec<(String, Proxy, Target)> = PATHS
        .iter()
        .map(|(path, server)| {
            let p = Proxy::builder(&switchyard_body(up)).server(server).start();
            let t = Target::plain(p.addr);
            (path.to_string(), p, t)
        })
        .collect();
    let (p, t) = switchyard_tls(up);
    all.push(("TLS".to_string(), p, t));
    all
}

fn rejected(p: &Proxy, reason: &str) -> f64 {
    sample(&parse_metrics(&p.metrics()), "switchyard_requests_rejected_total", &[("reason", reason)]).unwrap_or(0.0)
}

/// A malformed request pipelined behind a good one that Pingora reads
/// itself (a chunked body, read after the bytes read ahead; a request
/// asking for an upgrade, which the backend declines): the first is
/// answered, then the second gets its 400 and never reaches the backend,
/// and the connection closes.
#[test]
fn a_malformed_request_behind_a_chunked_body_or_a_declined_upgrade_is_never_forwarded() {
    let up = StrictUpstream::start();
    let behind: [(&[u8], &str); 2] = [
        (b"POST /first HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "POST /first hello"),
        (b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", "GET /ws "),
    ];
    for (name, p, t) in switchyard_three(up.addr) {
        for (i, (first, first_seen)) in behind.iter().enumerate() {
            let mark = up.mark();
            let x = exchange(
                &t,
                &[*first, b"GET /a\0b HTTP/1.1\r\nHost: h\r\n\r\n"].concat(),
                // More than come: read to the close.
                3,
                CASE_TIMEOUT,
            );
            let statuses: Vec<u16> = x.responses.iter().map(|r| r.status).collect();
            assert_eq!(statuses, [200, 400], "{name} {first_seen:?}: the first answered, then the second refused");
            assert!(x.closed && !x.timed_out, "{name} {first_seen:?}: the connection closes after the refusal");
            let seen: Vec<String> = up
                .since(mark)
                .iter()
                .filter_map(|e| match e {
                    Event::Request(r) => Some(format!("{} {} {}", r.method, r.target, show(&r.body))),
                    Event::Desync { reason, .. } => Some(format!("desync: {reason}")),
                    Event::Closed { .. } => None,
                })
                .collect();
            assert_eq!(seen, [*first_seen], "{name}: the backend saw only the first request");
            assert_eq!(rejected(&p, "bad_request_line"), (i + 1) as f64, "{name} {first_seen:?}");
        }
    }
}

/// A chunk that breaks the framing after the body has begun to go to the
/// backend: the client gets a 400, the backend never gets the bad chunk
/// nor a complete request, and its connection is closed.
#[test]
fn a_bad_chunk_mid_body_is_refused_and_the_upstream_request_cut() {
    // A backend that records what it receives and answers nothing.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got: Arc<Mutex<Vec<(Vec<u8>, bool)>>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming().take(16) {
            let Ok(mut c) = c else { return };
            let g = g.clone();
            std::thread::spawn(move || {
                let i = {
                    let mut v = g.lock().unwrap();
                    v.push((Vec::new(), false));
                    v.len() - 1
                };
                let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
                let mut buf = [0u8; 4096];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => g.lock().unwrap()[i].0.extend_from_slice(&buf[..n]),
                    }
                }
                g.lock().unwrap()[i].1 = true;
            });
        }
    });
    for (name, p, t) in switchyard_three(addr) {
        let before = got.lock().unwrap().len();
        let mut c = Conn::open(&t).unwrap_or_else(|| panic!("{name}: connect"));
        c.write_all(b"POST /mid HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").unwrap();
        c.flush().unwrap();
        let forwarded = |needle: &[u8]| got.lock().unwrap()[before..].iter().any(|(b, _)| b.windows(needle.len()).any(|w| w == needle));
        assert!(wait_until(Duration::from_secs(5), || forwarded(b"hello")), "{name}: the first chunk reached the backend");
        c.write_all(b"5 \r\nworld\r\n0\r\n\r\n").unwrap();
        c.flush().unwrap();
        let _ = c.tcp().set_read_timeout(Some(Duration::from_secs(5)));
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        assert!(answer.starts_with(b"HTTP/1.1 400 "), "{name}: {}", show(&answer));
        assert!(
            wait_until(Duration::from_secs(5), || got.lock().unwrap()[before..].iter().all(|(_, closed)| *closed)),
            "{name}: the upstream connection is closed"
        );
        assert!(!forwarded(b"world"), "{name}: the bad chunk never reached the backend");
        assert!(!forwarded(b"0\r\n\r\n"), "{name}: the backend never got the body's end");
        assert_eq!(rejected(&p, "bad_framing"), 1.0, "{name}");
    }
}

/// The comparison `benches/hostile.sh` runs (not part of the suite): the
/// corpus against Switchyard's two paths, its TLS listener, and the proxies named in
/// `HOSTILE_PEERS` (`name=host:port,...`), all in front of one strict
/// upstream listening on `HOSTILE_UPSTREAM`; the table goes to stdout and
/// to `HOSTILE_TABLE` if set.
#[test]
#[ignore = "run by benches/hostile.sh"]
fn compare_with_peers() {
    let upstream = std::env::var("HOSTILE_UPSTREAM").expect("HOSTILE_UPSTREAM=host:port");
    let up = StrictUpstream::start_on(TcpListener::bind(&upstream).unwrap_or_else(|e| panic!("HOSTILE_UPSTREAM {upstream}: {e}")));
    let mut proxies: Vec<(String, Target)> = Vec::new();
    let mut running = Vec::new();
    for (path, server) in PATHS {
        let p = Proxy::builder(&switchyard_body(up.addr)).server(server).start();
        proxies.push((format!("Switchyard {path}"), Target::plain(p.addr)));
        running.push(p);
    }
    let (p, target) = switchyard_tls(up.addr);
    proxies.push(("Switchyard TLS".to_string(), target));
    running.push(p);
    for peer in std::env::var("HOSTILE_PEERS").unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
        let (name, addr) = peer.split_once('=').unwrap_or_else(|| panic!("HOSTILE_PEERS: {peer:?} is not name=host:port"));
        let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("HOSTILE_PEERS: {peer:?}: {e}"));
        proxies.push((name.to_string(), Target::plain(addr)));
    }
    let cases = corpus();
    let outcomes = run_all(&cases, &proxies, &up);
    let names: Vec<String> = proxies.iter().map(|(n, _)| n.clone()).collect();
    let out = format!("{}\n{}", table(&cases, &names, &outcomes), notes(&cases, &names, &outcomes));
    println!("{out}");
    if let Ok(path) = std::env::var("HOSTILE_TABLE") {
        std::fs::write(&path, &out).unwrap_or_else(|e| panic!("HOSTILE_TABLE {path}: {e}"));
    }
}
