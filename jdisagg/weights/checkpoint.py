"""Orbax checkpoints of a model, restored straight onto a device mesh.

A checkpoint is a directory::

    config.json   the ModelConfig fields (tuples written as lists)
    params/       the parameter tree, written by orbax (one tensorstore array per leaf)
    tokenizer/    Tokenizer.save() output, present only when a tokenizer was saved

``restore_checkpoint`` builds an abstract target (``jax.ShapeDtypeStruct`` with the wanted
sharding on every leaf) and hands it to orbax, which reads for each device only the slice
that device holds: a decode stage that owns half the layers reads half the layer bytes, and
no full host copy of a leaf is made per device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jdisagg.model.config import ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def save_checkpoint(path: str | os.PathLike, cfg: ModelConfig, params: dict, tokenizer=None) -> None:
    """Writes ``cfg``, ``params`` (numpy or jax arrays, sharded or not) and ``tokenizer`` under ``path``.

    Refuses to overwrite: ``path/params`` must not exist yet.
    """
    path = Path(path).absolute()  # orbax wants absolute paths
    if (path / PARAMS_DIR).exists():
        raise FileExistsError(f"checkpoint params already exist at {path / PARAMS_DIR}")
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, params)  # returns once the write has committed
    if jax.process_index() == 0:
        (path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(path / TOKENIZER_DIR)


def read_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig in ``path/config.json``; ValueError names any unknown or invalid field."""
    config_path = _checkpoint_dir(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint config missing: {config_path}")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, not {type(raw).__name__}")
    return config_from_json(raw, source=str(config_path))


def config_from_json(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    """A ModelConfig from its JSON fields, checking names and types."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown ModelConfig field(s) {', '.join(unknown)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in raw]
    if missing:
        raise ValueError(f"{source}: missing ModelConfig field(s) {', '.join(missing)}")
    values = {name: _field_value(name, hints[name], value, source) for name, value in raw.items()}
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def restore_checkpoint(path: str | os.PathLike, shardings: dict, dtype: str | jnp.dtype | None = None) -> dict:
    """Restores the params of ``path`` onto the devices of ``shardings``.

    ``shardings`` is a tree of ``jax.sharding.Sharding`` with the same structure as the saved
    params. Leaves keep their saved dtype unless ``dtype`` (e.g. ``cfg.dtype``) is given. Each
    device reads only its own shard from storage.
    """
    params_path = _checkpoint_dir(path) / PARAMS_DIR
    if not params_path.is_dir():
        raise FileNotFoundError(f"checkpoint params missing: {params_path}")
    with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.metadata(params_path).item_metadata
        target = _abstract_target(saved, shardings, None if dtype is None else jnp.dtype(dtype))
        return checkpointer.restore(params_path, target)


def load_checkpoint_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with the checkpoint at ``path``, or None when none was saved."""
    directory = _checkpoint_dir(path) / TOKENIZER_DIR
    if not directory.is_dir():
        return None
    from jdisagg.text.tokenizer import Tokenizer  # only checkpoints with a tokenizer need it

    return Tokenizer.load(directory)


# ---- helpers -----------------------------------------------------------------------------------


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    path = Path(path).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory missing: {path}")
    return path


def _abstract_target(saved, shardings: dict, dtype) -> dict:
    """ShapeDtypeStruct(saved shape, saved dtype or ``dtype``, sharding) for every saved leaf."""
    saved_by_path = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shardings)
    wanted = [jax.tree_util.keystr(p) for p, _ in leaves]
    missing, extra = sorted(set(saved_by_path) - set(wanted)), sorted(set(wanted) - set(saved_by_path))
    if missing or extra:
        raise ValueError(
            f"shardings do not match the saved params: not in shardings {missing or 'none'}, "
            f"not in the checkpoint {extra or 'none'}"
        )
    structs = []
    for key, (_, sharding) in zip(wanted, leaves, strict=True):
        meta = saved_by_path[key]
        structs.append(jax.ShapeDtypeStruct(meta.shape, dtype or meta.dtype, sharding=sharding))
    return jax.tree_util.tree_unflatten(treedef, structs)


def _field_value(name: str, hint, value, source: str):
    """``value`` from JSON converted to the type of ModelConfig field ``name``; ValueError if it cannot be."""

    def bad(expected: str):
        return ValueError(f"{source}: field {name!r} must be {expected}, got {value!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if name == "rope_scaling":
        if value is None:
            return None
        pairs = list(value.items()) if isinstance(value, dict) else value
        scalar = (str, int, float, bool, type(None))
        if not isinstance(pairs, list) or not all(
            isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], scalar)
            for p in pairs
        ):
            raise bad("null, an object or a list of [name, value] pairs of scalars")
        return tuple(sorted((k, v) for k, v in pairs))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("a boolean")
        return value
    if hint is int:
        if not is_int(value):
            raise bad("an integer")
        return value
    if hint is float:
        if not (is_int(value) or isinstance(value, float)):
            raise bad("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if hint == (int | None):
        if value is not None and not is_int(value):
            raise bad("an integer or null")
        return value
    if hint == tuple[int, ...]:
        if not isinstance(value, list) or not all(is_int(v) for v in value):
            raise bad("a list of integers")
        return tuple(value)
    return value  # a field type this reader does not know: ModelConfig checks it


class _DropOrbaxInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax():
    """Drops orbax's INFO/DEBUG records (several per call) while it runs; warnings still show."""
    absl_logger = logging.getLogger("absl")  # orbax logs through absl, which logs here
    log_filter = _DropOrbaxInfo()
    absl_logger.addFilter(log_filter)
    try:
        yield
    finally:
        absl_logger.removeFilter(log_filter)
