"""Greedy (and seeded sampling) tokens are identical on every mesh layout."""

from pathlib import Path

import jax
import numpy as np
import pytest

from jdisagg.engine import Engine
from jdisagg.model import axes, sharding
from jdisagg.model.config import shape
from jdisagg.model.decoder import init_params
from jdisagg.runtime.buckets import bucket_for
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.params import SamplingParams

MESHES = ["cpu-single", "cpu-colocated-tp4", "cpu-tp2-pp2", "cpu-tp4-pp2tp2"]


def _prompts(seed=0, lengths=(5, 17, 33, 9, 1)):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-opt", "tiny-qwen2"])
def model_runs(request):
    """Per mesh: greedy tokens, and tokens sampled at temperature 1 with per-request seeds."""
    prompts = _prompts()
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    sampled = [
        SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, top_k=50, top_p=0.9, seed=s)
        for s in range(len(prompts))
    ]
    runs = {}
    for mesh in MESHES:
        engine = Engine(request.param, mesh, warm_up=False, progress=False)
        runs[mesh] = (
            [c.tokens for c in engine.generate(prompts, greedy)],
            [c.tokens for c in engine.generate(prompts, sampled)],
            engine,
        )
    return runs


def test_greedy_tokens_equal_across_meshes(model_runs):
    reference = model_runs["cpu-single"][0]
    assert all(len(t) == 12 for t in reference)
    for mesh in MESHES[1:]:
        assert model_runs[mesh][0] == reference, mesh


def test_seeded_sampling_equal_across_meshes(model_runs):
    reference = model_runs["cpu-single"][1]
    assert reference != model_runs["cpu-single"][0]  # sampling actually sampled
    for mesh in MESHES[1:]:
        assert model_runs[mesh][1] == reference, mesh


def test_engines_release_all_pages(model_runs):
    for mesh, (_, _, engine) in model_runs.items():
        for d in engine.decode:
            assert d.slots.allocator.num_free == d.slots.allocator.capacity, mesh
            assert not d.slots.running


def test_disaggregated_meshes_use_distinct_devices(model_runs):
    engine = model_runs["cpu-tp4-pp2tp2"][2]
    prefill_devices = set(engine.prefill[0].mesh.devices.flat)
    decode_devices = set(engine.decode[0].runner.mesh.devices.flat)
    assert len(prefill_devices) == 4 and len(decode_devices) == 4
    assert not prefill_devices & decode_devices
    assert prefill_devices | decode_devices == set(jax.devices())


def test_stop_conditions():
    engine = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)
    prompt = _prompts(lengths=(7,))[0]
    free = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.tokens) == 10
    stop_at = free.tokens[4]
    first = free.tokens.index(stop_at)
    stopped = engine.generate([prompt], SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: first + 1]
    # EOS stops unless ignore_eos: make the model's EOS the token it is about to produce.
    engine.sched.eos_ids = (stop_at,)
    assert engine.generate([prompt], SamplingParams(max_tokens=10))[0].tokens == free.tokens[: first + 1]
    assert engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0].tokens == free.tokens


def test_preemption_keeps_results(tmp_path):
    """A page pool too small for the batch forces preemption; nothing changes in the output."""
    prompts = _prompts(seed=3, lengths=(20, 30, 25, 40))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = [
        c.tokens for c in Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    ]
    preset = tmp_path / "small.toml"
    preset.write_text(
        "page_size = 16\nmax_seq_len = 128\n"
        "[[prefill]]\ndevices = [0, 1]\ntp = 2\n"
        "[[decode]]\ndevices = [2, 3]\npp = 2\nmax_batch = 4\npages = 12\n"  # 11 usable pages; the batch needs 16
    )
    engine = Engine("tiny-llama", str(preset), warm_up=False, progress=False)
    results = engine.generate(prompts, params)
    assert [c.tokens for c in results] == reference
    assert sum(c.preemptions for c in results) > 0
    slots = engine.decode[0].slots
    assert slots.allocator.num_free == slots.allocator.capacity


def test_bad_requests_are_rejected():
    engine = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="at most 1023"):
        engine.generate([[5] * 1024])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[5, 300]])
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert engine.generate([[5, 6]], SamplingParams(max_tokens=2))[0].tokens  # still serving


