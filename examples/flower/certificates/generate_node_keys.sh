#!/usr/bin/env bash
# One ECDSA P-384 key pair per SuperNode for SuperNode authentication (OpenSSH format, as Flower expects).
# Usage: ./generate_node_keys.sh N     -> keys/supernode_1 ... keys/supernode_N (+ .pub)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p keys
for i in $(seq 1 "${1:-2}"); do
  rm -f "keys/supernode_${i}" "keys/supernode_${i}.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "hetlora-supernode-${i}" -f "keys/supernode_${i}"
done
echo "Register each public key with the SuperLink: flwr supernode register keys/supernode_<i>.pub <connection>"
echo "Start each SuperNode with: --auth-supernode-private-key keys/supernode_<i>"
