#!/usr/bin/env bash
# cellar side by side with csi-driver-host-path (docs/benchmarks.md, "Side by side with
# csi-driver-host-path"): in one run, a release `cellar all-in-one` and a `hostpathplugin`, each on
# fresh directories under /var/tmp (same disk), are driven by the same client, `cellar csi bench`,
# with the same volume counts: BACKGROUND volumes published first (not measured), then VOLUMES
# measured lifecycles with 1 and with 8 clients. The drivers take turns (they never run a benchmark
# at the same time; the one that starts each round alternates). Prints both drivers' p50/p99 per
# phase, their ratio, the RPC rate and each driver's peak RSS (VmHWM).
#
#   sudo bench/vs-hostpath.sh
#   sudo HOSTPATH_BIN=/usr/local/bin/hostpathplugin VOLUMES=1000 BACKGROUND=1000 ROUNDS=2 bench/vs-hostpath.sh
#   sudo TMPFS=1 bench/vs-hostpath.sh     # both drivers' data on a tmpfs: what the disk flushes cost
#
# Run as root (both drivers bind-mount). Everything it makes lives under one new directory in
# /var/tmp: both drivers' state and volumes (host-path's --statedir, so its default /csi-data-dir
# is not touched), host-path's TMPDIR, their sockets, logs and the client's staging and target
# directories. On exit it stops the two drivers by pid, unmounts whatever is still mounted below
# that directory and removes it. Without CELLAR_BIN it builds cellar first (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

VOLUMES=${VOLUMES:-1000}
BACKGROUND=${BACKGROUND:-1000}
CLIENTS=${CLIENTS:-"1 8"}
ROUNDS=${ROUNDS:-1}
TMPFS=${TMPFS:-0} # 1: both drivers keep their state and volumes on a tmpfs (no disk, fsync is free)
HOSTPATH_BIN=${HOSTPATH_BIN:-hostpathplugin}

if ! hp=$(command -v "$HOSTPATH_BIN"); then
  cat >&2 <<EOF
vs-hostpath: no csi-driver-host-path binary '$HOSTPATH_BIN' (set HOSTPATH_BIN=/path/to/hostpathplugin).
Build one outside this repository (Go >= 1.26): cmd/hostpathplugin of kubernetes-csi/csi-driver-host-path,
from a release tag that vendors its modules (v1.18.0 was used for docs/benchmarks.md), with GOFLAGS=-mod=vendor.
EOF
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "vs-hostpath: run as root (both drivers mount)" >&2
  exit 2
fi
if [ -n "${CELLAR_BIN:-}" ]; then
  bin=$CELLAR_BIN
else
  cargo build --release --quiet
  bin=target/release/cellar
fi

dir=$(mktemp -d /var/tmp/vs-hostpath-XXXXXX)
mkdir -p "$dir/cellar" "$dir/hostpath" "$dir/work" "$dir/out" "$dir/fs"
pids=()
client=

