"""The prefill program: prompts in, first tokens and the prompts' KV out.

One jitted function over the prefill mesh; weights sharded tensor-parallel by the
instance's rules. Prompts are padded to a length bucket and batched up to a token
budget, so the program has a few static shapes, all compiled at start-up.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from jdisagg import model, sharding
from jdisagg.attention import PromptKV, forward_layers
from jdisagg.config import ModelConfig
from jdisagg.platform import Program
from jdisagg.sampling import Logprob, SamplingArrays, SamplingParams, sample


def prefill_step(
    cfg: ModelConfig, params: dict, tokens_bt: jax.Array, lengths_b: jax.Array, s: SamplingArrays, *, unroll: bool
):
    """Returns the first sampled token of each prompt (``Sampled``, [B]) and the prompts' KV [L, B, T, K, H] x 2."""
    b, t = tokens_bt.shape
    steps_t = jnp.arange(t, dtype=jnp.int32)
    pos_bt = jnp.where(steps_t[None, :] < lengths_b[:, None], steps_t[None, :], -1)  # -1 marks padding
    x_btd = model.embed(cfg, params, tokens_bt, pos_bt)
    x_btd, kv = forward_layers(cfg, params["layers"], x_btd, pos_bt, PromptKV.empty(cfg, b, t), unroll=unroll)
    last_bd = x_btd[jnp.arange(b), jnp.maximum(lengths_b - 1, 0)]
    first = sample(model.logits(cfg, params, last_bd), s, lengths_b)
    return first, kv.k, kv.v


@dataclasses.dataclass
class Prefix:
    """One request's prefill result: its first token, and its KV kept on the prefill mesh
    (the queueing buffer) until a decode instance pulls it."""

    first_token: int
    first_logprob: Logprob  # the first token's log-probability and top alternatives
    length: int  # prompt tokens held in k and v
    k: jax.Array  # [L, T, K, H] on the prefill mesh; T is the length bucket
    v: jax.Array

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def length_buckets(max_len: int, page_size: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two (multiples of the page size) up to ``max_len``, which is always last."""
    out, n = [], max(smallest, page_size)
    while n < max_len:
        out.append(-(-n // page_size) * page_size)
        n *= 2
    out.append(-(-max_len // page_size) * page_size)
    return tuple(sorted(set(out)))


def powers_of_two(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch``."""
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    return (*out, max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class PrefillRunner:
    """Runs prefill batches on one mesh; owns its params and compiled programs."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        mesh: Mesh,
        rules,
        *,
        length_buckets: tuple[int, ...],
        max_batch: int,
        token_budget: int,
        batch_buckets: tuple[int, ...] = (),
        unroll: bool = False,
    ):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.length_buckets = length_buckets
        self.token_budget = token_budget
        # Batch 1 always: a prompt of a length bucket that no larger batch fits runs alone.
        self.batch_buckets = tuple(sorted({1, *(batch_buckets or powers_of_two(max_batch))}))
        kv_sharding = sharding.named_sharding(mesh, sharding.PROMPT_KV_AXES, rules)
        prefix_sharding = sharding.named_sharding(mesh, sharding.PREFIX_AXES, rules)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._step = jax.jit(
            functools.partial(prefill_step, cfg, unroll=unroll),
            out_shardings=(replicated, kv_sharding, kv_sharding),
        )
        # Splits a batch's KV into per-row prefixes, on the prefill mesh: every row of the
        # bucket (padding rows are dropped after), so it compiles once per shape, in warm-up.
        self._rows = jax.jit(
            lambda k, v: tuple((k[:, i], v[:, i]) for i in range(k.shape[1])),
            out_shardings=prefix_sharding,
        )

    def max_batch_for(self, length_bucket: int) -> int:
        """The most prompts of this bucket one call takes: the token budget, but at least one."""
        fits = [b for b in self.batch_buckets if b * length_bucket <= self.token_budget]
        return fits[-1] if fits else 1

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, length) bucket pair this runner can be called with."""
        return [(b, t) for t in self.length_buckets for b in self.batch_buckets if b <= self.max_batch_for(t)]

    def programs(self) -> list[Program]:
        """The step at every shape, for ``compile_all``."""
        return [
            Program(
                f"prefill B={b} T={t}", self._step, (self.params, *self._inputs([[0]] * b, [SamplingParams()] * b, t))
            )
            for b, t in self.shapes()
        ]

    def warm_up(self, progress=None) -> float:
        """Runs every shape once (compiling what ``compile_all`` has not); returns the seconds it took."""
        start = time.perf_counter()
        for b, t in self.shapes():
            self.run([[0]] * b, [SamplingParams()] * b, length_bucket=t)
            if progress:
                progress(f"prefill B={b} T={t}")
        seconds = time.perf_counter() - start
        logging.info("prefill: ran %d shapes in %.1fs", len(self.shapes()), seconds)
        return seconds

    def _inputs(self, prompts: list[list[int]], params: list[SamplingParams], length_bucket: int = 0):
        """The step's inputs: prompts padded to a bucket pair, their lengths, their sampling."""
        t = bucket_for(max(max(len(p) for p in prompts), length_bucket), self.length_buckets)
        b = bucket_for(len(prompts), self.batch_buckets)
        tokens_bt = np.zeros((b, t), np.int32)
        lengths_b = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens_bt[i, : len(p)] = p
            lengths_b[i] = len(p)
        return tokens_bt, lengths_b, SamplingArrays.of(params, b)

    def run(self, prompts: list[list[int]], params: list[SamplingParams], length_bucket: int = 0) -> list[Prefix]:
        """Prefills ``prompts`` in one call (they must fit one bucket pair); one Prefix per prompt."""
        first, k, v = self._step(self.params, *self._inputs(prompts, params, length_bucket))
        rows = self._rows(k, v)[: len(prompts)]
        first = jax.device_get(first)
        return [
            Prefix(int(first.tokens[i]), first.logprob(i, sp.logprobs), len(p), *rows[i])
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
