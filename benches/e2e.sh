#!/usr/bin/env bash
# benches/e2e.sh: end-to-end benchmark of Switchyard against nginx and HAProxy.
#
#   benches/e2e.sh            # full run: 3 rounds x 10 s per proxy and scenario (~6 min)
#   benches/e2e.sh --smoke    # ~45 s (plus any build): 1 round x 2 s, 200 idle connections
#
# Options:
#   --smoke          1 round, 2 s runs, 1 s warm-ups, 200 connections in the scale test
#   --rounds N       interleaved rounds per scenario (default 3)
#   --duration S     seconds per measured wrk run (default 10)
#   --warmup S       seconds of warm-up per proxy before the rounds (default 3)
#   --conns N        idle keep-alive connections in the scale scenario (default 10000)
#   --head-bytes N   send browser-like request heads of about N bytes (User-Agent,
#                    Accept, Accept-Language, a Cookie padded to size; default 0:
#                    wrk's minimal head)
#   --only LIST      scenarios to run, comma separated (default: all):
#                    pinned, unpinned, features, swaps, conns, wake, tls
#                    (swaps = swaps-file + swaps-consul; either may be named alone)
#   --proxies LIST   proxies in the pinned/unpinned/conns scenarios
#                    (default: switchyard,nginx,haproxy; also switchyard-general:
#                    Switchyard with the express path off, for an A/B in one run)
#   --no-build       do not run cargo; use target/release/switchyard as it is,
#                    and the newest built Consul double (target/release/deps/)
#   --keep           keep the work directory (configs, logs, raw wrk output)
#   SWITCHYARD_BIN=path  benchmark that binary instead of building one
#   CONSUL_DOUBLE_BIN=path  use that Consul double (the `consul_double` bench
#                    binary) instead of building one with
#                    `cargo bench --bench consul_double --no-run`
#
# What it does, in one run:
#   * installs missing Debian packages (nginx-light, haproxy, wrk, curl, python3,
#     util-linux, procps; cmake for the build) with apt-get;
#   * builds the release binary (cargo decides whether anything changed) and
#     copies it into the work directory, so a concurrent rebuild cannot swap it
#     out in the middle of a run;
#   * starts two upstreams, each its own nginx instance with one worker that
#     answers `200 ok\n` (3 bytes), shared by every proxy;
#   * starts the proxies with equivalent configs: round robin over the two
#     upstreams, upstream keep-alive, no request cap per connection (client or
#     upstream side), no access log, one worker/thread (two in "unpinned");
#   * drives each with `wrk -t1 -c50`, interleaving the proxies (A B C A B C ...)
#     after a warm-up of each, and records per run: req/s, p50/p99/p99.9 latency,
#     the proxy's CPU microseconds per request (utime+stime of all its processes
#     from /proc/PID/stat, before and after the run, divided by the requests) and
#     its RSS (VmRSS summed over its processes);
#   * prints a markdown table of medians per scenario and the Switchyard ratios.
#
# Scenarios:
#   pinned    one worker each; the proxy on core 0 (taskset -c 0), wrk and the
#             upstreams on core 1. CPU us/request is the number to compare:
#             req/s on a shared machine is noisy.
#   unpinned  two workers/threads each, nothing pinned.
#   features  Switchyard lean (as above) vs "full": JSON access log to a file.
#             Forwarded headers and request IDs are always on in both.
#   swaps     lean Switchyard on a `file` catalog cluster, with and without a
#             background loop that rewrites the catalog 10 times a second
#             (alternating two valid contents, atomic rename). Non-2xx responses
#             must be 0; the routing generation from /status proves the swaps.
#             Then the same with Consul as the source (swaps-consul): the Consul
#             double (benches/consul_double.rs) runs as its own process, and
#             Switchyard watches service `up` there (wait 2s, min_interval 50ms);
#             "no-swaps" = the double idle, "swaps" = it flips the check of the
#             second upstream between critical and passing 10 times a second
#             (the first always passes, so the pool is never empty).
#   conns     RSS of each proxy holding N idle keep-alive client connections
#             (a small Python client opens them, one request each, and holds them).
#             Read 1 s and 5 s after the last one opened (Switchyard parks
#             connections idle for park_idle_after, 1 s).
#   wake      CPU per request when every request comes after a pause longer
#             than park_idle_after: 2,000 keep-alive connections (200 in smoke)
#             each send one request every 1.5 s, so each Switchyard request
#             wakes a parked connection. Switchyard also runs with parking off
#             (switchyard-noparking): the difference is what parking costs.
#   tls       TLS termination, pinned as above, the same ECDSA P-256 certificate
#             in all three (nginx: shared session cache and tickets; HAProxy:
#             its defaults, cache and tickets; Switchyard: rustls with its
#             session cache): "tls-keepalive" wrk over HTTPS with keep-alive
#             (CPU µs per request); "tls-full" full handshakes, one new
#             connection per handshake and no request, with `openssl s_time
#             -new` (TLS 1.3; CPU µs per handshake); "tls-resumed" resumed
#             handshakes with `s_time -reuse` (TLS 1.2 session IDs: s_time reads
#             nothing, so it never receives a TLS 1.3 ticket); "tls-h2" HTTP/2
#             over TLS with h2load (10 connections x 10 streams; CPU µs per
#             request). The req/s column is handshakes/s in tls-full and
#             tls-resumed.
#
# Exit status: 0 when every proxy served every run (all 2xx, no connect errors,
# still alive afterwards, every swap run swapped, every connection held).
# Speed never fails the run. Everything listens on 127.0.0.1 only.
#
# Only the processes this script starts are stopped (by PID, from the EXIT trap).
# Requires: Debian/Ubuntu (apt-get), root or sudo for missing packages, Rust
# toolchain unless SWITCHYARD_BIN is given.

set -euo pipefail

# ---------------------------------------------------------------- options ---

SMOKE=0
ROUNDS=3
DURATION=10
WARMUP=3
CONNS=10000
WAKE_CONNS=2000
WAKE_ROUNDS=6
HEAD_BYTES=0
ONLY="pinned,unpinned,features,swaps,conns,wake,tls"
PROXIES="switchyard,nginx,haproxy"
BUILD=1
KEEP=0
ROUNDS_SET=0 DURATION_SET=0 WARMUP_SET=0 CONNS_SET=0

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }

while (($#)); do
    case $1 in
        --smoke) SMOKE=1 ;;
        --rounds) ROUNDS=${2:?--rounds needs a value}; ROUNDS_SET=1; shift ;;
        --duration) DURATION=${2:?--duration needs a value}; DURATION_SET=1; shift ;;
        --warmup) WARMUP=${2:?--warmup needs a value}; WARMUP_SET=1; shift ;;
        --conns) CONNS=${2:?--conns needs a value}; CONNS_SET=1; shift ;;
        --head-bytes) HEAD_BYTES=${2:?--head-bytes needs a value}; shift ;;
        --only) ONLY=${2:?--only needs a value}; shift ;;
        --proxies) PROXIES=${2:?--proxies needs a value}; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

if ((SMOKE)); then
    ((ROUNDS_SET)) || ROUNDS=1
    ((DURATION_SET)) || DURATION=2
    ((WARMUP_SET)) || WARMUP=1
    ((CONNS_SET)) || CONNS=200
    WAKE_CONNS=200 WAKE_ROUNDS=2
fi
for v in ROUNDS DURATION WARMUP CONNS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || { echo "--${v,,} must be a positive integer" >&2; exit 64; }
done
[[ $HEAD_BYTES =~ ^[0-9]+$ && $HEAD_BYTES -le 16384 ]] || { echo "--head-bytes must be 0-16384" >&2; exit 64; }

# Extra request headers for wrk: a browser-like head of about HEAD_BYTES
# (User-Agent, Accept, Accept-Language, and a Cookie padded to the size), the
# same bytes for every proxy and run.
WRK_HEADERS=()
if ((HEAD_BYTES > 0)); then
    ua='Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36'
    accept='text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8'
    lang='en-US,en;q=0.9'
    # request line + Host + the headers above, about 260 bytes with names and CRLFs
    pad=$((HEAD_BYTES - 260 - 30))
    ((pad < 16)) && pad=16
    cookie="sessionid=$(printf '%*s' "$pad" '' | tr ' ' 'x'); csrftoken=0123456789abcdef"
    WRK_HEADERS=(-H "User-Agent: $ua" -H "Accept: $accept" -H "Accept-Language: $lang" -H "Cookie: $cookie")
