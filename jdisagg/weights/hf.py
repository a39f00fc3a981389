"""Hugging Face checkpoints: ``config.json`` + ``*.safetensors`` <-> our config and param tree.

One table per architecture maps each leaf of ``jdisagg.model.abstract_params`` to the
Hugging Face tensor it comes from and how its layout changes (``_Layout``). Reading and
writing both walk that table, and the GGUF reader reuses it after renaming GGUF tensors to
Hugging Face names, so there is one place that knows the mapping.

Hugging Face stores linear weights as ``[out, in]``; flax ``DenseGeneral`` kernels are
``[in, out...]``: q/k/v ``[D, N, H]`` from ``[N*H, D]``, o ``[N, H, D]`` from ``[D, N*H]``.
Per-layer tensors are stacked on a leading ``L`` axis.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging
from tqdm.auto import tqdm

from jdisagg.model import decoder
from jdisagg.model.config import ModelConfig
from jdisagg.text.tokenizer import Tokenizer

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Tensors some checkpoints carry that the model recomputes or never needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _Layout(enum.Enum):
    """How one Hugging Face tensor becomes one (per-layer) leaf of our tree."""

    SAME = "same"  # identical shape: embeddings, norms, plain biases
    LINEAR = "linear"  # [out, in] -> [in, out]
    HEADS_IN = "heads_in"  # q/k/v kernel: [n*H, D] -> [D, n, H]
    HEADS_OUT = "heads_out"  # o kernel: [D, N*H] -> [N, H, D]
    HEADS_BIAS = "heads_bias"  # q/k/v bias: [n*H] -> [n, H]

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of a leaf whose (per-layer) shape is ``shape``."""
        if self is _Layout.LINEAR:
            return shape[::-1]
        if self is _Layout.HEADS_IN:
            return (shape[1] * shape[2], shape[0])
        if self is _Layout.HEADS_OUT:
            return (shape[2], shape[0] * shape[1])
        if self is _Layout.HEADS_BIAS:
            return (shape[0] * shape[1],)
        return shape

    def to_ours(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self in (_Layout.SAME, _Layout.HEADS_BIAS):
            return w.reshape(shape)
        return w.T.reshape(shape)  # LINEAR, HEADS_IN ([D, n*H]), HEADS_OUT ([N*H, D])

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        if self is _Layout.SAME:
            return w
        if self is _Layout.LINEAR:
            return w.T
        if self is _Layout.HEADS_IN:
            return w.reshape(w.shape[0], -1).T
        if self is _Layout.HEADS_OUT:
            return w.reshape(-1, w.shape[-1]).T
        return w.reshape(-1)


def _llama_table() -> dict[tuple[str, ...], tuple[str, _Layout]]:
    L = "model.layers.{i}."
    table = {
        ("embed", "tokens", "embedding"): ("model.embed_tokens.weight", _Layout.SAME),
        ("layers", "attn_norm", "scale"): (L + "input_layernorm.weight", _Layout.SAME),
        ("layers", "o", "kernel"): (L + "self_attn.o_proj.weight", _Layout.HEADS_OUT),
        ("layers", "mlp_norm", "scale"): (L + "post_attention_layernorm.weight", _Layout.SAME),
        ("head", "norm", "scale"): ("model.norm.weight", _Layout.SAME),
        ("head", "lm_head"): ("lm_head.weight", _Layout.LINEAR),
    }
    for p in "qkv":
        table["layers", p, "kernel"] = (L + f"self_attn.{p}_proj.weight", _Layout.HEADS_IN)
        table["layers", p, "bias"] = (L + f"self_attn.{p}_proj.bias", _Layout.HEADS_BIAS)
    for p in ("gate", "up", "down"):
        table["layers", "mlp", p, "kernel"] = (L + f"mlp.{p}_proj.weight", _Layout.LINEAR)
    return table


def _opt_table() -> dict[tuple[str, ...], tuple[str, _Layout]]:
    M, L = "model.decoder.", "model.decoder.layers.{i}."
    table = {
        ("embed", "tokens", "embedding"): (M + "embed_tokens.weight", _Layout.SAME),
        ("embed", "positions", "embedding"): (M + "embed_positions.weight", _Layout.SAME),
        ("layers", "o", "kernel"): (L + "self_attn.out_proj.weight", _Layout.HEADS_OUT),
        ("layers", "o", "bias"): (L + "self_attn.out_proj.bias", _Layout.SAME),
    }
    for ours, theirs in (("attn_norm", L + "self_attn_layer_norm"), ("mlp_norm", L + "final_layer_norm")):
        table["layers", ours, "scale"] = (theirs + ".weight", _Layout.SAME)
        table["layers", ours, "bias"] = (theirs + ".bias", _Layout.SAME)
    table["head", "norm", "scale"] = (M + "final_layer_norm.weight", _Layout.SAME)
    table["head", "norm", "bias"] = (M + "final_layer_norm.bias", _Layout.SAME)
    for p in "qkv":
        table["layers", p, "kernel"] = (L + f"self_attn.{p}_proj.weight", _Layout.HEADS_IN)
        table["layers", p, "bias"] = (L + f"self_attn.{p}_proj.bias", _Layout.HEADS_BIAS)
    for p in ("fc1", "fc2"):
        table["layers", "mlp", p, "kernel"] = (L + f"{p}.weight", _Layout.LINEAR)
        table["layers", "mlp", p, "bias"] = (L + f"{p}.bias", _Layout.SAME)
    return table


_TABLES = {"llama": _llama_table(), "opt": _opt_table()}


@functools.lru_cache(maxsize=8)
def _leaves(cfg: ModelConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...], str, _Layout], ...]:
    """(path, shape, Hugging Face name template, layout) for every leaf of the param tree."""
    table = _TABLES[cfg.arch]
    flat, _ = jax.tree_util.tree_flatten_with_path(decoder.abstract_params(cfg))
    leaves = []
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        if path not in table:
            raise AssertionError(f"no Hugging Face name for parameter {'/'.join(path)} ({cfg.arch})")
        leaves.append((path, tuple(leaf.shape), *table[path]))
    return tuple(leaves)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def params_from_tensors(cfg: ModelConfig, get: Callable[[str], np.ndarray], desc: str | None = None) -> dict:
    """Our float32 param tree from Hugging Face tensors; ``get(name)`` returns one tensor.

    Each stacked leaf is allocated once and filled layer by layer, so peak host memory is
    the tree plus one tensor. ``desc`` labels a progress bar (hidden when not on a terminal).
    """
    leaves = _leaves(cfg)
    n_tensors = sum(cfg.n_layers if path[0] == "layers" else 1 for path, *_ in leaves)
    params: dict = {}
    with tqdm(total=n_tensors, desc=desc, unit="tensor", disable=None if desc else True) as bar:
        for path, shape, name, layout in leaves:
            layered = path[0] == "layers"
            names = [name.format(i=i) for i in range(cfg.n_layers)] if layered else [name]
            one_shape = shape[1:] if layered else shape
            out = np.empty((len(names), *one_shape), np.float32)  # [L, ...], or [1, ...] outside layers
            for i, n in enumerate(names):
                w = get(n)
                if tuple(w.shape) != layout.hf_shape(one_shape):
                    raise ValueError(f"tensor {n} has shape {tuple(w.shape)}, expected {layout.hf_shape(one_shape)}")
                out[i] = layout.to_ours(np.asarray(w, np.float32), one_shape)
                bar.update()
            _set(params, path, out if layered else out[0])
    return params


