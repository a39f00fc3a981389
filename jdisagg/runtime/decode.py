"""The decode program: tokens for every request in a batch, over a paged KV cache.

The stacked layer axis is sharded over ``pp`` (each stage's devices hold only their
layers and their layers' pages) and heads over ``tp``. The batch is split into
``micro_batches``; the stages run as a pipeline over them: at tick ``t`` stage ``s``
works on the unit that entered stage 0 at tick ``t - s``, so all stages are busy once the
pipeline is full.

One call runs ``steps`` decode steps (the preset's ``steps_per_call``): the token a
micro-batch samples is fed back to stage 0 on the device, so while stage s works on
micro-batch m, stage s + 1 works on m - 1, and a pipeline of S stages fills and drains
once per call, not once per step: a call of K steps over M >= S micro-batches takes
K * M + S - 1 ticks where K calls of one step take K * (M + S - 1). With M = S each device
reads its layers' weights M times per step on micro-batches of B / M rows, so a pp = S
instance in steady state decodes S times the rows of one device at about one device's step
time: the throughput of S replicas, from one pool of pages.

Why this design and not stage programs that keep activations in flight between calls: the
scheduler's verbs stay one call in, one result out (``take_step`` -> ``DecodeRunner.step``
-> ``sampled``), the sampled tokens still come back with one device-to-host copy per call,
and no call ever holds the half-finished work of rows the scheduler may have ended or
preempted since. The price, paid in ``jdisagg.sched``: a call produces up to K tokens per
row, so pages are held for K tokens ahead and stops (EOS, stop tokens, stop strings, length)
are found after the call, the tokens past a stop dropped; streams receive K tokens at a time,
and new requests join between calls. Each row's ``count`` (at most K, fewer near its
``max_tokens`` or ``max_seq_len``) makes its steps past that write the null page.

The pipeline is written without collectives: the stage axis is an ordinary array axis
that ``vmap`` maps the stage function over, and sharding that axis over ``pp`` makes
each stage run on its own devices (XLA turns the hand-over between stages, a roll of the
stage axis, into a collective permute). With ``pp == 1`` and one step it is a plain
forward pass. Sampling draws from (seed, position), so a request samples the same tokens
whatever the number of stages, micro-batches or steps per call.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.model import attention, axes, decoder, host_loop, sharding
from jdisagg.model.attention import NULL_PAGE, MixedKV, PagedKV
from jdisagg.model.config import ModelConfig
from jdisagg.model.decoder import forward_layers
from jdisagg.model.sampler import Sampled, SamplingArrays, sample
from jdisagg.runtime.buckets import bucket_for, powers_of_two
from jdisagg.runtime.compile import XLA_OPTIONS, Jitted, Program
from jdisagg.sched.pages import pages_for
from jdisagg.sched.params import SamplingParams


def _split_stages(tree, stages: int):
    """[L, ...] leaves -> [stages, L / stages, ...]."""
    return jax.tree_util.tree_map(lambda a: a.reshape(stages, a.shape[0] // stages, *a.shape[1:]), tree)


def _merge_stages(tree):
    return jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), tree)


def pipeline(
    cfg: ModelConfig,
    params: dict,
    kv: PagedKV,
    tokens_b,
    pos_b,
    count_b,
    s: SamplingArrays,
    *,
    stages: int,
    micro: int,
    steps: int,
    stage_sharding,
    unroll: bool,
) -> tuple[Sampled, PagedKV]:
    """``steps`` decode steps over the batch as a ``stages``-deep pipeline of ``micro``
    micro-batches, each micro-batch's sampled tokens fed back on the device.

    A unit of work is (step k, micro-batch m); it enters stage 0 at tick ``k * period + m``
    (``period = max(micro, stages)``), so it enters after (k - 1, m) has left the last stage
    and been sampled. Returns ``Sampled`` [steps, B] and the updated cache.
    """
    b = tokens_b.shape[0]
    mb = b // micro
    period = max(micro, stages)
    layers_s = _split_stages(params["layers"], stages)
    pages_s = _split_stages((kv.k_pages, kv.v_pages), stages)

    def by_micro(a):  # [B, ...] -> [micro, B / micro, ...]
        return a.reshape(micro, mb, *a.shape[1:])

    pos_m, count_m, table_m = by_micro(pos_b), by_micro(count_b), by_micro(kv.page_table)
    s_m = jax.tree_util.tree_map(by_micro, s)
    stage_ids = jnp.arange(stages)
    constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=stage_sharding)

    def unit(entered):
        """The (step, micro-batch) that entered stage 0 at tick ``entered``, and whether one did."""
        k, m = entered // period, entered % period
        real = (entered >= 0) & (m < micro) & (k < steps)
        return jnp.clip(k, 0, steps - 1), jnp.clip(m, 0, micro - 1), real

    def positions(k, m, real):
        """[..., mb] where step k of micro-batch m writes; -1 (the null page) for idle stages,
        empty rows and rows past their count."""
        pos = pos_m[m]
        live = real[..., None] & (pos >= 0) & (k[..., None] < count_m[m])
        return jnp.where(live, pos + k[..., None], -1)

    def sample_m(x_bd, k, m):
        return sample(decoder.logits(cfg, params, x_bd), jax.tree_util.tree_map(lambda a: a[m], s_m), pos_m[m] + k + 1)

    def stage(layers, k_pages, v_pages, table, x, pos):
        stage_kv = kv.replace(k_pages=k_pages, v_pages=v_pages, page_table=table)
        x, stage_kv = forward_layers(cfg, layers, x, pos, stage_kv, unroll=unroll)
        return x, stage_kv.k_pages, stage_kv.v_pages

    def tick(carry, t):
        state_s, last_m, out, (k_s, v_s) = carry
        k, m, real = unit(t - stage_ids)  # [stages]: the unit each stage works on at this tick
        pos_s = positions(k, m, real)
        # Stage 0 takes its micro-batch's latest tokens; stage s takes what stage s - 1 produced.
        x_0 = decoder.embed(cfg, params, last_m[m[0]][:, None], pos_s[0][:, None])
        in_s = jnp.roll(state_s, 1, axis=0).at[0].set(x_0)
        # The stage axis on its mesh axis, for kernels that run per device (attention.HeadSplit).
        staged = jax.vmap(stage, spmd_axis_name=stage_sharding.spec[0] if stages > 1 else None)
        state_s, k_s, v_s = staged(layers_s, k_s, v_s, table_m[m], constrain(in_s), pos_s[..., None])
        state_s = constrain(state_s)
        # The unit leaving the last stage: sample its next tokens, to feed them back.
        k_out, m_out, done = k[-1], m[-1], real[-1]
        new = sample_m(state_s[-1][:, 0], k_out, m_out)
        last_m = last_m.at[m_out].set(jnp.where(done, new.tokens, last_m[m_out]))
        out = jax.tree_util.tree_map(lambda o, n: o.at[k_out, m_out].set(jnp.where(done, n, o[k_out, m_out])), out, new)
        return (state_s, last_m, out, (k_s, v_s)), None

    state_s = jnp.zeros((stages, mb, 1, cfg.dim), cfg.dtype)
    one = jax.eval_shape(sample_m, jax.ShapeDtypeStruct((mb, cfg.dim), cfg.dtype), 0, 0)
    out = jax.tree_util.tree_map(lambda a: jnp.zeros((steps, micro, *a.shape), a.dtype), one)
    carry = (state_s, by_micro(tokens_b), out, pages_s)
    ticks = (steps - 1) * period + micro + stages - 1
    (_, _, out, (k_s, v_s)), _ = jax.lax.scan(tick, carry, jnp.arange(ticks))
    out = jax.tree_util.tree_map(lambda a: a.reshape(steps, b, *a.shape[3:]), out)
    return out, kv.replace(k_pages=_merge_stages(k_s), v_pages=_merge_stages(v_s))


def decode_embed(cfg: ModelConfig, params, tokens_b, pos_b):
    """[B, 1, D]: each request's last token, embedded."""
    return decoder.embed(cfg, params, tokens_b[:, None], pos_b[:, None])