fi

# ---------------------------------------------------------------- globals ---

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-e2e.XXXXXX")
RESULTS="$WORK/results.tsv"   # scenario label round rps p50 p99 p999 cpu_us rss_mb requests non2xx sockerr
TABLES="$WORK/tables.md"      # every table printed, reprinted at the end
STARTED_PIDS=()               # every background process this script started
declare -A PID_OF=()          # name -> PID of a started server
declare -A PORT_OF=()         # name -> proxy port
declare -A ADMIN_OF=()        # Switchyard name -> admin port
FAILURES=()                   # one line per failure; non-empty => exit 1
declare -A USED_PORTS=()      # ports handed out by next_port
declare -A STOPSIG_OF=()      # name -> signal that stops it quickly
declare -A URL_OF=()          # name -> URL wrk asks (default http://127.0.0.1:PORT/)
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
PROXY_CPU=0                   # pinned scenarios: the proxy's core
LOAD_CPU=1                    # pinned scenarios: wrk, upstreams, clients
((NCPU >= 2)) || LOAD_CPU=0
ALL_CPUS="0-$((NCPU - 1))"
WRK_CONNS=50
THROUGHPUT_MAXCONN=4096       # nginx worker_connections / HAProxy maxconn outside "conns"
SY_BIN=""
PY=""

log() { printf '[e2e %(%T)T] %s\n' -1 "$*" >&2; }
warn() { log "WARNING: $*"; }
die() { log "ERROR: $*"; exit 1; }
fail() { FAILURES+=("$*"); log "FAIL: $*"; }
want() { [[ ",$1," == *",$2,"* ]]; }   # want LIST ITEM

# ---------------------------------------------------------------- cleanup ---

alive() {   # alive PID: running and not a zombie
    local st
    [[ -r /proc/$1/stat ]] || return 1
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [[ -n $st && $st != Z ]]
}

# stop_pid PID [SIGNAL]: signal, wait up to 5 s, then SIGKILL.
stop_pid() {
    local pid=$1 sig=${2:-TERM} i
    alive "$pid" || return 0
    kill -s "$sig" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        warn "PID $pid ignored SIG$sig for 5 s; killing it"
        kill -s KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    # Newest first: clients and swappers before proxies before upstreams.
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STARTED_PIDS[i]}
        stop_pid "$pid" TERM
    done
    if ((KEEP)); then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ----------------------------------------------------------- preparation ---

as_root() { if ((EUID == 0)); then "$@"; else sudo "$@"; fi; }

