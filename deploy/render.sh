#!/usr/bin/env bash
# Renders deploy/cellar.yaml, the plain manifests for `kubectl apply`, from charts/cellar.
#
#   deploy/render.sh [OUT]      # default deploy/cellar.yaml; "-" writes to stdout
#
# The chart's default values in namespace cellar-system. They render no key: the controller makes
# its cluster CA and its own certificate at its first start and the nodes enrol for theirs
# (docs/install.md, "Certificates"), so one file serves every cluster and no Secret has to be made
# first. helm is $HELM, else the one on PATH. tests/chart.rs checks that deploy/cellar.yaml is what
# this script writes.
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${HELM:-helm}
out=${1:-deploy/cellar.yaml}
namespace=cellar-system

render() {
  cat <<HEADER
# cellar: the driver's manifests, rendered from charts/cellar by deploy/render.sh with the chart's
# defaults (one local pool under /var/lib/cellar, StorageClass "cellar"). Do not edit: change the
# chart or use Helm (docs/install.md).
#
# No certificates to make first: the controller makes its cluster CA (Secret cellar-cluster-ca) and
# its own certificate when it starts, and each node enrols for a certificate naming its node.
#   kubectl apply -f deploy/cellar.yaml
---
apiVersion: v1
kind: Namespace
metadata:
  name: $namespace
  labels:
    # The node plugin is privileged (mounts, loop devices).
    pod-security.kubernetes.io/enforce: privileged
HEADER
  "$helm" template cellar charts/cellar --namespace "$namespace"
}

if [ "$out" = "-" ]; then
  render
else
  tmp=$(mktemp "$out.XXXXXX")
  trap 'rm -f "$tmp"' EXIT
  render >"$tmp"
  chmod 0644 "$tmp"
  mv "$tmp" "$out"
  trap - EXIT
  echo "wrote $out"
fi
