#!/bin/sh
# Render keepalived.conf.in for one node: every NAME=VALUE argument replaces
# @NAME@. Fails if a placeholder is left unreplaced.
#   docker/keepalived/render.sh NODE=lb1 IFACE=eth0 ... < keepalived.conf.in > /etc/keepalived/keepalived.conf
set -eu
script=""
for kv in "$@"; do
    name="${kv%%=*}"
    value="${kv#*=}"
    # Escape the sed replacement's special characters.
    value=$(printf '%s' "$value" | sed 's/[\/&|]/\\&/g')
    script="${script}s|@${name}@|${value}|g;"
done
out=$(sed "$script")
if printf '%s\n' "$out" | grep -v '^#' | grep -q '@[A-Z_]*@'; then
    printf '%s\n' "$out" | grep -v '^#' | grep -o '@[A-Z_]*@' | sort -u | sed 's/^/render.sh: no value for /' >&2
    exit 1
fi
printf '%s\n' "$out"
