#!/usr/bin/env bash
# Split mode at scale (docs/benchmarks.md, "Split mode at 1,000 nodes"): one release `cellar
# controller` against NODES simulated nodes (examples/scale.rs; tests/scale/sim.rs) with VOLUMES
# volumes each, all in one process on 127.0.0.1 ports, over real mutual TLS with a certificate per
# node, heartbeating into the controller. Prints CreateVolume p50/p99, a full ListVolumes (every
# page), GetCapacity and the controller's peak RSS (VmHWM), all through the controller's CSI socket.
#
# Defaults: NODES=1000 VOLUMES=100 CREATES=1000 PAGE=1000 LISTS=3 IDLE=10. CELLAR_BIN names a built
# controller (else both are built here, release); the example is taken from $CARGO_TARGET_DIR
# (default target)/release, where cargo builds it. Needs an open-file hard limit of 4 x NODES + 256
# (the example raises its soft limit; the controller inherits it). Runs as any user; cleans up.
set -euo pipefail
cd "$(dirname "$0")/.."
export NODES=${NODES:-1000} VOLUMES=${VOLUMES:-100} CREATES=${CREATES:-1000} PAGE=${PAGE:-1000} LISTS=${LISTS:-3}
release=${CARGO_TARGET_DIR:-target}/release
if [ -z "${CELLAR_BIN:-}" ]; then
  cargo build --release --quiet --bin cellar --example scale
  export CELLAR_BIN=$release/cellar
elif [ ! -x "$release/examples/scale" ]; then
  cargo build --release --quiet --example scale
fi
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$release/examples/scale"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
