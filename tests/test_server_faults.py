"""The gRPC server over fake runners (tests/fakes.py): hostile and malformed input, every
kind of worker failure, cancellation and deadlines freeing what a request holds, and the
metrics counting every ending. Nothing compiles, so these run in seconds."""

import concurrent.futures
import json
import math
import threading
import time

import fakes
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jdisagg import cards, toml_file
from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.proto import jdisagg_pb2_grpc as pb_grpc
from jdisagg.serving.server import Server

PRESET = """page_size = 16
max_seq_len = 256
[[prefill]]
devices = [0]
max_batch = 4
token_budget = 64
[[decode]]
devices = [1]
max_batch = 8
pages = 64
"""


class Served:
    def __init__(self, preset=PRESET, tokenizer=None, ready=True, max_queue=64, record_trace=None):
        self.engine = fakes.fake_engine(preset, tokenizer=tokenizer)
        self.submitted = []
        submit = self.engine.submit
        self.engine.submit = lambda r: self.submitted.append(r) or submit(r)
        self.server = Server(self.engine, port=0, max_queue=max_queue, record_trace=record_trace)
        self.server.start()
        if ready:
            self.server.set_ready()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = pb_grpc.GenerationStub(self.channel)

    def raw(self, method: str, data: bytes, stream: bool = True):
        """Calls ``method`` with request bytes as given (no client-side serialization)."""
        path = f"/jdisagg.v1.Generation/{method}"
        if stream:
            call = self.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            return list(call(data, timeout=30))
        return self.channel.unary_unary(path, request_serializer=None, response_deserializer=None)(data, timeout=30)

    def sample(self, name: str, **labels) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self):
        self.channel.close()
        self.server.stop()


@pytest.fixture
def served():
    s = Served(tokenizer=fakes.ByteTokenizer())
    yield s
    s.close()


def _ids(ids, **sampling):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(**sampling))


def _collect(stub, request, timeout=30):
    tokens, final, text = [], None, ""
    for msg in stub.Generate(request, timeout=timeout):
        tokens += list(msg.token_ids)
        text += msg.text
        if msg.HasField("final"):
            final = msg.final
    return tokens, text, final


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def _wait(predicate, timeout=60.0):  # generous: the suite's other worker may load the machine
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_tokens_stream_as_counted(served):
    tokens, text, final = _collect(served.stub, _ids([60], max_tokens=5, ignore_eos=True))
    assert tokens == [61, 62, 63, 64, 65] and text == "=>?@A" and final.finish_reason == "length"


# ---- hostile input: each gets its status, and the server keeps serving --------------------

BAD = [
    (_ids([5], top_k=2**31), "top_k"),  # a valid uint32 that int32 device code cannot hold
    (_ids([5], top_k=2**32 - 1), "top_k"),
    (_ids([5], max_tokens=2**32 - 1), "max_tokens"),
    (_ids([5], max_tokens=256), "max_tokens=256 exceeds the limit of 255"),
    (_ids([5], stop=[""]), "stop string must not be empty"),
    (_ids([5], stop=["x"] * 17), "at most 16 stop strings"),
    (_ids([5], stop=["x" * 257]), "at most 256 characters"),
    (_ids([5], stop_token_ids=[300]), "stop token id 300"),
    (_ids([5], stop_token_ids=[-1]), "stop_token_ids"),
    (_ids([5], temperature=math.inf), "temperature"),
    (_ids([5], temperature=math.nan), "temperature"),
    (_ids([5], top_p=math.nan), "top_p"),
    (_ids([5], logprobs=21), "logprobs"),
    (_ids([5], seed=2**32), "seed"),
    (_ids([-3]), "outside the vocabulary"),
    (_ids([5] * 256), "at most 255"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), request_id="x" * 2**20), "request_id"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), slo=pb.Slo(ttft_s=math.nan)), "slo.ttft_s"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), slo=pb.Slo(tpot_s=math.inf)), "slo.tpot_s"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5]), slo=pb.Slo(tpot_s=-1)), "slo.tpot_s"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="tool", content="x")])), "role"),
    (pb.GenerateRequest(chat=pb.ChatMessages()), "no messages"),
    (pb.GenerateRequest(), "no input"),
]


