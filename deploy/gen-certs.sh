#!/usr/bin/env bash
# Makes the certificates for mutual TLS between the cellar controller and the node agents, when
# they come neither from Helm (tls.generate) nor from cert-manager: a CA, the controller's
# certificate (named after its Service) and the nodes' certificate (named cellar-agent), each
# usable as server and client. Prints the two Secrets to apply, or writes the PEM files.
# --node NAME (repeatable) also makes a certificate of node NAME's own (NAME.cellar-agent; see
# docs/security.md, "Per-node certificates"), as Secret <fullname>-node-NAME-tls or DIR/node-NAME.*.
#
#   deploy/gen-certs.sh [--namespace cellar-system] [--release cellar] [--days 3650]
#                       [--cluster-domain cluster.local] [--out DIR] [--node NAME ...]
#
#   deploy/gen-certs.sh | kubectl apply -f -            # for a render with tls.generate=false
#
# --release is the Helm release name (the object names' prefix, "cellar" in deploy/cellar.yaml).
# With --out DIR: DIR/ca.crt, DIR/ca.key, DIR/controller.{crt,key}, DIR/node.{crt,key} and no
# Secrets. Keep ca.key offline (or delete it): nothing in the cluster needs it.
set -euo pipefail

namespace=cellar-system release=cellar days=3650 domain=cluster.local out="" nodes=()
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) namespace=$2; shift 2 ;;
    --release) release=$2; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --cluster-domain) domain=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --node) nodes+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "openssl is missing" >&2; exit 1; }

# The chart's names: <release>-cellar unless the release name contains "cellar".
case "$release" in *cellar*) fullname=$release ;; *) fullname=$release-cellar ;; esac
fullname=${fullname:0:40}; fullname=${fullname%-}
svc=$fullname-controller

# A node name becomes a DNS name in the certificate: a comma or a `*` would add names or a wildcard.
for n in "${nodes[@]}"; do
  [[ $n =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ && ${#n} -le 253 ]] ||
    { echo "--node $n: not a Kubernetes node name (lower-case letters, digits, '-' and '.')" >&2; exit 2; }
done
dir=${out:-$(mktemp -d)}
mkdir -p "$dir"
[ -n "$out" ] || trap 'rm -rf "$dir"' EXIT
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -days "$days" -subj "/CN=$fullname-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$dir/ca.crt" 2>/dev/null

# issue NAME CN SANS: a certificate for both ends of a TLS connection, signed by the CA.
issue() {
  local name=$1 cn=$2 sans=$3
  key "$dir/$name.key"
  openssl req -new -key "$dir/$name.key" -subj "/CN=$cn" -out "$dir/$name.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$sans" >"$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days "$days" -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}
issue controller "$svc.$namespace.svc" \
  "DNS:$svc,DNS:$svc.$namespace,DNS:$svc.$namespace.svc,DNS:$svc.$namespace.svc.$domain"
issue node cellar-agent "DNS:cellar-agent"
for n in "${nodes[@]}"; do issue "node-$n" "$n.cellar-agent" "DNS:$n.cellar-agent"; done
rm -f "$dir/ca.srl"

[ -z "$out" ] || { echo "wrote $dir/{ca,controller,node}.{crt,key} and one node-NAME.{crt,key} per --node" >&2; exit 0; }

b64() { base64 -w0 <"$1"; }
secret() {
  cat <<SECRET
---
apiVersion: v1
kind: Secret
metadata:
  name: $fullname-$1-tls
  namespace: $namespace
  labels:
    app.kubernetes.io/part-of: cellar
type: kubernetes.io/tls
data:
  ca.crt: $(b64 "$dir/ca.crt")
  tls.crt: $(b64 "$dir/$1.crt")
  tls.key: $(b64 "$dir/$1.key")
SECRET
}
secret controller
secret node
for n in "${nodes[@]}"; do secret "node-$n"; done
