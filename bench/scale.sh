#!/usr/bin/env bash
# What a node's agent costs as the cluster grows (issue 27): a 3-node lab
# (real etcd, kube-apiserver and agents, no ToR), then fake Nodes and Pods
# on its apiserver at each size, measured by `scale` (bench/src/bin/scale/);
# the lab is torn down at the end.
#
# Usage (as root, after `cargo build --release -p margay-lab -p margay-agent
# -p margay-cni -p margay-bench`):
#   bench/scale.sh OUT_DIR [scale options...]
# e.g. bench/scale.sh /tmp/bench/scale/old --label old --sizes 10,100,1000 --churn 10
# writes OUT_DIR/table.md (the tables), OUT_DIR/results.json (every figure,
# what `--baseline` reads), OUT_DIR/rss.svg (agent RSS against N),
# OUT_DIR/run.txt (the command, the commit, the machine) and
# OUT_DIR/lab.log (the lab supervisor's log).
# Environment: NODES (real lab nodes, default 3), MARGAY_LAB_DIR (default
# /run/margay-scale), CARGO_TARGET_DIR (where the release binaries are).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
out=$1; shift
root=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
for b in margay-lab margay-agent margay scale; do
  [ -x "$bin/$b" ] || { echo "$bin/$b missing: build the release binaries first" >&2; exit 1; }
done
export MARGAY_LAB_DIR=${MARGAY_LAB_DIR:-/run/margay-scale}
mkdir -p "$out"
{
  echo "command: bench/scale.sh $out $*"
  echo "commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "date: $(date -u +%FT%TZ)"
  echo "machine: $(nproc) cores, $(free -m | awk '/^Mem:/ {print $2}') MiB"
} > "$out/run.txt"
trap '"$bin/margay-lab" down >/dev/null 2>&1 || true; cp "$MARGAY_LAB_DIR/lab.log" "$out/lab.log" 2>/dev/null || true' EXIT
"$bin/margay-lab" up --nodes "${NODES:-3}" --tor none >/dev/null
"$bin/scale" --lab-dir "$MARGAY_LAB_DIR" --no-cleanup \
  --plot "$out/rss.svg" --json "$out/results.json" "$@" | tee "$out/table.md"
