"""GGUF files (llama.cpp's format): config, dequantized float32 params and tokenizer.

Tensors are renamed to their Hugging Face names and fed through the same table as
Hugging Face checkpoints (``jdisagg.weights.hf.params_from_tensors``); the only GGUF-specific
step on the weights is undoing the Q/K row permutation that llama.cpp's converter applies
for its RoPE layout (architecture ``llama`` only).

Supported architectures: ``llama`` (Llama, Mistral, SmolLM2, ...) and ``qwen2``.

Reading a GGUF file is slow on small machines (the default model's: ~7 s on 2 cores, most of
it parsing the vocabulary's fields and dequantizing), so ``read_gguf_cached``, what model
cards of GGUF files load through, keeps what it read as a Hugging Face directory under
``$JDISAGG_CACHE/dequantized`` (float32 safetensors, ~4 bytes a parameter) and reads that
on later starts (~1.3 s).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from absl import logging

from jdisagg.model import decoder
from jdisagg.model.config import ModelConfig
from jdisagg.text.tokenizer import Tokenizer
from jdisagg.weights import hf
from jdisagg.weights.default import default_cache_dir
from jdisagg.weights.hf import params_from_tensors

ARCHITECTURES = ("llama", "qwen2")
_PERMUTED_ARCHS = ("llama",)  # converters permute Q/K rows only for these

# GGUF per-layer tensor names -> Hugging Face module names.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation of rows ``[n_heads * H, ...]``.

    The converter reorders each head's rows from the Hugging Face rotation layout (pairs
    ``(i, i + H/2)``) to interleaved pairs ``(2i, 2i + 1)``: ``[n, 2, H/2] -> [n, H/2, 2]``.
    """
    rest = w.shape[1:]
    return w.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path) -> gguf.GGUFReader:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: not a readable GGUF file: it is a directory")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises whatever numpy raises on a short or bad file
        raise ValueError(f"{path}: not a readable GGUF file: {e}") from e


def _field_values(reader: gguf.GGUFReader) -> dict[str, Any]:
    values = {}
    for name, field in reader.fields.items():
        if not name.startswith("GGUF."):
            values[name] = field.contents()
    return values


