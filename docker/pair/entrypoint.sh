#!/bin/sh
# One load-balancer node of the compose stack: renders keepalived's config from
# the shipped template with this node's settings (environment), then runs
# keepalived, `switchyard watch` and `switchyard run` (as the unprivileged
# switchyard user). Any of them exiting stops the container.
set -eu
cfg=/etc/switchyard/pair.toml
mkdir -p /run/switchyard /var/lib/switchyard /etc/keepalived
chown switchyard /run/switchyard /var/lib/switchyard

# Both VIPs on lo, ARP answered only for the asking interface (docs/ha.md).
for vip in "$VIP_A" "$VIP_B"; do ip addr add "${vip%/*}/32" dev lo 2>/dev/null || true; done

/usr/local/lib/switchyard/render.sh NODE="$NODE" IFACE="$IFACE" SELF="$SELF" PEER="$PEER" \
    VIP_A="$VIP_A" VIP_B="$VIP_B" PRIO_A="$PRIO_A" PRIO_B="$PRIO_B" VRID_A="$VRID_A" VRID_B="$VRID_B" \
    TRACK_FILE=/run/switchyard/vrrp CONFIG="$cfg" \
    NOTIFY="/usr/local/lib/switchyard/notify.sh /run/switchyard/vrrp-events.log" \
    < /usr/local/lib/switchyard/keepalived.conf.in > /etc/keepalived/keepalived.conf

setpriv --reuid switchyard --regid switchyard --init-groups switchyard run --config "$cfg" &
proxy=$!
setpriv --reuid switchyard --regid switchyard --init-groups switchyard watch --config "$cfg" &
watcher=$!
keepalived --dont-fork --log-console --vrrp -f /etc/keepalived/keepalived.conf &
vrrp=$!

# SIGTERM (docker stop): the proxy hands off first; keepalived stays up until
# the proxy has exited, so the peer's takeover is an election, not a timeout.
trap 'kill -TERM $proxy; wait $proxy; kill -TERM $watcher $vrrp' TERM INT
wait $proxy
kill -TERM $watcher $vrrp 2>/dev/null || true
