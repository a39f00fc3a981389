"""The gRPC server on localhost, with a tiny model on a disaggregated mesh."""

import concurrent.futures
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jdisagg.engine import Engine
from jdisagg.proto import jdisagg_pb2 as pb
from jdisagg.proto import jdisagg_pb2_grpc as pb_grpc
from jdisagg.sched.params import SamplingParams
from jdisagg.serving.server import Server


@pytest.fixture(scope="module")
def served():
    engine = Engine("tiny-llama", "cpu-tp4-pp2tp2", warm_up=False, progress=False)
    server = Server(engine, port=0, max_queue=64)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.GenerationStub(channel)
    try:
        yield engine, server, stub, channel
    finally:
        channel.close()
        server.stop()


def _request(ids, **sampling):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParameters(**sampling))


def _collect(stub, request, **kw):
    tokens, final = [], None
    for msg in stub.Generate(request, **kw):
        tokens += list(msg.token_ids)
        if msg.HasField("final"):
            final = msg.final
    return tokens, final


def test_unavailable_while_warming_up(served):
    engine, server, stub, channel = served
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, _request([5, 6]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in err.value.details()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    server.set_ready()
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_streams_equal_offline(served):
    engine, server, stub, _ = served
    server.set_ready()
    rng = np.random.default_rng(1)
    cases = []
    for i in range(32):
        ids = rng.integers(3, 256, int(rng.integers(1, 120))).tolist()
        sampling = dict(max_tokens=int(rng.integers(1, 24)), ignore_eos=True)
        if i % 3 == 0:
            sampling.update(temperature=0.8, top_k=20, top_p=0.9, seed=i)
        cases.append((ids, sampling))
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda c: _collect(stub, _request(c[0], **c[1])), cases))
    offline = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)
    expected = offline.generate([c[0] for c in cases], [SamplingParams(**c[1]) for c in cases])
    for (tokens, final), want, (ids, sampling) in zip(results, expected, cases, strict=True):
        assert tokens == want.tokens
        assert final.finish_reason == "length" and final.completion_tokens == sampling["max_tokens"]
        assert final.prompt_tokens == len(ids)
        assert final.latency.ttft_s > 0 and final.latency.e2e_s >= final.latency.ttft_s
        assert final.latency.transfer_bytes > 0


def test_cancelled_streams_free_everything(served):
    engine, server, stub, _ = served
    server.set_ready()
    calls = [stub.Generate(_request([7] * (10 + i), max_tokens=200, ignore_eos=True)) for i in range(8)]
    for i, call in enumerate(calls):
        next(call)  # each stream has started
        if i % 2:
            call.cancel()
    for i, call in enumerate(calls):
        if i % 2 == 0:
            assert sum(len(m.token_ids) for m in call) == 199
    deadline = time.time() + 10
    while time.time() < deadline:
        slots = engine.decode[0].slots
        if (
            slots.allocator.num_free == slots.allocator.capacity
            and not engine.sched.prefilled
            and not len(engine.sched.queue)
        ):
            break
        time.sleep(0.05)
    assert slots.allocator.num_free == slots.allocator.capacity
    assert [b.held_tokens for b in engine.sched.prefill] == [0]
    assert _collect(stub, _request([5, 6], max_tokens=3, ignore_eos=True))[0]  # still serving


