#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with only the Rust
# toolchain: installs what the tests need when it is missing, checks
# formatting and lints, then builds once and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests need, as "command:debian-package" pairs:
# a real etcd for the store tests (no protoc: protox generates the gRPC
# code in Rust),
# ip + nft for the e2e rig's network namespaces and cuts (used when root;
# the rig falls back to loopback addresses and relays otherwise),
# the ShellCheck linter for the kind scripts, python3-venv for the manifest
# schema checks, haproxy and stunnel4 as the baselines of the data-path
# benchmark's smoke (`fedmesh-bench datapath --quick`), dig for the
# clusterset.local DNS tests, headless Chromium to render a drill's HTML
# report.
NEEDS=("etcd:etcd-server" "ip:iproute2" "nft:nftables"
  "shellcheck:shellcheck" "haproxy:haproxy" "stunnel4:stunnel4"
  "dig:bind9-dnsutils" "chromium:chromium")

missing=()
for pair in "${NEEDS[@]+"${NEEDS[@]}"}"; do
  cmd=${pair%%:*}
  pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=("python3-venv")
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# Offline Kubernetes schemas (PyPI kubernetes-validate, bundles 1.33) for
# the manifest tests, in a venv under target/ so the system stays clean.
VENV=target/k8s-venv
if ! "$VENV/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' >/dev/null 2>&1; then
  echo "installing kubernetes-validate into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check kubernetes-validate jsonschema pyyaml
fi
export FEDMESH_K8S_PYTHON="$PWD/$VENV/bin/python"

echo "== shellcheck"
shellcheck scripts/*.sh e2e/run.sh e2e/kind/*.sh

echo "== terraform fmt"
if command -v terraform >/dev/null 2>&1; then
  terraform fmt -check -recursive -diff terraform/
else
  # Debian does not package Terraform; docs/kind.md says what this skips.
  echo "terraform not installed: terraform fmt skipped"
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

# A few seconds of each fuzz target, unoptimized (half the build time):
# they build and their seeds pass (scripts/fuzz.sh runs them for longer).
echo "== fuzz smoke"
FUZZ_BUILD=dev ./scripts/fuzz.sh "${FUZZ_SECONDS:-5}"
