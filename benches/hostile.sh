#!/usr/bin/env bash
# benches/hostile.sh: the hostile-request corpus (tests/hostile/cases.txt)
# against Switchyard's two request paths, its TLS listener, nginx and HAProxy, each in front of
# the same strict counting upstream, and a table of the outcomes.
#
#   benches/hostile.sh              # build, run, print the table
#   benches/hostile.sh --out FILE   # also write the table (markdown) to FILE
#   benches/hostile.sh --keep       # keep the work directory (configs, logs)
#
# The runner is the test binary of tests/hostile.rs (its ignored test
# `compare_with_peers`): it starts the strict upstream on the port this
# script gives it, starts Switchyard itself (express on, then off), and
# sends every case to each proxy named in HOSTILE_PEERS. This script only
# installs nginx and HAProxy if missing (apt-get), writes their configs
# (HTTP/1.1 to the upstream with keep-alive, Host passed on, defaults
# otherwise), starts them, and stops them by PID on exit. Outcomes are
# defined in docs/hostile.md. Not part of the test suite; exit status 0 when
# the run completed, whatever the outcomes. Everything listens on 127.0.0.1.

set -euo pipefail

OUT=""
KEEP=0
while (($#)); do
    case $1 in
        --out) OUT=${2:?--out needs a file}; shift ;;
        --keep) KEEP=1 ;;
        -h | --help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$PATH:/usr/sbin:/sbin"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-hostile.XXXXXX")
STARTED_PIDS=()

log() { printf '[hostile %(%T)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { [[ -r /proc/$1/stat ]] && [[ $(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) != Z ]]; }

stop_pid() {
    local pid=$1 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${STARTED_PIDS[i]}"
    done
    if ((KEEP)); then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

as_root() { if ((EUID == 0)); then "$@"; else sudo "$@"; fi; }

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v python3 >/dev/null || missing+=(python3)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A free loopback port (bound once, then released); never the same twice.
declare -A USED=()
free_port() {
    local p
    for _ in $(seq 20); do
        p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        [[ -z ${USED[$p]:-} ]] && { USED[$p]=1; echo "$p"; return; }
    done
    die "no free port"
}

UP=$(free_port)
NGINX_PORT=$(free_port)
HAPROXY_PORT=$(free_port)

# nginx: one worker, the upstream kept alive over HTTP/1.1, Host as the client sent it.
mkdir -p "$WORK/nginx/tmp"
temp_paths=""
for m in client_body proxy fastcgi uwsgi scgi; do
    nginx -V 2>&1 | grep -q -- "--without-http_${m}_module" || temp_paths+="    ${m}_temp_path $WORK/nginx/tmp/$m;"$'\n'
done
cat >"$WORK/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
$temp_paths    upstream strict {
        server 127.0.0.1:$UP;
        keepalive 8;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://strict;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$http_host;
        }
    }
}
EOF
nginx -t -q -p "$WORK/nginx" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log" || die "nginx config invalid"

# HAProxy: its defaults in HTTP mode, server connections kept and shared.
cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 1024

defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
    timeout http-request 10s
    option http-keep-alive
    http-reuse always

frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend be

backend be
    server strict 127.0.0.1:$UP
EOF
haproxy -c -q -f "$WORK/haproxy.cfg" || die "haproxy config invalid"

NGINX_VERSION=$(nginx -v 2>&1 | sed 's/.*nginx\///')
HAPROXY_VERSION=$(haproxy -v 2>&1 | awk 'NR == 1 {print $3}')

log "building the runner (cargo test --release --test hostile --no-run)"
(cd "$REPO" && cargo test --release --test hostile --no-run >"$WORK/build.log" 2>&1) || { tail -30 "$WORK/build.log" >&2; die "build failed"; }

nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log" >"$WORK/nginx.log" 2>&1 &
STARTED_PIDS+=($!)
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
STARTED_PIDS+=($!)
for port in "$NGINX_PORT" "$HAPROXY_PORT"; do
    for ((i = 0; i < 100; i++)); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break
        sleep 0.1
    done
done
log "nginx $NGINX_VERSION on $NGINX_PORT, HAProxy $HAPROXY_VERSION on $HAPROXY_PORT, strict upstream on $UP"

TABLE="$WORK/table.md"
(cd "$REPO" && HOSTILE_UPSTREAM="127.0.0.1:$UP" \
    HOSTILE_PEERS="nginx $NGINX_VERSION=127.0.0.1:$NGINX_PORT,HAProxy $HAPROXY_VERSION=127.0.0.1:$HAPROXY_PORT" \
    HOSTILE_TABLE="$TABLE" \
    cargo test --release --test hostile -- --ignored --exact compare_with_peers --nocapture >"$WORK/run.log" 2>&1) ||
    { tail -40 "$WORK/run.log" >&2; die "the runner failed"; }
cat "$TABLE"
if [[ -n $OUT ]]; then
    cp "$TABLE" "$OUT"
    log "table written to $OUT"
fi
