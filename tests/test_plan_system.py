"""The planner against the engine: what ``plan.system`` derives from a preset equals what the
engine builds (so the simulator and the server cannot drift apart), the profiler's file on a
small grid, and a planned preset that serves the default model."""

import dataclasses

import jax
import numpy as np
import pytest

from jdisagg import cards
from jdisagg.bench.stats import Slo
from jdisagg.engine import Engine
from jdisagg.model.config import shape
from jdisagg.plan import preset_out, profiler, search, simulate, system
from jdisagg.plan import profile as prof
from jdisagg.preset import load_preset
from jdisagg.runtime.instances import Instances
from jdisagg.sched.params import SamplingParams

LAYOUTS = {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)}


def _profile(cfg, **kw):
    kinds = {"prefill": (0.01, 1e-5, 0), "decode": (0.01, 1e-6)}
    return prof.synthetic(cfg, {layout: kinds for layout in LAYOUTS}, platform="cpu", **kw)


@pytest.mark.parametrize("mesh", ["cpu-2p2d", "cpu-chunked", "cpu-single", "cpu-tp4-pp2tp2"])
def test_system_derives_what_the_engine_builds(mesh, monkeypatch):
    loaded = cards.open_model(cards.load_card("tiny-llama"))
    abstract = _abstract()

    def zeros(shardings):  # weights need no values here: zeros, without compiling an init
        return jax.tree_util.tree_map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)

    monkeypatch.setattr(loaded, "place", zeros)
    preset = load_preset(mesh)
    built = Instances.build(loaded, preset)
    s = system.build(preset, _profile(loaded.cfg))
    assert (s.prefill_specs, s.decode_specs) == tuple(built.scheduler_specs())
    assert s.decode_takes_from == built.decode_takes_from
    assert s.length_buckets == built.length_buckets
    for runner, inst in zip(built.prefill, s.prefill, strict=True):
        assert runner.token_buckets == inst.token_buckets
        assert runner.call_tokens() == system.call_tokens(inst.spec, s.length_buckets)
    for runner, inst in zip(built.decode, s.decode, strict=True):
        assert runner.batch_buckets == inst.batch_buckets
        assert (runner.host_loop, runner.width_buckets) == (inst.host_loop, inst.width_buckets)


def test_pages_come_from_the_engines_sizing_code():
    from jdisagg.runtime import memory

    cfg = shape("llama3-8b").replace(dtype="bfloat16")
    p = _profile(cfg, memory_per_device=100 * 2**30)
    preset = load_preset("gpu-2")  # pages left out: sized from memory, as auto_pages does
    s = system.build(preset, p)
    weights = p.config(1, 1).weight_bytes
    spec = preset.decode[0]
    assert s.decode[0].n_pages == memory.pages_that_fit(100 * 2**30 - weights, cfg, spec, preset)
    with pytest.raises(system.DoesNotFit, match="exceed"):
        system.build(preset, dataclasses.replace(p, memory_per_device=weights // 2))


def test_profiler_writes_a_profile_the_planner_reads(tmp_path):
    small = tmp_path / "small.toml"
    small.write_text(
        'name = "small"\npage_size = 16\nmax_seq_len = 64\nlength_buckets = [32, 64]\n'
        "[[chunked]]\ndevices = [0]\nmax_batch = 4\nbatch_buckets = [4]\npages = 32\nchunk_tokens = 16\n"
    )
    options = profiler.Options("tiny-llama", str(small), ((1, 1),), repeats=1, quick=True, progress=False)
    p = profiler.run(options)
    path = tmp_path / "p.json"
    p.save(path)
    q = prof.load(path)
    c = q.config(1, 1)
    assert q.platform == "cpu" and q.serving.length_buckets == (32, 64) and q.serving.chunk_tokens == 16
    assert c.prefill and c.decode and c.mixed and c.insert and c.L_m in (32, 64, 96, 128)
    assert c.weight_bytes == sum(x.size * 4 for x in jax.tree_util.tree_leaves(_abstract()))
    assert all(f.errors for f in (c.prefill, c.decode)) and len(c.points["decode"]) >= 4
    # The planner runs on it: a one-device replica's goodput on a short workload.
    w = simulate.Workload("fixed", Slo(5, 1), input_len=40, output_len=8, warmup_s=0, duration_s=4)
    s = system.build(preset_out.make_preset(q, preset_out.Layout.replica("chunked", 1)), q)
    [o] = simulate.sweep(s, w, [1.0])
    assert o.attainment > 0


def _abstract():
    from jdisagg.model import decoder

    return decoder.abstract_params(shape("tiny-llama"))


def test_a_planned_preset_serves_the_default_model(tmp_path):
    cfg = cards.open_model(cards.load_card("smollm2-135m-instruct")).cfg
    serving = prof.Serving(16, 256, (64, 128, 256), "dot", False, 4, 8, (), 64)
    kinds = {"prefill": (0.05, 1e-4, 0), "decode": (0.03, 1e-6)}
    p = prof.synthetic(cfg, {(1, 1): kinds}, serving=serving, platform="cpu", memory_per_device=2**30, L_m=256)
    w = simulate.Workload("fixed", Slo(2.0, 0.5), input_len=100, output_len=16, warmup_s=0, duration_s=20)
    plan = search.search(p, search.Target(w, gpus=2), jobs=1)
    path = tmp_path / "planned.toml"
    path.write_text(plan.toml)
    preset = load_preset(str(path))
    assert preset.device_count() <= 2 and all(i.pages for i in preset.decode)
    engine = Engine("smollm2-135m-instruct", str(path), warm_up=False, progress=False)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    [out] = engine.generate([prompt], SamplingParams(max_tokens=8))
    assert out.text.startswith("The capital of France is Paris")
