#!/usr/bin/env bash
# Run probedsl's set-up and an end-to-end subset of its tests in a Debian 13 root (bpftrace 0.23,
# BCC 0.31, Python 3.13, glibc 2.41) on this machine's kernel. The root is built once with
# debootstrap and kept (PROBEDSL_DEBIAN13_ROOT, default /var/cache/probedsl/debian13); the
# checkout's files (committed or not) are copied into it afresh each run. Extra arguments go to pytest.
# PROBEDSL_DEBIAN_SUITE=sid (with another PROBEDSL_DEBIAN13_ROOT) builds a Debian unstable root
# instead, to try newer tracers (its bpftrace 0.27 is past the supported range today).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'debian13: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "debian13: must run as root (debootstrap, chroot, tracing)" >&2; exit 1; }
suite=${PROBEDSL_DEBIAN_SUITE:-trixie}
root=${PROBEDSL_DEBIAN13_ROOT:-/var/cache/probedsl/debian13}
pkgs=python3,python3-venv,ca-certificates,git,bpftrace,bpfcc-tools,python3-bpfcc,gcc,g++,libc6-dbg,zlib1g-dev,linux-headers-amd64

if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
if [ ! -e "$root/.probedsl-root" ]; then
  say "building $root with debootstrap (Debian $suite, once: about 2 minutes)"
  rm -rf "$root.tmp"; mkdir -p "$(dirname "$root")"
  log=$(mktemp)
  debootstrap --variant=minbase --include="$pkgs" "$suite" "$root.tmp" http://deb.debian.org/debian >"$log" 2>&1 \
    || { tail -20 "$log" >&2; exit 1; }
  rm -f "$log"; touch "$root.tmp/.probedsl-root"; rm -rf "$root"; mv "$root.tmp" "$root"
else say "using the Debian $suite root at $root"; fi

# the host's way to the registries (its CA bundle may hold a proxy's CA), and name service
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$root/etc/pip.conf"
cp /etc/resolv.conf "$root/etc/resolv.conf"

# this checkout's files; the root's .venv is kept (set-up reinstalls when pyproject.toml changes)
dest=$root/work/probedsl
mkdir -p "$dest"
find "$dest" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$dest"
say "copied $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' + uncommitted changes') to $dest"

# inside the root: the README's set-up, the subset, the demo
inner='cd /work/probedsl && bash scripts/setup.sh &&
  .venv/bin/python -m pytest -q -p no:cacheprovider -m debian13 "$@" && bash scripts/check-demo.sh'
# mounts live in a private mount namespace: they go when this script ends, whatever happens
exec unshare --mount --propagation private bash -c '
set -euo pipefail
root=$1; inner=$2; shift 2
for d in proc sys dev dev/pts sys/kernel/tracing sys/kernel/debug; do
  mkdir -p "$root/$d"; mount --rbind "/$d" "$root/$d"
done
chroot "$root" /bin/bash -c "$inner" _ "$@"
' _ "$root" "$inner" "$@"
