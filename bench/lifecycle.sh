#!/usr/bin/env bash
# Reproduces the lifecycle benchmark of docs/benchmarks.md: a release all-in-one on a fresh data
# directory (under $BENCH_DIR, default a new directory in /var/tmp so the pool is on a real disk),
# 1000 volumes published in the background, then the measured lifecycle with 1 and with 8 clients.
# Run as root. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VOLUMES=${VOLUMES:-1000}
BACKGROUND=${BACKGROUND:-1000}
dir=${BENCH_DIR:-$(mktemp -d /var/tmp/cellar-bench-XXXXXX)}
cargo build --release --quiet
bin=target/release/cellar
CELLAR_LOG=warn "$bin" all-in-one --endpoint "unix://$dir/csi.sock" --node-id bench --data-dir "$dir/data" \
  2>"$dir/driver.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$dir/csi.sock" ] && break; sleep 0.05; done
for c in 1 8; do
  echo "== $c client(s), $BACKGROUND background volumes"
  "$bin" csi --endpoint "unix://$dir/csi.sock" bench --volumes "$VOLUMES" --concurrency "$c" \
    --background "$BACKGROUND" --work-dir "$dir" --driver-pid "$pid" --prefix "c$c"
done
