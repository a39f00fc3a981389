"""jdisagg.model + jdisagg.attention against the independent NumPy forward in tests/reference.py."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdisagg.model import attention, decoder
from jdisagg.model.config import ModelConfig, shape

try:  # pytest's default import mode puts tests/ itself on sys.path
    import reference
except ImportError:  # tests/ became a package
    from tests import reference

# fp32 against a float64 reference, measured as max |error| / max |reference logit|. The logits
# here peak at 0.5-1.0 and the observed ratio is below 6e-7 (CPU, JAX 0.10.2); 1e-4 leaves room
# for other backends' matmul precision while still catching any real mistake (a wrong RoPE
# layout, kv-head grouping, missing norm scale or bias each give errors above 1e-2).
RTOL = 1e-4


def _rope(**scaling) -> tuple:
    return tuple(sorted(scaling.items()))


CONFIGS: dict[str, ModelConfig] = {
    "tiny-llama": shape("tiny-llama"),
    "tiny-qwen2": shape("tiny-qwen2"),
    "tiny-opt": shape("tiny-opt"),
    # head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283. With an original context of 64 and
    # factors 1 / 4, the pairs fall in the high, blended, low and low bands of Llama 3 scaling.
    "llama3-scaled": shape("tiny-llama").replace(
        rope_scaling=_rope(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        )
    ),
    "linear-scaled": shape("tiny-llama").replace(rope_scaling=_rope(rope_type="linear", factor=4.0)),
}


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """init_params, with norms made random and attention sharpened so that tests can see mistakes.

    Norm scales/biases start at one/zero, where a forgotten scale or bias is invisible. Weights of
    std 0.02 give near-uniform attention, where position and masking mistakes barely show; the q
    and k kernels are scaled up so that scores spread over a few units.
    """
    params = decoder.init_params(cfg, jax.random.key(seed))
    params = jax.tree_util.tree_map(np.asarray, params)
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        names = [p.key for p in path]
        if any(n.endswith("norm") for n in names):
            if names[-1] == "scale":
                return (1.0 + 0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
            return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        if names[-1] == "kernel" and names[-2] in ("q", "k"):
            return leaf * 6.0
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, params)


@functools.partial(jax.jit, static_argnums=0, static_argnames="unroll")
def _step(cfg: ModelConfig, params: dict, tokens_bt: jax.Array, pos_bt: jax.Array, kv, unroll: bool = False):
    """Embed, every layer against cache ``kv``, logits: ([B, T, V] logits, updated cache)."""
    b, t = tokens_bt.shape
    x = decoder.embed(cfg, params, tokens_bt, pos_bt)
    x, kv = decoder.forward_layers(cfg, params["layers"], x, pos_bt, kv, unroll=unroll)
    return decoder.logits(cfg, params, x.reshape(b * t, cfg.dim)).reshape(b, t, cfg.vocab_size), kv


def _run_prompt(cfg: ModelConfig, params: dict, tokens_bt: np.ndarray, pos_bt: np.ndarray) -> np.ndarray:
    """[B, T, V] logits through the prefill path (PromptKV)."""
    kv = attention.PromptKV.empty(cfg, *tokens_bt.shape)
    return np.asarray(_step(cfg, params, jnp.asarray(tokens_bt), jnp.asarray(pos_bt), kv)[0])


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> float:
    """Max abs error over max abs reference logit; asserts it is below RTOL and returns it."""
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err < RTOL, f"{what}: relative max error {err:.2e} >= {RTOL:.0e}"
    return err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_logits_match_reference(name):
    cfg = CONFIGS[name]
    params = random_params(cfg, seed=1)
    rng = np.random.default_rng(2)
    lengths = (13, 8)
    t = max(lengths)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in lengths]

    # Row 0 fills the batch; row 1 is left-padded, so positions (not indices) must drive
    # RoPE, the learned positions and the mask. Padding carries pos -1 and token 0.
    tokens_bt = np.zeros((2, t), np.int32)
    pos_bt = np.full((2, t), -1, np.int32)
    tokens_bt[0], pos_bt[0] = prompts[0], np.arange(t)
    tokens_bt[1, t - lengths[1] :], pos_bt[1, t - lengths[1] :] = prompts[1], np.arange(lengths[1])

    got = _run_prompt(cfg, params, tokens_bt, pos_bt)
    _assert_close(got[0], reference.forward(cfg, params, prompts[0]), f"{name} row 0")
    _assert_close(got[1, t - lengths[1] :], reference.forward(cfg, params, prompts[1]), f"{name} row 1")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-opt"])
def test_packed_prompts_match_reference(name):
    """Prompts packed end to end into one row (as a prefill call packs them), then padding:
    each prompt's logits are its own forward pass alone; none sees its neighbours."""
    cfg = CONFIGS[name]
    params = random_params(cfg, seed=4)
    rng = np.random.default_rng(5)
    lengths = (7, 12, 1, 9)
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in lengths]
    n = sum(lengths) + 3
    tokens, pos, segment = np.zeros((1, n), np.int32), np.full((1, n), -1, np.int32), np.full((1, n), -1, np.int32)
    start = 0
    for i, p in enumerate(prompts):
        tokens[0, start : start + len(p)], pos[0, start : start + len(p)] = p, np.arange(len(p))
        segment[0, start : start + len(p)] = i
        start += len(p)
    kv = attention.PromptKV.empty(cfg, 1, n, jnp.asarray(segment))
    got = np.asarray(_step(cfg, params, jnp.asarray(tokens), jnp.asarray(pos), kv)[0])
    start = 0
    for i, p in enumerate(prompts):
        _assert_close(got[0, start : start + len(p)], reference.forward(cfg, params, p), f"{name} prompt {i}")
        start += len(p)


