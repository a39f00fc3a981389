"""Hostile input, generated (hypothesis): random and malformed requests to the gRPC service, the
HTTP API and ``Engine.make_request``, over the fake engine (tests/fakes.py), so hundreds of
requests take seconds. Each request gets an answer with its status and a message (never
INTERNAL, a 500 or a hang), no worker dies, nothing is left holding pages, and a normal
request afterwards gives the same tokens as before.

Values are of every kind: any integers (0, 2**31, 2**64, negative), NaN and infinities, huge
and non-UTF-8 strings (lone surrogates in JSON), thousands of stop strings, logprobs out of
range, empty and unknown chat roles, wrong-typed and deeply nested JSON, truncated and
random bytes, bodies over the size limit.
"""

import json
import math
import urllib.error
import urllib.request

import fakes
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http import HttpServed
from test_server_faults import PRESET

from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.sched.params import SamplingParams

EXAMPLES = 520  # per interface
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests in every run (CI)
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
HUGE_TEXT = "a" * 1_000_000  # over max_prompt_bytes (765 here), far under the 8 MiB body limit
INT32 = 2**31 - 1


@pytest.fixture(scope="module")
def served():
    s = HttpServed(tokenizer=fakes.ByteTokenizer(), max_queue=1024)
    yield s
    s.close()


def _normal_tokens(s: HttpServed) -> tuple[list[int], list[int]]:
    """A normal request's tokens over each protocol."""
    from jdisagg.serving.client import Client

    with Client(f"127.0.0.1:{s.server.port}", timeout=30) as client:
        by_grpc = client.complete("ab", max_tokens=8, stop="zz").token_ids
    status, body = _post(s, "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 8, "temperature": 0}))
    assert status == 200, body
    return by_grpc, json.loads(body)["choices"][0]["token_ids"]


def _healthy(s: HttpServed) -> None:
    assert not s.server.failed.is_set() and all(w.is_alive() for w in s.server.workers)


def _settled(s: HttpServed) -> None:
    import time

    deadline = time.time() + 10
    while not (s.engine.sched.idle() and s.engine.decode[0].slots.pages_used == 0):
        assert time.time() < deadline, "requests were left in the scheduler"
        time.sleep(0.01)


# ---- values ---------------------------------------------------------------------------------

ints = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 300),
    st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32, 2**63, 2**64, -(2**31), -1]),
)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, -0.0, 1e-45, 3.5e38])
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),  # surrogates
    st.just(""),
    st.just(None).map(lambda _: HUGE_TEXT),  # (mapped, so hypothesis never prints it)
)
json_leaf = st.none() | st.booleans() | ints | floats | st.text(max_size=10)
json_odd = st.one_of(  # a wrong-typed value (generated without recursion, which is slow in hypothesis)
    json_leaf,
    st.lists(json_leaf, max_size=3),
    st.dictionaries(st.text(max_size=5), json_leaf, max_size=2),
    st.integers(1, 50).map(lambda depth: [[]] if depth == 1 else [_deep(depth)]),
)
token_lists = st.lists(ints, max_size=20) | st.lists(st.integers(0, 255), min_size=1, max_size=300)
stops = st.one_of(
    texts,
    st.lists(texts, max_size=20),
    st.just(None).map(lambda _: ["x"] * 5000),
    st.just([""]),
    st.just(["s" * 300]),
    json_odd,
)
roles = st.sampled_from(["system", "user", "assistant", "developer", "tool", "function", "", "USER"]) | st.text(
    max_size=10
)
contents = texts | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}))
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": contents | json_odd}), max_size=4) | json_odd


def _field(values):
    return st.one_of(values, json_odd)


# Hostile values per field; a request is a plausible body with up to three of them put in, or
# a body made of them only.
FIELDS = {
    "model": _field(st.sampled_from(["fake", "gpt-4", ""])),
    "max_tokens": _field(ints),
    "temperature": _field(floats),
    "top_p": _field(floats),
    "seed": _field(ints),
    "stop": stops,
    "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "x": json_leaf})),
    "top_k": _field(ints),
    "ignore_eos": _field(st.booleans()),
    "stop_token_ids": _field(token_lists),
    "n": _field(ints),
    "tools": json_odd,
    "logit_bias": json_odd,
    "frequency_penalty": _field(floats),
    "user": json_odd,
    "unknown": json_leaf,
}
COMPLETION_FIELDS = {
    **FIELDS,
    "prompt": st.one_of(texts, token_lists, st.lists(texts, max_size=3), json_odd),
    "logprobs": _field(ints),
    "echo": json_odd,
}
CHAT_FIELDS = {
    **FIELDS,
    "messages": messages,
    "logprobs": _field(st.booleans()),
    "top_logprobs": _field(ints),
    "max_completion_tokens": _field(ints),
    "response_format": json_odd,
}


