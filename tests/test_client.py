"""jdisagg.client against a fake, hand-checkable Generation server; and the committed stubs are current.

The fake echoes: a prompt's tokens are its token ids, or the character codes of its text (of
the last chat message's content for chat), and it streams them back reversed, one per message,
each with the character as its text; so "abc" comes back as "c", "b", "a", then a final message.
"""

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.proto import jdisagg_pb2_grpc as pb_grpc
from jdisagg.serving.client import AsyncClient, Client, make_request

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "jdisagg" / "proto" / "jdisagg.proto"


class FakeGeneration(pb_grpc.GenerationServicer):
    """Streams the prompt's tokens back reversed; records requests and cancellations."""

    def __init__(self):
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled = threading.Event()  # set when a Generate call ends before its final message
        self.delay = 0.0  # seconds before each message

    def Generate(self, request, context):
        self.requests.append(request)
        which = request.WhichOneof("input")
        if which == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            text = (
                request.text
                if which == "text"
                else (request.chat.messages[-1].content if request.chat.messages else "")
            )
            ids = [ord(c) for c in text]
        if not ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        finished = False

        def on_end():
            if not finished:
                self.cancelled.set()

        context.add_callback(on_end)
        max_tokens = request.sampling.max_tokens or 64
        out = ids[::-1][:max_tokens]
        for t in out:
            time.sleep(self.delay)
            top = [pb.TopLogprob(token_id=t, logprob=-0.5)] * request.sampling.logprobs
            logprobs = [pb.TokenLogprob(token_id=t, logprob=-0.5, top=top)] if top else []
            yield pb.GenerateResponse(token_ids=[t], text=chr(t), logprobs=logprobs)
        latency = pb.LatencyBreakdown(ttft_s=0.25, transfer_bytes=2**40, preemptions=1)
        yield pb.GenerateResponse(
            final=pb.FinalInfo(
                finish_reason="length" if len(ids) > max_tokens else "stop",
                prompt_tokens=len(ids),
                completion_tokens=len(out),
                latency=latency,
                request_id=request.request_id,
            )
        )
        finished = True

    def Tokenize(self, request, context):
        if request.WhichOneof("input") == "chat":
            text = "\n".join(f"{m.role}: {m.content}" for m in request.chat.messages)
        else:
            text = request.text
        bos = [1] if request.add_special_tokens and request.WhichOneof("input") == "text" else []
        return pb.TokenizeResponse(token_ids=bos + [ord(c) for c in text], tokens=["<s>"] * len(bos) + list(text))

    def ModelInfo(self, request, context):
        return pb.ModelInfoResponse(
            model_name="fake",
            vocab_size=0x110000,
            instances=[pb.Instance(role="prefill", devices=[0, 1], tp=2)],
            limits=pb.Limits(max_tokens=64),
        )


@pytest.fixture
def server():
    """(fake servicer, its address), served on a free port of 127.0.0.1 with the health service."""
    fake = FakeGeneration()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(fake, grpc_server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield fake, f"127.0.0.1:{port}"
    grpc_server.stop(grace=None)


# ---- requests -------------------------------------------------------------------------------


def test_make_request_inputs_and_sampling():
    assert make_request("hi").text == "hi"
    assert list(make_request([3, 2, 1]).token_ids.ids) == [3, 2, 1]
    assert make_request([]).WhichOneof("input") == "token_ids"  # sent, so the server can reject it
    chat = make_request([{"role": "user", "content": "hi"}]).chat.messages
    assert [(m.role, m.content) for m in chat] == [("user", "hi")]
    r = make_request("x", max_tokens=5, top_k=3, seed=7, stop="\n", stop_token_ids=[2], slo_ttft=0.5, request_id="r")
    s = r.sampling
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop), list(s.stop_token_ids)) == (5, 3, 7, ["\n"], [2])
    assert r.slo.ttft_s == 0.5 and r.request_id == "r"
    assert not make_request("x").sampling.HasField("seed") and not make_request("x").HasField("slo")
    with pytest.raises(ValueError, match="max_tokens must be >= 0"):
        make_request("x", max_tokens=-1)
    with pytest.raises(TypeError, match="a chat message is a dict"):
        make_request([{"role": "user"}])
    with pytest.raises(TypeError, match="a prompt is text"):
        make_request(None)


# ---- the blocking client --------------------------------------------------------------------


def test_generate_streams_one_token_per_message(server):
    _, target = server
    with Client(target) as client:
        responses = list(client.generate([5, 6, 7], request_id="abc"))
    assert [list(r.token_ids) for r in responses] == [[7], [6], [5], []]
    assert [r.HasField("final") for r in responses] == [False, False, False, True]
    final = responses[-1].final
    assert (final.finish_reason, final.prompt_tokens, final.completion_tokens, final.request_id) == (
        "stop",
        3,
        3,
        "abc",
    )


def test_complete_collects_text_tokens_logprobs_and_final(server):
    _, target = server
    with Client(target) as client:
        done = client.complete("hello", max_tokens=4, logprobs=2)
        chat = client.complete([{"role": "system", "content": "x"}, {"role": "user", "content": "ok"}])
    assert done.text == "olle" and done.token_ids == [ord(c) for c in "olle"]
    assert done.finish_reason == "length" and done.final.latency.ttft_s == 0.25
    assert [lp.token_id for lp in done.logprobs] == done.token_ids and len(done.logprobs[0].top) == 2
    assert chat.text == "ko"


