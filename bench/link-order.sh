#!/usr/bin/env bash
# Makes link/lifecycle.order, the list of functions a release build lays out first (build.rs,
# docs/benchmarks.md "Code layout"): the functions a node driver runs for the volume life cycle and
# for the calls kubelet and the sidecars make all day.
#
#   sudo bench/link-order.sh            # build, profile, write link/lifecycle.order
#   sudo CHECK=1 bench/link-order.sh    # only say how many of the file's names today's build has
#
# How: a release build without the order (CELLAR_LINK_ORDER=0, so that the old file does not shape
# the profile) is copied to a fresh ext4 image on a loop device with readahead off and mounted
# afresh, so none of its pages are in the page cache. `cellar all-in-one` started from there reads
# in only the pages it executes: the kernel's fault-around maps nothing but pages already cached.
# The client (`cellar csi bench` with BACKGROUND published volumes and VOLUMES life cycles at 1 and
# 8 clients, then info, list, capacity, get and stats) runs from target/, another file. The pages
# of the driver's text present in /proc/PID/pagemap afterwards name the functions written out, in
# address order. Run as root (loop device, mounts, pagemap); needs mkfs.ext4, nm and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

VOLUMES=${VOLUMES:-1000}
BACKGROUND=${BACKGROUND:-1000}
CHECK=${CHECK:-0}
out=link/lifecycle.order

if [ "$(id -u)" -ne 0 ]; then
  echo "link-order: run as root (loop device, mounts, /proc/PID/pagemap)" >&2
  exit 2
fi
for tool in mkfs.ext4 losetup nm python3; do
  command -v "$tool" >/dev/null || { echo "link-order: $tool is missing" >&2; exit 2; }
done

if [ "$CHECK" = 1 ]; then
  cargo build --release --locked --quiet
  want=$(grep -cv '^#' "$out")
  have=$(nm --defined-only target/release/cellar | awk '{ print $3 }' | sort -u |
    comm -12 - <(grep -v '^#' "$out" | sort -u) | wc -l)
  echo "$have of the $want functions of $out are in target/release/cellar"
  exit 0
fi

CELLAR_LINK_ORDER=0 cargo build --release --locked --quiet
bin=target/release/cellar

dir=$(mktemp -d /var/tmp/cellar-link-order-XXXXXX)
mkdir -p "$dir/mnt" "$dir/fs" "$dir/work"
dev=
driver=

cleanup() {
  local rc=$?
  if [ -n "$driver" ]; then
    kill "$driver" 2>/dev/null || true
    wait "$driver" 2>/dev/null || true
  fi
  local m
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  if [ -n "$dev" ]; then losetup -d "$dev" 2>/dev/null || true; fi
  if [ "$(awk -v d="$dir/" 'index($5, d) == 1' /proc/self/mountinfo | wc -l)" -eq 0 ]; then
    rm -rf "$dir"
  else
    echo "link-order: mounts remain below $dir; not removing it" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

truncate -s 256M "$dir/image"
mkfs.ext4 -q "$dir/image"
dev=$(losetup --find --show "$dir/image")
echo 0 >"/sys/block/$(basename "$dev")/queue/read_ahead_kb"
mount "$dev" "$dir/mnt"
cp "$bin" "$dir/mnt/cellar"
# Unmounting drops the copy's pages from the page cache.
umount "$dir/mnt"
mount "$dev" "$dir/mnt"

sock="$dir/csi.sock"
CELLAR_LOG=warn "$dir/mnt/cellar" all-in-one --endpoint "unix://$sock" --node-id order \
  --data-dir "$dir/fs" 2>"$dir/driver.log" &
driver=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { cat "$dir/driver.log" >&2; exit 1; }

csi() { "$bin" csi --endpoint "unix://$sock" "$@"; }
for clients in 1 8; do
  csi bench --volumes "$VOLUMES" --concurrency "$clients" --background "$BACKGROUND" \
    --work-dir "$dir/work" --driver-pid "$driver" --prefix "c$clients" >"$dir/bench-$clients.txt"
done
id=$(csi create order-probe --size 1G)
mkdir -p "$dir/stage" "$dir/target"
csi stage "$id" "$dir/stage" >/dev/null
csi publish "$id" --staging-path "$dir/stage" --target "$dir/target/v" >/dev/null
for _ in 1 2 3; do
  csi info >/dev/null
  csi list >/dev/null
  csi capacity >/dev/null
  csi get "$id" >/dev/null
  csi stats "$id" "$dir/target/v" >/dev/null
done
csi unpublish "$id" "$dir/target/v" >/dev/null
csi unstage "$id" "$dir/stage" >/dev/null
csi delete "$id" >/dev/null

python3 - "$driver" "$dir/mnt/cellar" "$dir/order" <<'EOF'
import struct, subprocess, sys

pid, binary, out = sys.argv[1], sys.argv[2], sys.argv[3]
maps = []
for line in open(f"/proc/{pid}/maps"):
    f = line.split()
    if len(f) >= 6 and f[5] == binary:
        start, end = (int(x, 16) for x in f[0].split("-"))
        maps.append((start, end, int(f[2], 16)))
base = min(start - offset for start, _, offset in maps)
present = set()
with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
    for start, end, _ in maps:
        pagemap.seek(start // 4096 * 8)
        entries = pagemap.read((end - start) // 4096 * 8)
        for i in range(len(entries) // 8):
            if struct.unpack_from("<Q", entries, i * 8)[0] >> 63:
                present.add((start - base) // 4096 + i)
names = []
for line in subprocess.check_output(["nm", "-S", "-n", "--defined-only", binary], text=True).splitlines():
    f = line.split(None, 3)
    if len(f) == 4 and f[2] in "tTW":
        addr, size = int(f[0], 16), max(int(f[1], 16), 1)
        if any(page in present for page in range(addr // 4096, (addr + size - 1) // 4096 + 1)):
            names.append(f[3])
with open(out, "w") as o:
    o.write("\n".join(dict.fromkeys(names)) + "\n")
print(f"{len(present)} pages of the binary present, {len(names)} functions on them", file=sys.stderr)
EOF

{
  echo "# Made by bench/link-order.sh from $(git describe --always --dirty 2>/dev/null || echo '?'); build.rs"
  echo "# hands it to the linker. The functions the node driver ran for $VOLUMES volume life cycles"
  echo "# beside $BACKGROUND published volumes; lld lays them out first, in this order."
  cat "$dir/order"
} >"$out"
echo "wrote $out: $(grep -cv '^#' "$out") functions"
grep -h 'peak RSS' "$dir"/bench-*.txt | sed 's/^/unordered build, /'
