"""A release call that enters its probed function twice (probedsl.passes.reentry): a tail jump back
to the entry (glibc 2.43's free) and a function that is one jump to another probed one (sid
jemalloc's sized delete[]), on a fixture with both shapes written by hand."""

from __future__ import annotations

import pytest

from conftest import BACKENDS, FIXTURES, probedsl, report_json
from probedsl import compiler, targets
from probedsl.binaries import elf, x86
from probedsl.passes import placement, reentry


@pytest.fixture(scope="module")
def traced(build, tmp_path_factory):
    exe = build("reenter")
    recipe = tmp_path_factory.mktemp("reentry") / "reenter.probe"
    recipe.write_text((FIXTURES / "reenter.probe").read_text().replace("EXE", exe))
    return exe, str(recipe)


def test_the_jump_back_is_found_and_the_forwarding_function_left_unprobed(traced):
    exe, recipe = traced
    program = reentry.apply(placement.apply(compiler.build(compiler.load(recipe))))
    probes = {p.function: p for r in program.resources for p in r.probes}
    put, array = probes["block_put"], probes["block_put_array"]
    syms = elf.symbols(exe)
    # block_put+3 (the je), and the jmp back to block_put at its end: found, with its bytes
    assert put.place_in(exe)[0] == 3
    (site,) = put.reentered
    assert (site.target, site.origin) == (0, "block_put")
    assert syms.function_at(site.address) == ("block_put", site.address - syms.address_of("block_put"))
    assert x86.still_at(exe, site.address, site.code) and site.code.startswith(("eb", "e9"))
    # block_put_array is `jmp block_put`, block_put_nothrow `jmp block_put_array`: every call of
    # either is a call of block_put, whose probe alone is attached
    for forwarding in (array, probes["block_put_nothrow"]):
        assert forwarding.forwards == (exe,) and forwarding.attached_files == () and forwarding.reentered == ()
    assert put.forwards == () and put.attached_files == (exe,)
    listed = probedsl("check", recipe).stdout
    assert f"block_put: entered again within one block_put call by the tail jump at 0x{site.address:x}" in listed
    assert listed.count("not probed in") == 2, listed
    # bpftrace 0.27 probes the jump by address; 0.17 cannot (no bfd): block_put leaves the mark
    new, old = (compiler.generate(program, targets.from_name(t)).standalone for t in ("bpftrace-0.27", "bpftrace-0.17"))
    assert f"{exe}:0x{site.address:x}" in new and f"{exe}:block_put_array" not in new
    assert f":0x{site.address:x}" not in old and old.count('@block_reentered[tid] = reg("sp")') == 1
    assert new.count('@block_reentered[tid] == reg("sp")') == old.count('@block_reentered[tid] == reg("sp")') == 1


@pytest.mark.debian13
@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_entering_its_release_twice_releases_once(backend, traced):
    """10 got, 8 put back (3 through the jump back, 3 through the forwarding ones), 2 live, no
    unknown release (a bpftrace without bfd cannot probe the jump: block_put leaves the mark)."""
    exe, recipe = traced
    result = probedsl("run", recipe, "--backend", backend, "--format", "json", "--", exe)
    assert result.returncode == 0, result.stderr
    assert "slow path taken 3 times" in result.stderr
    block = report_json(result.stdout)["resources"]["block"]
    assert (block["live_bytes"], block["live_blocks"], block["acquired"]) == (16, 2, 10), block
    assert (block["released"], block["unknown_releases"]) == (8, 0), block
