"""The instances of a mesh preset on this host's devices: weights placed on each instance's
mesh, its prefill and decode runners, its page pool sized, and the warm-up that compiles
every program shape before the first request."""

from __future__ import annotations

import dataclasses
import time

import jax
from absl import logging
from tqdm.auto import tqdm

from jdisagg.model import decoder, sharding
from jdisagg.preset import InstanceSpec, MeshPreset
from jdisagg.runtime.buckets import length_buckets
from jdisagg.runtime.compile import compile_all
from jdisagg.runtime.decode import DecodeRunner
from jdisagg.runtime.memory import auto_pages, check_fits, memory_per_device, prefill_reserve
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.scheduler import DecodeSpec, PrefillSpec
from jdisagg.transfer.base import KVTransfer
from jdisagg.transfer.reshard import InProcess


def prefill_runner(cfg, params, mesh, spec: InstanceSpec, preset: MeshPreset, buckets: tuple[int, ...]):
    """The prefill runner of instance ``spec`` (params already placed on ``mesh``)."""
    return PrefillRunner(
        cfg,
        params,
        mesh,
        spec.rules,
        length_buckets=buckets,
        max_batch=spec.max_batch,
        token_budget=spec.token_budget,
        unroll=preset.unroll_layers,
    )


def decode_runner(cfg, params, mesh, spec: InstanceSpec, preset: MeshPreset, n_pages: int) -> DecodeRunner:
    """The decode runner of instance ``spec`` with a pool of ``n_pages``."""
    return DecodeRunner(
        cfg,
        params,
        mesh,
        spec.rules,
        max_batch=spec.max_batch,
        n_pages=n_pages,
        page_size=preset.page_size,
        max_seq_len=preset.max_seq_len,
        micro_batches=spec.micro_batches,
        chunk_tokens=spec.chunk_tokens,
        batch_buckets=spec.batch_buckets,
        unroll=preset.unroll_layers,
        decode_attention=preset.decode_attention,
        steps=spec.steps_per_call,
    )


@dataclasses.dataclass
class Instances:
    """The runners of one preset's instances, in the preset's order of prefill and decode
    instances (a colocated instance has one of each, on the same mesh)."""

    preset: MeshPreset
    prefill: list[PrefillRunner]
    decode: list[DecodeRunner]
    decode_takes_from: list[int | None]  # colocated: the own prefill instance; None: any
    length_buckets: tuple[int, ...]
    transfer: KVTransfer

    @classmethod
    def build(cls, loaded, preset: MeshPreset) -> Instances:
        """Places ``loaded``'s weights (a ``cards.LoadedModel``) on every instance's mesh."""
        cfg = loaded.cfg
        devices = jax.devices()
        preset.validate(cfg, len(devices), devices[0].platform)
        limit = memory_per_device([devices[i] for spec in preset.instances for i in spec.devices])
        if limit is not None:  # a preset that cannot fit fails here, not in the allocator
            check_fits(cfg, preset, limit)
        logging.info(
            "mesh preset %s: decode attention %s, layer loop %s",
            preset.name,
            preset.decode_attention,
            "unrolled" if preset.unroll_layers else "scanned (run from the host on one-device CPU instances)",
        )
        buckets = preset.length_buckets or length_buckets(preset.max_seq_len, preset.page_size)
        abstract = decoder.abstract_params(cfg)
        prefill, decode, takes_from = [], [], []
        for spec in preset.instances:
            mesh = sharding.make_mesh([devices[i] for i in spec.devices], spec.pp, spec.tp)
            params = loaded.place(sharding.param_shardings(abstract, mesh, spec.rules))
            if spec.runs_prefill:
                prefill.append(prefill_runner(cfg, params, mesh, spec, preset, buckets))
            if spec.runs_decode:
                # A colocated instance's prefill shares the devices with the pool.
                reserved = prefill_reserve(cfg, spec, prefill[-1]) if spec.runs_prefill and not spec.pages else 0
                n_pages = spec.pages or auto_pages(cfg, mesh, spec, preset, reserved)
                decode.append(decode_runner(cfg, params, mesh, spec, preset, n_pages))
                takes_from.append(len(prefill) - 1 if spec.runs_prefill else None)
        return cls(preset, prefill, decode, takes_from, buckets, InProcess())

    def scheduler_specs(self) -> tuple[list[PrefillSpec], list[DecodeSpec]]:
        """What the scheduling core needs to know of each instance."""
        prefill = [
            PrefillSpec(r.max_prompts, r.token_budget, spec.buffer_tokens)
            for r, spec in zip(self.prefill, self.preset.prefill, strict=True)
        ]
        decode = [
            DecodeSpec(r.n_pages, r.page_size, spec.max_batch, own, r.chunk_tokens, spec.steps_per_call)
            for r, spec, own in zip(self.decode, self.preset.decode, self.decode_takes_from, strict=True)
        ]
        return prefill, decode

    def warm_up(self, progress: bool = True) -> float:
        """Compiles every program shape now, so no request waits on the compiler."""
        programs = [p for r in self.prefill for p in r.programs()]
        programs += [p for d in self.decode for p in d.programs()]
        with tqdm(total=len(programs), desc="compiling", disable=not progress, leave=False) as bar:

            def tick(what):
                bar.set_postfix_str(what)
                bar.update()

            seconds = compile_all(programs, tick)
        logging.info("compiled %d programs in %.1fs", len(programs), seconds)
        # One run of each shape: the few small programs left (prefix splits, inserts) compile here.
        seconds += sum(r.warm_up() for r in self.prefill)
        seconds += sum(d.warm_up(self.length_buckets) for d in self.decode)
        seconds += self._warm_up_transfers()
        logging.info("warmed up in %.1fs", seconds)
        return seconds

    def _warm_up_transfers(self) -> float:
        """Moves a blank prefix of every length bucket from each prefill instance to each
        decode instance that takes its prefixes, so the reshard programs between different
        shard splits compile now (a prefill of every bucket cost a CPU ~14 s of start-up)."""
        start = time.perf_counter()
        for i, runner in enumerate(self.prefill):
            for t in runner.length_buckets:
                prefix = runner.blank_prefix(t)
                for d, own in zip(self.decode, self.decode_takes_from, strict=True):
                    if own in (None, i):
                        self.transfer.pull([prefix], d.prefix_sharding)
        return time.perf_counter() - start
