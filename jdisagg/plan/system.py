"""A mesh preset on a profile: the scheduler specs the engine would build for it, whether it
fits device memory, and what each of its instances' calls costs.

The engine derives a few numbers from a preset when it builds its runners (prompts per
prefill call, compiled token and batch buckets, page-table widths, the page pool). They are
derived here the same way, without building anything, and ``tests/test_plan_system.py``
checks them against real runners so the simulator and the server cannot drift apart. Pool
sizes come from the engine's own sizing code (``jdisagg.runtime.memory``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jdisagg.model import attention
from jdisagg.plan import latency
from jdisagg.plan.profile import Config, Profile
from jdisagg.preset import InstanceSpec, MeshPreset
from jdisagg.runtime import memory
from jdisagg.runtime.buckets import bucket_for, length_buckets, powers_of_two, token_buckets
from jdisagg.sched.pages import pages_for
from jdisagg.sched.scheduler import ChunkStep, DecodeBatch, DecodeSpec, PrefillSpec, Pull


class DoesNotFit(ValueError):
    """A preset's instance does not fit its device memory, or the profile lacks its layout."""


# ---- what the runners derive from a preset (checked against them in the tests) ---------------


def preset_length_buckets(preset: MeshPreset) -> tuple[int, ...]:
    return preset.length_buckets or length_buckets(preset.max_seq_len, preset.page_size)


