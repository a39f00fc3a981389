"""The offline engine: a model served by the prefill and decode instances of a mesh preset.

``Engine(model, mesh).generate(prompts, params)`` runs requests to completion. Each step
of its loop is schedule -> execute -> update:

1. prefill: each prefill instance takes the next FCFS batch that fits its token budget,
   unless its buffer of prefixes not yet pulled is full (back-pressure); each request's
   prefix KV stays on the prefill mesh until a decode instance pulls it.
2. pull + decode: each decode instance pulls prefixes (FCFS) while it has a batch slot and
   pages and no instance that could take the prefix runs fewer requests (least-loaded);
   ``kv_transfer`` moves the KV device to device into the decode layout. It then reserves
   pages for the next token (preempting the youngest when pages run out) and runs a step.
3. update: tokens are appended and streamed; requests that hit a stop condition release
   their pages.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence

import jax
from absl import logging
from tqdm.auto import tqdm

from jdisagg import cards
from jdisagg.model import axes, decoder, sharding
from jdisagg.preset import MeshPreset, load_preset
from jdisagg.runtime.buckets import length_buckets
from jdisagg.runtime.compile import compile_all
from jdisagg.runtime.decode import DecodeRunner
from jdisagg.runtime.prefill import PrefillRunner
from jdisagg.sched.pages import pages_for
from jdisagg.sched.params import Logprob, SamplingParams
from jdisagg.sched.scheduler import DecodeSlots, PrefillQueue, Request, State, stop_reason
from jdisagg.transfer import reshard


@dataclasses.dataclass
class Completion:
    """One finished request."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    preemptions: int = 0
    logprobs: list[Logprob] | None = None  # one per token when SamplingParams.logprobs was set


# Of the memory left after the weights (and a colocated prefill's share) when a preset leaves `pages` out.
KV_MEMORY_FRACTION = 0.85


def kv_bytes_per_token(cfg, spec) -> int:
    """Bytes of one token's KV (every layer, K and V) on each device of instance ``spec``."""
    kv_shards = spec.tp if cfg.n_kv_heads % spec.tp == 0 and spec.rules.get(axes.KV_HEADS) == "tp" else 1
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jax.numpy.dtype(cfg.dtype).itemsize
    return per_token // (spec.pp * kv_shards)


def prefill_reserve(cfg, spec, runner: PrefillRunner) -> int:
    """Device bytes a colocated instance's prefill needs beside its page pool.

    Prefill holds prefixes until decode pulls them: up to ``buffer_tokens``, plus those of
    the call that started below that limit, and that call's packed row while they are cut
    from it. Add the largest prefill program's scratch (compiled memory analysis; the compile
    is the one warm-up would do). Without this the pool took the memory, and an OPT-13B
    colocated replica ran out of it mid-prefill once prefixes queued up behind a full batch.
    """
    programs = runner.programs()
    compile_all(programs)  # as warm-up would (in threads where that helps); the analysis below reuses them
    scratch = max(p.jitted.lower(*p.args).compile().memory_analysis().temp_size_in_bytes for p in programs)
    tokens = spec.buffer_tokens + runner.token_buckets[-1] + runner.call_tokens()
    return tokens * kv_bytes_per_token(cfg, spec) + scratch


def free_device_bytes(mesh) -> int | None:
    """The least memory left on any device of ``mesh`` (JAX's limit less what is in use);
    None where devices report no statistics (CPU)."""
    stats = [d.memory_stats() for d in mesh.devices.flat]
    if not all(stats) or not all("bytes_limit" in s for s in stats):
        return None
    return min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)


