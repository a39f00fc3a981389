"""Greedy (and seeded sampling) tokens are identical on every mesh layout."""

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
# Every layout for one model; the other architectures (their own embeddings, norms and
# biases under the same shardings) on one device and the layout that splits most ways.
MODEL_MESHES = {
    "tiny-llama": MESHES,
    "tiny-opt": ["cpu-single", "cpu-tp4-pp2tp2"],
    "tiny-qwen2": ["cpu-single", "cpu-tp4-pp2tp2"],
}


def _prompts(seed=0, lengths=(5, 17, 33, 9, 1)):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=list(MODEL_MESHES))
def model_runs(request):
    """Per mesh: greedy tokens, and tokens sampled at temperature 1 with per-request seeds."""
    prompts = _prompts()
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    sampled = [
        SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, top_k=50, top_p=0.9, seed=s)
        for s in range(len(prompts))
    ]
    runs = {}
    for mesh in MODEL_MESHES[request.param]:
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
    for mesh in list(model_runs)[1:]:
        assert model_runs[mesh][0] == reference, mesh


def test_seeded_sampling_equal_across_meshes(model_runs):
    reference = model_runs["cpu-single"][1]
    assert reference != model_runs["cpu-single"][0]  # sampling actually sampled
    for mesh in list(model_runs)[1:]:
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
