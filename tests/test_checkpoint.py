"""jdisagg.weights.checkpoint: save from one device, restore sharded onto a (pp, tp) mesh."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jdisagg.model import decoder
from jdisagg.model.config import shape
from jdisagg.weights.checkpoint import (
    CONFIG_FILE,
    load_checkpoint_tokenizer,
    read_checkpoint_config,
    restore_checkpoint,
    save_checkpoint,
)

CFG = shape("tiny-llama").replace(
    rope_scaling=tuple(
        sorted(
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }.items()
        )
    )
)

# Which axis of a layer kernel goes on 'tp': heads for attention, F for the MLP.
_TP_AXIS = {"q": 2, "k": 2, "v": 2, "o": 1, "gate": 2, "up": 2, "down": 1}


def _spec(path, ndim: int) -> P:
    names = [k.key for k in path]
    axes = [None] * ndim
    if names[0] == "layers":
        axes[0] = "pp"  # each pipeline stage holds only its layers
        if names[-1] == "kernel":
            axes[_TP_AXIS[names[-2]]] = "tp"
    elif names[-1] == "embedding":
        axes[0] = "tp"  # vocab rows
    elif names[-1] == "lm_head":
        axes[1] = "tp"  # vocab columns
    return P(*axes)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("pp", "tp"))


@pytest.fixture(scope="module")
def params() -> dict:
    # From a single device to host numpy, as a converter would hand them over.
    return jax.tree_util.tree_map(np.asarray, jax.jit(decoder.init_params, static_argnums=0)(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, params):
    import tokenizers
    from tokenizers import models

    from jdisagg.text.tokenizer import Tokenizer

    tok = Tokenizer(
        tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])),
        bos_id=1,
        eos_ids=(2,),
    )
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, CFG, params, tokenizer=tok)
    return path


def _shardings(mesh: Mesh, tree) -> dict:
    return jax.tree_util.tree_map_with_path(lambda p, a: NamedSharding(mesh, _spec(p, a.ndim)), tree)


def _shard_shape(mesh: Mesh, spec: P, full: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n // mesh.shape[a] if a else n for n, a in zip(full, tuple(spec) + (None,) * len(full), strict=False))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_config_round_trip(saved):
    cfg = read_checkpoint_config(saved)
    assert cfg == CFG
    raw = json.loads((saved / CONFIG_FILE).read_text())
    assert raw["eos_ids"] == [2] and isinstance(raw["rope_scaling"], list)


def test_restore_lands_sharded(saved, params, mesh):
    shardings = _shardings(mesh, params)
    restored = restore_checkpoint(saved, shardings)
    flat_params = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        where = jax.tree_util.keystr(path)
        full = flat_params[path]
        assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32, where
        assert leaf.sharding == _at(shardings, path), where
        want = _shard_shape(mesh, leaf.sharding.spec, full.shape)
        assert len(leaf.addressable_shards) == 4, where
        for shard in leaf.addressable_shards:
            assert shard.data.shape == want, (where, shard.device, shard.data.shape, want)
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=where)
        np.testing.assert_array_equal(np.asarray(leaf), full, err_msg=where)
    # A pipeline stage holds half of the 4 layers; a tp rank half of the query heads.
    q = restored["layers"]["q"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(2, CFG.dim, CFG.n_heads // 2, CFG.head_dim)}


def test_restore_in_bfloat16(saved, params, mesh):
    restored = restore_checkpoint(saved, _shardings(mesh, params), dtype="bfloat16")  # as in cfg.dtype
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
        assert leaf.dtype == jnp.bfloat16, jax.tree_util.keystr(path)
    q = restored["layers"]["q"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {(2, CFG.dim, CFG.n_heads // 2, CFG.head_dim)}
    np.testing.assert_array_equal(
        np.asarray(restored["layers"]["mlp"]["down"]["kernel"]),
        np.asarray(jnp.asarray(params["layers"]["mlp"]["down"]["kernel"]).astype(jnp.bfloat16)),
    )


def test_save_sharded_arrays_and_restore_on_one_device(saved, params, mesh, tmp_path):
    sharded = restore_checkpoint(saved, _shardings(mesh, params))
    save_checkpoint(tmp_path / "again", CFG, sharded)
    one = jax.tree_util.tree_map(lambda _: SingleDeviceSharding(jax.devices()[5]), params)
    again = restore_checkpoint(tmp_path / "again", one)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, again), params)
    assert again["embed"]["tokens"]["embedding"].devices() == {jax.devices()[5]}
    assert load_checkpoint_tokenizer(tmp_path / "again") is None


def test_tokenizer_round_trip(saved):
    tok = load_checkpoint_tokenizer(saved)
    assert tok.bos_id == 1 and tok.eos_ids == (2,)
    assert tok.encode("ab") == [2]


def test_refuses_to_overwrite(saved, params):
    with pytest.raises(FileExistsError, match="params"):
        save_checkpoint(saved, CFG, params)


def test_missing_pieces(saved, params, mesh, tmp_path):
    shardings = _shardings(mesh, params)
    with pytest.raises(FileNotFoundError, match="directory missing"):
        restore_checkpoint(tmp_path / "nowhere", shardings)
    with pytest.raises(FileNotFoundError, match="directory missing"):
        read_checkpoint_config(tmp_path / "nowhere")

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(saved / CONFIG_FILE, config_only / CONFIG_FILE)
    with pytest.raises(FileNotFoundError, match="params missing"):
        restore_checkpoint(config_only, shardings)
    assert read_checkpoint_config(config_only) == CFG

    with pytest.raises(FileNotFoundError, match="config missing: .*config.json"):
        read_checkpoint_config(tmp_path)


def test_shardings_must_match_the_saved_tree(saved, params, mesh):
    shardings = _shardings(mesh, params)
    del shardings["head"]["lm_head"]
    with pytest.raises(ValueError, match="lm_head"):
        restore_checkpoint(saved, shardings)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"n_expertz": 8}, "n_expertz"),  # unknown field
        ({"dim": "64"}, "dim"),  # wrong type
        ({"qkv_bias": 1}, "qkv_bias"),
        ({"eos_ids": 2}, "eos_ids"),
        ({"rope_scaling": "llama3"}, "rope_scaling"),
        ({"arch": "gpt"}, "architecture 'gpt'"),  # rejected by ModelConfig itself
        ({"n_kv_heads": 3}, "n_kv_heads"),
    ],
)
def test_bad_config_field(saved, tmp_path, change, named):
    raw = json.loads((saved / CONFIG_FILE).read_text())
    raw.update(change)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=named):
        read_checkpoint_config(tmp_path)


def test_missing_config_field(saved, tmp_path):
    raw = json.loads((saved / CONFIG_FILE).read_text())
    del raw["vocab_size"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="vocab_size"):
        read_checkpoint_config(tmp_path)
