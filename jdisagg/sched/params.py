"""Sampling parameters of a request, as the host sees them (no jax here).

Every value is checked against the range the device programs can hold (int32 token ids and
top-k, uint32 seeds, float32 temperatures), so a request that passes never fails inside a
worker. Randomness is a pure function of (request seed, position of the sampled token), so a
request samples the same tokens whatever batch, instance or mesh it runs on; the sampler that
does it is ``jdisagg.model.sampler``.
"""

from __future__ import annotations

import dataclasses
import math

MAX_LOGPROBS = 20  # top alternatives every program computes; a request reports up to this many
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_STOP_STRINGS = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 64  # stop token ids per request


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
        if not 1 <= self.max_tokens <= INT32_MAX:
            problems.append(f"max_tokens must be in [1, {INT32_MAX}] (got {self.max_tokens})")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= FLOAT32_MAX):
            problems.append(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not 0 <= self.top_k <= INT32_MAX:
            problems.append(f"top_k must be in [0, {INT32_MAX}] (got {self.top_k})")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed must be in [0, 2**32) (got {self.seed})")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            problems.append(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids (got {len(self.stop_token_ids)})")
        if any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be in [0, {INT32_MAX}]")
        if len(self.stop) > MAX_STOP_STRINGS:
            problems.append(f"at most {MAX_STOP_STRINGS} stop strings (got {len(self.stop)})")
        if any(not s for s in self.stop):
            problems.append("a stop string must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            problems.append(f"a stop string has at most {MAX_STOP_CHARS} characters")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            problems.append(f"logprobs must be in [0, {MAX_LOGPROBS}] (got {self.logprobs})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass(frozen=True)
class Logprob:
    """A sampled token's log-probability and the top alternatives, on the host."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first
