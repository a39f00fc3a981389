"""The multi-GPU presets (meshes/gpu-4*.toml, meshes/gpu-8*.toml) against the models they are
for, in bfloat16, on H200 memory (jdisagg.runtime.memory, the sizing the engine uses): heads
and layers divide, weights, prefill buffers and decode pools fit; on 8 GPUs the OPT-66B
placements of DistServe's experiment (models/opt-66b.toml) and the baselines beside them.

Two memories per device: an H200's 141 GB, and what JAX may use of it by default (75%: the
``memory_per_device`` the committed H200 profiles recorded), the one the engine sizes pools
from unless ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jdisagg import cards, toml_file
from jdisagg.model.config import shape
from jdisagg.preset import PIPELINE_STEPS, load_preset, parse
from jdisagg.runtime import memory
from jdisagg.sched.pages import pages_for

ROOT = Path(__file__).resolve().parent.parent
H200 = 141 * 10**9
JAX_DEFAULT = json.loads((ROOT / "profiles" / "opt-13b.nvidia-h200.json").read_text())["memory_per_device"]
GPU_4 = ["gpu-4", "gpu-4-1p3d", "gpu-4-colocated", "gpu-4-chunked"]
GPU_8 = ["gpu-8", "gpu-8-colocated", "gpu-8-chunked"]


def _bf16(card: str):
    return shape(cards.load_card(card).shape).replace(dtype="bfloat16")  # "auto" on a GPU


def _scratch(card: str) -> int:
    """The largest prefill program's scratch at a packed row of 2048 tokens: OPT-13B's from its
    H200 profile (tp=1); OPT-66B's estimated from it, scaled by the model dim (9216 / 5120), and
    not divided by tp (more than a tp=2 or tp=4 instance needs)."""
    profile = json.loads((ROOT / "profiles" / "opt-13b.nvidia-h200.json").read_text())
    opt13 = next(c for c in profile["configs"] if c["tp"] == 1)["prefill_scratch"]["2048"]
    return opt13 if card == "opt-13b" else opt13 * 9216 // 5120


@pytest.mark.parametrize("memory_per_device", [JAX_DEFAULT, H200])
@pytest.mark.parametrize("name", GPU_8)
def test_8_gpu_presets_fit_opt_66b(name, memory_per_device):
    cfg, preset = _bf16("opt-66b"), load_preset(name)
    preset.validate(cfg, 8, "gpu")
    pages = memory.check_fits(cfg, preset, memory_per_device, scratch=_scratch("opt-66b"))
    assert sorted(d for s in preset.instances for d in s.devices) == list(range(8))
    assert set(pages) == {s.where for s in preset.decode}  # each pool holds a max_seq_len request at least


def test_gpu_8_is_the_papers_placement_and_its_pool_by_hand():
    preset = load_preset("gpu-8")
    [prefill], [decode] = preset.prefill, preset.decode
    assert (prefill.tp, prefill.pp, decode.tp, decode.pp) == (4, 1, 2, 2)
    assert (decode.micro_batches, decode.steps_per_call) == (2, PIPELINE_STEPS)  # the pipeline in steady state
    cfg = _bf16("opt-66b")
    # By hand: 64 layers of q, k, v, o (9216^2 each, with biases) and fc1, fc2 (9216 x 36864),
    # split over pp x tp; the token and position tables split over tp (vocabulary) or not.
    layer = 64 * (4 * 9216 * 9216 + 2 * 9216 * 36864) * 2
    assert abs(memory.weight_bytes(cfg, decode) - (layer // 4 + 50272 * 9216 * 2 // 2)) < 0.01 * layer // 4
    kv = 2 * 64 * 9216 * 2 // 4  # K and V of every layer, over pp x tp
    want = int((JAX_DEFAULT - memory.weight_bytes(cfg, decode)) * 0.85) // (16 * kv)
    assert memory.check_fits(cfg, preset, JAX_DEFAULT, scratch=_scratch("opt-66b")) == {"decode[0]": want}
    assert want * 16 >= 256 * 400  # its 256 rows at about the chat workload's mean length


def test_colocated_replicas_are_as_many_as_fit():
    """tp=2 is the fewest GPUs per OPT-66B replica: on one H200, the weights (122 GiB) leave no
    room for a prefill call and buffer beside them; so 8 GPUs hold four replicas."""
    cfg, preset = _bf16("opt-66b"), load_preset("gpu-8-colocated")
    assert [(s.tp, s.pp) for s in preset.instances] == [(2, 1)] * 4
    text = (ROOT / "meshes" / "gpu-8-colocated.toml").read_text()
    one_gpu = text.split("\n[[colocated]]")[0] + "\n[[colocated]]\ndevices = [0]\nmax_batch = 256\n"
    one = parse(toml_file.tomllib.loads(one_gpu), "one-gpu.toml")
    with pytest.raises(ValueError) as e:
        memory.check_fits(cfg, one, H200, scratch=_scratch("opt-66b"))
    assert str(e.value).startswith("one-gpu.toml: colocated[0] (pp=1, tp=1): weights 122.41 GiB + prefill buffer")
    # Even without a prefill buffer or call, one request of max_seq_len would not fit either.
    request = pages_for(preset.max_seq_len, preset.page_size) * preset.page_size * cfg.kv_bytes_per_token(2)
    assert memory.weight_bytes(cfg, one.instances[0]) + request / memory.KV_MEMORY_FRACTION > JAX_DEFAULT


@pytest.mark.parametrize("card", ["llama3-8b", "opt-13b"])
@pytest.mark.parametrize("name", GPU_4)
def test_4_gpu_presets_fit(name, card):
    cfg, preset = _bf16(card), load_preset(name)
    preset.validate(cfg, 4, "gpu")
    pages = memory.check_fits(cfg, preset, JAX_DEFAULT, scratch=_scratch("opt-13b"))
    assert sorted(d for s in preset.instances for d in s.devices) == list(range(4))
    assert all(p * preset.page_size >= preset.max_seq_len * 2 for p in pages.values())
    for spec in preset.decode:
        assert spec.steps_per_call == (PIPELINE_STEPS if spec.pp > 1 else 1)
