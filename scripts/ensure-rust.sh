#!/usr/bin/env bash
# Makes sure a Rust toolchain (with rustfmt and clippy) is on PATH.
set -euo pipefail
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v cargo >/dev/null 2>&1; then
  echo "[ensure-rust] cargo not found: installing rustup's stable toolchain" >&2
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy \
    || { echo "ensure-rust: cannot install Rust; install it with rustup (https://rustup.rs) and re-run" >&2; exit 1; }
fi
