"""Checks jdisagg on a GPU (or TPU) host: greedy tokens of disaggregated layouts equal a
single-device run whose prompts attend by XLA's einsums (so the layouts' flash prefill kernel,
on GPUs, is checked against them), with the KV transfer under
``jax.transfer_guard_device_to_host("disallow")`` (always on inside ``kv_transfer.reshard``),
and a bf16 Llama-3-8B-shaped model generating on the largest layout the host allows.
The "pallas" layouts of several GPUs run the kernels per device under ``shard_map``
(``attention.HeadSplit``: the flash prefill kernel and the paged decode kernel over each
GPU's own heads, each pipeline stage over its own layers); two GPUs run the tp=2 one. Those
have run only interpreted on CPU so far. Models whose heads a layout cannot split
(smollm2-135m's 9 heads at tp=2) skip it, saying why.

    python launch/gpu_check.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jdisagg.engine import Engine
from jdisagg.model import attention
from jdisagg.model.config import shape
from jdisagg.preset import load_preset
from jdisagg.sched.params import SamplingParams

LAYOUTS = {
    "single": (1, "[[colocated]]\ndevices = [0]\npages = 256\nmax_batch = 8\n"),
    "prefill[0] -> decode[1]": (
        2,
        "[[prefill]]\ndevices = [0]\n[[decode]]\ndevices = [1]\npages = 256\nmax_batch = 8\n",
    ),
    "single, pallas attention": (
        1,
        'decode_attention = "pallas"\n[[colocated]]\ndevices = [0]\npages = 256\nmax_batch = 8\n',
    ),
    "prefill[0] -> decode[1], pallas": (
        2,
        'decode_attention = "pallas"\n'
        "[[prefill]]\ndevices = [0]\n[[decode]]\ndevices = [1]\npages = 256\nmax_batch = 8\n",
    ),
    "prefill tp=2 -> decode pp=2": (
        4,
        "[[prefill]]\ndevices = [0, 1]\ntp = 2\n[[decode]]\ndevices = [2, 3]\npp = 2\npages = 256\nmax_batch = 8\n",
    ),
    "prefill tp=2 -> decode tp=2": (
        4,
        "[[prefill]]\ndevices = [0, 1]\ntp = 2\n[[decode]]\ndevices = [2, 3]\ntp = 2\npages = 256\nmax_batch = 8\n",
    ),
    "colocated tp=2, pallas": (
        2,
        'decode_attention = "pallas"\n[[colocated]]\ndevices = [0, 1]\ntp = 2\npages = 256\nmax_batch = 8\n',
    ),
    "prefill tp=2 -> decode pp=2, pallas": (
        4,
        'decode_attention = "pallas"\n'
        "[[prefill]]\ndevices = [0, 1]\ntp = 2\n[[decode]]\ndevices = [2, 3]\npp = 2\npages = 256\nmax_batch = 8\n",
    ),
    "prefill tp=2 -> decode pp=2 x tp=2, pallas": (
        6,
        'decode_attention = "pallas"\n[[prefill]]\ndevices = [0, 1]\ntp = 2\n'
        "[[decode]]\ndevices = [2, 3, 4, 5]\npp = 2\ntp = 2\npages = 256\nmax_batch = 8\n",
    ),
}


def preset_file(body: str, directory: Path, name: str, max_seq_len: int = 512) -> str:
    path = directory / f"{name.replace(' ', '_').replace('>', '').replace('[', '').replace(']', '')}.toml"
    path.write_text(f"page_size = 16\nmax_seq_len = {max_seq_len}\n{body}")
    return str(path)


def main() -> None:
    n = jax.device_count()
    print(f"jax {jax.__version__}, {n} x {jax.devices()[0].device_kind}")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, k).tolist() for k in (5, 17, 33, 9)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        # tiny-llama's head dim (8) is below the flash kernel's 16: smollm2-135m's (64) is not.
        for model in ("tiny-llama", "tiny-opt", "smollm2-135m"):

            def run(name: str, body: str, model: str = model) -> list[list[int]]:
                engine = Engine(
                    model, preset_file(body, Path(tmp), name), dtype="float32", warm_up=False, progress=False
                )
                return [c.tokens for c in engine.generate(prompts, params)]

            attention.PROMPT_ATTENTION = "xla"
            reference = run("single", LAYOUTS["single"][1])
            attention.PROMPT_ATTENTION = "auto"
            for name, (needs, body) in LAYOUTS.items():
                if needs <= n:
                    try:  # the preset's own check: heads or layers this layout cannot split
                        load_preset(preset_file(body, Path(tmp), name)).validate(shape(model), n)
                    except ValueError as e:
                        print(f"{model:12s} {name:44s} skipped: {e}")
                        continue
                    tokens = run(name, body)
                    print(f"{model:12s} {name:44s} equal to single device: {tokens == reference}")
        name = "prefill tp=2 -> decode pp=2" if n >= 4 else "prefill[0] -> decode[1]" if n >= 2 else "single"
        start = time.perf_counter()
        engine = Engine(
            "llama3-8b", preset_file(LAYOUTS[name][1], Path(tmp), "big", 2048), warm_up=False, progress=False
        )
        print(f"llama3-8b bf16 on {name}: ready in {time.perf_counter() - start:.1f}s")
        batch = [rng.integers(3, 128000, 500).tolist() for _ in range(8)]
        engine.generate(batch, SamplingParams(max_tokens=4, ignore_eos=True))  # compile the shapes used
        start = time.perf_counter()
        out = engine.generate(batch, SamplingParams(max_tokens=64, ignore_eos=True))
        seconds = time.perf_counter() - start
        print(
            f"llama3-8b: 8 x (500 in, 64 out) in {seconds:.2f}s, {8 * 64 / seconds:.0f} tok/s; "
            f"first tokens {[c.tokens[:3] for c in out[:2]]}"
        )


if __name__ == "__main__":
    main()