def test_padding_does_not_leak_into_real_tokens():
    cfg = CONFIGS["tiny-llama"]
    params = random_params(cfg, seed=3)
    tokens_bt = np.array([[5, 6, 7, 0, 0]], np.int32)
    pos_bt = np.array([[0, 1, 2, -1, -1]], np.int32)
    first = _run_prompt(cfg, params, tokens_bt, pos_bt)
    tokens_bt[0, 3:] = [200, 201]
    second = _run_prompt(cfg, params, tokens_bt, pos_bt)
    np.testing.assert_array_equal(first[0, :3], second[0, :3])


@pytest.mark.parametrize("name", ["llama3-scaled", "linear-scaled"])
def test_rope_scaling_changes_frequencies(name):
    """The scaled configs must differ from plain RoPE, or the scaled logits test proves nothing."""
    cfg = CONFIGS[name]
    plain = reference.rope_frequencies(cfg.replace(rope_scaling=None))
    scaled = reference.rope_frequencies(cfg)
    np.testing.assert_allclose(decoder.rope_inv_freq(cfg), scaled, rtol=1e-6)
    assert not np.allclose(plain, scaled)
    if name == "llama3-scaled":
        # One pair in each band: kept, blended (strictly between), divided by the factor.
        assert scaled[0] == plain[0]
        assert plain[1] / 8.0 < scaled[1] < plain[1]
        np.testing.assert_allclose(scaled[2:], plain[2:] / 8.0)
        params = random_params(cfg, seed=1)
        tokens = np.arange(3, 16)
        a = reference.forward(cfg, params, tokens)
        b = reference.forward(cfg.replace(rope_scaling=None), params, tokens)
        assert np.max(np.abs(a - b)) / np.max(np.abs(a)) > 100 * RTOL


