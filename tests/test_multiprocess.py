"""Instances as processes: a router, two prefill and two decode processes on localhost
(tiny-llama; prefill tp=2 -> decode pp=2 and tp=2, so one pair's KV is cut into other shard
splits on the prefill side), KV moved between them over ``jax.experimental.transfer`` with
checksums on. One deployment serves the whole module; the fault tests come after the
equality test, then the ``kill -9`` tests (a prefill, a decode, then the last decode process,
and a new decode process joins the running router)."""

import asyncio
import concurrent.futures
import signal
import time

import grpc
import numpy as np
import pytest
from deployment import Deployment, metrics, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jdisagg.engine import Engine
from jdisagg.proto import internal_pb2 as ipb
from jdisagg.proto import internal_pb2_grpc as ipb_grpc
from jdisagg.sched.params import SamplingParams
from jdisagg.serving.client import AsyncClient, Client

CALL_TIMEOUT = 120.0
TRANSFER_TIMEOUT_S = 2.0
BOUND_S = 10.0  # a request hit by a dead decode process completes or fails within this

PRESET = """
name = "mp-test"
description = "two prefill (tp=2) and two decode (pp=2; tp=2 with a small pool) instances"
page_size = 16
max_seq_len = 64
length_buckets = [32, 64]  # few programs: every process compiles its own

[[prefill]]
devices = [0, 1]
tp = 2
max_batch = 4
token_budget = 64

[[prefill]]
devices = [2, 3]
tp = 2
max_batch = 4
token_budget = 64

[[decode]]
devices = [4, 5]
pp = 2
max_batch = 8
batch_buckets = [8]
pages = 64

[[decode]]
devices = [6, 7]
tp = 2
max_batch = 8
batch_buckets = [8]
pages = 16  # 15 pages for up to 8 requests of up to 4 pages: some are preempted and recomputed
"""


# The single-process engine the processes are compared with: PRESET's first pair (tokens do
# not depend on the shard splits or on which instance runs a request: tests/test_engine.py).
REFERENCE = """
name = "mp-test-ref"
page_size = 16
max_seq_len = 64
length_buckets = [32, 64]

[[prefill]]
devices = [0, 1]
tp = 2
max_batch = 4
token_budget = 64

[[decode]]
devices = [2, 3]
pp = 2
max_batch = 8
batch_buckets = [8]
pages = 64
"""


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "mp-test.toml"
    path.write_text(PRESET)
    return str(path)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "mp-test-ref.toml"
    path.write_text(REFERENCE)
    return Engine("tiny-llama", str(path), warm_up=False, progress=False)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, preset, offline):
    # The reference outputs are computed (and compiled) while the processes start.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    cases = _cases()
    reference = pool.submit(offline.generate, [ids for ids, _ in cases], [_params(s) for _, s in cases])
    d = Deployment(
        tmp_path_factory.mktemp("mp"),
        "tiny-llama",
        preset,
        router_args=["--max_retries", "2", "--heartbeat_s", "0.25", "--dead_after_s", "2"],
        instance_args=["--kv_checksum", "--test_faults", "--transfer_timeout_s", str(TRANSFER_TIMEOUT_S)],
    )
    try:
        for role, i in (("prefill", 0), ("decode", 0), ("decode", 1)):
            d.start(role, i)
        d.wait_ready(["prefill0"])
        d.start("prefill", 1, "--devices", "0,1")  # prefill0's programs: from the compilation cache
        d.reference = cases, reference
        yield d
    finally:
        d.stop()
        pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def target(deployment):
    """The router's address, once all four instances joined it."""
    deployment.wait_ready()
    wait_until(lambda: deployment.serving("prefill") == 2 and deployment.serving("decode") == 2, 30, "all joined")
    return deployment.target


