"""The front end: parsing, located errors, semantic checks, and the CLI's error contract."""

from __future__ import annotations

import pytest

from probedsl.language import ast, checker, parser
from probedsl.errors import RecipeError

from conftest import MEMLEAK, probedsl


def parse_and_check(text: str, fields=lambda c, e: ("ptr", "bytes_alloc") if (c, e) == ("kmem", "kmalloc") else None):
    recipe = parser.parse(text, "t.probe")
    checker.check(recipe, fields)
    return recipe


def errors(text: str) -> list:
    with pytest.raises(RecipeError) as exc:
        parse_and_check(text)
    return [(d.span.line, d.span.column, d.message) for d in exc.value.diagnostics]


def test_memleak_recipe_parses_into_one_heap_resource():
    recipe = parser.parse(open(MEMLEAK).read(), MEMLEAK)
    checker.check(recipe)
    (heap,) = recipe.resources
    assert heap.key_names == ("pid", "address")
    functions = [e.probe.function for e in heap.events]
    assert functions[:3] == ["malloc", "calloc", "realloc"] and functions[-1] == "free"
    realloc = heap.events[2]
    assert len(realloc.also_releases) == 1 and realloc.also_releases[0].guard is not None


def test_out_parameter_key_and_tuple_key_parse():
    recipe = parse_and_check("""
recipe r
resource h keyed by address { acquire libc:posix_memalign(out, a, size) -> *out when ret == 0 size = size
  release libc:free(p) -> p }
resource fd keyed by (pid, fd) { acquire libc:open(path, flags) -> (pid, ret) when ret >= 0
  release libc:close(fd) -> (pid, fd) }
""")
    assert isinstance(recipe.resources[0].events[0].key[0], ast.Deref)
    assert len(recipe.resources[1].events[0].key) == 2


def test_tracepoint_fields_are_names():
    recipe = parse_and_check(
        "recipe k resource k keyed by p { acquire tracepoint kmem:kmalloc -> ptr size = bytes_alloc }"
    )
    assert recipe.resources[0].events[0].probe == ast.Tracepoint("kmem", "kmalloc")


def test_syntax_error_is_located_with_expected_tokens():
    (err,) = errors("recipe r\nresource h keyed by a {\n  acquire libc:malloc(size) ret\n}")
    assert err[:2] == (3, 29)
    assert "unexpected 'ret'" in err[2] and "'->'" in err[2]


def test_several_semantic_errors_are_reported_at_once():
    errs = errors("""recipe r
resource h keyed by address {
  acquire libc:malloc(size) -> ret when rett != 0 colour = 3
  release libc:free(p) -> (p, p)
  record size, ustack, weather
}
report outstanding h by kstack: sum(size) as bytes
""")
    messages = " | ".join(e[2] for e in errs)
    assert "unknown name 'rett'" in messages
    assert "cannot set 'colour'" in messages
    assert "keyed by 1 value(s)" in messages
    assert "cannot record 'weather'" in messages
    assert "'kstack' is not recorded" in messages
    assert [e[0] for e in errs] == sorted(e[0] for e in errs) and len(errs) == 5


def test_deref_needs_an_argument_name():
    (err,) = errors("recipe r resource h keyed by a { acquire libc:f(x) -> *ret }")
    assert "out-parameter" in err[2]


def test_unknown_tracepoint_is_an_error():
    (err,) = errors("recipe r resource h keyed by a { acquire tracepoint kmem:nope -> ptr }")
    assert "tracepoint kmem:nope does not exist" in err[2]


def test_duplicate_names_are_errors():
    errs = errors("recipe r param a = 1 param a = 2 resource h keyed by k { acquire l:f(x, x) -> x }")
    assert any("parameter 'a' is defined twice" in e[2] for e in errs)
    assert any("argument 'x' is named twice" in e[2] for e in errs)


def test_rendered_error_has_file_line_col_line_and_caret():
    with pytest.raises(RecipeError) as exc:
        parse_and_check("recipe r\nresource h keyed by a { acquire libc:f(x) -> y }\n")
    text = exc.value.render()
    head, line, caret = text.splitlines()
    assert head.startswith("t.probe:2:46: error: unknown name 'y'")
    assert line.strip() == "resource h keyed by a { acquire libc:f(x) -> y }"
    assert caret.index("^") == line.index("y", 40)


def test_check_cli_reports_location_without_traceback(tmp_path):
    bad = tmp_path / "bad.probe"
    lines = open(MEMLEAK).read().splitlines()
    lines[2] = "  this is not valid ((("
    bad.write_text("\n".join(lines))
    result = probedsl("check", str(bad))
    assert result.returncode != 0
    assert f"{bad}:3:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_check_cli_accepts_memleak_and_says_what_it_found():
    result = probedsl("check", MEMLEAK)
    assert result.returncode == 0, result.stderr
    assert "ok (1 resource(s)" in result.stdout


