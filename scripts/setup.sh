#!/usr/bin/env bash
# Idempotent set-up for probedsl on Debian 12: system packages, kernel headers for BCC,
# and a .venv with the package installed. Says what it changed and what it found in place.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'setup: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "setup: must run as root (it installs packages and tracing needs root)" >&2; exit 1; }

# 1. system packages
# debuginfod, valgrind, git, sqlite3: the tests' debug-info server, stack oracle and real programs;
# golang-go, chromium, prometheus: go tool pprof, a headless browser and a Prometheus server read
# the pprof, SVG and --prometheus outputs in the tests
# jemalloc, tcmalloc, mimalloc: --allocator's tests; systemtap-sdt-dev: sys/sdt.h for the USDT fixture;
# pipx: the install the docs give is tested; tmux: a real terminal for the --live view's test
pkgs=(bpftrace bpfcc-tools python3-bpfcc gcc g++ libc6-dbg zlib1g-dev debuginfod valgrind xz-utils git sqlite3
      golang-go chromium prometheus libjemalloc2 systemtap-sdt-dev pipx tmux)
# the same libraries under Debian 13's names (the 64-bit time_t rename, mimalloc 3)
if grep -q '^VERSION_ID="12"' /etc/os-release; then pkgs+=(libtcmalloc-minimal4 libmimalloc2.0)
else pkgs+=(libtcmalloc-minimal4t64 libmimalloc3); fi
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
apt_updated=0
apt_install() {
  [ $apt_updated = 1 ] || { say "apt-get update"; apt-get update -qq >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if [ ${#missing[@]} -gt 0 ]; then say "installing ${missing[*]}"; apt_install "${missing[@]}"; say "installed ${missing[*]}"
else say "system packages already present: ${pkgs[*]}"; fi
# the tests start their own debuginfod and Prometheus on loopback; the packages' services are not wanted
for service in debuginfod prometheus; do
  if command -v systemctl >/dev/null && systemctl is-active "$service" >/dev/null 2>&1; then
    systemctl disable --now "$service" >/dev/null 2>&1 && say "disabled the $service service (the tests run their own)"
  fi
done

# 2. kernel headers for BCC: the running kernel has no headers package; Debian 6.1 headers
#    compile uprobe/tracepoint programs, so link them where BCC looks.
kdir=/lib/modules/$(uname -r)
if [ -e "$kdir/build/include" ]; then say "kernel headers already at $kdir/build"
else
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | grep -v -e cloud -e rt | sort -V | tail -n 1 || true)
  if [ -z "$hdr" ]; then say "installing linux-headers-amd64 (Debian 6.1 headers)"; apt_install linux-headers-amd64
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 | grep -v -e cloud -e rt | sort -V | tail -n 1); fi
  common=${hdr%-amd64}-common
  mkdir -p "$kdir"; ln -sfn "$hdr" "$kdir/build"; ln -sfn "$common" "$kdir/source"
  say "linked $kdir/build -> $hdr and $kdir/source -> $common"
fi

# 3. tracefs: bpftrace and BCC find tracepoints there; some machines boot without it mounted
if [ ! -d /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
  [ -d /sys/kernel/tracing/events ] && say "mounted tracefs at /sys/kernel/tracing"
fi
if [ ! -d /sys/kernel/debug/tracing ] && ! mountpoint -q /sys/kernel/debug; then
  mount -t debugfs nodev /sys/kernel/debug 2>/dev/null && say "mounted debugfs at /sys/kernel/debug" || true
fi
[ -d /sys/kernel/tracing/events ] || { echo "setup: tracefs is not available: tracepoints cannot work" >&2; exit 1; }

# 4. Python environment: lark, jinja2, click, pyelftools, iced-x86, numpy from PyPI; bcc from Debian
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then say "creating .venv with $($py --version)"; "$py" -m venv .venv; fi
stamp=.venv/.probedsl-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing probedsl and its Python dependencies into .venv"
  log=$(mktemp)
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >"$log" 2>&1 || { grep -v '^WARNING: Location' "$log" >&2; exit 1; }
  rm -f "$log"
  echo "$want" >"$stamp"
else say "probedsl already installed in .venv"; fi
# an editable install leaves byte-compiling to the first run, and with PYTHONDONTWRITEBYTECODE
# set (as on these machines) every run compiled all of probedsl's modules again: 0.07 s a start
.venv/bin/python -m compileall -q probedsl backends >/dev/null || { echo "setup: byte-compiling probedsl failed" >&2; exit 1; }
say "probedsl's modules byte-compiled"
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -e "$site/bcc" ]; then ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"; say "linked Debian's bcc module into .venv"; fi
.venv/bin/python -c 'import bcc, lark, jinja2, click, elftools, numpy' || { echo "setup: Python dependencies do not import" >&2; exit 1; }
# what every first run would build the same (the recipe parser's tables, the compiled templates)
.venv/bin/python -c 'import probedsl.cli; probedsl.cli.build_once()' || { echo "setup: building the parser's tables and templates failed" >&2; exit 1; }
say "the recipe parser's tables and the compiled templates built into .venv/share/probedsl"
# memleak's BCC compiles for a first run (a command or a pid, dwarf or fp stacks) and python3's
# unwind rows (~5 s): without them a first run waits ~0.4-0.7 s more (not fatal: it compiles)
if out=$(.venv/bin/python -m probedsl.run.prebuilt 2>&1); then say "$out"; else say "note: $out"; fi
say "ready: .venv/bin/probedsl"
