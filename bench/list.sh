#!/usr/bin/env bash
# ListVolumes at scale (docs/benchmarks.md, "ListVolumes"): a release all-in-one on a fresh data
# directory, N empty dir volumes created through the CSI API, then a full paginated listing
# (`cellar csi list`, pages of 500) timed with /usr/bin/time at each size. A listing that read
# every record once per page grows with N²/500; one cut from an ordered listing grows with N.
# Run as root. SIZES overrides the sizes (default "1000 2500 5000 10000"). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"1000 2500 5000 10000"}
dir=${BENCH_DIR:-$(mktemp -d /var/tmp/cellar-bench-XXXXXX)}
bin=${CELLAR_BIN:-target/release/cellar}
[ -n "${CELLAR_BIN:-}" ] || cargo build --release --quiet
CELLAR_LOG=warn "$bin" all-in-one --endpoint "unix://$dir/csi.sock" --node-id bench --data-dir "$dir/data" \
  2>"$dir/driver.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$dir/csi.sock" ] && break; sleep 0.05; done
csi() { "$bin" csi --endpoint "unix://$dir/csi.sock" "$@"; }
made=0
printf '%8s %12s %14s %12s\n' volumes listed wall_seconds driver_rss_kib
for n in $SIZES; do
  while [ "$made" -lt "$n" ]; do
    csi create "bench-$(printf '%06d' "$made")" --size 1M >/dev/null
    made=$((made + 1))
  done
  out=$(mktemp)
  /usr/bin/time -f '%e' -o "$out.time" "$bin" csi --endpoint "unix://$dir/csi.sock" list >"$out"
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  printf '%8s %12s %14s %12s\n' "$n" "$(grep -c bench- "$out")" "$(cat "$out.time")" "$rss"
  rm -f "$out" "$out.time"
done