def decode_layer(cfg: ModelConfig, decode_attention: str, layer, pages, x_btd, pos_b, page_table_bp, index):
    """One layer of the decode step (the host loop's program; ``layer`` output-major, see
    ``host_loop``). Only ``pages`` (the k and v pools) is donated: the page table is the
    caller's and every layer reads it."""
    kv = PagedKV(*pages, page_table_bp, host_loop.decode_attention(decode_attention))
    layer, dot = decoder.input_major(layer), host_loop.rows_dot_general
    x_btd, kv = decoder.layer_step(cfg, layer, x_btd, pos_b[:, None], kv, index, dot)
    return x_btd, (kv.k_pages, kv.v_pages)


def decode_head(cfg: ModelConfig, params, x_btd, s: SamplingArrays, pos_b) -> Sampled:
    """What one step samples, as a call of one step: ``Sampled`` [1, B]."""
    sampled = sample(decoder.logits(cfg, params, x_btd[:, 0]), s, pos_b + 1)
    return jax.tree_util.tree_map(lambda a: a[None], sampled)


def decode_step(
    cfg: ModelConfig,
    params,
    k_pages,
    v_pages,
    tokens_b,
    pos_b,
    page_table_bp,
    count_b,
    s: SamplingArrays,
    *,
    stages: int,
    micro: int,
    steps: int,
    stage_sharding,
    unroll: bool,
    decode_attention: str = "dot",
    heads: attention.HeadSplit | None = attention.ONE_DEVICE,
):
    """``steps`` decode steps: feeds each request's last token (at ``pos_b``; -1 for an empty
    row), samples the next and feeds that back, on the device. Row b takes ``count_b[b]`` of
    the steps (its page table holds their positions); its later steps write the null page.

    Returns what was sampled (``Sampled``, [steps, B]) and the updated page pools.
    """
    kv = PagedKV(k_pages, v_pages, page_table_bp, decode_attention, heads)
    if stages == 1 and micro == 1 and steps == 1:
        x_btd = decode_embed(cfg, params, tokens_b, pos_b)
        x_btd, kv = forward_layers(cfg, params["layers"], x_btd, pos_b[:, None], kv, unroll=unroll)
        return decode_head(cfg, params, x_btd, s, pos_b), kv.k_pages, kv.v_pages
    sampled, kv = pipeline(
        cfg,
        params,
        kv,
        tokens_b,
        pos_b,
        count_b,
        s,
        stages=stages,
        micro=micro,
        steps=steps,
        stage_sharding=stage_sharding,
        unroll=unroll,
    )
    return sampled, kv.k_pages, kv.v_pages


