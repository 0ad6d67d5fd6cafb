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
fd = os.open("/usr/lib/x86_64-linux-gnu/libc.so.6", os.O_RDONLY)
while True:
    for _ in range(100):
        mmap.mmap(fd, 1 << 20, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_EXEC).close()
    time.sleep(0.01)
' & pids+=($!)
echo "under-load: bystanders ${pids[*]} (two CPU-bound, one mapping code ~10,000 times a second)" >&2
"$@"
