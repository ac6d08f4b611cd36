#!/usr/bin/env bash
# Builds the cellar container image without a container engine or an image registry: a Debian
# bookworm root filesystem made with debootstrap, the runtime packages installed into it, the
# cellar binary added, written as an OCI image archive with umoci.
#
# It is the same image as the Dockerfile's runtime stages: the same Debian release and the same
# package lists (tests/image.rs fails when they differ): the full image, or with --local-only the
# Dockerfile's `local` target, without the shared filesystems' clients.
#
#   deploy/image/build-rootfs.sh --out DIR [--binary PATH] [--tag TAG] [--no-oci] [--local-only]
#                                [--mirror URL] [--security-mirror URL] [--cache DIR]
#
#   DIR/rootfs            the root filesystem (chroot into it to try the tools)
#   DIR/cellar-oci.tar    the OCI image archive (an OCI image layout in a tar), e.g.
#                         `skopeo copy oci-archive:DIR/cellar-oci.tar docker://REGISTRY/cellar:TAG`
#                         or `ctr -n k8s.io images import DIR/cellar-oci.tar`
#
# Needs root (debootstrap, and file ownership in the image), debootstrap and umoci
# (`apt-get install debootstrap umoci`), and a Debian mirror (the default is deb.debian.org).
# Downloaded packages are cached in /var/cache/cellar-image/debs between builds.
set -euo pipefail

SUITE=bookworm
# The runtime packages of the Dockerfile's `local` stage:
# - util-linux, mount: mount(8), losetup and findmnt (for operators too);
# - e2fsprogs, xfsprogs, btrfs-progs: mkfs, resize2fs, e2fsck, xfs_growfs, btrfs (the layouts);
# - ca-certificates.
LOCAL_PACKAGES=(
  util-linux
  mount
  e2fsprogs
  xfsprogs
  btrfs-progs
  ca-certificates
)
# What its `full` stage adds: the mount helpers (mount.nfs, mount.glusterfs, mount.ceph,
# mount.cifs) of the shared filesystems docs/shared.md names.
SHARED_PACKAGES=(
  nfs-common
  glusterfs-client
  ceph-common
  cifs-utils
)
BINARY_PATH=/usr/local/bin/cellar

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

out="" binary="" tag="dev" oci=1 local_only=0
mirror="http://deb.debian.org/debian" security_mirror="http://deb.debian.org/debian-security"
cache=/var/cache/cellar-image/debs
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --security-mirror) security_mirror=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --no-oci) oci=0; shift ;;
    --local-only) local_only=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done
[ -n "$out" ] || { echo "--out DIR is required" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
[ -n "$binary" ] || binary="$here/../../target/release/cellar"
[ -x "$binary" ] || { echo "no cellar binary at $binary: run 'cargo build --release' or pass --binary" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "run as root: debootstrap and the image's file owners need it" >&2; exit 1; }
for tool in debootstrap $([ "$oci" -eq 1 ] && echo umoci); do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install $tool" >&2; exit 1; }
done

mkdir -p "$out" "$cache"
out=$(cd "$out" && pwd)
rootfs="$out/rootfs"
if [ -e "$rootfs" ] && [ -n "$(ls -A "$rootfs")" ]; then
  echo "$rootfs exists and is not empty: remove it or choose another --out" >&2
  exit 1
fi

# debootstrap mounts /proc and /sys inside the target while it installs and can leave them behind
# when it fails: whatever happens, nothing stays mounted under the rootfs.
unmount_under_rootfs() {
  local m
  # mountinfo field 5 is the mount point; deepest first.
  awk -v root="$rootfs" '$5 == root || index($5, root "/") == 1 {print $5}' /proc/self/mountinfo |
    sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
trap unmount_under_rootfs EXIT

PACKAGES=("${LOCAL_PACKAGES[@]}")
[ "$local_only" -eq 1 ] || PACKAGES+=("${SHARED_PACKAGES[@]}")

# debootstrap downloads straight into --cache-dir, with no partial file or lock of its own: two
# builds sharing the cache (the image tests run two at once) would copy each other's half-written
# .debs and fail extracting them. One build at a time fills and reads the cache.
exec 9>"$cache/.lock"
if ! flock -n 9; then
  echo "== waiting for $cache: another build is using it"
  flock 9
fi
echo "== debootstrap $SUITE into $rootfs"
packages=$(IFS=,; echo "${PACKAGES[*]}")
debootstrap --variant=minbase --include="$packages" --cache-dir="$cache" \
  "$SUITE" "$rootfs" "$mirror" >"$out/debootstrap.log" 2>&1 || {
  tail -n 30 "$out/debootstrap.log" >&2
  echo "debootstrap failed; the whole log is $out/debootstrap.log" >&2
  exit 1
}
flock -u 9
unmount_under_rootfs

# debootstrap installs the release as published; bookworm-slim's apt sees the updates and security
# suites too, so the same upgrades go in here.
echo "== apt-get upgrade from $SUITE-updates and $SUITE-security"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
rm -f "$rootfs/etc/apt/sources.list"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get upgrade -y -qq && apt-get clean' \
  >>"$out/debootstrap.log" 2>&1 || { tail -n 30 "$out/debootstrap.log" >&2; echo "apt-get upgrade in the rootfs failed" >&2; exit 1; }
unmount_under_rootfs
: >"$rootfs/etc/resolv.conf" # the container runtime provides it

# What bookworm-slim leaves out too: package lists, downloaded .debs, logs of the build.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/var/log/bootstrap.log "$rootfs"/var/log/apt/* "$rootfs"/var/log/dpkg.log \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
install -D -m 0755 "$binary" "$rootfs$BINARY_PATH"
echo "== rootfs ready: $(du -sh "$rootfs" | cut -f1), $(chroot "$rootfs" $BINARY_PATH --version)"

[ "$oci" -eq 1 ] || exit 0

echo "== OCI image cellar:$tag"
layout="$out/oci-layout"
bundle="$out/bundle"
rm -rf "$layout" "$bundle"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci config --image "$layout:$tag" \
  --config.entrypoint "$BINARY_PATH" \
  --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --config.workingdir / \
  --config.label "org.opencontainers.image.title=cellar" \
  --config.label "org.opencontainers.image.description=Kubernetes CSI driver for node-local disks and shared filesystems" \
  --config.label "org.opencontainers.image.version=$tag" \
  --config.label "org.opencontainers.image.base.name=debian:$SUITE"
# An empty image unpacks to an empty bundle; the rootfs moves in and is repacked as one layer.
umoci unpack --image "$layout:$tag" "$bundle"
rmdir "$bundle/rootfs"
mv "$rootfs" "$bundle/rootfs"
restore_rootfs() { [ -d "$bundle/rootfs" ] && mv "$bundle/rootfs" "$rootfs"; rm -rf "$bundle"; }
trap 'restore_rootfs; unmount_under_rootfs' EXIT
umoci repack --image "$layout:$tag" "$bundle"
umoci gc --layout "$layout"
tar -C "$layout" -cf "$out/cellar-oci.tar" .
rm -rf "$layout"
echo "== $out/cellar-oci.tar ($(du -h "$out/cellar-oci.tar" | cut -f1))"
