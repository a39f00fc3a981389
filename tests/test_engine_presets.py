"""Preset variants (several instances, chunked prefill, colocated replicas, auto-sized pools,
the GPU speed options) give one device's tokens, and warm-up compiles what serving uses."""

from pathlib import Path

import jax
import numpy as np
import pytest
from test_engine import _prompts

from jdisagg.engine import Engine
from jdisagg.sched.params import SamplingParams


def _mesh_text(mesh: str) -> str:
    return (Path(__file__).resolve().parent.parent / "meshes" / f"{mesh}.toml").read_text()


def _cut_preset(tmp_path, mesh: str, max_seq_len: int, last_table: str = "") -> str:
    """Preset ``mesh`` with its context cut to ``max_seq_len`` (as long as these tests'
    requests need: fewer length and page-table width buckets to compile) and ``last_table``
    added to its last instance's table, written to a file."""
    text = _mesh_text(mesh)
    lines = text.splitlines()
    lines = [f"max_seq_len = {max_seq_len}" if line.startswith("max_seq_len = ") else line for line in lines]
    assert lines != text.splitlines()
    path = tmp_path / f"{mesh}-{max_seq_len}.toml"
    path.write_text("\n".join([*lines, last_table]) + "\n")
    return str(path)


def test_two_prefill_and_two_decode_instances(tmp_path):
    """cpu-2p2d: both decode instances take requests (least-loaded routing); tokens unchanged."""
    prompts = _prompts(seed=9, lengths=(5, 40, 12, 70, 3, 25, 9, 33))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    reference = [
        c.tokens for c in Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    ]
    engine = Engine("tiny-llama", _cut_preset(tmp_path, "cpu-2p2d", 128), warm_up=False, progress=False)
    assert len(engine.prefill) == 2 and len(engine.decode) == 2
    assert [c.tokens for c in engine.generate(prompts, params)] == reference
    assert [d.slots.admitted for d in engine.decode] == [4, 4]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-opt"])
def test_chunked_prefill_matches(tmp_path, model_name):
    """cpu-chunked: prompts prefilled 32 tokens at a time alongside decode steps give the same
    tokens (and log-probabilities) as one device; every page comes back."""
    prompts = _prompts(seed=4, lengths=(5, 17, 70, 9, 33, 1, 64))
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=1)
    reference = Engine(model_name, "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    engine = Engine(
        model_name, _cut_preset(tmp_path, "cpu-chunked", 128, "batch_buckets = [8]"), warm_up=False, progress=False
    )
    assert engine.preset.colocated and not engine.prefill
    results = engine.generate(prompts, params)
    assert [c.tokens for c in results] == [c.tokens for c in reference]
    for got, want in zip(results, reference, strict=True):
        np.testing.assert_allclose([lp.logprob for lp in got.logprobs], [lp.logprob for lp in want.logprobs], atol=1e-4)
    slots = engine.decode[0].slots
    assert slots.chunking is None and slots.allocator.num_free == slots.allocator.capacity


def _generate_compiles(engine, prompts, params, caplog) -> tuple[list, list[str]]:
    """The engine's results, and what JAX compiled while producing them."""
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        results = engine.generate(prompts, params)
    return results, [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]


def test_colocated_compiles_every_shape_at_start_up(tmp_path, caplog):
    """A colocated instance whose decode batch buckets exceed the prefill token budget: its
    prefill calls pack prompts into rows of the length buckets (a long prompt alone),
    warm-up compiles every program the requests then use, and tokens equal one device's."""
    (tmp_path / "colocated.toml").write_text(
        'name = "colocated-buckets"\npage_size = 16\nmax_seq_len = 256\n\n'
        "[[colocated]]\ndevices = [0]\nmax_batch = 8\nbatch_buckets = [4, 8]\ntoken_budget = 64\npages = 64\n"
    )
    prompts = _prompts(seed=11, lengths=(5, 100, 200, 9, 30, 7, 12))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    reference = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    engine = Engine("tiny-llama", str(tmp_path / "colocated.toml"), progress=False)
    runner = engine.prefill[0]
    assert runner.token_buckets == runner.length_buckets == (16, 32, 64, 128, 256)
    assert runner.max_prompts == 4  # 64 tokens / 16, the smallest bucket
    results, compiled = _generate_compiles(engine, prompts, params, caplog)
    assert not compiled, compiled
    assert [c.tokens for c in results] == [c.tokens for c in reference]


