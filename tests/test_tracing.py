"""End to end: real probes on real C programs built in the test run, both backends, exact totals."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import struct
import subprocess
import threading
import time

import pytest

from probedsl.process import hold_guard

from conftest import BACKENDS, MEMLEAK, Held, by_site, probedsl, report_json, start_run

pytestmark = pytest.mark.usefixtures("root_required")


def run_json(backend, *target, input=None, extra=(), env=None):
    result = probedsl(
        "run", MEMLEAK, "--backend", backend, "--format", "json", "--top", "50", *extra, *target, input=input, env=env
    )
    assert "Traceback" not in result.stderr, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    return result, report


def assert_accounted(report):
    """The report's own check: what the counters say is live is what it shows."""
    for name, res in report["resources"].items():
        assert res.get("unaccounted", 0) == 0, (name, res, report["notes"])


def traced_pid_run(backend, exe, *extra, after_s="1"):
    """Trace a waiting target by pid; it allocates once tracing has begun. (stdout, stderr, rc)"""
    target = Held([exe, "wait", after_s])
    try:
        tracer = start_run(
            MEMLEAK, "--backend", backend, "--format", "json", "--top", "50", *extra, "--pid", str(target.pid)
        )
        target.go()
        out, err = tracer.communicate(timeout=120)
    finally:
        target.end()
    return out, err, tracer.returncode


def assert_seed_leak(report):
    sites = by_site(report)
    assert sites.get("wrapper1") == (40, 5), sites
    assert "wrapper2" not in sites, sites  # its 16-byte blocks were all freed
    entry = next(e for e in report["reports"][0]["entries"] if e["bytes"] == 40)
    functions = [f["function"] for f in entry["stack"]]
    assert functions[:3] == ["wrapper1", "wrapper2", "main"], functions
    assert all(f["module"] for f in entry["stack"]), "every frame names its module"


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_leak_launched_reports_wrapper1_after_the_process_exited(backend, build):
    result, report = run_json(backend, "--", build("leak"), input="\n")
    assert result.returncode == 0, result.stderr
    assert_seed_leak(report)
    assert report["schema"] == "probedsl.report" and report["version"] == 3 and report["final"] is True
    assert report["exit_status"] == 0 and report["backend"] == backend
    heap = report["resources"]["heap"]
    assert heap["released"] == 5 and heap["unknown_releases"] == 0
    assert heap["acquired"] - heap["released"] == heap["live_blocks"]


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_leak_by_pid_stops_when_the_process_exits(backend, build):
    out, err, rc = traced_pid_run(backend, build("leak_delayed"))
    assert rc == 0, err
    report = report_json(out)
    assert_seed_leak(report)
    assert_accounted(report)


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_leak_by_pid_without_children_scopes_uprobes_where_the_backend_can(backend, build):
    out, err, rc = traced_pid_run(backend, build("leak_delayed"), "--no-follow-forks")
    assert rc == 0, err
    assert_seed_leak(report_json(out))
    from probedsl import targets

    scoped = targets.detect(backend).per_pid_uprobes
    assert ("pays a uprobe trap" in err) != scoped, err