def test_unknown_function_in_library_suggests_near_names(tmp_path):
    recipe = tmp_path / "typo.probe"
    recipe.write_text("recipe t\nresource h keyed by a {\n  acquire libc:mallocc(n) -> ret\n}\n")
    result = probedsl("check", str(recipe))
    assert result.returncode == 1
    assert f"{recipe}:3:11: error: function 'mallocc' not found" in result.stderr
    assert "did you mean malloc" in result.stderr


def test_missing_recipe_file_is_one_line_error():
    result = probedsl("check", "/nonexistent/x.probe")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("probedsl: error: recipe not found: /nonexistent/x.probe (bundled: ")


SYSCALL_FIELDS = {
    ("syscalls", "sys_enter_pipe2"): ("__syscall_nr", "fildes", "flags"),
    ("syscalls", "sys_exit_pipe2"): ("__syscall_nr", "ret"),
    ("syscalls", "sys_enter_close"): ("__syscall_nr", "fd"),
    ("syscalls", "sys_exit_close"): ("__syscall_nr", "ret"),
}


def test_syscall_probes_name_entry_fields_and_the_exits_ret():
    from probedsl import ir
    from probedsl.ir import lower

    recipe = parser.parse(
        """recipe r resource fd keyed by (pid, fd) {
  acquire syscall pipe2 -> (pid, fildes[0]) when ret == 0 acquires (pid, fildes[1])
  release syscall close -> (pid, fd) }""",
        "t.probe",
    )
    checker.check(recipe, lambda c, e: SYSCALL_FIELDS.get((c, e)))
    assert recipe.resources[0].events[0].probe == ast.Syscall("pipe2")
    pipe2, close = lower.lower(recipe, {}).resources[0].probes
    # the exit acts, with the entry's field saved per thread; close acts at its entry
    assert (pipe2.kind, pipe2.function, pipe2.at_return, pipe2.fields, pipe2.saved_args) == (
        "syscall",
        "pipe2",
        True,
        ("fildes",),
        (0,),
    )
    assert pipe2.actions[0].key == (ir.Builtin("pid"), ir.Deref(ir.Saved(0, 0), 0, 4))
    assert pipe2.actions[0].guard == ir.BinOp("==", ir.Field("ret"), ir.Const(0))
    assert (close.at_return, close.actions[0].key) == (False, (ir.Builtin("pid"), ir.Field("fd")))


def test_syscall_errors_are_located():
    recipe = parser.parse(
        "recipe r resource fd keyed by (pid, fd) {\n  acquire syscall nope -> (pid, ret)\n"
        "  release syscall close -> (pid, fildes) }",
        "t.probe",
    )
    with pytest.raises(RecipeError) as exc:
        checker.check(recipe, lambda c, e: SYSCALL_FIELDS.get((c, e)))
    got = [(d.span.line, d.span.column, d.message) for d in exc.value.diagnostics]
    assert (2, 11) == got[0][:2] and "system call 'nope' has no tracepoints" in got[0][2], got
    assert got[1][0] == 3 and "unknown name 'fildes': not a tracepoint field" in got[1][2], got


def test_a_release_through_a_last_key_lowers_to_a_range_and_belongs_on_releases_only():
    from probedsl import ir
    from probedsl.ir import lower

    fields = {
        **SYSCALL_FIELDS,
        ("syscalls", "sys_enter_close_range"): ("fd", "max_fd", "flags"),
        ("syscalls", "sys_exit_close_range"): ("ret",),
    }
    recipe = parser.parse(
        """recipe r resource fd keyed by (pid, fd) {
  acquire syscall pipe2 -> (pid, fildes[0]) when ret == 0
  release syscall close_range -> (pid, fd) through max_fd when flags % 8 < 4 }""",
        "t.probe",
    )
    checker.check(recipe, lambda c, e: fields.get((c, e)))
    (action,) = lower.lower(recipe, {}).resources[0].probes[1].actions
    assert (action.kind, action.key, action.through) == (
        "release",
        (ir.Builtin("pid"), ir.Field("fd")),
        ir.Field("max_fd"),
    )
    wrong = parser.parse(
        """recipe r resource fd keyed by (pid, fd) {
  acquire syscall pipe2 -> (pid, fildes[0]) through 3 when ret == 0
  release syscall close_range -> (pid, fd) through max_fd through 9 }""",
        "t.probe",
    )
    with pytest.raises(RecipeError) as exc:
        checker.check(wrong, lambda c, e: fields.get((c, e)))
    got = [(d.span.line, d.message) for d in exc.value.diagnostics]
    assert [line for line, _ in got] == [2, 3] and all("belongs on a release, once" in m for _, m in got), got


