#!/usr/bin/env bash
# What transparent redirection costs an injected pod, measured in one run
# (root: a network namespace this script creates and removes).
#
#   scripts/bench-redirect.sh [ITERATIONS] [MEBIBYTES]
#
# An unprivileged client in the namespace, three ways to the same echo
# server:
#   direct       a port the redirect skips (the baseline)
#   passthrough  redirected to the sidecar, not a service: spliced as sent
#   mesh         a service VIP: transparent listener -> mTLS tunnel to the
#                (same pod's) inbound listener -> app, as between two pods
# Per path: new connection + one 64-byte round trip (p50/p99 over
# ITERATIONS, default 2000) and the goodput of one connection echoing
# MEBIBYTES (default 256), with ratios to direct. Uses target/release/fedmesh
# (cargo build --release first).
set -euo pipefail
cd "$(dirname "$0")/.."
ITER=${1:-2000}
MIB=${2:-256}
FEDMESH=$PWD/target/release/fedmesh
PY=/usr/bin/python3
[ "$(id -u)" -eq 0 ] || { echo "needs root (a network namespace)" >&2; exit 2; }
[ -x "$FEDMESH" ] || { echo "build first: cargo build --release" >&2; exit 2; }
for t in ip nft setpriv "$PY"; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 2; }; done

NS=fmbench-$$
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
in_ns() { ip netns exec "$NS" "$@"; }

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add v0 type veth peer name v1
ip -n "$NS" addr add 10.77.0.1/16 dev v0
ip -n "$NS" link set v0 up
ip -n "$NS" link set v1 up

"$FEDMESH" ca init --trust-domain bench.test --out "$WORK/ca" >/dev/null
"$FEDMESH" ca issue --ca "$WORK/ca" --spiffe-id spiffe://bench.test/ns/demo/sa/echo --out "$WORK/svid" >/dev/null
cat >"$WORK/sidecar.yaml" <<YAML
identity: { cert: $WORK/svid/svid.pem, key: $WORK/svid/svid.key }
bundles: [ { trust_domain: bench.test, path: $WORK/ca/bundle.pem } ]
catalog:
  cluster: bench
  trust_domain: bench.test
  services:
    - name: echo.demo
      ports: [80]
      vips: ["10.77.5.5"]
      endpoints: [ { address: "10.77.0.1:15006", identity: "spiffe://bench.test/ns/demo/sa/echo" } ]
transparent: { listen: "0.0.0.0:15001" }
inbound:
  listen: "10.77.0.1:15006"
  services: [ { service: echo.demo, port: 80, app: "10.77.0.1:9000" } ]
YAML

cat >"$WORK/echo.py" <<'PY'
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(256)
def serve(c):
    with c:
        while True:
            b = c.recv(262144)
            if not b: return
            c.sendall(b)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
cat >"$WORK/client.py" <<'PY'
import json, socket, sys, threading, time
host, port, iters, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lat = []
for _ in range(iters):
    t = time.perf_counter()
    c = socket.create_connection((host, port), timeout=5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"x" * 64)
    got = 0
    while got < 64:
        b = c.recv(64 - got)
        if not b: raise SystemExit("closed early")
        got += len(b)
    c.close()
    lat.append(time.perf_counter() - t)
lat.sort()
total = mib << 20
c = socket.create_connection((host, port), timeout=30)
chunk = b"y" * 262144
def send():
    left = total
    while left > 0:
        n = min(left, len(chunk)); c.sendall(chunk[:n]); left -= n
t = time.perf_counter()
th = threading.Thread(target=send); th.start()
got = 0
while got < total:
    b = c.recv(1 << 20)
    if not b: raise SystemExit("closed early")
    got += len(b)
th.join()
secs = time.perf_counter() - t
print(json.dumps({"p50_ms": lat[len(lat)//2]*1e3, "p99_ms": lat[int(len(lat)*0.99)]*1e3,
                  "gbps": total * 8 / secs / 1e9}))
PY

# The client runs as nobody: it must read its script.
chmod 755 "$WORK"
chmod 644 "$WORK/client.py" "$WORK/echo.py"
ip netns exec "$NS" "$PY" "$WORK/echo.py" 10.77.0.1 9000 & PIDS+=($!)
ip netns exec "$NS" "$PY" "$WORK/echo.py" 10.77.0.1 9001 & PIDS+=($!)
ip netns exec "$NS" "$FEDMESH" sidecar --config "$WORK/sidecar.yaml" >/dev/null & PIDS+=($!)
# The sidecar runs as root here, so root is the exempt proxy UID.
in_ns "$FEDMESH" redirect --proxy-uid 0 --skip-ports 9001 >/dev/null
sleep 1

run() { in_ns setpriv --reuid=65534 --regid=65534 --clear-groups "$PY" "$WORK/client.py" "$1" "$2" "$ITER" "$MIB"; }
direct=$(run 10.77.0.1 9001)
pass=$(run 10.77.0.1 9000)
mesh=$(run 10.77.5.5 80)
"$PY" - "$direct" "$pass" "$mesh" "$ITER" "$MIB" <<'PY'
import json, sys
d, p, m = (json.loads(x) for x in sys.argv[1:4])
print(f"{sys.argv[4]} new connections + 64 B round trip; {sys.argv[5]} MiB echoed on one connection")
print(f"{'path':<13}{'p50 ms':>9}{'p99 ms':>9}{'Gbit/s':>9}{'goodput vs direct':>19}{'p50 added':>11}")
for name, r in (("direct", d), ("passthrough", p), ("mesh (VIP)", m)):
    print(f"{name:<13}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['gbps']:>9.2f}{r['gbps']/d['gbps']:>19.2f}{r['p50_ms']-d['p50_ms']:>+11.3f}")
PY
