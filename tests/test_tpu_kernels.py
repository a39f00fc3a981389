"""The TPU kernels (jdisagg.model.tpu_attention) on CPU, in Pallas' TPU interpreter: each kernel
against a float64 softmax, the prompt kernel through the whole model against the float64
reference, and engines whose both phases attend with them (on one device each, and tp=2 ->
pp=2 x tp=2) against the gather path's tokens.

Shapes are the smallest the kernels' tiles take: head dim 128 (one lane width), rows of 128."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jdisagg.engine import Engine
from jdisagg.model import attention, config, tpu_attention
from jdisagg.model.config import shape
from jdisagg.sched.params import SamplingParams

try:  # pytest's default import mode puts tests/ itself on sys.path
    import reference
    import test_kernels
    import test_model
except ImportError:  # tests/ became a package
    from tests import reference, test_kernels, test_model

H = tpu_attention.LANES
# a tiny llama with a head dim the TPU kernels take; one KV head (two query heads) keeps the
# interpreter's grid small
TINY_TPU = shape("tiny-llama").replace(n_layers=2, n_heads=2, n_kv_heads=1, head_dim=H)


def _bf16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)


def _decode_reference(q_bnh, k_pages, v_pages, layer, table_bw, lengths_b, *, round_kv: bool = True):
    """float64: each row's query over its first ``length`` positions; K and V rounded to
    bfloat16 first (``round_kv``), as JAX's TPU paged kernel does with its inputs."""
    kv = _bf16 if round_kv else (lambda a: np.asarray(a, np.float64))
    b, n, h = q_bnh.shape
    k = k_pages.shape[3]
    out = np.zeros((b, n, h))
    for r in range(b):
        keys = kv(k_pages[layer, table_bw[r]].reshape(-1, k, h)[: lengths_b[r]])
        values = kv(v_pages[layer, table_bw[r]].reshape(-1, k, h)[: lengths_b[r]])
        for i in range(n if lengths_b[r] else 0):
            scores = keys[:, i // (n // k)] @ q_bnh[r, i].astype(np.float64)
            probs = np.exp(scores - scores.max())
            out[r, i] = probs / probs.sum() @ values[:, i // (n // k)]
    return out


# What the TPU interpreter raises where it lacks a feature a kernel uses (JAX 0.10.2 on
# ragged_paged_attention: an AttributeError inside its callback, as a JaxRuntimeError).
_CANNOT_INTERPRET = (NotImplementedError, AttributeError, jax.errors.JaxRuntimeError)


def _interpreted(kernel: str, case):
    """``case()``, or a skip naming the JAX version whose TPU interpreter cannot run ``kernel``."""
    try:
        return case()
    except _CANNOT_INTERPRET as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        pytest.skip(f"JAX {jax.__version__}'s Pallas TPU interpreter cannot run {kernel}: {type(e).__name__} {first}")


@functools.cache
def _decode_case():
    """Rows ending mid-page, on a block edge, and a padding row (length 0), reading layer 1 of
    a pool of garbage through a table whose width is no multiple of the block: (inputs, output)."""
    rng = np.random.default_rng(0)
    layers, n_pages, z, b, n, k, w = 2, 24, 8, 4, 4, 2, 5
    pool = (layers, n_pages, z, k, H)
    k_pages = rng.standard_normal(pool).astype(np.float32)
    v_pages = rng.standard_normal(pool).astype(np.float32)
    q = rng.standard_normal((b, n, H)).astype(np.float32)
    table = rng.permutation(np.arange(1, n_pages))[: b * w].reshape(b, w).astype(np.int32)
    lengths = np.array([5, 16, 0, 37], np.int32)
    inputs = (q, k_pages, v_pages, 1, table, lengths)
    got = tpu_attention.decode_attention(q, k_pages, v_pages, jnp.int32(1), table, lengths, pages_per_block=2)
    return inputs, np.asarray(got)


@functools.cache
def _prompt_case():
    """Row 0: prompts crossing block edges, then padding; row 1: left padding, then two
    prompts: (inputs, output)."""
    rng = np.random.default_rng(1)
    b, t, n, k = 2, 256, 4, 2
    q = rng.normal(size=(b, t, n, H)).astype(np.float32)
    k_ = rng.normal(size=(b, t, k, H)).astype(np.float32)
    v = rng.normal(size=(b, t, k, H)).astype(np.float32)
    pos, seg = test_kernels._packed([[10, 137, 1, 20]], t)
    pos1, seg1 = test_kernels._packed([[30, 150]], t, left_pad=16)
    pos, seg = np.concatenate([pos, pos1]), np.concatenate([seg, seg1])
    inputs = (q, k_, v, pos, seg)
    return inputs, np.asarray(tpu_attention.prompt_attention(*inputs))


def test_decode_kernel_matches_float64():
    inputs, got = _interpreted("paged_attention", _decode_case)
    want = _decode_reference(*inputs)
    assert np.max(np.abs(got - want)) < 1e-5, np.max(np.abs(got - want))
    assert not got[2].any()  # the padding row read nothing
    # Against unrounded K and V the kernel is off by far more than the tolerance: the
    # reference must model the kernel's rounding, and the tolerance sees it.
    assert np.max(np.abs(got - _decode_reference(*inputs, round_kv=False))) > 1e-3


def test_prompt_kernel_matches_float64():
    (q, k, v, pos, seg), got = _interpreted("splash attention", _prompt_case)
    want = test_kernels._softmax_reference(q, k, v, pos, seg)
    valid = pos >= 0
    err = np.max(np.abs(got - want)[valid]) / np.max(np.abs(want[valid]))
    assert err < 1e-5, err
    assert np.isfinite(got).all()


def test_shapes_the_kernels_take():
    assert tpu_attention.prompt_block(2048) == tpu_attention.PROMPT_BLOCK
    assert tpu_attention.prompt_block(384) == 128
    assert tpu_attention.prompt_block(64) == 0
    assert tpu_attention.prompt_supported(jnp.zeros((1, 256, 4, 128)))
    assert not tpu_attention.prompt_supported(jnp.zeros((1, 256, 4, 64)))  # head dim under a lane width
    assert not tpu_attention.prompt_supported(jnp.zeros((1, 96, 4, 128)))
    assert tpu_attention.decode_supported(jnp.zeros((8, 32, 128)))
    assert not tpu_attention.decode_supported(jnp.zeros((8, 9, 64)))


@pytest.fixture
def tpu_kernels(monkeypatch):
    """Both kernel paths on, running the TPU kernels (skipped where the interpreter cannot run
    them); counts the calls traced into each."""
    _interpreted("paged_attention", _decode_case)
    _interpreted("splash attention", _prompt_case)
    monkeypatch.setattr(attention, "PROMPT_ATTENTION", "kernel")
    monkeypatch.setattr(attention, "KERNEL_PLATFORM", "tpu")
    traced = {"prompt": 0, "decode": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traced[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(tpu_attention, "prompt_attention", counted("prompt", tpu_attention.prompt_attention))
    monkeypatch.setattr(tpu_attention, "decode_attention", counted("decode", tpu_attention.decode_attention))
    return traced


def test_packed_prompts_through_the_tpu_kernel_match_reference(tpu_kernels):
    cfg = TINY_TPU
    params = test_model.random_params(cfg, seed=4)
    rng = np.random.default_rng(5)
    lengths = (7, 12, 1, 9)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in lengths]
    n = 128
    pos, seg = test_kernels._packed([list(lengths)], n)
    tokens = np.zeros((1, n), np.int32)
    tokens[0, : sum(lengths)] = np.concatenate(prompts)
    kv = attention.PromptKV.empty(cfg, 1, n, jnp.asarray(seg))
    got = np.asarray(test_model._step(cfg, params, jnp.asarray(tokens), jnp.asarray(pos), kv)[0])
    assert tpu_kernels["prompt"] == cfg.n_layers or tpu_kernels["prompt"] == 1  # unrolled or scanned
    start = 0
    for i, p in enumerate(prompts):
        test_model._assert_close(got[0, start : start + len(p)], reference.forward(cfg, params, p), f"prompt {i}")
        start += len(p)


# The engine tests' model: two KV heads, so tp=2 gives each device one.
TINY_TPU_KV2 = TINY_TPU.replace(n_heads=4, n_kv_heads=2)
_PROMPTS = [np.random.default_rng(12).integers(3, 256, n).tolist() for n in (5, 33)]  # one prefill call
_GREEDY = SamplingParams(max_tokens=5, ignore_eos=True)
_HEAD = """page_size = 16
max_seq_len = 128
length_buckets = [128]
decode_attention = "pallas"
"""
_LAYOUTS = {
    "1-to-1": """[[prefill]]
devices = [0]
max_batch = 4
token_budget = 128
[[decode]]
devices = [1]
max_batch = 4
batch_buckets = [4]
pages = 32
""",
    "tp2-to-pp2tp2": """[[prefill]]
devices = [0, 1]
tp = 2
max_batch = 4
token_budget = 128
[[decode]]
devices = [2, 3, 4, 5]
pp = 2
tp = 2
max_batch = 4
batch_buckets = [4]
pages = 32
""",
}


@functools.cache
def _gather_tokens() -> list[list[int]]:
    """The greedy tokens of one device running the einsum and gather paths, bfloat16."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(config.SHAPES, "tiny-tpu", TINY_TPU_KV2)
        patch.setattr(attention, "PROMPT_ATTENTION", "xla")
        patch.setattr(attention, "KERNEL_PLATFORM", "auto")
        engine = Engine("tiny-tpu", "cpu-single", dtype="bfloat16", warm_up=False, progress=False)
        return [c.tokens for c in engine.generate(_PROMPTS, _GREEDY)]


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_engine_on_tpu_kernels_gives_the_gather_paths_tokens(tmp_path, monkeypatch, tpu_kernels, layout):
    """Prefill (splash) -> decode (paged kernel), on one device each or sharded (each device
    over its own heads, each pipeline stage over its own layers: attention.HeadSplit),
    bfloat16 (a TPU's dtype, so the kernel's rounding of K and V is exact): the greedy tokens
    of one device running the einsum and gather paths (which tests/test_engine.py finds equal
    on the sharded meshes)."""
    monkeypatch.setitem(config.SHAPES, "tiny-tpu", TINY_TPU_KV2)
    (tmp_path / "tpu.toml").write_text(_HEAD + _LAYOUTS[layout])
    engine = Engine("tiny-tpu", str(tmp_path / "tpu.toml"), dtype="bfloat16", warm_up=False, progress=False)
    assert engine.decode[0].runner.mesh.size == (4 if layout != "1-to-1" else 1)
    got = [c.tokens for c in engine.generate(_PROMPTS, _GREEDY)]
    assert tpu_kernels["prompt"] > 0 and tpu_kernels["decode"] > 0
    assert got == _gather_tokens()