CLOEXEC_FIELDS = {
    **SYSCALL_FIELDS,
    ("syscalls", "sys_enter_fcntl"): ("fd", "cmd", "arg"),
    ("syscalls", "sys_exit_fcntl"): ("ret",),
    ("syscalls", "sys_enter_ioctl"): ("fd", "cmd", "arg"),
    ("syscalls", "sys_exit_ioctl"): ("ret",),
}


def test_until_exec_stamps_acquisitions_and_changes_and_is_checked():
    """`until exec when COND` (an acquire's, a `changes` clause's, a change event's) lowers to the
    action's until_exec; the resource's entries then end with their image when it held."""
    from probedsl import ir
    from probedsl.ir import layout, lower

    recipe = parser.parse(
        """recipe r resource fd keyed by (pid, fd) {
  acquire syscall pipe2 -> (pid, fildes[0]) when ret == 0 until exec when flags / 524288 % 2 == 1
      acquires (pid, fildes[1])
  acquire syscall fcntl -> (pid, ret) when ret >= 0 && cmd == 1030 until exec when cmd == 1030
      changes (pid, fd) when ret == 0 && cmd == 2 until exec when arg % 2 == 1
  change syscall ioctl -> (pid, fd) when ret == 0 until exec when cmd == 0x5451
  release syscall close -> (pid, fd) }""",
        "t.probe",
    )
    checker.check(recipe, lambda c, e: CLOEXEC_FIELDS.get((c, e)))
    res = lower.lower(recipe, {}).resources[0]
    pipe2, fcntl, ioctl, close = (p.actions for p in res.probes)
    assert [a.kind for a in pipe2] == ["acquire", "acquire"] and pipe2[0].until_exec == pipe2[1].until_exec
    assert pipe2[0].until_exec is not None
    assert [(a.kind, a.key[1]) for a in fcntl] == [("acquire", ir.Field("ret")), ("change", ir.Saved(1, 1))]
    assert fcntl[1].until_exec == ir.BinOp("==", ir.BinOp("%", ir.Saved(2, 2), ir.Const(2)), ir.Const(1))
    assert [a.kind for a in ioctl] == ["change"] and close[0].until_exec is None
    assert layout.ends_with_image(res) and not layout.every_entry_ends_with_image(res)
    assert layout.image_stamp(res, close[0]) is False and layout.image_stamp(res, ioctl[0]) == ioctl[0].until_exec


@pytest.mark.parametrize(
    "line, column, message",
    [
        ("release syscall close -> (pid, fd) until exec when 1", (3, 54), "belongs on an acquire or a change"),
        ("change syscall ioctl -> (pid, fd) when ret == 0", (3, 3), "a change says what it changes once"),
        ("release syscall close -> (pid, fd) changes (pid, fd) until exec when 1", (3, 38), "'changes' belongs on"),
        ("acquire libc:dup(x) -> (pid, ret) until exec when 1", (3, 53), "for system calls and tracepoints"),
        ("change syscall ioctl -> (fd, pid) until exec when cmd == 1", (3, 53), "starts with pid"),
        ("change syscall ioctl -> (pid, fd) size = 1 until exec when 1", (3, 37), "a change cannot set values"),
    ],
)
def test_until_exec_errors_are_located(line, column, message):
    text = f"""recipe r resource fd keyed by (pid, fd) {{
  acquire syscall pipe2 -> (pid, fildes[0]) when ret == 0
  {line} }}"""
    with pytest.raises(RecipeError) as exc:
        parse_and_check(text, lambda c, e: CLOEXEC_FIELDS.get((c, e)))
    got = [(d.span.line, d.span.column, d.message) for d in exc.value.diagnostics]
    assert any((ln, col) == column and message in m for ln, col, m in got), got


def test_until_exec_syntax_errors_are_located():
    with pytest.raises(RecipeError) as exc:
        parser.parse("recipe r resource fd keyed by (pid, fd) {\n  acquire syscall open -> (pid, ret) until when 1 }")
    (d,) = exc.value.diagnostics
    assert (d.span.line, d.span.column) == (2, 44) and "expected 'exec'" in d.message, d.message


def test_the_kept_grammar_parses_as_the_built_one(kept_between_runs):
    """Lark's analysis of the grammar is kept in the cache: the parser loaded from it gives the
    same trees and the same located errors as the one built from the grammar."""
    import glob
    import os

    bad = "recipe r\nresource h keyed by address { acquire libc:malloc(n) -> }\n"
    runs = []
    for _ in range(2):  # the first builds and keeps it, the second loads it
        parser._parser.cache_clear()
        trees = [parser.parse(open(path).read(), path) for path in sorted(glob.glob("recipes/*.probe"))]
        runs.append((trees, errors(bad)))
    (kept,) = glob.glob(str(kept_between_runs / "grammar" / "recipe-*.pickle"))
    assert os.stat(kept).st_mode & 0o077 == 0
    assert runs[0] == runs[1] and runs[0][1], runs[0][1]
    parser._parser.cache_clear()


