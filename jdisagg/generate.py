"""Offline generation from the command line.

    python -m jdisagg.generate --prompt "What is the capital of France?" --chat
    python -m jdisagg.generate --model tiny-llama --mesh cpu-tp4-pp2tp2 --prompt_ids 5,6,7 --max_tokens 8

Bad input (unknown model or mesh, a prompt that is too long, bad sampling values) prints
one line to stderr and exits with status 2.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from jdisagg import cards, platform

_MODEL = flags.DEFINE_string("model", cards.DEFAULT_MODEL, "Model card name (models/), card file, .gguf, or directory.")
_MESH = flags.DEFINE_string("mesh", "cpu", "Mesh preset name (meshes/) or .toml file.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
_PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", [], "Prompt as comma-separated token ids; repeatable.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each text prompt as a user message in the model's chat template.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Most tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k cut; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Per-request seed (request i uses seed + i).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string; repeatable.")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence tokens.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Override the card's dtype.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per prompt instead of text.")


def _fail(message: str) -> None:
    print(f"jdisagg.generate: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; pass prompts with --prompt")
    from jdisagg.engine import Engine
    from jdisagg.sched.params import SamplingParams

    prompts: list = []
    try:
        prompts += [[int(t) for t in s.split(",") if t.strip()] for s in _PROMPT_IDS.value]
    except ValueError:
        _fail("--prompt_ids takes comma-separated integers")
    if not _PROMPT.value and not prompts:
        _fail("give at least one --prompt or --prompt_ids")
    try:
        params = [
            SamplingParams(
                max_tokens=_MAX_TOKENS.value,
                temperature=_TEMPERATURE.value,
                top_k=_TOP_K.value,
                top_p=_TOP_P.value,
                seed=_SEED.value + i,
                stop=tuple(_STOP.value),
                ignore_eos=_IGNORE_EOS.value,
            )
            for i in range(len(_PROMPT.value) + len(prompts))
        ]
        engine = Engine(_MODEL.value, _MESH.value, dtype=_DTYPE.value, warm_up=False)  # compile what is used
        for text in _PROMPT.value:
            if _CHAT.value:
                if engine.tokenizer is None:
                    _fail(f"model {_MODEL.value} has no tokenizer, so no chat template")
                prompts.append(engine.tokenizer.encode_chat([{"role": "user", "content": text}]))
            else:
                prompts.append(text)
        results = engine.generate(prompts, params)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for r in results:
        if _JSON.value:
            print(
                json.dumps(
                    {
                        "text": r.text,
                        "tokens": r.tokens,
                        "finish_reason": r.finish_reason,
                        "prompt_tokens": len(r.prompt_tokens),
                    }
                )
            )
        else:
            print(r.text if engine.tokenizer else " ".join(map(str, r.tokens)))


if __name__ == "__main__":
    platform.simulate_cpu_devices()
    platform.enable_compilation_cache()
    app.run(main)
