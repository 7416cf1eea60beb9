#!/usr/bin/env bash
# What the tenant guards cost per packet (issue 26): pod-to-pod TCP
# throughput across two lab nodes with the guards as the agents load them
# against the same lab with them bypassed, rounds alternating. The guards:
# the `source` chain (every packet from a workload interface must carry one
# of its attachment's addresses: a set lookup of interface . address) and
# the forward chain's first rule (to a `cali*` interface no endpoint holds:
# dropped). Bypassed by inserting `accept` at the top of `source` and
# `ct state established,related accept` at the top of `forward` on both
# nodes, removed by handle after the round; no agent change is involved.
#
# Usage (as root, after a release build of margay-lab, margay-agent and
# margay-cni): bench/source-check.sh [ROUNDS=5] [SECONDS=10]
set -euo pipefail
rounds=${1:-5} secs=${2:-10}
export MARGAY_LAB_DIR=${MARGAY_LAB_DIR:-/run/margay-source-check}
# shellcheck source=bench/iperf-lab.sh
. "$(dirname "$0")/iperf-lab.sh"
nodes=("$(node node1)" "$(node node2)")

# Inserts the bypass rules on every node; prints "netns chain handle" lines.
bypass() {
  for n in "${nodes[@]}"; do
    ip netns exec "$n" nft -e -a insert rule inet margay_policy source accept |
      awk -v n="$n" '/# handle/ {print n, "source", $NF}'
    ip netns exec "$n" nft -e -a insert rule inet margay_policy forward ct state established,related accept |
      awk -v n="$n" '/# handle/ {print n, "forward", $NF}'
  done
}
restore() {
  while read -r n chain h; do
    ip netns exec "$n" nft delete rule inet margay_policy "$chain" handle "$h"
  done <<<"$1"
}

on=() off=()
for r in $(seq "$rounds"); do
  on+=("$(rate)")
  handles=$(bypass)
  [ "$(wc -l <<<"$handles")" -eq 4 ] || { echo "bypass rules not inserted: $handles" >&2; exit 1; }
  off+=("$(rate)")
  restore "$handles"
  printf 'round %d: guards on %.0f Mbit/s, bypassed %.0f Mbit/s\n' "$r" "${on[-1]}" "${off[-1]}"
done
m1=$(median "${on[@]}") m0=$(median "${off[@]}")
printf '| guards on (median) | bypassed (median) | ratio |\n|---|---|---|\n| %.0f | %.0f | %.3fx |\n' "$m1" "$m0" "$(echo "$m1 / $m0" | bc -l)"
