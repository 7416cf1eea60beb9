#!/usr/bin/env bash
# Pod start as users feel it (issue 16): the time from `kubectl apply` of a
# REPLICAS-replica Deployment on a NODES-node lab of real kubelets until
# every Pod is Ready with an address, with Margay installed from its
# manifest and, in the same run on the same machine, with Debian's
# reference plugins ptp + host-local (each node its own /24, static routes:
# `margay-lab up --install ptp`). Also the kubelets' own RunPodSandbox
# latency (kubelet_runtime_operations_duration_seconds, operation
# run_podsandbox: sandbox creation including the CNI ADD) and the agents'
# resident memory after the pods are up.
#
# Usage: bench/kube-pods.sh [REPLICAS=100] [NODES=3] [ROUNDS=1]
# Needs release builds (cargo build --release -p margay-lab -p margay-agent
# -p margay-cni) and no other lab running.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
replicas=${1:-100}
nodes=${2:-3}
rounds=${3:-1}
lab=$PWD/target/release/margay-lab
[ -x "$lab" ] || { echo "build the release binaries first" >&2; exit 1; }

deployment() {
  cat <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: bench, namespace: default}
spec:
  replicas: $replicas
  selector: {matchLabels: {app: bench}}
  template:
    metadata: {labels: {app: bench}}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 1
      containers:
      - {name: pod, image: margay.dev/lab-pod:latest, imagePullPolicy: IfNotPresent}
YAML
}

# Pods of the Deployment that are Ready and have an address.
ready() {
  "$lab" kubectl get pods -l app=bench -o \
    jsonpath='{range .items[*]}{.status.podIP}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
    | awk '$1 != "" && $2 == "True"' | wc -l
}

# Mean RunPodSandbox latency (ms) over every node's kubelet.
sandbox_ms() {
  for i in $(seq 1 "$nodes"); do
    "$lab" kubectl get --raw "/api/v1/nodes/node$i/proxy/metrics"
  done | awk '
    /^kubelet_runtime_operations_duration_seconds_sum\{operation_type="run_podsandbox"\}/ {s += $2}
    /^kubelet_runtime_operations_duration_seconds_count\{operation_type="run_podsandbox"\}/ {c += $2}
    END { if (c > 0) printf "%.0f", 1000 * s / c; else printf "n/a" }' 
}

run() { # install
  local dir; dir=$(mktemp -d /run/margay-bench-kube.XXXXXX)
  export MARGAY_LAB_DIR=$dir
  trap '"$lab" down >/dev/null 2>&1 || true; rm -rf "$dir"' RETURN
  "$lab" up --kubernetes --install "$1" --nodes "$nodes" --pods-per-node 0 --tor none >/dev/null
  local t0 t1 n
  t0=$(date +%s%N)
  deployment | "$lab" kubectl apply -f - >/dev/null
  while :; do
    n=$(ready)
    [ "$n" -ge "$replicas" ] && break
    if (( $(date +%s%N) - t0 > 600000000000 )); then
      echo "$1: only $n of $replicas ready after 600 s" >&2; return 1
    fi
    sleep 0.2
  done
  t1=$(date +%s%N)
  local unique; unique=$("$lab" kubectl get pods -l app=bench -o jsonpath='{.items[*].status.podIP}' | tr ' ' '\n' | sort -u | wc -l)
  [ "$unique" -eq "$replicas" ] || { echo "$1: $unique unique addresses for $replicas pods" >&2; return 1; }
  local rss="-"
  if [ "$1" != ptp ]; then
    rss=$(ps -C margay-agent -o rss= | awk '{s+=$1; if ($1>m) m=$1} END {printf "%.1f/%.1f", s/NR/1024, m/1024}')
  fi
  printf '%-8s %8.1f %14s %14s\n' "$1" "$(awk -v d=$((t1 - t0)) 'BEGIN{print d/1e9}')" "$(sandbox_ms)" "$rss"
}

printf '%-8s %8s %14s %14s\n' install "ready_s" "sandbox_ms" "agent_rss_MiB"
for r in $(seq 1 "$rounds"); do
  run manifest
  run ptp
done