def _paged_case(
    cfg: ModelConfig,
    params: dict,
    chunks: list[tuple[int, int]],
    prompts: list[np.ndarray],
    seed: int,
    unroll: bool,
    decode_attention: str = "dot",
):
    """Runs ``prompts`` through PagedKV chunk by chunk; yields (row, positions, logits) per chunk."""
    z, pages_per_request, pool_pages = 4, 4, 12
    rng = np.random.default_rng(seed)
    # Page 0 is the null page; each request gets random, non-contiguous pages from the rest.
    free = rng.permutation(np.arange(1, pool_pages))
    table = np.full((len(prompts), pages_per_request), attention.NULL_PAGE, np.int32)
    for b, prompt in enumerate(prompts):
        need = -(-len(prompt) // z)
        table[b, :need], free = free[:need], free[need:]
    # Garbage in the pool: a read of an unwritten or foreign slot would show up.
    pool_shape = (cfg.n_layers, pool_pages, z, cfg.n_kv_heads, cfg.head_dim)
    kv = attention.PagedKV(
        k_pages=jnp.asarray(rng.standard_normal(pool_shape), jnp.float32),
        v_pages=jnp.asarray(rng.standard_normal(pool_shape), jnp.float32),
        page_table=jnp.asarray(table),
        decode_attention=decode_attention,
    )
    done = [0] * len(prompts)
    for sizes in chunks:
        width = max(sizes)
        tokens_bt = np.zeros((len(prompts), width), np.int32)
        pos_bt = np.full((len(prompts), width), -1, np.int32)
        for b, n in enumerate(sizes):
            tokens_bt[b, :n] = prompts[b][done[b] : done[b] + n]
            pos_bt[b, :n] = np.arange(done[b], done[b] + n)
        logits, kv = _step(cfg, params, jnp.asarray(tokens_bt), jnp.asarray(pos_bt), kv, unroll=unroll)
        for b, n in enumerate(sizes):
            if n:
                yield b, np.arange(done[b], done[b] + n), np.asarray(logits[b, :n])
            done[b] += n
    assert done == [len(p) for p in prompts]


@pytest.mark.parametrize(
    "unroll,decode_attention",
    [(False, "dot"), (True, "dot"), (False, "pallas")],
    ids=["layer-loop", "unrolled", "pallas"],
)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-opt"])
def test_paged_chunks_match_reference(name, unroll, decode_attention):
    """Prompts fed in chunks (5, 3, 1, 1, 1 and 3, 4, 1, 1 tokens) through a paged cache,
    with the layers in a loop (CPU, TPU) and unrolled (the presets' ``unroll_layers``), and
    one-token rows attending with the Pallas kernel (``decode_attention = "pallas"``, interpreted on CPU)."""
    cfg = CONFIGS[name]
    params = random_params(cfg, seed=4)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, cfg.vocab_size, 11), rng.integers(3, cfg.vocab_size, 9)]
    want = [reference.forward(cfg, params, p) for p in prompts]
    chunks = [(5, 3), (3, 4), (1, 1), (1, 1), (1, 0)]  # the last call holds a row of pure padding
    seen = [0, 0]
    for b, positions, got in _paged_case(
        cfg, params, chunks, prompts, seed=6, unroll=unroll, decode_attention=decode_attention
    ):
        _assert_close(got, want[b][positions], f"{name} row {b} positions {positions.tolist()}")
        seen[b] += len(positions)
    assert seen == [11, 9]


# ---- Hugging Face cross-check (only where torch and transformers are installed) -------------