def _bodies(fields: dict, base) -> st.SearchStrategy:
    hostile = st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: fields[n] for n in names})
    )
    return st.one_of(st.builds(lambda b, h: {**b, **h}, base, hostile), hostile)


small = st.integers(1, 12)
short_prompts = st.text(max_size=8) | st.lists(st.integers(0, 255), max_size=8)
chats = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=8)}), min_size=1, max_size=2
)
completion_bodies = _bodies(
    COMPLETION_FIELDS,
    st.fixed_dictionaries(
        {"prompt": short_prompts, "max_tokens": small}, optional={"stream": st.booleans(), "temperature": st.just(0)}
    ),
)
chat_bodies = _bodies(
    CHAT_FIELDS,
    st.fixed_dictionaries(
        {"messages": chats, "max_tokens": small}, optional={"stream": st.booleans(), "logprobs": st.booleans()}
    ),
)


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


def _encoded(body: dict) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")  # lone surrogates: invalid UTF-8 bytes


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(1, 200_000).map(_nested),
    st.builds(lambda b, cut: _encoded(b)[:cut], completion_bodies, st.integers(0, 100)),  # truncated
    json_odd.map(lambda v: json.dumps(v).encode()),  # any JSON, mostly not an object
    st.just(None).map(lambda _: b" " * (8 * 2**20 + 1)),  # over the body limit
    st.just(b'{"prompt": "\\ud800x", "max_tokens": 2}'),  # an escaped lone surrogate
    st.just(b'{"prompt": [' + b"9" * 5000 + b"]}"),  # an integer too long to parse
)
http_requests = st.one_of(
    st.tuples(st.just("/v1/completions"), completion_bodies.map(_encoded)),
    st.tuples(st.just("/v1/chat/completions"), chat_bodies.map(_encoded)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]), raw_bodies),
)


# ---- HTTP -----------------------------------------------------------------------------------


def _post(s: HttpServed, path: str, data: bytes | str, timeout: float = 30) -> tuple[int, bytes]:
    data = data.encode() if isinstance(data, str) else data
    request = urllib.request.Request(s.url + path, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _check_http_answer(status: int, body: bytes) -> None:
    assert status in (200, 400, 404, 413), (status, body[:300])
    if status != 200:
        error = json.loads(body)["error"]
        assert error["message"] and error["type"], body[:300]
        assert len(error["message"]) <= 1000
        return
    if body.startswith(b"data:"):  # a stream: well-formed chunks to the end, no error event
        events = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
        assert events[-1] == b"[DONE]", body[-300:]
        for e in events[:-1]:
            chunk = json.loads(e)
            assert "error" not in chunk and chunk["object"] in ("text_completion", "chat.completion.chunk"), chunk
    else:
        answer = json.loads(body)
        if "choices" in answer:
            assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
            assert answer["usage"]["completion_tokens"] == len(answer["choices"][0]["token_ids"])
        else:
            assert "tokens" in answer  # /tokenize


def test_http_survives_hostile_requests(served):
    before = _normal_tokens(served)
    sent = []

    @FUZZ
    @given(http_requests)
    def one(request):
        path, data = request
        status, body = _post(served, path, data)
        sent.append(status)
        _check_http_answer(status, body)

    one()
    assert len(sent) >= 500
    assert {400, 200} <= set(sent)  # both refusals and accepted requests were generated
    _healthy(served)
    _settled(served)
    assert _normal_tokens(served) == before
    assert served.sample("jdisagg_request_errors_total", code="INTERNAL") == 0


# ---- gRPC -----------------------------------------------------------------------------------

int32s = st.integers(-(2**31), INT32)
proto_texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)  # protobuf strings are UTF-8
proto_floats = floats.filter(lambda f: not math.isfinite(f) or abs(f) < 3.4e38)  # what a float32 field holds
proto_roles = st.sampled_from(["system", "user", "assistant", "tool", ""]) | proto_texts
chat = st.builds(
    pb.ChatMessages, messages=st.lists(st.builds(pb.ChatMessage, role=proto_roles, content=proto_texts), max_size=4)
)
GRPC_FIELDS = {  # hostile values: the request's input, SLO and id, and each sampling field
    "input": st.one_of(
        st.just({}),
        st.builds(lambda t: {"text": t}, proto_texts | st.just(None).map(lambda _: HUGE_TEXT)),
        st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(int32s, max_size=20)),
        st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)}, st.lists(st.integers(0, 255), max_size=300)),
        st.builds(lambda c: {"chat": c}, chat),
    ),
    "slo": st.builds(pb.Slo, ttft_s=floats, tpot_s=floats),
    "request_id": st.text(max_size=10) | st.just(None).map(lambda _: "r" * 300),
    "max_tokens": st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 255, 256, 2**31]),
    "temperature": proto_floats,
    "top_p": proto_floats,
    "top_k": st.integers(0, 2**32 - 1),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(proto_texts | st.just("s" * 300), max_size=20) | st.just(None).map(lambda _: ["x"] * 3000),
    "stop_token_ids": st.lists(int32s, max_size=70),
    "ignore_eos": st.booleans(),
    "logprobs": st.integers(0, 2**32 - 1) | st.integers(0, 25),
}
TOP_LEVEL = ("slo", "request_id")


