#!/usr/bin/env bash
# Lab benchmark: `margay-lab up --nodes N --pods-per-node K` from nothing to
# every route in place and every pod reaching every pod (the lab's own
# `ready_seconds`), plus each agent's resident memory once it is up.
# Usage (as root, after a release build of margay-lab, margay-agent and
# margay-cni): bench/lab.sh [NODES] [PODS_PER_NODE] [ROUNDS]
set -euo pipefail
nodes=${1:-10} pods=${2:-20} rounds=${3:-3}
bin=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/release
export MARGAY_LAB_DIR=${MARGAY_LAB_DIR:-/run/margay-lab-bench}
for r in $(seq "$rounds"); do
  "$bin/margay-lab" up --nodes "$nodes" --pods-per-node "$pods" >/dev/null 2>&1 \
    || { "$bin/margay-lab" down >/dev/null 2>&1; echo "round $r: up failed" >&2; exit 1; }
  ready=$(jq .ready_seconds "$MARGAY_LAB_DIR/state.json")
  rss=$(for p in $(jq -r '.nodes[].agent_pid' "$MARGAY_LAB_DIR/state.json"); do
          awk '/VmRSS/{print $2}' "/proc/$p/status"; done | sort -n)
  max=$(echo "$rss" | tail -1) avg=$(echo "$rss" | awk '{s+=$1} END {printf "%d", s/NR}')
  "$bin/margay-lab" check >/dev/null && ok=yes || ok=no
  "$bin/margay-lab" down >/dev/null 2>&1
  printf 'round %d: %d nodes x %d pods: ready in %.1f s, agent RSS avg %.1f MiB max %.1f MiB, check %s\n' \
    "$r" "$nodes" "$pods" "$ready" "$(echo "$avg/1024" | bc -l)" "$(echo "$max/1024" | bc -l)" "$ok"
done
