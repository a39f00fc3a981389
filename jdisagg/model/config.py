"""Model configuration: one frozen dataclass and a table of named shapes.

Axis letters used across jdisagg (shape suffixes on names, e.g. ``q_btnh``):
  B batch, T query length, S key/value length, N query heads, K kv heads,
  H head dim, D model dim, F FFN dim, L layers, V vocab, P pages, Z page size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = ("llama", "opt")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    ``arch`` picks the block: ``llama`` (RMSNorm, RoPE, GQA, SwiGLU; also Mistral,
    Qwen2 with ``qkv_bias``, SmolLM2) or ``opt`` (LayerNorm, learned positions,
    MHA, ReLU FFN, biases everywhere).
    """

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # activations and weights: "float32" or "bfloat16"

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.arch == "opt" and self.n_kv_heads != self.n_heads:
            raise ValueError("OPT uses multi-head attention: n_kv_heads must equal n_heads")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        d, f, L = self.dim, self.ffn_dim, self.n_layers
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = (3 if self.arch == "llama" else 2) * d * f
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * (attn + mlp) + embed

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize


def _llama3_scaling(factor: float, original: int) -> tuple[tuple[str, Any], ...]:
    return tuple(
        sorted(
            {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": original,
            }.items()
        )
    )


# Named shapes for random initialization (benchmarks) and tests.
SHAPES: dict[str, ModelConfig] = {
    # Tiny shapes: every head count divides by 4 so tp=4 and pp=2 x tp=2 shard them.
    "tiny-llama": ModelConfig(
        arch="llama",
        vocab_size=256,
        dim=64,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=128,
        max_seq_len=1024,
        rope_theta=10000.0,
        tie_embeddings=False,
        bos_id=1,
        eos_ids=(2,),
    ),
    "tiny-qwen2": ModelConfig(
        arch="llama",
        vocab_size=256,
        dim=64,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=128,
        max_seq_len=1024,
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_embeddings=True,
        bos_id=1,
        eos_ids=(2,),
    ),
    "tiny-opt": ModelConfig(
        arch="opt",
        vocab_size=256,
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        ffn_dim=128,
        max_seq_len=1024,
        tie_embeddings=True,
        bos_id=1,
        eos_ids=(2,),
    ),
    "smollm2-135m": ModelConfig(
        arch="llama",
        vocab_size=49152,
        dim=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        ffn_dim=1536,
        max_seq_len=8192,
        rope_theta=100000.0,
        tie_embeddings=True,
        bos_id=1,
        eos_ids=(2,),
    ),
    "llama3-8b": ModelConfig(
        arch="llama",
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(8.0, 8192),
        bos_id=128000,
        eos_ids=(128001, 128009),
    ),
    "opt-13b": ModelConfig(
        arch="opt",
        vocab_size=50272,
        dim=5120,
        n_layers=40,
        n_heads=40,
        n_kv_heads=40,
        ffn_dim=20480,
        max_seq_len=2048,
        tie_embeddings=True,
        bos_id=2,
        eos_ids=(2,),
    ),
    "opt-66b": ModelConfig(
        arch="opt",
        vocab_size=50272,
        dim=9216,
        n_layers=64,
        n_heads=72,
        n_kv_heads=72,
        ffn_dim=36864,
        max_seq_len=2048,
        tie_embeddings=True,
        bos_id=2,
        eos_ids=(2,),
    ),
}


def shape(name: str) -> ModelConfig:
    """The named shape ``name``; a clear error lists the known names."""
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}") from None
