#!/usr/bin/env bash
# Runs every check and test of Margay, after installing what they need.
# This is README's test command and what CI (.ci/run) calls.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
start=$(date +%s)
step() { printf '\n== %s (+%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "install real components"
./scripts/install-deps.sh
./scripts/ensure-rust.sh

# The cargo target dir lives outside the clone so CI keeps it between runs.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/margay/target}
export CARGO_TERM_COLOR=never RUST_BACKTRACE=1

step "format"
cargo fmt --all -- --check

step "module graphs (no import circles between a crate's modules)"
python3 scripts/check-cycles.py agent/src api/src bench/src bgp/src cni-shim/src delta/src netpol/src \
  harness/src ipam/src lab/src nftnl/src policy/src proto/src task/src tests/src

step "clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --workspace --all-targets --locked

step "tests (unit + real-component integration)"
cargo test --workspace --locked --no-fail-fast

step "fuzz every decoder (${MARGAY_FUZZ_SECONDS:-20}s each)"
./scripts/fuzz.sh "${MARGAY_FUZZ_SECONDS:-20}"

step "leftover check"
./scripts/check-leftovers.sh

step "done in $(( $(date +%s) - start ))s"
