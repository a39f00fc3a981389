"""The decode program keeps each stage's weights on its own devices."""

import re

import jax
import numpy as np
import pytest

from jdisagg.model import axes, sharding
from jdisagg.model.config import ModelConfig
from jdisagg.model.decoder import init_params
from jdisagg.model.sampler import SamplingArrays
from jdisagg.runtime.decode import DecodeRunner

# Weights much larger than activations, so a gathered weight cannot hide among activations.
CFG = ModelConfig(
    arch="llama", vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=512, max_seq_len=128
)
_COLLECTIVE = re.compile(
    r"=\s*\(?([a-z0-9]+\[[0-9,]*\][^ ]*(?:,\s*[a-z0-9]+\[[0-9,]*\][^ ]*)*)\)?\s+"
    r"(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)\("
)


def _decode_runner(steps: int = 1):
    mesh = sharding.make_mesh(jax.devices()[4:], 2, 2)
    host = init_params(CFG, jax.random.key(0))
    params = jax.device_put(host, sharding.param_shardings(host, mesh, axes.DEFAULT_RULES))
    return DecodeRunner(
        CFG,
        params,
        mesh,
        axes.DEFAULT_RULES,
        max_batch=4,
        n_pages=16,
        page_size=8,
        max_seq_len=64,
        micro_batches=2,
        steps=steps,
    )


def _collectives(hlo: str):
    """(op, element count) of every collective in an HLO module."""
    out = []
    for m in _COLLECTIVE.finditer(hlo):
        for dims in re.findall(r"\[([0-9,]*)\]", m.group(1)):
            out.append((m.group(2), int(np.prod([int(d) for d in dims.split(",") if d]))))
    return out


def test_each_device_holds_only_its_stage():
    runner = _decode_runner()
    layers = runner.params["layers"]
    for leaf in jax.tree_util.tree_leaves(layers):
        for shard in leaf.addressable_shards:
            assert shard.data.shape[0] == CFG.n_layers // 2
    q = layers["q"]["kernel"]  # [L, D, N, H]: layers over pp, heads over tp
    assert {s.data.shape for s in q.addressable_shards} == {(2, CFG.dim, CFG.n_heads // 2, CFG.head_dim)}


@pytest.mark.parametrize("steps", [1, 4])
def test_no_weight_is_gathered(steps):
    """Neither one step nor a call of several (the tokens fed back on the devices)."""
    runner = _decode_runner(steps)
    b = 4
    args = (
        runner.params,
        runner.k_pages,
        runner.v_pages,
        np.zeros(b, np.int32),
        np.zeros(b, np.int32),
        np.zeros((b, runner.max_pages_per_seq), np.int32),
        np.full(b, steps, np.int32),
        SamplingArrays.of([], b),
    )
    hlo = runner._step.lower(*args).compile().as_text()
    collectives = _collectives(hlo)
    ops = {op for op, _ in collectives}
    assert "collective-permute" in ops  # the stages hand activations to each other
    smallest_weight_shard = min(
        int(np.prod(s.data.shape))
        for leaf in jax.tree_util.tree_leaves(runner.params["layers"])
        if leaf.ndim >= 3
        for s in leaf.addressable_shards
    )
    biggest = max(n for _, n in collectives)
    assert biggest < smallest_weight_shard, (biggest, smallest_weight_shard, collectives)


def test_steps_update_the_page_pool_in_place():
    """The decode and chunked-prefill steps must not copy the page pool: on an accelerator a
    copy of a pool sized to the free memory does not fit (seen on an H200 before the mixed
    step wrote its packed row with one scatter)."""
    mesh = sharding.make_mesh(jax.devices()[:1], 1, 1)
    host = init_params(CFG, jax.random.key(0))
    params = jax.device_put(host, sharding.param_shardings(host, mesh, axes.DEFAULT_RULES))
    runner = DecodeRunner(
        CFG,
        params,
        mesh,
        axes.DEFAULT_RULES,
        max_batch=4,
        n_pages=2000,
        page_size=8,
        max_seq_len=64,
        micro_batches=1,
        chunk_tokens=16,
    )
    b, w = 4, 8
    common = (
        runner.params,
        runner.k_pages,
        runner.v_pages,
        np.zeros(b, np.int32),
        np.zeros(b, np.int32),
        np.zeros((b, w), np.int32),
    )
    if runner.host_loop:  # one device on CPU: the layer program is what writes the pools
        [layer] = [p for p in runner.programs() if p.label == f"decode B={b} W={w} layer"]
        step = layer.jitted.lower(*layer.args).compile()
    else:
        step = runner._step.lower(*common, np.ones(b, np.int32), SamplingArrays.of([], b)).compile()
    chunk = (np.zeros(16, np.int32), np.zeros(16, np.int32), np.zeros((1, w), np.int32), np.int32(0))
    mixed = runner._mixed.lower(*common, *chunk, SamplingArrays.of([], b + 1)).compile()
    for compiled in (step, mixed):
        memory = compiled.memory_analysis()
        assert memory.temp_size_in_bytes < runner.k_pages.nbytes / 4
        assert memory.alias_size_in_bytes >= 2 * runner.k_pages.nbytes  # both pools donated and reused