class HostDecodeStep:
    """``decode_step`` of one step (same arguments and results) with the layer loop run from
    the host (``jdisagg.model.host_loop``): an embed program, one program per layer, a head program."""

    def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh, decode_attention: str):
        self.layers = host_loop.shared_layers(params, mesh)
        self.head_params = host_loop.shared_head(params)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.embed = Jitted(functools.partial(decode_embed, cfg), compiler_options=XLA_OPTIONS)
        self.layer = Jitted(
            functools.partial(decode_layer, cfg, decode_attention), donate_argnums=1, compiler_options=XLA_OPTIONS
        )
        self.head = Jitted(functools.partial(host_loop.head, cfg), compiler_options=XLA_OPTIONS)

    def __call__(self, params, k_pages, v_pages, tokens_b, pos_b, page_table_bp, count_b, s):
        del count_b  # one step: every row takes it
        # On the device once, not once per layer call.
        tokens_b, pos_b, page_table_bp = jax.device_put((tokens_b, pos_b, page_table_bp), self.replicated)
        x_btd = self.embed(params, tokens_b, pos_b)
        x_btd, (k_pages, v_pages) = host_loop.run_layers(
            self.layer, self.layers, (k_pages, v_pages), x_btd, pos_b, page_table_bp
        )
        return self.head(self.head_params, x_btd, s, pos_b), k_pages, v_pages

    def programs(self, label: str, params, k_pages, v_pages, tokens_b, pos_b, page_table_bp, count_b, s, *, head: bool):
        """The layer program (and with ``head`` the embed and head programs) at these shapes,
        the inputs placed as ``__call__`` places them (so its calls find these programs)."""
        tokens_b, pos_b, page_table_bp = host_loop.placed(self.replicated, tokens_b, pos_b, page_table_bp)
        x_btd = self.embed.eval_shape(params, tokens_b, pos_b)
        x_btd = jax.ShapeDtypeStruct(x_btd.shape, x_btd.dtype, sharding=self.replicated)
        layer_args = (self.layers[0], (k_pages, v_pages), x_btd, pos_b, page_table_bp, np.int32(0))
        out = [Program(f"{label} layer", self.layer, layer_args)]
        if head:
            out.append(Program(f"{label} embed", self.embed, (params, tokens_b, pos_b)))
            out.append(Program(f"{label} head", self.head, (self.head_params, x_btd, s, pos_b)))
        return out


