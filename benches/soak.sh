#!/usr/bin/env bash
# benches/soak.sh: ten minutes of load through both request paths while
# Consul churns and fails and backends are killed; RSS and open file
# descriptors every 10 s. Not part of the test suite.
#
#   benches/soak.sh                 # 600 s
#   SOAK_SECONDS=120 benches/soak.sh   # a shorter run
#
# Environment: SOAK_SECONDS (600), SOAK_CHURN_MS (500: one Consul change
# every half second), SOAK_RSS_GROWTH_MIB (8: allowed RSS growth after the
# first minute). Exit status 1 on any failed client request or growth.
# The output (a Markdown table per 10 s sample, then totals) is also saved
# to target/soak-<date>.md under the cargo target directory.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target"
out="$target/soak-$(date -u +%Y%m%dT%H%M%SZ).md"
echo "soak: building (cargo bench --bench soak --no-run)" >&2
cargo bench --bench soak --no-run >&2
echo "soak: running for ${SOAK_SECONDS:-600} s; output also in $out" >&2
cargo bench --bench soak 2>&1 | tee "$out"
