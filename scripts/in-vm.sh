#!/usr/bin/env bash
# Runs COMMAND as root inside a QEMU VM booted with a stock Debian kernel,
# for kernel features this host lacks (IPIP, WireGuard, GRE, dummy, VRF),
# and exits with COMMAND's status.
#
#   scripts/in-vm.sh [--kernel PATH] [--memory M] [--cpus N] [--net] -- COMMAND...
#
# The VM sees the host's filesystem read-only (the workspace and its built
# binaries run as they are), with private writable scratch over /tmp, /run,
# /var/run and /var/tmp; nothing it
# writes reaches the host. --net gives it user-mode networking (the host's
# loopback is 10.0.2.2 from inside). Modules are loaded inside the VM
# only, never on the host. What it needs comes from scripts/install-deps.sh
# (idempotent, cached). Nothing is left running: the VM ends with COMMAND,
# and is killed (by PID) if this script is interrupted.
#
# Pitfalls found on these machines: /dev/kvm opens, but guests die with a
# KVM internal error, so the VM runs under TCG (slower, but sound); the
# -cloud-amd64 kernel has no 9p, so the generic -amd64 one is used.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

usage() {
  echo "usage: scripts/in-vm.sh [--kernel PATH] [--memory M] [--cpus N] [--net] -- COMMAND..." >&2
  exit 2
}

kernel="" memory=2G cpus=2 net=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) [ $# -ge 2 ] || usage; kernel=$2; shift 2 ;;
    --memory) [ $# -ge 2 ] || usage; memory=$2; shift 2 ;;
    --cpus) [ $# -ge 2 ] || usage; cpus=$2; shift 2 ;;
    --net) net=1; shift ;;
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
  if [ -n "${vm_pid:-}" ] && kill -0 "$vm_pid" 2>/dev/null; then
    kill -- "-$vm_pid" 2>/dev/null || kill -- "$vm_pid" 2>/dev/null || true
    wait "$vm_pid" 2>/dev/null || true
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
{
  echo 'set -e'
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  printf 'cd %q\n' "$PWD"
  printf 'set +e\n'
  printf '%q ' "$@"
  printf '\necho $? > /mnt/status\n'
} > "$scratch/cmd.sh"

args=(--disable-kvm --run "$kernel" --memory "$memory" --cpus "$cpus" --user root
      --overlay-rwdir /tmp --overlay-rwdir /run --overlay-rwdir /var/run
      --overlay-rwdir /var/tmp --rwdir "/mnt=$scratch")
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
