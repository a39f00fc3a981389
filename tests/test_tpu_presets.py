"""The TPU presets (meshes/tpu-v5e-8.toml, meshes/tpu-v6e-8.toml) against the model they are
for, Llama-3-8B in bfloat16 (models/llama3-8b.toml), on the memory of those chips: heads and
layers divide, weights, prefill buffers and decode pools fit (jdisagg.runtime.memory), and
the errors a user sees when a preset does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

from jdisagg import cards
from jdisagg.engine import Engine
from jdisagg.model.config import shape
from jdisagg.preset import load_preset, parse
from jdisagg.runtime import instances, memory

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# HBM per chip as the Cloud TPU v5e and v6e pages give it, 16 GB and 32 GB; read as 10^9
# bytes, the smaller of the two readings (JAX's own limit on a chip is not known here).
CHIPS = {"tpu-v5e-8": 16 * 10**9, "tpu-v6e-8": 32 * 10**9}


def _llama3_8b():
    card = cards.load_card("llama3-8b")
    return shape(card.shape).replace(dtype="bfloat16")  # "auto" on a TPU


def _prefill_scratch(tokens: int) -> int:
    """The largest prefill program's scratch at a packed row of ``tokens``: the committed H200
    profile's, measured at tp=1 (a tp=4 instance splits its activations, so it needs less)."""
    profile = json.loads((ROOT / "profiles" / "llama3-8b.nvidia-h200.json").read_text())
    return next(c for c in profile["configs"] if c["tp"] == 1)["prefill_scratch"][str(tokens)]


def _preset_text(name: str) -> str:
    return (ROOT / "meshes" / f"{name}.toml").read_text()


@pytest.mark.parametrize("name", list(CHIPS))
def test_tpu_preset_fits_llama3_8b(name):
    cfg, preset = _llama3_8b(), load_preset(name)
    preset.validate(cfg, 8, "tpu")  # heads by tp, layers by pp, devices, lengths
    budget = max(s.token_budget for s in preset.prefill)
    pages = memory.check_fits(cfg, preset, CHIPS[name], scratch=_prefill_scratch(budget))
    (decode,) = preset.decode
    # By hand: bf16 weights split 4 ways, the embedding and head only over tp; K and V of 32
    # layers x 8 KV heads x 128 split over pp x tp; 85% of what the weights leave.
    layer_bytes = 2 * 32 * (4096 * 128 * (32 + 8 + 8 + 32) + 3 * 4096 * 14336)  # q, k, v, o; gate, up, down
    table_bytes = 2 * 2 * 128256 * 4096  # embedding and lm_head
    weights = layer_bytes // 4 + table_bytes // 2
    assert abs(memory.weight_bytes(cfg, decode) - weights) / weights < 1e-3  # norms are the rest
    kv_per_token = 2 * 32 * 8 * 128 * 2 // 4
    want = int((CHIPS[name] - memory.weight_bytes(cfg, decode)) * 0.85) // (preset.page_size * kv_per_token)
    assert pages == {"decode[0]": want}
    # Every request the batch may hold fits at half the longest length.
    assert want * preset.page_size >= decode.max_batch * preset.max_seq_len // 2


def test_tpu_preset_that_does_not_fit_says_why(tmp_path):
    cfg = _llama3_8b()

    def variant(name: str, old: str, new: str):
        text = _preset_text(name)
        assert old in text
        path = tmp_path / f"{name}-variant.toml"
        path.write_text(text.replace(old, new))
        return load_preset(str(path))

    # Prefill on one v5e chip: the 15 GiB of weights alone exceed it.
    one_chip = variant("tpu-v5e-8", "devices = [0, 1, 2, 3]\ntp = 4", "devices = [0]\ntp = 1")
    with pytest.raises(
        ValueError, match=r"prefill\[0\] \(pp=1, tp=1\): the weights take 14.96 GiB per device, more than its 14.90"
    ):
        memory.check_fits(cfg, one_chip, CHIPS["tpu-v5e-8"])
    # On one v6e chip they fit, but not beside a buffer of 128k prefix tokens (16 GiB of KV).
    buffered = variant("tpu-v6e-8", "devices = [0, 1, 2, 3]\ntp = 4", "devices = [0]\ntp = 1\nbuffer_tokens = 131072")
    with pytest.raises(ValueError, match=r"prefill\[0\] \(pp=1, tp=1\): weights 14.96 GiB \+ prefill buffer, call and"):
        memory.check_fits(cfg, buffered, CHIPS["tpu-v6e-8"])
    # A decode pool of explicit pages larger than the chip holds.
    too_many = variant("tpu-v5e-8", "max_batch = 128\n", "max_batch = 128\npages = 400000\n")
    with pytest.raises(ValueError, match=r"decode\[0\] \(pp=2, tp=2\): pages=400000 do not fit beside the weights"):
        memory.check_fits(cfg, too_many, CHIPS["tpu-v5e-8"])
    # Heads and layers: tp=3 divides neither the 32 heads nor the 8 KV heads; pp=3 not 32 layers.
    v5e = tomllib.loads(_preset_text("tpu-v5e-8"))
    tp3 = parse({**v5e, "prefill": [{"devices": [0, 1, 2], "tp": 3}]}, "tp3")
    with pytest.raises(ValueError, match=r"prefill\[0\].tp=3 does not divide the model's (heads|kv_heads)"):
        tp3.validate(cfg, 8, "tpu")
    pp3 = parse({**v5e, "decode": [{"devices": [4, 5, 6], "pp": 3}]}, "pp3")
    with pytest.raises(ValueError, match=r"decode\[0\].pp=3 does not divide the model's layers \(32\)"):
        pp3.validate(cfg, 8, "tpu")


def test_engine_refuses_a_preset_too_big_for_its_devices(monkeypatch):
    """Before any weight is placed, on devices that report their memory (CPU devices report
    none: pretend they have 64 KiB)."""
    monkeypatch.setattr(instances, "memory_per_device", lambda devices: 64 * 2**10)
    with pytest.raises(ValueError, match=r"cpu-single.toml: colocated\[0\] \(pp=1, tp=1\): the weights take"):
        Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)
