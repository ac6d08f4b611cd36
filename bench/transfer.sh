#!/usr/bin/env bash
# Reproduces the transfer benchmark of docs/benchmarks.md: a restore of a 1 GiB snapshot onto
# another node in split mode — a release controller and two release nodes on loopback, mutual TLS
# with a certificate of each node's own — pulled node to node (the default) and relayed by the
# controller (--node-transfers=via-controller), against copies of the same file between the same
# two directories over one TCP connection on the same loopback: plain, and TLS with the same
# certificates (python3's ssl). Every copy ends with its data on disk (the restore's syncfs, the
# baselines' fsync). Run as root; needs python3 and openssl. Cleans up after itself.
#
#   bench/transfer.sh                      # SIZE_MIB=1024 RUNS=3
#   CELLAR_BIN=target/debug/cellar SIZE_MIB=64 RUNS=1 bench/transfer.sh   # a quick smoke run
#
# THEN_BIN=<an older cellar> (optional) also measures the restore relayed by an older build, the
# only way builds before node-to-node transfers (commit 9931563) had, e.g. the release of 701232a,
# the commit issue #13 was filed against:
#
#   git worktree add --detach /tmp/cellar-then 701232a
#   (cd /tmp/cellar-then && CARGO_TARGET_DIR=/tmp/cellar-then-target cargo build --release)
#   THEN_BIN=/tmp/cellar-then-target/release/cellar SIZE_MIB=1024 RUNS=5 bench/transfer.sh
#
# It starts a second controller and two more nodes of that build beside today's (own data dirs and
# ports), with the flags such builds understood: one node certificate shared by the nodes (SAN
# cellar-agent), no --require-node-certificates, no --node-transfers. A source of the same bytes is
# snapshotted there, and each round restores it onto the old node-2, then today's direct, then
# today's relay, in that order, so that load on the machine meets the three alike. The CSI calls go
# through CELLAR_BIN's `cellar csi` (a client for any CSI driver) in all three ways.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
dir=${BENCH_DIR:-$(mktemp -d /var/tmp/cellar-transfer-XXXXXX)}
if [ -z "${CELLAR_BIN:-}" ]; then
  cargo build --release --quiet
  CELLAR_BIN=target/release/cellar
fi
bin=$(realpath "$CELLAR_BIN")
then_bin=
if [ -n "${THEN_BIN:-}" ]; then
  then_bin=$(realpath "$THEN_BIN")
  [ -x "$then_bin" ] || { echo "THEN_BIN $THEN_BIN is not an executable" >&2; exit 1; }
