#!/usr/bin/env bash
# Fails if tests left namespaces, processes or temp dirs behind. Harness names
# carry the owner PID (mg<pid>-...): anything of a process that has exited is
# a leak. The lab's own (live supervisor) is not.
set -euo pipefail
leaks=0
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^mg' || true); do
  pid=${ns#mg}; pid=${pid%%-*}
  if [ ! -d "/proc/$pid" ]; then echo "leftover namespace: $ns"; leaks=1; fi
done
for d in /tmp/mg* /dev/shm/mg*; do
  [ -e "$d" ] || continue
  b=$(basename "$d"); pid=${b#mg}; pid=${pid%%-*}
  if [ ! -d "/proc/$pid" ]; then echo "leftover temp dir: $d"; leaks=1; fi
done
# Daemons started by tests run from their test's temp dir: one whose owner is dead leaked.
while read -r pid args; do
  [ -n "$pid" ] || continue
  owner=$(printf '%s' "$args" | grep -oE '(/tmp|/dev/shm)/mg[0-9]+-' | head -1 | grep -oE '[0-9]+' || true)
  if [ -n "$owner" ] && [ ! -d "/proc/$owner" ]; then echo "leftover process $pid: $args"; leaks=1; fi
done < <(pgrep -af '(/tmp|/dev/shm)/mg[0-9]+-' || true)
# scripts/in-vm.sh runs each VM from a scratch dir under the cache; a VM
# still running after the tests, or a scratch dir left, leaked.
for d in "${MARGAY_CACHE:-/var/cache/margay}"/vm-runs/run.*; do
  [ -e "$d" ] || continue
  echo "leftover VM scratch dir: $d"; leaks=1
done
while read -r pid args; do
  [ -n "$pid" ] || continue
  echo "leftover VM $pid: $args"; leaks=1
done < <(pgrep -af 'qemu-system.*vm-runs/run\.' || true)
if [ $leaks = 0 ]; then echo "no leftover namespaces, temp dirs or processes"; fi
exit $leaks