@pytest.mark.parametrize(
    "request_,code,message",
    [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no input"),
        (_request([]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (_request([5] * 600), grpc.StatusCode.INVALID_ARGUMENT, "at most 511"),
        (_request([5, 999]), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
        (_request([5], temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (_request([5], top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (pb.GenerateRequest(text="hi"), grpc.StatusCode.INVALID_ARGUMENT, "no tokenizer"),
    ],
)
def test_bad_requests(served, request_, code, message):
    engine, server, stub, _ = served
    server.set_ready()
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, request_)
    assert err.value.code() == code and message in err.value.details()


def test_deadline_is_honoured(served):
    engine, server, stub, _ = served
    server.set_ready()
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, _request([9] * 50, max_tokens=400, ignore_eos=True), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_model_info(served):
    engine, server, stub, _ = served
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model_name == "tiny-llama" and info.vocab_size == 256 and info.mesh_preset == "cpu-tp4-pp2tp2"
    assert [(i.role, list(i.devices), i.pp, i.tp) for i in info.instances] == [
        ("prefill", [0, 1, 2, 3], 1, 4),
        ("decode", [4, 5, 6, 7], 2, 2),
    ]
    assert [i.pages for i in info.instances] == [0, engine.decode[0].runner.n_pages]


def test_metrics_endpoint(served):
    engine, server, stub, _ = served
    server.set_ready()
    _collect(stub, _request([5, 6, 7], max_tokens=4, ignore_eos=True))
    http = server.metrics.start(0)
    try:
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}/metrics", timeout=10).read().decode()
    finally:
        http.shutdown()
    for name in (
        "jdisagg_ttft_seconds_bucket",
        "jdisagg_tpot_seconds_bucket",
        "jdisagg_queue_seconds_bucket",
        "jdisagg_kv_transfer_seconds_bucket",
        "jdisagg_kv_transfer_bytes_bucket",
        "jdisagg_kv_pages_used",
        'jdisagg_requests_total{finish_reason="length"}',
        "jdisagg_prefill_queue_depth",
    ):
        assert name in body, name


def test_burst_larger_than_decode_memory(tmp_path):
    """More work than decode pages hold: prefill buffers, decode preempts; nothing is dropped."""
    preset = tmp_path / "tight.toml"
    preset.write_text(
        "page_size = 16\nmax_seq_len = 128\n"
        "[[prefill]]\ndevices = [0, 1]\ntp = 2\nmax_batch = 4\ntoken_budget = 128\nbuffer_tokens = 128\n"
        "[[decode]]\ndevices = [2, 3]\npp = 2\nmax_batch = 4\npages = 14\n"
    )
    engine = Engine("tiny-llama", str(preset), warm_up=False, progress=False)
    server = Server(engine, port=0)
    server.start()
    server.set_ready()
    rng = np.random.default_rng(7)
    cases = [rng.integers(3, 256, int(rng.integers(20, 60))).tolist() for _ in range(16)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                results = list(
                    pool.map(lambda ids: _collect(stub, _request(ids, max_tokens=48, ignore_eos=True)), cases)
                )
    finally:
        server.stop()
    offline = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)
    expected = offline.generate(cases, SamplingParams(max_tokens=48, ignore_eos=True))
    assert [t for t, _ in results] == [e.tokens for e in expected]
    assert sum(f.latency.preemptions for _, f in results) > 0
    assert max(f.latency.decode_queue_s for _, f in results) > 0  # prefixes waited in the prefill buffer
    slots = engine.decode[0].slots
    assert slots.allocator.num_free == slots.allocator.capacity and [b.held_tokens for b in engine.sched.prefill] == [0]


def test_logprobs_and_stop_strings_stream(served):
    engine, server, stub, _ = served
    server.set_ready()
    tokens, final = [], None
    logprobs = []
    for msg in stub.Generate(_request([5, 6, 7], max_tokens=5, ignore_eos=True, logprobs=3)):
        tokens += list(msg.token_ids)
        logprobs += list(msg.logprobs)
        final = msg.final if msg.HasField("final") else final
    assert len(logprobs) == len(tokens) == 5
    for t, lp in zip(tokens, logprobs, strict=True):
        assert lp.token_id == t and len(lp.top) == 3 and lp.top[0].token_id == t
        assert lp.logprob == pytest.approx(lp.top[0].logprob)
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, _request([5], logprobs=50))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in err.value.details()


def test_slo_attainment_is_reported(served):
    engine, server, stub, _ = served
    server.set_ready()
    request = _request([5, 6, 7], max_tokens=4, ignore_eos=True)
    request.slo.ttft_s = 1e-9  # impossible
    assert not _collect(stub, request)[1].slo_attained
    request.slo.ttft_s, request.slo.tpot_s = 3600, 3600
    assert _collect(stub, request)[1].slo_attained
    assert _collect(stub, _request([5, 6, 7], max_tokens=2))[1].slo_attained  # no SLO: attained
    request.slo.tpot_s = -1
    with pytest.raises(grpc.RpcError) as err:
        _collect(stub, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_accepted_stream_reaches_the_engine():
    """A stream holds a handler thread for its whole life: with more open streams than a
    small thread pool, requests would wait unseen (no queue entry, no status). Here 100
    streams are opened while the workers are paused; all 100 reach the engine's queue, and
    all complete with the offline engine's tokens once the workers run."""
    engine = Engine("tiny-llama", "cpu-tp2-pp2", warm_up=False, progress=False)
    server = Server(engine, port=0, max_queue=120)
    server.listen()  # listen, but hold the workers back so requests pile up in the queue
    server.set_ready()
    cases = [[5 + i % 200, 6, 7] for i in range(100)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            with concurrent.futures.ThreadPoolExecutor(100) as pool:
                futures = [pool.submit(_collect, stub, _request(ids, max_tokens=4, ignore_eos=True)) for ids in cases]
                deadline = time.time() + 30
                while len(engine.sched.queue) < len(cases) and time.time() < deadline:
                    time.sleep(0.05)
                queued = len(engine.sched.queue)
                for w in server.workers:
                    w.start()
                results = [f.result() for f in futures]
    finally:
        server.stop()
    assert queued == len(cases)
    expected = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False).generate(
        cases, SamplingParams(max_tokens=4, ignore_eos=True)
    )
    assert [t for t, _ in results] == [e.tokens for e in expected]


def test_full_queue_is_resource_exhausted():
    engine = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)
    server = Server(engine, port=0, max_queue=2)
    server.listen()  # workers held back: requests stay queued
    server.set_ready()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            held = [stub.Generate(_request([5, 6], max_tokens=2)) for _ in range(2)]
            deadline = time.time() + 30
            while len(engine.sched.queue) < 2 and time.time() < deadline:
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as err:
                _collect(stub, _request([5, 6], max_tokens=2))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in err.value.details()
            for w in server.workers:
                w.start()
            assert all(sum(len(m.token_ids) for m in call) == 2 for call in held)  # nothing accepted is lost
    finally:
        server.stop()


def test_failed_prefill_ends_its_streams(monkeypatch):
    """A prefill call that raises (say, out of device memory) ends the batch it was running
    with INTERNAL and a message, as well as every other held request, and the server reports
    NOT_SERVING: no stream is left waiting."""
    engine = Engine("tiny-llama", "cpu-colocated-tp4", warm_up=False, progress=False)

    def fail(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory (injected)")

    monkeypatch.setattr(engine.prefill[0], "run", fail)
    server = Server(engine, port=0, max_queue=8)
    server.listen()  # workers held back until all four are queued: one prefill batch takes them
    server.set_ready()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                futures = [
                    pool.submit(_collect, stub, _request([5, 6 + i], max_tokens=3), timeout=60) for i in range(4)
                ]
                deadline = time.time() + 30
                while len(engine.sched.queue) < 4 and time.time() < deadline:
                    time.sleep(0.05)
                for w in server.workers:
                    w.start()
                errors = []
                for f in futures:
                    with pytest.raises(grpc.RpcError) as err:
                        f.result(timeout=60)
                    errors.append(err.value)
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest()).status
    finally:
        server.stop()
    assert [e.code() for e in errors] == [grpc.StatusCode.INTERNAL] * 4
    assert all("prefill failed" in e.details() and "injected" in e.details() for e in errors)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.failed.is_set()  # jdisagg.serve exits 1 on this
