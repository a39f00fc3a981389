"""The scheduling policy without a model: the core's verbs driven by hand, and the worker
loops over fake runners (tests/fakes.py). Nothing here compiles."""

import subprocess
import sys

import fakes
import pytest

from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Request, State
from jdisagg.sched.scheduler import DecodeSpec, PrefillSpec, Scheduler


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakePrefix:
    def __init__(self, first: int, tokens: int):
        self.first_token, self.first_logprob, self.held_tokens, self.nbytes = first, None, tokens, tokens * 8
        self.length = tokens


def _req(n: int, max_tokens: int = 8, first: int = 0) -> Request:
    return Request([first + i % 200 + 1 for i in range(n)], SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _sched(prefill=None, decode=None, clock=None) -> Scheduler:
    prefill = [PrefillSpec(4, 64, 1024)] if prefill is None else prefill
    decode = [DecodeSpec(64, 16, 4)] if decode is None else decode
    return Scheduler(list(prefill), list(decode), max_seq_len=512, eos_ids=(0,), clock=clock or Clock())


def _prefill(s: Scheduler, i: int = 0):
    batch = s.take_prefill(i)
    if batch is not None:
        s.prefilled(i, batch, [FakePrefix(7, 16 * -(-len(p) // 16)) for p in batch.prompts])
    return batch


def test_the_core_imports_no_jax():
    code = "import sys, jdisagg.sched.scheduler, jdisagg.preset, jdisagg.text.output; print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_fcfs_batches_fit_the_token_budget():
    s = _sched()
    requests = [_req(n) for n in (10, 30, 40, 5, 100, 3, 3, 3, 3, 3)]
    for r in requests:
        s.submit(r)
    batches = []
    while (b := s.take_prefill(0)) is not None:
        batches.append([len(p) for p in b.prompts])
        s.prefilled(0, b, [FakePrefix(1, 16) for _ in b.requests])
    # 10 + 30 fit 64, + 40 would not; a 100-token prompt runs alone; at most 4 prompts per call.
    assert batches == [[10, 30], [40, 5], [100], [3, 3, 3, 3], [3]]
    assert [r.state for r in requests] == [State.PREFILLED] * len(requests)
    assert s.held == requests  # FCFS


def test_back_pressure_pauses_prefill_until_decode_pulls():
    s = _sched(prefill=[PrefillSpec(1, 64, buffer_tokens=32)])
    for _ in range(4):
        s.submit(_req(10))
    assert _prefill(s) and _prefill(s)  # two prefixes of 16 tokens: the buffer is full
    assert s.take_prefill(0) is None and s.prefill[0].held_tokens == 32
    pulls = s.take_pulls(0)
    assert len(pulls) == 2 and s.prefill[0].held_tokens == 32  # held until the KV has moved
    s.pulled(0, pulls, 0.01)
    assert s.prefill[0].held_tokens == 0 and s.take_prefill(0) is not None


def test_least_loaded_decode_instance_pulls():
    s = _sched(decode=[DecodeSpec(64, 16, 4), DecodeSpec(64, 16, 4)])
    for _ in range(6):
        s.submit(_req(10))
    while _prefill(s):
        pass
    order = []
    for _ in range(3):
        for d in (0, 1):
            pulls = s.take_pulls(d)
            s.pulled(d, pulls, 0.0)
            order.append((d, len(pulls)))
    # An instance pulls while it runs no more than the least-loaded one that could take the
    # prefix: decode 0 takes one (then decode 1 runs fewer), decode 1 two (a tie, then more), ...
    assert order == [(0, 1), (1, 2), (0, 2), (1, 1), (0, 0), (1, 0)]
    assert [len(d) for d in s.decode] == [3, 3]


def test_the_youngest_is_preempted_and_requeued_first():
    # 6 usable pages of 16 tokens; three requests of 31 tokens take 2 pages each (prefix + 1 token).
    s = _sched(decode=[DecodeSpec(7, 16, 4)])
    requests = [_req(31, max_tokens=40) for _ in range(3)]
    for r in requests:
        s.submit(r)
    while _prefill(s):
        pass
    s.pulled(0, s.take_pulls(0), 0.0)
    assert [r.state for r in requests] == [State.RUNNING] * 3 and s.decode[0].allocator.num_free == 0
    batch = s.take_step(0)
    s.sampled(0, batch, [[5]] * 3, [[None]] * 3)  # position 32 next: each needs a third page
    batch = s.take_step(0)
    assert batch.requests == requests[:2]  # the youngest gave its pages to the two older ones
    young = requests[2]
    assert young.state is State.WAITING and young.preemptions == 1 and not young.pages
    assert s.queue.peek() is young and young.prefill_tokens == young.prompt + young.output[:-1]


def test_admission_leaves_room_for_the_next_step():
    s = _sched(decode=[DecodeSpec(5, 16, 4)])  # 4 usable pages
    first = _req(31, max_tokens=40)
    s.submit(first)
    _prefill(s)
    s.pulled(0, s.take_pulls(0), 0.0)  # 2 pages
    s.sampled(0, s.take_step(0), [[5]], [[None]])  # its next token needs a third page
    s.submit(_req(20, max_tokens=40))
    _prefill(s)
    assert s.take_pulls(0) == []  # 2 free pages, but 1 is the running request's next: no room
    assert s.take_step(0).requests == [first] and first.preemptions == 0


@pytest.mark.parametrize("stage", ["queued", "prefilling", "prefilled", "pulling", "decoding"])
def test_cancel_frees_everything_at_once(stage):
    s = _sched()
    keep, r = _req(10, max_tokens=50), _req(10, max_tokens=50)
    for q in (keep, r):
        s.submit(q)
    batch = None
    if stage != "queued":
        batch = s.take_prefill(0)
    if stage in ("prefilled", "pulling", "decoding"):
        s.prefilled(0, batch, [FakePrefix(7, 16), FakePrefix(7, 16)])
    pulls = s.take_pulls(0) if stage in ("pulling", "decoding") else []
    if stage == "decoding":
        s.pulled(0, pulls, 0.0)
        step = s.take_step(0)  # a step "in flight" with both rows
    s.cancel(r)
    assert r.finished and r.finish_reason == "cancelled" and r.cancelled
    assert r not in s.queue and r not in s.held and not r.pages and r.prefix is None
    d = s.decode[0]
    assert r not in d.running and r not in d.pulling
    # Whatever was in flight returns; the update skips the cancelled request.
    if stage == "prefilling":
        s.prefilled(0, batch, [FakePrefix(7, 16), FakePrefix(7, 16)])
    if stage == "pulling":
        s.pulled(0, pulls, 0.0)
    if stage == "decoding":
        s.sampled(0, step, [[9], [9]], [[None], [None]])
        assert r.output == [7]  # the in-flight step's token was not taken
    pages_of_keep = len(keep.pages)
    assert d.allocator.capacity - d.allocator.num_free == pages_of_keep
    assert s.prefill[0].held_tokens == (16 if keep.state is State.PREFILLED else 0)
    assert not keep.finished  # the other request is untouched


def test_cancel_a_chunking_prompt_frees_its_pages():
    s = _sched(prefill=[], decode=[DecodeSpec(64, 16, 4, chunk_tokens=8)])
    r = _req(30)
    s.submit(r)
    step = s.take_chunk_step(0)
    assert step.chunk is r and step.piece == r.prompt[:8] and r.pages
    s.cancel(r)
    assert not r.pages and s.decode[0].chunking is None and s.decode[0].allocator.num_free == 63
    s.chunk_sampled(0, step, [1], [None])  # the mixed step in flight returns: nothing happens
    assert r.output == [] and s.take_chunk_step(0) is None


def test_fail_all_ends_every_request_and_frees_everything():
    s = _sched()
    requests = [_req(10, max_tokens=50) for _ in range(7)]
    for r in requests:
        s.submit(r)
    _prefill(s)
    s.pulled(0, s.take_pulls(0), 0.0)
    _prefill(s)
    s.take_prefill(0)  # a batch in flight
    s.fail_all("decode[0] failed: boom")
    assert all(r.finished and r.finish_reason == "error" and r.error == "decode[0] failed: boom" for r in requests)
    assert s.idle() and s.decode[0].allocator.num_free == s.decode[0].allocator.capacity
    assert s.prefill[0].held_tokens == 0


def test_times_come_from_the_injected_clock():
    clock = Clock()
    s = _sched(clock=clock)
    r = _req(5, max_tokens=2)
    clock.now = 1.0
    s.submit(r)
    clock.now = 3.0
    batch = s.take_prefill(0)
    clock.now = 4.5
    s.prefilled(0, batch, [FakePrefix(7, 16)])
    clock.now = 5.0
    pulls = s.take_pulls(0)
    s.pulled(0, pulls, 0.25)
    clock.now = 6.0
    s.sampled(0, s.take_step(0), [[8]], [[None]])
    assert r.arrival == 1.0 and r.finish_reason == "length" and r.output == [7, 8]
    assert r.times == {"prefill_start": 3.0, "prefill_end": 4.5, "first_token": 4.5, "admitted": 5.0, "finished": 6.0}
    assert r.transfer_s == 0.25 and r.transfer_bytes == 128


# ---- the worker loops over fake runners ---------------------------------------------------

TWO_BY_TWO = """page_size = 16
max_seq_len = 256
[[prefill]]
devices = [0]
max_batch = 4
token_budget = 64
[[prefill]]
devices = [1]
max_batch = 4
token_budget = 64
[[decode]]
devices = [2]
max_batch = 4
pages = 40
[[decode]]
devices = [3]
max_batch = 4
pages = 40
"""


def test_engine_loops_give_hand_checkable_tokens():
    engine = fakes.fake_engine(TWO_BY_TWO)
    prompts = [[i + 1] * (5 + 7 * i) for i in range(10)]
    out = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [c.tokens for c in out] == [fakes.counted(p, 12) for p in prompts]
    assert all(c.finish_reason == "length" for c in out)
    assert engine.sched.idle() and all(d.slots.allocator.num_free == d.slots.allocator.capacity for d in engine.decode)
    assert sorted(d.slots.admitted for d in engine.decode) == [5, 5]  # least-loaded routing balanced them
    assert sum(len(p.calls) for p in engine.prefill) >= 3 and all(p.calls for p in engine.prefill)


def test_chunked_loop_gives_hand_checkable_tokens():
    engine = fakes.fake_engine(
        "page_size = 16\nmax_seq_len = 256\n[[chunked]]\ndevices = [0]\nmax_batch = 4\npages = 40\nchunk_tokens = 8\n"
    )
    prompts = [[3] * 20, [9] * 5, [4] * 17]
    out = engine.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [c.tokens for c in out] == [fakes.counted(p, 6) for p in prompts]
    chunks = [c[1] for c in engine.decode[0].runner.calls if isinstance(c, tuple)]
    assert [len(c) for c in chunks[:3]] == [8, 8, 4]  # the first prompt, 8 tokens at a time


def test_stop_token_ends_the_request():
    engine = fakes.fake_engine(TWO_BY_TWO)
    [c] = engine.generate([[10]], SamplingParams(max_tokens=12, stop_token_ids=(14,)))
    assert c.tokens == [11, 12, 13, 14] and c.finish_reason == "stop"
