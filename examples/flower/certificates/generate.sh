#!/usr/bin/env bash
# Self-signed CA + SuperLink server certificate for a TLS test deployment (never commit the generated keys).
# Usage: ./generate.sh [SUPERLINK_HOST_OR_IP ...]     (default: localhost 127.0.0.1)
# Writes ca.crt / ca.key / server.pem / server.key / server.csr here. Production: use your organisation's CA.
set -euo pipefail
cd "$(dirname "$0")"
HOSTS=("${@:-localhost}")
[ "$#" -eq 0 ] && HOSTS=(localhost 127.0.0.1)
SAN=""
for h in "${HOSTS[@]}"; do
  if [[ "$h" =~ ^[0-9.]+$ || "$h" == *:* ]]; then SAN+="IP:${h},"; else SAN+="DNS:${h},"; fi
done
SAN="${SAN%,}"
openssl genrsa -out ca.key 4096
openssl req -new -x509 -key ca.key -sha256 -subj "/O=hetlora-test-ca/CN=hetlora-test-ca" -days 365 -out ca.crt
openssl genrsa -out server.key 4096
openssl req -new -key server.key -subj "/O=hetlora/CN=${HOSTS[0]}" -addext "subjectAltName=${SAN}" -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth" "$SAN") \
  -out server.pem
echo "SuperLink: --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key"
echo "SuperNodes and the flwr CLI: --root-certificates ca.crt (CLI: root-certificates in the connection)"
