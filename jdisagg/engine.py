"""The offline engine: a model served by the prefill and decode instances of a mesh preset,
driven from the calling thread.

    engine = Engine("smollm2-135m-instruct", "cpu")
    [out] = engine.generate(["Once upon a time"], SamplingParams(max_tokens=16))

It puts three parts together: ``runtime.instances`` (weights on every instance's mesh, the
runners, warm-up), ``sched.Scheduler`` (the policy) and ``runtime.workers`` (one loop body
per instance: schedule -> execute -> update). ``generate`` runs every loop body in turn
until its requests finish; ``jdisagg.serving.server`` runs the same loop bodies in threads.
Requests come in through ``serving.intake`` (the checks every entry point shares) and their
text comes out of ``text.output`` (stop strings, streaming), so offline and served text are
the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jdisagg import cards
from jdisagg.preset import MeshPreset, load_preset
from jdisagg.runtime import workers
from jdisagg.runtime.decode import DecodeRunner
from jdisagg.runtime.instances import Instances
from jdisagg.sched.decode import DecodeSlots
from jdisagg.sched.params import Logprob, SamplingParams
from jdisagg.sched.request import Request
from jdisagg.sched.scheduler import Scheduler
from jdisagg.serving.intake import Intake

__all__ = ["Completion", "Engine", "SamplingParams"]


@dataclasses.dataclass
class Completion:
    """One finished request."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    preemptions: int = 0
    logprobs: list[Logprob] | None = None  # one per token when SamplingParams.logprobs was set


@dataclasses.dataclass
class DecodeInstance:
    """A decode instance as the engine sees it: its runner (devices) and its slots (policy)."""

    runner: DecodeRunner
    slots: DecodeSlots


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
        preset = mesh if isinstance(mesh, MeshPreset) else load_preset(mesh)
        loaded = cards.open_model(cards.load_card(model_name), dtype)
        self._assemble(loaded, Instances.build(loaded, preset))
        if warm_up:
            self.warm_up(progress)

    @classmethod
    def over(cls, loaded: cards.LoadedModel, instances: Instances) -> Engine:
        """An engine over instances built elsewhere (tests build them with fake runners)."""
        engine = cls.__new__(cls)
        engine._assemble(loaded, instances)
        return engine

    def _assemble(self, loaded: cards.LoadedModel, instances: Instances) -> None:
        self.model, self.instances, self.preset = loaded, instances, instances.preset
        self.cfg, self.tokenizer = loaded.cfg, loaded.tokenizer
        self.max_seq_len = self.preset.max_seq_len
        eos_ids = tuple(self.tokenizer.eos_ids) if self.tokenizer else self.cfg.eos_ids
        self.sched = Scheduler(*instances.scheduler_specs(), max_seq_len=self.max_seq_len, eos_ids=eos_ids)
        vocab, name = self.cfg.vocab_size, self.model.card.name
        self.intake = Intake(self.tokenizer, vocab_size=vocab, max_seq_len=self.max_seq_len, model_name=name)
        self.prefill = instances.prefill  # the prefill runners
        self.decode = [DecodeInstance(r, s) for r, s in zip(instances.decode, self.sched.decode, strict=True)]
        self.loops = workers.loops(instances, self.sched)

    def warm_up(self, progress: bool = True) -> float:
        """Compiles every program shape now, so no request waits on the compiler."""
        return self.instances.warm_up(progress)

    # ---- requests ----------------------------------------------------------------------

    def make_request(self, prompt: str | Sequence[int], params: SamplingParams) -> Request:
        """A checked request for ``prompt`` (text or token ids); ValueError names what is wrong."""
        return self.intake.request(self.intake.encode(prompt), params)

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
            self.sched.submit(r)
        while not all(r.finished for r in requests):
            if not self.step():
                raise RuntimeError("no instance can make progress (is a prompt larger than every page pool?)")
        return [completion(r) for r in requests]

    def step(self) -> bool:
        """Runs every instance's loop body once; False if none had work."""
        return any([once() for _, once in self.loops])

    def submit(self, request: Request) -> None:
        self.sched.submit(request)

    def cancel(self, request: Request) -> None:
        self.sched.cancel(request)


def completion(r: Request) -> Completion:
    """What a finished request produced."""
    text = r.text.text if r.text is not None else ""
    logprobs = list(r.logprobs) if r.params.logprobs else None
    return Completion(r.prompt, list(r.output), text, r.finish_reason or "", r.preemptions, logprobs)
