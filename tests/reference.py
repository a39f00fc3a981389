"""A plain NumPy (float64) forward pass, written from the papers, to check jdisagg.model against.

It shares nothing with ``jdisagg.model`` or ``jdisagg.attention`` except the parameter layout
(documented at the top of ``jdisagg/model.py``) and ``ModelConfig``. Clarity over speed: it
loops over layers, heads and query positions, and handles one sequence at a time.

Sources of the equations:
  * Llama (Touvron et al. 2023): pre-norm blocks with RMSNorm (Zhang & Sennrich 2019), rotary
    position embedding (Su et al. 2021) in the "rotate half" layout, where dimension ``i``
    pairs with ``i + H/2``, SwiGLU FFN (Shazeer 2020); grouped-query attention (Ainslie et
    al. 2023); Qwen2 adds biases to the q, k and v projections.
  * RoPE scaling: "linear" (position interpolation, Chen et al. 2023) divides every frequency
    by the factor; "llama3" keeps high frequencies, divides low frequencies by the factor and
    interpolates smoothly between the two bands.
  * OPT (Zhang et al. 2022): learned positions stored from row 2 on, pre-LayerNorm blocks,
    multi-head attention with biases, ReLU FFN, final LayerNorm, output tied to the input
    embedding.
"""

from __future__ import annotations

import math

import numpy as np

from jdisagg.model.config import ModelConfig

OPT_POSITION_OFFSET = 2


def rms_norm(x_d: np.ndarray, scale_d: np.ndarray, eps: float) -> np.ndarray:
    return x_d / np.sqrt(np.mean(x_d * x_d) + eps) * scale_d


def layer_norm(x_d: np.ndarray, scale_d: np.ndarray, bias_d: np.ndarray, eps: float) -> np.ndarray:
    mean = np.mean(x_d)
    var = np.mean((x_d - mean) ** 2)
    return (x_d - mean) / np.sqrt(var + eps) * scale_d + bias_d


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / np.sum(e)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[H/2] angular frequency of each rotated pair, after the configured scaling."""
    h = cfg.head_dim
    freqs = np.array([cfg.rope_theta ** (-(2.0 * i) / h) for i in range(h // 2)], dtype=np.float64)
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return freqs
    if kind == "linear":
        return freqs / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        out = []
        for f in freqs:
            wavelength = 2.0 * math.pi / f
            if wavelength < context / high:  # high-frequency band: unchanged
                out.append(f)
            elif wavelength > context / low:  # low-frequency band: interpolated by the factor
                out.append(f / factor)
            else:  # in between: blend the two by where the wavelength sits
                w = (context / wavelength - low) / (high - low)
                out.append((1.0 - w) * f / factor + w * f)
        return np.array(out)
    raise ValueError(f"reference: unknown rope scaling {kind!r}")


def rotate(x_h: np.ndarray, position: int, freqs: np.ndarray) -> np.ndarray:
    """Rotates pair (x[i], x[i + H/2]) by the angle position * freqs[i]."""
    half = x_h.shape[0] // 2
    out = np.empty_like(x_h)
    for i in range(half):
        c, s = math.cos(position * freqs[i]), math.sin(position * freqs[i])
        a, b = x_h[i], x_h[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def rotate_heads(x_tnh: np.ndarray, positions: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """``rotate`` applied to every head of every position: [T, heads, H]."""
    out = np.empty_like(x_tnh)
    for t, position in enumerate(positions):
        for n in range(x_tnh.shape[1]):
            out[t, n] = rotate(x_tnh[t, n], int(position), freqs)
    return out


def attention(q_tnh: np.ndarray, k_tkh: np.ndarray, v_tkh: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Causal attention; query head n reads kv head n // (N / K). Returns [T, N, H]."""
    t_len, n_heads, h = q_tnh.shape
    group = n_heads // k_tkh.shape[1]
    out = np.zeros_like(q_tnh)
    for n in range(n_heads):
        kv = n // group
        for t in range(t_len):
            visible = [s for s in range(t_len) if positions[s] <= positions[t]]
            scores = np.array([q_tnh[t, n] @ k_tkh[s, kv] for s in visible]) / math.sqrt(h)
            probs = softmax(scores)
            out[t, n] = sum(p * v_tkh[s, kv] for p, s in zip(probs, visible, strict=True))
    return out


