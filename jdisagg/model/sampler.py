"""The sampler, traced into the programs: temperature, top-k and top-p per row.

Randomness is a pure function of (request seed, position of the sampled token), so a
request samples the same tokens whatever batch, instance or mesh it runs on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jdisagg.sched.params import MAX_LOGPROBS, Logprob, SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampled:
    """What a program samples for each row: tokens and log-probabilities under the model
    (before temperature and top-k/top-p)."""

    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32
    top_ids: jax.Array  # [B, MAX_LOGPROBS] int32
    top_logprobs: jax.Array  # [B, MAX_LOGPROBS] float32

    def at_step(self, k: int) -> Sampled:
        """Step ``k`` of a call of several steps (arrays [steps, B] -> [B])."""
        return Sampled(self.tokens[k], self.logprobs[k], self.top_ids[k], self.top_logprobs[k])

    def logprob(self, row: int, n: int) -> Logprob:
        """Row ``row`` (host arrays) with ``n`` alternatives."""
        top = tuple(
            (int(i), float(lp)) for i, lp in zip(self.top_ids[row, :n], self.top_logprobs[row, :n], strict=True)
        )
        return Logprob(float(self.logprobs[row]), top)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Per-row sampling parameters as arrays, one row per request in a batch."""

    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    seed: jax.Array  # [B] uint32
    alternatives: jax.Array  # [B] int32: top alternatives the row reports (SamplingParams.logprobs)

    @classmethod
    def of(cls, params: list[SamplingParams], batch: int) -> SamplingArrays:
        """Rows for ``params``, padded to ``batch`` rows of greedy."""
        pad = [SamplingParams()] * (batch - len(params))
        rows = list(params) + pad
        return cls(
            temperature=np.array([p.temperature for p in rows], np.float32),
            top_k=np.array([p.top_k for p in rows], np.int32),
            top_p=np.array([p.top_p for p in rows], np.float32),
            seed=np.array([p.seed for p in rows], np.uint32),
            alternatives=np.array([p.logprobs for p in rows], np.int32),
        )


def _draw(logits_bv: jax.Array, s: SamplingArrays, pos_b: jax.Array) -> jax.Array:
    """Temperature, top-k and top-p sampling; one key per row from (seed, position)."""
    scaled_bv = logits_bv / jnp.maximum(s.temperature, 1e-6)[:, None]
    order_bv = jnp.argsort(-scaled_bv, axis=-1)  # vocabulary sorted by descending logit
    sorted_bv = jnp.take_along_axis(scaled_bv, order_bv, axis=-1)
    rank_v = jnp.arange(logits_bv.shape[-1])
    keep = (s.top_k[:, None] <= 0) | (rank_v[None, :] < s.top_k[:, None])
    probs_bv = jax.nn.softmax(jnp.where(keep, sorted_bv, -jnp.inf), axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # nucleus: keep while mass before < p
    keep &= (mass_before_bv < s.top_p[:, None]) | (rank_v[None, :] == 0)
    masked_bv = jnp.where(keep, sorted_bv, -jnp.inf)

    def draw(seed, pos, row_v):
        return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), pos), row_v)

    choice_b = jax.vmap(draw)(s.seed, pos_b, masked_bv)
    return jnp.take_along_axis(order_bv, choice_b[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample(logits_bv: jax.Array, s: SamplingArrays, pos_b: jax.Array) -> Sampled:
    """Samples a token per row; ``pos_b`` is the position each sampled token will occupy."""
    logits_bv = logits_bv.astype(jnp.float32)
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    # The vocabulary sort is skipped at run time when every row is greedy.
    sampled_b = jax.lax.cond(jnp.any(s.temperature > 0), _draw, lambda *_: greedy_b, logits_bv, s, pos_b)
    tokens_b = jnp.where(s.temperature > 0, sampled_b, greedy_b)
    logprobs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    n = min(MAX_LOGPROBS, logits_bv.shape[-1])

    def top(logprobs_bv):
        values, ids = jax.lax.top_k(logprobs_bv, n)
        return values, ids.astype(jnp.int32)

    def none(logprobs_bv):  # no row reports alternatives: their slots stay zero
        b = logprobs_bv.shape[0]
        return jnp.zeros((b, n), jnp.float32), jnp.zeros((b, n), jnp.int32)

    # The top-k (a sort of the vocabulary on GPUs: 0.4-2 ms of a Llama-3-8B decode step on an
    # H200, BENCHMARKS.md) is skipped at run time when no row asks for alternatives.
    top_logprobs, top_ids = jax.lax.cond(jnp.any(s.alternatives > 0), top, none, logprobs_bv)
    chosen_b = jnp.take_along_axis(logprobs_bv, tokens_b[:, None], axis=-1)[:, 0]
    return Sampled(tokens_b, chosen_b, top_ids, top_logprobs)
