#!/usr/bin/env bash
# Renders deploy/cellar.yaml, the plain manifests for `kubectl apply`, from charts/cellar.
#
#   deploy/render.sh [OUT]      # default deploy/cellar.yaml; "-" writes to stdout
#
# The chart's default values in namespace cellar-system, except tls.generate=false: certificates
# rendered into a file would put one private key in every cluster that applies it, so the
# manifests expect the two TLS Secrets that deploy/gen-certs.sh makes. helm is $HELM, else the
# one on PATH. tests/chart.rs checks that deploy/cellar.yaml is what this script writes.
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
# The TLS Secrets are not in this file; make them first, then apply it:
#   deploy/gen-certs.sh | kubectl apply -f -
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
  "$helm" template cellar charts/cellar --namespace "$namespace" --set tls.generate=false
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