def mixed_step(
    cfg: ModelConfig,
    params,
    k_pages,
    v_pages,
    tokens_b,
    pos_b,
    page_table_bp,
    chunk_c,
    chunk_pos_c,
    chunk_table_1p,
    chunk_last,
    s: SamplingArrays,
    *,
    unroll: bool,
    decode_attention: str = "dot",
    heads: attention.HeadSplit | None = attention.ONE_DEVICE,
):
    """Chunked prefill: a decode step for B requests plus a C-token chunk of one prompt.

    ``chunk_pos_c`` is -1 past the chunk's real tokens; ``chunk_last`` indexes its last real
    token. Samples B + 1 rows: one per decode request, then the token after the chunk.
    """
    b = tokens_b.shape[0]
    tokens_1t = jnp.concatenate([tokens_b, chunk_c])[None]
    pos_1t = jnp.concatenate([pos_b, chunk_pos_c])[None]
    x_1td = decoder.embed(cfg, params, tokens_1t, pos_1t)
    kv = MixedKV(k_pages, v_pages, page_table_bp, chunk_table_1p, decode_attention, heads)
    x_1td, kv = forward_layers(cfg, params["layers"], x_1td, pos_1t, kv, unroll=unroll)
    last_bd = jnp.concatenate([x_1td[0, :b], x_1td[0, b + chunk_last][None]])
    next_pos = jnp.concatenate([pos_b + 1, chunk_pos_c[chunk_last][None] + 1])
    return sample(decoder.logits(cfg, params, last_bd), s, next_pos), kv.k_pages, kv.v_pages