@pytest.mark.parametrize("request_,message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_are_invalid_argument_and_never_reach_a_worker(served, request_, message):
    code, details = _code(lambda: _collect(served.stub, request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert not served.submitted
    assert _collect(served.stub, _ids([10], max_tokens=3, ignore_eos=True))[0] == [11, 12, 13]  # still serving


def test_malformed_bytes_and_invalid_utf8_are_invalid_argument(served):
    for data in (b"\xff\xff\xff", b"\x0a\x05ab"):  # garbage; a text field cut short
        code, details = _code(lambda data=data: served.raw("Generate", data))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed GenerateRequest" in details
    # Field 1 (text), length 2, bytes that are not UTF-8.
    code, details = _code(lambda: served.raw("Generate", b"\x0a\x02\xc3\x28"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details
    code, _ = _code(lambda: served.raw("Tokenize", b"\x0a\x02\xc3\x28", stream=False))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert served.sample("jdisagg_request_errors_total", code="INVALID_ARGUMENT") == 4
    assert served.sample("jdisagg_request_errors_total", code="INTERNAL") == 0
    assert _collect(served.stub, _ids([10], max_tokens=2, ignore_eos=True))[0] == [11, 12]


def test_oversized_text_is_refused_before_tokenizing(served):
    tok = served.engine.tokenizer
    limit = served.engine.intake.limits.max_prompt_bytes
    assert limit == 255 * 3
    huge = "a" * 4_000_000
    code, details = _code(lambda: _collect(served.stub, pb.GenerateRequest(text=huge)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {limit:,} bytes" in details
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=huge)])
    assert _code(lambda: _collect(served.stub, pb.GenerateRequest(chat=chat)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, details = _code(lambda: served.stub.Tokenize(pb.TokenizeRequest(text=huge), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in details
    assert all(len(t) <= limit for t in tok.encoded)  # the tokenizer never saw it
    info = served.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.limits.max_prompt_bytes == limit
    # A text just over the token limit but within the byte bound is tokenized and refused by count.
    code, details = _code(lambda: _collect(served.stub, pb.GenerateRequest(text="a" * 300)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "300 tokens" in details


def test_chat_and_text_stream_their_counted_text(served):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    tokens, text, final = _collect(
        served.stub, pb.GenerateRequest(chat=chat, sampling=pb.SamplingParameters(max_tokens=2))
    )
    assert bytes(tokens) == b"?@" and final.prompt_tokens == len("<user>hi<assistant>")  # ">" + 1, + 2


def test_model_info_carries_the_card(served):
    info = served.stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert cards.parse_card(toml_file.tomllib.loads(info.card_toml), "x.toml") == served.engine.model.card
    assert info.limits.max_tokens == 255 and info.limits.max_prompt_tokens == 255


# ---- failures of each worker kind ---------------------------------------------------------


@pytest.mark.parametrize("where", ["prefill", "transfer", "decode"])
def test_a_failed_worker_ends_every_held_request(where):
    s = Served()
    e = s.engine
    runner = {"prefill": e.prefill[0], "transfer": e.instances.transfer, "decode": e.decode[0].runner}[where]
    runner.fail = RuntimeError(f"RESOURCE_EXHAUSTED: out of memory in {where} (injected)")
    runner.gate = threading.Event()  # held until all six are in
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_collect, s.stub, _ids([5 + i], max_tokens=20)) for i in range(6)]
            _wait(lambda: len(s.submitted) == 6)
            runner.gate.set()
            errors = []
            for f in futures:
                with pytest.raises(grpc.RpcError) as err:
                    f.result(timeout=30)
                errors.append(err.value)
        health = health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert [e.code() for e in errors] == [grpc.StatusCode.INTERNAL] * 6
        assert all("injected" in err.details() for err in errors)
        assert any(f"{where} failed" in err.details() for err in errors)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING and s.server.failed.is_set()
        assert s.sample("jdisagg_requests_total", finish_reason="error") == 6
        assert e.sched.idle() and e.decode[0].slots.pages_used == 0
        code, _ = _code(lambda: _collect(s.stub, _ids([5])))
        assert code == grpc.StatusCode.UNAVAILABLE  # a failed server only rejects
    finally:
        s.close()


# ---- cancellation and deadlines free what a request holds, at once ----------------------


def test_cancelled_half_end_cancelled_with_pages_free_while_the_others_decode():
    s = Served()
    s.engine.decode[0].runner.delay = 0.01
    try:
        calls = [s.stub.Generate(_ids([7] * (10 + i), max_tokens=200, ignore_eos=True), timeout=60) for i in range(8)]
        for call in calls:
            next(call)
        _wait(lambda: len(s.submitted) == 8 and all(r.state.value == "running" for r in s.submitted))
        for call in calls[1::2]:
            call.cancel()
        _wait(lambda: s.sample("jdisagg_requests_total", finish_reason="cancelled") == 4)
        cancelled = [r for r in s.submitted if r.finish_reason == "cancelled"]
        slots = s.engine.decode[0].slots
        running = list(slots.running)
        assert len(cancelled) == 4 and all(not r.pages for r in cancelled)
        assert len(running) == 4 and not any(r.finished for r in running)  # the others still decode
        assert slots.pages_used == sum(len(r.pages) for r in running)
        for call in calls[::2]:
            assert sum(len(m.token_ids) for m in call) == 199
        assert s.sample("jdisagg_request_errors_total", code="CANCELLED") == 4
        assert s.sample("jdisagg_requests_total", finish_reason="length") == 4
        _wait(lambda: slots.pages_used == 0)
    finally:
        s.close()


def test_a_passed_deadline_frees_the_request():
    s = Served()
    s.engine.decode[0].runner.delay = 0.02  # 250 tokens take 5 s
    try:
        code, _ = _code(lambda: _collect(s.stub, _ids([9] * 50, max_tokens=250, ignore_eos=True), timeout=1.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait(lambda: s.sample("jdisagg_requests_total", finish_reason="deadline") == 1)
        [r] = s.submitted
        assert r.finish_reason == "cancelled" and not r.pages and len(r.output) < 250
        assert s.engine.decode[0].slots.pages_used == 0 and s.engine.sched.idle()
        assert s.sample("jdisagg_request_errors_total", code="DEADLINE_EXCEEDED") == 1
    finally:
        s.close()


def test_metrics_count_every_ending():
    s = Served(tokenizer=fakes.ByteTokenizer())
    try:
        _collect(s.stub, _ids([10], max_tokens=3, ignore_eos=True))  # length
        _collect(s.stub, _ids([10], max_tokens=9, stop_token_ids=[12]))  # stop
        _collect(s.stub, _ids([60], max_tokens=9, stop=["?"]))  # stop (a string)
        _code(lambda: _collect(s.stub, _ids([])))  # rejected: never accepted
        s.server.draining = True
        assert _code(lambda: _collect(s.stub, _ids([5])))[0] == grpc.StatusCode.UNAVAILABLE
        s.server.draining = False
        assert s.sample("jdisagg_requests_total", finish_reason="length") == 1
        assert s.sample("jdisagg_requests_total", finish_reason="stop") == 2
        assert s.sample("jdisagg_request_errors_total", code="INVALID_ARGUMENT") == 1
        assert s.sample("jdisagg_request_errors_total", code="UNAVAILABLE") == 1
        assert s.sample("jdisagg_ttft_seconds_count") == 3
    finally:
        s.close()


def test_full_queue_is_resource_exhausted_and_nothing_accepted_is_lost():
    s = Served(max_queue=2)
    gate = s.engine.prefill[0].gate = threading.Event()
    try:

        def call(i):
            return s.stub.Generate(_ids([5, 6 + i], max_tokens=2, ignore_eos=True), timeout=30)

        # One in prefill (held at the gate) before the next two arrive, so that they queue
        # (arriving together, prefill could take two of them in one packed call).
        held = [call(0)]
        _wait(lambda: len(s.engine.prefill[0].calls) == 1)
        held += [call(1), call(2)]
        _wait(lambda: len(s.submitted) == 3)
        code, details = _code(lambda: _collect(s.stub, _ids([5, 6], max_tokens=2)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details
        gate.set()
        assert [sum(len(m.token_ids) for m in call) for call in held] == [2, 2, 2]
    finally:
        gate.set()
        s.close()


def test_the_server_records_the_workload_it_serves(tmp_path):
    """--record_trace: one line per finished request (no text), in the trace format the
    benchmark replays and the planner plans from; cancelled requests are left out."""
    from jdisagg.bench.workloads import read_trace

    path = tmp_path / "served.jsonl"
    s = Served(record_trace=str(path))
    try:
        _collect(s.stub, _ids([5] * 7, max_tokens=3, ignore_eos=True))
        _collect(s.stub, _ids([5] * 20, max_tokens=9, ignore_eos=True))
        s.engine.decode[0].runner.delay = 0.01
        call = s.stub.Generate(_ids([5] * 3, max_tokens=200, ignore_eos=True), timeout=30)
        next(call)
        call.cancel()
        _wait(lambda: s.sample("jdisagg_requests_total", finish_reason="cancelled") == 1)
    finally:
        s.close()
    entries = read_trace(path)
    assert [(e.input_len, e.output_len) for e in entries] == [(7, 3), (20, 9)]
    assert 0 <= entries[0].timestamp <= entries[1].timestamp
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(line) == {"timestamp", "input_len", "output_len"} for line in lines)  # no text
