#!/usr/bin/env bash
# Run a command on a busy machine: two CPU-bound bystanders and a process that maps and unmaps
# a library's code in a loop (every mapping is a record the mapping tracker reads), all ended
# when the command ends, however it ends. The command's exit status is the script's.
set -uo pipefail
pids=()
end_load() { kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null; }
trap end_load EXIT
for _ in 1 2; do (while :; do :; done) & pids+=($!); done
python3 -c '
import mmap, os, time
libc = next(l.split()[-1] for l in open("/proc/self/maps") if "/libc.so" in l or "/libc-" in l)
fd = os.open(libc, os.O_RDONLY)
while True:
    for _ in range(10):
        mmap.mmap(fd, 1 << 20, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC).close()
    time.sleep(0.01)
' & pids+=($!)
sleep 0.5
kill -0 "${pids[@]}" || { echo "under-load: a bystander did not start" >&2; exit 1; }
echo "under-load: bystanders ${pids[*]} (two CPU-bound, one mapping code ~1,000 times a second)" >&2
"$@"