def _cases(n: int = 32) -> list[tuple[list[int], dict]]:
    """Token-id prompts of 1..40 tokens with mixed sampling settings (client keywords)."""
    rng = np.random.default_rng(13)
    cases = []
    for i in range(n):
        ids = rng.integers(3, 256, int(rng.integers(1, 41))).tolist()
        sampling = dict(max_tokens=int(rng.integers(1, 21)), ignore_eos=bool(i % 2))
        if i % 3 == 0:
            sampling.update(temperature=float(rng.choice([0.5, 0.8, 1.3])), top_k=int(rng.choice([0, 5, 40])))
            sampling.update(top_p=float(rng.choice([0.7, 0.9, 1.0])), seed=1000 + i)
        if i % 4 == 1:
            sampling["stop_token_ids"] = rng.integers(3, 256, 12).tolist()
        if i % 5 == 2:
            sampling["logprobs"] = 2
        cases.append((ids, sampling))
    cases[3][1]["max_tokens"] = 1
    cases[6][1]["max_tokens"] = 20
    return cases


def _params(sampling: dict) -> SamplingParams:
    kw = dict(sampling)
    kw["stop_token_ids"] = tuple(kw.get("stop_token_ids", ()))
    return SamplingParams(**kw)


@pytest.fixture(scope="module")
def expected(deployment):
    """The single-process engine's outputs for _cases()."""
    cases, reference = deployment.reference
    return cases, reference.result(timeout=600)


async def _stream(client: AsyncClient, ids, sampling):
    async with client.generate(ids, **sampling) as stream:
        return [m async for m in stream]


def _tokens(messages) -> list[int]:
    return [t for m in messages for t in m.token_ids]


def test_32_concurrent_streams_equal_one_process(expected, target, deployment):
    cases, want = expected

    async def run_all():
        async with AsyncClient(target, timeout=CALL_TIMEOUT) as client:
            assert await client.health() == "SERVING"
            return await asyncio.gather(*(_stream(client, ids, sampling) for ids, sampling in cases))

    results = asyncio.run(run_all())
    for i, (messages, w, (ids, sampling)) in enumerate(zip(results, want, cases, strict=True)):
        assert _tokens(messages) == w.tokens, (i, sampling)
        final = messages[-1].final
        assert final.finish_reason == w.finish_reason, (i, sampling)
        assert final.completion_tokens == len(w.tokens) and final.prompt_tokens == len(ids)
        if sampling.get("logprobs"):
            got = [(lp.token_id, round(lp.logprob, 4)) for m in messages for lp in m.logprobs]
            assert got == [(t, round(lp.logprob, 4)) for t, lp in zip(w.tokens, w.logprobs, strict=True)], i
        assert (final.latency.transfer_bytes > 0) == (len(w.tokens) > 1)  # done at prefill: nothing moved
    assert {w.finish_reason for w in want} == {"length", "stop"}
    # Both prefill and both decode instances served; the small pool preempted (and recomputed) some.
    for name in ("prefill0", "prefill1"):
        assert deployment.metrics(name)["jdisagg_instance_prefills_total"] > 0, name
    for name in ("decode0", "decode1"):
        m = deployment.metrics(name)
        assert m["jdisagg_kv_transfer_bytes_total"] > 0 and m["jdisagg_kv_transfer_failures_total"] == 0, name
    _settled(deployment)


def _settled(deployment, timeout: float = 15) -> None:
    """Every surviving instance holds no leases, pages or requests (through their metrics)."""

    def clean():
        for name, proc in deployment.instances.items():
            if proc.proc.poll() is not None:
                continue
            m = deployment.metrics(name)
            held = m.get("jdisagg_instance_leases", 0) + m.get("jdisagg_prefilled_requests", 0)
            if held or m.get("jdisagg_kv_pages_used", 0) or m.get("jdisagg_running_requests", 0):
                return False
        return True

    wait_until(clean, timeout, "instances hold nothing")


def test_health_reflection_and_model_info(target):
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "jdisagg.v1.Generation"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [listed] = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT
        )
        assert "jdisagg.v1.Generation" in {s.name for s in listed.list_services_response.service}
    with Client(target, timeout=CALL_TIMEOUT) as client:
        info = client.model_info()
    assert info.model_name == "tiny-llama" and info.mesh_preset == "mp-test"
    assert [i.role for i in info.instances] == ["prefill", "prefill", "decode", "decode"]


