#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with only the Rust
# toolchain: installs what the tests need when it is missing, checks
# formatting and lints, then builds once and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests need, as "command:debian-package" pairs:
# a real etcd for the store tests, protoc for etcd-client's codegen, and
# ip + nft for the e2e rig's network namespaces and cuts (used when root;
# the rig falls back to loopback addresses and relays otherwise).
NEEDS=("etcd:etcd-server" "protoc:protobuf-compiler" "ip:iproute2" "nft:nftables")

missing=()
for pair in "${NEEDS[@]+"${NEEDS[@]}"}"; do
  cmd=${pair%%:*}
  pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --locked --no-fail-fast
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi
