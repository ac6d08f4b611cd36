# syntax=docker/dockerfile:1
#
# The cellar image: the driver and exactly the tools it runs. Two variants:
#
#   docker build -t cellar:dev .                           # full: local pools and shared filesystems
#   docker build --target local -t cellar:dev-local .      # local pools only (no NFS/GlusterFS/Ceph/CIFS clients)
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/cellar:TAG --push .
#
# The build stage runs on the machine's own platform and cross-compiles for the target one
# (TARGETARCH), so an arm64 image is not compiled under emulation. Only the runtime stages' package
# installation runs the target's binaries (apt-get's maintainer scripts, seconds under the builder's
# binfmt emulation).
#
# Without a container engine or a registry, deploy/image/build-rootfs.sh builds the same images
# (same Debian release, same packages, same binary path; --local-only for the local variant) with
# debootstrap and umoci; tests/image.rs fails when the package lists of the two builds differ. See
# docs/install.md.

# ---- build: the release binary, on the same Debian release as the runtime (same glibc) ----
FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG BUILDARCH
ARG TARGETARCH
WORKDIR /src
# A cross toolchain when the target is another architecture: rustc's target, and the C compiler and
# libc of that architecture for the crates with C parts (ring) and for linking.
RUN set -eu; \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      case "$TARGETARCH" in \
        arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; libc=libc6-dev-arm64-cross ;; \
        amd64) triple=x86_64-unknown-linux-gnu; gnu=x86-64-linux-gnu; libc=libc6-dev-amd64-cross ;; \
        *) echo "no cross toolchain for $TARGETARCH" >&2; exit 1 ;; \
      esac; \
      apt-get update; \
      apt-get install -y --no-install-recommends "gcc-$gnu" "$libc"; \
      rm -rf /var/lib/apt/lists/*; \
      rustup target add "$triple"; \
      echo "$triple" >/target-triple; \
      echo "$gnu" >/target-gnu; \
    fi
# Only what the build reads, so edits to docs, charts or tests do not rebuild the binary.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY link ./link
COPY src ./src
# protoc comes vendored (protoc-bin-vendored) and runs on the build machine: no system protobuf
# compiler is needed, for any target. One target cache serves every platform: cargo keeps each
# target's output under target/<triple>.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    if [ -f /target-triple ]; then \
      triple=$(cat /target-triple); gnu=$(cat /target-gnu); \
      env_triple=$(echo "$triple" | tr a-z- A-Z_); \
      export "CARGO_TARGET_${env_triple}_LINKER=$gnu-gcc"; \
      export "CC_$(echo "$triple" | tr - _)=$gnu-gcc" "AR_$(echo "$triple" | tr - _)=$gnu-ar"; \
      cargo build --release --locked --target "$triple"; \
      install -m 0755 "target/$triple/release/cellar" /cellar; \
    else \
      cargo build --release --locked; \
      install -m 0755 target/release/cellar /cellar; \
    fi

# ---- runtime, local pools only ----
FROM debian:bookworm-slim AS local
# - util-linux, mount: mount(8), losetup and findmnt (for operators too);
# - e2fsprogs, xfsprogs, btrfs-progs: mkfs, resize2fs, e2fsck, xfs_growfs, btrfs (the layouts);
# - ca-certificates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       util-linux \
       mount \
       e2fsprogs \
       xfsprogs \
       btrfs-progs \
       ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /cellar /usr/local/bin/cellar
# The node plugin runs privileged as root (it mounts); the controller needs root only to mount
# shared pools. The chart sets both.
ENTRYPOINT ["/usr/local/bin/cellar"]

# ---- runtime, full (the default): local pools and shared filesystems ----
FROM local AS full
# - nfs-common, glusterfs-client, ceph-common, cifs-utils: the mount helpers (mount.nfs,
#   mount.glusterfs, mount.ceph, mount.cifs) of the shared filesystems docs/shared.md names.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       nfs-common \
       glusterfs-client \
       ceph-common \
       cifs-utils \
    && rm -rf /var/lib/apt/lists/*
