"""IR -> backend text: golden files, snippets, and the backends' own acceptance of our output."""

from __future__ import annotations

import glob
import os
import re
import subprocess

import dataclasses

import pytest

from probedsl.language import ast, checker, parser
from probedsl import backends, compiler, ir, targets
from probedsl.binaries import elf
from probedsl.process import libraries, pidns
from probedsl.errors import ProbedslError, RecipeError

from conftest import BACKENDS, MEMLEAK, ROOT

GOLDEN = ROOT / "tests" / "golden"
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "*.probe")) + glob.glob(str(ROOT / "tests" / "recipes" / "*.probe")))


# The machine the goldens are generated for, described here so that they are the same on every
# host (this host's glibc 2.36 makes memalign an alias of aligned_alloc; another glibc may not):
# each library is the file /lib/NAME.so, each function at its own address (build_on_fixed_machine's
# aliases give a function another's).
FIXED_LIBRARIES = {
    "libc": (
        "malloc calloc realloc reallocarray posix_memalign aligned_alloc memalign valloc pvalloc free "
        "fopen fdopen freopen tmpfile popen fclose mmap munmap "
        "pthread_mutex_lock pthread_mutex_trylock pthread_mutex_unlock"
    ).split(),
    "libstdc++": (
        "_Znwm _Znam _ZnwmRKSt9nothrow_t _ZnamRKSt9nothrow_t _ZnwmSt11align_val_t _ZnamSt11align_val_t "
        "_ZdlPv _ZdlPvSt11align_val_t"
    ).split(),
    "z": "deflateInit_ deflateInit2_ deflateEnd inflateInit_ inflateInit2_ inflateEnd".split(),
}


class FixedSymbols:
    """elf.symbols' answer for a library of FIXED_LIBRARIES (address_of and by_name are what
    the resolve pass reads)."""

    def __init__(self, functions, aliases):
        self.by_name = {f: 0x1000 * (i + 1) for i, f in enumerate(functions)}
        self.by_name.update({alias: self.by_name[f] for alias, f in aliases.items() if f in self.by_name})

    def address_of(self, name):
        return self.by_name.get(name)


class FixedResolver(libraries.LibraryResolver):
    """Finds FIXED_LIBRARIES only, and no program files (usdt probes are left out)."""

    def resolve(self, library):
        return f"/lib/{library}.so" if library in FIXED_LIBRARIES else None

    def program_files(self):
        return ()

    def elsewhere(self, library):
        return []


