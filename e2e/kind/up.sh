#!/usr/bin/env bash
# The three-cluster kind rig: creates fedmesh-east, fedmesh-west and
# fedmesh-north (kind-configs/), builds the fedmesh image and loads it,
# starts one etcd on the `kind` Docker network as the federation store,
# installs fedmesh in every cluster with the other two admitted as peers,
# deploys the sample app (injected) in east and west and exports it, then
# rehearses a gateway failure. Re-running it reuses what exists.
#
# Needs: docker, kind, kubectl, cargo. Not run on the development machine
# (no Docker there): see docs/kind.md for what was and was not run.
#
# Environment: FEDMESH_KIND_WORK (default target/kind) holds the CAs and
# rendered manifests; ETCD_IMAGE overrides the etcd image.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTERS=(east west north)
IMAGE=fedmesh:dev
ETCD_IMAGE=${ETCD_IMAGE:-gcr.io/etcd-development/etcd:v3.5.21}
WORK=${FEDMESH_KIND_WORK:-target/kind}
FEDMESH=target/release/fedmesh

say() { printf '== %s\n' "$*"; }
die() { printf 'up.sh: %s\n' "$*" >&2; exit 1; }

for cmd in docker kind kubectl cargo; do
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd is required (see docs/kind.md)"
done
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"

say "clusters"
for c in "${CLUSTERS[@]}"; do
  if kind get clusters 2>/dev/null | grep -qx "fedmesh-$c"; then
    echo "fedmesh-$c exists"
  else
    kind create cluster --config "kind-configs/$c.yaml" --wait 120s
  fi
done

say "image $IMAGE"
docker build -t "$IMAGE" .
for c in "${CLUSTERS[@]}"; do
  kind load docker-image "$IMAGE" --name "fedmesh-$c"
done

say "fedmesh CLI"
cargo build --release --locked -p fedmesh-cli

say "federation store (etcd on the kind network)"
if ! docker inspect fedmesh-etcd >/dev/null 2>&1; then
  docker run -d --name fedmesh-etcd --network kind "$ETCD_IMAGE" etcd \
    --name fedmesh-etcd --data-dir /var/lib/etcd \
    --listen-client-urls http://0.0.0.0:2379 \
    --advertise-client-urls http://fedmesh-etcd:2379 >/dev/null
fi
ETCD_IP=$(docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' fedmesh-etcd)
STORE="http://$ETCD_IP:2379"
echo "store $STORE"

say "trust: one root CA per cluster"
mkdir -p "$WORK"
for c in "${CLUSTERS[@]}"; do
  [ -f "$WORK/ca/$c/ca.key" ] || "$FEDMESH" ca init --trust-domain "$c.fedmesh.test" --out "$WORK/ca/$c" >/dev/null
done

say "install (each cluster admits the other two)"
for c in "${CLUSTERS[@]}"; do
  node_ip=$(docker inspect -f '{{.NetworkSettings.Networks.kind.IPAddress}}' "fedmesh-$c-control-plane")
  peers=()
  for p in "${CLUSTERS[@]}"; do
    [ "$p" = "$c" ] || peers+=(--peer "$p=$WORK/ca/$p/bundle.pem")
  done
  "$FEDMESH" install --cluster "$c" --trust-domain "$c.fedmesh.test" \
    --store "$STORE" --ca "$WORK/ca/$c" \
    --advertise "$node_ip:30443" --gateway-service-type NodePort --node-ports 30443,30444 \
    --gateway-replicas 1 --controller-replicas 2 \
    --clusterset-cidr 241.0.0.0/16 \
    --drill-operator "spiffe://$c.fedmesh.test/ns/demo/sa/drill" \
    --image "$IMAGE" --pull-policy Never \
    "${peers[@]}" >"$WORK/$c.yaml"
  kubectl --context "kind-fedmesh-$c" apply --server-side -f "$WORK/$c.yaml"
done
for c in "${CLUSTERS[@]}"; do
  kubectl --context "kind-fedmesh-$c" -n fedmesh-system rollout status deploy/fedmesh-controller --timeout 180s
  kubectl --context "kind-fedmesh-$c" -n fedmesh-system rollout status deploy/fedmesh-gateway --timeout 180s
done

say "sample app in east and west, exported"
for c in east west; do
  "$FEDMESH" inject --image "$IMAGE" --pull-policy Never --cluster "$c" --bundle "$WORK/ca/$c/bundle.pem" \
    -f e2e/kind/samples/app.yaml >"$WORK/app-$c.yaml"
  kubectl --context "kind-fedmesh-$c" apply -f "$WORK/app-$c.yaml"
  kubectl --context "kind-fedmesh-$c" apply -f e2e/kind/samples/export.yaml
done

say "federation"
"$FEDMESH" status --store "$STORE"

say "clusterset.local: north (which runs no echo) resolves echo.demo through its CoreDNS"
# The controller adds the forward to CoreDNS's Corefile; CoreDNS's reload
# and the ConfigMap volume take up to about two minutes together.
resolved=""
for _ in $(seq 1 36); do
  if kubectl --context kind-fedmesh-north run dnscheck --rm -i --restart=Never --quiet \
      --image=busybox:1.36 -- nslookup echo.demo.svc.clusterset.local 2>/dev/null | grep -q "Address: 241\."; then
    resolved=yes
    break
  fi
  sleep 5
done
if [ -z "$resolved" ]; then
  echo "echo.demo.svc.clusterset.local did not resolve in north" >&2
  kubectl --context kind-fedmesh-north -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}' >&2 || true
  exit 1
