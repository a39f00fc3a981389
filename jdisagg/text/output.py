"""A request's output text, in one place for the offline engine and every server: streaming
detokenization, stop tokens (they end the text but are not part of it) and stop strings.

``TextOutput`` is fed every generated token by the scheduler's update step. It detokenizes
incrementally (``IncrementalDetokenizer``), finds stop strings in the text added since the
last check only, and hands out text only once no stop string can still cut it: it holds back
the longest suffix that could be the start of a stop string. So a stream never sends text
that a stop string later removes, and the streamed pieces join to exactly the offline text.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    """Streaming text deltas from a growing token list.

    Decodes a window of recent tokens rather than the whole list. The window starts about
    ``context`` tokens before the first unemitted one (at a character boundary), so decoders
    that treat the first token specially (leading spaces) see the same context every time;
    it grows with each token and slides forward once it is ``4 * context`` long, so a token
    costs about one decode of a short window. A delta is emitted only when the window's text
    grew and does not end in U+FFFD, i.e. not in the middle of a multi-byte character split
    across tokens; held-back text comes out once complete, or in ``flush``.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), context: int = 5):
        self.tokenizer = tokenizer
        self._context = context
        self._ids = [int(i) for i in prompt_ids]
        self._start = self._window_start()
        # Characters of the window's text already emitted (or part of the prompt). A prompt
        # that ends inside a multi-byte character: that character is emitted whole, later.
        self._done = len(self._decode_window().rstrip("\ufffd"))

    def _decode_window(self) -> str:
        return self.tokenizer.decode(self._ids[self._start :])

    def _window_start(self) -> int:
        """``context`` tokens back, then further back (a little) until not inside a character."""
        start = max(len(self._ids) - self._context, 0)
        for _ in range(3):  # a UTF-8 character has at most 3 continuation bytes
            if start == 0 or not self.tokenizer.decode(self._ids[start:]).startswith("\ufffd"):
                break
            start -= 1
        return start

    def _delta(self, final: bool) -> str:
        text = self._decode_window()
        if len(text) <= self._done or (text.endswith("\ufffd") and not final):
            return ""
        delta = text[self._done :]
        self._done = len(text)
        if len(self._ids) - self._start >= 4 * self._context:  # slide the window forward
            self._start = self._window_start()
            self._done = len(self._decode_window())
        return delta

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text that became final (possibly "")."""
        self._ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """The text still held back at the end (an incomplete character decodes as U+FFFD)."""
        return self._delta(final=True)


class TextOutput:
    """One request's output text: detokenized as tokens come, cut before the first stop
    string, and held back while a stop string may still be starting."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = tuple(stop)
        self._pending = ""  # text made but not handed out: it may end in the start of a stop string
        self._sent: list[str] = []
        self.stopped = False  # a stop string was found; no more text

    @property
    def text(self) -> str:
        """Everything handed out so far (the whole text, once ``finish`` has run)."""
        return "".join(self._sent)

    def push(self, token: int, shown: bool = True) -> bool:
        """Adds a generated token (``shown=False``: a stop token, no text); True once a stop
        string has completed."""
        if shown and not self.stopped:
            self._pending += self._detok.push(token)
            self._find_stop()
        return self.stopped

    def take(self) -> str:
        """The text no stop string can cut any more: all of it but the held-back suffix."""
        keep = self._holdback()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        self._sent.append(out)
        return out

    def finish(self) -> str:
        """The rest of the text, at the end of the request."""
        if not self.stopped:
            self._pending += self._detok.flush()
            self._find_stop()
        out, self._pending = self._pending, ""
        self._sent.append(out)
        return out

    def _find_stop(self) -> None:
        """Cuts the pending text before the earliest stop string in it. A stop string cannot
        start in text already handed out (``take`` keeps every suffix that could start one),
        so the pending text is all that needs searching."""
        cut = min((i for s in self._stop if (i := self._pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._pending = self._pending[:cut]
            self.stopped = True

    def _holdback(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        if self.stopped:
            return 0
        text, best = self._pending, 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
