# syntax=docker/dockerfile:1
#
# The cellar image: the driver and exactly the tools it runs.
#
#   docker build -t cellar:dev .
#
# Without a container engine or a registry, deploy/image/build-rootfs.sh builds the same image
# (same Debian release, same packages, same binary path) with debootstrap and umoci; tests/image.rs
# fails when the package lists of the two builds differ. See docs/install.md.

# ---- build: the release binary, on the same Debian release as the runtime (same glibc) ----
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what the build reads, so edits to docs, charts or tests do not rebuild the binary.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# protoc comes vendored (protoc-bin-vendored): no system protobuf compiler is needed.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/cellar /cellar

# ---- runtime ----
FROM debian:bookworm-slim
# - util-linux, mount: mount(8) for shared filesystems, losetup and findmnt for operators;
# - e2fsprogs, xfsprogs, btrfs-progs: mkfs, resize2fs, e2fsck, xfs_growfs, btrfs (the layouts);
# - nfs-common, glusterfs-client, ceph-common, cifs-utils: the mount helpers (mount.nfs,
#   mount.glusterfs, mount.ceph, mount.cifs) of the shared filesystems docs/shared.md names;
# - ca-certificates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       util-linux \
       mount \
       e2fsprogs \
       xfsprogs \
       btrfs-progs \
       nfs-common \
       glusterfs-client \
       ceph-common \
       cifs-utils \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /cellar /usr/local/bin/cellar
# The node plugin runs privileged as root (it mounts); the controller needs root only to mount
# shared pools. The chart sets both.
ENTRYPOINT ["/usr/local/bin/cellar"]
