"""Request intake: the one place every entry point (the offline engine, the gRPC and HTTP
servers) turns a prompt and sampling values into a ``Request``, checked against the limits.

Bad input raises ``ValueError`` with a message naming the field; nothing that passes can
fail later in a worker (every value fits what the device programs hold). Text is rejected by
size before it is tokenized: a text of more than ``max_prompt_tokens * longest_token_bytes``
UTF-8 bytes cannot fit, whatever its tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from jdisagg.sched.params import SamplingParams
from jdisagg.sched.request import Request
from jdisagg.text.output import TextOutput

CHAT_ROLES = ("system", "user", "assistant")  # the roles a chat message may have
MAX_REQUEST_ID_BYTES = 256


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request may ask for."""

    max_prompt_tokens: int  # after tokenization and chat templating
    max_tokens: int  # most new tokens one request may ask for (prompt + output is still capped by max_seq_len)
    vocab_size: int  # token ids are in [0, vocab_size)
    max_prompt_bytes: int  # UTF-8 bytes of a text prompt or of a chat's messages; 0: no text (no tokenizer)


class Intake:
    """Validates prompts and sampling values for one served model."""

    def __init__(self, tokenizer, *, vocab_size: int, max_seq_len: int, model_name: str):
        self.tokenizer, self.model_name = tokenizer, model_name
        longest = tokenizer.longest_token_bytes if tokenizer is not None else 0
        self.limits = Limits(
            max_prompt_tokens=max_seq_len - 1,
            max_tokens=max_seq_len - 1,
            vocab_size=vocab_size,
            max_prompt_bytes=(max_seq_len - 1) * longest,
        )

    # ---- prompts -----------------------------------------------------------------------

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_name} has no tokenizer: pass token ids, not {what}")

    def _check_bytes(self, n: int, what: str) -> None:
        if n > self.limits.max_prompt_bytes:
            raise ValueError(
                f"the {what} has {n:,} bytes; it cannot fit in {self.limits.max_prompt_tokens} tokens "
                f"(at most {self.limits.max_prompt_bytes:,} bytes)"
            )

    def encode_text(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of a text prompt (size checked first)."""
        self._need_tokenizer("text")
        self._check_bytes(_utf8_len(text), "text")
        return self.tokenizer.encode(text, add_bos=add_bos)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of chat messages rendered with the model's template."""
        self._need_tokenizer("chat messages")
        if not messages:
            raise ValueError("chat has no messages")
        for i, m in enumerate(messages):
            if m.get("role") not in CHAT_ROLES:
                raise ValueError(
                    f"messages[{i}].role is {m.get('role')!r:.80}; a role is one of {', '.join(CHAT_ROLES)}"
                )
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        self._check_bytes(sum(_utf8_len(m["content"]) for m in messages), "chat")
        text = self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages])
        self._check_bytes(_utf8_len(text), "chat")
        return self.tokenizer.encode_chat_text(text)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Text or token ids."""
        if isinstance(prompt, str):
            return self.encode_text(prompt)
        return [int(t) for t in prompt]

    # ---- requests ----------------------------------------------------------------------

    def request(self, tokens: Sequence[int], params: SamplingParams) -> Request:
        """A request for ``tokens`` (already encoded) sampled with ``params``."""
        lim = self.limits
        tokens = list(tokens)
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) > lim.max_prompt_tokens:
            raise ValueError(
                f"the prompt has {len(tokens)} tokens; this mesh preset allows at most "
                f"{lim.max_prompt_tokens} (max_seq_len={lim.max_prompt_tokens + 1} counts prompt and output)"
            )
        bad = [t for t in tokens if not 0 <= t < lim.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {lim.vocab_size})")
        if params.max_tokens > lim.max_tokens:
            raise ValueError(f"max_tokens={params.max_tokens} exceeds the limit of {lim.max_tokens}")
        bad = [t for t in params.stop_token_ids if t >= lim.vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {lim.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"model {self.model_name} has no tokenizer, so no stop strings")
        text = TextOutput(self.tokenizer, tokens, params.stop) if self.tokenizer is not None else None
        return Request(tokens, params, text=text)


def check_slo(ttft_s: float, tpot_s: float) -> None:
    """A request's latency targets: finite and >= 0 (0 means none)."""
    for name, value in (("ttft_s", ttft_s), ("tpot_s", tpot_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"slo.{name} must be a finite number >= 0 (got {value})")


def check_request_id(request_id: str) -> None:
    if _utf8_len(request_id) > MAX_REQUEST_ID_BYTES:
        raise ValueError(f"request_id has more than {MAX_REQUEST_ID_BYTES} bytes")


def _utf8_len(text: str) -> int:
    """UTF-8 bytes of ``text``; ValueError for a text that has none (a lone surrogate, which a
    Python caller can pass and a tokenizer would fail on)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: {e.reason} at character {e.start}") from None
