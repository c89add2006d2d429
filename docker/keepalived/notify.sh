#!/bin/sh
# keepalived notify hook for a Switchyard pair: records every VRRP transition.
# keepalived appends: TYPE (INSTANCE|GROUP) NAME (VIP_A) STATE (MASTER|BACKUP|FAULT|STOP) PRIORITY.
# Usage in keepalived.conf:  notify "/etc/keepalived/notify.sh /var/log/switchyard-vrrp.log"
log="$1"
shift
line="$(date -u +%Y-%m-%dT%H:%M:%S.%NZ) $(hostname) $2 $3 priority=$4"
logger -t switchyard-vrrp "$2 is now $3 (priority $4)" 2>/dev/null || true
[ -n "$log" ] && echo "$line" >> "$log"
exit 0
