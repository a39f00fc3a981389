"""The decoder: Llama-family and OPT blocks in flax, parameters stacked over layers.

The parameter tree (leading ``L`` on every leaf under ``layers``)::

    embed/tokens/embedding        [V, D]
    embed/positions/embedding     [max_seq_len + 2, D]      (OPT only)
    layers/attn_norm/{scale,bias} [L, D]                     (bias: OPT only)
    layers/q/{kernel,bias}        [L, D, N, H], [L, N, H]    (bias: OPT, qkv_bias)
    layers/k, layers/v            [L, D, K, H], [L, K, H]
    layers/o/{kernel,bias}        [L, N, H, D], [L, D]       (bias: OPT only)
    layers/mlp_norm/...           [L, D]
    layers/mlp/{gate,up,down}     [L, D, F], [L, D, F], [L, F, D]        (llama)
    layers/mlp/{fc1,fc2}          [L, D, F] + [L, F], [L, F, D] + [L, D] (opt)
    head/norm/{scale,bias}        [D]
    head/lm_head                  [D, V]                     (absent when tied)

The model holds no parallelism code and no cache code: a block is split into
``qkv`` (norm, projections, positions) and ``finish`` (output projection, MLP), and
the caller runs attention in between against whatever cache it owns (see
``jdisagg.attention``). Stacking layers lets the decode mesh shard ``L`` over ``pp``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdisagg.model.attention import attend, causal_mask
from jdisagg.model.config import ModelConfig

OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at index 2.


def _dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def _norm(cfg: ModelConfig, name: str) -> nn.Module:
    if cfg.arch == "opt":
        return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=_dtype(cfg), param_dtype=_dtype(cfg), name=name)
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=_dtype(cfg), param_dtype=_dtype(cfg), name=name)


def _dense(cfg: ModelConfig, features, axis, bias: bool, name: str, dot_general: Callable | None) -> nn.Module:
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=bias,
        dtype=_dtype(cfg),
        param_dtype=_dtype(cfg),
        kernel_init=nn.initializers.normal(0.02),
        bias_init=nn.initializers.normal(0.02),
        dot_general=dot_general,
        name=name,
    )


@functools.cache
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[H/2] inverse frequencies, with Llama 3 or linear scaling applied."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
    sc = cfg.rope_scaling_dict
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
        scaled = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > old / lo, inv / factor, np.where(wavelen < old / hi, inv, scaled))
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: linear, llama3")
    return inv.astype(np.float32)


def apply_rope(x_btnh: jax.Array, pos_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate pairs (i, i + H/2) by angle pos * inv_freq[i] (the Hugging Face layout)."""
    angle_bth = pos_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(angle_bth)[:, :, None, :], jnp.sin(angle_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class Embed(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_bt: jax.Array, pos_bt: jax.Array) -> jax.Array:
        cfg = self.cfg
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(
            cfg.vocab_size, cfg.dim, dtype=_dtype(cfg), param_dtype=_dtype(cfg), embedding_init=init, name="tokens"
        )
        x_btd = tok(tokens_bt)
        if cfg.arch == "opt":
            posemb = nn.Embed(
                cfg.max_seq_len + OPT_POSITION_OFFSET,
                cfg.dim,
                dtype=_dtype(cfg),
                param_dtype=_dtype(cfg),
                embedding_init=init,
                name="positions",
            )
            x_btd = x_btd + posemb(jnp.maximum(pos_bt, 0) + OPT_POSITION_OFFSET)
        return x_btd


class Block(nn.Module):
    """One decoder layer. ``qkv`` and ``finish`` bracket the attention the caller runs.
    ``dot_general``: what the projections multiply with (default ``lax.dot_general``)."""

    cfg: ModelConfig
    dot_general: Callable | None = None

    def setup(self):
        cfg, dot = self.cfg, self.dot_general
        opt = cfg.arch == "opt"
        self.attn_norm = _norm(cfg, "attn_norm")
        self.q = _dense(cfg, (cfg.n_heads, cfg.head_dim), -1, opt or cfg.qkv_bias, "q", dot)
        self.k = _dense(cfg, (cfg.n_kv_heads, cfg.head_dim), -1, opt or cfg.qkv_bias, "k", dot)
        self.v = _dense(cfg, (cfg.n_kv_heads, cfg.head_dim), -1, opt or cfg.qkv_bias, "v", dot)
        self.o = _dense(cfg, cfg.dim, (-2, -1), opt, "o", dot)
        self.mlp_norm = _norm(cfg, "mlp_norm")
        self.mlp = (ReluMLP if opt else GatedMLP)(cfg, dot, name="mlp")

    def qkv(self, x_btd: jax.Array, pos_bt: jax.Array):
        """Returns q [B,T,N,H] (already scaled by 1/sqrt(H)), k and v [B,T,K,H]."""
        h_btd = self.attn_norm(x_btd)
        q_btnh, k_btkh, v_btkh = self.q(h_btd), self.k(h_btd), self.v(h_btd)
        if self.cfg.arch == "llama":
            inv_freq = rope_inv_freq(self.cfg)
            q_btnh, k_btkh = apply_rope(q_btnh, pos_bt, inv_freq), apply_rope(k_btkh, pos_bt, inv_freq)
        return q_btnh * (self.cfg.head_dim**-0.5), k_btkh, v_btkh

    def finish(self, x_btd: jax.Array, attn_btnh: jax.Array) -> jax.Array:
        x_btd = x_btd + self.o(attn_btnh)
        return x_btd + self.mlp(self.mlp_norm(x_btd))

    def __call__(self, x_btd: jax.Array, pos_bt: jax.Array) -> jax.Array:
        """Full causal self-attention over ``x`` alone; used for initialization."""
        q, k, v = self.qkv(x_btd, pos_bt)
        return self.finish(x_btd, attend(q, k, v, causal_mask(pos_bt, pos_bt)))


class GatedMLP(nn.Module):
    cfg: ModelConfig
    dot_general: Callable | None = None

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg, dot = self.cfg, self.dot_general
        gate = _dense(cfg, cfg.ffn_dim, -1, False, "gate", dot)(x_btd)
        up = _dense(cfg, cfg.ffn_dim, -1, False, "up", dot)(x_btd)
        return _dense(cfg, cfg.dim, -1, False, "down", dot)(nn.silu(gate) * up)


class ReluMLP(nn.Module):
    cfg: ModelConfig
    dot_general: Callable | None = None

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cfg, dot = self.cfg, self.dot_general
        h_btf = nn.relu(_dense(self.cfg, cfg.ffn_dim, -1, True, "fc1", dot)(x_btd))
        return _dense(cfg, cfg.dim, -1, True, "fc2", dot)(h_btf)


class Head(nn.Module):
    """Final norm and the vocabulary projection (the embedding table when tied)."""

    cfg: ModelConfig
    dot_general: Callable | None = None

    @nn.compact
    def __call__(self, x_bd: jax.Array, embedding_vd: jax.Array) -> jax.Array:
        cfg = self.cfg
        h_bd = _norm(cfg, "norm")(x_bd)
        if cfg.tie_embeddings:
            kernel_dv = embedding_vd.T
        else:
            kernel_dv = self.param("lm_head", nn.initializers.normal(0.02), (cfg.dim, cfg.vocab_size), _dtype(cfg))
        dot = self.dot_general or jax.lax.dot_general
        return dot(h_bd, kernel_dv, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ---- Functional entry points over the parameter tree -------------------------------------


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random parameters (normal, std 0.02; norms at one) with layers stacked on axis 0."""
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    tokens = jnp.zeros((1, 1), jnp.int32)
    embed = Embed(cfg).init(k_embed, tokens, tokens)["params"]
    x = jnp.zeros((1, 1, cfg.dim), _dtype(cfg))
    layers = jax.vmap(lambda k: Block(cfg).init(k, x, tokens)["params"])(jax.random.split(k_layers, cfg.n_layers))
    head = Head(cfg).init(k_head, x[:, 0], embed["tokens"]["embedding"])["params"]
    return {"embed": embed, "layers": layers, "head": head}


@functools.lru_cache(maxsize=16)
def abstract_params(cfg: ModelConfig) -> dict:
    """Shapes and dtypes of the parameter tree, without allocating it (one trace per config;
    callers must not change the tree)."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def embed(cfg: ModelConfig, params: dict, tokens_bt: jax.Array, pos_bt: jax.Array) -> jax.Array:
    return Embed(cfg).apply({"params": params["embed"]}, tokens_bt, pos_bt)


def block_qkv(cfg: ModelConfig, layer: dict, x_btd: jax.Array, pos_bt: jax.Array, dot_general=None):
    return Block(cfg, dot_general).apply({"params": layer}, x_btd, pos_bt, method=Block.qkv)


def block_finish(cfg: ModelConfig, layer: dict, x_btd: jax.Array, attn_btnh: jax.Array, dot_general=None):
    return Block(cfg, dot_general).apply({"params": layer}, x_btd, attn_btnh, method=Block.finish)


def logits(cfg: ModelConfig, params: dict, x_bd: jax.Array, dot_general: Callable | None = None) -> jax.Array:
    """[B, V] float32 logits from final hidden states."""
    head = Head(cfg, dot_general)
    return head.apply({"params": params["head"]}, x_bd, params["embed"]["tokens"]["embedding"])


def layer_step(cfg: ModelConfig, layer: dict, x_btd: jax.Array, pos_bt: jax.Array, kv, index, dot_general=None):
    """One layer (``layer``: its parameters, no leading L) against cache ``kv``, whose layer
    ``index`` it reads and writes; ``dot_general`` as ``Block``'s. Returns the hidden states
    and the updated cache."""
    q, k, v = block_qkv(cfg, layer, x_btd, pos_bt, dot_general)
    attn_btnh, kv = kv.attend(index, q, k, v, pos_bt)
    return block_finish(cfg, layer, x_btd, attn_btnh, dot_general), kv


def forward_layers(cfg: ModelConfig, layers: dict, x_btd: jax.Array, pos_bt: jax.Array, kv, *, unroll: bool):
    """Runs every layer in ``layers`` (stacked on axis 0) against cache ``kv``.

    ``kv`` holds exactly the layers in ``layers`` (a pipeline stage passes its own slice).
    ``unroll`` unrolls the loop over them (the preset's ``unroll_layers``). Inside the loop
    XLA reads each layer's weights in place on GPUs with cuBLAS matmuls
    (``runtime.compile.XLA_OPTIONS``); XLA:CPU copies them out of the stack, so instances of
    one CPU device run the loop from the host instead (``jdisagg.model.host_loop``).
    Returns the hidden states and the updated cache.
    """

    def body(carry, layer):
        x_btd, kv, index = carry
        x_btd, kv = layer_step(cfg, layer, x_btd, pos_bt, kv, index)
        return (x_btd, kv, index + 1), None

    (x_btd, kv, _), _ = jax.lax.scan(body, (x_btd, kv, jnp.int32(0)), layers, unroll=unroll)
    return x_btd, kv


def _input_axes(path) -> int:
    """How many leading axes of the leaf at ``path`` a projection contracts (0: the leaf is
    not a projection's weights): 2 for the output projection ``o`` [N, H, D], else 1."""
    names = [getattr(k, "key", None) for k in path]
    if names[-1:] == ["lm_head"]:
        return 1
    if names[-1:] == ["kernel"]:
        return 2 if names[-2:-1] == ["o"] else 1
    return 0


def output_major(tree: dict) -> dict:
    """``tree`` with every projection's weights output axes first ([D, F] -> [F, D]); NumPy
    leaves become views. ``input_major`` (traced into a program) gives the usual shapes back."""

    def move(path, a):  # NumPy or JAX arrays
        n = _input_axes(path)
        return a.transpose((*range(n, a.ndim), *range(n))) if n else a

    return jax.tree_util.tree_map_with_path(move, tree)


def input_major(tree: dict) -> dict:
    """The inverse of ``output_major``."""

    def move(path, a):
        n = _input_axes(path)
        return jnp.transpose(a, (*range(a.ndim - n, a.ndim), *range(a.ndim - n))) if n else a

    return jax.tree_util.tree_map_with_path(move, tree)
