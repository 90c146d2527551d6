#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60):
#   scripts/fuzz.sh [SECONDS]
# Seeds come from fuzz/seeds/<target>/ (in the repo, read only); what the
# fuzzer learns goes to target/fuzz/corpus/<target>/, crashes to
# target/fuzz/artifacts/<target>/. Exits non-zero at the first target
# that crashes, leaks its time limit per input, or fails to build.
#
# The stable toolchain is enough: cargo-fuzz needs nightly flags, which
# RUSTC_BOOTSTRAP=1 allows. FUZZ_SANITIZER=address builds with
# AddressSanitizer (slower to build and run; fedmesh's decoders are safe
# Rust, so the default `none` looks for panics, overflows and hangs).
# FUZZ_BUILD=dev builds unoptimized: half the build time, a twentieth of
# the speed (what the test suite's smoke uses); the default is release
# with debug assertions.
set -euo pipefail
cd "$(dirname "$0")/.."

each=${1:-60}
case "$each" in
  '' | *[!0-9]*)
    echo "usage: scripts/fuzz.sh [SECONDS]" >&2
    exit 2
    ;;
esac
sanitizer=${FUZZ_SANITIZER:-none}
mode=${FUZZ_BUILD:-release}
case "$mode" in
  release) build=(--release --debug-assertions --codegen-units 16) ;;
  dev) build=(--dev) ;;
  *)
    echo "FUZZ_BUILD is release or dev, not $mode" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
if ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi

dir=target/fuzz
# Release code keeps debug assertions (cargo fuzz's default) and uses
# several codegen units so the build of the whole stack stays a few
# minutes.
flags=("${build[@]}" --sanitizer "$sanitizer" --target-dir "$dir/$mode")
echo "== cargo fuzz build ($mode, ${sanitizer} sanitizer)"
cargo fuzz build "${flags[@]}"

for t in $(cargo fuzz list); do
  corpus="$dir/corpus/$t"
  artifacts="$dir/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  echo "== fuzz $t for ${each}s"
  log="$dir/$t.log"
  # The first directory receives new inputs; the seeds are only read.
  status=0
  cargo fuzz run "${flags[@]}" "$t" "$corpus" "fuzz/seeds/$t" -- \
    -max_total_time="$each" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz target $t failed (exit $status); the input is in $artifacts/, the log in $log" >&2
    exit 1
  fi
done
echo "== every fuzz target ran ${each}s without a crash"
