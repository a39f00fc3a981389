"""Conversions between the scheduling core's values and the messages of the internal control
plane (``proto/internal.proto``) that the router and its instance processes exchange."""

from __future__ import annotations

from jdisagg.proto import internal_pb2 as ipb
from jdisagg.sched.params import Logprob, SamplingParams
from jdisagg.sched.request import Request

CONTROL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    # A peer that vanishes without closing its connection (a host gone) is noticed by pings.
    ("grpc.keepalive_time_ms", 2000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CONTROL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.min_time_between_pings_ms", 1000),
]


def sampling(p: SamplingParams) -> ipb.Sampling:
    """What an instance needs of a request's sampling (stop strings stay with the router,
    which holds the text)."""
    return ipb.Sampling(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
    )


def params(s: ipb.Sampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=s.seed,
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
    )


def logprob_msg(lp: Logprob | None) -> ipb.Logprob | None:
    if lp is None:
        return None
    return ipb.Logprob(logprob=lp.logprob, top_ids=[i for i, _ in lp.top], top_logprobs=[v for _, v in lp.top])


def logprob(msg: ipb.Logprob) -> Logprob:
    return Logprob(msg.logprob, tuple(zip(msg.top_ids, msg.top_logprobs, strict=True)))


def request(prompt, output, s: ipb.Sampling) -> Request:
    """An instance's own copy of a router's request (no text: the router holds it)."""
    return Request(list(prompt), params(s), output=list(output))
