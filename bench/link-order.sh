#!/usr/bin/env bash
# Makes link/lifecycle.order, the list of functions a release build lays out first (build.rs,
# docs/benchmarks.md "Code layout"): the functions a node driver runs for the volume life cycle and
# for the calls kubelet and the sidecars make all day, in all-in-one and in split mode.
#
#   sudo bench/link-order.sh                  # build, profile, write link/lifecycle.order
#   sudo CHECK=1 bench/link-order.sh          # how many of the file's names today's build has
#   sudo MEASURE=1 CELLAR_BIN=target/release/cellar bench/link-order.sh
#                                             # the same workloads, peak RSS of a build as it is
#
# Two workloads, each run by a driver started from BIN:
# - all-in-one: `cellar csi bench` with BACKGROUND published volumes and VOLUMES life cycles at 1
#   and 8 clients, then info, list, capacity, get and stats;
# - split mode: a controller (started from target/, not profiled) and one node from BIN, mutual TLS
#   with the node's own certificate; SPLIT_VOLUMES volumes created through the controller and
#   published on the node, SPLIT_VOLUMES life cycles beside them, the same queries, then cleanup.
#
# How the profile is taken: a release build without the order (CELLAR_LINK_ORDER=0, so that the
# old file does not shape the profile) is copied to a fresh ext4 image on a loop device with
# readahead off, which is mounted afresh before each workload, so none of its pages are in the page
# cache: the driver reads in only the pages it executes, and the kernel's fault-around (which maps
# only pages already cached) adds none. The pages of the binary present in /proc/PID/pagemap after
# each workload name the functions written out: those both ran, then each workload's own. The
# clients run from target/, another file. Run as root (loop device, mounts, pagemap); needs
# mkfs.ext4, nm, openssl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

VOLUMES=${VOLUMES:-1000}
BACKGROUND=${BACKGROUND:-1000}
SPLIT_VOLUMES=${SPLIT_VOLUMES:-200}
CHECK=${CHECK:-0}
MEASURE=${MEASURE:-0}
out=link/lifecycle.order

if [ "$(id -u)" -ne 0 ]; then
  echo "link-order: run as root (loop device, mounts, /proc/PID/pagemap)" >&2
  exit 2
fi
for tool in mkfs.ext4 losetup nm openssl python3; do
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

# shellcheck source=bench/split-lib.sh
. bench/split-lib.sh

if [ "$MEASURE" = 1 ]; then
  bin=$(realpath "${CELLAR_BIN:?MEASURE=1 needs CELLAR_BIN}")
else
  CELLAR_LINK_ORDER=0 cargo build --release --locked --quiet
  bin=$(realpath target/release/cellar)
fi

dir=$(mktemp -d /var/tmp/cellar-link-order-XXXXXX)
mkdir -p "$dir/mnt"
dev=
pids=()

