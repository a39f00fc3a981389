"""jdisagg against Hugging Face transformers on this CPU, side by side in one process.

    pip install torch transformers   # torch==2.13.0 is a CPU wheel on the project machines
    python launch/cpu_vs_transformers.py                       # default model, preset `cpu`
    python launch/cpu_vs_transformers.py --mesh cpu-single --batches 1,8 --new_tokens 128

Both decode the default model's GGUF weights (dequantized once by jdisagg and written as a
Hugging Face directory with ``jdisagg.weights.hf.write_hf``, so the two read the same float32
weights) from the same chat prompt, greedy, ``--new_tokens`` tokens per request with EOS
ignored, at each batch size. transformers runs ``generate`` (fp32, all cores); jdisagg runs
``Engine.generate`` on the preset's prefill and decode instances. Each timing comes after a
warm-up call of the same shape, and the two alternate ``--repeats`` times so that other load
on the machine falls on both; the median tok/s of each is printed with their ratio, and
whether the two generated the same tokens.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from jdisagg import platform

_MESH = flags.DEFINE_string("mesh", "cpu", "jdisagg mesh preset.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per request.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls of each system per batch size (median reported).")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "The user message.")


def main(argv: list[str]) -> None:
    del argv
    import torch
    import transformers

    from jdisagg import cards
    from jdisagg.engine import Engine
    from jdisagg.model import decoder, sharding
    from jdisagg.sched.params import SamplingParams
    from jdisagg.weights.hf import write_hf

    start = time.perf_counter()
    engine = Engine(cards.DEFAULT_MODEL, _MESH.value, progress=False)
    print(f"jdisagg: preset {_MESH.value} ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": _PROMPT.value}])
    n = _NEW_TOKENS.value

    with tempfile.TemporaryDirectory() as tmp:
        loaded = cards.open_model(cards.load_card(cards.DEFAULT_MODEL), "float32")
        import jax

        cpu = jax.devices("cpu")[0]
        abstract = decoder.abstract_params(loaded.cfg)
        host = jax.device_get(loaded.place(sharding.param_shardings(abstract, sharding.make_mesh([cpu], 1, 1), {})))
        write_hf(tmp, loaded.cfg, host, loaded.tokenizer)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def run_hf(batch: int) -> list[list[int]]:
        ids = torch.tensor([prompt] * batch)
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=engine.tokenizer.eos_ids[0],
            )
        return out[:, len(prompt) :].tolist()

    def run_jd(batch: int) -> list[list[int]]:
        out = engine.generate([prompt] * batch, SamplingParams(max_tokens=n, ignore_eos=True))
        return [c.tokens for c in out]

    systems = {"transformers": run_hf, "jdisagg": run_jd}
    print(
        f"default model, {len(prompt)}-token chat prompt, {n} new tokens, greedy; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, jax {jax.__version__}, {os.cpu_count()} CPUs"
    )
    print(f"{'batch':>5}  {'transformers tok/s':>18}  {'jdisagg tok/s':>13}  {'ratio':>5}  same tokens")
    for batch in map(int, _BATCHES.value):
        tokens = {name: run(batch) for name, run in systems.items()}  # warm-up
        seconds = {name: [] for name in systems}
        for _ in range(_REPEATS.value):
            for name, run in systems.items():
                t = time.perf_counter()
                run(batch)
                seconds[name].append(time.perf_counter() - t)
        rate = {name: batch * n / float(np.median(s)) for name, s in seconds.items()}
        same = tokens["transformers"] == tokens["jdisagg"]
        print(
            f"{batch:>5}  {rate['transformers']:>18.1f}  {rate['jdisagg']:>13.1f}  "
            f"{rate['jdisagg'] / rate['transformers']:>5.2f}  {same}",
            flush=True,
        )


if __name__ == "__main__":
    platform.simulate_cpu_devices()
    platform.enable_compilation_cache()
    app.run(main)
