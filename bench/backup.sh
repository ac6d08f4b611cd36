#!/usr/bin/env bash
# Reproduces the backup figures of docs/benchmarks.md: cellar's backups into a restic-format
# repository side by side with `restic backup` / `restic restore` of the same data on the same
# machine, for an image volume (pool on a loop-mounted xfs, `layout: image`, ext4 inside, filled
# with random data) and for a `dir` volume holding a tree of files (random contents, mixed sizes).
#
# Per run and per layout, into fresh repositories (one for cellar, one for restic):
#   1. first backup: cellar CreateSnapshot (backupRepository) until GetSnapshot says ready_to_use;
#      restic backup of the same image file / the same directory;
#   2. restore: cellar CreateVolume from the backup (no keepLocal, so it reads the repository);
#      restic restore into a new directory on the same filesystem, then sync -f;
#   3. 1% of the volume changed (10 runs of 1 MiB at random places in the image's data file; whole
#      files of the tree rewritten with new contents), then a second backup by each, and how much
#      each repository grew (du -sb).
# The two tools take turns (cellar first on odd runs, restic first on even ones), and the page cache
# is dropped before every timed step, so both read their sources from disk.
#
# Needs: root, restic (Debian's, apt-get install restic), xfsprogs, e2fsprogs, python3, jq, and
# about 12 GiB free under /var/tmp (a sparse xfs image). Cleans up everything it makes (driver,
# mounts, loop devices, the directory) on every exit, failures included.
#
#   sudo bench/backup.sh                           # RUNS=3, 1 GiB
#   sudo RUNS=1 SIZE_MIB=128 CELLAR_BIN=target/debug/cellar bench/backup.sh   # a quick smoke run
#   LAYOUTS="image" / LAYOUTS="dir"                # one layout only
#   POLL=getsnapshot                               # see below
#   CELLAR_LOG=info DRIVER_LOG=/tmp/driver.log     # keep the driver's log (upload times at info)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
LAYOUTS=${LAYOUTS:-"image dir"}
DROP_CACHES=${DROP_CACHES:-1}
# How the end of a backup is seen: "record" watches the node's snapshot record, then asks
# GetSnapshot once; "getsnapshot" asks GetSnapshot every 0.1 s, and each call opens the repository
# (its key derivation costs the driver about 0.3 CPU-s), which slows the upload it waits for.
POLL=${POLL:-record}
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, mounts)" >&2; exit 1; }
for c in restic mkfs.xfs mkfs.ext4 python3 jq losetup; do
  command -v "$c" >/dev/null || { echo "$c is missing" >&2; exit 1; }
done
if [ -z "${CELLAR_BIN:-}" ]; then
  nice cargo build --release --quiet
  CELLAR_BIN=${CARGO_TARGET_DIR:-target}/release/cellar