def test_disaggregated_compiles_everything_at_start_up(tmp_path, caplog):
    """tp=2 prefill -> pp=2 decode: the KV reshard between the two splits (cut and join
    programs per prefix length) and the split of a batch into prefixes (any number of rows)
    compile in warm-up; serving compiles nothing."""
    prompts = _prompts(seed=14, lengths=(5, 100, 200, 9, 30, 7, 12, 3, 60))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine = Engine("tiny-llama", _cut_preset(tmp_path, "cpu-tp2-pp2", 256), progress=False)
    reference = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    results, compiled = _generate_compiles(engine, prompts, params, caplog)
    assert not compiled, compiled
    assert [c.tokens for c in results] == [c.tokens for c in reference]


_ONE_TO_ONE = """page_size = 16
max_seq_len = 128
[[prefill]]
devices = [0]
max_batch = 4
token_budget = 256
[[decode]]
devices = [1]
max_batch = 8
batch_buckets = [8]
pages = 64
"""
_CHUNKED_ONE = """page_size = 16
max_seq_len = 128
[[chunked]]
devices = [0]
max_batch = 8
pages = 64
batch_buckets = [8]
chunk_tokens = 32
"""


@pytest.mark.parametrize(
    "option,text",
    [
        ("unroll_layers = true", _mesh_text("cpu-tp2-pp2")),
        ('decode_attention = "pallas"', _ONE_TO_ONE),
        ('decode_attention = "pallas"', _CHUNKED_ONE),
        ('unroll_layers = true\ndecode_attention = "pallas"', _ONE_TO_ONE),
    ],
    ids=["unrolled-tp2-pp2", "pallas-1p1d", "pallas-chunked", "unrolled-pallas-1p1d"],
)
def test_gpu_options_give_the_same_tokens(tmp_path, option, text):
    """The GPU speed options of a preset, ``unroll_layers = true`` (on a tp=2 -> pp=2
    pipeline) and ``decode_attention = "pallas"`` (the paged kernel, interpreted on CPU;
    disaggregated 1 -> 1 and chunked prefill): the same tokens as one device with neither."""
    (tmp_path / "options.toml").write_text(f"{option}\n{text}")
    prompts = _prompts(seed=12)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    reference = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    engine = Engine("tiny-llama", str(tmp_path / "options.toml"), warm_up=False, progress=False)
    assert (engine.preset.unroll_layers, engine.preset.decode_attention) != (False, "dot")
    runner = engine.decode[0].runner
    if engine.preset.decode_attention == "pallas":  # the kernel needs no narrower tables
        assert runner.width_buckets == (runner.max_pages_per_seq,)
    else:
        assert len(runner.width_buckets) > 1
    assert [c.tokens for c in engine.generate(prompts, params)] == [c.tokens for c in reference]


