#!/usr/bin/env bash
# Reproduces the layout figures of docs/benchmarks.md on this machine: loop-backed btrfs and xfs
# pools, CreateVolume per layout (and bare mkfs for comparison), snapshots of volumes holding 1 GiB,
# and fio through an image volume against the pool's own filesystem, for a pool on xfs in a
# loop-mounted file and for a pool on the host's own disk filesystem. Run as root; needs fio
# (apt-get install fio). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null || { echo "fio is needed: apt-get install fio" >&2; exit 1; }
cargo build --release --quiet
bin=$PWD/target/release/cellar
dir=$(mktemp -d /var/tmp/cellar-layouts-XXXXXX)
loops=()
pid=
cleanup() {
  set +e
  [ -n "$pid" ] && kill "$pid" && wait "$pid" 2>/dev/null
  for m in $(findmnt -rn -o TARGET | grep "^$dir" | sort -r); do umount "$m"; done
  # Image volumes still attached (a failed run) keep the pool busy: detach them, then unmount again.
  for l in $(losetup -a | grep "$dir/.*/pool" | cut -d: -f1); do losetup -d "$l"; done
  sleep 0.2
  for m in $(findmnt -rn -o TARGET | grep "^$dir" | sort -r); do umount "$m"; done
  for l in "${loops[@]}"; do losetup -d "$l"; done
  rm -rf "$dir"
}
trap cleanup EXIT

mkpool() { # kind size_gib
  truncate -s "$2G" "$dir/$1.img"
  case $1 in btrfs) mkfs.btrfs -q -f "$dir/$1.img" ;; xfs) mkfs.xfs -q -f "$dir/$1.img" ;; esac
  # Direct I/O: the loop-backed pool stands for a disk, so its I/O goes to the disk, not the page cache.
  local dev; dev=$(losetup --find --show --direct-io=on "$dir/$1.img"); loops+=("$dev")
  mkdir -p "$dir/$1"; mount "$dev" "$dir/$1"
}
mkpool btrfs 24
mkpool xfs 24
cat > "$dir/pools.yaml" <<YAML
pools:
  - name: b
    path: $dir/btrfs/pool
    layout: btrfs
  - name: i
    path: $dir/xfs/pool
    layout: image
    fsType: ext4
  - name: d
    path: $dir/xfs/dirpool
    layout: dir
  - name: r
    path: $dir/rootpool
    layout: image
    fsType: ext4
YAML
CELLAR_LOG=warn "$bin" all-in-one --endpoint "unix://$dir/csi.sock" --node-id bench --data-dir "$dir/data" \
  --config "$dir/pools.yaml" 2>"$dir/driver.log" &
pid=$!
for _ in $(seq 100); do [ -S "$dir/csi.sock" ] && break; sleep 0.05; done
csi() { "$bin" csi --endpoint "unix://$dir/csi.sock" "$@"; }

echo "== CreateVolume and lifecycle per layout (200 volumes of 64 MiB, 1 client)"
for p in d b i; do
  echo "-- pool $p"; csi bench --volumes 200 --size 64M --param pool=$p --work-dir "$dir" --prefix lc$p | grep -E "CreateVolume|DeleteVolume|total"
done

echo "== bare mkfs.ext4 of a 64 MiB file (the same options cellar uses), 50 runs"
times=()
for i in $(seq 50); do
  f="$dir/xfs/mkfs-$i.img"; truncate -s 64M "$f"
  s=$(date +%s%N); mkfs.ext4 -q -F -b 4096 -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 "$f"; e=$(date +%s%N)
  times+=($(( (e - s) / 1000 ))); rm -f "$f"
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "mkfs.ext4 p50 %.3f ms\n", a[int(NR/2)+1]/1000}'

echo "== snapshots of volumes holding 1 GiB (4 volumes of 1.5 GiB)"
for p in b i d; do
  echo "-- pool $p"; csi bench --volumes 4 --size 1536M --fill 1G --param pool=$p --work-dir "$dir" --prefix sn$p | grep -E "Snapshot"
done

# One fio job: rw, block size, queue depth; the target is a directory (a fio.dat file in it) or, with
# "file:PATH@OFFSET", 1 GiB of an existing file from that byte offset. Prints IOPS and mean latency.
fio_job() { # target label rw bs depth
  local target=$1 label=$2 rw=$3 bs=$4 depth=$5 where
  if [[ $target == file:* ]]; then where=${target#file:}; where=(--filename="${where%@*}" --offset="${where##*@}")
  else where=(--directory="$target" --filename=fio.dat); fi
  fio --name=b "${where[@]}" --size=1G --direct=1 --ioengine=libaio --iodepth="$depth" \
    --rw="$rw" --bs="$bs" --runtime=8 --time_based --output-format=terse --terse-version=3 > "$dir/fio.out"
  # terse v3: read bandwidth, IOPS and mean total latency are fields 7, 8, 40; for writes 48, 49, 81.
  awk -F';' -v label="$label" -v job="$rw $bs qd$depth" '{ if (job ~ /read/) { bw=$7; iops=$8; lat=$40 }
      else { bw=$48; iops=$49; lat=$81 }
      printf "%-11s %-20s %8.1f MiB/s %9d IOPS %8.1f us\n", label, job, bw/1024, iops, lat }' "$dir/fio.out"
}
run_fio() { # target label
  local job
  for job in "write 1M 16" "read 1M 16" "randwrite 4k 16" "randread 4k 16" "randwrite 4k 1" "randread 4k 1"; do
    # shellcheck disable=SC2086 # the job's words are three arguments
    fio_job "$1" "$2" $job
  done
}
compare_fio() { # pool where-the-pool-lives pool-path
  local id="local:bench:$1:io$1" img phys
  csi create "io$1" --size 3G --param pool="$1" >/dev/null
  mkdir -p "$dir/io-stage-$1" "$2/direct"
  csi stage "$id" "$dir/io-stage-$1" >/dev/null
  csi publish "$id" --staging-path "$dir/io-stage-$1" --target "$dir/io-target-$1" >/dev/null
  run_fio "$2/direct" pool
  rm -f "$2/direct/fio.dat"
  run_fio "$dir/io-target-$1" image
  # Where the test file sits inside the image: its first block, in bytes from the image's start.
  phys=$(filefrag -v "$dir/io-target-$1/fio.dat" | awk '$1 == "0:" { sub(/\.\..*/, "", $4); print $4 * 4096 }')
  csi unpublish "$id" "$dir/io-target-$1" >/dev/null
  csi unstage "$id" "$dir/io-stage-$1" >/dev/null
  # The same blocks of the pool, written directly: the volume's backing file at the test file's offset.
  # Where a file lands on this VM's virtual disk changes its speed by up to 2x (docs/benchmarks.md), so
  # this row is the like-for-like baseline; the fio.dat row above is the plain one.
  img=$(find "$3/volumes" -maxdepth 1 -type f ! -name '*.json' | head -n1)
  run_fio "file:$img@$phys" same-blocks
  csi delete "$id" >/dev/null
}
echo "kernel $(uname -r); guest halt polling $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo n/a) ns"
echo "== fio: a pool on xfs in a loop-mounted file (direct I/O) vs an image volume (ext4 in a file on it)"
compare_fio i "$dir/xfs" "$dir/xfs/pool"
echo "== fio: a pool on the host's own disk filesystem ($(findmnt -no FSTYPE --target "$dir")) vs an image volume on it"
compare_fio r "$dir" "$dir/rootpool"