def _fault(deployment, stage_hang: int = 0, names=("prefill0", "prefill1"), prefill_delay_s: float = 0) -> None:
    """Makes the prefill processes answer their next ``stage_hang`` Stage calls without offering
    the KV (the decode side's pull hangs until its timeout), or wait ``prefill_delay_s`` before
    each prefill call."""
    fault = ipb.FaultRequest(stage_hang=stage_hang, prefill_delay_s=prefill_delay_s)
    for name in names:
        proc = deployment.instances[name]
        port = proc.wait_for(r"^jdisagg\.serve: ready \S+ on \S+:(\d+)$", 5).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ipb_grpc.InstanceStub(channel).Fault(fault, timeout=10)


def _leases(deployment) -> float:
    return sum(deployment.metrics(n)["jdisagg_instance_leases"] for n in ("prefill0", "prefill1"))


def test_a_cancelled_request_frees_its_lease(target, deployment):
    """Cancelled while its decode instance waits for the KV: the prefill's lease ends at once."""
    _fault(deployment, 1)
    with Client(target, timeout=CALL_TIMEOUT) as client:
        stream = client.generate([5, 6, 7], max_tokens=10, ignore_eos=True)
        first = next(stream)  # the first token (prefill done, the prefix under a lease)
        assert list(first.token_ids)
        wait_until(lambda: _leases(deployment) == 1, 5, "the lease is held while the pull hangs")
        stream.cancel()
        start = time.monotonic()
        wait_until(lambda: _leases(deployment) == 0, TRANSFER_TIMEOUT_S, "the lease ended by the cancel")
        assert time.monotonic() - start < TRANSFER_TIMEOUT_S  # before the hung pull even timed out
    _fault(deployment, 0)
    _settled(deployment)


def test_a_transfer_that_times_out_frees_the_lease_and_is_retried(target, deployment, offline):
    """Documented behaviour: the pull fails after --transfer_timeout_s, the router ends the
    lease and recomputes the request (up to --max_retries); the tokens do not change."""
    before = deployment.metrics("decode0")["jdisagg_kv_transfer_failures_total"]
    before += deployment.metrics("decode1")["jdisagg_kv_transfer_failures_total"]
    _fault(deployment, 1)
    prompt = [9, 8, 7, 6]
    with Client(target, timeout=CALL_TIMEOUT) as client:
        start = time.monotonic()
        done = client.complete(prompt, max_tokens=6, ignore_eos=True)
    assert time.monotonic() - start >= TRANSFER_TIMEOUT_S  # it did wait for the timeout
    [want] = offline.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))
    assert done.token_ids == want.tokens and done.finish_reason == "length"
    after = deployment.metrics("decode0")["jdisagg_kv_transfer_failures_total"]
    after += deployment.metrics("decode1")["jdisagg_kv_transfer_failures_total"]
    assert after >= before + 1
    _fault(deployment, 0)
    _settled(deployment)


def test_a_transfer_that_keeps_timing_out_ends_unavailable(target, deployment):
    """After --max_retries (2) failed attempts more, the request ends with UNAVAILABLE, in bounded time."""
    _fault(deployment, 10)
    try:
        with Client(target, timeout=CALL_TIMEOUT) as client:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.complete([4, 4, 4], max_tokens=4)
            elapsed = time.monotonic() - start
    finally:
        _fault(deployment, 0)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "transfer" in err.value.details()
    assert elapsed < 3 * (TRANSFER_TIMEOUT_S + 2)
    _settled(deployment)


def _router(deployment, name: str) -> float:
    return metrics(deployment.router_metrics).get(name, 0.0)


