"""The compiled shapes: prompt length buckets, packed-row token buckets and decode batch
buckets (plain Python; the runners compile one program per bucket)."""

from __future__ import annotations

import itertools


def length_buckets(max_len: int, page_size: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two (multiples of the page size) up to ``max_len``, which is always last."""
    out, n = [], max(smallest, page_size)
    while n < max_len:
        out.append(-(-n // page_size) * page_size)
        n *= 2
    out.append(-(-max_len // page_size) * page_size)
    return tuple(sorted(set(out)))


def token_buckets(length_buckets: tuple[int, ...], token_budget: int) -> tuple[int, ...]:
    """Compiled packed-row lengths: the length buckets (one prompt may be that long), then
    1.5x and 2x steps past the largest until the token budget fits."""
    out = list(length_buckets)
    steps = (length_buckets[-1] * 2**k * f // 2 for k in itertools.count() for f in (3, 4))
    while out[-1] < token_budget:
        out.append(next(steps))
    return tuple(out)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def powers_of_two(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch``."""
    out, n = [], 1
    while n < max_batch:
        out.append(n)
        n *= 2
    return (*out, max_batch)