def auto_pages(cfg, mesh, spec, preset: MeshPreset, reserved: int = 0) -> int:
    """Pages that fit in ``KV_MEMORY_FRACTION`` of the decode devices' free memory, after
    ``reserved`` bytes per device for what else runs there."""
    free = free_device_bytes(mesh)
    if free is None:
        raise ValueError(
            f"{preset.source}: {spec.where}.pages is required on this platform (no device memory statistics)"
        )
    free -= reserved
    per_page = preset.page_size * kv_bytes_per_token(cfg, spec)
    pages = max(0, int(free * KV_MEMORY_FRACTION) // per_page)
    needed = pages_for(preset.max_seq_len, preset.page_size) + 1
    if pages < needed:
        raise ValueError(
            f"{preset.source}: {spec.where}: free memory holds {pages} KV pages"
            + (f" after {reserved / 2**20:,.1f} MiB for prefill" if reserved else "")
            + f"; one request needs {needed}"
        )
    logging.info(
        "%s: %d KV pages (%.1f GiB per device)%s",
        spec.where,
        pages,
        pages * per_page / 2**30,
        f", {reserved / 2**20:,.0f} MiB kept for prefill" if reserved else "",
    )
    return pages


def prefill_runner(cfg, params, mesh, spec, preset: MeshPreset, length_buckets: tuple[int, ...]) -> PrefillRunner:
    """The prefill runner of instance ``spec`` (params already placed on ``mesh``)."""
    return PrefillRunner(
        cfg,
        params,
        mesh,
        spec.rules,
        length_buckets=length_buckets,
        max_batch=spec.max_batch,
        token_budget=spec.token_budget,
        unroll=preset.unroll_layers,
    )


def decode_runner(cfg, params, mesh, spec, preset: MeshPreset, n_pages: int) -> DecodeRunner:
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
    )


@dataclasses.dataclass
class DecodeInstance:
    runner: DecodeRunner
    slots: DecodeSlots
    # Colocated: the prefill instance on the same devices; a replica decodes only what it
    # prefilled. None: disaggregated, any prefill instance's prefixes.
    prefill_index: int | None = None

    def takes_from(self, prefill_index: int) -> bool:
        return self.prefill_index in (None, prefill_index)


