"""The prefill flash-attention kernel (jdisagg.model.flash_kernel), run by the Pallas interpreter
on CPU: against a float64 softmax, through the whole model against the float64 reference, and
in the prefill runner against the einsum path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdisagg.model import attention, flash_kernel, sharding
from jdisagg.model.config import shape
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.params import SamplingParams

try:  # pytest's default import mode puts tests/ itself on sys.path
    import reference
    import test_model
except ImportError:  # tests/ became a package
    from tests import reference, test_model


def _packed(rows: list[list[int]], t: int, left_pad: int = 0):
    """Positions and segments of prompts of the given lengths packed end to end per row."""
    pos = np.full((len(rows), t), -1, np.int32)
    seg = np.full((len(rows), t), -1, np.int32)
    for r, lengths in enumerate(rows):
        start = left_pad
        for i, n in enumerate(lengths):
            pos[r, start : start + n], seg[r, start : start + n] = np.arange(n), i
            start += n
    return pos, seg


def _softmax_reference(q, k, v, pos, seg):
    """float64: each token over the earlier tokens of its own segment."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, h = q.shape
    g = n // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k)
    seen = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None]) & (pos[:, None, :] >= 0)
    scores = np.where(seen[:, None], scores, -np.inf)
    peak = np.max(scores, axis=-1, keepdims=True)
    probs = np.exp(scores - np.where(np.isfinite(peak), peak, 0))
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_flash_matches_float64_softmax(block):
    rng = np.random.default_rng(block)
    b, t, n, kh, h = 3, 96, 4, 2, 16
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    k = rng.normal(size=(b, t, kh, h)).astype(np.float32)
    v = rng.normal(size=(b, t, kh, h)).astype(np.float32)
    # Row 0: prompts crossing block edges and trailing padding; row 1: one full prompt;
    # row 2: left padding, then two prompts.
    pos, seg = _packed([[10, 37, 1, 20], [96], []], t)
    pos2, seg2 = _packed([[30, 50]], t, left_pad=16)
    pos[2], seg[2] = pos2[0], seg2[0]
    got = np.asarray(flash_kernel.attention(q, k, v, pos, seg, block=block, interpret=True))
    want = _softmax_reference(q, k, v, pos, seg)
    valid = pos >= 0
    err = np.max(np.abs(got - want)[valid]) / np.max(np.abs(want[valid]))
    assert err < 1e-5, err
    assert np.isfinite(got).all()  # padding queries: finite garbage (zeros in blocks of padding only)


def test_block_choice():
    assert flash_kernel.block_for(2048) == flash_kernel.BLOCK
    assert flash_kernel.block_for(48) == 16
    assert flash_kernel.block_for(13) == 0
    assert not flash_kernel.supported(jnp.zeros((1, 13, 4, 16)))
    assert not flash_kernel.supported(jnp.zeros((1, 32, 8, 8)))  # head dim under 16


# tiny models with a head dim the kernel takes (16)
KERNEL_CONFIGS = {
    "llama": shape("tiny-llama").replace(n_heads=4, n_kv_heads=2, head_dim=16),
    "qwen2": shape("tiny-qwen2").replace(n_heads=4, n_kv_heads=2, head_dim=16),
    "opt": shape("tiny-opt"),
}


@pytest.fixture
def kernel_everywhere(monkeypatch):
    monkeypatch.setattr(attention, "PROMPT_ATTENTION", "kernel")


@pytest.mark.parametrize("name", list(KERNEL_CONFIGS))
def test_packed_prompts_through_the_kernel_match_reference(name, kernel_everywhere):
    cfg = KERNEL_CONFIGS[name]
    params = test_model.random_params(cfg, seed=4)
    rng = np.random.default_rng(5)
    lengths = (7, 12, 1, 9)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in lengths]
    n = 32  # a multiple of the kernel's 16
    pos, seg = _packed([list(lengths)], n)
    tokens = np.zeros((1, n), np.int32)
    tokens[0, : sum(lengths)] = np.concatenate(prompts)
    kv = attention.PromptKV.empty(cfg, 1, n, jnp.asarray(seg))
    assert kv.kernel
    got = np.asarray(test_model._step(cfg, params, jnp.asarray(tokens), jnp.asarray(pos), kv)[0])
    start = 0
    for i, p in enumerate(prompts):
        test_model._assert_close(got[0, start : start + len(p)], reference.forward(cfg, params, p), f"{name} {i}")
        start += len(p)


def test_prefill_runner_kernel_equals_einsums(monkeypatch):
    """A packed prefill call gives the same first tokens and (to rounding) prefix KV either way."""
    cfg = KERNEL_CONFIGS["llama"]
    params = test_model.random_params(cfg, seed=6)
    mesh = sharding.make_mesh(jax.devices()[:1], 1, 1)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 20, 3)]
    out = {}
    for mode in ("xla", "kernel"):
        monkeypatch.setattr(attention, "PROMPT_ATTENTION", mode)
        runner = PrefillRunner(cfg, params, mesh, {}, length_buckets=(16, 32, 64), max_batch=4, token_budget=64)
        out[mode] = runner.run(prompts, [SamplingParams()] * len(prompts))
    for a, b in zip(out["xla"], out["kernel"], strict=True):
        assert a.first_token == b.first_token
        np.testing.assert_allclose(np.asarray(a.k), np.asarray(b.k), atol=1e-5)
        np.testing.assert_allclose(np.asarray(a.v), np.asarray(b.v), atol=1e-5)