@pytest.mark.parametrize("how", ["writable by all", "a symbolic link"])
def test_a_kept_grammar_others_could_write_is_never_loaded(how, kept_between_runs, tmp_path, monkeypatch):
    """The kept parser is a pickle: one that someone else could have written (writable by all,
    or a link to a file elsewhere, itself private) is not loaded, and the parser is built again."""
    import os
    import pickle

    from probedsl.trust import cachedir

    parser._parser()
    parser._parser.cache_clear()
    (kept,) = (kept_between_runs / "grammar").glob("recipe-*.pickle")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    if how == "writable by all":
        kept.write_bytes(pickle.dumps(Payload()))
        os.chmod(kept, 0o666)
    else:
        elsewhere = tmp_path / "elsewhere.pickle"
        elsewhere.write_bytes(pickle.dumps(Payload()))
        os.chmod(elsewhere, 0o600)
        kept.unlink()
        kept.symlink_to(elsewhere)
    said = []
    monkeypatch.setattr(cachedir, "note", said.append)
    try:
        recipe = parser.parse(open(MEMLEAK).read(), MEMLEAK)
    finally:
        parser._parser.cache_clear()
    assert not marker.exists()
    assert recipe.resources and any(str(kept) in s for s in said), said


def test_the_install_builds_the_grammar_and_templates_once_for_every_run(kept_between_runs, tmp_path, monkeypatch):
    """scripts/setup.sh's build_once keeps the parser's tables and the compiled templates in the
    environment, readable by all and writable by no one else (and changes nothing a link there
    points to); a run with an empty cache loads them from there and keeps nothing of its own;
    one that others could write, or in a directory others could write, is not loaded."""
    import os
    import pickle
    import stat

    from backends import base
    from probedsl import cli

    shipped = tmp_path / "shipped"
    (shipped / "grammar").mkdir(parents=True, mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    os.chmod(elsewhere, 0o600)
    (shipped / "grammar" / "a-link").symlink_to(elsewhere)
    cli.build_once()
    base.keep_no_templates()
    kept_grammar = list((shipped / "grammar").glob("recipe-*.pickle"))
    templates = list((shipped / "templates").glob("*.jinja"))
    assert len(kept_grammar) == 1 and len(templates) == len(base._environment().list_templates())
    for path in [shipped, shipped / "grammar", shipped / "templates"]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755, path
    for path in [*kept_grammar, *templates]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert stat.S_IMODE(os.stat(elsewhere).st_mode) == 0o600

    from probedsl import compiler
    from probedsl.trust import cachedir

    compiler.keep_between_runs(cachedir.Kept)  # a run's, with the empty tmp_path/cache
    loads = []
    load = parser.Lark.load
    monkeypatch.setattr(parser.Lark, "load", classmethod(lambda cls, f: loads.append(f) or load(f)))
    parser._parser.cache_clear()
    try:
        recipe = parser.parse(open(MEMLEAK).read(), MEMLEAK)
        assert recipe.resources and len(loads) == 1
        assert not list(kept_between_runs.glob("grammar/*"))  # (nothing built, so nothing kept)

        (kept,) = kept_grammar
        marker = tmp_path / "ran"

        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        kept.write_bytes(pickle.dumps(Payload()))
        for untrusted, mode in ((kept, 0o666), (shipped / "grammar", 0o777)):
            os.chmod(kept, 0o644)
            os.chmod(untrusted, mode)
            for built in kept_between_runs.glob("grammar/*"):  # (the one built after the last refusal)
                built.unlink()
            parser._parser.cache_clear()
            assert parser.parse(open(MEMLEAK).read(), MEMLEAK).resources and len(loads) == 1
            assert not marker.exists()
    finally:
        parser._parser.cache_clear()


def test_the_install_refuses_to_build_where_others_could_write(tmp_path, monkeypatch):
    """build_once into a directory others can write says so in one line and exits 1, writing
    nothing there (and not into the user's own cache instead)."""
    import os

    from probedsl import cli
    from probedsl.trust import cachedir

    shipped = tmp_path / "open" / "shipped"
    shipped.mkdir(parents=True)
    os.chmod(tmp_path / "open", 0o777)
    monkeypatch.setattr(cachedir, "shipped_root", lambda: str(shipped))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exc:
        cli.build_once()
    assert "cannot build into" in str(exc.value) and "writable" in str(exc.value)
    assert not list(shipped.iterdir()) and not (tmp_path / "cache").exists()
