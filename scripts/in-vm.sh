#!/usr/bin/env bash
# Runs COMMAND as root inside a QEMU VM booted with a stock Debian kernel,
# for kernel features this host lacks (IPIP, WireGuard, GRE, dummy, VRF),
# and exits with COMMAND's status.
#
#   scripts/in-vm.sh [--kernel PATH] [--memory M] [--cpus N] [--net] [--no-apiserver] -- COMMAND...
#
# The VM sees the host's filesystem read-only (the workspace and its built
# binaries run as they are), with private writable scratch over /tmp, /run,
# /var/run and /var/tmp; nothing it
# writes reaches the host. --net gives it user-mode networking (the host's
# loopback is 10.0.2.2 from inside). Modules are loaded inside the VM
# only, never on the host.
#
# Control planes: a kube-apiserver under emulation takes minutes to start,
# so the host runs them. Unless --no-apiserver is given, a broker
# (`margay-lab apiserver-broker`) listens on the host's loopback while the
# VM runs, and the VM (with user-mode networking) finds it through
# MARGAY_APISERVER_BROKER: every harness ApiServer started in the VM (the
# lab's too) is a fresh etcd + kube-apiserver on the host, relayed to the
# VM's own loopback at the same port, stopped when the VM drops it. The
# directory holding margay-lab ($MARGAY_BIN_DIR, else PATH, else the
# workspace's target dirs) is put first on the VM's PATH.
#
# What it needs comes from scripts/install-deps.sh
# (idempotent, cached). Nothing is left running: the VM ends with COMMAND,
# and is killed (by PID) if this script is interrupted.
#
# Pitfalls found on these machines: /dev/kvm opens, but guests die with a
# KVM internal error, so the VM runs under TCG (slower, but sound); the
# -cloud-amd64 kernel has no 9p, so the generic -amd64 one is used.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

usage() {
  echo "usage: scripts/in-vm.sh [--kernel PATH] [--memory M] [--cpus N] [--net] [--no-apiserver] -- COMMAND..." >&2
  exit 2
}

kernel="" memory=2G cpus=2 net=0 broker=1
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) [ $# -ge 2 ] || usage; kernel=$2; shift 2 ;;
    --memory) [ $# -ge 2 ] || usage; memory=$2; shift 2 ;;
    --cpus) [ $# -ge 2 ] || usage; cpus=$2; shift 2 ;;
    --net) net=1; shift ;;
    --no-apiserver) broker=0; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "in-vm: unknown option $1" >&2; usage ;;
  esac
done
[ $# -gt 0 ] || usage

cache=${MARGAY_CACHE:-/var/cache/margay}
./scripts/install-deps.sh
vng=$cache/venv/bin/vng
export PATH=$cache/venv/bin:$PATH  # vng runs virtme-run from there
[ -x "$vng" ] || { echo "in-vm: $vng missing after install-deps" >&2; exit 1; }

if [ -z "$kernel" ]; then
  # The newest generic Debian kernel (not -cloud-: it has no 9p).
  kernel=$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | grep -v -- '-cloud-' | sort -V | tail -1 || true)
fi
if [ -z "$kernel" ] || [ ! -r "$kernel" ]; then
  echo "in-vm: no readable Debian kernel (install linux-image-amd64, or give --kernel PATH)" >&2
  exit 1
fi
version=${kernel##*/vmlinuz-}
if [ ! -d "/lib/modules/$version" ]; then
  echo "in-vm: no modules for $version in /lib/modules (the VM loads them from there)" >&2
  exit 1
fi

# The command runs from a file in a directory shared read-write with the
# VM (as /mnt, a directory every Debian root has), so any quoting
# survives, and its status comes back through another file there (vng's
# own status also counts its failures). Outside /tmp: the VM's /tmp is
# its own.
mkdir -p "$cache/vm-runs"
scratch=$(mktemp -d "$cache/vm-runs/run.XXXXXX")
cleanup() {
  for pid in "${vm_pid:-}" "${broker_pid:-}"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -- "-$pid" 2>/dev/null || kill -- "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The workspace's binaries: margay-lab and what it starts.
bindir=""
for d in "${MARGAY_BIN_DIR:-}" "$(dirname "$(command -v margay-lab 2>/dev/null || echo /nonexistent/x)")" \
    ./target/release "${CARGO_TARGET_DIR:-/nonexistent}/release" "${CARGO_TARGET_DIR:-/nonexistent}/debug" \
    "$cache/target/release" "$cache/target/debug"; do
  if [ -n "$d" ] && [ -x "$d/margay-lab" ]; then bindir=$(readlink -f "$d"); break; fi
done
if [ $broker = 1 ]; then
  [ -n "$bindir" ] || { echo "in-vm: margay-lab not built (cargo build -p margay-lab), needed for the VM's apiservers; or --no-apiserver" >&2; exit 1; }
  net=1
  setsid "$bindir/margay-lab" apiserver-broker --port-file "$scratch/broker.port" \
    >"$scratch/broker.log" 2>&1 &
  broker_pid=$!
  for _ in $(seq 100); do [ -s "$scratch/broker.port" ] && break; sleep 0.1; done
  [ -s "$scratch/broker.port" ] || { echo "in-vm: the apiserver broker did not start:" >&2; cat "$scratch/broker.log" >&2; exit 1; }
fi
{
  echo 'set -e'
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  [ -n "$bindir" ] && printf 'export PATH=%q:$PATH\n' "$bindir"
  # QEMU's user network shows the host's loopback as 10.0.2.2.
  [ $broker = 1 ] && printf 'export MARGAY_APISERVER_BROKER=10.0.2.2:%s\n' "$(cat "$scratch/broker.port")"
  # The guest's own DHCP client (busybox udhcpc, in the background) gives
  # up when it is slow under emulation: set QEMU's user-network address
  # ourselves until the broker answers.
  if [ $net = 1 ] && [ $broker = 1 ]; then
    printf 'port=%s\n' "$(cat "$scratch/broker.port")"
    cat <<'NET'
for _ in $(seq 600); do
  (exec 3<>/dev/tcp/10.0.2.2/$port) 2>/dev/null && break
  for d in /sys/bus/virtio/drivers/virtio_net/virtio*/net/*; do
    [ -e "$d" ] || continue
    i=$(basename "$d")
    ip link set "$i" up 2>/dev/null || true
    ip addr replace 10.0.2.15/24 dev "$i" 2>/dev/null || true
    ip route replace default via 10.0.2.2 dev "$i" 2>/dev/null || true
  done
  sleep 0.1
done
NET
  fi
  printf 'cd %q\n' "$PWD"
  printf 'set +e\n'
  printf '%q ' "$@"
  printf '\necho $? > /mnt/status\n'
} > "$scratch/cmd.sh"

args=(--disable-kvm --run "$kernel" --memory "$memory" --cpus "$cpus" --user root
      --overlay-rwdir /tmp --overlay-rwdir /run --overlay-rwdir /var/run
      --overlay-rwdir /var/tmp --rwdir "/mnt=$scratch" --rodir "$cache=$cache")
[ $net = 1 ] && args+=(--network user)
# Its own session and process group: an interrupt takes QEMU down with it.
setsid "$vng" "${args[@]}" --exec "bash /mnt/cmd.sh" &
vm_pid=$!
set +e
wait "$vm_pid"
vm_status=$?
set -e
vm_pid=""
if [ ! -s "$scratch/status" ]; then
  echo "in-vm: the VM ended (status $vm_status) before the command did" >&2
  exit 125
fi
exit "$(cat "$scratch/status")"
