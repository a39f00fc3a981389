"""An instance that spans hosts: one decode instance (pp=2 x tp=2) formed by two processes
of two CPU devices each, one multi-controller JAX program (``jax.distributed`` over gloo),
behind a router with a prefill process. It serves the tokens of one process."""

import asyncio
import concurrent.futures

import numpy as np
import pytest
from deployment import Deployment, free_port, wait_until

from jdisagg.engine import Engine
from jdisagg.sched.params import SamplingParams
from jdisagg.serving.client import AsyncClient

CALL_TIMEOUT = 120.0

# decode[0]'s devices are the global devices of its two processes (0, 1 in the first; 2, 3 in
# the second): each process holds one pipeline stage, split over its two devices.
PRESET = """
name = "mh-test"
page_size = 16
max_seq_len = 64
length_buckets = [32, 64]

[[prefill]]
devices = [4, 5]
tp = 2
max_batch = 4
token_budget = 64

[[decode]]
devices = [0, 1, 2, 3]
pp = 2
tp = 2
max_batch = 8
batch_buckets = [8]
pages = 64
"""


def _cases() -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(7)
    cases = []
    for i in range(8):
        ids = rng.integers(3, 256, int(rng.integers(1, 41))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(2, 21)), ignore_eos=True)
        if i % 2:
            params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=100 + i)
        cases.append((ids, params))
    return cases


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    path = tmp_path_factory.mktemp("mesh") / "mh-test.toml"
    path.write_text(PRESET)
    offline = Engine("tiny-llama", str(path), warm_up=False, progress=False)  # the same preset, one process
    cases = _cases()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    reference = pool.submit(offline.generate, [c for c, _ in cases], [p for _, p in cases])
    d = Deployment(tmp_path_factory.mktemp("mh"), "tiny-llama", str(path), instance_args=["--kv_checksum"])
    try:
        d.start("prefill", 0)
        coordinator = f"127.0.0.1:{free_port()}"
        for i in range(2):
            d.start(
                "decode",
                0,
                "--coordinator",
                coordinator,
                "--num_processes",
                "2",
                "--process_id",
                str(i),
                name=f"decode0.{i}",
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                metrics=i == 0,
            )
        d.reference = cases, reference
        yield d
    finally:
        d.stop()
        pool.shutdown(wait=True)


def test_two_processes_form_one_decode_instance(deployment):
    d = deployment
    d.wait_ready(["prefill0", "decode0.0"])
    d.instances["decode0.1"].wait_for(r"^jdisagg\.serve: following decode\[0\] \(process 1 of 2\)$", 60)
    wait_until(lambda: d.serving("prefill") == 1 and d.serving("decode") == 1, 30, "both joined")
    cases, reference = d.reference

    async def run_all():
        async with AsyncClient(d.target, timeout=CALL_TIMEOUT) as client:
            return await asyncio.gather(
                *(
                    client.complete(
                        ids,
                        max_tokens=p.max_tokens,
                        temperature=p.temperature,
                        top_k=p.top_k,
                        seed=p.seed,
                        ignore_eos=p.ignore_eos,
                    )
                    for ids, p in cases
                )
            )

    got = asyncio.run(run_all())
    want = reference.result(timeout=600)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_ids == w.tokens, i
        assert g.finish_reason == w.finish_reason, i
    m = d.metrics("decode0.0")
    assert m["jdisagg_kv_transfer_bytes_total"] > 0 and m["jdisagg_kv_transfer_failures_total"] == 0