def tensors_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Hugging Face tensors (``[out, in]`` layouts, one per layer) from our param tree."""
    out = {}
    for path, _, name, layout in _leaves(cfg):
        leaf = params
        for k in path:
            leaf = leaf[k]
        leaf = np.asarray(leaf)
        if path[0] == "layers":
            for i in range(cfg.n_layers):
                out[name.format(i=i)] = np.ascontiguousarray(layout.to_hf(leaf[i]))
        else:
            out[name] = np.ascontiguousarray(layout.to_hf(leaf))
    return out


def hf_names(cfg: ModelConfig) -> set[str]:
    """Every Hugging Face tensor name ``params_from_tensors`` reads for ``cfg``."""
    return {
        name.format(i=i)
        for path, _, name, _ in _leaves(cfg)
        for i in (range(cfg.n_layers) if path[0] == "layers" else [0])
    }


# ---- config.json ---------------------------------------------------------------------------


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list | tuple) else value


def _rope(hf: dict) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling pairs) from rope_theta/rope_scaling or the newer rope_parameters."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    pairs = tuple(sorted((k, _hashable(v)) for k, v in scaling.items() if v is not None))
    if dict(pairs).get("rope_type", dict(pairs).get("type")) in (None, "default"):
        pairs = ()
    return theta, pairs or None


def config_from_hf(hf: dict) -> ModelConfig:
    """Our ``ModelConfig`` from a Hugging Face ``config.json`` dict (llama, mistral, qwen2, opt)."""
    model_type = hf.get("model_type")
    common = dict(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        max_seq_len=hf["max_position_embeddings"],
        bos_id=hf.get("bos_token_id"),
        eos_ids=_ids(hf.get("eos_token_id")),
    )
    if model_type in LLAMA_MODEL_TYPES:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: the llama block uses silu")
        if model_type != "qwen2" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ValueError("attention_bias/mlp_bias are not supported: the llama block has no o_proj or MLP biases")
        theta, scaling = _rope(hf)
        if model_type == "mistral" or hf.get("use_sliding_window"):
            window = hf.get("sliding_window")
            if window and window < common["max_seq_len"]:
                logging.info("%s uses sliding-window attention (%d): contexts are capped there", model_type, window)
                common["max_seq_len"] = window
        return ModelConfig(
            arch="llama",
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or 0,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **common,
        )
    if model_type == "opt":
        if not hf.get("do_layer_norm_before", True):
            raise ValueError("OPT with do_layer_norm_before=False (post-norm, e.g. opt-350m) is not supported")
        if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
            raise ValueError("OPT with word_embed_proj_dim != hidden_size (projected embeddings) is not supported")
        if not hf.get("enable_bias", True) or not hf.get("layer_norm_elementwise_affine", True):
            raise ValueError("OPT without biases or without affine layer norms is not supported")
        if hf.get("activation_function", "relu") != "relu":
            raise ValueError(f"unsupported OPT activation {hf['activation_function']!r}: the block uses relu")
        return ModelConfig(
            arch="opt", n_kv_heads=hf["num_attention_heads"], ffn_dim=hf["ffn_dim"], tie_embeddings=True, **common
        )
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join((*LLAMA_MODEL_TYPES, 'opt'))}")


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
    """A Hugging Face ``config.json`` dict for ``cfg`` (inverse of ``config_from_hf``)."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len,
        bos_token_id=cfg.bos_id,
        eos_token_id=list(cfg.eos_ids) if len(cfg.eos_ids) > 1 else (cfg.eos_ids[0] if cfg.eos_ids else None),
        tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype=torch_dtype,
    )
    if cfg.arch == "opt":
        if cfg.head_dim * cfg.n_heads != cfg.dim or not cfg.tie_embeddings or cfg.norm_eps != 1e-5:
            raise ValueError("OPT checkpoints need head_dim * n_heads == dim, tied embeddings and norm_eps 1e-5")
        return dict(
            architectures=["OPTForCausalLM"], model_type="opt", ffn_dim=cfg.ffn_dim, word_embed_proj_dim=cfg.dim,
            do_layer_norm_before=True, activation_function="relu", enable_bias=True,
            layer_norm_elementwise_affine=True, **common,
        )  # fmt: skip
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    return dict(
        architectures=["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        model_type=model_type,
        num_key_value_heads=cfg.n_kv_heads,
        intermediate_size=cfg.ffn_dim,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        hidden_act="silu",
        **common,
    )


# ---- directories ---------------------------------------------------------------------------


@contextlib.contextmanager
def _open_safetensors(directory: Path) -> Iterator[Mapping[str, Any]]:
    """Yields {tensor name: open safetensors file} over a sharded or single checkpoint."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    with contextlib.ExitStack() as stack:
        where = {}
        for f in files:
            handle = stack.enter_context(safetensors.safe_open(str(directory / f), framework="numpy"))
            where.update(dict.fromkeys(handle.keys(), handle))
        yield where


def read_hf_config(path: str | os.PathLike) -> tuple[ModelConfig, Tokenizer]:
    """``read_hf``'s config and tokenizer, without the weights."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: not a Hugging Face model directory (no config.json)")
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    tokenizer = Tokenizer.load(directory)
    eos_ids = list(cfg.eos_ids)
    gen_path = directory / "generation_config.json"
    extra = _ids(json.loads(gen_path.read_text()).get("eos_token_id")) if gen_path.exists() else ()
    for i in (*extra, *tokenizer.eos_ids):
        if i not in eos_ids:
            eos_ids.append(i)
    bos_id = cfg.bos_id if cfg.bos_id is not None else tokenizer.bos_id
    cfg = cfg.replace(bos_id=bos_id, eos_ids=tuple(eos_ids))
    return cfg, tokenizer.replace(bos_id=bos_id, eos_ids=tuple(eos_ids))


def read_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict, Tokenizer]:
    """ModelConfig, host numpy float32 params and tokenizer from a Hugging Face directory.

    Reads ``config.json`` (+ ``generation_config.json`` for extra EOS ids), ``*.safetensors``
    (sharded or single) and the tokenizer files (see ``Tokenizer.load``).
    """
    directory = Path(path)
    cfg, tokenizer = read_hf_config(directory)

    with _open_safetensors(directory) as where:
        # Some checkpoints (e.g. facebook/opt-*) were saved without the "model." prefix.
        def resolve(name: str) -> str:
            if name not in where and name.startswith("model.") and name[len("model.") :] in where:
                return name[len("model.") :]
            return name

        def get(name: str) -> np.ndarray:
            key = resolve(name)
            if key not in where:
                tied = " (or set tie_word_embeddings)" if name == "lm_head.weight" else ""
                raise ValueError(f"{directory}: tensor {name} is missing{tied}")
            return where[key].get_tensor(key)

        params = params_from_tensors(cfg, get, desc=f"loading {directory.name}")
        unused = sorted(set(where) - {resolve(n) for n in hf_names(cfg)})
        unused = [n for n in unused if not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight"]
        if unused:
            logging.warning("%s: %d tensors not used, e.g. %s", directory, len(unused), unused[:5])
    return cfg, params, tokenizer


def write_hf(path: str | os.PathLike, cfg: ModelConfig, params: dict, tokenizer: Tokenizer | None = None) -> None:
    """Writes ``params`` as a Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = tensors_from_params(cfg, params)
    dtype = str(next(iter(tensors.values())).dtype)
    (directory / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(directory)
        config = dict(
            tokenizer_class="PreTrainedTokenizerFast",
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            add_bos_token=tokenizer.add_bos,
            chat_template=tokenizer.chat_template,
        )
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