def max_prompts(spec: InstanceSpec, buckets: tuple[int, ...]) -> int:
    """``PrefillRunner.max_prompts``."""
    return max(1, min(spec.max_batch, spec.token_budget // buckets[0]))


def call_tokens(spec: InstanceSpec, buckets: tuple[int, ...]) -> int:
    """``PrefillRunner.call_tokens()``."""
    ratio = max([-(-hi // lo) for lo, hi in zip(buckets, buckets[1:], strict=False)] or [1])
    return max_prompts(spec, buckets) * buckets[0] + ratio * token_buckets(buckets, spec.token_budget)[-1]


def batch_buckets(spec: InstanceSpec) -> tuple[int, ...]:
    """``DecodeRunner.batch_buckets``."""
    m = spec.micro_batches
    return tuple(sorted({-(-b // m) * m for b in (spec.batch_buckets or powers_of_two(spec.max_batch))}))


def host_loop(spec: InstanceSpec, platform: str) -> bool:
    """``DecodeRunner.host_loop``: a one-device CPU instance of one step per call."""
    return platform == "cpu" and len(spec.devices) == 1 and spec.micro_batches == 1 and spec.steps_per_call == 1


def width_buckets(preset: MeshPreset, on_host: bool = False) -> tuple[int, ...]:
    """``DecodeRunner.width_buckets`` (page-table widths); ``on_host``: ``host_loop``'s."""
    most = pages_for(preset.max_seq_len, preset.page_size)
    widths, w = [], 16
    while w < most and preset.decode_attention == "dot" and not on_host:
        widths.append(w)
        w *= 2
    return (*widths, most)


def decode_read(preset: MeshPreset, on_host: bool, batch_bucket: int, width: int, longest: int, context: int) -> int:
    """The key positions a decode step reads (``latency.decode_features``' ``read``): with
    the kernel each row's own (``context`` in all); the host loop's blocks a block multiple
    of the ``longest`` context per row of the batch bucket; else the table ``width`` (a
    width bucket, in pages) per row."""
    if preset.decode_attention == "pallas":
        return context
    if on_host:
        block = attention.BLOCK_TOKENS
        return batch_bucket * -(-longest // block) * block
    return batch_bucket * width * preset.page_size


# ---- instances --------------------------------------------------------------------------------


@dataclasses.dataclass
class Instance:
    """One instance of the preset, with the fits of its layout and its derived sizes."""

    spec: InstanceSpec
    config: Config | None  # None: an instant prefill instance (decode-only simulations)
    node: int
    n_pages: int = 0  # decode side
    host_loop: bool = False  # decode side: ``DecodeRunner.host_loop``
    width_buckets: tuple[int, ...] = ()  # decode side
    token_buckets: tuple[int, ...] = ()  # prefill side
    batch_buckets: tuple[int, ...] = ()
    prefill_index: int | None = None  # its index among the prefill / decode instances
    decode_index: int | None = None


@dataclasses.dataclass
class System:
    """A preset placed on a profile's hardware: what the simulator drives."""

    preset: MeshPreset
    profile: Profile
    instances: list[Instance]
    prefill_specs: list[PrefillSpec]
    decode_specs: list[DecodeSpec]
    decode_takes_from: list[int | None]
    length_buckets: tuple[int, ...]
    gpus_per_node: int
    cross_node_bytes_s: float  # bytes/s between nodes
    instant_prefill: bool = False  # prefill calls take no time (to simulate decode alone)

    @property
    def prefill(self) -> list[Instance]:
        return [i for i in self.instances if i.prefill_index is not None]

    @property
    def decode(self) -> list[Instance]:
        return [i for i in self.instances if i.decode_index is not None]

    @property
    def gpus(self) -> int:
        return self.preset.device_count()

    # ---- costs (seconds) ------------------------------------------------------------------

    def prefill_seconds(self, inst: Instance, lengths: Sequence[int]) -> float:
        if self.instant_prefill:
            return 0.0
        row = bucket_for(sum(lengths), inst.token_buckets)
        return inst.config.prefill(latency.prefill_features(lengths, row))

    def _rows_features(self, inst: Instance, batch: DecodeBatch, chunk_pages: int = 0, chunk_context: int = 0):
        n = len(batch.requests)
        b = bucket_for(max(n, 1), inst.batch_buckets)
        context = sum(batch.positions) + n
        width = bucket_for(max([chunk_pages, *map(len, batch.page_tables), 1]), inst.width_buckets)
        longest = max(batch.positions, default=0) + 1
        blocks = inst.host_loop and not chunk_pages  # a mixed step gathers its table, as the profiler saw
        read = decode_read(self.preset, blocks, b, width, longest, context)
        return n, latency.decode_features(n, b, context, read, chunk_context)

    def host_seconds(self, tokens: int, step: bool = True) -> float:
        """The host's part of a call that streams ``tokens`` tokens: the scheduler's work per
        step and row, and the server's per streamed token. Every instance of one process
        shares the one interpreter, so the simulator runs these parts one at a time."""
        p = self.profile
        return p.host_step_s * step + (p.host_row_s + p.host_token_s) * tokens

    def step_seconds(self, inst: Instance, batch: DecodeBatch) -> float:
        n, x = self._rows_features(inst, batch)
        return inst.config.decode(x)

    def mixed_seconds(self, inst: Instance, step: ChunkStep) -> float:
        if step.chunk is None:
            return self.step_seconds(inst, step.batch)
        n, x = self._rows_features(inst, step.batch, len(step.pages), step.start + len(step.piece))
        return inst.config.mixed(x)

    def pull_seconds(self, inst: Instance, pulls: Sequence[Pull]) -> tuple[float, float]:
        """(transfer seconds, busy seconds) of pulling ``pulls`` into decode instance ``inst``:
        the KV moves (nothing when prefill shares the decode devices; over the cross-node
        link between nodes), then each prefix is inserted into the pool."""
        moved = busy = 0.0
        for p in pulls:
            src = self.prefill[p.request.prefill_instance]
            if src.spec.devices != inst.spec.devices:
                if src.node == inst.node:
                    moved += self.profile.transfer({"one": 1.0, "bytes": float(p.prefix.nbytes)})
                else:
                    moved += self.profile.transfer.coef[0] + p.prefix.nbytes / self.cross_node_bytes_s
            busy += inst.config.insert({"one": 1.0, "tokens": float(p.prefix.held_tokens)})
        return moved, moved + busy

    def kv_moves(self) -> list[tuple[int, int]]:
        """(prefill node, decode node) of every path a prefix may take."""
        return [
            (p.node, d.node)
            for p in self.prefill
            for d in self.decode
            if self.decode_takes_from[d.decode_index] in (None, p.prefill_index)
        ]


def kv_bytes_per_token(cfg, spec: InstanceSpec) -> int:
    return memory.kv_bytes_per_token(cfg, spec)


def build(
    preset: MeshPreset,
    profile: Profile,
    *,
    gpus_per_node: int = 8,
    cross_node_gbps: float = 25.0,
    memory_per_device: int = 0,
    instant_prefill: bool = False,
) -> System:
    """The system ``preset`` makes on the profile's hardware; DoesNotFit when an instance's
    layout is not in the profile or its weights, pool and prefill buffer do not fit.
    ``instant_prefill``: prefill instances cost nothing and need no fit or memory (they stand
    for a prefill side fast enough not to matter)."""
    cfg = profile.cfg
    preset.validate(cfg, 1 << 30)
    buckets = preset_length_buckets(preset)
    mem = memory_per_device or profile.memory_per_device
    instances: list[Instance] = []
    prefill_specs, decode_specs, takes_from = [], [], []
    for spec in preset.instances:
        if instant_prefill and spec.role == "prefill":
            inst = Instance(spec, None, node=min(spec.devices) // gpus_per_node)
            inst.token_buckets = token_buckets(buckets, spec.token_budget)
            inst.prefill_index = len(prefill_specs)
            prefill_specs.append(PrefillSpec(max_prompts(spec, buckets), spec.token_budget, spec.buffer_tokens))
            instances.append(inst)
            continue
        config = profile.config(spec.tp, spec.pp)
        if config is None:
            raise DoesNotFit(
                f"{spec.where}: the profile has no (tp={spec.tp}, pp={spec.pp}) layout "
                f"(it has {', '.join(f'tp={t} pp={p}' for t, p in profile.layouts())})"
            )
        if spec.runs_prefill and config.prefill is None:
            raise DoesNotFit(f"{spec.where}: the profile has no prefill fit for tp={spec.tp}")
        if spec.role == "chunked" and config.mixed is None:
            raise DoesNotFit(f"{spec.where}: the profile has no chunked (mixed step) fit for tp={spec.tp}")
        inst = Instance(spec, config, node=min(spec.devices) // gpus_per_node)
        if max(spec.devices) // gpus_per_node != inst.node:
            raise DoesNotFit(f"{spec.where}: devices {list(spec.devices)} span nodes of {gpus_per_node} GPUs")
        free = mem - config.weight_bytes
        kv = kv_bytes_per_token(cfg, spec)
        reserved = 0
        if spec.runs_prefill:
            inst.token_buckets = token_buckets(buckets, spec.token_budget)
            inst.prefill_index = len(prefill_specs)
            scratch = config.scratch(inst.token_buckets[-1])
            reserved = memory.prefill_reserve_bytes(cfg, spec, inst.token_buckets, call_tokens(spec, buckets), scratch)
            prefill_specs.append(PrefillSpec(max_prompts(spec, buckets), spec.token_budget, spec.buffer_tokens))
            if not spec.runs_decode and reserved > free:
                raise DoesNotFit(
                    f"{spec.where}: weights {config.weight_bytes / 2**30:.1f} GiB + prefill buffer and scratch "
                    f"{reserved / 2**30:.1f} GiB exceed {mem / 2**30:.1f} GiB per device"
                )
        if spec.runs_decode:
            if free <= 0:
                raise DoesNotFit(
                    f"{spec.where}: weights {config.weight_bytes / 2**30:.1f} GiB per device exceed "
                    f"{mem / 2**30:.1f} GiB"
                )
            try:
                n_pages = spec.pages or memory.pages_that_fit(free, cfg, spec, preset, reserved)
            except ValueError as e:
                raise DoesNotFit(str(e)) from None
            if spec.pages and (spec.pages * preset.page_size * kv + (reserved if spec.runs_prefill else 0)) > free:
                raise DoesNotFit(f"{spec.where}: pages={spec.pages} do not fit beside the weights")
            inst.n_pages, inst.batch_buckets = n_pages, batch_buckets(spec)
            inst.host_loop = host_loop(spec, profile.platform)
            inst.width_buckets = width_buckets(preset, inst.host_loop)
            inst.decode_index = len(decode_specs)
            own = inst.prefill_index if spec.runs_prefill else None
            decode_specs.append(
                DecodeSpec(n_pages, preset.page_size, spec.max_batch, own, spec.chunk_tokens, spec.steps_per_call)
            )
            takes_from.append(own)
        instances.append(inst)
    return System(
        preset,
        profile,
        instances,
        prefill_specs,
        decode_specs,
        takes_from,
        buckets,
        gpus_per_node,
        cross_node_gbps * 1e9 / 8,
        instant_prefill,
    )
