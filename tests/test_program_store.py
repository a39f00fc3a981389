"""The program store (``runtime.compile``): a start that finds its programs there traces and
lowers none of them and generates the same tokens; keys follow what decides a program; a
damaged entry is compiled and written again."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jdisagg.engine import Engine
from jdisagg.model import attention
from jdisagg.runtime import compile as compile_module
from jdisagg.runtime.compile import Jitted, Program, ProgramStore, compile_all
from jdisagg.sched.params import SamplingParams


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    """A fresh, empty store (beside the session's compilation cache it would be shared)."""
    assert ProgramStore.default() is not None  # the session's cache is on (conftest), so the store is
    monkeypatch.setattr(ProgramStore, "default", classmethod(lambda cls: cls(tmp_path / "programs")))
    return tmp_path / "programs"


def _lowerings(monkeypatch) -> list:
    calls = []
    lower = Jitted.lower
    monkeypatch.setattr(Jitted, "lower", lambda self, *args: calls.append(self.fn) or lower(self, *args))
    return calls


def test_a_start_from_the_store_lowers_nothing_and_generates_the_same_tokens(store_dir, monkeypatch):
    """The default preset's layout (host-loop prefill and decode instances) on the tiny model:
    the first engine writes every program, a second one reads them all back (no program is
    traced or lowered) and its tokens equal the first's."""
    prompts = [[5, 9, 2, 7], list(range(3, 40)), [11] * 20]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = Engine("tiny-llama", "cpu", progress=False)
    written = sorted(p.name for p in store_dir.iterdir())
    programs = [p for r in first.instances.prefill for p in r.programs()]
    programs += [p for d in first.instances.decode for p in d.programs()]
    assert len(written) == len(programs)
    want = first.generate(prompts, params)

    lowered = _lowerings(monkeypatch)
    second = Engine("tiny-llama", "cpu", progress=False)
    assert not lowered, lowered
    assert sorted(p.name for p in store_dir.iterdir()) == written
    got = second.generate(prompts, params)
    assert not lowered, lowered  # serving ran the store's executables, no fallback to jit
    assert [c.tokens for c in got] == [c.tokens for c in want]


def _program(fn=None, device=0, **options) -> Program:
    fn = fn or functools.partial(_scaled, 2.0)
    x = jax.device_put(np.ones((4,), np.float32), jax.devices()[device])
    return Program("p", Jitted(fn, **options), (x,))


def _scaled(factor, x):
    return x * factor * attention.BLOCK_TOKENS


def test_keys_follow_what_decides_the_program(store_dir, monkeypatch):
    store = ProgramStore.default()
    settings = compile_module._settings()
    key = store.key(_program(), settings)
    assert key == store.key(_program(), compile_module._settings())  # stable
    assert key != store.key(_program(functools.partial(_scaled, 3.0)), settings)  # fixed arguments
    assert key != store.key(_program(device=1), settings)  # the devices
    assert key != store.key(_program(donate_argnums=0), settings)  # jit options
    monkeypatch.setattr(attention, "BLOCK_TOKENS", 64)
    assert key != store.key(_program(), compile_module._settings())  # a module setting
    monkeypatch.setattr(attention, "attend", lambda *a: None)
    assert key != store.key(_program(), compile_module._settings())  # a module function replaced
    # Nothing a key can describe from one start to the next: compiled every start, as before.
    assert store.key(_program(lambda x: x + 1), settings) is None
    assert store.key(_program(functools.partial(_scaled, object())), settings) is None


def test_a_damaged_entry_is_compiled_and_written_again(store_dir, caplog):
    p = _program()
    compile_all([p])
    [entry] = store_dir.iterdir()
    entry.write_bytes(b"not a program")
    again = _program()
    compile_all([again])
    assert "unreadable" in caplog.text
    np.testing.assert_array_equal(again.jitted(*again.args), np.full(4, 2.0 * attention.BLOCK_TOKENS))
    assert entry.read_bytes() != b"not a program"
    reread = _program()
    compile_all([reread])
    np.testing.assert_array_equal(reread.jitted(*reread.args), again.jitted(*again.args))


def test_without_a_store_the_executables_still_serve_the_calls(monkeypatch):
    monkeypatch.setattr(ProgramStore, "default", classmethod(lambda cls: None))
    p = _program()
    compile_all([p])
    assert p.jitted.made(p.args) is not None  # the executable still serves the calls
