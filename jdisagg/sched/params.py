"""Sampling parameters of a request, as the host sees them (no jax here).

Randomness is a pure function of (request seed, position of the sampled token), so a
request samples the same tokens whatever batch, instance or mesh it runs on; the sampler
that does it is ``jdisagg.model.sampler``.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. ``temperature == 0`` is greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenized output
    ignore_eos: bool = False
    logprobs: int = 0  # report each token's log-probability and this many top alternatives

    def __post_init__(self):
        problems = []
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must be in [0, 2**32) (got {self.seed})")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append("stop_token_ids must be >= 0")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            problems.append(f"logprobs must be in [0, {MAX_LOGPROBS}] (got {self.logprobs})")
        if problems:
            raise ValueError("; ".join(problems))


MAX_LOGPROBS = 20  # top alternatives every program computes; a request reports up to this many


@dataclasses.dataclass(frozen=True)
class Logprob:
    """A sampled token's log-probability and the top alternatives, on the host."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first