cleanup() {
  local rc=$?
  if [ -n "$client" ]; then kill "$client" 2>/dev/null || true; wait "$client" 2>/dev/null || true; fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # Mounts a failed run left below $dir, deepest first (mountinfo field 5 is the mount point).
  local m left
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  left=$(awk -v d="$dir/" 'index($5, d) == 1' /proc/self/mountinfo | wc -l)
  if [ "$left" -eq 0 ]; then
    rm -rf "$dir"
  else
    echo "vs-hostpath: $left mounts remain below $dir; not removing it" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Where the drivers keep state and volumes: $dir/fs, on the disk of /var/tmp or on a tmpfs.
if [ "$TMPFS" = 1 ]; then mount -t tmpfs -o size=2g,mode=0755 vs-hostpath "$dir/fs"; fi
mkdir -p "$dir/fs/cellar" "$dir/fs/hostpath"

wait_socket() { # socket pid log
  for _ in $(seq 200); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { echo "driver exited:" >&2; cat "$3" >&2; return 1; }
    sleep 0.05
  done
  echo "no socket $1 after 10 s" >&2
  return 1
}

CELLAR_LOG=warn "$bin" all-in-one --endpoint "unix://$dir/cellar/csi.sock" --node-id bench \
  --data-dir "$dir/fs/cellar" 2>"$dir/cellar/driver.log" &
cellar_pid=$!
pids+=("$cellar_pid")
# host-path's mount library makes and removes a temp directory (kubelet-detect-safe-umount*) and
# runs umount(8) on it at every mount.New(): TMPDIR keeps those inside $dir too.
mkdir -p "$dir/hostpath/tmp"
TMPDIR="$dir/hostpath/tmp" "$hp" --endpoint "unix://$dir/hostpath/csi.sock" --nodeid bench \
  --drivername hostpath.csi.k8s.io --statedir "$dir/fs/hostpath" --v=0 2>"$dir/hostpath/driver.log" &
hp_pid=$!
pids+=("$hp_pid")
wait_socket "$dir/cellar/csi.sock" "$cellar_pid" "$dir/cellar/driver.log"
wait_socket "$dir/hostpath/csi.sock" "$hp_pid" "$dir/hostpath/driver.log"

hp_version=$("$hp" --version 2>&1 | awk 'NR == 1 { print $2 }' || true)
echo "cellar:    $bin ($(git describe --always --dirty 2>/dev/null || echo '?')), pid $cellar_pid, data $dir/fs/cellar"
echo "host-path: $hp (${hp_version:-no version}), pid $hp_pid, statedir $dir/fs/hostpath"
echo "$(nproc) CPUs, kernel $(uname -r), drivers' data on $(findmnt -no FSTYPE,OPTIONS -T "$dir/fs" 2>/dev/null || echo '?')"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

run() { # driver clients round
  local drv=$1 c=$2 r=$3 pid sock out
  if [ "$drv" = cellar ]; then pid=$cellar_pid; else pid=$hp_pid; fi
  sock="$dir/$drv/csi.sock"
  out="$dir/out/$drv-c$c-r$r.txt"
  echo "== round $r, $drv, $c client(s), $BACKGROUND background volumes" >&2
  # In the background so that a signal stops it at once (cleanup kills it). A failed run (the
  # client stops at the first error) is reported in the table, not fatal; its volumes stay with
  # that driver until the end, so its later runs start with more.
  "$bin" csi --endpoint "unix://$sock" bench --volumes "$VOLUMES" --concurrency "$c" \
    --background "$BACKGROUND" --work-dir "$dir/work" --driver-pid "$pid" --prefix "r$r-c$c" \
    >"$out" 2>"$out.err" &
  client=$!
  if ! wait "$client"; then
    echo "FAILED: $(tail -1 "$out.err")" | tee -a "$out" >&2
  fi
  client=
}

# Field of a bench report: p50/p99 of a phase, rpc/s, RSS.
field() { # file phase|total|rss column
  case $2 in
    total) awk '/^total:/ { for (i = 1; i <= NF; i++) if ($i == "rpc/s,") print $(i - 1) }' "$1" ;;
    rss) awk '/peak RSS/ { print $(NF - 1) }' "$1" ;;
    *) awk -v p="$2" -v c="$3" '$1 == p { print $c }' "$1" ;;
  esac
}

table() { # clients round
  local c=$1 r=$2 a="$dir/out/cellar-c$1-r$2.txt" b="$dir/out/hostpath-c$1-r$2.txt"
  echo
  echo "### $c client(s), $VOLUMES volumes measured, $BACKGROUND published in the background (round $r)"
  echo
  echo "| rpc | cellar p50 | host-path p50 | cellar/host-path | cellar p99 | host-path p99 | cellar/host-path |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  local p x y u v f
  for f in "$a" "$b"; do
    if grep -q '^FAILED' "$f"; then
      echo "| $(basename "$f" .txt) | $(grep '^FAILED' "$f" | head -1 | tr '|' '/') | | | | | |"
      return 0
    fi
  done
  for p in CreateVolume NodeStageVolume NodePublishVolume NodeUnpublishVolume NodeUnstageVolume DeleteVolume; do
    x=$(field "$a" "$p" 3) y=$(field "$b" "$p" 3) u=$(field "$a" "$p" 4) v=$(field "$b" "$p" 4)
    awk -v p="$p" -v x="$x" -v y="$y" -v u="$u" -v v="$v" \
      'BEGIN { printf "| %s | %.3f ms | %.3f ms | %.2f | %.3f ms | %.3f ms | %.2f |\n", p, x, y, x / y, u, v, u / v }'
  done
  x=$(field "$a" total) y=$(field "$b" total)
  awk -v x="$x" -v y="$y" 'BEGIN { printf "| RPC/s | %d | %d | %.2f | | | |\n", x, y, x / y }'
  x=$(field "$a" rss) y=$(field "$b" rss)
  echo "| driver peak RSS (VmHWM, so far) | $x MiB | $y MiB | | | | |"
}

for r in $(seq "$ROUNDS"); do
  for c in $CLIENTS; do
    if [ $((r % 2)) -eq 1 ]; then order="cellar hostpath"; else order="hostpath cellar"; fi
    for drv in $order; do run "$drv" "$c" "$r"; done
  done
done

for r in $(seq "$ROUNDS"); do
  for c in $CLIENTS; do table "$c" "$r"; done
done
echo
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Raw reports:"
for f in "$dir"/out/*.txt; do echo "--- $(basename "$f" .txt)"; cat "$f"; done
if grep -q '^FAILED' "$dir"/out/*.txt; then exit 1; fi
