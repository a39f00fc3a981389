"""The default model end to end: a gRPC server on a free local port, a client streaming one
chat answer through it, the latency breakdown, and a clean shutdown.

    python -m jdisagg.demo
    python -m jdisagg.demo --prompt "Name three rivers in Europe." --mesh cpu-colocated

Programs are compiled on first use (and kept in the persistent compilation cache), so the
demo starts at once; ``jdisagg.serve`` compiles everything before it reports ready. The
question is asked once offline first (compiling the shapes it uses), so the latency breakdown
printed at the end describes the warm system, not the compiler.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jdisagg import cards, platform

_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "The user message to send.")
_MODEL = flags.DEFINE_string("model", cards.DEFAULT_MODEL, "Model card name, card file, .gguf, or directory.")
_MESH = flags.DEFINE_string("mesh", "cpu", "Mesh preset name (meshes/) or .toml file.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Most tokens to generate.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"jdisagg.demo: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    from jdisagg.engine import Engine
    from jdisagg.serving.client import Client
    from jdisagg.serving.server import Server

    try:
        engine = Engine(_MODEL.value, _MESH.value, warm_up=False)
    except (ValueError, FileNotFoundError) as e:
        print(f"jdisagg.demo: error: {e}", file=sys.stderr)
        sys.exit(2)
    if engine.tokenizer is None:
        print(f"jdisagg.demo: error: model {_MODEL.value} has no tokenizer", file=sys.stderr)
        sys.exit(2)
    from jdisagg.sched.params import SamplingParams

    messages = [{"role": "user", "content": _PROMPT.value}]
    engine.generate([engine.tokenizer.encode_chat(messages)], SamplingParams(max_tokens=_MAX_TOKENS.value))
    server = Server(engine, port=0)
    server.start()
    server.set_ready()
    spec = ", ".join(f"{s.where} on devices {list(s.devices)} (pp={s.pp}, tp={s.tp})" for s in engine.preset.instances)
    print(f"serving {engine.model.card.name} on 127.0.0.1:{server.port}: {spec}", file=sys.stderr)
    print(f"user: {_PROMPT.value}\nassistant: ", end="", flush=True)
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            final = None
            for msg in client.generate(messages, max_tokens=_MAX_TOKENS.value):
                print(msg.text, end="", flush=True)
                if msg.HasField("final"):
                    final = msg.final
        print()
        t = final.latency
        print(
            f"[{final.completion_tokens} tokens, {final.finish_reason}; TTFT {t.ttft_s * 1e3:.0f} ms "
            f"(queue {t.queue_s * 1e3:.0f}, prefill {t.prefill_s * 1e3:.0f}), KV transfer {t.transfer_s * 1e3:.1f} ms "
            f"/ {t.transfer_bytes / 2**20:.1f} MiB, TPOT {t.tpot_s * 1e3:.0f} ms]",
            file=sys.stderr,
        )
    finally:
        server.drain(timeout=10)


if __name__ == "__main__":
    platform.simulate_cpu_devices()
    platform.enable_compilation_cache()
    app.run(main)