def insert_prefix(k_pages, v_pages, k_ltkh, v_ltkh, page_ids):
    """Writes a prefix [L, T, K, H] into pages ``page_ids`` [T / Z] (NULL_PAGE past its end)."""
    l, t, kh, h = k_ltkh.shape
    z = k_pages.shape[2]
    k_pages = k_pages.at[:, page_ids].set(k_ltkh.reshape(l, t // z, z, kh, h))
    v_pages = v_pages.at[:, page_ids].set(v_ltkh.reshape(l, t // z, z, kh, h))
    return k_pages, v_pages


class DecodeRunner:
    """Owns one decode instance's params, page pools and compiled programs."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        mesh: Mesh,
        rules,
        *,
        max_batch: int,
        n_pages: int,
        page_size: int,
        max_seq_len: int,
        micro_batches: int,
        chunk_tokens: int = 0,
        batch_buckets: tuple[int, ...] = (),
        unroll: bool = False,
        decode_attention: str = "dot",
        steps: int = 1,
    ):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.steps = steps  # decode steps per call (the preset's steps_per_call)
        self.chunk_tokens = chunk_tokens  # > 0: this instance also prefills, in chunks of this size
        self.page_size, self.n_pages = page_size, n_pages
        self.max_pages_per_seq = pages_for(max_seq_len, page_size)
        stages = mesh.shape["pp"] if rules.get(axes.LAYERS) == "pp" else 1
        # One device on CPU: the layer loop runs from the host (jdisagg.model.host_loop).
        self.host_loop = host_loop.on_host(mesh) and stages == 1 and micro_batches == 1 and steps == 1
        # Page-table widths: with "dot" a step gathers only as many pages per request as its
        # longest context needs, rounded up to one of these (x2 apart from 16 pages). The
        # Pallas kernel reads each request's pages up to its own length whatever the table's
        # width, and the host loop's "blocks" as many as the longest context fills, so one
        # width does (a quarter of the programs to compile on a 2048-token preset).
        widths, w = [], 16
        while w < self.max_pages_per_seq and decode_attention == "dot" and not self.host_loop:
            widths.append(w)
            w *= 2
        self.width_buckets = (*widths, self.max_pages_per_seq)
        self.stages, self.micro = stages, micro_batches
        buckets = tuple(batch_buckets) or powers_of_two(max_batch)
        self.batch_buckets = tuple(sorted({-(-b // micro_batches) * micro_batches for b in buckets}))
        self.pages_sharding = sharding.named_sharding(mesh, axes.PAGES_AXES, rules)
        # Where a prefix must land to be inserted: the destination sharding for KV transfer.
        self.prefix_sharding = sharding.named_sharding(mesh, axes.PREFIX_AXES, rules)
        stage_sharding = NamedSharding(mesh, PartitionSpec(rules.get(axes.LAYERS)))
        shape = (cfg.n_layers, n_pages, page_size, cfg.n_kv_heads, cfg.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, cfg.dtype), out_shardings=self.pages_sharding)
        self.k_pages, self.v_pages = zeros(), zeros()
        replicated = NamedSharding(mesh, PartitionSpec())
        heads = attention.head_split(mesh, rules)  # how a kernel runs on these devices
        if self.host_loop:
            self._step = HostDecodeStep(cfg, params, mesh, decode_attention)
        else:
            self._step = Jitted(
                functools.partial(
                    decode_step,
                    cfg,
                    stages=stages,
                    micro=micro_batches,
                    steps=steps,
                    stage_sharding=stage_sharding,
                    unroll=unroll,
                    decode_attention=decode_attention,
                    heads=heads,
                ),
                donate_argnums=(1, 2),
                out_shardings=(replicated, self.pages_sharding, self.pages_sharding),
                compiler_options=XLA_OPTIONS,
            )
        self._insert = jax.jit(insert_prefix, donate_argnums=(0, 1), out_shardings=(self.pages_sharding,) * 2)
        self._mixed = Jitted(
            functools.partial(mixed_step, cfg, unroll=unroll, decode_attention=decode_attention, heads=heads),
            donate_argnums=(1, 2),
            out_shardings=(replicated, self.pages_sharding, self.pages_sharding),
            compiler_options=XLA_OPTIONS,
        )

    def insert(self, k_ltkh: jax.Array, v_ltkh: jax.Array, pages: list[int]) -> None:
        """Writes a transferred prefix into ``pages`` (its first ``len(pages)`` pages' worth)."""
        ids = np.full((k_ltkh.shape[1] // self.page_size,), NULL_PAGE, np.int32)
        ids[: len(pages)] = pages[: len(ids)]
        self.k_pages, self.v_pages = self._insert(self.k_pages, self.v_pages, k_ltkh, v_ltkh, ids)

    def step(
        self,
        tokens: list[int],
        positions: list[int],
        page_tables: list[list[int]],
        params: list[SamplingParams],
        counts: list[int] | None = None,
    ) -> Sampled:
        """One call of ``self.steps`` decode steps for ``len(tokens)`` requests, request i
        taking ``counts[i]`` of them (default: all; its page table covers their positions).
        Returns what they sampled: host arrays [steps, batch bucket]."""
        inputs = self._step_inputs(tokens, positions, page_tables, params, counts)
        sampled, self.k_pages, self.v_pages = self._step(self.params, self.k_pages, self.v_pages, *inputs)
        return jax.device_get(sampled)  # the call's one device-to-host copy

    def _step_inputs(self, tokens, positions, page_tables, params, counts=None):
        tokens_b, pos_b, table_bp = self._rows(tokens, positions, page_tables)
        count_b = np.zeros_like(tokens_b)
        count_b[: len(tokens)] = self.steps if counts is None else counts
        return tokens_b, pos_b, table_bp, count_b, SamplingArrays.of(params, len(tokens_b))

    def _rows(self, tokens, positions, page_tables, min_width: int = 1):
        """Batch inputs padded to a batch bucket and a page-table width bucket."""
        n = len(tokens)
        b = bucket_for(max(n, 1), self.batch_buckets)
        width = bucket_for(max([min_width, *map(len, page_tables)]), self.width_buckets)
        tokens_b = np.zeros((b,), np.int32)
        pos_b = np.full((b,), -1, np.int32)
        table_bp = np.full((b, width), NULL_PAGE, np.int32)
        tokens_b[:n], pos_b[:n] = tokens, positions
        for i, pages in enumerate(page_tables):
            table_bp[i, : len(pages)] = pages
        return tokens_b, pos_b, table_bp

    def mixed(
        self,
        tokens: list[int],
        positions: list[int],
        page_tables: list[list[int]],
        params: list[SamplingParams],
        chunk: list[int],
        chunk_start: int,
        chunk_pages: list[int],
        chunk_params: SamplingParams,
    ) -> tuple[Sampled, int]:
        """A decode step that also prefills ``chunk`` (prompt positions ``chunk_start`` on).

        Returns what was sampled (host arrays) and the row of the chunk's next token.
        """
        inputs = self._mixed_inputs(
            tokens, positions, page_tables, params, chunk, chunk_start, chunk_pages, chunk_params
        )
        sampled, self.k_pages, self.v_pages = self._mixed(self.params, self.k_pages, self.v_pages, *inputs)
        return jax.device_get(sampled), len(inputs[0])

    def _mixed_inputs(self, tokens, positions, page_tables, params, chunk, chunk_start, chunk_pages, chunk_params):
        n = len(tokens)
        tokens_b, pos_b, table_bp = self._rows(tokens, positions, page_tables, min_width=len(chunk_pages))
        b = len(tokens_b)
        c = self.chunk_tokens
        chunk_c = np.zeros((c,), np.int32)
        chunk_c[: len(chunk)] = chunk
        chunk_pos_c = np.full((c,), -1, np.int32)
        chunk_pos_c[: len(chunk)] = np.arange(chunk_start, chunk_start + len(chunk))
        chunk_table = np.full((1, table_bp.shape[1]), NULL_PAGE, np.int32)
        chunk_table[0, : len(chunk_pages)] = chunk_pages
        sampling = SamplingArrays.of([*params, *[SamplingParams()] * (b - n), chunk_params], b + 1)
        return tokens_b, pos_b, table_bp, chunk_c, chunk_pos_c, chunk_table, np.int32(len(chunk) - 1), sampling

    def programs(self) -> list[Program]:
        """The step (and the chunked step) at every batch and width bucket, for ``compile_all``."""
        out, state = [], (self.params, self.k_pages, self.v_pages)
        for b in self.batch_buckets:
            for w in self.width_buckets:
                rows = ([0] * b, [-1] * b, [[NULL_PAGE] * w] * b, [SamplingParams()] * b)
                args = (*state, *self._step_inputs(*rows))
                if self.host_loop:
                    out += self._step.programs(f"decode B={b} W={w}", *args, head=w == self.width_buckets[0])
                else:
                    out.append(Program(f"decode B={b} W={w}", self._step, args))
                if self.chunk_tokens:
                    inputs = self._mixed_inputs(*rows, [0], 0, [], SamplingParams())
                    out.append(Program(f"chunked B={b} W={w}", self._mixed, (*state, *inputs)))
        return out

    def warm_up(self, prefix_lengths: tuple[int, ...], progress=None) -> float:
        """Runs the step for every batch bucket (compiling what ``compile_all`` has not; a
        host-loop step's programs are all compiled there, so it is not run) and the insert
        for every prefix length."""
        start = time.perf_counter()
        for b in self.batch_buckets:
            for w in self.width_buckets:
                tables = [[NULL_PAGE] * w] * b
                if not self.host_loop:
                    self.step([0] * b, [-1] * b, tables, [SamplingParams()] * b)
                if self.chunk_tokens:
                    self.mixed([0] * b, [-1] * b, tables, [SamplingParams()] * b, [0], 0, [], SamplingParams())
            if progress:
                progress(f"decode B={b}")
        for t in prefix_lengths:
            shape = (self.cfg.n_layers, t, self.cfg.n_kv_heads, self.cfg.head_dim)
            zeros = jax.device_put(np.zeros(shape, jnp.dtype(self.cfg.dtype)), self.prefix_sharding)
            self.insert(zeros, zeros, [])
        seconds = time.perf_counter() - start
        logging.info("decode: warmed up %d batch shapes in %.1fs", len(self.batch_buckets), seconds)
        return seconds