def build_on_fixed_machine(recipe: ast.Recipe, aliases=None, **kw) -> ir.Program:
    """compiler.build as on the machine FIXED_LIBRARIES describes; aliases: {alias: function}."""
    tables = {f"/lib/{name}.so": FixedSymbols(functions, aliases or {}) for name, functions in FIXED_LIBRARIES.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(elf, "symbols", lambda path, root="": tables.get(path))
        return compiler.build(recipe, resolver=FixedResolver(), **kw)


def memleak_program(target=ir.Scope("pid", pid=4242)) -> ir.Program:
    return recipe_program(MEMLEAK, target)


def recipe_program(path, target=ir.Scope("pid", pid=4242)) -> ir.Program:
    """usdt probes are found in a program's files only: without one they are left out here
    (tests/test_usdt.py generates them for a real program)."""
    return build_on_fixed_machine(compiler.load(path), complete=False).with_scope(target)


BUNDLED = sorted(glob.glob(str(ROOT / "recipes" / "*.probe")))


def backend(name: str):
    """The generator of a backend's newest dialect."""
    return backends.for_target(targets.for_version(name, None))


def assert_golden(text: str, golden, update: bool) -> None:
    if update:
        golden.write_text(text)
    assert golden.exists(), f"{golden} is missing: write it with pytest --update-golden and review it"
    assert text == golden.read_text(), f"regenerate with pytest --update-golden and review the diff of {golden}"


@pytest.mark.parametrize("recipe", BUNDLED, ids=os.path.basename)
def test_recipe_ir_and_layout_match_golden(recipe, update_golden):
    name = os.path.basename(recipe)[: -len(".probe")]
    program = recipe_program(recipe)
    assert_golden(compiler.dump(program), GOLDEN / "ir" / f"{name}.ir", update_golden)


# one full golden per backend, of its oldest dialect; what each newer bpftrace dialect changes
# in it is a table (tests/test_dialects.py)
FULL_GOLDEN = {cls.backend: cls for cls in reversed(targets.TARGETS)}


def full_golden(backend_name: str):
    cls = FULL_GOLDEN[backend_name]
    return GOLDEN / f"memleak.{backend_name}-{cls.range_text()}.{'bt' if backend_name == 'bpftrace' else 'c'}"


def memleak_text_for(cls) -> str:
    """memleak for a dialect with its default stacks (BCC's unwinder is in its program)."""
    program = memleak_program().walking_stacks("dwarf" if cls.dwarf_stacks else "fp")
    return backends.for_target(cls()).generate(program).text


UNWINDER = re.compile(r"^// probedsl unwinder: begin.*?^// probedsl unwinder: end\n", re.S | re.M)


def without_unwinder(text: str) -> str:
    """The program with BCC's unwinder (its own template, its own golden) cut to one line."""
    return UNWINDER.sub("// (the unwinder: tests/golden/unwinder.bcc.c)\n", text)


@pytest.mark.parametrize("name", BACKENDS)
def test_memleak_program_per_backend_matches_golden(name, update_golden):
    assert_golden(without_unwinder(memleak_text_for(FULL_GOLDEN[name])), full_golden(name), update_golden)


def test_bcc_unwinder_matches_its_golden(update_golden):
    """The unwinder's text alone: a change to it rewrites this golden, not the program's."""
    (unwinder,) = UNWINDER.findall(memleak_text_for(FULL_GOLDEN["bcc"]))
    assert_golden(unwinder, GOLDEN / "unwinder.bcc.c", update_golden)


def test_a_function_aliased_to_another_is_attached_once():
    """Two probes at one address would count each call twice: the later one is dropped (the
    real libc's aliases: tests/test_lowering.py)."""
    functions = [p.function for p in memleak_program().resources[0].probes]
    assert "memalign" in functions and "aligned_alloc" in functions
    folded = build_on_fixed_machine(compiler.load(MEMLEAK), aliases={"memalign": "aligned_alloc"})
    functions = [p.function for p in folded.resources[0].probes]
    assert "aligned_alloc" in functions and "memalign" not in functions and "free" in functions


def test_generation_is_deterministic():
    a = backend("bcc").generate(memleak_program())
    b = backend("bcc").generate(memleak_program())
    assert a.text == b.text and a.loader == b.loader


def test_bpftrace_filters_by_pid_and_takes_comm_as_an_argument():
    bt = backend("bpftrace")
    following = bt.generate(memleak_program()).text
    assert "@probedsl_traced[(uint64)4242] = 1;" in following and ":malloc /@probedsl_traced[(uint64)pid]/" in following
    assert "/pid == 4242/" in bt.generate(memleak_program(ir.Scope("pid", pid=4242, follow_forks=False))).text
    text = bt.generate(memleak_program(ir.Scope("comm", comm='le"ak'))).text
    assert "/comm == str($1)/" in text and 'le"ak' not in text


def test_bcc_compares_comm_byte_by_byte():
    text = backend("bcc").generate(memleak_program(ir.Scope("comm", comm='a"*/b'))).text
    assert "comm[0] != 97 || comm[1] != 34 || comm[2] != 42 || comm[3] != 47" in text
    assert '"*/' not in text


def test_recipe_text_in_comments_cannot_close_them(tmp_path):
    recipe = tmp_path / "c.probe"
    recipe.write_text('recipe c "ends */ here\'\'\'"\nresource h keyed by a { acquire libc:malloc(n) -> ret }\n')
    program = compiler.build(compiler.load(str(recipe)))
    gen = backend("bcc").generate(program)
    assert "*/ here" not in gen.text
    compile(gen.loader, "loader.py", "exec")  # the loader is valid Python whatever the text


def test_line_map_points_back_to_the_recipe():
    gen = backend("bpftrace").generate(memleak_program())
    line = next(n for n, t in enumerate(gen.text.splitlines(), 1) if ":free /" in t)
    span = gen.recipe_span(line)
    assert span.line == next(n for n, t in enumerate(open(MEMLEAK).read().splitlines(), 1) if "libc:free" in t)


def test_bcc_manifest_lists_each_uprobe_with_its_functions():
    gen = backend("bcc").generate(memleak_program())
    entries = {p["function"]: p for p in gen.manifest["probes"]}
    assert entries["free"]["return"] == "" and entries["malloc"]["return"].endswith("_return")


# --- the real backends accept what we generate (needs root, as CI has) --------------------
def built(recipe: str, sampled: dict) -> ir.Program:
    """The recipe resolved for this machine; one with usdt probes for a program that has them."""
    parsed = compiler.load(recipe)
    uses_usdt = any(isinstance(e.probe, ast.Usdt) for r in parsed.resources for e in r.events)
    program = sampled["otel_memory"] if uses_usdt else None
    return compiler.build(parsed, resolver=libraries.LibraryResolver(command=program) if program else None)


@pytest.mark.debian13
@pytest.mark.parallel
@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
@pytest.mark.parametrize(
    "scope", [ir.Scope(), ir.Scope("pid", pid=1), ir.Scope("comm", comm="x")], ids=["all", "pid", "comm"]
)
def test_bpftrace_accepts_generated_script(recipe, scope, tmp_path, root_required, sampled):
    program = built(recipe, sampled).with_scope(scope)
    script = tmp_path / "p.bt"
    target = targets.detect("bpftrace")
    script.write_text(backends.for_target(target).generate(program, ready_pid=1).text)
    argv = ["bpftrace", *target.check_options(str(tmp_path / "p.o")), str(script)] + target.positional(scope)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.debian13
@pytest.mark.parallel
@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
@pytest.mark.parametrize("scope", [ir.Scope(), ir.Scope("comm", comm="x")], ids=["all", "comm"])
def test_bcc_compiles_and_loads_generated_program(recipe, scope, root_required, sampled, capfd):
    """--comm with dwarf stacks (BCC's default), as inside a PID namespace (every pid read in it,
    by hand for a nested one) and with the kernel headers' layout (no BTF), --all with fp and a
    run's flags (the BTF's offsets: no kernel headers unless a tracepoint names kernel types):
    each program is verified; with dwarf, the unwinder is verified once, in its own programs,
    which no acquire program inlines, a few frames at a time. The text compiled with its tables
    alone (as a run that loads a kept compile does) makes the same tables, no program (but the
    placeholder a task storage map needs), and no warning."""
    from bcc import BPF, libbcc

    from probedsl.drivers import bcc_compile, bcc_kept

    program = built(recipe, sampled).with_scope(scope).walking_stacks("dwarf" if scope.mode == "comm" else "fp")
    gen = backends.for_target(targets.detect("bcc")).generate(program)
    namespace = ["-DPROBEDSL_PIDNS_DEV=4ULL", "-DPROBEDSL_PIDNS_INO=4026532175ULL"] + [
        f"-DPROBEDSL_{name}={value}" for name, value in pidns.layout().items()
    ]
    flags = (
        bcc_compile.FIXED_FLAGS + ["-DPROBEDSL_PID=1", "-DPROBEDSL_SELF=1"] + namespace
        if scope.mode == "comm"
        else bcc_compile.cflags(gen.text, 1)
    )
    bpf = BPF(text=gen.text, cflags=flags)
    try:
        # loading checks the verifier, without attaching; uprobes load as kprobe-type programs
        programs = [
            bpf.load_func(f, BPF.KPROBE) for p in gen.manifest["probes"] for f in (p["entry"], p["return"]) if f
        ]
        unwinders = [
            bpf.load_func(u["program"], BPF.TRACEPOINT if u["type"] == "tracepoint" else BPF.KPROBE)
            for u in gen.manifest.get("unwinders", [])
        ]
        frames = [
            bpf.load_func(u["frames"], BPF.TRACEPOINT if u["type"] == "tracepoint" else BPF.KPROBE)
            for u in gen.manifest.get("unwinders", [])
        ]
        unstacked = [
            bpf.load_func(u_s["program"], BPF.TRACEPOINT if u["type"] == "tracepoint" else BPF.KPROBE)
            for u in gen.manifest.get("unwinders", [])
            for u_s in u["unstacked"]
        ]
        assert bool(unwinders) == gen.manifest["dwarf"] == bool(unstacked)
        # BCC loaded and attached the system calls' tracepoint programs already; a release of a
        # range (close_range) walks its keys in a loop of its own, verified turn by turn
        ranges = {
            f"_{p.function}".encode()
            for r in program.resources
            for p in r.probes
            if any(a.through is not None for a in p.actions)
        }
        programs += [
            f
            for name, f in bpf.funcs.items()
            if name.startswith(b"tracepoint__syscalls__") and not any(name.endswith(r) for r in ranges)
        ]
        if unwinders:  # (memleak: 49,225 instructions verified in the frames program, 232 in the
            # first, 800-1,100 in an acquire program; fdleak's pipe, two acquires: 10,300)
            least = min(verified_instructions(f.fd) for f in frames)
            assert all(verified_instructions(p.fd) < least / 2 for p in programs + unwinders + unstacked)
            # a few frames at a time, not all 64 in one program (that verified ~280,000)
            assert all(verified_instructions(f.fd) < 80_000 for f in frames)
        tables = {k: v["shape"] for k, v in bcc_kept._tables(libbcc.lib, bpf.module).items()}
    finally:
        bpf.cleanup()
    capfd.readouterr()
    alone = BPF(text=gen.text, cflags=flags + [bcc_kept.TABLES_ONLY])
    try:
        assert {k: v["shape"] for k, v in bcc_kept._tables(libbcc.lib, alone.module).items()} == tables
        # (with task storage, one function no run loads: without it BCC keeps no BTF)
        placeholder = [b"probedsl_tables_only"] if "-DPROBEDSL_TASK_STORAGE" in flags else []
        n = libbcc.lib.bpf_num_functions(alone.module)
        assert [libbcc.lib.bpf_function_name(alone.module, i) for i in range(n)] == placeholder
    finally:
        alone.cleanup()
    said = capfd.readouterr().err
    assert "warning" not in said and "error" not in said, said


@pytest.mark.debian13
@pytest.mark.parallel
def test_the_compile_threads_two_kernel_symbols_change_nothing_else(root_required, sampled):
    """The compile's thread reads a /proc/kallsyms of two lines (probedsl.drivers.bcc_ksyms):
    memleak's programs compile to the same instructions as with the kernel's, and no other
    thread or process sees that file."""
    import threading

    import bcc

    from probedsl.drivers import bcc_compile, bcc_kept, bcc_ksyms, bcc_tracepoints

    gen = backends.for_target(targets.detect("bcc")).generate(built(MEMLEAK, sampled).walking_stacks("dwarf"))
    flags = bcc_compile.cflags(gen.text, 1)
    seen: dict = {}
    narrowed_now, compile_now = threading.Event(), threading.Event()

    def compile_(narrowed: bool) -> None:
        seen[narrowed] = narrowed and bcc_ksyms.narrow_for_this_thread()
        with open("/proc/kallsyms", "rb") as f:
            seen[narrowed, "kallsyms"] = f.read()
        with open("/proc/thread-self/mountinfo") as f:
            seen[narrowed, "mounts"] = f.read()
        narrowed_now.set()
        compile_now.wait(30)
        bpf = bcc_tracepoints.unattached(bcc)(text=gen.text, cflags=flags)
        try:  # each table's descriptor in the instructions made its name's place in the list
            tables = bcc_kept._tables(bcc.libbcc.lib, bpf.module)
            names = sorted(tables)
            moved = {t["fd"]: names.index(name) for name, t in tables.items()}
            seen[narrowed, "programs"] = {n: bcc_kept.retarget(bpf.dump_func(n), moved) for n in bpf.program_names()}
        finally:
            bpf.cleanup()

    for narrowed in (True, False):
        narrowed_now.clear()
        compile_now.clear()
        thread = threading.Thread(target=compile_, args=(narrowed,))
        thread.start()
        narrowed_now.wait(30)
        try:  # meanwhile: this thread's file, another process's, and this namespace's mounts
            with open("/proc/kallsyms", "rb") as f:
                assert f.read(1 << 16).count(b"\n") > 1000
            others = subprocess.run(["grep", "-c", "", "/proc/kallsyms"], capture_output=True, text=True).stdout
            assert int(others) > 1000
            with open("/proc/self/mountinfo") as f:
                assert " /proc/kallsyms " not in f.read()
        finally:
            compile_now.set()
            thread.join()
    assert seen[True] and seen[True, "kallsyms"] == bcc_ksyms.LINES
    assert seen[False, "kallsyms"].count(b"\n") > 1000
    assert " /proc/kallsyms " in seen[True, "mounts"] and " /proc/kallsyms " not in seen[False, "mounts"]
    # no mount under the thread's /proc propagates anywhere (where / is shared, as on systemd's)
    proc = [line for line in seen[True, "mounts"].splitlines() if line.split()[4] == "/proc"]
    assert proc and all("shared:" not in line for line in proc), proc
    assert len(seen[True, "programs"]) > 10 and seen[True, "programs"] == seen[False, "programs"]


@pytest.mark.debian13
@pytest.mark.parallel
def test_bcc_loads_frame_pointer_stacks_as_an_older_kernel_has_them(root_required, sampled):
    """Without task storage (before 6.2) and the pending uretprobes' offsets (before 6.12):
    the scratch is a hash by thread and every stack the kernel's walk, as the text says."""
    from bcc import BPF

    from probedsl.drivers import bcc_compile

    gen = backends.for_target(targets.detect("bcc")).generate(built(MEMLEAK, sampled).walking_stacks("fp"))
    older = [f for f in bcc_compile.cflags(gen.text, 1) if f not in bcc_compile.TASK_STORAGE and "UTASK" not in f]
    bpf = BPF(text=gen.text, cflags=older + bcc_compile.FIXED_FLAGS)
    try:
        bpf.load_func(b"heap_malloc_1_return", BPF.KPROBE)
        assert bpf["heap_scratch"].max_entries > 0 and bpf["probedsl_stacks"].max_entries == ir.STACK_BUCKETS
    finally:
        bpf.cleanup()


@pytest.mark.debian13
@pytest.mark.parallel
def test_bcc_loads_the_per_process_exit_probe(root_required, sampled):
    """--comm --per-process: the exit tracepoint that tells a thread ending alone from a group exit
    (signal->live and signal->flags at the running kernel's BTF offsets) is verified as BCC loads it."""
    from bcc import BPF

    from probedsl.drivers import bcc_compile

    program = built(MEMLEAK, sampled).with_scope(ir.Scope("comm", comm="x", per_process=True)).walking_stacks("fp")
    gen = backends.for_target(targets.detect("bcc")).generate(program)
    assert "probedsl_group_exits()" in gen.text
    flags = bcc_compile.cflags(gen.text, 1)
    assert "-DPROBEDSL_BTF_LAYOUT" in flags and len([f for f in flags if "_OFF_" in f]) == 7, flags  # BTF here
    bpf = BPF(text=gen.text, cflags=flags)
    try:  # BCC loads (and attaches) raw tracepoint programs as it starts
        assert b"raw_tracepoint__sched_process_exit" in bpf.funcs
    finally:
        bpf.cleanup()


def verified_instructions(fd: int) -> int:
    """What the kernel's verifier walked to accept a loaded program (its fdinfo, kernel 5.16+)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("verified_insns:"))


def test_control_characters_in_a_description_stay_out_of_generated_text():
    """bpftrace's lexer stops at a NUL even inside a comment (found by tests/test_fuzz.py)."""
    from probedsl.language import parser

    source = open(MEMLEAK).read().replace('"Heap blocks', '"\\x00 \x1b[31m Heap blocks', 1)
    source = source.replace("\\x00", "\x00")
    recipe = parser.parse(source, "m.probe")
    program = compiler.build(recipe).with_scope(ir.Scope("pid", pid=1))
    for cls in targets.TARGETS:
        text = backends.for_target(cls()).generate(program).text
        assert "\x00" not in text and "\x1b" not in text and "Heap blocks" in text


class _NewKind(str):
    """A probe kind no generator lowers yet (what adding one to ir.ProbeKind starts as)."""

    value = "newkind"


@pytest.mark.parametrize("name", ["bpftrace", "bcc"])
def test_a_probe_kind_a_generator_does_not_lower_is_refused_by_name(name):
    program = compiler.build(compiler.load(MEMLEAK))
    res = program.resources[0]
    probe = res.probes[0]
    object.__setattr__(probe, "kind", _NewKind("newkind"))
    with pytest.raises(
        ProbedslError, match=f"{name if name == 'bpftrace' else 'BCC'} has no lowering for a newkind probe"
    ):
        backends.for_target(targets.for_version(name, None)).generate(program)


def test_two_columns_of_one_name_are_refused_where_the_second_is():
    source = (
        'recipe t "two columns"\nresource heap keyed by (pid, address) {\n'
        "  acquire libc:malloc(size) -> (pid, ret) when ret != 0 size = size\n"
        "  release libc:free(ptr) -> (pid, ptr)\n  record size, ustack, pid\n}\n"
        "report outstanding heap by ustack: sum(size) as x, count() as x\n"
    )
    with pytest.raises(RecipeError) as exc:
        checker.check(parser.parse(source, "t.probe"))
    assert "t.probe:7:" in exc.value.render() and "column 'x' is already in this report" in exc.value.render()


def test_bcc_syscall_stacks_fall_back_to_the_frame_walk_before_task_registers(monkeypatch):
    """A system call's tracepoint unwinds from the task's saved user registers
    (bpf_task_pt_regs, kernel 5.15); on an older kernel fdleak's program is --stacks fp's, said
    in one note, never a program the kernel refuses."""
    from probedsl.process import procfs

    program = dataclasses.replace(recipe_program(str(ROOT / "recipes" / "fdleak.probe")), stacks="dwarf")
    target = targets.for_version("bcc", None)
    assert "bpf_task_pt_regs" in backends.for_target(target).generate(program).text
    monkeypatch.setattr(procfs, "kernel_release", lambda: (5, 10))
    old = backends.for_target(target).generate(program)
    assert "bpf_task_pt_regs" not in old.text and not old.manifest["dwarf"]
    assert old.text == backends.for_target(target).generate(dataclasses.replace(program, stacks="fp")).text
    (note,) = [n for n in target.notes(program) if "bpf_task_pt_regs" in n]
    assert "frame-pointer" in note and "\n" not in note
    memleak = dataclasses.replace(memleak_program(), stacks="dwarf")  # uprobes unwind as before
    assert backends.for_target(target).generate(memleak).manifest["dwarf"]
    assert not [n for n in target.notes(memleak) if "bpf_task_pt_regs" in n]


def test_the_unwinders_tail_calls_fit_the_kernels_limit():
    """A stack of the deepest kind takes the acquire program's tail call, the first unwinder
    program's, then one per further run of the frames program: within the kernel's 33 in a row
    (MAX_TAIL_CALL_CNT), or every deep stack would end early."""
    from backends.bcc_unwinder import FRAMES_PER_RUN

    runs = -(-ir.STACK_DEPTH // FRAMES_PER_RUN)
    assert 2 + (runs - 1) <= 33


@pytest.mark.parametrize("trusted", [True, False], ids=["ours", "writable by all"])
def test_kept_templates_generate_the_same_text_and_only_ours_are_loaded(trusted, kept_between_runs, tmp_path):
    """The templates compiled to Python code are kept too: a run that loads them generates the
    text a run that compiled them did; a kept file someone else could write is not loaded."""
    import os
    import pickle

    import jinja2.bccache

    from probedsl import backends, compiler, targets

    def generated() -> str:
        compiler.keep_between_runs(cachedir.Kept)  # (the templates compiled or loaded again)
        recipe = compiler.build(compiler.load(MEMLEAK))
        return backends.for_target(targets.from_name("bcc")).generate(recipe).text

    from probedsl.trust import cachedir

    first = generated()
    files = list((kept_between_runs / "templates").glob("*.jinja"))
    assert files and all(os.stat(f).st_mode & 0o077 == 0 for f in files)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    if not trusted:
        for f in files:
            f.write_bytes(jinja2.bccache.bc_magic + pickle.dumps(Payload()))
            os.chmod(f, 0o666)
    before = {f: os.stat(f).st_ino for f in files}
    assert generated() == first
    assert not marker.exists()
    # loaded (ours: not compiled and written again), or replaced by a private one of our own
    after = {f: os.stat(f) for f in files}
    assert all((after[f].st_ino == before[f]) == trusted and after[f].st_mode & 0o077 == 0 for f in files)


def test_each_tail_call_to_an_unstacked_program_reaches_its_resource(tmp_path):
    """--stacks dwarf with a resource on uprobes and one on system calls: each array holds the
    unwinder, its frames program, then an unstacked program for each resource whose acquire
    programs are of its kind (none for the others), and each acquire program tail-calls its own."""
    recipe = tmp_path / "two.probe"
    recipe.write_text(
        'recipe two "a heap and descriptors"\n'
        "resource heap keyed by (pid, address) {\n"
        "  acquire libc:malloc(size) -> (pid, ret) when ret != 0 size = size\n"
        "  release libc:free(ptr) -> (pid, ptr) when ptr != 0\n"
        "  record size, ustack, pid\n"
        "}\n"
        "resource fd keyed by (pid, fd) {\n"
        "  acquire syscall openat -> (pid, ret) when ret >= 0\n"
        "  release syscall close -> (pid, fd)\n"
        "  record ustack, pid\n"
        "}\n"
        "report outstanding heap by ustack: count() as blocks\n"
        "report outstanding fd by ustack: count() as fds\n"
    )
    program = dataclasses.replace(recipe_program(str(recipe)), stacks="dwarf")
    gen = backends.for_target(targets.for_version("bcc", None)).generate(program)
    arrays = {u["array"]: u for u in gen.manifest["unwinders"]}
    assert [s["resource"] for s in arrays["probedsl_unwinders"]["unstacked"]] == ["heap"]
    assert [s["resource"] for s in arrays["probedsl_unwinders_syscall"]["unstacked"]] == ["fd"]
    for name, u in arrays.items():
        assert f"BPF_PROG_ARRAY({name}, {2 + len(u['unstacked'])});" in gen.text
        for s in u["unstacked"]:
            assert f"int {s['program']}(" in gen.text
            assert f"{s['resource']}_store_kept({s['resource']}_deferred(2), -1);" in gen.text
    calls = 0
    for body in re.findall(r"^(?:int \w+|TRACEPOINT_PROBE)\([^)]*\)\n\{.*?^\}", gen.text, re.M | re.S):
        for array, slot in re.findall(r"(probedsl_unwinders\w*)\.call\(\w+, (\d+)\)", body):
            if int(slot) >= 2:
                (s,) = [s for s in arrays[array]["unstacked"] if s["slot"] == int(slot)]
                assert f"{s['resource']}_unstored(2);" in body, body
                calls += 1
    assert calls == 2  # malloc's return, openat's exit


def test_bcc_walks_frame_pointers_itself_at_returns_and_takes_the_kernels_walk_elsewhere():
    """--stacks fp: a uretprobe's program walks the frames (bcc.c.j2's probedsl_fp_stack) and
    keeps them by hash, leaving to the kernel's walk only those through a pending uretprobe (a
    small stack table); a system call's takes the kernel's walk into the full-sized table."""
    from probedsl.backends.bcc import KERNEL_WALK_BUCKETS

    bcc = backend("bcc")
    heap = bcc.generate(memleak_program().walking_stacks("fp")).text
    acquires = re.findall(r"v\.ustack = (.*);", heap)
    assert acquires and set(acquires) == {"probedsl_fp_stack(ctx)"}, acquires
    assert f"probedsl_stacks, {KERNEL_WALK_BUCKETS});" in heap and "probedsl_ustacks" in heap
    fds = bcc.generate(recipe_program(str(ROOT / "recipes" / "fdleak.probe")).walking_stacks("fp")).text
    assert "probedsl_fp_stack" not in fds and "get_stackid(args, BPF_F_USER_STACK)" in fds
    assert f"probedsl_stacks, {ir.STACK_BUCKETS});" in fds and "probedsl_ustacks" not in fds
