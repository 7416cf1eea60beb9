# Shared by the benchmarks on real kubelets (kube-pods.sh, churn.sh);
# sourced, with $lab (the margay-lab binary) and $nodes set.

# Waits until every node is Ready and carries no taint: the node lifecycle
# controller lifts node.kubernetes.io/not-ready some seconds after Ready, and
# a Deployment applied before that piles onto the first node let go (the
# 2026-12-07 ptp rounds: 76 of 100 pods on one node, twice the time).
schedulable() {
  local t0; t0=$(date +%s)
  while :; do
    local out
    out=$("$lab" kubectl get nodes -o \
      jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints}{"\n"}{end}')
    [ "$(awk '$1 == "True" && NF == 1' <<<"$out" | wc -l)" -ge "$nodes" ] && return 0
    if (( $(date +%s) - t0 > 120 )); then
      echo "nodes not schedulable after 120 s: $out" >&2; return 1
    fi
    sleep 0.5
  done
}

# CPU seconds used so far, as "class seconds" lines: the machine's busy time
# (/proc/stat) and, per process class, user + system time including reaped
# children (a CNI plugin's exec counts under containerd, kubectl under the
# shell): kubelet, containerd (with its shims), the API server and etcd,
# margay-agent.
cpu_snapshot() {
  awk '/^cpu / {printf "busy %.2f\n", ($2+$3+$4+$7+$8+$9)/100; exit}' /proc/stat
  cat /proc/[0-9]*/stat 2>/dev/null | awk '{
    o = index($0, "("); c = 0; for (i = length($0); i > 0; i--) if (substr($0, i, 1) == ")") { c = i; break }
    comm = substr($0, o + 1, c - o - 1); n = split(substr($0, c + 2), f, " ")
    t = (f[12] + f[13] + f[14] + f[15]) / 100
    if (comm == "kubelet") k = "kubelet"
    else if (comm ~ /^containerd/) k = "containerd"
    else if (comm == "kube-apiserver" || comm == "etcd") k = "apiserver+etcd"
    else if (comm == "margay-agent") k = "agent"
    else next
    s[k] += t
  } END { for (k in s) printf "%s %.2f\n", k, s[k] }'
}

# What was used between two cpu_snapshot outputs (files), as one line.
cpu_used() {
  awk 'NR == FNR { a[$1] = $2; next } { printf "%s=%.1f ", $1, $2 - a[$1] }' "$1" "$2" \
    | tr ' ' '\n' | sort | tr '\n' ' '
}

# The lab a benchmark has up ($lab_dir), made by lab_up INSTALL (every node
# schedulable when it returns) and taken down by lab_down: call it from an
# EXIT trap too, so a failed step (set -e) leaves nothing running.
lab_dir=
lab_up() {
  lab_dir=$(mktemp -d /run/margay-bench-kube.XXXXXX)
  export MARGAY_LAB_DIR=$lab_dir
  "$lab" up --kubernetes --install "$1" --nodes "$nodes" --pods-per-node 0 --tor none >/dev/null
  schedulable
}
lab_down() {
  [ -n "$lab_dir" ] || return 0
  MARGAY_LAB_DIR=$lab_dir "$lab" down >/dev/null 2>&1 || true
  rm -rf "$lab_dir"
  lab_dir=
}
