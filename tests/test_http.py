"""The OpenAI-compatible HTTP API, driven by the real ``openai`` client, over the fake engine
(tests/fakes.py: the next token is the previous + 1, and ByteTokenizer makes a token a byte, so
"a" continues "bcdef..."); one check with a real model; and ``bench run --target http://...``
against it giving the same result fields as the gRPC path."""

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fakes
import numpy as np
import openai
import pytest
from test_server_faults import PRESET

from jdisagg.bench import loadgen
from jdisagg.sched.params import SamplingParams
from jdisagg.serving.server import Server

ROOT = Path(__file__).resolve().parent.parent


class HttpServed:
    """A Server over the fake engine with its HTTP API on a free port."""

    def __init__(self, preset=PRESET, tokenizer=None, ready=True, max_queue=64, **options):
        self.engine = fakes.fake_engine(preset, tokenizer=tokenizer)
        self.submitted = []
        submit = self.engine.submit
        self.engine.submit = lambda r: self.submitted.append(r) or submit(r)
        self.server = Server(self.engine, port=0, http_port=0, max_queue=max_queue, **options)
        self.server.start()
        if ready:
            self.server.set_ready()
        scheme = "https" if self.server.access.tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.http.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=30)
        self.context = None  # an ssl.SSLContext for get and post to an https server

    def post(self, path: str, body, headers=None) -> tuple[int, dict]:
        """POSTs ``body`` (bytes as they are, anything else as JSON) without a client library."""
        import urllib.error
        import urllib.request

        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str, headers=None) -> tuple[int, dict]:
        import urllib.error
        import urllib.request

        try:
            request = urllib.request.Request(self.url + path, headers=headers or {})
            with urllib.request.urlopen(request, timeout=30, context=self.context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def sample(self, name: str, **labels) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0

    def close(self):
        self.client.close()
        self.server.stop()


@pytest.fixture
def served():
    s = HttpServed(tokenizer=fakes.ByteTokenizer())
    yield s
    s.close()


def _wait(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# ---- completions and chat -------------------------------------------------------------------


def test_completion_text_usage_and_latency(served):
    r = served.client.completions.create(model="fake", prompt="a", max_tokens=5, extra_body={"ignore_eos": True})
    [choice] = r.choices
    assert choice.text == "bcdef" and choice.finish_reason == "length" and choice.token_ids == [98, 99, 100, 101, 102]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1, 5, 6)
    assert r.object == "text_completion" and r.model == "fake" and r.id.startswith("cmpl-")
    lat = r.latency
    assert lat["ttft_s"] > 0 and lat["e2e_s"] >= lat["ttft_s"] and lat["transfer_bytes"] > 0
    assert set(lat) == {"queue_s", "prefill_s", "transfer_s", "transfer_bytes", "decode_queue_s", "ttft_s", "tpot_s",
                        "e2e_s", "preemptions"}  # fmt: skip
    # token ids in, a list of one prompt, and no model field at all
    ids = served.client.completions.create(model="fake", prompt=[60, 61], max_tokens=3)
    assert ids.choices[0].token_ids == [62, 63, 64] and ids.usage.prompt_tokens == 2
    assert served.client.completions.create(model="fake", prompt=[[60]], max_tokens=1).choices[0].text == "="
    assert served.post("/v1/completions", {"prompt": "a", "max_tokens": 2})[1]["choices"][0]["text"] == "bc"


def test_completion_stream_joins_to_the_same_text(served):
    chunks = list(
        served.client.completions.create(
            model="fake", prompt="a", max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    *content, usage = chunks
    assert "".join(c.choices[0].text for c in content) == "bcdefg"
    assert [t for c in content for t in c.choices[0].token_ids] == list(range(98, 104))
    assert [c.choices[0].finish_reason for c in content] == [None] * (len(content) - 1) + ["length"]
    assert content[-1].latency["ttft_s"] > 0 and all(c.usage is None for c in content)
    assert usage.choices == [] and usage.usage.completion_tokens == 6 and usage.usage.prompt_tokens == 1
    plain = list(served.client.completions.create(model="fake", prompt="a", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in plain) == "bcd" and all(c.usage is None for c in plain)


def test_chat_and_chat_stream(served):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    r = served.client.chat.completions.create(model="fake", messages=messages, max_completion_tokens=2)
    prompt = "<system>s<user>hi<assistant>"  # ByteTokenizer's template; ">" + 1 = "?"
    assert r.choices[0].message.content == "?@" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt) and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    stream = served.client.chat.completions.create(
        model="fake", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content for d in deltas) == "?@AB" and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"
    # developer is system; content as text parts
    parts = [{"role": "developer", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert served.client.chat.completions.create(model="fake", messages=parts, max_tokens=2).usage.prompt_tokens == len(
        prompt
    )


def test_logprobs(served):
    r = served.client.completions.create(model="fake", prompt="a", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["b", "c", "d"] and lp.token_logprobs == [-1.0] * 3 and lp.text_offset == [0, 1, 2]
    assert lp.top_logprobs == [{"b": -1.0}, {"c": -1.0}, {"d": -1.0}]  # the fake's alternatives are all the token
    zero = served.client.completions.create(model="fake", prompt="a", max_tokens=2, logprobs=0).choices[0].logprobs
    assert zero.token_logprobs == [-1.0, -1.0] and zero.top_logprobs == [{}, {}]  # the token's own, no alternatives
    assert served.client.completions.create(model="fake", prompt="a", max_tokens=2).choices[0].logprobs is None
    chat = served.client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=2, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == ["?", "@"] and [c.bytes for c in content] == [[63], [64]]
    assert [len(c.top_logprobs) for c in content] == [3, 3] and content[1].top_logprobs[0].logprob == -1.0
    stream = served.client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True, stream=True
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == ["?", "@", "A"] and all(t.top_logprobs == [] for t in streamed)


def test_stop_strings_never_reach_the_stream(served):
    r = served.client.completions.create(model="fake", prompt="a", max_tokens=20, stop=["ef", "zz"])
    assert r.choices[0].text == "bcd" and r.choices[0].finish_reason == "stop"
    streamed = served.client.completions.create(model="fake", prompt="a", max_tokens=20, stop="ef", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "bcd"
    chat = served.client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "x"}], max_tokens=20, stop="B"
    )
    assert chat.choices[0].message.content == "?@A" and chat.choices[0].finish_reason == "stop"
    ids = served.client.completions.create(
        model="fake", prompt="a", max_tokens=20, extra_body={"stop_token_ids": [100]}
    )
    assert ids.choices[0].text == "bc" and ids.choices[0].finish_reason == "stop"


def test_a_temperature_and_seed_sample_the_same_tokens_twice(served):
    a, b = (
        served.client.completions.create(model="fake", prompt="a", max_tokens=4, temperature=0.7, top_p=0.9, seed=3)
        for _ in range(2)
    )
    assert a.choices[0].token_ids == b.choices[0].token_ids


# ---- errors surface as the client's exception types ------------------------------------------

BAD = [
    (dict(n=2), "n"),
    (dict(best_of=3), "best_of"),
    (dict(echo=True), "echo"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(logit_bias={"5": 1}), "logit_bias"),
    (dict(extra_body={"tools": [{"type": "function"}]}), "tools"),
    (dict(extra_body={"bogus": 1}), "bogus"),
    (dict(max_tokens=0), None),
    (dict(max_tokens=2**31), None),
    (dict(max_tokens=True), "max_tokens"),
    (dict(temperature="hot"), "temperature"),
    (dict(logprobs=21), None),
    (dict(stop=["x"] * 17), None),
    (dict(stop=[""]), None),
    (dict(seed=-1), None),
    (dict(stream_options={"include_usage": True}), "stream_options"),
]


@pytest.mark.parametrize("fields,param", BAD, ids=[str(f) for f, _ in BAD])
def test_bad_requests_are_bad_request_errors(served, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        served.client.completions.create(model="fake", prompt="a", **fields)
    body = err.value.body
    assert body["type"] == "invalid_request_error" and body["message"]
    assert body["param"] == param
    if param:
        assert param in body["message"]
    assert not served.submitted
    assert served.client.completions.create(model="fake", prompt="a", max_tokens=2).choices[0].text == "bc"


def test_error_statuses(served):
    c = served.client
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="gpt-4", prompt="a")
    assert err.value.body["param"] == "model" and "fake" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    assert c.models.retrieve("fake").id == "fake"
    assert served.get("/v1/nothing")[0] == 404 and served.get("/v1/nothing")[1]["error"]["type"] == "not_found_error"
    assert served.get("/v1/completions")[0] == 405
    with pytest.raises(openai.BadRequestError, match="no messages"):
        c.chat.completions.create(model="fake", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        c.chat.completions.create(model="fake", messages=[{"role": "tool", "content": "x", "tool_call_id": None}])
    with pytest.raises(openai.BadRequestError, match="text part"):
        c.chat.completions.create(model="fake", messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.completions.create(model="fake", prompt=[5, 2**40])
    with pytest.raises(openai.BadRequestError, match="2 prompts"):
        c.completions.create(model="fake", prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError, match="empty"):
        c.completions.create(model="fake", prompt="")
    huge = "a" * 4_000_000
    with pytest.raises(openai.BadRequestError, match="bytes"):
        c.completions.create(model="fake", prompt=huge)
    assert all(len(t) < 10_000 for t in served.engine.tokenizer.encoded)  # refused before tokenizing
    for raw, message in [
        (b"{", "not valid JSON"),
        (b"[1]", "JSON object"),
        (b'{"prompt": "\xff"}', "not valid JSON"),
        (b'{"prompt": "\\ud800"}', "lone surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"prompt": [' + b"1" * 5000 + b"]}", "not valid JSON"),
    ]:
        status, body = served.post("/v1/completions", raw)
        assert status == 400 and message in body["error"]["message"], (raw[:20], body)
    status, body = served.post("/v1/completions", b" " * (8 * 2**20 + 1))
    assert status == 413 and "8,388,608 bytes" in body["error"]["message"]
    assert served.sample("jdisagg_request_errors_total", code="INTERNAL") == 0
    assert not served.submitted


def test_queue_full_is_429_and_warming_up_is_503():
    s = HttpServed(max_queue=1, ready=False)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            s.client.completions.create(model="fake", prompt=[5])
        assert err.value.status_code == 503 and "warming up" in err.value.body["message"]
        assert s.get("/health") == (503, {"status": "warming up"})
        s.server.set_ready()
        assert s.get("/health") == (200, {"status": "ok"})
        gate = s.engine.prefill[0].gate = threading.Event()
        send = s.client.completions.create
        held = [threading.Thread(target=send, kwargs=dict(model="fake", prompt=[5, i], max_tokens=2)) for i in range(2)]
        held[0].start()
        _wait(lambda: s.engine.prefill[0].calls)  # the first is in prefill, held at the gate
        held[1].start()
        _wait(lambda: len(s.submitted) == 2)  # the second waits in the queue
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            s.client.completions.create(model="fake", prompt=[5], max_tokens=2)
        gate.set()
        for t in held:
            t.join(30)
        s.server.draining = True
        assert s.get("/health") == (503, {"status": "draining"})
        with pytest.raises(openai.InternalServerError, match="draining"):
            s.client.completions.create(model="fake", prompt=[5])
        assert s.sample("jdisagg_request_errors_total", code="RESOURCE_EXHAUSTED") == 1
        assert s.sample("jdisagg_request_errors_total", code="UNAVAILABLE") == 2
    finally:
        s.engine.prefill[0].gate = None
        s.close()


def test_a_failed_worker_ends_streams_with_an_error_event():
    s = HttpServed()
    s.engine.decode[0].runner.fail = RuntimeError("out of memory (injected)")
    try:
        with pytest.raises(openai.InternalServerError, match="injected"):
            s.client.completions.create(model="fake", prompt=[5], max_tokens=4)
        with pytest.raises(openai.APIError, match="injected|warming up"):
            for _ in s.client.completions.create(model="fake", prompt=[5], max_tokens=4, stream=True):
                pass
        _wait(lambda: s.get("/health") == (503, {"status": "failed"}))  # "warming up" until failed is set
    finally:
        s.close()


def test_a_request_admitted_while_a_worker_fails_gets_the_error():
    """Admitted (ready) before the failure, submitted after fail_all: nothing would run it."""
    s = HttpServed()
    s.engine.decode[0].runner.fail = RuntimeError("out of memory (injected)")
    go, building = threading.Event(), threading.Event()
    request = s.engine.intake.request

    def held_request(tokens, params):  # the intake pool builds [9]'s request only once told to
        if list(tokens) == [9]:
            building.set()
            assert go.wait(30)
        return request(tokens, params)

    s.engine.intake.request = held_request
    late = {}
    thread = threading.Thread(target=lambda: late.update(error=_raises(s, [9])))
    try:
        thread.start()
        assert building.wait(30)  # past admit's ready check
        with pytest.raises(openai.InternalServerError, match="injected"):
            s.client.completions.create(model="fake", prompt=[5], max_tokens=4)
        _wait(lambda: s.server.failed.is_set())
        go.set()
        thread.join(30)
        assert isinstance(late["error"], openai.InternalServerError) and "failed: out of memory" in str(late["error"])
    finally:
        go.set()
        s.close()


def _raises(s: HttpServed, prompt) -> Exception | None:
    try:
        s.client.completions.create(model="fake", prompt=prompt, max_tokens=4)
    except Exception as e:
        return e
    return None


def test_models_and_tokenize(served):
    [model] = served.client.models.list().data
    assert model.id == "fake" and model.owned_by == "jdisagg" and model.max_model_len == 256
    assert model.vocab_size == 256 and model.devices == 2
    assert served.post("/tokenize", {"prompt": "ab"}) == (200, {"tokens": [97, 98], "count": 2, "max_model_len": 256})
    status, body = served.post("/tokenize", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and body["count"] == len("<user>x<assistant>")
    assert served.post("/tokenize", {"prompt": 5})[0] == 400


# ---- concurrency and disconnects ------------------------------------------------------------


def _stream_tokens(url, cases, model="fake", **fields):
    """Streams every (prompt, max_tokens) case at once through AsyncOpenAI; the token ids of each."""

    async def one(client, prompt, n):
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=n, stream=True, extra_body={"ignore_eos": True}, **fields
        )
        return [t async for chunk in stream for t in chunk.choices[0].token_ids]

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in cases))

    return asyncio.run(main())


def test_64_concurrent_streams_equal_offline():
    s = HttpServed()
    s.engine.decode[0].runner.delay = 0.002  # decode steps take time, so the streams overlap
    try:
        rng = np.random.default_rng(0)
        cases = [
            (rng.integers(1, 256, int(rng.integers(1, 100))).tolist(), int(rng.integers(1, 60))) for _ in range(64)
        ]
        got = _stream_tokens(s.url, cases)
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in cases]
        offline = fakes.fake_engine(PRESET).generate([p for p, _ in cases], params)
        assert got == [o.tokens for o in offline]
        assert got == [fakes.counted(p, n) for p, n in cases]
        assert max(len(d.runner.calls) for d in s.engine.decode) < sum(n for _, n in cases)  # batched, not one by one
        _wait(lambda: s.engine.sched.idle() and s.engine.decode[0].slots.pages_used == 0)
    finally:
        s.close()


def _open_and_drop(port: int, body: dict, read_first: bool) -> None:
    """Sends a request on a raw socket, optionally reads the first bytes of the answer, and closes."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        if read_first:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_disconnect_cancels_the_request_and_frees_its_pages(stream):
    s = HttpServed()
    s.engine.decode[0].runner.delay = 0.01
    try:
        body = dict(prompt=[7] * 40, max_tokens=250, ignore_eos=True, stream=stream)
        slots = s.engine.decode[0].slots
        if stream:
            _open_and_drop(s.server.http.port, body, read_first=True)
        else:
            with socket.create_connection(("127.0.0.1", s.server.http.port), timeout=10) as sock:
                data = json.dumps(body).encode()
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                             + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
                _wait(lambda: s.submitted and slots.pages_used > 0)  # decoding, holding pages
        _wait(lambda: s.sample("jdisagg_requests_total", finish_reason="cancelled") == 1)
        [r] = s.submitted
        assert r.finish_reason == "cancelled" and not r.pages and len(r.output) < 250
        _wait(lambda: slots.pages_used == 0 and s.engine.sched.idle())
        assert s.sample("jdisagg_request_errors_total", code="CANCELLED") == 1
        assert s.client.completions.create(model="fake", prompt=[5], max_tokens=2).choices[0].token_ids == [6, 7]
    finally:
        s.close()


# ---- a real model ---------------------------------------------------------------------------


def test_real_model_streams_equal_offline():
    """tiny-llama, prefill tp=2 -> decode pp=2: HTTP streams give the offline engine's tokens (the
    same engine run offline first, so both share its compiled programs)."""
    from jdisagg.engine import Engine

    engine = Engine("tiny-llama", "cpu-tp2-pp2", warm_up=False, progress=False)
    rng = np.random.default_rng(1)
    cases = [(rng.integers(3, 256, int(rng.integers(1, 16))).tolist(), int(rng.integers(1, 8))) for _ in range(8)]
    want = engine.generate([p for p, _ in cases], [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in cases])
    server = Server(engine, port=0, http_port=0)
    server.start()
    server.set_ready()
    try:
        got = _stream_tokens(f"http://127.0.0.1:{server.http.port}", cases, model="tiny-llama", temperature=0)
    finally:
        server.stop()
    assert got == [w.tokens for w in want]


# ---- bench run --target http://... ----------------------------------------------------------


def _keys(result: dict) -> dict:
    """The field names of a result, its points and their request records (values aside)."""
    point = result["points"][0]
    return {
        "result": sorted(result),
        "server": sorted(result["server"]),
        "point": sorted(point),
        "request": sorted(point["requests"][0]),
        "server_breakdown": sorted(point["requests"][0]["server"]),
    }


def test_bench_over_http_gives_the_grpc_fields():
    s = HttpServed()
    s.engine.decode[0].runner.delay = 0.001
    config = loadgen.BenchConfig("fixed", rates=(50.0, 100.0), num_requests=12, input_len=8, output_len=6,
                                 progress=False)  # fmt: skip
    try:
        by_grpc = asyncio.run(loadgen.run_benchmark(f"127.0.0.1:{s.server.port}", config))
        by_http = asyncio.run(loadgen.run_benchmark(s.url, config))
    finally:
        s.close()
    assert _keys(by_http) == _keys(by_grpc)
    assert by_http["server"]["api"] == "openai" and by_grpc["server"]["api"] == "grpc"
    for result in (by_grpc, by_http):
        assert result["gpus"] == 2 and result["label"] == "fake" and result["server"]["model"] == "fake"
        for point in result["points"]:
            assert point["num_ok"] == 12 and point["errors"] == {} and point["server"]["count"] == 12
            assert all(r["num_tokens"] == 6 and r["finish_reason"] == "length" for r in point["requests"])
            assert point["ttft"]["p50"] > 0 and point["tpot"]["count"] == 12


def test_bench_over_http_records_errors_by_code_name():
    s = HttpServed(max_queue=1)
    s.engine.prefill[0].gate = gate = threading.Event()
    config = loadgen.BenchConfig("fixed", rates=(1000.0,), num_requests=6, input_len=4, output_len=2, progress=False)
    try:
        threading.Timer(1.0, gate.set).start()
        result = asyncio.run(loadgen.run_benchmark(s.url, config))
    finally:
        gate.set()
        s.close()
    [point] = result["points"]
    assert point["errors"].get("RESOURCE_EXHAUSTED", 0) >= 1 and point["num_ok"] >= 1
    assert point["num_ok"] + point["errors"]["RESOURCE_EXHAUSTED"] == 6
    refused = [r for r in point["requests"] if r["error"]]
    assert all(r["error"] == "RESOURCE_EXHAUSTED" and "queue is full" in r["error_details"] for r in refused)


def test_bench_over_http_reads_a_server_without_jdisagg_extras():
    """A stand-in for vLLM: no token_ids in chunks, no latency, no vocabulary in /v1/models."""
    from aiohttp import web

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 64}]})

    async def completions(request):
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        n = body["max_tokens"]
        for i in range(0, n, 2):  # two tokens per chunk: the count comes from usage
            choice = {"index": 0, "text": "xy", "finish_reason": "length" if i + 2 >= n else None}
            await response.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
            await asyncio.sleep(0.001)
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")
        return response

    async def main():
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        config = loadgen.BenchConfig("fixed", rates=(100.0,), num_requests=4, input_len=8, output_len=6, progress=False)
        try:
            with pytest.raises(ValueError, match="--vocab_size"):
                await loadgen.run_benchmark(url, config)
            import dataclasses

            return await loadgen.run_benchmark(url, dataclasses.replace(config, vocab_size=1000))
        finally:
            await runner.cleanup()

    result = asyncio.run(main())
    [point] = result["points"]
    assert result["label"] == "m" and result["server"]["max_seq_len"] == 64 and result["gpus"] == 1
    assert point["num_ok"] == 4 and all(r["num_tokens"] == 6 and r["server"] == {} for r in point["requests"])
    assert point["server"]["count"] == 0


def test_bench_cli_over_http(tmp_path):
    s = HttpServed()
    out = tmp_path / "r.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jdisagg.bench", "run", "--target", s.url, "--workload", "fixed", "--input_len", "4",
             "--output_len", "3", "--rates", "20", "--num_requests", "5", "--out", str(out), "--noprogress"],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
    finally:
        s.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "goodput at 90% attainment" in proc.stdout
    result = json.loads(out.read_text())
    assert result["points"][0]["num_ok"] == 5 and result["server"]["api"] == "openai"


def test_bench_model_flag_goes_with_an_http_target():
    with pytest.raises(ValueError, match="--model goes with an http:// target"):
        loadgen.connect("127.0.0.1:1", model="m")

    async def main():
        target = loadgen.connect("http://127.0.0.1:1/v1", model="m")
        await target.close()
        return target

    target = asyncio.run(main())
    assert type(target).__name__ == "OpenAITarget" and target.base == "http://127.0.0.1:1" and target.model == "m"


def test_grpc_still_answers_next_to_http(served):
    from jdisagg.serving.client import Client

    with Client(f"127.0.0.1:{served.server.port}", timeout=30) as client:
        assert client.complete([60], max_tokens=3).token_ids == [61, 62, 63]