def _project(h_td: np.ndarray, dense: dict, layer: int) -> np.ndarray:
    """h @ kernel (+ bias) for a kernel [D, heads, H] of one layer: [T, heads, H]."""
    out = np.einsum("td,dnh->tnh", h_td, dense["kernel"][layer])
    if "bias" in dense:
        out = out + dense["bias"][layer]
    return out


def _output(attn_tnh: np.ndarray, dense: dict, layer: int) -> np.ndarray:
    out = np.einsum("tnh,nhd->td", attn_tnh, dense["kernel"][layer])
    if "bias" in dense:
        out = out + dense["bias"][layer]
    return out


def _norm_rows(cfg: ModelConfig, x_td: np.ndarray, norm: dict, layer: int | None) -> np.ndarray:
    pick = (lambda a: a) if layer is None else (lambda a: a[layer])
    if cfg.arch == "opt":
        return np.stack([layer_norm(x, pick(norm["scale"]), pick(norm["bias"]), cfg.norm_eps) for x in x_td])
    return np.stack([rms_norm(x, pick(norm["scale"]), cfg.norm_eps) for x in x_td])


def forward(cfg: ModelConfig, params: dict, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Logits [T, V] for every position of one sequence ``tokens`` [T].

    ``positions`` defaults to 0..T-1; a query sees keys whose position is at most its own.
    """
    p = _as_float64(params)
    tokens = np.asarray(tokens)
    positions = np.arange(len(tokens)) if positions is None else np.asarray(positions)
    opt = cfg.arch == "opt"
    embedding_vd = p["embed"]["tokens"]["embedding"]
    x_td = embedding_vd[tokens]
    if opt:
        x_td = x_td + p["embed"]["positions"]["embedding"][positions + OPT_POSITION_OFFSET]
    else:
        freqs = rope_frequencies(cfg)

    layers = p["layers"]
    for layer in range(cfg.n_layers):
        # Attention sub-block.
        h_td = _norm_rows(cfg, x_td, layers["attn_norm"], layer)
        q_tnh = _project(h_td, layers["q"], layer)
        k_tkh = _project(h_td, layers["k"], layer)
        v_tkh = _project(h_td, layers["v"], layer)
        if not opt:
            q_tnh, k_tkh = rotate_heads(q_tnh, positions, freqs), rotate_heads(k_tkh, positions, freqs)
        x_td = x_td + _output(attention(q_tnh, k_tkh, v_tkh, positions), layers["o"], layer)

        # Feed-forward sub-block.
        h_td = _norm_rows(cfg, x_td, layers["mlp_norm"], layer)
        mlp = layers["mlp"]
        if opt:
            hidden = np.maximum(h_td @ mlp["fc1"]["kernel"][layer] + mlp["fc1"]["bias"][layer], 0.0)
            x_td = x_td + hidden @ mlp["fc2"]["kernel"][layer] + mlp["fc2"]["bias"][layer]
        else:
            gate = h_td @ mlp["gate"]["kernel"][layer]
            up = h_td @ mlp["up"]["kernel"][layer]
            x_td = x_td + (silu(gate) * up) @ mlp["down"]["kernel"][layer]

    h_td = _norm_rows(cfg, x_td, p["head"]["norm"], None)
    if cfg.tie_embeddings:
        return h_td @ embedding_vd.T
    # The untied projection is the leaf head/lm_head [D, V] (model.py's docstring says
    # head/lm_head/kernel, but flax's self.param puts the array at head/lm_head).
    return h_td @ p["head"]["lm_head"]


def _as_float64(tree):
    if isinstance(tree, dict):
        return {k: _as_float64(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float64)