def _rope_scaling(meta: dict[str, Any], arch: str, theta: float, head_dim: int, rope_freqs: np.ndarray | None):
    """RoPE scaling pairs from GGUF metadata or a Llama 3 style ``rope_freqs`` tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        return (("factor", float(meta[f"{arch}.rope.scaling.factor"])), ("rope_type", "linear"))
    if kind not in (None, "none"):
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")
    if rope_freqs is None:
        return None
    # llama.cpp divides each frequency by rope_freqs[i]; Llama 3.x converters write the
    # "llama3" scaling as such factors. Recognize the standard parameters, or refuse.
    factor = float(rope_freqs.max())
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    scaling = dict(
        rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=original,
    )  # fmt: skip
    probe = ModelConfig(
        arch="llama", vocab_size=1, dim=head_dim, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=1, max_seq_len=1,
        rope_theta=theta, rope_scaling=tuple(sorted(scaling.items())),
    )  # fmt: skip
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if np.allclose(plain / rope_freqs, decoder.rope_inv_freq(probe), rtol=1e-4):
        return probe.rope_scaling
    raise ValueError("unsupported rope_freqs tensor: not the standard llama3 RoPE scaling")


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(w, np.float32).reshape([int(d) for d in reversed(t.shape)])  # GGML lists dims reversed


def _config(meta: dict[str, Any], arch: str, tensors: dict[str, gguf.ReaderTensor], tokenizer: Tokenizer):
    n_heads = int(meta[f"{arch}.attention.head_count"])
    n_kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", n_heads))
    dim = int(meta[f"{arch}.embedding_length"])
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // n_heads))
    theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    rope_freqs = _dequantize(tensors["rope_freqs.weight"]) if "rope_freqs.weight" in tensors else None
    return ModelConfig(
        arch="llama",
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        dim=dim,
        n_layers=int(meta[f"{arch}.block_count"]),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=int(meta[f"{arch}.feed_forward_length"]),
        max_seq_len=int(meta[f"{arch}.context_length"]),
        head_dim=head_dim,
        norm_eps=_f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(meta, arch, theta, head_dim, rope_freqs),
        qkv_bias=arch == "qwen2",
        tie_embeddings="output.weight" not in tensors,
        bos_id=tokenizer.bos_id,
        eos_ids=tokenizer.eos_ids,
    )


def read_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no tensor is dequantized)."""
    return Tokenizer.from_gguf_fields(_field_values(_open(Path(path))))


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer]:
    """ModelConfig, host numpy float32 params, tokenizer from a GGUF file."""
    path = Path(path)
    reader = _open(path)
    meta = _field_values(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    tokenizer = Tokenizer.from_gguf_fields(meta)
    tensors = {t.name: t for t in reader.tensors}

    try:
        cfg = _config(meta, arch, tensors, tokenizer)
    except KeyError as e:
        raise ValueError(f"{path}: GGUF metadata or tensor {e} is missing") from None
    if tokenizer.vocab_size != cfg.vocab_size:
        logging.warning("%s: tokenizer has %d tokens, embedding %d rows", path, tokenizer.vocab_size, cfg.vocab_size)

    by_hf_name = {_hf_name(name): t for name, t in tensors.items() if _hf_name(name) is not None}
    unused = sorted(name for name in tensors if _hf_name(name) is None and name != "rope_freqs.weight")
    if unused:
        logging.warning("%s: %d tensors not used, e.g. %s", path, len(unused), unused[:5])

    def get(hf_name: str) -> np.ndarray:
        if hf_name not in by_hf_name:
            raise ValueError(f"{path}: no tensor for {hf_name}")
        w = _dequantize(by_hf_name[hf_name])
        if arch in _PERMUTED_ARCHS and ".q_proj." in hf_name:
            w = unpermute_rows(w, cfg.n_heads)
        elif arch in _PERMUTED_ARCHS and ".k_proj." in hf_name:
            w = unpermute_rows(w, cfg.n_kv_heads)
        return w

    params = params_from_tensors(cfg, get, desc=f"dequantizing {path.name}")
    return cfg, params, tokenizer


# Part of each cache entry's name: a change to what read_gguf returns must change it.
CACHE_FORMAT = 1


def cache_entry(path: str | os.PathLike) -> Path:
    """Where ``read_gguf_cached`` keeps ``path``'s dequantized model: named by the file's
    resolved path, size and modification time, so a changed file is read again."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{CACHE_FORMAT}|{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return default_cache_dir() / "dequantized" / f"{path.stem}-{key}"


def read_gguf_cached(path: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer]:
    """``read_gguf`` through the dequantized cache (module docstring). An entry that cannot be
    read is read again from the GGUF file and replaced; one that cannot be written (a read-only
    or full disk) is skipped with a warning."""
    entry = cache_entry(path)
    if entry.is_dir():
        try:
            return hf.read_hf(entry)
        except Exception as e:  # noqa: BLE001  (any damage: the GGUF file is the truth)
            logging.warning("%s: unreadable cache entry (%s); reading %s again", entry, e, path)
            shutil.rmtree(entry, ignore_errors=True)
    cfg, params, tokenizer = read_gguf(path)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    try:
        hf.write_hf(tmp, cfg, params, tokenizer)
        # Only what reads back as the same config and tokenizer is kept.
        cfg_back, tokenizer_back = hf.read_hf_config(tmp)
        if (
            cfg_back != cfg
            or repr(tokenizer_back) != repr(tokenizer)
            or tokenizer_back.chat_template != tokenizer.chat_template
        ):
            logging.warning("%s: its config does not survive the Hugging Face format; not cached", path)
        else:
            os.rename(tmp, entry)  # atomic; fails if another process got there first
            logging.info("%s: dequantized weights cached in %s", path, entry)
    except Exception as e:  # noqa: BLE001  (a cache that cannot be written never fails the load)
        if not entry.is_dir():
            logging.warning("%s: could not cache the dequantized weights in %s: %s", path, entry.parent, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg, params, tokenizer
