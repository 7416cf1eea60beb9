#!/usr/bin/env bash
# Pod start as users feel it (issue 16): the time from `kubectl apply` of a
# REPLICAS-replica Deployment on a NODES-node lab of real kubelets until
# every Pod is Ready with an address, once every node is schedulable, with
# Margay installed from its manifest and, in the same run on the same
# machine, with Debian's reference plugins ptp + host-local (each node its
# own /24, static routes: `margay-lab up --install ptp`), and with
# `cni-noop` answering every ADD with a made-up address and wiring nothing
# (`--install noop`): the floor, what the same pod start costs without any
# network. Also the kubelets' own RunPodSandbox latency
# (kubelet_runtime_operations_duration_seconds, operation run_podsandbox:
# sandbox creation including the CNI ADD), the agents' resident memory
# after the pods are up, how the pods spread over the nodes, and the CPU
# seconds each part of the machine used meanwhile (bench/kube-lib.sh).
#
# Usage: bench/kube-pods.sh [REPLICAS=100] [NODES=3] [ROUNDS=1]
# Needs release builds (cargo build --release -p margay-lab -p margay-agent
# -p margay-cni -p margay-bench --bin cni-noop) and no other lab running.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
replicas=${1:-100}
nodes=${2:-3}
rounds=${3:-1}
lab=$PWD/target/release/margay-lab
[ -x "$lab" ] || { echo "build the release binaries first" >&2; exit 1; }
. bench/kube-lib.sh
trap lab_down EXIT

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

# Pods per node as min/max over the nodes.
spread() {
  "$lab" kubectl get pods -l app=bench -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' \
    | sort | uniq -c | awk -v n="$nodes" '{c[NR]=$1} END {m=c[1]; x=c[1]; for (i in c) {if (c[i]<m) m=c[i]; if (c[i]>x) x=c[i]} if (NR<n) m=0; printf "%d/%d", m, x}'
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
  lab_up "$1"
  local t0 t1 cpu0 cpu1
  cpu0=$(mktemp); cpu1=$(mktemp)
  cpu_snapshot > "$cpu0"
  t0=$(date +%s%N)
  deployment | "$lab" kubectl apply -f - >/dev/null
  # One watch (not a kubectl poll: on 2 cores a poll every 0.2 s cost
  # ~10 CPU seconds of the ~60 a round uses).
  "$lab" kubectl rollout status deployment/bench --timeout=600s >/dev/null \
    || { echo "$1: not all $replicas ready after 600 s" >&2; return 1; }
  t1=$(date +%s%N)
  cpu_snapshot > "$cpu1"
  local used; used=$(cpu_used "$cpu0" "$cpu1"); rm -f "$cpu0" "$cpu1"
  local unique; unique=$("$lab" kubectl get pods -l app=bench -o jsonpath='{.items[*].status.podIP}' | tr ' ' '\n' | sort -u | wc -l)
  [ "$unique" -eq "$replicas" ] || { echo "$1: $unique unique addresses for $replicas pods" >&2; return 1; }
  local rss="-"
  case $1 in
    ptp|noop) ;;
    *) rss=$(ps -C margay-agent -o rss= | awk '{s+=$1; if ($1>m) m=$1} END {printf "%.1f/%.1f", s/NR/1024, m/1024}') ;;
  esac
  printf '%-8s %8.1f %14s %14s %12s  %s\n' "$1" "$(awk -v d=$((t1 - t0)) 'BEGIN{print d/1e9}')" "$(sandbox_ms)" "$rss" "$(spread)" "$used"
  lab_down
}

printf '%-8s %8s %14s %14s %12s  %s\n' install "ready_s" "sandbox_ms" "agent_rss_MiB" "pods_per_node" "cpu_s"
for r in $(seq 1 "$rounds"); do
  run manifest
  run ptp
  run noop
done
