#!/usr/bin/env bash
# Runs the multi-process e2e rig: e2e/run.sh [SCENARIO...] [--quick] [--json FILE] [--report drill.html]
# Builds fedmesh (with etcd) and fedmesh-e2e first; installs etcd (and
# nftables, for cuts inside the rig's network namespaces) when missing and
# this is Debian with root.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v etcd >/dev/null 2>&1 && [ ! -x /usr/bin/etcd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server >/dev/null
  else
    echo "etcd is required (Debian: apt-get install etcd-server)" >&2
    exit 2
  fi
fi
if ! command -v nft >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y nftables >/dev/null || true
fi
profile="${E2E_PROFILE:-release}"
flag=(); [ "$profile" = release ] && flag=(--release)
cargo build "${flag[@]}" -p fedmesh-cli -p fedmesh-e2e
exec "target/$profile/fedmesh-e2e" run "$@"
