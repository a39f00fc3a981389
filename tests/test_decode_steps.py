"""Decode instances that run several steps per device call (``steps_per_call``; a pipelined
instance's default): the scheduler's side, without a model. Each call gives a row up to K
tokens; pages are held for all of them before the call; stops are found after it and the
tokens past a stop are dropped. Nothing here compiles."""

import fakes
import pytest

from jdisagg import preset, toml_file
from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Request
from jdisagg.sched.scheduler import DecodeSpec, PrefillSpec, Scheduler

# A pipelined decode instance (pp = 2): steps_per_call is left out, so it runs PIPELINE_STEPS.
PIPELINED = """page_size = 16
max_seq_len = 64
[[prefill]]
devices = [0]
max_batch = 4
token_budget = 64
[[decode]]
devices = [1, 2]
pp = 2
max_batch = 4
pages = 40
"""


class FakePrefix:
    def __init__(self, first: int, tokens: int):
        self.first_token, self.first_logprob, self.held_tokens, self.nbytes = first, None, tokens, 0
        self.length = tokens


def _running(steps: int, n_pages: int, prompts: list[int], max_tokens: int = 100, max_seq_len: int = 512):
    """A scheduler whose one decode instance runs ``steps`` steps per call, with requests of
    these prompt lengths prefilled (first token 7) and pulled."""
    s = Scheduler(
        [PrefillSpec(8, 1024, 1 << 20)],
        [DecodeSpec(n_pages, 16, 8, steps=steps)],
        max_seq_len=max_seq_len,
        eos_ids=(0,),
    )
    requests = [Request([1] * n, SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for n in prompts]
    for r in requests:
        s.submit(r)
    batch = s.take_prefill(0)
    s.prefilled(0, batch, [FakePrefix(7, n) for n in prompts])
    s.pulled(0, s.take_pulls(0), 0.0)
    return s, requests


def test_a_call_holds_pages_for_all_its_tokens():
    # Prompt 10 + first token: position 10. Four steps write positions 10..13: one page; a
    # prompt of 14 writes 14..17 and needs a second page before the call.
    s, (a, b) = _running(steps=4, n_pages=64, prompts=[10, 14])
    batch = s.take_step(0)
    assert batch.steps == [4, 4] and batch.positions == [10, 14]
    assert [len(p) for p in batch.page_tables] == [1, 2]
    s.sampled(0, batch, [[1, 2, 3, 4], [5, 6, 7, 8]], [[None] * 4] * 2)
    assert a.output == [7, 1, 2, 3, 4] and b.output == [7, 5, 6, 7, 8]
    assert s.take_step(0).page_tables == [a.pages, b.pages] and [len(a.pages), len(b.pages)] == [2, 2]


def test_counts_stop_at_max_tokens_and_max_seq_len():
    # max_tokens=6: the first token came from prefill, so 5 more: a call of 4, then of 1.
    s, [r] = _running(steps=4, n_pages=64, prompts=[10], max_tokens=6)
    batch = s.take_step(0)
    assert batch.steps == [4]
    s.sampled(0, batch, [[1, 2, 3, 4]], [[None] * 4])
    batch = s.take_step(0)
    assert batch.steps == [1]
    s.sampled(0, batch, [[5]], [[None]])
    assert r.finish_reason == "length" and r.output == [7, 1, 2, 3, 4, 5] and not r.pages
    # max_seq_len=16, prompt 13: positions 13 and 14 are left, so 2 tokens; no page past 16.
    s, [r] = _running(steps=8, n_pages=64, prompts=[13], max_seq_len=16)
    batch = s.take_step(0)
    assert batch.steps == [2] and len(batch.page_tables[0]) == 1
    s.sampled(0, batch, [[1, 2]], [[None] * 2])
    assert r.finish_reason == "length" and len(r.prompt) + len(r.output) == 16


def test_tokens_after_a_stop_are_dropped_and_the_pages_freed():
    s = Scheduler([PrefillSpec(8, 1024, 1 << 20)], [DecodeSpec(64, 16, 8, steps=4)], max_seq_len=512, eos_ids=(0,))
    eos = Request([1] * 10, SamplingParams(max_tokens=100))
    stop_id = Request([1] * 10, SamplingParams(max_tokens=100, stop_token_ids=(9,)))
    goes_on = Request([1] * 10, SamplingParams(max_tokens=100))
    for r in (eos, stop_id, goes_on):
        s.submit(r)
    s.prefilled(0, s.take_prefill(0), [FakePrefix(7, 10)] * 3)
    s.pulled(0, s.take_pulls(0), 0.0)
    seen = []
    eos.listener = seen.append
    batch = s.take_step(0)
    s.sampled(0, batch, [[5, 0, 6, 6], [9, 8, 8, 8], [1, 2, 3, 4]], [[None] * 4] * 3)
    assert eos.output == [7, 5, 0] and eos.finish_reason == "stop"
    assert stop_id.output == [7, 9] and stop_id.finish_reason == "stop"
    assert goes_on.output == [7, 1, 2, 3, 4] and goes_on.finished is False
    assert [o.tokens for o in seen] == [[5, 0]] and seen[-1].finished  # one update for the call
    assert s.decode[0].running == [goes_on] and s.decode[0].pages_used == len(goes_on.pages) == 1


def test_admission_leaves_room_for_the_running_rows_next_calls():
    # 4 usable pages. The running request (position 15) needs a second page for its next call
    # of 4 tokens; a new request of position 10 needs one page for its first call: 3 in all.
    s, [r] = _running(steps=4, n_pages=5, prompts=[15])
    assert len(r.pages) == 2  # held at admission: positions 15..18
    s.submit(new := Request([1] * 10, SamplingParams(max_tokens=100, ignore_eos=True)))
    s.prefilled(0, s.take_prefill(0), [FakePrefix(7, 10)])
    assert [p.request for p in s.take_pulls(0)] == [new] and s.decode[0].allocator.num_free == 1
    s.submit(third := Request([1] * 40, SamplingParams(max_tokens=100, ignore_eos=True)))
    s.prefilled(0, s.take_prefill(0), [FakePrefix(7, 40)])
    assert s.take_pulls(0) == [] and third.state.value == "prefilled"  # 3 pages: only 1 free


def test_the_youngest_is_preempted_when_a_call_finds_no_pages():
    # 3 usable pages: two requests at position 14 hold one page each; their next call of 4
    # tokens (positions 14..17) needs a second page each; only one is free.
    s, (old, young) = _running(steps=1, n_pages=4, prompts=[14, 14])
    s.decode[0].steps = 4
    batch = s.take_step(0)
    assert batch.requests == [old] and batch.steps == [4] and young.preemptions == 1
    assert list(s.queue) == [young] and len(old.pages) == 2


def test_worker_loop_gives_hand_checkable_tokens_in_calls_of_several_steps():
    engine = fakes.fake_engine(PIPELINED)
    runner = engine.decode[0].runner
    assert runner.steps == preset.PIPELINE_STEPS == 8
    prompts = [[3] * 5, [40] * 20, [90] * 9]
    out = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [c.tokens for c in out] == [fakes.counted(p, 12) for p in prompts]
    assert len(runner.calls) == 2  # 11 decode tokens each: a call of 8, then one of 3
    assert engine.sched.idle() and engine.decode[0].slots.allocator.num_free == 39
    [c] = engine.generate([[10]], SamplingParams(max_tokens=30, stop_token_ids=(14,)))
    assert c.tokens == [11, 12, 13, 14] and c.finish_reason == "stop"  # 15..18 were dropped


def test_a_stop_string_inside_a_call_ends_the_stream_there():
    class Digits:
        eos_ids = ()
        vocab_size = fakes.VOCAB
        longest_token_bytes = 3

        def decode(self, ids):
            return "".join(f"{i % 10}" for i in ids)

    engine = fakes.fake_engine(PIPELINED, tokenizer=Digits())
    seen = []
    r = engine.make_request([10], SamplingParams(max_tokens=30, stop=("456",)))
    r.listener = seen.append
    engine.submit(r)
    while not r.finished:
        engine.step()
    from jdisagg.engine import completion

    done = completion(r)
    assert done.text == "123" and done.finish_reason == "stop" and done.tokens == [11, 12, 13, 14, 15, 16]
    assert "".join(o.text for o in seen) == done.text and seen[-1].finished


def _parse(text: str) -> preset.MeshPreset:
    return preset.parse(toml_file.tomllib.loads(text), "p.toml")


def test_steps_per_call_defaults_and_errors():
    assert [s.steps_per_call for s in _parse(PIPELINED).instances] == [1, preset.PIPELINE_STEPS]
    one = _parse(PIPELINED.replace("pp = 2\n", "pp = 2\nsteps_per_call = 1\n"))
    assert one.decode[0].steps_per_call == 1
    flat = _parse(PIPELINED.replace("devices = [1, 2]\npp = 2\n", "devices = [1]\n"))
    assert flat.decode[0].steps_per_call == 1
    colocated = "page_size = 16\nmax_seq_len = 64\n[[colocated]]\ndevices = [0]\nsteps_per_call = 4\n"
    with pytest.raises(ValueError) as e:
        _parse(colocated)
    assert str(e.value) == (
        "p.toml: colocated[0].steps_per_call: only [[decode]] instances run several decode steps per call "
        "(here prompts would wait for all of them)"
    )
    with pytest.raises(ValueError, match=r"decode\[0\].steps_per_call must be a positive integer \(got 0\)"):
        _parse(PIPELINED.replace("pp = 2\n", "pp = 2\nsteps_per_call = 0\n"))


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_admission_counts_every_running_rows_next_call(steps):
    """The pages admission leaves for the running rows' next calls are, row by row, the pages
    a call of ``call_tokens`` more positions needs beyond those the row holds; across rows
    in all states (mid-page, at a page boundary, near max_tokens and max_seq_len)."""
    from jdisagg.sched.pages import pages_for

    rng = __import__("random").Random(steps)
    s, requests = _running(steps, 400, [rng.randint(1, 40) for _ in range(8)], max_tokens=30, max_seq_len=64)
    slots = s.decode[0]
    for _ in range(12):
        for r in slots.running:  # rows advance by different amounts
            r.output.extend([7] * rng.randint(0, 3))
        want = sum(
            max(0, pages_for(r.position + slots.call_tokens(r), slots.page_size) - len(r.pages)) for r in slots.running
        )
        assert slots._next_step_pages() == want
        slots.reserve_next()
        assert slots._next_step_pages() == 0
