#!/usr/bin/env bash
# Pod-to-pod throughput across nodes over IPIP, in one VM with a stock
# Debian kernel (this host's has no ipip), three paths side by side:
#   margay  the lab (`margay-lab up --encap ipip`): pod on node1 -> pod on
#           node2, through Margay's veths, host routes and tunl0 routes;
#   hand    the same topology built by hand with ip(8): pod ns - veth -
#           node ns - veth - fabric bridge - veth - node ns - veth - pod
#           ns, tunl0 routes `via <node> dev tunl0 onlink` between the nodes;
#   native  that hand-built topology routed without a tunnel (scale).
# iperf3, one TCP stream, ROUNDS rounds of SECONDS each, the paths taking
# turns; medians in Mbit/s. The VM runs under emulation (TCG): compare
# the ratios, not the absolute figures.
# Usage (as root): scripts/in-vm.sh -- bench/vm-ipip.sh [ROUNDS] [SECONDS]
set -euo pipefail
rounds=${1:-3} secs=${2:-5}
[ -d /sys/module/ipip ] || modprobe ipip
export MARGAY_LAB_DIR=/run/margay-lab-bench
margay-lab up --nodes 2 --encap ipip --tor none --pods-per-node 1 >/dev/null
trap 'margay-lab down >/dev/null 2>&1 || true; for n in hb-fab hb-na hb-nb hb-pa hb-pb; do ip netns del $n 2>/dev/null || true; done' EXIT
st=$MARGAY_LAB_DIR/state.json
pa=$(jq -r '.pods[] | select(.node=="node1") | .netns' "$st")
pb=$(jq -r '.pods[] | select(.node=="node2") | .netns' "$st")
pb_ip=$(jq -r '.pods[] | select(.node=="node2") | .ip' "$st")

# The hand-built twin.
for n in hb-fab hb-na hb-nb hb-pa hb-pb; do ip netns add $n; ip -n $n link set lo up; done
ip -n hb-fab link add br0 type bridge; ip -n hb-fab link set br0 up
i=1
for side in a b; do
  # (Names made in the VM's own namespace first: it has an eth0.)
  ip link add hbu$side netns hb-n$side type veth peer name p$side netns hb-fab
  ip -n hb-fab link set p$side master br0 up
  ip -n hb-n$side addr add 10.98.0.$i/24 dev hbu$side; ip -n hb-n$side link set hbu$side up
  # Proxy ARP answers for 169.254.1.1 only with a route to it elsewhere.
  ip -n hb-n$side route add default dev hbu$side
  ip link add hbp$side netns hb-p$side type veth peer name pod netns hb-n$side
  ip -n hb-p$side link set hbp$side name eth0
  ip -n hb-p$side link set eth0 mtu 1480; ip -n hb-n$side link set pod mtu 1480
  ip -n hb-p$side addr add 10.245.$i.2/32 dev eth0; ip -n hb-p$side link set eth0 up
  ip -n hb-p$side route add 169.254.1.1 dev eth0; ip -n hb-p$side route add default via 169.254.1.1 dev eth0
  ip -n hb-n$side link set pod up
  ip netns exec hb-n$side sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.pod.proxy_arp=1
  ip -n hb-n$side route add 10.245.$i.2/32 dev pod
  ip -n hb-n$side link set tunl0 mtu 1480 up
  ip -n hb-n$side addr add 10.245.$i.1/32 dev tunl0
  i=$((i + 1))
done
route_hand() { # native | tunnel
  if [ "$1" = tunnel ]; then
    ip -n hb-na route replace 10.245.2.0/24 via 10.98.0.2 dev tunl0 onlink
    ip -n hb-nb route replace 10.245.1.0/24 via 10.98.0.1 dev tunl0 onlink
  else
    ip -n hb-na route replace 10.245.2.0/24 via 10.98.0.2 dev hbua
    ip -n hb-nb route replace 10.245.1.0/24 via 10.98.0.1 dev hbub
  fi
}

# Mbit/s of one stream from namespace $1 to address $3 (server in $2).
measure() {
  ip netns exec "$1" ping -c 1 -W 5 "$3" >/dev/null || { echo "no path $1 -> $3" >&2; exit 1; }
  timeout $((secs + 60)) ip netns exec "$2" iperf3 -s -1 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  timeout $((secs + 30)) ip netns exec "$1" iperf3 -c "$3" -t "$secs" -J | jq '.end.sum_received.bits_per_second / 1e6'
  wait $srv 2>/dev/null || true
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

m=() h=() n=()
for r in $(seq "$rounds"); do
  m+=("$(measure "$pa" "$pb" "$pb_ip")")
  route_hand tunnel; h+=("$(measure hb-pa hb-pb 10.245.2.2)")
  route_hand native; n+=("$(measure hb-pa hb-pb 10.245.2.2)")
  echo "round $r: margay ${m[-1]} hand ${h[-1]} native ${n[-1]} Mbit/s" >&2
done
M=$(printf '%s\n' "${m[@]}" | median) H=$(printf '%s\n' "${h[@]}" | median) N=$(printf '%s\n' "${n[@]}" | median)
printf 'IPIP pod-to-pod, %s rounds of %s s, medians: margay %.0f Mbit/s, hand-built tunl0 %.0f (margay/hand %.2fx), native %.0f (tunl0/native %.2fx)\n' \
  "$rounds" "$secs" "$M" "$H" "$(echo "$M/$H" | bc -l)" "$N" "$(echo "$H/$N" | bc -l)"
