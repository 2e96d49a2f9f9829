#!/bin/sh
# Make a throwaway test CA and one server certificate for FedPhD's gRPC links (openssl only).
#
#   docker/make-certs.sh [--keep] OUT_DIR [HOST ...]
#
# Writes OUT_DIR/ca.pem (give it to every machine: tls.ca_cert), OUT_DIR/server.pem and
# OUT_DIR/server.key (the cloud's and the edges' tls.server_cert / tls.server_key) and
# OUT_DIR/ca.key (keep it to sign more; no process needs it). HOST: every name or IP address
# that edges and clients dial a server at (default: localhost 127.0.0.1); the certificate is
# valid for exactly those, so add each machine's name, e.g. cloud.example.org edge-b.example.org.
# --keep: leave existing certificates alone (the compose testbed makes them once per volume).
# A test CA is for test beds and trials; a production deployment uses certificates from its
# own PKI.
set -eu

keep=0
if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
if [ $# -lt 1 ]; then
    echo "usage: $0 [--keep] OUT_DIR [HOST ...]" >&2
    exit 2
fi
out=$1; shift
[ $# -gt 0 ] || set -- localhost 127.0.0.1
days=${FEDPHD_CERT_DAYS:-365}

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

mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077  # private keys: owner only

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=FedPhD test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$work/ca.pem"

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/server.key"
openssl req -new -key "$out/server.key" -subj "/CN=$1" -out "$work/server.csr"
# `openssl x509 -req` drops the request's extensions, so they come from a file.
cat > "$work/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$out/ca.key" \
    -CAcreateserial -CAserial "$work/ca.srl" -sha256 -days "$days" \
    -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null

# Certificates are public: readable by every user of the machine or container.
install -m 0644 "$work/ca.pem" "$out/ca.pem"
install -m 0644 "$work/server.pem" "$out/server.pem"
echo "make-certs: CA $out/ca.pem, server certificate $out/server.pem for $san"