class Engine:
    """Prefill and decode instances of one model on the meshes of one preset."""

    def __init__(
        self,
        model_name: str = cards.DEFAULT_MODEL,
        mesh: str | MeshPreset = "cpu",
        *,
        dtype: str | None = None,
        warm_up: bool = True,
        progress: bool = True,
    ):
        self.preset = mesh if isinstance(mesh, MeshPreset) else load_preset(mesh)
        self.model = cards.open_model(cards.load_card(model_name), dtype)
        self.cfg, self.tokenizer = self.model.cfg, self.model.tokenizer
        devices = jax.devices()
        self.preset.validate(self.cfg, len(devices), devices[0].platform)
        logging.info(
            "mesh preset %s: decode attention %s, layer loop %s",
            self.preset.name,
            self.preset.decode_attention,
            "unrolled" if self.preset.unroll_layers else "scanned",
        )
        preset, cfg = self.preset, self.cfg
        self.max_seq_len = preset.max_seq_len
        self.eos_ids = tuple(self.tokenizer.eos_ids) if self.tokenizer else cfg.eos_ids
        self.length_buckets = preset.length_buckets or length_buckets(preset.max_seq_len, preset.page_size)
        abstract = decoder.abstract_params(cfg)
        self.prefill: list[PrefillRunner] = []
        self.decode: list[DecodeInstance] = []
        for spec in preset.instances:
            mesh_ = sharding.make_mesh([devices[i] for i in spec.devices], spec.pp, spec.tp)
            params = self.model.place(sharding.param_shardings(abstract, mesh_, spec.rules))
            if spec.runs_prefill:
                self.prefill.append(prefill_runner(cfg, params, mesh_, spec, preset, self.length_buckets))
            if spec.runs_decode:
                # A colocated instance's prefill shares the devices with the pool.
                reserved = prefill_reserve(cfg, spec, self.prefill[-1]) if spec.runs_prefill and not spec.pages else 0
                n_pages = spec.pages or auto_pages(cfg, mesh_, spec, preset, reserved)
                runner = decode_runner(cfg, params, mesh_, spec, preset, n_pages)
                slots = DecodeSlots(n_pages, preset.page_size, spec.max_batch, preset.max_seq_len)
                own = len(self.prefill) - 1 if spec.runs_prefill else None
                self.decode.append(DecodeInstance(runner, slots, own))
        # What each worker thread of a server runs: disaggregated instances each get their own;
        # a colocated instance runs prefill first, then decode, on its one mesh.
        self.loops: list[tuple[str, Callable[[], bool]]] = []
        for spec in preset.instances:
            if spec.role == "prefill":
                self.loops.append((spec.where, functools.partial(self.prefill_once, spec.index)))
            elif spec.role in ("decode", "chunked"):
                self.loops.append((spec.where, functools.partial(self.decode_once, self.decode[spec.index])))
            else:
                self.loops.append((spec.where, functools.partial(self._colocated_once, spec.index)))
        self.queue = PrefillQueue()
        self.prefilled: list[Request] = []  # FCFS; their prefix KV waits on the prefill mesh
        self.held_tokens = [0] * len(self.prefill)  # prefix tokens each prefill instance buffers
        self.buffer_tokens = [spec.buffer_tokens for spec in preset.prefill]
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)  # notified whenever scheduler state changes
        if warm_up:
            self.warm_up(progress)

    def warm_up(self, progress: bool = True) -> float:
        """Compiles every program shape now, so no request waits on the compiler."""
        programs = [p for r in self.prefill for p in r.programs()]
        programs += [p for d in self.decode for p in d.runner.programs()]
        with tqdm(total=len(programs), desc="compiling", disable=not progress, leave=False) as bar:

            def tick(what):
                bar.set_postfix_str(what)
                bar.update()

            seconds = compile_all(programs, tick)
        logging.info("compiled %d programs in %.1fs", len(programs), seconds)
        # One run of each shape: the few small programs left (prefix splits, inserts) compile here.
        seconds += sum(r.warm_up() for r in self.prefill)
        seconds += sum(d.runner.warm_up(self.length_buckets) for d in self.decode)
        seconds += self._warm_up_transfers()
        logging.info("warmed up in %.1fs", seconds)
        return seconds

    def _warm_up_transfers(self) -> float:
        """Moves a prefix of every length bucket from each prefill instance to each decode
        instance that takes its prefixes, so the reshard programs between different shard
        splits compile now."""
        start = time.perf_counter()
        for i, runner in enumerate(self.prefill):
            for t in runner.length_buckets:
                prefix = runner.run([[0] * t], [SamplingParams()])[0]
                for d in self.decode:
                    if d.takes_from(i):
                        jax.block_until_ready(reshard.transfer(prefix, d.runner.prefix_sharding))
        return time.perf_counter() - start

    # ---- requests ------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.model.card.name} has no tokenizer: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def make_request(self, prompt: str | Sequence[int], params: SamplingParams) -> Request:
        tokens = self.encode(prompt)
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(tokens)} tokens; this mesh preset allows at most "
                f"{self.max_seq_len - 1} (max_seq_len={self.max_seq_len} counts prompt and output)"
            )
        bad = [t for t in tokens if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return Request(tokens, params)

    def generate(
        self,
        prompts: str | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Runs ``prompts`` (text or token ids) to completion; one Completion per prompt, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        requests = [self.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        for r in requests:
            self.submit(r)
        while any(r.state is not State.FINISHED for r in requests):
            if not self.step():
                raise RuntimeError("no instance can make progress (is a prompt larger than every page pool?)")
        return [self.completion(r) for r in requests]

    def completion(self, r: Request) -> Completion:
        shown = r.output
        if r.finish_reason == "stop" and (r.output[-1] in r.params.stop_token_ids or r.output[-1] in self.eos_ids):
            shown = r.output[:-1]  # the stop token ends the text but is not part of it
        text = self.tokenizer.decode(shown) if self.tokenizer else ""
        for s in r.params.stop:
            if s in text:
                text = text[: text.index(s)]
        logprobs = list(r.logprobs) if r.params.logprobs else None
        return Completion(r.prompt, list(r.output), text, r.finish_reason or "", r.preemptions, logprobs)

    # ---- scheduling steps ----------------------------------------------------------
    #
    # Scheduler state (queue, prefilled list, slots, request fields) changes only under
    # ``self.lock``; device work runs outside it, so one thread per instance can drive
    # prefill and decode concurrently (jdisagg.server does that). ``step`` drives every
    # instance once from the calling thread (the offline path).

    def step(self) -> bool:
        """Runs every instance's loop body once (``self.loops``); False if none had work."""
        return any([loop() for _, loop in self.loops])

    def submit(self, request: Request) -> None:
        with self.lock:
            self.queue.add(request)
            self.wake.notify_all()

    def cancel(self, request: Request) -> None:
        """Stops a request; its queue slot, prefix KV and pages are freed by the next step that sees it."""
        with self.lock:
            if request.state is State.FINISHED:
                return
            request.cancelled = True
            if self.queue.remove(request):
                self._finish(request, "cancelled")
            elif request in self.prefilled:
                self.prefilled.remove(request)
                self._drop_prefix(request)
                self._finish(request, "cancelled")
            self.wake.notify_all()

    def prefill_once(self, index: int) -> bool:
        """Runs one batch on prefill instance ``index`` if work is waiting and its buffer has room."""
        runner = self.prefill[index]
        with self.lock:
            if self.held_tokens[index] >= self.buffer_tokens[index]:
                return False  # back-pressure: decode has not pulled enough yet
            batch = self.queue.next_batch(runner.max_prompts, runner.token_budget)
            for r in batch:
                r.mark("prefill_start")
        if not batch:
            return False
        try:
            prefixes = runner.run([r.prefill_tokens for r in batch], [r.params for r in batch])
        except Exception as e:  # the batch is in no queue now: end it here, then let the worker die
            with self.lock:
                for r in batch:
                    r.error = f"prefill failed: {e}"
                    self._finish(r, "error")
                self.wake.notify_all()
            raise
        with self.lock:
            for r, prefix in zip(batch, prefixes, strict=True):
                r.mark("prefill_end")
                if r.cancelled:
                    self._finish(r, "cancelled")
                    continue
                if not r.output:  # a first prefill; after a preemption the output is already there
                    r.append(prefix.first_token, prefix.first_logprob)
                    r.mark("first_token")
                    if self._finish_if_done(r):
                        continue
                    r.emit(r.output[-1:])
                r.prefix, r.state, r.prefill_instance = prefix, State.PREFILLED, index
                self.held_tokens[index] += prefix.k.shape[1]
                self.prefilled.append(r)
            self.wake.notify_all()
        return True

    def decode_once(self, d: DecodeInstance) -> bool:
        """Pulls prefixes while there is room, then runs one step; False when there was nothing to do."""
        if d.runner.chunk_tokens:
            return self._chunked_once(d)
        with self.lock:
            self._drop_cancelled(d)
            pulled = []
            # FCFS among the prefixes d may take.
            for r in [r for r in self.prefilled if d.takes_from(r.prefill_instance)]:
                if not (self._routes_to(d, r) and d.slots.try_admit(r)):
                    break
                self.prefilled.remove(r)
                r.mark("admitted")
                pulled.append((r, r.prefix))
        for r, prefix in pulled:
            start = time.perf_counter()
            k, v = reshard.transfer(prefix, d.runner.prefix_sharding)
            d.runner.insert(k, v, r.pages[: pages_for(prefix.length, d.runner.page_size)])
            r.transfer_s += time.perf_counter() - start
            r.transfer_bytes += prefix.nbytes
        with self.lock:
            for r, _ in pulled:
                self._drop_prefix(r)
            for victim in reversed(d.slots.reserve_next()):
                self.queue.add(victim, front=True)
            running = list(d.slots.running)
        return self._decode_step(d, running) or bool(pulled)

    def _colocated_once(self, index: int) -> bool:
        """Prefill first: a waiting batch goes before the running requests' next step."""
        return self.prefill_once(index) or self.decode_once(self.decode[index])

    def _chunked_once(self, d: DecodeInstance) -> bool:
        """A decode step that also prefills the next chunk of the prompt being prefilled (chunked baseline)."""
        slots, c = d.slots, d.runner.chunk_tokens
        with self.lock:
            self._drop_cancelled(d)
            head = self.queue.peek()
            if slots.chunking is None and head is not None and slots.reserve_prompt(head):
                self.queue.remove(head)
                head.mark("prefill_start")
            for victim in reversed(slots.reserve_next()):
                self.queue.add(victim, front=True)
            running, r = list(slots.running), slots.chunking
            if r is not None:
                start = slots.chunk_done
                piece = r.prefill_tokens[start : start + c]
        if r is None:
            return self._decode_step(d, running)
        sampled, chunk_row = d.runner.mixed(
            [q.output[-1] for q in running],
            [q.position for q in running],
            [q.pages for q in running],
            [q.params for q in running],
            piece,
            start,
            r.pages,
            r.params,
        )
        with self.lock:
            self._take_tokens(d, running, sampled)
            slots.chunk_done += len(piece)
            if slots.chunk_done == len(r.prefill_tokens):  # the prompt is in; decode from here
                slots.chunking = None
                r.mark("prefill_end")
                r.mark("admitted")
                if not r.output:
                    r.append(int(sampled.tokens[chunk_row]), sampled.logprob(chunk_row, r.params.logprobs))
                    r.mark("first_token")
                    if self._finish_if_done(r):
                        slots.allocator.free(r.pages)
                        r.pages = []
                        return True
                    r.emit(r.output[-1:])
                slots.adopt(r)
            self.wake.notify_all()
        return True

    def _drop_cancelled(self, d: DecodeInstance) -> None:
        for r in [r for r in d.slots.running if r.cancelled]:
            d.slots.release(r)
            self._finish(r, "cancelled")
        r = d.slots.chunking
        if r is not None and r.cancelled:
            d.slots.drop_chunking()
            self._finish(r, "cancelled")

    def _decode_step(self, d: DecodeInstance, running: list[Request]) -> bool:
        if not running:
            return False
        sampled = d.runner.step(
            [r.output[-1] for r in running],
            [r.position for r in running],
            [r.pages for r in running],
            [r.params for r in running],
        )
        with self.lock:
            self._take_tokens(d, running, sampled)
            self.wake.notify_all()
        return True

    def _take_tokens(self, d: DecodeInstance, running: list[Request], sampled) -> None:
        for i, r in enumerate(running):
            r.append(int(sampled.tokens[i]), sampled.logprob(i, r.params.logprobs))
            if self._finish_if_done(r):
                d.slots.release(r)
            else:
                r.emit(r.output[-1:])

    def fail_all(self, error: str) -> None:
        """Ends every unfinished request with ``error`` (a worker died); nothing is left hanging."""
        with self.lock:
            held = list(self.queue.drain()) + self.prefilled + [r for d in self.decode for r in d.slots.running]
            self.prefilled = []
            for d in self.decode:
                if d.slots.chunking is not None:
                    held.append(d.slots.chunking)
                    d.slots.drop_chunking()
                for r in list(d.slots.running):
                    d.slots.release(r)
            for r in held:
                r.error = error
                self._finish(r, "error")
            self.wake.notify_all()

    def _routes_to(self, d: DecodeInstance, r: Request) -> bool:
        """Least-loaded routing: ``d`` pulls ``r`` only if no instance that could take it runs fewer requests."""
        loads = [len(o.slots) for o in self.decode if o.takes_from(r.prefill_instance) and o.slots.can_admit(r)]
        return bool(loads) and len(d.slots) <= min(loads)

    def _drop_prefix(self, r: Request) -> None:
        if r.prefix is not None:
            self.held_tokens[r.prefill_instance] -= r.prefix.k.shape[1]
            r.prefix = None

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason, r.state = reason, State.FINISHED
        r.mark("finished")
        r.emit([])

    def _finish_if_done(self, r: Request) -> bool:
        reason = stop_reason(r, self.eos_ids, self.max_seq_len)
        if reason is None and r.params.stop and self.tokenizer:
            text = self.tokenizer.decode(r.output)
            reason = "stop" if any(s in text for s in r.params.stop) else None
        if reason:
            r.finish_reason, r.state = reason, State.FINISHED
            r.mark("finished")
            r.emit(r.output[-1:])
        return reason is not None
