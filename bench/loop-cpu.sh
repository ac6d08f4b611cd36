#!/usr/bin/env bash
# Where the time of a write through a loop device goes on this machine: fio random 4 KiB writes on a
# file and on a loop device (direct I/O) over the same file, with fio free to move and pinned to each
# CPU in turn, at queue depth 1 and 16. Prints which CPU takes the disk's interrupts and whether idle
# CPUs poll before they halt. docs/benchmarks.md reads the figures. Run as root; needs fio.
set -euo pipefail
command -v fio >/dev/null || { echo "fio is needed: apt-get install fio" >&2; exit 1; }
dir=$(mktemp -d /var/tmp/cellar-loopcpu-XXXXXX)
dev=
cleanup() { set +e; [ -n "$dev" ] && losetup -d "$dev"; rm -rf "$dir"; }
trap cleanup EXIT

disk=$(findmnt -no SOURCE --target "$dir" | sed 's|^/dev/||')
echo "kernel $(uname -r); guest halt polling $(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo n/a) ns"
echo "interrupts of the disk's queues per CPU ($disk):"
grep -E "virtio|nvme|ahci" /proc/interrupts | grep -E "req|queue|nvme|ahci" || echo "  (none matched)"

# A 2 GiB file of written (not sparse, not unwritten) blocks: every write below is an overwrite.
dd if=/dev/urandom of="$dir/file" bs=4M count=512 oflag=direct status=none
dev=$(losetup --find --show --direct-io=on "$dir/file")
echo "loop device $dev, direct I/O $(cat "/sys/block/${dev#/dev/}/loop/dio")"

job() { # cpus target depth
  local pin=(); [ "$1" = any ] || pin=(taskset -c "$1")
  "${pin[@]}" fio --name=b --filename="$2" --offset=1G --size=1G --direct=1 --ioengine=libaio \
    --iodepth="$3" --rw=randwrite --bs=4k --runtime=6 --time_based --output-format=terse --terse-version=3 |
    awk -F';' '{ printf "%7d IOPS %7.1f us", $49, $81 }'
}
for depth in 1 16; do
  for cpus in any $(seq 0 $(( $(nproc) - 1 ))); do
    printf "qd%-3s fio on cpu %-4s file: %s   loop: %s\n" "$depth" "$cpus" "$(job "$cpus" "$dir/file" "$depth")" \
      "$(job "$cpus" "$dev" "$depth")"
  done
done
