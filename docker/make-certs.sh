#!/bin/sh
# Make a throwaway test CA, one server certificate and one certificate per client and edge for
# FedPhD's gRPC links (mutual TLS; openssl only).
#
#   docker/make-certs.sh [--keep] [--clients N] [--edges M] OUT_DIR [HOST ...]
#   docker/make-certs.sh --issue PEER OUT_DIR
#
# The first form writes OUT_DIR/ca.pem (give it to every machine: tls.ca_cert),
# OUT_DIR/server.pem and OUT_DIR/server.key (the cloud's and the edges' tls.server_cert /
# tls.server_key), OUT_DIR/client-I.pem and .key for I in 0..N-1 (default N 4) and
# OUT_DIR/edge-J.pem and .key for J in 0..M-1 (default M 2): each peer's own identity,
# tls.client_cert / tls.client_key, given to that peer only. OUT_DIR/ca.key stays with whoever
# issues certificates; no process needs it. HOST: every name or IP address that edges and
# clients dial a server at (default: localhost 127.0.0.1); the server certificate is valid
# for exactly those, so add each machine's name, e.g. cloud.example.org edge-b.example.org.
# --keep: leave existing certificates alone (the compose test bed makes them once per volume).
#
# --issue PEER (client-N or edge-N): sign one more peer certificate with OUT_DIR/ca.key, e.g.
# for a client that joins later; revoke one by putting "client-N" or its SHA-256 fingerprint
# (openssl x509 -in OUT_DIR/client-N.pem -noout -fingerprint -sha256) on tls.deny.
#
# A test CA is for test beds and trials; a production deployment uses certificates from its
# own PKI (a peer certificate needs CN or a DNS name client-N / edge-N and clientAuth).
set -eu

usage() {
    echo "usage: $0 [--keep] [--clients N] [--edges M] OUT_DIR [HOST ...]" >&2
    echo "       $0 --issue client-N|edge-N OUT_DIR" >&2
    exit 2
}

keep=0 clients=4 edges=2 issue=""
while [ $# -gt 0 ]; do
    case $1 in
        --keep) keep=1; shift ;;
        --clients) [ $# -ge 2 ] || usage; clients=$2; shift 2 ;;
        --edges) [ $# -ge 2 ] || usage; edges=$2; shift 2 ;;
        --issue) [ $# -ge 2 ] || usage; issue=$2; shift 2 ;;
        -*) usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || usage
out=$1; shift
case $clients$edges in *[!0-9]*) echo "make-certs: --clients and --edges take numbers" >&2; exit 2 ;; esac
days=${FEDPHD_CERT_DAYS:-365}
mkdir -p "$out"  # before the umask: the folder and its certificates stay readable
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077  # private keys: owner only

# sign NAME SUBJECT_CN EXTENSIONS: OUT_DIR/NAME.key and OUT_DIR/NAME.pem, signed by the CA.
sign() {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/$1.key"
    openssl req -new -key "$out/$1.key" -subj "/CN=$2" -out "$work/$1.csr"
    # `openssl x509 -req` drops the request's extensions, so they come from a file.
    printf '%s\n' "$3" > "$work/$1.ext"
    openssl x509 -req -in "$work/$1.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" -sha256 -days "$days" \
        -extfile "$work/$1.ext" -out "$work/$1.pem" 2>/dev/null
    # Certificates are public: readable by every user of the machine or container.
    install -m 0644 "$work/$1.pem" "$out/$1.pem"
}

peer() {
    sign "$1" "$1" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=DNS:$1"
}

if [ -n "$issue" ]; then
    case $issue in
        client-*[!0-9]*|edge-*[!0-9]*|client-|edge-) bad=1 ;;
        client-*|edge-*) bad=0 ;;
        *) bad=1 ;;
    esac
    case $bad in
        1) echo "make-certs: --issue takes client-N or edge-N, not '$issue'" >&2; exit 2 ;;
    esac
    [ -s "$out/ca.key" ] || { echo "make-certs: no CA key $out/ca.key to sign with" >&2; exit 2; }
    peer "$issue"
    echo "make-certs: $out/$issue.pem and $out/$issue.key (give both to $issue only)"
    exit 0
fi

[ $# -gt 0 ] || set -- localhost 127.0.0.1
if [ "$keep" = 1 ] && [ -s "$out/ca.pem" ] && [ -s "$out/server.pem" ] && [ -s "$out/server.key" ]; then
    echo "make-certs: keeping the certificates in $out"
    exit 0
fi

# subjectAltName: IP addresses as IP entries, everything else as DNS names.
san=""
for host in "$@"; do
    case $host in
        *[!0-9.]*) case $host in *:*) entry="IP:$host" ;; *) entry="DNS:$host" ;; esac ;;
        *) entry="IP:$host" ;;
    esac
    san="${san:+$san,}$entry"
done

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=FedPhD test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$work/ca.pem"
install -m 0644 "$work/ca.pem" "$out/ca.pem"

sign server "$1" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
i=0
while [ "$i" -lt "$clients" ]; do peer "client-$i"; i=$((i + 1)); done
i=0
while [ "$i" -lt "$edges" ]; do peer "edge-$i"; i=$((i + 1)); done
echo "make-certs: CA $out/ca.pem, server certificate $out/server.pem for $san," \
    "$clients client and $edges edge certificates (client-I.pem, edge-J.pem)"