def test_tokenize_model_info_health(server):
    _, target = server
    with Client(target) as client:
        assert list(client.tokenize("ab").token_ids) == [1, 97, 98]
        assert list(client.tokenize("ab", add_special_tokens=False).tokens) == ["a", "b"]
        assert list(client.tokenize([{"role": "user", "content": "a"}]).token_ids) == [ord(c) for c in "user: a"]
        info = client.model_info()
        assert info.model_name == "fake" and list(info.instances[0].devices) == [0, 1]
        assert client.health() == "SERVING"


def test_cancel_mid_stream_reaches_server(server):
    fake, target = server
    fake.delay = 0.01
    with Client(target) as client:
        stream = client.generate(list(range(1000)))
        got = [next(stream), next(stream)]
        stream.cancel()
        assert list(stream) == []  # a cancelled stream ends quietly
        assert fake.cancelled.wait(5)
        # Breaking out of a `with` block cancels too.
        fake.cancelled.clear()
        with client.generate(list(range(1000))) as stream:
            for _ in stream:
                break
        assert fake.cancelled.wait(5)
    assert [list(r.token_ids) for r in got] == [[999], [998]]


def test_errors_carry_the_status_code(server):
    _, target = server
    with Client(target) as client:
        with pytest.raises(grpc.RpcError) as error:
            client.complete("")
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in error.value.details()
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(grpc.RpcError) as error:
        client.health()
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- the async client -----------------------------------------------------------------------


def test_async_client(server):
    fake, target = server

    async def run():
        async with AsyncClient(target) as client:
            responses = [r async for r in client.generate("abc", max_tokens=2)]
            done = await client.complete([9, 8])
            assert await client.health() == "SERVING"
            assert list((await client.tokenize("a", add_special_tokens=False)).token_ids) == [97]
            assert (await client.model_info()).model_name == "fake"
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.complete([])
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            fake.delay = 0.01
            async with client.generate(list(range(1000))) as stream:
                async for _ in stream:
                    break
            return responses, done

    responses, done = asyncio.run(run())
    assert [r.text for r in responses] == ["c", "b", ""] and responses[-1].final.finish_reason == "length"
    assert done.token_ids == [8, 9] and done.finish_reason == "stop"
    assert fake.cancelled.wait(5)


# ---- the command line -----------------------------------------------------------------------


def _cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "jdisagg.client", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_cli_streams_text(server):
    _, target = server
    proc = _cli("--target", target, "--max_tokens", "3", "hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "oll\n"


def test_cli_json(server):
    fake, target = server
    proc = _cli("--target", target, "--json", "--seed", "5", "--stop", "x", "--stop", "y", "ab")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["b", "a", ""] and "final" not in lines[0]
    final = lines[-1]["final"]
    assert final["finish_reason"] == "stop" and final["latency"]["transfer_bytes"] == 2**40
    sampling = fake.requests[-1].sampling
    assert sampling.seed == 5 and list(sampling.stop) == ["x", "y"] and sampling.top_p == 1.0


def test_cli_chat_keeps_the_conversation(server):
    fake, target = server
    proc = _cli("--target", target, "--chat", stdin="hello\n\nworld\n/exit\nnot sent\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "olleh\ndlrow\n"
    roles = [[(m.role, m.content) for m in r.chat.messages] for r in fake.requests]
    assert roles == [
        [("user", "hello")],
        [("user", "hello"), ("assistant", "olleh"), ("user", "world")],
    ]


@pytest.mark.parametrize(
    "args,status,message",
    [
        ([""], 2, "jdisagg.client: error: INVALID_ARGUMENT: the prompt is empty"),
        ([], 2, "jdisagg.client: error: give a prompt"),
        (["--max_tokens", "-1", "x"], 2, "max_tokens must be >= 0"),
    ],
)
def test_cli_errors(server, args, status, message):
    _, target = server
    proc = _cli("--target", target, *args)
    assert proc.returncode == status, proc.stderr
    assert message in proc.stderr


def test_cli_unavailable_exits_1():
    proc = _cli("--target", "127.0.0.1:1", "hi")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("jdisagg.client: error: UNAVAILABLE: ")


# ---- the committed stubs --------------------------------------------------------------------


def test_stubs_match_the_proto(tmp_path):
    """The descriptor in jdisagg_pb2.py equals a fresh compile of jdisagg.proto (any protoc version)."""
    from grpc_tools import protoc

    out = tmp_path / "jdisagg.desc"
    assert protoc.main(["protoc", f"-I{ROOT}", f"--descriptor_set_out={out}", str(PROTO)]) == 0
    [fresh] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    messages = list(fresh.message_type)
    while messages:  # the Python generator drops json_name; so must we
        m = messages.pop()
        messages += m.nested_type
        for field in [*m.field, *m.extension]:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "stale stubs: run jdisagg/proto/regenerate.sh"


def test_stubs_come_from_the_pinned_grpcio_tools():
    pinned = re.search(r"^GRPCIO_TOOLS_VERSION=(\S+)$", (PROTO.parent / "regenerate.sh").read_text(), re.M)
    assert pinned and pb_grpc.GRPC_GENERATED_VERSION == pinned.group(1)
