"""The prefill program: prompts in, first tokens and the prompts' KV out.

One jitted function over the prefill mesh; weights sharded tensor-parallel by the
instance's rules. The prompts of a call are packed end to end into one row of N tokens
(N a compiled token bucket), each attending only to its own earlier tokens, so a call
computes the prompts' tokens and little padding (padding each prompt to the batch's
longest bucket cost far more; BENCHMARKS.md). After the call each prompt's KV is cut out
of the row at its length bucket (its prefix).
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

from jdisagg.model import attention, axes, decoder, host_loop, sharding
from jdisagg.model.attention import PromptKV
from jdisagg.model.config import ModelConfig
from jdisagg.model.decoder import forward_layers
from jdisagg.model.sampler import SamplingArrays, sample
from jdisagg.runtime.buckets import bucket_for, token_buckets
from jdisagg.runtime.compile import XLA_OPTIONS, Jitted, Program
from jdisagg.sched.params import Logprob, SamplingParams


def prefill_step(
    cfg: ModelConfig,
    params: dict,
    tokens_1n: jax.Array,
    pos_1n: jax.Array,
    segment_1n: jax.Array,
    last_s: jax.Array,
    s: SamplingArrays,
    *,
    unroll: bool,
    kernel: attention.HeadSplit | None = None,
):
    """Prefills prompts packed into one row: token i is at position ``pos_1n[0, i]`` of prompt
    ``segment_1n[0, i]`` (padding: position -1). ``last_s`` indexes each prompt's last token
    (S rows, padding rows index 0). Returns the first sampled token of each prompt
    (``Sampled``, [S]) and the row's KV [L, 1, N, K, H] x 2. ``kernel``: attention by the
    flash kernel, run per device so (``attention.prompt_kernel``); None: einsums."""
    x_1nd, empty = prefill_embed(cfg, params, tokens_1n, pos_1n, segment_1n, kernel=kernel)
    x_1nd, kv = forward_layers(cfg, params["layers"], x_1nd, pos_1n, empty, unroll=unroll)
    return prefill_head(cfg, params, x_1nd, pos_1n, last_s, s), kv.k, kv.v


def prefill_embed(cfg: ModelConfig, params, tokens_1n, pos_1n, segment_1n, *, kernel: attention.HeadSplit | None):
    """The row embedded, and the empty cache its layers fill."""
    x_1nd = decoder.embed(cfg, params, tokens_1n, pos_1n)
    return x_1nd, PromptKV.empty(cfg, 1, tokens_1n.shape[1], segment_1n, kernel=kernel)


def prefill_layer(cfg: ModelConfig, layer, kv: PromptKV, x_1nd, pos_1n, index):
    """One layer of the prefill step (the host loop's program; ``layer`` output-major, see
    ``host_loop``)."""
    layer, dot = decoder.input_major(layer), host_loop.rows_dot_general
    return decoder.layer_step(cfg, layer, x_1nd, pos_1n, kv, index, dot)


def prefill_head(cfg: ModelConfig, params, x_1nd, pos_1n, last_s, s: SamplingArrays):
    """Each prompt's first token, sampled from its last position."""
    return sample(decoder.logits(cfg, params, x_1nd[0, last_s]), s, pos_1n[0, last_s] + 1)