def test_colocated_auto_pages_keep_memory_for_prefill(tmp_path, monkeypatch):
    """A colocated instance sized from device memory (``pages`` left out) leaves room beside
    its pool for the prefixes its prefill may hold (buffer + one call's prefixes + the packed
    row they are cut from) and the largest prefill program's scratch; still the same tokens."""
    from jdisagg.runtime import memory as engine_module

    (tmp_path / "auto.toml").write_text(
        'name = "colocated-auto"\npage_size = 16\nmax_seq_len = 256\n\n'
        "[[colocated]]\ndevices = [0, 1]\ntp = 2\nmax_batch = 8\ntoken_budget = 64\nbuffer_tokens = 96\n"
    )
    free = 8 * 2**20
    monkeypatch.setattr(engine_module, "free_device_bytes", lambda mesh: free)
    engine = Engine("tiny-llama", str(tmp_path / "auto.toml"), warm_up=False, progress=False)
    cfg, runner = engine.cfg, engine.prefill[0]
    token_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 // 2  # float32, KV heads split over tp=2
    held = (96 + runner.token_buckets[-1] + runner.call_tokens()) * token_bytes
    assert held > 96 * token_bytes
    pages = engine.decode[0].runner.n_pages
    assert 0 < pages * 16 * token_bytes <= engine_module.KV_MEMORY_FRACTION * (free - held)
    assert pages < engine_module.KV_MEMORY_FRACTION * free // (16 * token_bytes)  # less than without the reserve
    prompts = _prompts(seed=13)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    reference = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    assert [c.tokens for c in engine.generate(prompts, params)] == [c.tokens for c in reference]

    free = held + 4 * 16 * token_bytes  # four pages beyond prefill's share; a request needs 17
    with pytest.raises(
        ValueError,
        match=r"colocated\[0\]: free memory holds \d+ KV pages after [\d.]+ MiB for prefill; one request needs 17",  # noqa: E501
    ):
        Engine("tiny-llama", str(tmp_path / "auto.toml"), warm_up=False, progress=False)


def test_colocated_replicas_decode_what_they_prefilled(tmp_path, monkeypatch):
    """Two colocated replicas share the prompt queue, but a prefix never moves to the other
    replica's device: each decodes what it prefilled. Tokens equal one device's."""
    from jdisagg.transfer import reshard

    (tmp_path / "replicas.toml").write_text(
        'name = "replicas"\npage_size = 16\nmax_seq_len = 256\n'
        + "".join(f"\n[[colocated]]\ndevices = [{i}]\nmax_batch = 4\ntoken_budget = 64\npages = 64\n" for i in (0, 1))
    )
    prompts = _prompts(seed=15, lengths=(5, 40, 9, 30, 17, 3, 60, 12, 25, 8))
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    reference = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    moves, transfer = [], reshard.transfer
    monkeypatch.setattr(
        reshard,
        "transfer",
        lambda prefix, dst: moves.append((prefix.k.devices(), dst.device_set)) or transfer(prefix, dst),
    )
    engine = Engine("tiny-llama", str(tmp_path / "replicas.toml"), warm_up=False, progress=False)
    results = engine.generate(prompts, params)
    assert [c.tokens for c in results] == [c.tokens for c in reference]
    assert len(moves) == len(prompts)
    assert all(src == dst for src, dst in moves), moves
    assert len({frozenset(d) for d, _ in moves}) == 2  # both replicas served


def test_two_device_preset_runs_any_model(tmp_path, monkeypatch):
    """``1p1d`` (the notebook's preset for two or more accelerators) sizes its pool from device
    memory; with memory statistics faked on CPU it gives one device's tokens (its context cut
    to the tiny model's 1024 tokens)."""
    from jdisagg.runtime import memory as engine_module

    text = (Path(__file__).resolve().parent.parent / "meshes" / "1p1d.toml").read_text()
    assert "max_seq_len = 2048" in text
    (tmp_path / "1p1d.toml").write_text(text.replace("max_seq_len = 2048", "max_seq_len = 1024"))
    monkeypatch.setattr(engine_module, "free_device_bytes", lambda mesh: 64 * 2**20)
    prompts = _prompts(seed=16)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine = Engine("tiny-qwen2", str(tmp_path / "1p1d.toml"), warm_up=False, progress=False)
    assert [s.devices for s in engine.preset.instances] == [(0,), (1,)]
    reference = Engine("tiny-qwen2", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    assert [c.tokens for c in engine.generate(prompts, params)] == [c.tokens for c in reference]
