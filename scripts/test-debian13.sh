#!/usr/bin/env bash
# The Debian 13 root's run (scripts/test-debian-root.sh trixie): set-up, the end-to-end subset
# and the demo with bpftrace 0.23, BCC 0.31, Python 3.13, glibc 2.41. Arguments go to pytest.
exec bash "$(dirname "$0")/test-debian-root.sh" trixie "$@"