def test_bcc_per_pid_attach_beside_another_tracers_uprobe(build):
    # bcc 0.26's Python passes garbage as libbcc's ref_ctr_offset; the kernel then refused
    # (EINVAL) any uprobe on an address another tracer held with 0: a red CI run once.
    # pvalloc, not free: a uprobe on free would tax BCC's own clang (~15 s of traps)
    # bpftrace attaches a script's probes last to first: "ready" means pvalloc's is on
    script = (
        'tracepoint:syscalls:sys_enter_getppid /pid == $1/ { printf("ready\\n"); } '
        "uprobe:/usr/lib/x86_64-linux-gnu/libc.so.6:pvalloc { @n = count(); }"
    )
    other = subprocess.Popen(
        ["bpftrace", "-e", script, str(os.getpid())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    attached = threading.Event()

    def knock():  # the sentinel fires on our getppid()
        while not attached.wait(0.01):
            os.getppid()

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        lines = []
        while not lines or "ready" not in lines[-1]:
            lines.append(other.stdout.readline())
            assert lines[-1], lines  # bpftrace ended without attaching
        attached.set()
        out, err, rc = traced_pid_run("bcc", build("leak_delayed"), "--no-follow-forks")
    finally:
        attached.set()
        knocker.join()
        other.kill()
        other.wait()
    assert rc == 0, err
    assert_seed_leak(report_json(out))


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_leak_by_comm_started_before_the_program_and_ended_by_sigint(backend, build):
    exe = build("leak_delayed")
    tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--comm", "leak_delayed")
    subprocess.run([exe, "0", "0"], check=True)
    tracer.send_signal(signal.SIGINT)
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    assert_seed_leak(report_json(out))


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_leak_exact_blocks_and_bytes_per_thread(backend, build):
    result, report = run_json(backend, "--", build("threads"))
    assert result.returncode == 0, result.stderr
    sites = by_site(report)
    expected = {
        "leak_in_thread0": (3 * 24, 3),
        "leak_in_thread1": (5 * 40, 5),
        "leak_in_thread2": (7 * 72, 7),
        "leak_in_thread3": (11 * 136, 11),
    }
    assert {k: sites.get(k) for k in expected} == expected


SYS_BPF, SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 321, 434, 438
BPF_OBJ_GET_INFO_BY_FD, BPF_MAP_TYPE_HASH = 15, 1


def hash_keys(pid: int, name: str) -> int:
    """How many keys the BPF hash of tids called name (its first 15 bytes) that process pid
    holds has, read through a copy of its descriptor (the kernel's own count)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                if "map_type:" not in f.read():
                    continue
            own = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if own < 0:
                continue
            try:
                info = ctypes.create_string_buffer(128)  # struct bpf_map_info: char name[16] at 24
                attr = ctypes.create_string_buffer(struct.pack("IIQ", own, len(info), ctypes.addressof(info)))
                if (
                    libc.syscall(SYS_BPF, BPF_OBJ_GET_INFO_BY_FD, attr, len(attr))
                    or info.raw[24:40].split(b"\0")[0] != name[:15].encode()
                ):
                    continue
                map_type, _, key_size = struct.unpack_from("III", info.raw, 0)
                assert map_type == BPF_MAP_TYPE_HASH, f"{name} is a map of type {map_type}, not a hash"
                assert key_size == 4, f"{name}'s keys are {key_size} bytes, not a tid's 4"
                keys = hold_guard.u32_keys(own)
                assert ctypes.get_errno() == errno.ENOENT, os.strerror(ctypes.get_errno())  # (the walk's end)
                return len(keys)
            finally:
                os.close(own)
    finally:
        os.close(pidfd)
    raise AssertionError(f"process {pid} holds no BPF map named {name}")


@pytest.mark.parametrize(
    "stacks, env", [("dwarf", {}), ("fp", {"PROBEDSL_TASK_STORAGE": "0"})], ids=["dwarf", "fp-hash"]
)
def test_bcc_threads_scratch_in_a_hash_goes_with_each_thread(stacks, env, build):
    """Without task storage (the dwarf unwinder, kernels before 6.2) a thread's entry
    arguments wait in a hash by thread, kept from call to call: each thread's entry must go
    when the thread ends, or ended threads fill it."""
    tracer = start_run(
        MEMLEAK,
        *("--backend", "bcc", "--stacks", stacks, "--format", "json", "--", build("threads"), "hold"),
        stdin=subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        assert tracer.stdout.readline() == "joined\n"
        # a joined thread's end may still be under way (the join wakes before the tracepoint)
        deadline = time.monotonic() + 30
        while (left := hash_keys(tracer.pid, "heap_scratch")) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left <= 1  # the main thread's, of the 5 that called malloc
    finally:
        out, err = tracer.communicate("go\n", timeout=120)
    assert tracer.returncode == 0, err
    assert by_site(report_json(out))["leak_in_thread3"] == (11 * 136, 11)


ALLOCS_EXPECTED = {
    "leak_malloc": (100, 1),
    "leak_calloc": (120, 1),
    "leak_realloc_grow": (200, 1),
    "leak_realloc_shrink": (24, 1),
    "leak_realloc_null": (56, 1),
    "leak_failed_realloc": (88, 1),
    "leak_posix_memalign": (130, 1),
    "leak_aligned_alloc": (192, 1),
    "leak_memalign": (144, 1),
    "leak_valloc": (300, 1),
    "leak_pvalloc": (5000, 1),
}


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_allocator_entry_point_leaks_exactly_once(backend, build):
    result, report = run_json(backend, "--", build("allocs"))
    assert result.returncode == 3, "the command's exit status is passed through"
    sites = by_site(report)
    assert {k: sites.get(k) for k in ALLOCS_EXPECTED} == ALLOCS_EXPECTED
    assert "realloc_to_zero" not in sites and "no_leak" not in sites, sites
    assert report["resources"]["heap"]["unknown_releases"] == 0


@pytest.mark.debian13
def test_both_backends_agree_on_totals(build):
    totals = []
    for backend in BACKENDS:
        _, report = run_json(backend, "--", build("allocs"))
        heap = report["resources"]["heap"]
        totals.append((heap["live_bytes"], heap["live_blocks"], heap["acquired"], heap["released"]))
    assert totals[0] == totals[1]


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_interval_prints_reports_while_running(backend, build):
    target = Held([build("leak_delayed"), "wait", "6"])  # (a slow report skips the times it overran)
    try:
        tracer = start_run(MEMLEAK, "--backend", backend, "--interval", "1", "--pid", str(target.pid))
        target.go()
        out, err = tracer.communicate(timeout=120)
    finally:
        target.end()
    assert tracer.returncode == 0, err
    assert out.count("report (interval ") >= 2
    assert out.count("report (final)") == 1
    assert "wrapper1+" in out.split("report (final)")[1]


@pytest.mark.debian13
def test_text_report_shows_header_and_symbolized_frames(build):
    result = probedsl("run", MEMLEAK, "--", build("leak"), input="\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "heap: " in out and " live; " in out and "releases of unknown keys" in out
    assert re.search(r"^\s+40\s+5\s+pids", out, re.M), out  # from the kernel's tallies
    assert "wrapper1+" in out and "[leak]" in out and "[unknown]" not in out
    assert "BPF maps hold" in result.stderr  # kernel memory, stated


@pytest.mark.parametrize("backend", BACKENDS)
def test_ages_reads_every_entry_for_the_oldest_age(backend, build):
    result = probedsl("run", MEMLEAK, "--backend", backend, "--ages", "--", build("leak"), input="\n")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+40\s+5\s+[0-9.]+s\s+pids", result.stdout, re.M), result.stdout
    assert "oldest" in result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_during_a_launched_command_still_reports(backend, build):
    tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--", build("leak_delayed"), "0", "60")
    wait_for_sleep(child_named(tracer.pid, "leak_delayed"), 60)  # its allocations are done
    tracer.send_signal(signal.SIGTERM)
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 128 + signal.SIGTERM, err  # the command was ended by SIGTERM
    report = report_json(out)
    assert report["exit_status"] == 128 + signal.SIGTERM
    assert by_site(report).get("wrapper1") == (40, 5)


def child_named(parent: int, comm: str) -> int:
    """The pid of parent's child process called comm."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children") as f:
                for pid in map(int, f.read().split()):
                    try:
                        with open(f"/proc/{pid}/comm") as c:
                            if c.read().strip() == comm:
                                return pid
                    except OSError:  # a short-lived helper that has ended
                        pass
    pytest.fail(f"no child {comm} of {parent}")


def wait_for_sleep(pid: int, seconds: int) -> None:
    """Until pid is blocked in clock_nanosleep for `seconds` (read from its request)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
        if fields and fields[0] == "230":  # clock_nanosleep(clock, flags, request, ...)
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(int(fields[3], 16))
                if int.from_bytes(mem.read(8), "little") == seconds:
                    return
    pytest.fail(f"pid {pid} never slept {seconds} s")


def test_missing_target_and_bad_pid_are_one_line_errors():
    result = probedsl("run", MEMLEAK)
    assert result.returncode == 1 and "choose one target" in result.stderr and "Traceback" not in result.stderr
    result = probedsl("run", MEMLEAK, "--pid", "999999999")
    assert result.returncode == 1 and "no such process" in result.stderr


def test_command_not_found_is_reported_before_tracing():
    result = probedsl("run", MEMLEAK, "--", "/nonexistent/prog")
    assert result.returncode == 1
    assert result.stderr.strip() == "probedsl: error: command not found or not executable: /nonexistent/prog"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("comm", ['a"b', "x}{y", "a*b'", "$(id)", "-dash"])
def test_hostile_process_names_are_matched_not_executed(backend, comm, tmp_path, build):
    # a copy of the program under a hostile name: it must be traced as that name, nothing else
    exe = tmp_path / comm
    exe.write_bytes(open(build("leak_delayed"), "rb").read())
    exe.chmod(0o755)
    tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--comm", comm)
    subprocess.run([str(exe), "0", "0"], check=True)
    tracer.send_signal(signal.SIGINT)
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    assert by_site(report_json(out)).get("wrapper1") == (40, 5)


def test_overlong_and_control_character_names_are_rejected():
    for comm in ("a" * 16, "new\nline"):
        result = probedsl("run", MEMLEAK, "--comm", comm)
        assert result.returncode == 1 and "--comm" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.debian13
def test_a_real_program_gives_the_same_live_totals_on_both_backends_and_every_block_a_stack_entry():
    # perl builds a 5,000-key hash: ~1,000 blocks live at exit, many through one calloc site,
    # stacks with garbage frame-pointer walks (BCC once merged such groups by overwriting).
    # The environment must be the same: perl copies each variable into %ENV (4 live blocks), so
    # bpftrace 0.17's private library copies (LD_LIBRARY_PATH) are off; BCC scopes uprobes by pid
    script = "my %h; $h{$_} = [$_] for (1..5000); print(scalar(keys %h))"
    env = dict(os.environ, PERL_HASH_SEED="0", PERL_PERTURB_KEYS="0")
    totals = []
    for backend in BACKENDS:
        extra = ("--top", "1000000", "--no-private-libs")
        result, report = run_json(backend, "--", "perl", "-e", script, extra=extra, env=env)
        assert result.returncode == 0, result.stderr
        heap = report["resources"]["heap"]
        entries = report["reports"][0]["entries"]
        assert sum(e["blocks"] for e in entries) == heap["live_blocks"], (backend, heap)
        assert sum(e["bytes"] for e in entries) == heap["live_bytes"], (backend, heap)
        totals.append((heap["live_blocks"], heap["live_bytes"]))
    assert totals[0] == totals[1] and totals[0][0] > 500, totals


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_freed_while_the_probes_attach_is_not_left_live(backend, mallocfree):
    """Attaching to a process that mallocs and frees all the while: the release probes go on
    first, so no block is seen acquired without its release."""
    loop = subprocess.Popen([mallocfree, "1", "100000000000", "0"], stdout=subprocess.DEVNULL)
    try:
        tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--pid", str(loop.pid))
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
    finally:
        loop.kill()
        loop.wait()
    assert tracer.returncode == 0, err
    report = report_json(out)
    heap = report["resources"]["heap"]
    assert heap["acquired"] > 0, heap
    assert heap["replaced"] == 0 and heap["live_blocks"] <= 1, heap
    assert_accounted(report)
