#!/usr/bin/env bash
# Reproduces the "backup listing" figures of docs/benchmarks.md: how long GetSnapshot of a backup
# takes when its repository holds N backups, side by side with `restic snapshots --json` on the
# same repository (what an operator runs to see the backups).
#
# A driver (all-in-one, one `dir` pool, one repository in a local directory) backs up a small
# `dir` volume N times, each until GetSnapshot says ready. Then, timed with the CLI client (its
# start included):
#   1. the first GetSnapshot after a restart of the driver: it reads every snapshot file of the
#      repository (what every GetSnapshot, ListSnapshots and backup answer cost before the driver
#      kept its listing);
#   2. CALLS GetSnapshot calls after it (median): each lists the repository and reads only the
#      snapshot files it has not read yet;
#   3. `restic snapshots --json` (median of 5): restic reads every snapshot file each time, and
#      derives the key from the password (scrypt) each time, which the driver does once.
#
# Needs: root is not needed; restic (Debian's), jq, python3. Cleans up on every exit.
#
#   bench/backup-list.sh                        # N=300, CALLS=20
#   N=50 CELLAR_BIN=target/debug/cellar bench/backup-list.sh    # a quick smoke run
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
N=${N:-300}
CALLS=${CALLS:-20}
for c in restic jq python3; do
  command -v "$c" >/dev/null || { echo "$c is missing" >&2; exit 1; }
done
if [ -z "${CELLAR_BIN:-}" ]; then
  cargo build --release --quiet
  CELLAR_BIN=${CARGO_TARGET_DIR:-target}/release/cellar
fi
bin=$(realpath "$CELLAR_BIN")
dir=$(mktemp -d /var/tmp/cellar-list-XXXXXX)
pid=
cleanup() {
  set +e
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

printf 'bench list password\n' >"$dir/key"
cat >"$dir/config.yaml" <<EOF
pools:
  - {name: dir, path: $dir/pool, layout: dir}
repositories:
  - {name: offsite, path: $dir/repo, passwordFile: $dir/key}
EOF
start() {
  CELLAR_LOG=${CELLAR_LOG:-warn} "$bin" all-in-one --endpoint "unix://$dir/csi.sock" --node-id bench \
    --data-dir "$dir/data" --config "$dir/config.yaml" 2>>"$dir/driver.log" &
  pid=$!
  for _ in $(seq 200); do [ -S "$dir/csi.sock" ] && return; sleep 0.05; done
  echo "the driver did not start" >&2
  exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; rm -f "$dir/csi.sock"; }
csi() { "$bin" csi --endpoint "unix://$dir/csi.sock" -o json "$@"; }
now() { date +%s.%N; }
ms_since() { python3 -c "import sys; print(f'{(float(sys.argv[2]) - float(sys.argv[1])) * 1000:.0f}')" "$1" "$(now)"; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

start
vol=$(csi create list-src --size 16M --param pool=dir | jq -r .volume_id)
first=
for i in $(seq "$N"); do
  id=$(csi snapshot "backup-$i" "$vol" --param backupRepository=offsite | jq -r .snapshot_id)
  until csi get-snapshot "$id" | jq -e .ready_to_use >/dev/null; do sleep 0.05; done
  first=${first:-$id}
done
stop
start
t=$(now)
csi get-snapshot "$first" >/dev/null
cold=$(ms_since "$t")
warm=
for _ in $(seq "$CALLS"); do
  t=$(now)
  csi get-snapshot "$first" >/dev/null
  warm="$warm $(ms_since "$t")"
done
stop
listed=$(restic --password-file "$dir/key" --no-cache -q -r "$dir/repo" snapshots --json | jq length)
[ "$listed" -ge "$N" ] || { echo "restic lists $listed snapshots, expected $N" >&2; exit 1; }
rst=
for _ in 1 2 3 4 5; do
  t=$(now)
  restic --password-file "$dir/key" --no-cache -q -r "$dir/repo" snapshots --json >/dev/null
  rst="$rst $(ms_since "$t")"
done
echo "backups in the repository: $N"
echo "cellar GetSnapshot, first after a start (reads every snapshot file): ${cold} ms"
echo "cellar GetSnapshot, later (median of $CALLS; reads new files only): $(echo "$warm" | median) ms"
echo "restic snapshots --json (median of 5): $(echo "$rst" | median) ms"
