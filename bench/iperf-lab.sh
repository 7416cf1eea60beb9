# Shared by the iperf benches (sourced): a 2-node lab with an iperf3
# server pod `srv` on node1 and a client pod `cli` on node2, and `rate`,
# one TCP stream's received Mbit/s. Set `secs` and pass the pods' extra
# `pod add` arguments in SRV_ARGS / CLI_ARGS before sourcing.
bin=${CARGO_TARGET_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target}/release
lab=$bin/margay-lab
state=$MARGAY_LAB_DIR/state.json
trap '"$lab" down >/dev/null 2>&1 || true' EXIT
"$lab" up --nodes 2 --pods-per-node 0 --tor none >/dev/null
# shellcheck disable=SC2086
"$lab" pod add node1 srv ${SRV_ARGS:-} >/dev/null
# shellcheck disable=SC2086
"$lab" pod add node2 cli ${CLI_ARGS:-} >/dev/null
pod() { jq -r --arg n "$1" ".pods[] | select(.name == \$n) | .$2" "$state"; }
node() { jq -r --arg n "$1" '.nodes[] | select(.name == $n) | .netns' "$state"; }
sns=$(pod srv netns) cns=$(pod cli netns) sip=$(pod srv ip)

rate() {
  ip netns exec "$sns" iperf3 -s -1 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  ip netns exec "$cns" iperf3 -c "$sip" -t "$secs" -J | jq '.end.sum_received.bits_per_second / 1e6'
  wait "$srv" || true
}
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
