"""probedsl's own PID namespace. Every pid probedsl takes (--pid, a launched command) or reads
(/proc, ptrace, a pid-scoped uprobe) is a pid of the namespace it runs in; the kernel's BPF
helpers give the initial namespace's. A program traced from inside a container therefore
asks for this namespace's pids (BCC: bpf_get_ns_current_pid_tgid with these numbers;
bpftrace >= 0.24: its `pid` builtin already is), and a backend that cannot is refused here."""

import os
from typing import Dict, NamedTuple, Optional

from probedsl.process import btf, procfs

# the initial PID namespace's inode number (PROC_PID_INIT_INO in the kernel)
INIT_INO = 0xEFFFFFFC


class PidNamespace(NamedTuple):
    dev: int
    ino: int


def own() -> Optional[PidNamespace]:
    """The PID namespace probedsl runs in; None when it is the initial one (the host's), where
    the kernel's pids are already ours."""
    st = os.stat("/proc/self/ns/pid")
    if st.st_ino == INIT_INO:
        return None
    return PidNamespace(st.st_dev, st.st_ino)


def nested(pid: int) -> bool:
    """Whether, probedsl running in a PID namespace, the process runs in another one (nested in
    ours: it is in our /proc), where the kernel's helper cannot give its pids in ours."""
    if own() is None:
        return False
    try:
        return not os.path.samestat(os.stat(f"{procfs.proc_dir(pid)}/ns/pid"), os.stat("/proc/self/ns/pid"))
    except OSError:
        return False


def layout() -> Dict[str, int]:
    """Where a task's pid in each namespace is, in the running kernel (task_struct.thread_pid ->
    struct pid: level, numbers[level + 1] of struct upid {nr, ns}; pid_namespace.ns.inum names
    the namespace; its process's, group_leader's), for a BPF program that reads them by hand."""
    return {
        "OFF_TASK_PID": btf.offset("task_struct", "thread_pid"),
        "OFF_TASK_LEADER": btf.offset("task_struct", "group_leader"),
        "OFF_PID_LEVEL": btf.offset("pid", "level"),
        "OFF_PID_NUMBERS": btf.offset("pid", "numbers"),
        "SIZE_UPID": btf.size("upid"),
        "OFF_UPID_NR": btf.offset("upid", "nr"),
        "OFF_UPID_NS": btf.offset("upid", "ns"),
        "OFF_NS_INUM": btf.offset("pid_namespace", "ns") + btf.offset("ns_common", "inum"),
    }