stop() { for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
unmount_below() { # directory
  awk -v d="$1/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}
cleanup() {
  local rc=$?
  stop "${pids[@]}"
  unmount_below "$dir"
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

# The binary the drivers start: with MEASURE, BIN itself (read once, so cached as in production);
# else a copy on the loop device, none of whose pages are cached after `cold`.
if [ "$MEASURE" = 1 ]; then
  cat "$bin" >/dev/null
  driver_bin=$bin
  cold() { :; }
else
  truncate -s 256M "$dir/image"
  mkfs.ext4 -q "$dir/image"
  dev=$(losetup --find --show "$dir/image")
  echo 0 >"/sys/block/$(basename "$dev")/queue/read_ahead_kb"
  mount "$dev" "$dir/mnt"
  cp "$bin" "$dir/mnt/cellar"
  driver_bin=$dir/mnt/cellar
  # Unmounting drops the copy's pages from the page cache (no process may map it then).
  cold() { umount "$dir/mnt"; mount "$dev" "$dir/mnt"; }
fi

wait_socket() { # socket pid
  for _ in $(seq 200); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { echo "link-order: a driver exited (logs in $dir)" >&2; return 1; }
    sleep 0.05
  done
  echo "link-order: no socket $1" >&2
  return 1
}
peak() { awk '/VmHWM/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$1/status"; }

# Writes the binary's present pages (offsets from its load address) in PID's memory to FILE.
pages() { # pid file
  python3 - "$1" "$driver_bin" "$2" <<'EOF'
import struct, sys

pid, binary, out = sys.argv[1], sys.argv[2], sys.argv[3]
maps = []
for line in open(f"/proc/{pid}/maps"):
    f = line.split()
    if len(f) >= 6 and f[5] == binary:
        start, end = (int(x, 16) for x in f[0].split("-"))
        maps.append((start, end, int(f[2], 16)))
base = min(start - offset for start, _, offset in maps)
present = []
with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
    for start, end, _ in maps:
        pagemap.seek(start // 4096 * 8)
        entries = pagemap.read((end - start) // 4096 * 8)
        for i in range(len(entries) // 8):
            if struct.unpack_from("<Q", entries, i * 8)[0] >> 63:
                present.append((start - base) // 4096 + i)
with open(out, "w") as o:
    o.write("\n".join(map(str, present)) + "\n")
print(f"{len(present)} pages of the binary present", file=sys.stderr)
EOF
}

# Three rounds of what kubelet, the sidecars and an operator ask beside the life cycle.
queries() { # controller-client node-client volume-id published-path
  for _ in 1 2 3; do
    "$2" info >/dev/null
    "$1" list >/dev/null
    "$1" capacity >/dev/null
    "$1" get "$3" >/dev/null
    "$2" stats "$3" "$4" >/dev/null
  done
}

# Workload 1: all-in-one.
cold
mkdir -p "$dir/aio/fs" "$dir/aio/work" "$dir/aio/stage" "$dir/aio/target"
sock=$dir/aio/csi.sock
CELLAR_LOG=warn "$driver_bin" all-in-one --endpoint "unix://$sock" --node-id order \
  --data-dir "$dir/aio/fs" 2>"$dir/aio/driver.log" &
driver=$!
pids+=("$driver")
wait_socket "$sock" "$driver"
csi() { "$bin" csi --endpoint "unix://$sock" "$@"; }
for clients in 1 8; do
  csi bench --volumes "$VOLUMES" --concurrency "$clients" --background "$BACKGROUND" \
    --work-dir "$dir/aio/work" --driver-pid "$driver" --prefix "c$clients" >"$dir/aio/bench-$clients.txt"
done
echo "all-in-one: peak RSS $(peak "$driver") after $VOLUMES life cycles at 1 and 8 clients beside $BACKGROUND published"
id=$(csi create order-probe --size 1G)
csi stage "$id" "$dir/aio/stage" >/dev/null
csi publish "$id" --staging-path "$dir/aio/stage" --target "$dir/aio/target/v" >/dev/null
queries csi csi "$id" "$dir/aio/target/v"
csi unpublish "$id" "$dir/aio/target/v" >/dev/null
csi unstage "$id" "$dir/aio/stage" >/dev/null
csi delete "$id" >/dev/null
if [ "$MEASURE" != 1 ]; then pages "$driver" "$dir/pages-aio"; fi
stop "$driver"
unmount_below "$dir/aio"

# Workload 2: split mode, one node.
cold
certs=$dir/certs
split_certs "$certs" node-1
registry=$(port)
agent=$(port)
mkdir -p "$dir/split/controller" "$dir/split/node" "$dir/split/stage" "$dir/split/target"
# shellcheck disable=SC2046
CELLAR_LOG=warn "$bin" controller --endpoint "unix://$dir/split/controller.sock" \
  --agent-listen "127.0.0.1:$registry" --data-dir "$dir/split/controller" --require-node-certificates \
  $(tls controller) 2>"$dir/split/controller.log" &
pids+=("$!")
# shellcheck disable=SC2046
CELLAR_LOG=warn "$driver_bin" node --endpoint "unix://$dir/split/node.sock" --node-id node-1 \
  --data-dir "$dir/split/node" --controller "localhost:$registry" --agent-listen "127.0.0.1:$agent" \
  --agent-advertise "127.0.0.1:$agent" $(tls node-node-1) 2>"$dir/split/node.log" &
node=$!
pids+=("$node")
wait_socket "$dir/split/node.sock" "$node"
ctl() { "$bin" csi --endpoint "unix://$dir/split/controller.sock" "$@"; }
nd() { "$bin" csi --endpoint "unix://$dir/split/node.sock" "$@"; }
on=--topology=topology.cellar.csi.dev/node=node-1
# The first create succeeds once the node has registered and reported its pools.
ctl delete "$(until_registered ctl create split-probe --size 64M "$on")" >/dev/null
# A volume's life: create through the controller, stage and publish on the node.
up() { # name
  local id
  id=$(ctl create "$1" --size 64M "$on")
  mkdir -p "$dir/split/stage/$1"
  nd stage "$id" "$dir/split/stage/$1" >/dev/null
  nd publish "$id" --staging-path "$dir/split/stage/$1" --target "$dir/split/target/$1" >/dev/null
  echo "$id"
}
down() { # name id
  nd unpublish "$2" "$dir/split/target/$1" >/dev/null
  nd unstage "$2" "$dir/split/stage/$1" >/dev/null
  ctl delete "$2" >/dev/null
}
background=()
for i in $(seq "$SPLIT_VOLUMES"); do background+=("$(up "bg-$i")"); done
for i in $(seq "$SPLIT_VOLUMES"); do down "lc-$i" "$(up "lc-$i")"; done
queries ctl nd "${background[0]}" "$dir/split/target/bg-1"
echo "split mode: node's peak RSS $(peak "$node") after $SPLIT_VOLUMES life cycles beside $SPLIT_VOLUMES published"
for i in $(seq "$SPLIT_VOLUMES"); do down "bg-$i" "${background[$((i - 1))]}"; done
if [ "$MEASURE" != 1 ]; then pages "$node" "$dir/pages-split"; fi
stop "${pids[@]}"
pids=()
[ "$MEASURE" = 1 ] && exit 0

# The functions on the present pages: first those both workloads ran, then those of all-in-one
# only, then those of split mode only, each group in address order, so that each workload's code is
# two runs of consecutive pages.
python3 - "$driver_bin" "$dir/pages-aio" "$dir/pages-split" "$dir/order" <<'EOF'
import subprocess, sys

binary, aio_pages, split_pages, out = sys.argv[1:5]
aio, split = ({int(p) for p in open(f).read().split()} for f in (aio_pages, split_pages))
functions = []
for line in subprocess.check_output(["nm", "-S", "-n", "--defined-only", binary], text=True).splitlines():
    f = line.split(None, 3)
    if len(f) == 4 and f[2] in "tTW":
        addr, size = int(f[0], 16), max(int(f[1], 16), 1)
        functions.append((set(range(addr // 4096, (addr + size - 1) // 4096 + 1)), f[3]))
ran = [(bool(pages & aio), bool(pages & split), name) for pages, name in functions]
groups = [
    [name for a, s, name in ran if a and s],
    [name for a, s, name in ran if a and not s],
    [name for a, s, name in ran if s and not a],
]
names = list(dict.fromkeys(name for group in groups for name in group))
with open(out, "w") as o:
    o.write("\n".join(names) + "\n")
print(f"{len(aio | split)} pages present in either workload; functions: {len(groups[0])} in both, "
      f"{len(groups[1])} in all-in-one only, {len(groups[2])} in split mode only", file=sys.stderr)
EOF

{
  echo "# Made by bench/link-order.sh from $(git describe --always --dirty 2>/dev/null || echo '?'); build.rs"
  echo "# hands it to the linker. The functions a node driver ran for the volume life cycle, in"
  echo "# all-in-one and in split mode; lld lays them out first, in this order."
  cat "$dir/order"
} >"$out"
echo "wrote $out: $(grep -cv '^#' "$out") functions"
