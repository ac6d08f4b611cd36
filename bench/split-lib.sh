# Shared by the benchmarks that run split mode on loopback (bench/transfer.sh, bench/link-order.sh);
# sourced, not run. Needs openssl and python3, and deploy/gen-certs.sh from the working directory.

# split_certs DIR NODE...: in DIR, the CA and a certificate of each NODE's own (deploy/gen-certs.sh:
# node-NODE.crt/.key), and the controller's (controller.crt/.key), named localhost: the host the
# nodes dial.
split_certs() {
  local certs=$1
  shift
  local nodes=()
  for n in "$@"; do nodes+=(--node "$n"); done
  deploy/gen-certs.sh --out "$certs" "${nodes[@]}" >/dev/null 2>&1
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$certs/controller.key" 2>/dev/null
  openssl req -new -key "$certs/controller.key" -subj /CN=localhost -out "$certs/controller.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=DNS:localhost" >"$certs/controller.ext"
  openssl x509 -req -in "$certs/controller.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" -CAcreateserial \
    -days 2 -extfile "$certs/controller.ext" -out "$certs/controller.crt" 2>/dev/null
}

# tls NAME: the TLS flags of the party whose certificate is $certs/NAME.crt.
tls() { echo --tls-ca "$certs/ca.crt" --tls-cert "$certs/$1.crt" --tls-key "$certs/$1.key"; }

# A free TCP port on 127.0.0.1.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Runs a command until it succeeds (at most 20 s, e.g. until the nodes have registered with a
# (re)started controller), then prints what it printed.
until_registered() {
  for _ in $(seq 200); do
    if out=$("$@" 2>/dev/null); then echo "$out"; return; fi
    sleep 0.1
  done
  "$@"
}
