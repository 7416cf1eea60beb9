#!/usr/bin/env bash
# Pod-to-pod TCP throughput across two lab nodes with POLICIES
# NetworkPolicies in place against none, same lab, same run (issue 17):
# half the policies select the server pod, half the client, so each of
# their endpoint chains jumps to hundreds of policy chains; one policy on
# each side allows the iperf3 connection, the others allow other ports from
# other tiers. Rounds alternate without and with the policies; each figure
# is iperf3's received rate over SECONDS, the median of the rounds.
#
# Usage (as root, after a release build of margay-lab, margay-agent and
# margay-cni): bench/policy-iperf.sh [POLICIES=1000] [ROUNDS=3] [SECONDS=10] [SETTLE=10]
# SETTLE: seconds waited after the rules are in place (both arms), so the
# apiserver, etcd and the agents are done with the 1,000 objects before
# iperf3 runs on the same cores.
set -euo pipefail
policies=${1:-1000} rounds=${2:-3} secs=${3:-10} settle=${4:-10}
export MARGAY_LAB_DIR=${MARGAY_LAB_DIR:-/run/margay-policy-iperf}
SRV_ARGS="--labels app=iperf,tier=db" CLI_ARGS="--labels app=client,tier=web"
# shellcheck source=bench/iperf-lab.sh
. "$(dirname "$0")/iperf-lab.sh"
node1=$(node node1)

policies_yaml() {
  cat <<YAML
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: iperf-in, namespace: default}
spec:
  podSelector: {matchLabels: {app: iperf}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 5201}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: iperf-out, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: iperf}}}], ports: [{port: 5201}]}]
YAML
  for j in $(seq 3 "$policies"); do
    if (( j % 2 )); then app=iperf; else app=client; fi
    cat <<YAML
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: other-$j, namespace: default}
spec:
  podSelector: {matchLabels: {app: $app}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {matchLabels: {tier: t$((j % 7))}}}], ports: [{port: $((8000 + j))}]}]
  egress: [{to: [{ipBlock: {cidr: 192.0.2.0/24}}], ports: [{port: $((9000 + j % 100))}]}]
YAML
  done
}

# Policy and endpoint chains (in/, out/, ep-in/, ep-out/); the base chain
# and the two dispatch chains are always there.
chains() { ip netns exec "$node1" nft list table inet margay_policy 2>/dev/null | grep -cE '^\s*chain (in|out|ep-in|ep-out)/' || true; }

none=() with=()
for r in $(seq "$rounds"); do
  "$lab" kubectl delete networkpolicies --all -n default >/dev/null
  while [ "$(chains)" -gt 0 ]; do sleep 0.5; done
  sleep "$settle"
  none+=("$(rate)")
  policies_yaml | "$lab" kubectl apply -f - >/dev/null
  # node1 holds the server: half the policies plus its endpoint chains.
  until [ "$(chains)" -ge $((policies / 2)) ]; do sleep 0.5; done
  sleep "$settle"
  with+=("$(rate)")
  printf 'round %d: no policies %.0f Mbit/s, %d policies %.0f Mbit/s\n' "$r" "${none[-1]}" "$policies" "${with[-1]}"
done
m0=$(median "${none[@]}") m1=$(median "${with[@]}")
printf '| %d | %.0f | %.0f | %.3fx |\n' "$policies" "$m0" "$m1" "$(echo "$m1 / $m0" | bc -l)"