def test_kill_9_of_a_prefill_process_with_queued_requests(target, deployment, offline):
    """A prefill process that dies with requests on it (here: stuck in a slow prefill call):
    they go to the other prefill instance and complete with the same tokens."""
    victim = deployment.instances["prefill1"]
    _fault(deployment, names=["prefill1"], prefill_delay_s=60)
    prompts = [[60 + i, 61 + i, 62 + i] for i in range(6)]
    want = offline.generate(prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    retries = _router(deployment, "jdisagg_router_retries_total")

    async def run():
        async with AsyncClient(target, timeout=CALL_TIMEOUT) as client:
            # All at once: the router spreads them over both prefill instances (least prompt tokens waiting).
            calls = [asyncio.create_task(client.complete(p, max_tokens=5, ignore_eos=True)) for p in prompts]
            await asyncio.to_thread(
                wait_until, lambda: _router(deployment, "jdisagg_prefill_queue_depth") >= 1, 10, "requests stuck"
            )
            victim.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            done = await asyncio.gather(*calls)
            return done, time.monotonic() - killed

    done, after_kill = asyncio.run(run())
    assert victim.proc.wait(10) == -signal.SIGKILL
    assert [d.token_ids for d in done] == [w.tokens for w in want]
    assert after_kill < BOUND_S
    assert _router(deployment, "jdisagg_router_retries_total") > retries  # it was recomputed elsewhere
    wait_until(lambda: deployment.serving("prefill") == 1, BOUND_S, "the router dropped the dead prefill")
    _settled(deployment)


def test_kill_9_of_a_decode_process_mid_stream(target, deployment, offline):
    """Its streams complete on the other decode instance (recomputed) or end with UNAVAILABLE
    within the bound; new requests succeed; the survivors hold nothing."""
    prompts = [[20 + i, 30 + i, 40 + i] for i in range(8)]
    params = SamplingParams(max_tokens=56, ignore_eos=True)
    want = offline.generate(prompts, params)
    victim = deployment.instances["decode0"]

    async def run():
        async with AsyncClient(target, timeout=CALL_TIMEOUT) as client:
            streams = [client.generate(p, max_tokens=56, ignore_eos=True) for p in prompts]
            got = [[] for _ in prompts]
            ended = [None] * len(prompts)

            async def read(i):
                try:
                    async for m in streams[i]:
                        got[i] += m.token_ids
                    ended[i] = time.monotonic()
                except grpc.aio.AioRpcError as e:
                    ended[i] = (time.monotonic(), e.code())

            readers = [asyncio.create_task(read(i)) for i in range(len(prompts))]
            await asyncio.to_thread(wait_until, lambda: all(len(g) >= 2 for g in got), 30, "all streams decoding")
            victim.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.gather(*readers)
            return got, ended, killed

    got, ended, killed = asyncio.run(run())
    assert victim.proc.wait(10) == -signal.SIGKILL
    for i, (tokens, end, w) in enumerate(zip(got, ended, want, strict=True)):
        if isinstance(end, tuple):  # failed: only UNAVAILABLE, within the bound
            assert end[1] == grpc.StatusCode.UNAVAILABLE, (i, end)
            assert end[0] - killed < BOUND_S, i
        else:
            assert tokens == w.tokens, i  # recomputed on the other instance: the same tokens
            assert end - killed < BOUND_S + 10, i
    assert sum(not isinstance(e, tuple) for e in ended) >= len(prompts) // 2
    wait_until(lambda: deployment.serving("decode") == 1, BOUND_S, "the router dropped the dead instance")
    with Client(target, timeout=CALL_TIMEOUT) as client:
        assert client.health() == "SERVING"  # a prefill/decode pair remains
        done = client.complete([1, 2, 3], max_tokens=5, ignore_eos=True)
    [w] = offline.generate([[1, 2, 3]], SamplingParams(max_tokens=5, ignore_eos=True))
    assert done.token_ids == w.tokens
    _settled(deployment)


def test_no_pair_left_is_not_serving_until_an_instance_joins(target, deployment, offline):
    """Runs last. With the last decode process gone, health turns NOT_SERVING and requests end
    UNAVAILABLE; a new decode process joining the running router makes it serve again."""
    victim = deployment.instances["decode1"]
    victim.proc.send_signal(signal.SIGKILL)
    with Client(target, timeout=CALL_TIMEOUT) as client:
        wait_until(lambda: client.health() == "NOT_SERVING", BOUND_S, "NOT_SERVING without a decode instance")
        with pytest.raises(grpc.RpcError) as err:
            client.complete([1, 2, 3], max_tokens=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        deployment.start("decode", 0, name="decode0-again")
        deployment.wait_ready(["decode0-again"])
        wait_until(lambda: client.health() == "SERVING", 60, "SERVING once a decode instance joined")
        done = client.complete([1, 2, 3], max_tokens=5, ignore_eos=True)
    [w] = offline.generate([[1, 2, 3]], SamplingParams(max_tokens=5, ignore_eos=True))
    assert done.token_ids == w.tokens
    _settled(deployment)