class HostPrefillStep:
    """``prefill_step`` (same arguments and results) with the layer loop run from the host
    (``jdisagg.model.host_loop``): an embed program, one program per layer, and
    ``host_loop.head`` over each prompt's last row, which the host picks out: one head
    program for every token bucket."""

    def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh, kv_sharding, *, kernel: attention.HeadSplit | None):
        self.layers = host_loop.shared_layers(params, mesh)
        self.head_params = host_loop.shared_head(params)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # The row's KV where prefill_step puts it, so the prefix cuts compile once for both.
        out = (self.replicated, PromptKV(kv_sharding, kv_sharding, self.replicated, kernel))
        self.embed = Jitted(
            functools.partial(prefill_embed, cfg, kernel=kernel), out_shardings=out, compiler_options=XLA_OPTIONS
        )
        self.layer = Jitted(
            functools.partial(prefill_layer, cfg), donate_argnums=1, out_shardings=out, compiler_options=XLA_OPTIONS
        )
        self.head = Jitted(functools.partial(host_loop.head, cfg), compiler_options=XLA_OPTIONS)

    def __call__(self, params, tokens_1n, pos_1n, segment_1n, last_s, s):
        tokens_1n, pos_1n_dev = jax.device_put((tokens_1n, pos_1n), self.replicated)  # once, not per layer
        x_1nd, kv = self.embed(params, tokens_1n, pos_1n_dev, segment_1n)
        x_1nd, kv = host_loop.run_layers(self.layer, self.layers, kv, x_1nd, pos_1n_dev)
        x_s1d, pos_s = self._last_rows(x_1nd, pos_1n, last_s)
        sampled = jax.device_get(self.head(self.head_params, x_s1d, s, pos_s))  # [1, S] on the host
        return jax.tree_util.tree_map(lambda a: a[0], sampled), kv.k, kv.v

    def _last_rows(self, x_1nd, pos_1n, last_s):
        """Each prompt's last hidden state [S, 1, D] and position [S], picked on the host
        (where a CPU device's arrays are): a program per token bucket otherwise."""
        last_s = np.asarray(last_s)
        rows = np.asarray(x_1nd)[0, last_s][:, None]
        return jax.device_put((rows, np.asarray(pos_1n)[0, last_s]), self.replicated)

    def programs(self, label: str, params, tokens_1n, pos_1n, segment_1n, last_s, s, *, head: bool) -> list[Program]:
        # Placed as ``__call__`` places them, so the calls find these programs.
        tokens_1n, pos_1n = host_loop.placed(self.replicated, tokens_1n, pos_1n)
        x_1nd, kv = self.embed.eval_shape(params, tokens_1n, pos_1n, segment_1n)
        out = [
            Program(f"{label} embed", self.embed, (params, tokens_1n, pos_1n, segment_1n)),
            Program(f"{label} layer", self.layer, (self.layers[0], kv, x_1nd, pos_1n, np.int32(0))),
        ]
        if head:  # the head's shapes are the same at every token bucket
            x_s1d = jax.ShapeDtypeStruct((len(last_s), 1, x_1nd.shape[-1]), x_1nd.dtype, sharding=self.replicated)
            pos_s = jax.ShapeDtypeStruct((len(last_s),), pos_1n.dtype, sharding=self.replicated)
            out.append(Program("prefill head", self.head, (self.head_params, x_s1d, s, pos_s)))
        return out


def cut_prefix(k: jax.Array, v: jax.Array, start: jax.Array, *, length: int):
    """Tokens ``start .. start + length`` of a packed row's KV [L, 1, N, K, H], as one
    prefix [L, length, K, H]; positions past the row read zeros."""
    index = start + jnp.arange(length, dtype=jnp.int32)

    def cut(x):
        return jnp.take(x[:, 0], index, axis=1, mode="fill", fill_value=0)

    return cut(k), cut(v)


@dataclasses.dataclass
class Prefix:
    """One request's prefill result: its first token, and its KV kept on the prefill mesh
    (the queueing buffer) until a decode instance pulls it."""

    first_token: int
    first_logprob: Logprob  # the first token's log-probability and top alternatives
    length: int  # prompt tokens held in k and v
    held_tokens: int  # positions k and v hold (the length bucket, T): what the prefill buffer counts
    k: jax.Array  # [L, T, K, H] on the prefill mesh
    v: jax.Array
    nbytes: int  # bytes of k and v together


