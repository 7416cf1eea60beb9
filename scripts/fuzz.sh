#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 20) each, starting from the
# committed seeds plus the corpus kept in $MARGAY_CACHE/fuzz-corpus. Any
# crash fails the run (the input is saved under fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
secs=${1:-20}
cache=${MARGAY_CACHE:-/var/cache/margay}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
# cargo-fuzz passes nightly-only flags; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them. No sanitizer: the code under test has no unsafe.
export RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=$cache/fuzz-target
for t in $(cargo fuzz list --fuzz-dir fuzz); do
  corpus=$cache/fuzz-corpus/$t
  mkdir -p "$corpus"
  echo "fuzz: $t for ${secs}s"
  log=$(mktemp)
  if ! cargo fuzz run --fuzz-dir fuzz -s none "$t" "$corpus" "fuzz/seeds/$t" -- \
      -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    grep -vE '^\s+([0-9]+: |at )' "$log" | tail -40
    rm -f "$log"
    echo "fuzz: $t FAILED (input saved under fuzz/artifacts/$t)"
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added)' "$log" || true
  rm -f "$log"
done
