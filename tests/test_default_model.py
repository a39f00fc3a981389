"""End to end with the real default model (SmolLM2-135M-Instruct, fetched once from PyPI)."""

import pytest

from jdisagg.engine import Engine
from jdisagg.sched.params import SamplingParams

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    return Engine(mesh="cpu", warm_up=False, progress=False)  # the default model, disaggregated


def test_paris_through_the_disaggregated_path(engine):
    assert engine.preset.name == "cpu" and not engine.preset.colocated
    prompt = engine.tokenizer.encode_chat(PARIS)
    out = engine.generate([prompt], SamplingParams(max_tokens=24))[0]
    assert out.text.strip() == "The capital of France is Paris."
    assert out.finish_reason == "stop"


def test_default_model_colocated_matches(engine):
    prompts = [engine.tokenizer.encode_chat(PARIS), engine.tokenizer.encode("Once upon a time,")]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    disaggregated = [c.tokens for c in engine.generate(prompts, params)]
    colocated = Engine(mesh="cpu-colocated", warm_up=False, progress=False)
    assert [c.tokens for c in colocated.generate(prompts, params)] == disaggregated


def test_demo_serves_the_answer_over_grpc():
    """``python -m jdisagg.demo``: server, client and the default model end to end."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "jdisagg.demo"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "assistant: The capital of France is Paris." in proc.stdout
    assert "KV transfer" in proc.stderr


@pytest.mark.parametrize("stop", ["Paris.", "is Par", "France is", "capital of", "e c"])
def test_streamed_text_with_a_stop_string_equals_offline(engine, stop):
    """The answer streamed over gRPC with a stop string (inside a token, across tokens, near
    the start) is the offline text: the full answer cut before the stop string."""
    import grpc

    from jdisagg.proto import jdisagg_pb2 as pb
    from jdisagg.proto import jdisagg_pb2_grpc as pb_grpc
    from jdisagg.serving.server import Server

    prompt = engine.tokenizer.encode_chat(PARIS)
    full = engine.generate([prompt], SamplingParams(max_tokens=24))[0].text
    offline = engine.generate([prompt], SamplingParams(max_tokens=24, stop=(stop,)))[0]
    assert offline.text == full[: full.index(stop)] and offline.finish_reason == "stop"
    server = Server(engine, port=0)
    server.start()
    server.set_ready()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            request = pb.GenerateRequest(
                chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in PARIS]),
                sampling=pb.SamplingParameters(max_tokens=24, stop=[stop]),
            )
            pieces = [m.text for m in pb_grpc.GenerationStub(channel).Generate(request, timeout=120)]
    finally:
        server.stop()
    assert "".join(pieces) == offline.text