# Installs the Debian packages whose commands are missing; apt-get update first.
ensure_packages() {
    local -A pkg_for=([nginx]=nginx-light [haproxy]=haproxy [wrk]=wrk [curl]=curl
        [python3]=python3 [taskset]=util-linux [ps]=procps)
    if want "$ONLY" tls; then pkg_for+=([openssl]=openssl [h2load]=nghttp2-client); fi
    local -a missing=()
    local cmd
    for cmd in "${!pkg_for[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_for[$cmd]}")
    done
    if ((BUILD)) && { [[ -z ${SWITCHYARD_BIN:-} ]] || want_consul_double; } &&
        ! command -v cmake >/dev/null 2>&1; then
        missing+=(cmake)   # Pingora's libz-ng-sys needs it (a bench build builds the binary too)
    fi
    ((${#missing[@]})) || return 0
    log "installing missing packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Builds (if needed) and copies the binary into $WORK.
build_switchyard() {
    local src=${SWITCHYARD_BIN:-$REPO/target/release/switchyard}
    if [[ -z ${SWITCHYARD_BIN:-} ]] && ((BUILD)); then
        command -v cargo >/dev/null 2>&1 || die "cargo not found (set SWITCHYARD_BIN or install Rust)"
        log "cargo build --release (waits if another build holds the lock)"
        if ! (cd "$REPO" && timeout 3600 cargo build --release --bin switchyard >"$WORK/cargo.log" 2>&1); then
            tail -n 30 "$WORK/cargo.log" >&2
            [[ -x $src ]] || die "cargo build failed and there is no binary"
            warn "cargo build FAILED; benchmarking the existing (possibly stale) $src"
        fi
    fi
    [[ -x $src ]] || die "no switchyard binary at $src"
    cp "$src" "$WORK/switchyard"
    SY_BIN="$WORK/switchyard"
}

# want_consul_double: the swaps-consul variant will run and needs a build of the double.
want_consul_double() {
    [[ -z ${CONSUL_DOUBLE_BIN:-} ]] && want "$PROXIES" switchyard &&
        { want "$ONLY" swaps || want "$ONLY" swaps-consul; }
}

# newest_consul_double: the newest consul_double bench executable cargo built.
newest_consul_double() {
    local dir=${CARGO_TARGET_DIR:-$REPO/target} f
    [[ $dir == /* ]] || dir="$REPO/$dir"
    # Newest first; `cargo test` leaves test-harness builds of the same name,
    # so take the first that is the double itself (it names --port-file).
    while read -r f; do
        if timeout 5 "$f" --help 2>&1 | grep -q -- '--port-file'; then
            echo "$f"
            return 0
        fi
    done < <(find "$dir/release/deps" -maxdepth 1 -type f -executable -name 'consul_double-*' \
        -printf '%T@ %p\n' 2>/dev/null | LC_ALL=C sort -rg | cut -d' ' -f2-)
}

# build_consul_double: builds (if needed) the Consul double and copies it into
# $WORK. Sets CONSUL_DOUBLE ("" when there is none: swaps-consul then fails).
build_consul_double() {
    local src=${CONSUL_DOUBLE_BIN:-}
    CONSUL_DOUBLE=""
    if [[ -z $src ]] && ((BUILD)); then
        if command -v cargo >/dev/null 2>&1; then
            log "cargo bench --bench consul_double --no-run (the Consul double; waits if another build holds the lock)"
            if (cd "$REPO" && timeout 3600 cargo bench --bench consul_double --no-run --message-format=json \
                >"$WORK/cargo-consul-double.json" 2>"$WORK/cargo-consul-double.log"); then
                # The bench target's executable, from cargo's own artifact messages.
                src=$("$PY" -c '
import json, sys
exe = ""
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if (m.get("reason") == "compiler-artifact" and t.get("name") == "consul_double"
            and "bench" in t.get("kind", []) and m.get("executable")):
        exe = m["executable"]
print(exe)' "$WORK/cargo-consul-double.json")
                [[ -n $src ]] || warn "cargo reported no consul_double executable (see $WORK/cargo-consul-double.json)"
            else
                tail -n 30 "$WORK/cargo-consul-double.log" >&2
                warn "cargo bench --bench consul_double --no-run FAILED"
            fi
        else
            warn "cargo not found: cannot build the Consul double (set CONSUL_DOUBLE_BIN)"
        fi
        if [[ -z $src ]]; then
            src=$(newest_consul_double)
            [[ -n $src ]] && warn "using the existing (possibly stale) Consul double $src"
        fi
    elif [[ -z $src ]]; then
        src=$(newest_consul_double)
    fi
    if [[ -z $src || ! -x $src ]]; then
        warn "no Consul double${src:+ at $src}; swaps-consul will fail (build it: cargo bench --bench consul_double --no-run)"
        return 0
    fi
    cp "$src" "$WORK/consul_double"
    CONSUL_DOUBLE="$WORK/consul_double"
    log "Consul double: $src"
}

# Raises the soft fd limit to the hard one (and the hard one if allowed).
raise_nofile() {
    ulimit -Hn 1048576 2>/dev/null || true
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    NOFILE=$(ulimit -n)
    [[ $NOFILE == unlimited ]] && NOFILE=1048576
    if ((THROUGHPUT_MAXCONN * 2 + 200 > NOFILE)); then
        THROUGHPUT_MAXCONN=$(((NOFILE - 200) / 2))
    fi
}

# next_port: a free loopback port (bound to port 0 and closed), never one
# handed out before. Allocated just before use to keep the race window short.
next_port() {
    local i p
    for ((i = 0; i < 20; i++)); do
        p=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        if [[ -z ${USED_PORTS[$p]:-} ]]; then
            USED_PORTS[$p]=1
            NEXT_PORT=$p
            return 0
        fi
    done
    die "no free port found"
}

# Helper files: the wrk Lua script and the idle-connection client.
write_helpers() {
    cat >"$WORK/report.lua" <<'EOF'
-- One machine-readable line at the end of a wrk run (latencies in microseconds).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "E2E requests=%d duration_us=%d p50_us=%.0f p99_us=%.0f p999_us=%.0f non2xx=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.status, e.connect, e.read, e.write, e.timeout))
end
EOF
    cat >"$WORK/wake_conns.py" <<'EOF'
"""Keep-alive connections that each send one request every PERIOD seconds.

usage: wake_conns.py PORT N PERIOD ROUNDS READY_FILE DONE_FILE
Opens N connections, sends one request on each and reads the answers (the
unmeasured round), waits PERIOD, then writes READY_FILE and runs ROUNDS
measured rounds, each starting PERIOD after the one before: every request
comes after a pause of about PERIOD on its connection. Writes
"<requests> <failed> <seconds>" to DONE_FILE at the end.
"""
import os, resource, signal, socket, sys, time

port, n, period, rounds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
ready, done = sys.argv[5], sys.argv[6]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64 if hard == resource.RLIM_INFINITY else min(n + 64, hard), hard))
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
REQ = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

def answer(s):
    """Read one response (Content-Length or chunked body); True if a 200."""
    buf = b""
    while True:
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            lines = head.split(b"\r\n")
            length = None
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            if (length is not None and len(body) >= length) or (length is None and body.endswith(b"0\r\n\r\n")):
                return b" 200 " in lines[0] + b" "
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk

def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
failed = requests = 0

def one_round():
    global failed, requests
    for s in socks:
        s.sendall(REQ)
    for s in socks:
        requests += 1
        if not answer(s):
            failed += 1

one_round()
time.sleep(period)
write_atomic(ready, "ready\n")
requests = failed = 0
t0 = time.monotonic()
for r in range(rounds):
    start = time.monotonic()
    one_round()
    if r + 1 < rounds:
        time.sleep(max(0.0, period - (time.monotonic() - start)))
write_atomic(done, "%d %d %.2f\n" % (requests, failed, time.monotonic() - t0))
EOF
    cat >"$WORK/hold_conns.py" <<'EOF'
"""Open N keep-alive connections, one GET each, and hold them open.

usage: hold_conns.py PORT N READY_FILE HOLD_SECONDS
Writes "<held> <failed> <seconds to open>" to READY_FILE once done opening,
then sleeps up to HOLD_SECONDS (or until SIGTERM) with every socket open.
"""
import os, resource, signal, socket, sys, time

port, n, ready, hold = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = n + 64
if soft < want:
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))

REQ = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"

def one():
    s = socket.socket()
    # SO_REUSEADDR: the TIME_WAIT left behind must not block a later bind() of this port
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(REQ)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed before the response header")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if b" 200 " not in lines[0] + b" ":
            raise OSError("status %r" % lines[0])
        length = None
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v.strip())
        while (length is not None and len(body) < length) or (
                length is None and not body.endswith(b"0\r\n\r\n")):
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed in the body")
            body += chunk
        return s
    except BaseException:
        s.close()
        raise

socks, failed, t0 = [], 0, time.monotonic()
deadline = t0 + 120 + n / 100
for _ in range(n):
    if time.monotonic() > deadline or failed > 20:
        break
    try:
        socks.append(one())
    except OSError as e:
        failed += 1
        print("connection failed: %s" % e, file=sys.stderr)
with open(ready + ".tmp", "w") as f:
    f.write("%d %d %.2f\n" % (len(socks), failed, time.monotonic() - t0))
os.rename(ready + ".tmp", ready)
time.sleep(hold)
EOF
}

# --------------------------------------------------------- process tools ---

# start_bg NAME CPUS CMD...: start in the background, log to $WORK/NAME.log.
# CPUS "" = no pinning. Records the PID (taskset execs, so it is CMD's PID).
start_bg() {
    local name=$1 cpus=$2
    shift 2
    if [[ -n $cpus ]]; then
        taskset -c "$cpus" "$@" >"$WORK/$name.log" 2>&1 &
    else
        "$@" >"$WORK/$name.log" 2>&1 &
    fi
    local pid=$!
    STARTED_PIDS+=("$pid")
    PID_OF[$name]=$pid
}

# proc_tree PID: the PID and all its descendants (nginx master + workers).
proc_tree() {
    local pid=$1 child
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        proc_tree "$child"
    done
}

# cpu_ticks NAME: utime+stime (clock ticks) summed over NAME's processes.
cpu_ticks() {
    local total=0 p t
    for p in $(proc_tree "${PID_OF[$1]}"); do
        t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

# rss_kb NAME: VmRSS (kB) summed over NAME's processes.
rss_kb() {
    local total=0 p r
    for p in $(proc_tree "${PID_OF[$1]}"); do
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || r=0
        total=$((total + ${r:-0}))
    done
    echo "$total"
}

# set_affinity CPUS NAME: re-pin every thread of NAME's processes.
set_affinity() {
    local p
    for p in $(proc_tree "${PID_OF[$2]}"); do
        taskset -a -p -c "$1" "$p" >/dev/null
    done
}

# wait_ok URL NAME: until URL answers 200 (at most 10 s).
wait_ok() {
    local url=$1 name=$2 i
    for ((i = 0; i < 100; i++)); do
        if curl -fsSk -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
        alive "${PID_OF[$name]}" || break
        sleep 0.1
    done
    tail -n 20 "$WORK/$name.log" >&2 || true
    die "$name did not come up at $url"
}

# stop NAME: stop a server this script started (Switchyard: SIGINT = fast stop).
stop() {
    local name=$1
    stop_pid "${PID_OF[$name]}" "${STOPSIG_OF[$name]:-TERM}"
}

# -------------------------------------------------------------- configs ---

# nginx_common NAME: the lines every nginx instance shares (own paths, no logs).
nginx_common() {
    local dir="$WORK/$1" m
    mkdir -p "$dir/tmp"
    cat <<EOF
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile $NOFILE;
EOF
    NGINX_TEMP_PATHS=""
    for m in client_body proxy fastcgi uwsgi scgi; do
        if ! nginx -V 2>&1 | grep -q -- "--without-http_${m}_module"; then
            NGINX_TEMP_PATHS+="    ${m}_temp_path $dir/tmp/$m;"$'\n'
        fi
    done
}

# start_upstream NAME PORT: nginx, 1 worker, `200 ok\n`, no request cap.
start_upstream() {
    local name=$1 port=$2 conf="$WORK/$1.conf"
    {
        nginx_common "$name"
        cat <<EOF
worker_processes 1;
events { worker_connections 4096; }
http {
    access_log off;
$NGINX_TEMP_PATHS    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$port;
        location / {
            default_type text/plain;
            return 200 "ok\n";
        }
    }
}
EOF
    } >"$conf"
    start_bg "$name" "" nginx -p "$WORK/$name" -c "$conf" -e "$WORK/$name/error.log"
    wait_ok "http://127.0.0.1:$port/" "$name"
}

# start_nginx NAME PORT WORKERS CPUS MAXCONN [tls]: with "tls", HTTPS and h2
# with the scenario's certificate, a shared session cache and tickets.
start_nginx() {
    local name=$1 port=$2 workers=$3 cpus=$4 maxconn=$5 tls=${6:-} conf="$WORK/$1.conf"
    local listen="listen 127.0.0.1:$port;" url="http://127.0.0.1:$port/"
    if [[ $tls == tls ]]; then
        listen="listen 127.0.0.1:$port ssl http2;
        ssl_certificate $WORK/tls/cert.pem;
        ssl_certificate_key $WORK/tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_tickets on;
        http2_max_requests 1000000;"
        url="https://127.0.0.1:$port/"
    fi
    {
        nginx_common "$name"
        cat <<EOF
worker_processes $workers;
events { worker_connections $maxconn; }
http {
    access_log off;
$NGINX_TEMP_PATHS    keepalive_requests 1000000;   # client side: no request cap
    keepalive_timeout 300s;
    upstream backends {
        server 127.0.0.1:$UP1;
        server 127.0.0.1:$UP2;
        keepalive 64;
        keepalive_requests 1000000;           # upstream side: no request cap
        keepalive_timeout 300s;
    }
    server {
        $listen
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$conf"
    nginx -t -q -p "$WORK/$name" -c "$conf" -e "$WORK/$name/error.log" || die "nginx config $conf invalid"
    start_bg "$name" "$cpus" nginx -p "$WORK/$name" -c "$conf" -e "$WORK/$name/error.log"
    PORT_OF[$name]=$port
    [[ $tls == tls ]] && URL_OF[$name]=$url
    wait_ok "$url" "$name"
}

# start_haproxy NAME PORT THREADS CPUS MAXCONN [tls]: with "tls", HTTPS and h2
# with the scenario's certificate (HAProxy's own session cache and tickets).
start_haproxy() {
    local name=$1 port=$2 threads=$3 cpus=$4 maxconn=$5 tls=${6:-} conf="$WORK/$1.cfg" global=""
    local bind="" url="http://127.0.0.1:$port/"
    if [[ $tls == tls ]]; then
        global="    ssl-default-bind-options ssl-min-ver TLSv1.2"
        bind=" ssl crt $WORK/tls/combined.pem alpn h2,http/1.1"
        url="https://127.0.0.1:$port/"
    fi
    # HAProxy needs about 2*maxconn fds and refuses to start otherwise; when
    # the hard limit is too low for the connection test, let it start anyway
    # (idle client connections need one fd each, not two).
    if ((2 * maxconn + 300 > NOFILE)); then
        [[ -n $global ]] && global+=$'\n'
        global+="    no strict-limits"
        warn "$name: maxconn $maxconn needs ~$((2 * maxconn + 300)) fds, limit is $NOFILE; using 'no strict-limits'"
    fi
    cat >"$conf" <<EOF
global
    nbthread $threads
    maxconn $maxconn
$global

defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive
    http-reuse always

frontend fe
    bind 127.0.0.1:$port$bind
    default_backend be

backend be
    balance roundrobin
    server up1 127.0.0.1:$UP1
    server up2 127.0.0.1:$UP2
EOF
    haproxy -c -q -f "$conf" || die "haproxy config $conf invalid"
    start_bg "$name" "$cpus" haproxy -db -f "$conf"
    PORT_OF[$name]=$port
    [[ $tls == tls ]] && URL_OF[$name]=$url
    wait_ok "$url" "$name"
}

# start_switchyard NAME PORT THREADS CPUS VARIANT   (VARIANT: lean | general | full | file | consul)
# general: lean with the express path off (every request through Pingora's HttpProxy).
# consul: service `up` from the Consul double at $CONSUL_ADDR.
start_switchyard() {
    local name=$1 port=$2 threads=$3 cpus=$4 variant=$5 conf="$WORK/$1.toml" admin access cluster h2c extra=""
    next_port
    admin=$NEXT_PORT
    case $variant in
        full)
            # Everything at its default except where the log goes.
            access=$'enabled = true\nformat = "json"\npath = "'"$WORK/$name-access.log"'"'
            h2c=true ;;
        *)
            access="enabled = false"
            h2c=false ;;   # nginx and HAProxy listen for HTTP/1.1 only
    esac
    if [[ $variant == file ]]; then
        cluster="file = { catalog = \"$WORK/catalog/catalog.json\", service = \"up\" }"
    elif [[ $variant == consul ]]; then
        cluster='consul = { service = "up" }'
        # A short wait; min_interval below the change interval (100 ms), so
        # the token bucket lets every change through; no self-registration
        # and no catalog watch for tag-driven routes: only the health watch.
        extra="
[consul]
addresses = [\"$CONSUL_ADDR\"]
wait = \"2s\"
min_interval = \"50ms\"
auto_routes = false

[consul.register]
enabled = false"
    else
        cluster="static = [\"127.0.0.1:$UP1\", \"127.0.0.1:$UP2\"]"
    fi
    local express=true park=1s tls=""
    [[ $variant == general ]] && express=false
    [[ $variant == tls ]] && tls="tls = { cert = \"$WORK/tls/cert.pem\", key = \"$WORK/tls/key.pem\" }"
    [[ $variant == noparking ]] && park=off
    cat >"$conf" <<EOF
# Generated by benches/e2e.sh ($variant).
[server]
threads = $threads
express = $express
park_idle_after = "$park"
work_stealing = false
drain_timeout = "1s"
shutdown_timeout = "1s"
pid_file = "$WORK/$name.pid"
upgrade_sock = "$WORK/$name-upgrade.sock"

[admin]
listen = "127.0.0.1:$admin"

[access_log]
$access

[[listeners]]
address = "127.0.0.1:$port"
h2c = $h2c
$tls

[[routes]]
name = "all"
cluster = "up"

[clusters.up]
$cluster
selection = "round_robin"
$extra
EOF
    "$SY_BIN" check --config "$conf" >"$WORK/$name.check" 2>&1 ||
        { cat "$WORK/$name.check" >&2; die "switchyard check rejected $conf"; }
    start_bg "$name" "$cpus" "$SY_BIN" run --config "$conf"
    STOPSIG_OF[$name]=INT   # fast stop; SIGTERM would drain first
    PORT_OF[$name]=$port
    ADMIN_OF[$name]=$admin
    [[ $variant == tls ]] && URL_OF[$name]="https://127.0.0.1:$port/"
    wait_ok "${URL_OF[$name]:-http://127.0.0.1:$port/}" "$name"
}

# start_proxy KIND NAME WORKERS CPUS MAXCONN: KIND is switchyard | nginx | haproxy.
start_proxy() {
    local kind=$1 name=$2 workers=$3 cpus=$4 maxconn=$5
    next_port
    case $kind in
        switchyard) start_switchyard "$name" "$NEXT_PORT" "$workers" "$cpus" lean ;;
        switchyard-general) start_switchyard "$name" "$NEXT_PORT" "$workers" "$cpus" general ;;
        switchyard-noparking) start_switchyard "$name" "$NEXT_PORT" "$workers" "$cpus" noparking ;;
        nginx) start_nginx "$name" "$NEXT_PORT" "$workers" "$cpus" "$maxconn" ;;
        haproxy) start_haproxy "$name" "$NEXT_PORT" "$workers" "$cpus" "$maxconn" ;;
        *) die "unknown proxy $kind" ;;
    esac
    log "started $name (PID ${PID_OF[$name]}, port ${PORT_OF[$name]}, $workers worker(s), cpus ${cpus:-all})"
}

# ------------------------------------------------------------ measuring ---

# wrk_once NAME SECONDS CPUS OUTFILE: one wrk run against NAME.
wrk_once() {
    local name=$1 secs=$2 cpus=$3 out=$4
    local -a pin=()
    [[ -n $cpus ]] && pin=(taskset -c "$cpus")
    "${pin[@]}" timeout $((secs + 30)) wrk -t1 -c"$WRK_CONNS" -d"${secs}s" --timeout 5s \
        "${WRK_HEADERS[@]}" -s "$WORK/report.lua" "${URL_OF[$name]:-http://127.0.0.1:${PORT_OF[$name]}/}" >"$out" 2>&1 || true
}

# warm NAME CPUS: an unrecorded run; still checks that NAME serves.
warm() {
    local out="$WORK/wrk/warm-$1-$RANDOM.txt"
    wrk_once "$1" "$WARMUP" "$2" "$out"
    grep -q '^E2E requests=[1-9]' "$out" || fail "$1: warm-up served no requests ($(tail -n 3 "$out" | tr '\n' ' '))"
}

# measure SCENARIO LABEL NAME ROUND CPUS: one recorded run, appended to $RESULTS.
measure() {
    local sc=$1 label=$2 name=$3 round=$4 cpus=$5 before after rss line
    local out="$WORK/wrk/$sc-$label-$round.txt"
    before=$(cpu_ticks "$name")
    wrk_once "$name" "$DURATION" "$cpus" "$out"
    after=$(cpu_ticks "$name")
    rss=$(rss_kb "$name")
    line=$(grep '^E2E ' "$out" || true)
    if [[ -z $line ]]; then
        fail "$sc/$label round $round: wrk printed no result ($(tail -n 3 "$out" | tr '\n' ' '))"
        line="E2E requests=0 duration_us=1 p50_us=0 p99_us=0 p999_us=0 non2xx=0 connect=0 read=0 write=0 timeout=0"
    fi
    local -a kv=()
    local w
    for w in ${line#E2E }; do kv+=(-v "$w"); done   # requests=N ... -> awk variables
    awk -v sc="$sc" -v label="$label" -v round="$round" -v d="$((after - before))" \
        -v tck="$CLK_TCK" -v rss="$rss" "${kv[@]}" 'BEGIN {
            rps = requests / (duration_us / 1e6)
            cpu = requests ? d * 1e6 / tck / requests : 0
            printf "%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%.3f\t%.1f\t%.1f\t%d\t%d\t%d\n",
                sc, label, round, rps, p50_us / 1000, p99_us / 1000, p999_us / 1000,
                cpu, rss / 1024, requests, non2xx, connect + read + write + timeout
        }' >>"$RESULTS"
    local row rps p50 p99 cpu rssm req non2xx sockerr connect
    row=$(tail -n 1 "$RESULTS")
    IFS=$'\t' read -r _ _ _ rps p50 p99 _ cpu rssm req non2xx sockerr <<<"$row"
    log "$sc/$label r$round: $rps req/s  p50 ${p50} ms  p99 ${p99} ms  ${cpu} us/req  RSS ${rssm} MB  non-2xx $non2xx  sock-err $sockerr"
    connect=$(sed -n 's/.* connect=\([0-9]*\).*/\1/p' <<<"$line")
    ((req > 0)) || fail "$sc/$label round $round: no requests served"
    ((non2xx == 0)) || fail "$sc/$label round $round: $non2xx non-2xx responses"
    ((${connect:-0} == 0)) || fail "$sc/$label round $round: $connect connect errors"
    alive "${PID_OF[$name]}" || fail "$sc/$label: $name died during round $round"
}

# ------------------------------------------------------------- reporting ---

median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
med() { awk -F'\t' -v s="$1" -v l="$2" -v c="$3" '$1 == s && $2 == l { print $c }' "$RESULTS" | median; }
medf() { awk -v v="$(med "$1" "$2" "$3")" -v f="$4" 'BEGIN { if (v == "nan") print v; else printf f, v }'; }
total() { awk -F'\t' -v s="$1" -v l="$2" -v c="$3" '$1 == s && $2 == l { t += $c } END { print t + 0 }' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2fx", a / b }'; }
# mb KB: kilobytes as megabytes, one decimal.
mb() { awk -v v="$1" 'BEGIN { printf "%.1f", v / 1024 }'; }

emit() { printf '%s\n' "$@" | tee -a "$TABLES"; }

# table SCENARIO TITLE LABEL...: medians per label.
table() {
    local sc=$1 title=$2 label n
    shift 2
    emit "" "### $title" "" \
        "| proxy | runs | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | RSS MB | non-2xx | sock err |" \
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for label in "$@"; do
        n=$(awk -F'\t' -v s="$sc" -v l="$label" '$1 == s && $2 == l' "$RESULTS" | wc -l)
        emit "| $label | $n | $(medf "$sc" "$label" 4 %.0f) | $(medf "$sc" "$label" 5 %.2f) | $(medf "$sc" "$label" 6 %.2f) | $(medf "$sc" "$label" 7 %.2f) | $(medf "$sc" "$label" 8 %.1f) | $(medf "$sc" "$label" 9 %.1f) | $(total "$sc" "$label" 11) | $(total "$sc" "$label" 12) |"
    done
}

# ratios SCENARIO A B: "A/B" for CPU µs/req, req/s and p99 (medians).
ratios() {
    local sc=$1 a=$2 b=$3
    emit "- $a/$b: CPU µs/req $(ratio "$(med "$sc" "$a" 8)" "$(med "$sc" "$b" 8)"), req/s $(ratio "$(med "$sc" "$a" 4)" "$(med "$sc" "$b" 4)"), p99 $(ratio "$(med "$sc" "$a" 6)" "$(med "$sc" "$b" 6)")"
}

# ------------------------------------------------------------- scenarios ---

# rounds SCENARIO CPUS LABEL=NAME...: warm each, then interleave the rounds.
rounds() {
    local sc=$1 cpus=$2 pair r
    shift 2
    for pair in "$@"; do warm "${pair#*=}" "$cpus"; done
    for ((r = 1; r <= ROUNDS; r++)); do
        for pair in "$@"; do measure "$sc" "${pair%%=*}" "${pair#*=}" "$r" "$cpus"; done
    done
}

selected_proxies() { tr ',' ' ' <<<"$PROXIES"; }

pin_upstreams() { set_affinity "$1" up1; set_affinity "$1" up2; }

# pinned / unpinned: the three proxies side by side.
scenario_compare() {
    local sc=$1 workers=$2 cpus=$3 load_cpus=$4 title=$5 p
    local -a pairs=()
    log "== scenario $sc: $title"
    pin_upstreams "${load_cpus:-$ALL_CPUS}"
    for p in $(selected_proxies); do
        start_proxy "$p" "$sc-$p" "$workers" "$cpus" "$THROUGHPUT_MAXCONN"
        pairs+=("$p=$sc-$p")
    done
    rounds "$sc" "$load_cpus" "${pairs[@]}"
    local -a labels=()
    for p in $(selected_proxies); do
        stop "$sc-$p"
        labels+=("$p")
    done
    table "$sc" "$title" "${labels[@]}"
    if want "$PROXIES" switchyard; then
        want "$PROXIES" nginx && ratios "$sc" switchyard nginx
        want "$PROXIES" haproxy && ratios "$sc" switchyard haproxy
    fi
    return 0
}

# features: lean vs full (JSON access log to a file), both pinned.
scenario_features() {
    local sc=features lines req dropped
    log "== scenario features: Switchyard lean vs full"
    pin_upstreams "$LOAD_CPU"
    next_port; start_switchyard features-lean "$NEXT_PORT" 1 "$PROXY_CPU" lean
    next_port; start_switchyard features-full "$NEXT_PORT" 1 "$PROXY_CPU" full
    rounds "$sc" "$LOAD_CPU" lean=features-lean full=features-full
    sleep 1   # let the access log writer catch up
    lines=$(wc -l <"$WORK/features-full-access.log")
    dropped=$(curl -fsS --max-time 2 "http://127.0.0.1:${ADMIN_OF[features-full]}/metrics" |
        awk '/^switchyard_access_log_dropped_total/ { print $2 }')
    stop features-lean
    stop features-full
    req=$(total "$sc" full 10)
    table "$sc" "Switchyard lean vs full feature (pinned, 1 thread; full = JSON access log to a file)" lean full
    ratios "$sc" full lean
    emit "- access log: $lines lines written, ${dropped:-?} dropped (requests in measured runs: $req, plus warm-up)"
    ((lines >= req)) || warn "features: access log has $lines lines for $req measured requests"
}

# catalog_body TAG: a valid catalog for the two upstreams; TAG makes it differ.
catalog_body() {
    printf '{"up": [{"address": "127.0.0.1:%s", "meta": {"v": "%s"}}, {"address": "127.0.0.1:%s", "meta": {"v": "%s"}}]}\n' \
        "$UP1" "$1" "$UP2" "$1"
}

generation() {
    curl -fsS --max-time 2 "http://127.0.0.1:${ADMIN_OF[$1]}/status" |
        "$PY" -c 'import json, sys; print(json.load(sys.stdin)["generation"])'
}

# start_swapper: rewrite the catalog 10 times a second (bounded), atomic rename.
# One process that writes and renames (no fork per change), so that what the
# load core pays for the swaps is the writes, not process creation.
start_swapper() {
    local dir="$WORK/catalog" max=$((DURATION * 10 + 50))
    rm -f "$dir/stop"
    "$PY" - "$dir" "$max" <<'PYEOF' &
import os, sys, time
d, limit = sys.argv[1], int(sys.argv[2])
bodies = [open(os.path.join(d, n), "rb").read() for n in ("b.json", "a.json")]
next_at = time.monotonic()
for i in range(limit):
    if os.path.exists(os.path.join(d, "stop")):
        break
    tmp = os.path.join(d, ".next.json")
    with open(tmp, "wb") as f:
        f.write(bodies[i % 2])
    os.replace(tmp, os.path.join(d, "catalog.json"))
    # 10 a second on a fixed schedule, whatever a write costs; after a stall,
    # missed slots are skipped rather than caught up in a burst.
    next_at = max(next_at + 0.1, time.monotonic())
    time.sleep(max(0.0, next_at - time.monotonic()))
PYEOF
    SWAPPER=$!
    STARTED_PIDS+=("$SWAPPER")
    taskset -a -p -c "$LOAD_CPU" "$SWAPPER" >/dev/null
}
stop_swapper() { touch "$WORK/catalog/stop"; stop_pid "$SWAPPER" TERM; }

# swaps (file): a file-catalog cluster with and without catalog rewrites under load.
scenario_swaps_file() {
    local sc=swaps name=swaps-sy r g0 g1 swaps_total=0
    log "== scenario swaps: file catalog rewritten 10x/s under load"
    pin_upstreams "$LOAD_CPU"
    mkdir -p "$WORK/catalog"
    catalog_body a >"$WORK/catalog/a.json"
    catalog_body b >"$WORK/catalog/b.json"
    cp "$WORK/catalog/a.json" "$WORK/catalog/catalog.json"
    next_port
    start_switchyard "$name" "$NEXT_PORT" 1 "$PROXY_CPU" file
    warm "$name" "$LOAD_CPU"
    for ((r = 1; r <= ROUNDS; r++)); do
        measure "$sc" "no-swaps" "$name" "$r" "$LOAD_CPU"
        g0=$(generation "$name")
        start_swapper
        measure "$sc" "swaps" "$name" "$r" "$LOAD_CPU"
        stop_swapper
        sleep 0.2   # let the last rename land
        g1=$(generation "$name")
        log "swaps r$r: routing generation $g0 -> $g1"
        ((g1 > g0)) || fail "swaps round $r: generation did not move ($g0 -> $g1)"
        swaps_total=$((swaps_total + g1 - g0))
    done
    stop "$name"
    table "$sc" "Swap under load (pinned, 1 thread, file catalog rewritten 10x/s)" no-swaps swaps
    ratios "$sc" swaps no-swaps
    emit "- routing generations published during the swap runs: $swaps_total (about $((DURATION * 10)) per run expected); non-2xx with swaps: $(total "$sc" swaps 11)"
}

# log_count NAME PATTERN: how many lines of NAME's log match PATTERN.
log_count() { grep -c -- "$2" "$WORK/$1.log" 2>/dev/null || true; }

# swaps (consul): a Consul cluster fed by the Consul double (its own process,
# on the load core); "swaps" runs have it flip the second upstream's check
# 10 times a second (the active file turns the changes on and off).
scenario_swaps_consul() {
    local sc=swaps-consul name=swaps-consul-sy dbl=swaps-consul-double r i g0 g1 swaps_total=0
    local active="$WORK/consul-active" portfile="$WORK/consul-double.addr" paused before after changes=0 errs
    local bound=$((WARMUP + ROUNDS * (2 * DURATION + 20) + 120))
    ((bound <= 86400)) || bound=86400
    log "== scenario swaps-consul: Consul double, one instance's check flipped 10x/s under load"
    if [[ -z ${CONSUL_DOUBLE:-} ]]; then
        fail "swaps-consul: no Consul double binary (see the warnings above); variant skipped"
        return 0
    fi
    pin_upstreams "$LOAD_CPU"
    rm -f "$active" "$portfile"
    # Runs for the whole variant (stopped below); the bound only matters if
    # this script dies without its EXIT trap.
    start_bg "$dbl" "$LOAD_CPU" "$CONSUL_DOUBLE" --port-file "$portfile" --service up \
        --instances "127.0.0.1:$UP1,127.0.0.1:$UP2" --mode health --changes-per-sec 10 \
        --active-file "$active" --duration-secs "$bound"
    for ((i = 0; i < 100; i++)); do   # at most 10 s
        [[ -s $portfile ]] && break
        alive "${PID_OF[$dbl]}" || break
        sleep 0.1
    done
    if [[ ! -s $portfile ]]; then
        tail -n 20 "$WORK/$dbl.log" >&2 || true
        fail "swaps-consul: the Consul double did not start (see $dbl.log)"
        stop "$dbl"
        return 0
    fi
    CONSUL_ADDR=$(<"$portfile")
    log "started $dbl (PID ${PID_OF[$dbl]}, $CONSUL_ADDR)"
    next_port
    start_switchyard "$name" "$NEXT_PORT" 1 "$PROXY_CPU" consul
    warm "$name" "$LOAD_CPU"
    for ((r = 1; r <= ROUNDS; r++)); do
        measure "$sc" "no-swaps" "$name" "$r" "$LOAD_CPU"
        g0=$(generation "$name")
        before=$(log_count "$dbl" '^consul_double: paused changes=')
        touch "$active"
        measure "$sc" "swaps" "$name" "$r" "$LOAD_CPU"
        rm -f "$active"
        # Wait for the double to put the check back to passing and say so.
        for ((i = 0; i < 50; i++)); do   # at most 5 s
            paused=$(log_count "$dbl" '^consul_double: paused changes=')
            ((paused > before)) && break
            sleep 0.1
        done
        sleep 0.2   # let the last change reach the routing table
        g1=$(generation "$name")
        after=$(sed -n 's/^consul_double: paused changes=\([0-9]*\)$/\1/p' "$WORK/$dbl.log" | tail -n 1)
        log "swaps-consul r$r: routing generation $g0 -> $g1; Consul changes so far ${after:-?}"
        ((paused > before)) || fail "swaps-consul round $r: the Consul double did not pause"
        ((g1 > g0)) || fail "swaps-consul round $r: generation did not move ($g0 -> $g1)"
        swaps_total=$((swaps_total + g1 - g0))
    done
    errs=$(curl -fsS --max-time 2 "http://127.0.0.1:${ADMIN_OF[$name]}/metrics" |
        awk '/^switchyard_consul_watch_errors_total/ { t += $2 } END { print t + 0 }') || errs="?"
    stop "$name"
    stop "$dbl"
    changes=$(sed -n 's/^consul_double: changes=\([0-9]*\)$/\1/p' "$WORK/$dbl.log" | tail -n 1)
    [[ -n $changes ]] || fail "swaps-consul: the Consul double printed no final change count"
    table "$sc" "Swap under load (pinned, 1 thread, Consul double: one of two instances' check flipped 10x/s)" no-swaps swaps
    ratios "$sc" swaps no-swaps
    emit "- routing generations published during the swap runs: $swaps_total (about $((DURATION * 10)) per run expected); Consul catalog changes made: ${changes:-?} (including one restore to passing per run); watch errors: $errs; non-2xx with swaps: $(total "$sc" swaps 11)"
}

# swaps: the file variant, then the Consul variant.
scenario_swaps() {
    if want "$ONLY" swaps || want "$ONLY" swaps-file; then scenario_swaps_file; fi
    if want "$ONLY" swaps || want "$ONLY" swaps-consul; then scenario_swaps_consul; fi
}

# conns: RSS holding CONNS idle keep-alive client connections.
scenario_conns() {
    local sc=conns p name maxconn=$((CONNS + 256)) rss0 rss1 rss5 ready held failed secs i per
    local -A before=() after=() settled=()
    log "== scenario conns: RSS with $CONNS idle keep-alive connections"
    if ((CONNS + 300 > NOFILE)); then
        warn "fd limit $NOFILE is too low for $CONNS connections; results will show failures"
    fi
    pin_upstreams "$LOAD_CPU"
    emit "" "### RSS holding $CONNS idle keep-alive client connections (1 worker each)" "" \
        "| proxy | held | RSS after warm-up MB | RSS holding, 1 s MB | RSS holding, 5 s MB | KB per connection (5 s) | seconds to open |" \
        "|---|---:|---:|---:|---:|---:|---:|"
    for p in $(selected_proxies); do
        name="conns-$p"
        start_proxy "$p" "$name" 1 "$PROXY_CPU" "$maxconn"
        warm "$name" "$LOAD_CPU"
        rss0=$(rss_kb "$name")
        ready="$WORK/$name.ready"
        start_bg "$name-client" "$LOAD_CPU" "$PY" "$WORK/hold_conns.py" "${PORT_OF[$name]}" "$CONNS" "$ready" 600
        for ((i = 0; i < 3000; i++)); do   # at most 300 s
            [[ -e $ready ]] && break
            alive "${PID_OF[$name-client]}" || break
            sleep 0.1
        done
        held=0 failed=0 secs=0
        [[ -e $ready ]] && read -r held failed secs <"$ready"
        # Read 1 s after the last connection opened, and again 4 s later:
        # Switchyard parks connections idle for 1 s (park_idle_after) and
        # returns the freed memory within the following second.
        sleep 1
        rss1=$(rss_kb "$name")
        sleep 4
        rss5=$(rss_kb "$name")
        stop_pid "${PID_OF[$name-client]}" TERM
        before[$p]=$rss0 after[$p]=$rss1 settled[$p]=$rss5
        per=$(awk -v a="$rss0" -v b="$rss5" -v n="$held" 'BEGIN { printf "%.1f", n ? (b - a) / n : 0 }')
        emit "| $p | $held | $(mb "$rss0") | $(mb "$rss1") | $(mb "$rss5") | $per | $secs |"
        ((held == CONNS)) || fail "conns: $p held $held of $CONNS connections ($failed failed; see $name-client.log)"
        alive "${PID_OF[$name]}" || fail "conns: $name died"
        stop "$name"
    done
    if want "$PROXIES" switchyard; then
        for p in nginx haproxy; do
            want "$PROXIES" "$p" || continue
            emit "- switchyard/$p RSS holding, 1 s: $(ratio "${after[switchyard]}" "${after[$p]}"); 5 s: $(ratio "${settled[switchyard]}" "${settled[$p]}")"
        done
    fi
}

# wake: CPU per request when each request comes after a pause longer than
# park_idle_after (every Switchyard request wakes a parked connection).
scenario_wake() {
    local sc=wake p name r i ready done_f c0 c1 req failed secs period=1.5 us
    local -a kinds=()
    local -A cpus_of=() req_of=()
    log "== scenario wake: $WAKE_CONNS connections, one request each every ${period}s"
    pin_upstreams "$LOAD_CPU"
    for p in $(selected_proxies); do
        kinds+=("$p")
        [[ $p == switchyard ]] && kinds+=(switchyard-noparking)
    done
    for p in "${kinds[@]}"; do
        # Twice the clients: nginx counts its upstream connections too, and
        # each round sends every client's request at once.
        start_proxy "$p" "$sc-$p" 1 "$PROXY_CPU" "$((2 * WAKE_CONNS + 256))"
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        for p in "${kinds[@]}"; do
            name="$sc-$p" ready="$WORK/$sc-$p-$r.ready" done_f="$WORK/$sc-$p-$r.done"
            start_bg "$name-client-$r" "$LOAD_CPU" "$PY" "$WORK/wake_conns.py" "${PORT_OF[$name]}" \
                "$WAKE_CONNS" "$period" "$WAKE_ROUNDS" "$ready" "$done_f"
            for ((i = 0; i < 1200; i++)); do   # at most 120 s
                [[ -e $ready ]] && break
                alive "${PID_OF[$name-client-$r]}" || break
                sleep 0.1
            done
            c0=$(cpu_ticks "$name")
            for ((i = 0; i < 1200; i++)); do
                [[ -e $done_f ]] && break
                alive "${PID_OF[$name-client-$r]}" || break
                sleep 0.1
            done
            c1=$(cpu_ticks "$name")
            req=0 failed=0 secs=0
            [[ -e $done_f ]] && read -r req failed secs <"$done_f"
            stop_pid "${PID_OF[$name-client-$r]}" TERM
            ((req > 0 && failed == 0)) || fail "wake: $p round $r: $req requests, $failed failed (see $name-client-$r.log)"
            alive "${PID_OF[$name]}" || fail "wake: $name died"
            us=$(awk -v t="$((c1 - c0))" -v n="$req" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", n ? t * 1e6 / hz / n : 0 }')
            cpus_of[$p]+="$us "
            req_of[$p]=$req
            log "$sc $p round $r: $req requests in ${secs}s, CPU $us µs/request"
        done
    done
    for p in "${kinds[@]}"; do stop "$sc-$p"; done
    emit "" "### Waking idle connections: $WAKE_CONNS connections, one request each every ${period}s (proxy pinned, 1 worker; medians of $ROUNDS)" "" \
        "| proxy | requests per run | CPU µs/req | runs |" "|---|---:|---:|---|"
    local -A med=()
    for p in "${kinds[@]}"; do
        med[$p]=$(tr ' ' '\n' <<<"${cpus_of[$p]}" | grep . | median)
        emit "| $p | ${req_of[$p]} | ${med[$p]} | ${cpus_of[$p]% } |"
    done
    if want "$PROXIES" switchyard; then
        emit "- switchyard/switchyard-noparking (parking and waking): $(ratio "${med[switchyard]}" "${med[switchyard-noparking]}")"
        for p in nginx haproxy; do
            want "$PROXIES" "$p" && emit "- switchyard/$p: $(ratio "${med[switchyard]}" "${med[$p]}")"
        done
    fi
    return 0
}

# make_tls_cert: one self-signed ECDSA P-256 certificate for every TLS proxy.
make_tls_cert() {
    mkdir -p "$WORK/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
        -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" -subj "/CN=bench.test" \
        -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" 2>/dev/null || die "openssl could not make a certificate"
    cat "$WORK/tls/cert.pem" "$WORK/tls/key.pem" >"$WORK/tls/combined.pem"
}

# start_tls_proxy KIND NAME CPUS
start_tls_proxy() {
    local kind=$1 name=$2 cpus=$3
    next_port
    case $kind in
        switchyard) start_switchyard "$name" "$NEXT_PORT" 1 "$cpus" tls ;;
        nginx) start_nginx "$name" "$NEXT_PORT" 1 "$cpus" "$THROUGHPUT_MAXCONN" tls ;;
        haproxy) start_haproxy "$name" "$NEXT_PORT" 1 "$cpus" "$THROUGHPUT_MAXCONN" tls ;;
        *) return 1 ;;
    esac
    log "started $name (PID ${PID_OF[$name]}, port ${PORT_OF[$name]}, TLS, cpus ${cpus:-all})"
}

# record SC LABEL ROUND RATE CPU_US DONE FAILED NAME: one row of $RESULTS not from wrk.
record() {
    local sc=$1 label=$2 round=$3 rate=$4 cpu=$5 done=$6 failed=$7 name=$8
    printf '%s\t%s\t%s\t%.0f\t0\t0\t0\t%.1f\t%.1f\t%d\t%d\t0\n' "$sc" "$label" "$round" "$rate" "$cpu" \
        "$(awk -v r="$(rss_kb "$name")" 'BEGIN { print r / 1024 }')" "$done" "$failed" >>"$RESULTS"
    log "$sc/$label r$round: $(printf %.0f "$rate")/s  $(printf %.1f "$cpu") us each  ($done done, $failed failed)"
    ((done > 0)) || fail "$sc/$label round $round: nothing completed"
    ((failed == 0)) || fail "$sc/$label round $round: $failed failed"
    alive "${PID_OF[$name]}" || fail "$sc/$label: $name died during round $round"
}

# measure_handshakes SC LABEL NAME ROUND MODE: `openssl s_time -MODE` (new |
# reuse) on the load core for $DURATION s; the proxy's CPU µs per handshake.
measure_handshakes() {
    local sc=$1 label=$2 name=$3 round=$4 mode=$5 before after t0 t1 out n
    local -a ver=()
    [[ $mode == reuse ]] && ver=(-tls1_2)
    out="$WORK/wrk/$sc-$label-$round.txt"
    before=$(cpu_ticks "$name")
    t0=$(date +%s%N)
    taskset -c "$LOAD_CPU" timeout $((DURATION + 30)) openssl s_time -connect "127.0.0.1:${PORT_OF[$name]}" \
        "-$mode" "${ver[@]}" -time "$DURATION" >"$out" 2>&1 </dev/null || true
    t1=$(date +%s%N)
    after=$(cpu_ticks "$name")
    # "N connections in X real seconds, ..." (the last such line is the timed run).
    n=$(sed -n 's/^\([0-9][0-9]*\) connections in [0-9.]* real seconds.*/\1/p' "$out" | tail -n 1)
    n=${n:-0}
    record "$sc" "$label" "$round" "$(awk -v n="$n" -v d=$((t1 - t0)) 'BEGIN { print n / (d / 1e9) }')" \
        "$(awk -v n="$n" -v d=$((after - before)) -v t="$CLK_TCK" 'BEGIN { print n ? d * 1e6 / t / n : 0 }')" \
        "$n" 0 "$name"
}

# measure_h2 SC LABEL NAME ROUND: h2load over TLS (ALPN h2), 10 connections x
# 10 streams for $DURATION s; the proxy's CPU µs per request.
measure_h2() {
    local sc=$1 label=$2 name=$3 round=$4 before after out done ok rate
    out="$WORK/wrk/$sc-$label-$round.txt"
    before=$(cpu_ticks "$name")
    taskset -c "$LOAD_CPU" timeout $((DURATION + 30)) h2load -c 10 -m 10 -t 1 -D "$DURATION" \
        "${URL_OF[$name]}" >"$out" 2>&1 || true
    after=$(cpu_ticks "$name")
    # "requests: T total, S started, D done, K succeeded, F failed, ..."
    done=$(sed -n 's/^requests: .* \([0-9][0-9]*\) done, \([0-9][0-9]*\) succeeded.*/\1/p' "$out")
    ok=$(sed -n 's/^requests: .* \([0-9][0-9]*\) done, \([0-9][0-9]*\) succeeded.*/\2/p' "$out")
    rate=$(sed -n 's/^finished in [0-9.]*s, \([0-9.]*\) req\/s.*/\1/p' "$out")
    grep -q '^Application protocol: h2' "$out" ||
        fail "$sc/$label round $round: h2load did not negotiate h2 ($(tail -n 3 "$out" | tr '\n' ' '))"
    record "$sc" "$label" "$round" "${rate:-0}" \
        "$(awk -v n="${done:-0}" -v d=$((after - before)) -v t="$CLK_TCK" 'BEGIN { print n ? d * 1e6 / t / n : 0 }')" \
        "${done:-0}" "$((${done:-0} - ${ok:-0}))" "$name"
}

# tls: TLS termination in the three proxies, pinned.
scenario_tls() {
    local p r sc
    local -a names=()
    log "== scenario tls: TLS termination, pinned (proxy on core $PROXY_CPU, load on core $LOAD_CPU)"
    make_tls_cert
    pin_upstreams "$LOAD_CPU"
    for p in $(selected_proxies); do
        [[ $p == switchyard || $p == nginx || $p == haproxy ]] || continue
        start_tls_proxy "$p" "tls-$p" "$PROXY_CPU"
        names+=("$p")
    done
    for p in "${names[@]}"; do warm "tls-$p" "$LOAD_CPU"; done
    for ((r = 1; r <= ROUNDS; r++)); do
        for p in "${names[@]}"; do measure tls-keepalive "$p" "tls-$p" "$r" "$LOAD_CPU"; done
        for p in "${names[@]}"; do measure_handshakes tls-full "$p" "tls-$p" "$r" new; done
        for p in "${names[@]}"; do measure_handshakes tls-resumed "$p" "tls-$p" "$r" reuse; done
        for p in "${names[@]}"; do measure_h2 tls-h2 "$p" "tls-$p" "$r"; done
    done
    for p in "${names[@]}"; do stop "tls-$p"; done
    table tls-keepalive "TLS keep-alive (HTTP/1.1 over TLS, wrk -c$WRK_CONNS), pinned" "${names[@]}"
    table tls-full "TLS full handshakes (TLS 1.3, ECDSA P-256, openssl s_time -new): req/s = handshakes/s, CPU µs per handshake" "${names[@]}"
    table tls-resumed "TLS resumed handshakes (TLS 1.2 session IDs, openssl s_time -reuse): req/s = handshakes/s, CPU µs per handshake" "${names[@]}"
    table tls-h2 "HTTP/2 over TLS (h2load -c10 -m10), pinned" "${names[@]}"
    if want "$PROXIES" switchyard; then
        for sc in tls-keepalive tls-full tls-resumed tls-h2; do
            emit "" "$sc:"
            want "$PROXIES" nginx && ratios "$sc" switchyard nginx
            want "$PROXIES" haproxy && ratios "$sc" switchyard haproxy
        done
    fi
    return 0
}

# ------------------------------------------------------------------ main ---

main() {
    ensure_packages
    PY=$(python3 -c 'import sys; print(sys.executable)')
    raise_nofile
    build_switchyard
    CONSUL_DOUBLE=""
    if want "$PROXIES" switchyard && { want "$ONLY" swaps || want "$ONLY" swaps-consul; }; then
        build_consul_double
    fi
    write_helpers
    mkdir -p "$WORK/wrk"
    : >"$RESULTS"
    next_port; UP1=$NEXT_PORT
    next_port; UP2=$NEXT_PORT

    log "work dir $WORK; $NCPU CPUs; fd limit $NOFILE; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    log "$("$SY_BIN" --version 2>/dev/null || echo switchyard), $(nginx -v 2>&1), $(haproxy -v | sed -n 1p | cut -d' ' -f1-3), $(wrk -v 2>&1 | sed -n 1p | cut -d' ' -f1-2)"
    log "mode: $([[ $SMOKE == 1 ]] && echo smoke || echo full), $ROUNDS round(s) x ${DURATION}s, warm-up ${WARMUP}s, wrk -t1 -c$WRK_CONNS, request head $( ((HEAD_BYTES)) && echo "~$HEAD_BYTES bytes (browser-like, with a cookie)" || echo minimal)"
    ((NCPU >= 2)) || warn "only one CPU: pinned scenarios share core 0 with the load generator"

    start_upstream up1 "$UP1"
    start_upstream up2 "$UP2"

    emit "## Switchyard end-to-end benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $ROUNDS x ${DURATION}s, medians$( ((HEAD_BYTES)) && echo ", request heads ~$HEAD_BYTES bytes"))" "" \
        "$NCPU CPUs, load average at start $(cut -d' ' -f1-3 /proc/loadavg) (other tenants' load makes req/s and latency noisy; CPU µs/req is the steadiest number)"
    if want "$ONLY" pinned; then
        scenario_compare pinned 1 "$PROXY_CPU" "$LOAD_CPU" \
            "Pinned: proxy on core 0, wrk + upstreams on core 1, 1 worker each"
    fi
    if want "$ONLY" unpinned; then
        scenario_compare unpinned 2 "" "" "Unpinned: 2 workers/threads each, nothing pinned"
    fi
    if want "$ONLY" features && want "$PROXIES" switchyard; then scenario_features; fi
    if { want "$ONLY" swaps || want "$ONLY" swaps-file || want "$ONLY" swaps-consul; } &&
        want "$PROXIES" switchyard; then
        scenario_swaps
    fi
    if want "$ONLY" conns; then scenario_conns; fi
    if want "$ONLY" wake; then scenario_wake; fi
    if want "$ONLY" tls; then scenario_tls; fi

    emit "" "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    echo "================================================================ summary"
    cat "$TABLES"
    if ((${#FAILURES[@]})); then
        echo
        echo "FAILED (${#FAILURES[@]}):"
        printf '  - %s\n' "${FAILURES[@]}"
        KEEP=1
        exit 1
    fi
    echo
    echo "all proxies served every run"
}

main
