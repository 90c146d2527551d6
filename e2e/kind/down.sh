#!/usr/bin/env bash
# Removes everything e2e/kind/up.sh made: the three kind clusters, the
# etcd container and the work directory (CAs, rendered manifests).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${FEDMESH_KIND_WORK:-target/kind}
for c in east west north; do
  if kind get clusters 2>/dev/null | grep -qx "fedmesh-$c"; then
    kind delete cluster --name "fedmesh-$c"
  fi
done
docker rm -f fedmesh-etcd >/dev/null 2>&1 || true
rm -rf "$WORK"
echo "removed the fedmesh kind rig"