def _hf_model(cfg: ModelConfig, params: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    p = jax.tree_util.tree_map(lambda a: torch.tensor(np.asarray(a, np.float64)), params)
    L, d = p["layers"], cfg.dim
    sd = {}
    if cfg.arch == "opt":
        hf_cfg = transformers.OPTConfig(
            vocab_size=cfg.vocab_size, hidden_size=d, num_hidden_layers=cfg.n_layers, ffn_dim=cfg.ffn_dim,
            num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len, do_layer_norm_before=True,
            word_embed_proj_dim=d, activation_function="relu", dropout=0.0, attention_dropout=0.0,
            tie_word_embeddings=True, enable_bias=True, layer_norm_elementwise_affine=True,
        )  # fmt: skip
        pre, names = "model.decoder.", {"attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"}
        sd[pre + "embed_tokens.weight"] = p["embed"]["tokens"]["embedding"]
        sd[pre + "embed_positions.weight"] = p["embed"]["positions"]["embedding"]
        sd[pre + "final_layer_norm.weight"] = p["head"]["norm"]["scale"]
        sd[pre + "final_layer_norm.bias"] = p["head"]["norm"]["bias"]
        for i in range(cfg.n_layers):
            lp = f"{pre}layers.{i}."
            for ours, theirs in names.items():
                sd[lp + theirs + ".weight"] = L[ours]["scale"][i]
                sd[lp + theirs + ".bias"] = L[ours]["bias"][i]
            for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                sd[f"{lp}self_attn.{theirs}.weight"] = L[ours]["kernel"][i].reshape(d, -1).T
                sd[f"{lp}self_attn.{theirs}.bias"] = L[ours]["bias"][i].reshape(-1)
            sd[lp + "self_attn.out_proj.weight"] = L["o"]["kernel"][i].reshape(-1, d).T
            sd[lp + "self_attn.out_proj.bias"] = L["o"]["bias"][i]
            for fc in ("fc1", "fc2"):
                sd[f"{lp}{fc}.weight"] = L["mlp"][fc]["kernel"][i].T
                sd[f"{lp}{fc}.bias"] = L["mlp"][fc]["bias"][i]
        hf = transformers.OPTForCausalLM(hf_cfg)
    else:
        # Llama's attention_bias also adds an o_proj bias; Qwen2 biases q, k and v only.
        if cfg.qkv_bias:
            config_cls, cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
        else:
            config_cls, cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
        kwargs = dict(
            vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len,
        )  # fmt: skip
        if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:  # transformers >= 5
            kwargs["rope_parameters"] = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
        else:
            kwargs.update(rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling_dict or None)
        hf_cfg = config_cls(**kwargs)
        sd["model.embed_tokens.weight"] = p["embed"]["tokens"]["embedding"]
        sd["model.norm.weight"] = p["head"]["norm"]["scale"]
        sd["lm_head.weight"] = p["embed"]["tokens"]["embedding"] if cfg.tie_embeddings else p["head"]["lm_head"].T
        for i in range(cfg.n_layers):
            lp = f"model.layers.{i}."
            sd[lp + "input_layernorm.weight"] = L["attn_norm"]["scale"][i]
            sd[lp + "post_attention_layernorm.weight"] = L["mlp_norm"]["scale"][i]
            for ours in ("q", "k", "v"):
                sd[f"{lp}self_attn.{ours}_proj.weight"] = L[ours]["kernel"][i].reshape(d, -1).T
                if cfg.qkv_bias:
                    sd[f"{lp}self_attn.{ours}_proj.bias"] = L[ours]["bias"][i].reshape(-1)
            sd[lp + "self_attn.o_proj.weight"] = L["o"]["kernel"][i].reshape(-1, d).T
            for ours in ("gate", "up", "down"):
                sd[f"{lp}mlp.{ours}_proj.weight"] = L["mlp"][ours]["kernel"][i].T
        hf = cls(hf_cfg)
    hf = hf.to(torch.float64).eval()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    return torch, hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_hugging_face(name):
    cfg = CONFIGS[name]
    params = random_params(cfg, seed=7)
    torch, hf = _hf_model(cfg, params)
    tokens = np.random.default_rng(8).integers(3, cfg.vocab_size, 12)
    with torch.no_grad():
        mask = torch.ones(1, len(tokens), dtype=torch.long)
        theirs = hf(input_ids=torch.tensor(tokens[None]), attention_mask=mask).logits[0].numpy()
    # Both run in float64, except that Hugging Face computes RoPE's cos/sin in float32.
    ours = reference.forward(cfg, params, tokens)
    err = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)))
    assert err < 1e-5, f"{name}: reference vs Hugging Face relative max error {err:.2e}"