class PrefillRunner:
    """Runs prefill calls on one mesh; owns its params and compiled programs.

    A call packs up to ``max_prompts`` prompts of at most ``token_budget`` tokens together
    (a longer prompt runs alone) into a row of one of ``token_buckets``; one program per
    bucket. Each prompt's prefix KV is cut to its ``length_buckets`` entry, the shapes the
    transfer and the decode side compile for.
    """

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
        unroll: bool = False,
    ):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.length_buckets = length_buckets
        self.token_budget = token_budget
        self.token_buckets = token_buckets(length_buckets, token_budget)
        # Every prompt holds at least the smallest bucket of prefix, so more than this many
        # cannot fit the budget's worth of prefix buffer anyway.
        self.max_prompts = max(1, min(max_batch, token_budget // length_buckets[0]))
        kv_sharding = sharding.named_sharding(mesh, axes.PROMPT_KV_AXES, rules)
        prefix_sharding = sharding.named_sharding(mesh, axes.PREFIX_AXES, rules)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        kernel = attention.prompt_kernel(attention.head_split(mesh, rules))
        # One device on CPU: the layer loop runs from the host (jdisagg.model.host_loop).
        self.host_loop = host_loop.on_host(mesh)
        if self.host_loop:
            self._step = HostPrefillStep(cfg, params, mesh, kv_sharding, kernel=kernel)
        else:
            self._step = Jitted(
                functools.partial(prefill_step, cfg, unroll=unroll, kernel=kernel),
                out_shardings=(replicated, kv_sharding, kv_sharding),
                compiler_options=XLA_OPTIONS,
            )
        self.kv_sharding = kv_sharding
        # One small program per (row bucket, prefix bucket), compiled in warm-up.
        self._cut = jax.jit(cut_prefix, static_argnames="length", out_shardings=(prefix_sharding, prefix_sharding))
        self.prefix_sharding = prefix_sharding

    def call_tokens(self) -> int:
        """A bound on the prefix tokens one call yields (each prompt's KV is cut to its length
        bucket, at most ``ratio`` x its length, where ``ratio`` is the largest step between
        buckets, and at least the smallest bucket): what a caller keeps room for."""
        b = self.length_buckets
        ratio = max([-(-hi // lo) for lo, hi in zip(b, b[1:], strict=False)] or [1])
        return self.max_prompts * b[0] + ratio * self.token_buckets[-1]

    def programs(self) -> list[Program]:
        """The step at every token bucket, for ``compile_all``."""
        out = []
        for n in self.token_buckets:
            args = (self.params, *self._inputs([[0]], [SamplingParams()], n))
            out += (
                self._step.programs(f"prefill N={n}", *args, head=n == self.token_buckets[0])
                if self.host_loop
                else [Program(f"prefill N={n}", self._step, args)]
            )
        return out

    def warm_up(self, progress=None) -> float:
        """Compiles the cut of every prefix bucket out of each token bucket's row (the steps
        themselves are ``programs``, which ``compile_all`` compiles), from the shapes alone:
        running the rows cost a CPU start-up seconds of prefill. Returns the seconds it took."""
        start = time.perf_counter()
        cfg = self.cfg
        for n in self.token_buckets:
            shape = (cfg.n_layers, 1, n, cfg.n_kv_heads, cfg.head_dim)
            row = jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype), sharding=self.kv_sharding)
            for t in self.length_buckets:
                if t <= n and not self.host_loop:
                    self._cut.lower(row, row, np.int32(0), length=t).compile()
            if progress:
                progress(f"prefill N={n}")
        seconds = time.perf_counter() - start
        logging.info("prefill: compiled the prefix cuts of %d token buckets in %.1fs", len(self.token_buckets), seconds)
        return seconds

    def cut(self, k: jax.Array, v: jax.Array, start: int, length: int) -> tuple[jax.Array, jax.Array]:
        """``cut_prefix``: a program per (token bucket, length bucket) pair, or with the host
        loop a copy on the host (where a CPU device's arrays are), which needs none of the
        dozens of programs (5 s of a CPU server's cold start)."""
        if not self.host_loop:
            return self._cut(k, v, np.int32(start), length=length)

        def cut(x):
            row = np.asarray(x)[:, 0, start : start + length]
            pad = [(0, 0), (0, length - row.shape[1])] + [(0, 0)] * (row.ndim - 2)
            return jax.device_put(np.pad(row, pad), self.prefix_sharding)

        return cut(k), cut(v)

    def _inputs(self, prompts: list[list[int]], params: list[SamplingParams], tokens: int = 0):
        """The step's inputs: ``prompts`` packed into a row of a token bucket (at least
        ``tokens``), their positions, segments, last tokens and sampling."""
        if len(prompts) > self.max_prompts:
            raise ValueError(f"{len(prompts)} prompts in one prefill call; at most {self.max_prompts}")
        n = bucket_for(max(sum(len(p) for p in prompts), tokens), self.token_buckets)
        tokens_1n = np.zeros((1, n), np.int32)
        pos_1n = np.full((1, n), -1, np.int32)
        segment_1n = np.full((1, n), -1, np.int32)
        last_s = np.zeros((self.max_prompts,), np.int32)
        start = 0
        for i, p in enumerate(prompts):
            end = start + len(p)
            tokens_1n[0, start:end] = p
            pos_1n[0, start:end] = np.arange(len(p))
            segment_1n[0, start:end] = i
            last_s[i] = end - 1
            start = end
        return tokens_1n, pos_1n, segment_1n, last_s, SamplingArrays.of(params, self.max_prompts)

    def blank_prefix(self, tokens: int) -> Prefix:
        """A prefix of zeros ``tokens`` positions long (a length bucket), placed where a cut
        puts a real one: moving it compiles what moving a real one does, with no prefill run."""
        cfg = self.cfg
        shape = (cfg.n_layers, tokens, cfg.n_kv_heads, cfg.head_dim)
        k, v = (jax.device_put(np.zeros(shape, jnp.dtype(cfg.dtype)), self.prefix_sharding) for _ in range(2))
        return Prefix(0, None, tokens, tokens, k, v, k.nbytes + v.nbytes)

    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Prefix]:
        """Prefills ``prompts`` in one call (they must fit it: ``max_prompts``, and the token
        budget unless alone); one Prefix per prompt."""
        first, k, v = self._step(self.params, *self._inputs(prompts, params))
        prefixes, start = [], 0
        for p in prompts:
            t = bucket_for(len(p), self.length_buckets)
            prefixes.append(self.cut(k, v, start, t))
            start += len(p)
        first = jax.device_get(first)
        return [
            Prefix(
                int(first.tokens[i]),
                first.logprob(i, sp.logprobs),
                len(p),
                prefixes[i][0].shape[1],
                *prefixes[i],
                prefixes[i][0].nbytes + prefixes[i][1].nbytes,
            )
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