fi

gateway_status() {
  # The gateway's admin port through a port-forward, read by the CLI.
  local c=$1 port=$2
  kubectl --context "kind-fedmesh-$c" -n fedmesh-system port-forward deploy/fedmesh-gateway "$port:15021" >/dev/null 2>&1 &
  local pf=$!
  sleep 2
  "$FEDMESH" status --gateway "127.0.0.1:$port" || true
  kill "$pf" 2>/dev/null || true
}

say "failover drill: a Job in north calls drill-echo.demo (east and west serve it) through its sidecar; west blackholed through north's gateway"
for c in east west; do
  sed -e "s|IMAGE|$IMAGE|" -e "s|CLUSTER_NAME|$c|" e2e/kind/samples/drill-echo.yaml >"$WORK/drill-echo-$c.yaml"
  "$FEDMESH" inject --image "$IMAGE" --pull-policy Never --cluster "$c" --bundle "$WORK/ca/$c/bundle.pem" \
    -f "$WORK/drill-echo-$c.yaml" | kubectl --context "kind-fedmesh-$c" apply -f -
  kubectl --context "kind-fedmesh-$c" apply -f e2e/kind/samples/drill-export.yaml
done
"$FEDMESH" ca issue --ca "$WORK/ca/north" --spiffe-id spiffe://north.fedmesh.test/ns/demo/sa/drill \
  --out "$WORK/drill-operator" >/dev/null
kubectl --context kind-fedmesh-north create namespace demo --dry-run=client -o yaml | kubectl --context kind-fedmesh-north apply -f -
kubectl --context kind-fedmesh-north -n demo create secret generic drill-operator \
  --from-file="$WORK/drill-operator" --dry-run=client -o yaml | kubectl --context kind-fedmesh-north apply -f -
# north's gateway pod (one replica here) and drill-echo's ClusterSet IP there.
gateway_api=""
load=""
for _ in $(seq 1 60); do
  gw=$(kubectl --context kind-fedmesh-north -n fedmesh-system get pod -l app.kubernetes.io/component=gateway \
    -o jsonpath='{.items[0].status.podIP}' 2>/dev/null || true)
  ip=$(kubectl --context kind-fedmesh-north -n demo get serviceimport drill-echo \
    -o jsonpath='{.spec.ips[0]}' 2>/dev/null || true)
  if [ -n "$gw" ] && [ -n "$ip" ]; then
    gateway_api="$gw:15022"
    load="$ip:7000"
    break
  fi
  sleep 5
done
if [ -z "$gateway_api" ]; then
  echo "north has no gateway pod IP or no ClusterSet IP for drill-echo.demo" >&2
  exit 1
fi
kubectl --context kind-fedmesh-north -n demo delete job drill --ignore-not-found
sed -e "s|IMAGE|$IMAGE|" -e "s|GATEWAY_API|$gateway_api|" -e "s|LOAD|$load|" e2e/kind/samples/drill-job.yaml \
  | "$FEDMESH" inject --image "$IMAGE" --pull-policy Never --cluster north --bundle "$WORK/ca/north/bundle.pem" \
  | kubectl --context kind-fedmesh-north apply -f -
# The Job's pod keeps its sidecar running: wait for the drill container.
pod=""
code=""
for _ in $(seq 1 60); do
  pod=$(kubectl --context kind-fedmesh-north -n demo get pod -l job-name=drill \
    -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
  if [ -n "$pod" ]; then
    code=$(kubectl --context kind-fedmesh-north -n demo get pod "$pod" \
      -o jsonpath='{.status.containerStatuses[?(@.name=="drill")].state.terminated.exitCode}' 2>/dev/null || true)
  fi
  [ -n "$code" ] && break
  sleep 5
done
kubectl --context kind-fedmesh-north -n demo logs "$pod" -c drill >"$WORK/drill.json" || true
kubectl --context kind-fedmesh-north -n demo delete job drill --wait=false
case "$code" in
  0) echo "drill PASS: $WORK/drill.json" ;;
  1) echo "drill ran, failover target missed: $WORK/drill.json" ;;
  *)
    cat "$WORK/drill.json" >&2
    echo "the drill did not run (exit code '${code}')" >&2
    exit 1
    ;;
esac

say "failover rehearsal: west's gateway down, then back"
gateway_status east 18021
kubectl --context kind-fedmesh-west -n fedmesh-system scale deploy/fedmesh-gateway --replicas 0
sleep 10
gateway_status east 18021
kubectl --context kind-fedmesh-west -n fedmesh-system scale deploy/fedmesh-gateway --replicas 1
kubectl --context kind-fedmesh-west -n fedmesh-system rollout status deploy/fedmesh-gateway --timeout 120s
sleep 5
gateway_status east 18021

say "done: contexts kind-fedmesh-{east,west,north}; e2e/kind/down.sh removes everything"
