#!/usr/bin/env bash
# Pod churn on real kubelets (issue 30): on a NODES-node lab of real
# kubelets, LEVEL pods of the lab pod image kept running while pods are
# created and deleted at each RATE (pods/s) for SECONDS, with Margay
# installed from its manifest and, on a lab of its own right after, with
# Debian's ptp + host-local (`margay-lab up --install ptp`). Per rate and
# install: pod start-up latency (created -> Ready) p50/p90/p99/max, pods
# left not Ready; for Margay also Ready minus rules-in per pod (from the
# agents' logs: negative means the pod's NetworkPolicy rules were in before
# it was Ready). Every pod is selected by a NetworkPolicy (enforced by
# Margay, ignored by ptp). Prints a Markdown table; draws
# bench/plots/churn.svg (p50 and p99 against the rate).
#
# Usage: bench/churn.sh [RATES="1 2 4"] [SECONDS=120] [LEVEL=30] [NODES=3]
# Needs release builds (cargo build --release -p margay-lab -p margay-agent
# -p margay-cni -p margay-bench --bin churn) and no other lab running.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
rates=${1:-"1 2 4"}
seconds=${2:-120}
level=${3:-30}
nodes=${4:-3}
lab=$PWD/target/release/margay-lab
churn=$PWD/target/release/churn
for b in "$lab" "$churn"; do
  [ -x "$b" ] || { echo "build the release binaries first ($b)" >&2; exit 1; }
done
. bench/kube-lib.sh
results=$(mktemp /tmp/margay-churn.XXXXXX.jsonl)
trap 'lab_down; rm -f "$results"' EXIT

install() { # name
  lab_up "$1"
  local rules=(); [ "$1" = manifest ] && rules=(--rules)
  for r in $rates; do
    "$churn" run --install "$1" --rate "$r" --seconds "$seconds" --level "$level" \
      "${rules[@]}" --out "$results" >/dev/null
  done
  lab_down
}

install manifest
install ptp

"$churn" table "$results"
"$churn" plot "$results" bench/plots/churn.svg
cp "$results" bench/plots/churn.jsonl