def test_logprobs_match_a_full_forward_pass():
    """Reported log-probabilities (prefill's first token and decode's later ones) equal
    log_softmax of a plain forward pass over prompt + output, on a disaggregated mesh."""
    import jax.numpy as jnp

    from jdisagg.model import attention, decoder

    engine = Engine("tiny-llama", "cpu-tp2-pp2", warm_up=False, progress=False)
    prompt = _prompts(seed=5, lengths=(11,))[0]
    out = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=5))[0]
    assert len(out.logprobs) == 6
    cfg = engine.cfg
    host = jax.device_get(engine.prefill[0].params)
    seq = np.array([prompt + out.tokens[:-1]], np.int32)
    pos = np.arange(seq.shape[1], dtype=np.int32)[None]
    x = decoder.embed(cfg, host, seq, pos)
    x, _ = decoder.forward_layers(
        cfg, host["layers"], x, pos, attention.PromptKV.empty(cfg, 1, seq.shape[1]), unroll=False
    )
    logprobs = np.asarray(jax.nn.log_softmax(decoder.logits(cfg, host, x[0]), axis=-1))
    for i, (token, lp) in enumerate(zip(out.tokens, out.logprobs, strict=True)):
        row = logprobs[len(prompt) - 1 + i]
        np.testing.assert_allclose(lp.logprob, row[token], atol=1e-4)
        want_top = np.argsort(-row)[:5]
        assert [t for t, _ in lp.top] == want_top.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], row[want_top], atol=1e-4)
        assert lp.top[0][0] == token  # greedy picks the most likely token
    assert jnp.all(jnp.isfinite(jnp.asarray([lp.logprob for lp in out.logprobs])))
    assert engine.generate([prompt], SamplingParams(max_tokens=2))[0].logprobs is None


def test_two_prefill_and_two_decode_instances():
    """cpu-2p2d: both decode instances take requests (least-loaded routing); tokens unchanged."""
    prompts = _prompts(seed=9, lengths=(5, 40, 12, 70, 3, 25, 9, 33))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    reference = [
        c.tokens for c in Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    ]
    engine = Engine("tiny-llama", "cpu-2p2d", warm_up=False, progress=False)
    assert len(engine.prefill) == 2 and len(engine.decode) == 2
    assert [c.tokens for c in engine.generate(prompts, params)] == reference
    assert [d.slots.admitted for d in engine.decode] == [4, 4]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-opt"])
def test_chunked_prefill_matches(model_name):
    """cpu-chunked: prompts prefilled 32 tokens at a time alongside decode steps give the same
    tokens (and log-probabilities) as one device; every page comes back."""
    prompts = _prompts(seed=4, lengths=(5, 17, 70, 9, 33, 1, 64))
    params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=1)
    reference = Engine(model_name, "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    engine = Engine(model_name, "cpu-chunked", warm_up=False, progress=False)
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


def test_packed_prefill_equals_prompts_alone():
    """One call of several prompts packed into a row gives each prompt the first token and
    prefix KV (cut at its length bucket) that a call of it alone gives; the token buckets
    run past the longest prompt bucket up to the budget."""
    cfg = shape("tiny-llama")
    params = init_params(cfg, jax.random.key(3))
    mesh = sharding.make_mesh(jax.devices()[:1], 1, 1)
    runner = PrefillRunner(
        cfg, params, mesh, axes.DEFAULT_RULES, length_buckets=(16, 32, 64), max_batch=8, token_budget=192
    )
    assert runner.token_buckets == (16, 32, 64, 96, 128, 192)
    prompts = _prompts(seed=21, lengths=(30, 5, 64, 17, 1))
    packed = runner.run(prompts, [SamplingParams()] * len(prompts))
    for p, got in zip(prompts, packed, strict=True):
        [alone] = runner.run([p], [SamplingParams()])
        assert got.first_token == alone.first_token
        bucket = bucket_for(len(p), runner.length_buckets)
        assert got.k.shape == alone.k.shape == (cfg.n_layers, bucket, *got.k.shape[2:])
        for a, b in ((got.k, alone.k), (got.v, alone.v)):
            np.testing.assert_allclose(np.asarray(a)[:, : len(p)], np.asarray(b)[:, : len(p)], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most 8"):
        runner.run(prompts * 2, [SamplingParams()] * 10)


def test_disaggregated_compiles_everything_at_start_up(caplog):
    """tp=2 prefill -> pp=2 decode: the KV reshard between the two splits (cut and join
    programs per prefix length) and the split of a batch into prefixes (any number of rows)
    compile in warm-up; serving compiles nothing."""
    prompts = _prompts(seed=14, lengths=(5, 100, 200, 9, 30, 7, 12, 3, 60))
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine = Engine("tiny-llama", "cpu-tp2-pp2", progress=False)
    reference = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    results, compiled = _generate_compiles(engine, prompts, params, caplog)
    assert not compiled, compiled
    assert [c.tokens for c in results] == [c.tokens for c in reference]


_ONE_TO_ONE = """page_size = 16
max_seq_len = 512
[[prefill]]
devices = [0]
max_batch = 4
token_budget = 256
[[decode]]
devices = [1]
max_batch = 8
pages = 256
"""
_CHUNKED_ONE = """page_size = 16
max_seq_len = 512
[[chunked]]
devices = [0]
max_batch = 8
pages = 256
chunk_tokens = 32
"""


def _mesh_text(mesh: str) -> str:
    return (Path(__file__).resolve().parent.parent / "meshes" / f"{mesh}.toml").read_text()


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