def _generate_request(fields: dict) -> pb.GenerateRequest:
    """A plausible request (a short prompt, a few tokens) with ``fields`` put in."""
    fields = {"input": {"token_ids": pb.TokenIds(ids=[60, 61])}, "max_tokens": 4, **fields}
    sampling = {k: v for k, v in fields.items() if k not in ("input", *TOP_LEVEL)}
    top = {k: fields[k] for k in TOP_LEVEL if k in fields}
    return pb.GenerateRequest(**fields["input"], sampling=pb.SamplingParameters(**sampling), **top)


grpc_requests = _bodies(GRPC_FIELDS, st.just({})).map(_generate_request)


def _valid_unicode(message) -> bool:
    try:
        message.SerializeToString()
        return True
    except ValueError:  # a lone surrogate in a string field: the client library refuses it
        return False


def _mutated(message, at: int, byte: int) -> bytes:
    """``message`` serialized, with the byte at ``at`` (modulo its length) replaced."""
    data = message.SerializeToString()
    at %= len(data) + 1
    return data[:at] + bytes([byte]) + data[at + 1 :]


serializable = grpc_requests.filter(_valid_unicode)
grpc_bytes = st.one_of(
    serializable.map(lambda m: m.SerializeToString()),
    st.binary(max_size=200),  # malformed
    st.builds(_mutated, serializable, st.integers(0, 10_000), st.integers(0, 255)),
)


def test_grpc_survives_hostile_requests(served):
    before = _normal_tokens(served)
    channel = grpc.insecure_channel(f"127.0.0.1:{served.server.port}", options=[("grpc.max_send_message_length", -1)])
    call = channel.unary_stream("/jdisagg.v1.Generation/Generate", request_serializer=None, response_deserializer=None)
    codes = []

    @FUZZ
    @given(grpc_bytes)
    def one(data):
        try:
            messages = [pb.GenerateResponse.FromString(m) for m in call(data, timeout=30)]
            codes.append(grpc.StatusCode.OK)
            final = messages[-1].final
            assert final.finish_reason in ("stop", "length")
            assert final.completion_tokens == sum(len(m.token_ids) for m in messages)
        except grpc.RpcError as e:
            codes.append(e.code())
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert e.details()

    try:
        one()
    finally:
        channel.close()
    assert len(codes) >= 500 and {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT} <= set(codes)
    _healthy(served)
    _settled(served)
    assert _normal_tokens(served) == before


# ---- Engine.make_request --------------------------------------------------------------------

PARAM_FIELDS = {
    "prompt": st.one_of(texts, token_lists, st.just([]), st.just(None).map(lambda _: [5] * 300)),
    "max_tokens": ints,
    "temperature": floats,
    "top_k": ints,
    "top_p": floats,
    "seed": ints,
    "stop_token_ids": st.lists(ints, max_size=70).map(tuple),
    "stop": (st.lists(texts, max_size=20) | st.just(None).map(lambda _: ["x"] * 3000)).map(tuple),
    "ignore_eos": st.booleans(),
    "logprobs": ints,
}
engine_calls = _bodies(PARAM_FIELDS, st.just({})).map(lambda f: {"prompt": [60, 61], "max_tokens": 4, **f})


def test_make_request_refuses_with_value_errors_and_accepted_requests_run():
    engine = fakes.fake_engine(PRESET, tokenizer=fakes.ByteTokenizer())
    outcomes = []

    @FUZZ
    @given(engine_calls)
    def one(fields):
        prompt = fields.pop("prompt")
        try:
            request = engine.make_request(prompt, SamplingParams(**fields))
        except ValueError as e:
            assert str(e)
            outcomes.append("refused")
            return
        outcomes.append("accepted")
        engine.submit(request)
        for _ in range(10_000):
            if request.finished:
                break
            engine.step()
        assert request.finished and request.finish_reason in ("stop", "length"), request.finish_reason
        assert 1 <= len(request.output) <= request.params.max_tokens

    one()
    assert len(outcomes) >= 500 and {"refused", "accepted"} <= set(outcomes)
    assert engine.sched.idle() and engine.decode[0].slots.pages_used == 0
    [out] = engine.generate(["ab"], SamplingParams(max_tokens=3))
    assert out.tokens == [99, 100, 101]