fi
command -v python3 >/dev/null || { echo "python3 is missing" >&2; exit 1; }
# shellcheck source=bench/split-lib.sh
. bench/split-lib.sh
pids=()
stop() { for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap 'stop "${pids[@]}"; rm -rf "$dir"' EXIT

now() { date +%s.%N; }
rate() { python3 -c "import sys; print(f'{float(sys.argv[1]) / (float(sys.argv[3]) - float(sys.argv[2])):.0f}')" "$SIZE_MIB" "$1" "$2"; }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# The CA, one certificate per node and the controller's (bench/split-lib.sh).
certs=$dir/certs
split_certs "$certs" node-1 node-2

registry=$(port)
controller_pid=
start_controller() {
  # shellcheck disable=SC2046
  CELLAR_LOG=warn "$bin" controller --endpoint "unix://$dir/controller.sock" --agent-listen "127.0.0.1:$registry" \
    --data-dir "$dir/controller" --require-node-certificates --node-transfers "$1" $(tls controller) \
    2>>"$dir/controller.log" &
  controller_pid=$!
  pids+=("$controller_pid")
}
node_pids=()
for n in 1 2; do
  p=$(port)
  # shellcheck disable=SC2046
  CELLAR_LOG=warn "$bin" node --endpoint "unix://$dir/node-$n.sock" --node-id "node-$n" --data-dir "$dir/node-$n" \
    --controller "localhost:$registry" --agent-listen "127.0.0.1:$p" --agent-advertise "127.0.0.1:$p" \
    $(tls "node-node-$n") 2>>"$dir/node-$n.log" &
  pids+=("$!")
  node_pids+=("$!")
done
# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
cpu_all() { echo "$(cpu "${node_pids[0]}") $(cpu "${node_pids[1]}") $(cpu "$controller_pid")"; }
# What each process used between two cpu_all: source, target, controller.
cpu_used() {
  python3 -c "import sys; a, b = sys.argv[1].split(), sys.argv[2].split(); print(' '.join(f'{float(y) - float(x):.2f}' for x, y in zip(a, b)))" "$1" "$2"
}
# The mean of each column of "a b c" lines.
means() { python3 -c "import sys; rows = [list(map(float, l.split())) for l in sys.argv[1:]]; print(' '.join(f'{sum(c) / len(c):.2f}' for c in zip(*rows)))" "$@"; }

csi() { "$bin" csi --endpoint "unix://$dir/controller.sock" -o json "$@"; }
on() { echo "--topology=topology.cellar.csi.dev/node=$1"; }
# The id a create or snapshot printed.
id_of() { python3 -c 'import json, sys; d = json.load(sys.stdin); print(d.get("volume_id") or d["snapshot_id"])'; }

start_controller direct
src=$(until_registered csi create src --size 2G "$(on node-1)" | id_of)
echo "== writing $SIZE_MIB MiB into $src"
head -c "${SIZE_MIB}M" /dev/urandom >"$dir/node-1/pools/default/volumes/src/data"
snap=$(csi snapshot snap "$src" | id_of)
sync

# THEN_BIN: an older build's controller and two nodes under $dir/then, with a source of the same bytes
# and its snapshot. They run for the whole benchmark, like today's nodes.
then_dir=$dir/then then_node_pids=() then_controller_pid=
if [ -n "$then_bin" ]; then
  then_registry=$(port)
  # shellcheck disable=SC2046
  CELLAR_LOG=warn "$then_bin" controller --endpoint "unix://$then_dir/controller.sock" \
    --agent-listen "127.0.0.1:$then_registry" --data-dir "$then_dir/controller" $(tls controller) \
    2>>"$dir/then-controller.log" &
  then_controller_pid=$!
  pids+=("$then_controller_pid")
  for n in 1 2; do
    p=$(port)
    # shellcheck disable=SC2046
    CELLAR_LOG=warn "$then_bin" node --endpoint "unix://$then_dir/node-$n.sock" --node-id "node-$n" \
      --data-dir "$then_dir/node-$n" --controller "localhost:$then_registry" --agent-listen "127.0.0.1:$p" \
      --agent-advertise "127.0.0.1:$p" $(tls node) 2>>"$dir/then-node-$n.log" &
    pids+=("$!")
    then_node_pids+=("$!")
  done
  then_csi() { "$bin" csi --endpoint "unix://$then_dir/controller.sock" -o json "$@"; }
  then_src=$(until_registered then_csi create src --size 2G "$(on node-1)" | id_of)
  echo "== copying the same $SIZE_MIB MiB into $then_src of THEN_BIN ($then_bin)"
  cp "$dir/node-1/pools/default/volumes/src/data" "$then_dir/node-1/pools/default/volumes/src/data"
  then_snap=$(then_csi snapshot snap "$then_src" | id_of)
  sync
fi

# restore MODE RUN: one restore of the snapshot onto node-2 with the controller in MODE (restarted into
# it when it runs the other), checked and removed after. Sets result to "MiB/s cpu-source cpu-target
# cpu-controller" (not echoed: a subshell would lose the restarted controller).
mode=direct
restore() {
  if [ "$1" != "$mode" ]; then
    stop "$controller_pid"
    start_controller "$1"
    mode=$1
  fi
  local name="r-$1-$2" t0 t1 id before probe
  # Calls after a start wait for both nodes to register; they are not measured.
  until_registered csi get "$src" >/dev/null
  probe=$(until_registered csi create "probe-$1-$2" --size 1M "$(on node-2)" | id_of)
  csi delete "$probe" >/dev/null
  sync
  before=$(cpu_all)
  t0=$(now)
  id=$(until_registered csi create "$name" --size 2G --from-snapshot "$snap" "$(on node-2)" | id_of)
  t1=$(now)
  result="$(rate "$t0" "$t1") $(cpu_used "$before" "$(cpu_all)")"
  cmp -s "$dir/node-1/pools/default/volumes/src/data" "$dir/node-2/pools/default/volumes/$name/data" \
    || { echo "the restored data differs from the source" >&2; exit 1; }
  csi delete "$id" >/dev/null
}

# restore_then RUN: the same restore through THEN_BIN's controller (its only way). Sets result likewise.
restore_then() {
  local name="r-then-$1" t0 t1 id before probe
  until_registered then_csi get "$then_src" >/dev/null
  probe=$(until_registered then_csi create "probe-then-$1" --size 1M "$(on node-2)" | id_of)
  then_csi delete "$probe" >/dev/null
  sync
  before=$(then_cpu_all)
  t0=$(now)
  id=$(until_registered then_csi create "$name" --size 2G --from-snapshot "$then_snap" "$(on node-2)" | id_of)
  t1=$(now)
  result="$(rate "$t0" "$t1") $(cpu_used "$before" "$(then_cpu_all)")"
  cmp -s "$then_dir/node-1/pools/default/volumes/src/data" "$then_dir/node-2/pools/default/volumes/$name/data" \
    || { echo "the data THEN_BIN restored differs from the source" >&2; exit 1; }
  then_csi delete "$id" >/dev/null
}
then_cpu_all() { echo "$(cpu "${then_node_pids[0]}") $(cpu "${then_node_pids[1]}") $(cpu "$then_controller_pid")"; }

# copy [tls]: the file sent over one TCP connection on loopback and written to node-2's disk.
copy() {
  local p out=$dir/copy.bin t0 t1
  p=$(port)
  sync
  python3 - "$p" "$out" "$certs" "${1:-}" "$((SIZE_MIB << 20))" <<'PY' &
import os, socket, ssl, sys
port, out, certs, tls = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(1)
c, _ = s.accept()
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{certs}/node-node-2.crt", f"{certs}/node-node-2.key")
    ctx.load_verify_locations(f"{certs}/ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    c = ctx.wrap_socket(c, server_side=True)
# Exactly the file's length, then on disk, then an answer: a TLS sender that closed at once would
# reset the connection over the session tickets it never read.
buf, left = bytearray(1 << 20), int(sys.argv[5])
with open(out, "wb") as f:
    while left and (n := c.recv_into(buf, min(left, len(buf)))):
        f.write(memoryview(buf)[:n])
        left -= n
    f.flush()
    os.fsync(f.fileno())
c.sendall(b"k")
c.close()
PY
  local rx=$!
  t0=$(now)
  python3 - "$p" "$dir/node-1/pools/default/volumes/src/data" "$certs" "${1:-}" <<'PY'
import socket, ssl, sys, time
port, src, certs, tls = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
for _ in range(100):
    try:
        s = socket.create_connection(("127.0.0.1", port))
        break
    except ConnectionRefusedError:
        time.sleep(0.01)
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(f"{certs}/node-node-1.crt", f"{certs}/node-node-1.key")
    ctx.load_verify_locations(f"{certs}/ca.crt")
    s = ctx.wrap_socket(s, server_hostname="node-2.cellar-agent")
with open(src, "rb") as f:
    s.sendfile(f)
s.recv(1)
s.close()
PY
  wait "$rx"
  t1=$(now)
  cmp -s "$dir/node-1/pools/default/volumes/src/data" "$out" || { echo "the copy differs" >&2; exit 1; }
  rm -f "$out"
  rate "$t0" "$t1"
}

# The two (with THEN_BIN three) ways alternate, so that all meet the same load on a shared machine.
direct=() relayed=() direct_cpu=() relayed_cpu=() old_relayed=() old_cpu=()
for i in $(seq "$RUNS"); do
  if [ -n "$then_bin" ]; then
    restore_then "$i"
    read -r r a b c <<<"$result"
    old_relayed+=("$r") old_cpu+=("$a $b $c")
  fi
  restore direct "$i"
  read -r r a b c <<<"$result"
  direct+=("$r") direct_cpu+=("$a $b $c")
  restore via-controller "$i"
  read -r r a b c <<<"$result"
  relayed+=("$r") relayed_cpu+=("$a $b $c")
done
direct_runs=${direct[*]} relayed_runs=${relayed[*]} old_relayed_runs=${old_relayed[*]:-}
plain=$(for _ in $(seq "$RUNS"); do copy; done | xargs)
tlscopy=$(for _ in $(seq "$RUNS"); do copy tls; done | xargs)

echo "== CPU seconds per restore: source node, target node, controller"
echo "direct: $(means "${direct_cpu[@]}")"
echo "through the controller: $(means "${relayed_cpu[@]}")"
[ -z "$then_bin" ] || echo "through THEN_BIN's controller: $(means "${old_cpu[@]}")"
echo "== $SIZE_MIB MiB, MiB/s per run (median)"
printf '%-40s %s (%s)\n' "restore, node to node (direct)" "$direct_runs" "$(echo "$direct_runs" | median)"
printf '%-40s %s (%s)\n' "restore, through the controller" "$relayed_runs" "$(echo "$relayed_runs" | median)"
[ -z "$then_bin" ] || printf '%-40s %s (%s)\n' "restore, THEN_BIN's controller" "$old_relayed_runs" "$(echo "$old_relayed_runs" | median)"
printf '%-40s %s (%s)\n' "plain copy over TCP (python3)" "$plain" "$(echo "$plain" | median)"
printf '%-40s %s (%s)\n' "copy over TLS (python3 ssl)" "$tlscopy" "$(echo "$tlscopy" | median)"