fi
bin=$(realpath "$CELLAR_BIN")
dir=$(mktemp -d /var/tmp/cellar-backup-XXXXXX)
pid=
xfs_loop=
cleanup() {
  set +e
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  for m in $(findmnt -rn -o TARGET | grep "^$dir" | sort -r); do umount "$m"; done
  # Image volumes still attached (a failed run) keep the pool busy: detach them, then unmount again.
  for l in $(losetup -a | grep "$dir/" | grep -v "$dir/xfs.img" | cut -d: -f1); do losetup -d "$l"; done
  sleep 0.2
  for m in $(findmnt -rn -o TARGET | grep "^$dir" | sort -r); do umount "$m"; done
  [ -n "$xfs_loop" ] && losetup -d "$xfs_loop"
  [ -n "${DRIVER_LOG:-}" ] && cp "$dir/driver.log" "$DRIVER_LOG"
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The pool and every repository live on one xfs in a sparse file, attached with direct I/O so that
# its I/O reaches the disk (as layouts.sh does).
truncate -s 12G "$dir/xfs.img"
mkfs.xfs -q -f "$dir/xfs.img"
xfs_loop=$(losetup --find --show --direct-io=on "$dir/xfs.img")
fs=$dir/fs
mkdir -p "$fs"
mount "$xfs_loop" "$fs"
mkdir -p "$fs/repos" "$fs/restic-out" "$dir/mnt"
printf 'bench backup password\n' >"$dir/key"

{
  echo "pools:"
  echo "  - {name: img, path: $fs/img-pool, layout: image, fsType: ext4}"
  echo "  - {name: dir, path: $fs/dir-pool, layout: dir}"
  echo "repositories:"
  for l in image dir; do
    for i in $(seq "$RUNS"); do
      echo "  - {name: $l-$i, path: $fs/repos/cellar-$l-$i, passwordFile: $dir/key}"
    done
  done
} >"$dir/config.yaml"
CELLAR_LOG=${CELLAR_LOG:-warn} "$bin" all-in-one --endpoint "unix://$dir/csi.sock" --node-id bench \
  --data-dir "$dir/data" --config "$dir/config.yaml" 2>"$dir/driver.log" &
pid=$!
for _ in $(seq 200); do [ -S "$dir/csi.sock" ] && break; sleep 0.05; done
csi() { "$bin" csi --endpoint "unix://$dir/csi.sock" -o json "$@"; }
rst() { restic --password-file "$dir/key" --no-cache -q "$@"; }

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
drop() { sync; [ "$DROP_CACHES" = 1 ] && echo 3 >/proc/sys/vm/drop_caches; true; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mibs() { python3 -c "import sys; print(f'{float(sys.argv[1]) / 1048576 / float(sys.argv[2]):.0f}')" "$1" "$2"; }
pct() { python3 -c "import sys; print(f'{100 * float(sys.argv[1]) / float(sys.argv[2]):.1f}')" "$1" "$2"; }
repo_bytes() { du -sb "$1" | cut -f1; }

# --- the data ------------------------------------------------------------------------------------

# The image volume: SIZE_MIB, its ext4 filled with one file of random data (all but 16 MiB of what
# df says is free), written through the published mount as a pod would.
img_id=$(csi create bench-img --size "${SIZE_MIB}M" --param pool=img | jq -r .volume_id)
img_file=$fs/img-pool/volumes/${img_id##*:}
publish() { # volume-id name
  mkdir -p "$dir/mnt/$2-stage"
  csi stage "$1" "$dir/mnt/$2-stage" >/dev/null
  csi publish "$1" --staging-path "$dir/mnt/$2-stage" --target "$dir/mnt/$2" >/dev/null
}
unpublish() { # volume-id name
  csi unpublish "$1" "$dir/mnt/$2" >/dev/null
  csi unstage "$1" "$dir/mnt/$2-stage" >/dev/null
}
# The tree volume: files of mixed sizes (nine in ten between 512 B and 128 KiB, the rest between
# 128 KiB and 32 MiB, log-uniform), random contents, in 4 x 8 directories, SIZE_MIB in all.
dir_id=$(csi create bench-dir --size "$((SIZE_MIB * 2))M" --param pool=dir | jq -r .volume_id)
tree=$fs/dir-pool/volumes/${dir_id##*:}
if [[ " $LAYOUTS " == *" image "* ]]; then
  publish "$img_id" img
  free=$(df --output=avail -B1M "$dir/mnt/img" | tail -1)
  head -c "$((free - 16))M" /dev/urandom >"$dir/mnt/img/data"
  unpublish "$img_id" img
fi
if [[ " $LAYOUTS " == *" dir "* ]]; then
  python3 - "$tree" "$((SIZE_MIB << 20))" <<'PY'
import math, os, random, sys
root, total = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
def size():
    lo, hi = (512, 128 << 10) if rng.random() < 0.9 else (128 << 10, 32 << 20)
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
n = 0
while total > 0:
    d = os.path.join(root, f"d{n % 4}", f"e{n % 32 // 4}")
    os.makedirs(d, exist_ok=True)
    s = min(size(), total)
    with open(os.path.join(d, f"f{n:05}"), "wb") as f:
        f.write(os.urandom(s))
    total -= s
    n += 1
print(f"tree: {n} files")
PY
fi
sync
img_bytes=$(stat -c %s "$img_file")
tree_bytes=$(find "$tree" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')

# 1% of the volume changed: 10 MiB of a GiB. In the image, runs of 1 MiB at random 1 MiB-aligned
# places of its data file (through the mount); in the tree, whole files of at most 2 MiB rewritten
# with new random contents (same sizes) until 1% of the tree's bytes are new.
change() { # layout
  local budget=$((SIZE_MIB * 1048576 / 100))
  if [ "$1" = image ]; then
    publish "$img_id" img
    python3 - "$dir/mnt/img/data" "$budget" <<'PY'
import os, random, sys
path, budget = sys.argv[1], int(sys.argv[2])
mib = 1 << 20
blocks = os.path.getsize(path) // mib
with open(path, "r+b") as f:
    for b in random.sample(range(blocks), max(1, budget // mib)):
        f.seek(b * mib)
        f.write(os.urandom(mib))
    os.fsync(f.fileno())
PY
    unpublish "$img_id" img
  else
    python3 - "$tree" "$budget" <<'PY'
import os, random, sys
root, budget = sys.argv[1], int(sys.argv[2])
files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
random.shuffle(files)
for p in files:
    if budget <= 0:
        break
    s = os.path.getsize(p)
    if s > 2 << 20:
        continue
    with open(p, "r+b") as f:
        f.write(os.urandom(s))
    budget -= s
PY
  fi
  sync
}

# --- the timed steps; each prints seconds --------------------------------------------------------

cellar_backup() { # layout run name
  local id t0 vol
  vol=$([ "$1" = image ] && echo "$img_id" || echo "$dir_id")
  drop
  t0=$(now)
  id=$(csi snapshot "$3" "$vol" --param "backupRepository=$1-$2" | jq -r .snapshot_id)
  if [ "$POLL" = record ]; then
    # The node marks the snapshot's record uploaded (then, without keepLocal, removes it) once the
    # repository holds the backup, checked: watched on disk, which costs the driver nothing.
    local f pool
    pool=$fs/$([ "$1" = image ] && echo img || echo dir)-pool/snapshots
    while f=$(grep -l "${id##*:}" "$pool"/*.json 2>/dev/null) && [ "$(jq -r .backup.uploaded "$f" 2>/dev/null)" = false ]; do
      sleep 0.05
    done
  fi
  # Then GetSnapshot must say so (with POLL=getsnapshot, it is asked every 0.1 s from the start).
  until csi get-snapshot "$id" | jq -e .ready_to_use >/dev/null; do sleep 0.1; done
  since "$t0"
  echo "$id" >"$dir/last-backup"
}
restic_source() { [ "$1" = image ] && echo "$img_file" || echo "$tree"; }
restic_backup() { # layout run
  local repo=$fs/repos/restic-$1-$2 t0
  [ -d "$repo" ] || rst -r "$repo" init --repository-version 2 >/dev/null
  drop
  t0=$(now)
  rst -r "$repo" backup --host bench "$(restic_source "$1")" >/dev/null
  since "$t0"
}
cellar_restore() { # layout run
  local snap t0 id pool size
  snap=$(cat "$dir/backup-$1-$2")
  # The source's pool and size (an image restored into a larger volume would be grown).
  pool=$([ "$1" = image ] && echo img || echo dir)
  size=$([ "$1" = image ] && echo "$SIZE_MIB" || echo "$((SIZE_MIB * 2))")
  drop
  t0=$(now)
  id=$(csi create "restore-$1-$2" --size "${size}M" --param "pool=$pool" --from-snapshot "$snap" | jq -r .volume_id)
  since "$t0"
  # Checked once per run, outside the timing: the restored data is the source's.
  if [ "$1" = image ]; then
    cmp "$img_file" "$fs/img-pool/volumes/${id##*:}" >&2 || { echo "cellar restored other bytes" >&2; exit 1; }
  else
    diff -r -q "$tree" "$fs/dir-pool/volumes/${id##*:}" >&2 || { echo "cellar restored another tree" >&2; exit 1; }
  fi
  csi delete "$id" >/dev/null
}
restic_restore() { # layout run
  local repo=$fs/repos/restic-$1-$2 out=$fs/restic-out/$1-$2 t0 src
  drop
  t0=$(now)
  rst -r "$repo" restore latest --target "$out"
  sync -f "$out"
  since "$t0"
  src=$(restic_source "$1")
  if [ "$1" = image ]; then
    cmp -s "$src" "$out$src" || { echo "restic restored other bytes" >&2; exit 1; }
  else
    diff -r -q "$src" "$out$src" >&2 || { echo "restic restored another tree" >&2; exit 1; }
  fi
  rm -rf "$out"
}

declare -A fig
add() { fig[$1]="${fig[$1]:-} $2"; }
# measure KEY COMMAND...: runs a timed step and keeps what it prints; its failure ends the script.
measure() { local v; v=$("${@:2}"); add "$1" "$v"; }
for i in $(seq "$RUNS"); do
  for l in $LAYOUTS; do
    echo "== run $i, $l ($(cut -d' ' -f1-3 /proc/loadavg) load)" >&2
    cr=$fs/repos/cellar-$l-$i rr=$fs/repos/restic-$l-$i
    # Cellar first on odd runs, restic first on even ones.
    order="cellar restic"
    [ $((i % 2)) = 0 ] && order="restic cellar"
    for t in $order; do
      if [ $t = cellar ]; then
        measure "c-b1-$l" cellar_backup "$l" "$i" "b1-$l-$i"
        cp "$dir/last-backup" "$dir/backup-$l-$i"
      else
        measure "r-b1-$l" restic_backup "$l" "$i"
      fi
    done
    c1=$(repo_bytes "$cr") r1=$(repo_bytes "$rr")
    for t in $order; do
      if [ $t = cellar ]; then measure "c-rs-$l" cellar_restore "$l" "$i"; else measure "r-rs-$l" restic_restore "$l" "$i"; fi
    done
    change "$l"
    for t in $order; do
      if [ $t = cellar ]; then measure "c-b2-$l" cellar_backup "$l" "$i" "b2-$l-$i"; else measure "r-b2-$l" restic_backup "$l" "$i"; fi
    done
    add "c-g-$l" "$(($(repo_bytes "$cr") - c1))"
    add "r-g-$l" "$(($(repo_bytes "$rr") - r1))"
    add "c-repo-$l" "$c1"
    add "r-repo-$l" "$r1"
    # Measured: the next run's repositories need the room.
    rm -rf "$cr" "$rr"
    echo "   $(for k in c-b1 r-b1 c-rs r-rs c-b2 r-b2 c-g r-g; do v=${fig[$k-$l]}; printf '%s=%s ' "$k" "${v##* }"; done)" >&2
  done
done

echo "== cellar $("$bin" --version 2>/dev/null | head -1), $(restic version | cut -d' ' -f1-2), kernel $(uname -r), $(nproc) CPUs"
echo "== $RUNS runs; seconds per run (median); MiB/s from the median; growth of the repository by the second backup"
for l in $LAYOUTS; do
  bytes=$([ "$l" = image ] && echo "$img_bytes" || echo "$tree_bytes")
  echo "-- $l: $bytes bytes$([ "$l" = dir ] && echo " in $(find "$tree" -type f | wc -l) files")"
  for w in c r; do
    name=$([ $w = c ] && echo cellar || echo restic)
    b1=$(echo "${fig[$w-b1-$l]}" | median) rs=$(echo "${fig[$w-rs-$l]}" | median) b2=$(echo "${fig[$w-b2-$l]}" | median)
    g=$(echo "${fig[$w-g-$l]}" | median) repo=$(echo "${fig[$w-repo-$l]}" | median)
    printf '%-7s first backup %s s (%s) = %s MiB/s; restore %s s (%s) = %s MiB/s; repository %s bytes\n' \
      "$name" "$b1" "${fig[$w-b1-$l]# }" "$(mibs "$bytes" "$b1")" "$rs" "${fig[$w-rs-$l]# }" "$(mibs "$bytes" "$rs")" "$repo"
    printf '%-7s second backup (1%% changed) %s s (%s) = %s%% of the first; growth %s bytes (%s) = %s%% of the volume\n' \
      "$name" "$b2" "${fig[$w-b2-$l]# }" "$(pct "$b2" "$b1")" "$g" "${fig[$w-g-$l]# }" "$(pct "$g" "$((SIZE_MIB << 20))")"
  done
  cb1=$(echo "${fig[c-b1-$l]}" | median) rb1=$(echo "${fig[r-b1-$l]}" | median)
  crs=$(echo "${fig[c-rs-$l]}" | median) rrs=$(echo "${fig[r-rs-$l]}" | median)
  echo "cellar/restic throughput: backup $(pct "$rb1" "$cb1")%, restore $(pct "$rrs" "$crs")%"
done
