"""Text <-> token ids: a thin layer over the ``tokenizers`` library.

``Tokenizer`` adds what serving needs on top of the raw BPE: the model's BOS/EOS ids, its
default for prepending BOS, and its chat template (rendered with a sandboxed jinja2
environment, the way Hugging Face renders it). It is built either from GGUF metadata
(``from_gguf_fields``: vocabulary, merges and token types of a GPT-2-style BPE) or from a
Hugging Face directory (``load``: ``tokenizer.json`` + ``tokenizer_config.json``).

BOS handling is ours, not the post-processor's: ``encode`` never runs the underlying
post-processor and prepends BOS itself when asked to (or when the model does so by default).

Streaming output text (detokenization, stop strings) is ``jdisagg.text.output``.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

META_FILE = "jdisagg_tokenizer.json"  # our metadata next to tokenizer.json (see ``save``)

# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Split regexes of the GGUF ``tokenizer.ggml.pre`` types we support, matching the
# pre-tokenizers in the corresponding Hugging Face ``tokenizer.json`` files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer for GGUF pre type ``pre`` (byte-level BPE vocabularies)."""
    if pre in ("default", "gpt2", "gpt-2"):
        # GPT-2's own split regex, built into ByteLevel.
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Every digit on its own, then GPT-2's regex (SmolLM/StarCoder tokenizer.json).
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    regex = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
    if pre in regex:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(regex[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = "default, gpt2, smollm, starcoder, refact, codeshell, llama-bpe, qwen2"
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {known}")


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_template_error(message: str):
    raise ValueError(f"chat template error: {message}")


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


class Tokenizer:
    """A BPE tokenizer with the model's special ids and chat template."""

    bos_id: int | None
    eos_ids: tuple[int, ...]
    vocab_size: int
    chat_template: str | None
    add_bos: bool  # the model's default for prepending BOS in ``encode``

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_ids: Sequence[int],
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self._tok = tok
        self.bos_id = bos_id
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.chat_template = chat_template
        self.add_bos = bool(add_bos) and bos_id is not None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
            f"add_bos={self.add_bos}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    def replace(self, **changes) -> Tokenizer:
        """A copy with some of ``bos_id``, ``eos_ids``, ``chat_template``, ``add_bos`` changed."""
        kw = dict(bos_id=self.bos_id, eos_ids=self.eos_ids, chat_template=self.chat_template, add_bos=self.add_bos)
        kw.update(changes)
        return Tokenizer(self._tok, **kw)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._tok.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._tok.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    # ---- text <-> ids ------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text map to their ids.

        ``add_bos=None`` follows the model's default (``self.add_bos``).
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token decodes to (a part of a character counts as a whole
        U+FFFD), so a text of n bytes has at least n / this many tokens."""
        texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return max(len(t.encode("utf-8", "surrogatepass")) for t in texts)

    # ---- chat --------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead of chat messages")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Template then encode; BOS is not added again when the template already writes it."""
        return self.encode_chat_text(self.apply_chat_template(messages, add_generation_prompt))

    def encode_chat_text(self, text: str) -> list[int]:
        """Encodes a rendered chat template; BOS only if the template did not write it."""
        has_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, add_bos=False if has_bos else None)

    # ---- persistence -------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` and ``jdisagg_tokenizer.json`` (special ids, template, BOS default)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        meta = dict(
            bos_id=self.bos_id, eos_ids=list(self.eos_ids), chat_template=self.chat_template, add_bos=self.add_bos
        )
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Reads what ``save`` wrote, or a plain Hugging Face tokenizer directory."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
            return cls(
                tok,
                bos_id=meta.get("bos_id"),
                eos_ids=meta.get("eos_ids") or (),
                chat_template=meta.get("chat_template"),
                add_bos=bool(meta.get("add_bos")),
            )
        return cls._load_hf(directory)

    @classmethod
    def _load_hf(cls, directory: Path) -> Tokenizer:
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if (directory / "tokenizer.json").exists():
            tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            tok = _gpt2_files_tokenizer(directory, config)
        else:
            raise FileNotFoundError(
                f"{directory}: no tokenizer.json (nor GPT-2 style vocab.json + merges.txt); "
                "sentencepiece-only tokenizers are not supported"
            )

        def token_id(key: str) -> int | None:
            content = _token_content(config.get(key))
            return None if content is None else tok.token_to_id(content)

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # what the post-processor does, e.g. Llama 3's TemplateProcessing
            with_special = tok.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and len(with_special) > 1 and with_special[0] == bos_id
        return cls(
            tok,
            bos_id=bos_id,
            eos_ids=() if eos_id is None else (eos_id,),
            chat_template=_hf_chat_template(directory, config),
            add_bos=add_bos,
        )

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Builds the tokenizer from GGUF metadata given as plain values (``tokenizer.ggml.*`` keys)."""
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r}: only GPT-2 style byte-level BPE ('gpt2') is supported "
                "(sentencepiece 'llama' vocabularies are not)"
            )
        tokens = list(fields["tokenizer.ggml.tokens"])
        types = list(fields.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or ()]
        pre = fields.get("tokenizer.ggml.pre") or "default"
        vocab = {t: i for i, t in enumerate(tokens)}
        llama3 = pre in ("llama-bpe", "llama3", "llama-v3")
        # Llama 3 looks whole words up before merging (``ignore_merges`` in its tokenizer.json).
        tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=llama3))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        added = [
            tokenizers.AddedToken(t, special=ty == _TOKEN_CONTROL, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ]
        if added:
            tok.add_tokens(added)

        def opt_id(key: str) -> int | None:
            value = fields.get(key)
            return None if value is None else int(value)

        eos_ids = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            i = opt_id(f"tokenizer.ggml.{key}")
            if i is not None and i not in eos_ids:
                eos_ids.append(i)
        add_bos = fields.get("tokenizer.ggml.add_bos_token")
        return cls(
            tok,
            bos_id=opt_id("tokenizer.ggml.bos_token_id"),
            eos_ids=eos_ids,
            chat_template=fields.get("tokenizer.chat_template"),
            add_bos=llama3 if add_bos is None else bool(add_bos),  # llama.cpp's defaults
        )


def _gpt2_files_tokenizer(directory: Path, config: dict) -> tokenizers.Tokenizer:
    """A byte-level BPE from GPT-2 style vocab.json + merges.txt (e.g. OPT checkpoints)."""
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = decoders.ByteLevel()
    specials = {_token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials |= {_token_content(v) for v in (config.get("added_tokens_decoder") or {}).values()}
    tok.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False) for s in sorted(specials - {None})]
    )
    return tok


def _hf_chat_template(directory: Path, config: dict) -> str | None:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    if (directory / "chat_template.jinja").exists():
        return (directory / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.json").exists():
        template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template
