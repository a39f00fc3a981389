"""Fake runners whose outputs can be worked out by hand, to test the scheduling core, the
worker loops and the server without a model (nothing compiles).

The fake model counts: a prompt's first token is its last token + 1, and every later token is
the previous one + 1 (mod the vocabulary). So a request for prompt [..., p] with max_tokens=n
produces [p + 1, ..., p + n]. Each runner records its calls; ``gate`` (a threading.Event)
holds a call until it is set; ``fail`` makes the next call raise it.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from jdisagg import cards, preset, toml_file
from jdisagg.engine import Engine
from jdisagg.model.config import shape
from jdisagg.runtime.buckets import bucket_for, length_buckets, token_buckets
from jdisagg.runtime.instances import Instances
from jdisagg.sched.params import Logprob
from jdisagg.transfer.base import KVTransfer

VOCAB = 256


@dataclasses.dataclass
class FakePrefix:
    first_token: int
    first_logprob: Logprob
    length: int
    held_tokens: int
    nbytes: int
    k: object = None
    v: object = None


class _Controlled:
    def __init__(self):
        self.gate: threading.Event | None = None
        self.fail: Exception | None = None
        self.delay = 0.0  # seconds each call takes
        self.calls: list = []

    def _enter(self, call) -> None:
        self.calls.append(call)
        time.sleep(self.delay)
        if self.gate is not None:
            # Generous: a loaded 2-core machine running the suite's other worker can stall a
            # test for long; only a test that forgets to open the gate should end here.
            assert self.gate.wait(120), "a fake runner's gate was never opened"
        if self.fail is not None:
            raise self.fail


class FakePrefill(_Controlled):
    def __init__(self, buckets: tuple[int, ...], max_batch: int, token_budget: int):
        super().__init__()
        self.length_buckets, self.token_budget = buckets, token_budget
        self.token_buckets = token_buckets(buckets, token_budget)
        self.max_prompts = max(1, min(max_batch, token_budget // buckets[0]))

    def run(self, prompts, params):
        self._enter([list(p) for p in prompts])
        out = []
        for p, sp in zip(prompts, params, strict=True):
            t = bucket_for(len(p), self.length_buckets)
            out.append(
                FakePrefix(
                    (p[-1] + 1) % VOCAB,
                    Logprob(-1.0, (((p[-1] + 1) % VOCAB, -1.0),) * sp.logprobs),
                    len(p),
                    t,
                    8 * t,
                )
            )
        return out

    def programs(self):
        return []

    def warm_up(self, progress=None) -> float:
        return 0.0


class _Sampled:
    def __init__(self, tokens):
        self.tokens = np.asarray(tokens, np.int32)

    def at_step(self, k: int) -> _Sampled:
        return _Sampled(self.tokens[k])

    def logprob(self, row: int, n: int) -> Logprob:
        return Logprob(-1.0, ((int(self.tokens[row]), -1.0),) * n)


class FakeDecode(_Controlled):
    def __init__(self, n_pages: int, page_size: int, max_batch: int, chunk_tokens: int = 0, steps: int = 1):
        super().__init__()
        self.n_pages, self.page_size, self.max_batch, self.chunk_tokens = n_pages, page_size, max_batch, chunk_tokens
        self.steps = steps  # decode steps per call: step k gives each row's token + k + 1
        self.prefix_sharding = None
        self.inserts: list[list[int]] = []

    def insert(self, k, v, pages):
        self.inserts.append(list(pages))

    def step(self, tokens, positions, page_tables, params, counts=None):
        self._enter(list(tokens))
        return _Sampled([[(t + k + 1) % VOCAB for t in tokens] for k in range(self.steps)])  # [steps, B]

    def mixed(self, tokens, positions, page_tables, params, chunk, chunk_start, chunk_pages, chunk_params):
        self._enter((list(tokens), list(chunk)))
        return _Sampled([(t + 1) % VOCAB for t in tokens] + [(chunk[-1] + 1) % VOCAB]), len(tokens)

    def programs(self):
        return []

    def warm_up(self, prefix_lengths, progress=None) -> float:
        return 0.0


class FakeTransfer(KVTransfer, _Controlled):
    def __init__(self):
        _Controlled.__init__(self)

    def pull(self, prefixes, dst):
        self._enter(len(prefixes))
        return [(None, None) for _ in prefixes]


def fake_engine(text: str, tokenizer=None) -> Engine:
    """An Engine over fake runners for the preset in TOML ``text`` (devices are not used)."""
    p = preset.parse(toml_file.tomllib.loads(text), "fake.toml")
    buckets = p.length_buckets or length_buckets(p.max_seq_len, p.page_size)
    prefill = [FakePrefill(buckets, s.max_batch, s.token_budget) for s in p.prefill]
    decode = [FakeDecode(s.pages, p.page_size, s.max_batch, s.chunk_tokens, s.steps_per_call) for s in p.decode]
    takes_from = [s.index if s.role == "colocated" else None for s in p.decode]
    instances = Instances(p, prefill, decode, takes_from, buckets, FakeTransfer())
    card = cards.ModelCard(name="fake", kind="random", shape="tiny-llama")
    loaded = cards.LoadedModel(card, shape("tiny-llama"), tokenizer)
    return Engine.over(loaded, instances)


class ByteTokenizer:
    """Text as its UTF-8 bytes (token id = byte), so the fake model's counting is readable as
    text; chat renders as ``<role>content`` per message."""

    eos_ids = (0,)
    bos_id, bos_token = None, None
    vocab_size = VOCAB
    longest_token_bytes = 3  # a lone byte of a multi-byte character decodes as U+FFFD

    def __init__(self):
        self.encoded: list[str] = []  # every text encode() saw

    def encode(self, text: str, add_bos=None) -> list[int]:
        self.encoded.append(text)
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode_chat_text(self, text: str) -> list[int]:
        return self.encode(text)


def counted(prompt: list[int], n: int) -> list[int]:
    """What the fake model generates for ``prompt`` in ``n`` tokens."""
    return [(prompt[-1] + i) % VOCAB for i in range(1, n + 1)]
