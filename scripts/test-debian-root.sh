#!/usr/bin/env bash
# Run probedsl's set-up, the end-to-end subset of its tests (marked debian13) and the demo in a
# Debian root on this machine's kernel:
#   scripts/test-debian-root.sh trixie [PYTEST ARGS...]   Debian 13: bpftrace 0.23, BCC 0.31, Python 3.13, glibc 2.41
#   scripts/test-debian-root.sh sid [PYTEST ARGS...]      unstable: bpftrace 0.27, BCC 0.37, Python 3.14, glibc 2.43
#   scripts/test-debian-root.sh trixie|sid --build-only   the root only (.ci/run builds them while Debian 12 runs)
# The root is built once with debootstrap from the host's own package mirror (its apt sources)
# and kept in /var/cache/probedsl/debian13 or /var/cache/probedsl/sid (PROBEDSL_DEBIAN_ROOT
# overrides); the checkout's files (committed or not) are copied into it afresh each run.
set -euo pipefail
cd "$(dirname "$0")/.."
suite=${1:-}
case "$suite" in
  trixie) name=debian13; root=${PROBEDSL_DEBIAN_ROOT:-${PROBEDSL_DEBIAN13_ROOT:-/var/cache/probedsl/debian13}} ;;
  sid) name=sid; root=${PROBEDSL_DEBIAN_ROOT:-/var/cache/probedsl/sid} ;;
  *) echo "usage: $0 trixie|sid [--build-only | pytest arguments]" >&2; exit 2 ;;
esac
shift
build_only=0
if [ "${1:-}" = --build-only ]; then build_only=1; shift; fi
say() { printf '%s: %s\n' "$name" "$*"; }
[ "$(id -u)" = 0 ] || { echo "$name: must run as root (debootstrap, chroot, tracing)" >&2; exit 1; }
pkgs=python3,python3-venv,ca-certificates,git,bpftrace,bpfcc-tools,python3-bpfcc,gcc,g++,libc6-dbg,zlib1g-dev,linux-headers-amd64

# The mirror the host's apt uses: a root reaches nothing the host does not. deb822 sources
# first (the stanza of the host's own release, else the first), then a one-line sources.list.
host_mirror() {
  local codename uri=""
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  shopt -s nullglob
  local files=(/etc/apt/sources.list.d/*.sources)
  if [ ${#files[@]} -gt 0 ]; then
    uri=$(awk -v want="$codename" '
      function done_stanza() { if (u != "" && hit) { print u; found = 1; exit } u = ""; hit = 0 }
      FNR == 1 || /^[ \t]*$/ { done_stanza() }
      /^URIs:/ { u = $2; if (first == "") first = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
      END { if (!found) { if (u != "" && hit) print u; else print first } }' "${files[@]}")
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' /etc/apt/sources.list | awk '$1 == "deb" { print $2; exit }')
  fi
  printf '%s' "${uri%/}"
}

# one build at a time per root: a second caller waits for the first's, then uses it (dpkg's
# own lock is waited for too: the other root's build may be installing debootstrap)
mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9
# (both roots may start at once: apt's list lock does not wait, so one install at a time)
if ! flock /var/lock/probedsl-debootstrap.lock sh -c 'command -v debootstrap >/dev/null'; then
  say "installing debootstrap"
  flock /var/lock/probedsl-debootstrap.lock sh -c 'command -v debootstrap >/dev/null ||
    { apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends debootstrap >/dev/null; }'
fi
if [ ! -e "$root/.probedsl-root" ]; then
  mirror=$(host_mirror)
  [ -n "$mirror" ] || { echo "$name: no package mirror in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list" >&2; exit 1; }
  say "building $root with debootstrap (Debian $suite from $mirror, once: about 3 minutes)"
  rm -rf "$root.tmp"
  log=$(mktemp)
  debootstrap --variant=minbase --include="$pkgs" "$suite" "$root.tmp" "$mirror" >"$log" 2>&1 9>&- \
    || { tail -20 "$log" >&2; exit 1; }
  rm -f "$log"; touch "$root.tmp/.probedsl-root"; rm -rf "$root"; mv "$root.tmp" "$root"
else say "using the Debian $suite root at $root"; fi
exec 9>&-
[ $build_only = 0 ] || exit 0

# a mirror may serve unstable's Release file past its Valid-Until date: apt would refuse it
if [ "$suite" = sid ]; then
  echo 'Acquire::Check-Valid-Until "false";' > "$root/etc/apt/apt.conf.d/99probedsl-valid-until"
fi
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

# inside the root: the README's set-up, the subset, the demo on each backend
# (the subset's `parallel` tests two at a time first; a selection that leaves none is no failure)
inner='cd /work/probedsl && bash scripts/setup.sh &&
  { .venv/bin/python -m pytest -q -p no:cacheprovider -m "debian13 and parallel" -n 2 "$@" || [ $? = 5 ]; } &&
  .venv/bin/python -m pytest -q -p no:cacheprovider -m "debian13 and not parallel" "$@" && bash scripts/check-demo.sh &&
  BACKEND=bcc bash scripts/check-demo.sh'
# mounts live in a private mount namespace: they go when this script ends, whatever happens
start=$SECONDS
status=0
unshare --mount --propagation private bash -c '
set -euo pipefail
root=$1; inner=$2; shift 2
for d in proc sys dev dev/pts sys/kernel/tracing sys/kernel/debug; do
  mkdir -p "$root/$d"; mount --rbind "/$d" "$root/$d"
done
chroot "$root" /bin/bash -c "$inner" _ "$@"
' _ "$root" "$inner" "$@" || status=$?
say "$( [ $status = 0 ] && echo passed || echo "FAILED (exit $status)") in $((SECONDS - start)) s"
exit $status
