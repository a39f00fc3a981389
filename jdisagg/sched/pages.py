"""Host-side page allocator for a paged KV cache (plain Python; never touches a device).

Page 0 is the null page (see ``jdisagg.attention.NULL_PAGE``) and is never handed out.
"""

from __future__ import annotations


def pages_for(tokens: int, page_size: int) -> int:
    """Pages needed to hold ``tokens`` positions."""
    return -(-tokens // page_size)


class PageAllocator:
    """A free list of page ids ``1 .. n_pages - 1``."""

    def __init__(self, n_pages: int):
        if n_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page), got {n_pages}")
        self.capacity = n_pages - 1
        self._free = list(range(n_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` page ids, or None (and nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
