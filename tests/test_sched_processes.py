"""The scheduling core's parts for instances in processes of their own, without a model: a
prefill process's Scheduler hands prefixes off, a decode process's holds remote prefixes, the
router's picks, and leases. Nothing here compiles."""

from jdisagg.sched import router
from jdisagg.sched.lease import Leases
from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Request, State
from jdisagg.sched.scheduler import DecodeSpec, PrefillSpec, Scheduler


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Prefix:
    def __init__(self, first: int, tokens: int):
        self.first_token, self.first_logprob, self.held_tokens, self.nbytes = first, None, tokens, tokens * 8
        self.length = tokens


def _req(n: int, max_tokens: int = 8, output=()) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request([i + 1 for i in range(n)], params, output=list(output))


def test_a_prefill_process_hands_its_prefixes_off():
    s = Scheduler([PrefillSpec(4, 64, 64)], [], max_seq_len=512, eos_ids=(0,), clock=Clock())
    a, b = _req(10), _req(20, output=[5, 6])  # b: re-prefilled after a preemption (no new first token)
    got = {a.id: [], b.id: []}
    a.listener = lambda out: got[a.id].append(out)
    b.listener = lambda out: got[b.id].append(out)
    s.submit(a)
    s.submit(b)
    batch = s.take_prefill(0)
    assert batch.prompts == [a.prompt, b.prompt + [5]]
    s.prefilled(0, batch, [Prefix(11, 16), Prefix(21, 32)])
    assert [o.tokens for o in got[a.id]] == [[11]] and got[b.id] == []
    assert a.state is b.state is State.PREFILLED
    assert s.load().held_tokens == [48] and s.load().prefilled == [2]
    s.hand_off(a)  # a decode process pulled it
    assert s.load().held_tokens == [32] and a.finished and a.finish_reason is None
    assert len(got[a.id]) == 1  # no update: the request goes on elsewhere
    s.cancel(b)
    assert s.load().held_tokens == [0] and s.load().prefilled == [0] and s.idle()


def test_a_decode_process_pulls_prefixes_held_elsewhere():
    s = Scheduler([], [DecodeSpec(8, 16, 2)], max_seq_len=512, eos_ids=(0,), clock=Clock())
    reqs = [_req(20, max_tokens=3, output=[7]) for _ in range(3)]
    for r in reqs:
        s.hold(r, Prefix(7, 32))
    pulls = s.take_pulls(0)
    assert [p.request for p in pulls] == reqs[:2]  # two slots
    assert all(p.request.prefill_instance is None for p in pulls)
    s.pulled(0, pulls, 0.01)
    assert [r.state for r in reqs] == [State.RUNNING, State.RUNNING, State.PREFILLED]
    assert reqs[0].prefix is None and reqs[0].transfer_bytes == 256
    s.cancel(reqs[2])  # cancelled while waiting for a slot: out of the held list, nothing leaked
    assert not s.held and s.take_pulls(0) == []
    batch = s.take_step(0)
    s.sampled(0, batch, [[8], [8]], [[None], [None]])
    s.sampled(0, s.take_step(0), [[9], [9]], [[None], [None]])
    assert all(r.finished and r.output == [7, 8, 9] for r in reqs[:2])
    assert s.load().pages_used == [0] and s.idle()


def test_router_picks_least_loaded():
    loads = {"p0": router.PrefillLoad(100, 0), "p1": router.PrefillLoad(10, 50), "p2": router.PrefillLoad(0, 55)}
    assert router.pick_prefill(loads) == "p2"
    assert router.pick_prefill({}) is None
    d = {
        "d0": router.DecodeLoad(requests=3, free_pages=10, total_pages=100, page_size=16),
        "d1": router.DecodeLoad(requests=1, free_pages=5, total_pages=100, page_size=16),
        "d2": router.DecodeLoad(requests=1, free_pages=50, total_pages=100, page_size=16),
        "small": router.DecodeLoad(requests=0, free_pages=3, total_pages=3, page_size=16),
    }
    assert router.pick_decode(d, tokens=100) == "d2"  # fewest requests among those that fit; more free pages
    assert router.pick_decode(d, tokens=10) == "small"
    assert router.pick_decode(d, tokens=2000) is None


def test_leases_expire_on_the_clock():
    clock = Clock()
    leases = Leases(5.0, clock)
    leases.grant(1, "a")
    clock.now = 3.0
    leases.grant(2, "b")
    assert len(leases) == 2 and 1 in leases
    clock.now = 5.0
    assert [lease.holder for lease in leases.expire()] == ["a"]
    assert leases.release(2).holder == "b" and leases.release(2) is None
    assert len(leases) == 0 and leases.expired_total == 1 and leases.granted == 2
