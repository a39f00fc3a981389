"""A decode pipeline in steady state (several steps per call, each micro-batch's sampled tokens
fed back on the devices) gives the tokens of one device stepping once per call, token for
token, greedy and seeded rows in one batch: micro-batches below, at and above the number of
stages, with tp, with the Pallas decode kernel (interpreted) as well as the gather, and rows
that take fewer steps than the call (a row's last call, cut at its budget).

Runner level, decoding from position 0 (no prefill), so the only difference between the
runs is the decode program. Serving through the scheduler on a pipelined preset is
tests/test_engine.py's (cpu-tp2-pp2 and cpu-tp4-pp2tp2 run PIPELINE_STEPS per call)."""

import jax
import numpy as np
import pytest

from jdisagg.model import axes, sharding
from jdisagg.model.config import shape
from jdisagg.model.decoder import init_params
from jdisagg.runtime.decode import DecodeRunner
from jdisagg.sched.params import SamplingParams

CFG = shape("tiny-llama")
PAGE, PAGES_PER_ROW = 8, 8  # 64 positions per row
BUDGETS = [20, 13, 7, 20, 1, 16]  # tokens each row produces; the batch bucket is 8: two empty rows
# Each row asks for one alternative, so that the best token's log-probability comes back.
PARAMS = [
    SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=s, logprobs=1) if s % 2 else SamplingParams(logprobs=1)
    for s in range(len(BUDGETS))
]
# (devices, pp, tp, micro_batches, steps per call, decode attention). pp=2 with 2 micro-batches
# and 8 steps is cpu-tp2-pp2's layout, which tests/test_engine.py serves.
LAYOUTS = {
    "pp=1, 4 steps": ((1,), 1, 1, 1, 4, "dot"),
    "pp=2, 1 step": ((1, 2), 2, 1, 2, 1, "dot"),
    "pp=2, micro 1, 3 steps": ((1, 2), 2, 1, 1, 3, "dot"),
    "pp=2 x tp=2, micro 4, 5 steps": ((1, 2, 3, 4), 2, 2, 4, 5, "dot"),
    "pp=2 x tp=2, micro 4, 5 steps, Pallas kernel": ((1, 2, 3, 4), 2, 2, 4, 5, "pallas"),  # interpreted
}


@pytest.fixture(scope="module")
def host_params():
    return init_params(CFG, jax.random.key(0))


def _runner(host_params, devices, pp, tp, micro, steps, attention="dot") -> DecodeRunner:
    mesh = sharding.make_mesh([jax.devices()[d] for d in devices], pp, tp)
    params = jax.device_put(host_params, sharding.param_shardings(host_params, mesh, axes.DEFAULT_RULES))
    return DecodeRunner(
        CFG,
        params,
        mesh,
        axes.DEFAULT_RULES,
        max_batch=8,
        n_pages=1 + PAGES_PER_ROW * len(BUDGETS),
        page_size=PAGE,
        max_seq_len=PAGE * PAGES_PER_ROW,
        micro_batches=micro,
        batch_buckets=(8,),
        steps=steps,
        decode_attention=attention,
    )


def _decode(runner: DecodeRunner) -> tuple[list[list[int]], list[list[tuple[float, float]]]]:
    """Each row's tokens and, per token, (its log-probability, the best one's), row i starting
    from token 3 + i at position 0 and producing BUDGETS[i] tokens in calls of ``runner.steps`` steps."""
    tables = [list(range(1 + i * PAGES_PER_ROW, 1 + (i + 1) * PAGES_PER_ROW)) for i in range(len(BUDGETS))]
    tokens = [[3 + i] for i in range(len(BUDGETS))]
    logprobs: list[list[tuple[float, float]]] = [[] for _ in BUDGETS]
    while live := [i for i, n in enumerate(BUDGETS) if len(tokens[i]) <= n]:
        counts = [min(runner.steps, BUDGETS[i] + 1 - len(tokens[i])) for i in live]
        sampled = runner.step(
            [tokens[i][-1] for i in live],
            [len(tokens[i]) - 1 for i in live],
            [tables[i] for i in live],
            [PARAMS[i] for i in live],
            counts,
        )
        assert sampled.tokens.shape == (runner.steps, 8)
        for row, (i, n) in enumerate(zip(live, counts, strict=True)):
            tokens[i] += sampled.tokens[:n, row].tolist()
            chosen, best = sampled.logprobs[:n, row].tolist(), sampled.top_logprobs[:n, row, 0].tolist()
            logprobs[i] += zip(chosen, best, strict=True)
    return [t[1:] for t in tokens], logprobs


@pytest.fixture(scope="module")
def reference(host_params):
    """One device, one step per call (the layer loop from the host, as cpu-single runs it)."""
    runner = _runner(host_params, (0,), 1, 1, 1, 1)
    assert runner.host_loop
    return _decode(runner)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipelined_calls_give_one_devices_tokens(host_params, reference, layout):
    runner = _runner(host_params, *LAYOUTS[layout])
    tokens, logprobs = _decode(runner)
    want_tokens, want_logprobs = reference
    assert [len(t) for t in want_tokens] == BUDGETS
    greedy = [i for i, p in enumerate(PARAMS) if p.temperature == 0]
    assert all(chosen == best for i in greedy for chosen, best in want_logprobs[i])
    assert any(chosen < best - 1e-3 for i in (1, 3, 5) for chosen, best in want_logprobs[i])  # they sampled
    assert tokens == want_tokens
    for got, want in zip(logprobs, want_logprobs, strict=True):
        assert np.asarray(got) == pytest.approx(np.asarray(want), abs=1e-4)
