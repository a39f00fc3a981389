"""Tokenizer: a tiny hand-made BPE (fast, offline) and the real SmolLM2 tokenizer from the default GGUF."""

import json

import pytest
import tokenizers
import weights_util

from jdisagg.text.output import IncrementalDetokenizer
from jdisagg.text.tokenizer import Tokenizer

SMOLLM_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _stream(tok: Tokenizer, ids, prompt_ids=()) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.push(i) for i in ids] + [detok.flush()]


# ---- tiny tokenizer ---------------------------------------------------------------------------


def test_tiny_bpe_merges_and_specials():
    tok = weights_util.tiny_tokenizer()
    ids = tok.encode("<|im_start|>the and then<|im_end|>")
    pieces = [tok.backend.id_to_token(i) for i in ids]
    assert pieces == ["<|im_start|>", "t", "he", "Ġand", "Ġthe", "n", "<|im_end|>"]
    assert tok.decode(ids) == "<|im_start|>the and then<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "the and then"


def test_bos_default_and_override():
    plain, with_bos = weights_util.tiny_tokenizer(), weights_util.tiny_tokenizer(add_bos=True)
    assert plain.encode("hi") == plain.encode("hi", add_bos=False) == [plain.token_to_id("h"), plain.token_to_id("i")]
    assert plain.encode("hi", add_bos=True) == [1, *plain.encode("hi")]
    assert with_bos.encode("hi") == [1, *plain.encode("hi")]
    assert with_bos.encode("hi", add_bos=False) == plain.encode("hi")


def test_chat_template():
    tok = weights_util.tiny_tokenizer(add_bos=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs) == text
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == text.removesuffix("<|im_start|>assistant\n")
    # BOS here is <|im_start|>, which the template writes first: encode_chat must not add another.
    assert tok.encode_chat(msgs) == tok.encode(text, add_bos=False)
    assert tok.encode_chat(msgs)[:2] == [1, tok.token_to_id("s")]
    # A template that does not write BOS: the model's default (add_bos=True here) applies.
    contents = tok.replace(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert contents.encode_chat(msgs) == [1, *tok.encode("Be brief.hi", add_bos=False)]
    with pytest.raises(ValueError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        tok.replace(chat_template=None).apply_chat_template(msgs)


def test_save_load_round_trip(tmp_path):
    tok = weights_util.tiny_tokenizer(add_bos=True).replace(eos_ids=(2, 0))
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_ids, loaded.add_bos, loaded.vocab_size) == (1, (2, 0), True, 256)
    assert loaded.chat_template == tok.chat_template
    text = "<|im_start|>the answer, then 42 ünïcode<|im_end|>"
    assert loaded.encode(text) == tok.encode(text)


def test_load_plain_hf_directory(tmp_path):
    """tokenizer.json + tokenizer_config.json; BOS default read from the post-processor."""
    backend = weights_util.tiny_tokenizer().backend
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "chat_template": "x"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == (1, (2,), True, "x")
    assert tok.encode("hi") == [1, tok.token_to_id("h"), tok.token_to_id("i")]  # BOS once, not twice
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "yo"}]) == "yo"


def test_unsupported_gguf_tokenizers():
    fields = weights_util.tiny_gguf_fields()
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": "mystery"})
    for pre in ("smollm", "llama-bpe", "qwen2"):
        tok = Tokenizer.from_gguf_fields({**fields, "tokenizer.ggml.pre": pre})
        assert tok.decode(tok.encode("the 2024 and then\n\n x")) == "the 2024 and then\n\n x"


def test_detokenizer_holds_back_split_characters():
    tok = weights_util.tiny_tokenizer()  # no merges beyond ASCII: every non-ASCII char spans tokens
    text = "héllo 世界 🙂!"
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[ids.index(tok.token_to_id("h")) + 1] == ""  # first byte of "é": held back
    # A stream that ends inside a character: flush emits what is left.
    truncated = _stream(tok, ids[:-2])  # "🙂" cut after two of its four bytes (then "!" dropped)
    assert "".join(truncated) == tok.decode(ids[:-2]) and truncated[-1].endswith("\ufffd")


# ---- the real default tokenizer -----------------------------------------------------------------


def test_default_tokenizer_round_trip():
    tok = weights_util.default_tokenizer()
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, (2,), False, 49152)
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "  indented\n\ttabs, 'quotes' & 12345",
        "héllo 世界 🙂",
    ]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[::4] == [1, 2]
    # The SmolLM pre-tokenizer puts every digit in its own token.
    pieces = [tok.backend.id_to_token(i) for i in tok.encode("Hello world in 2024")]
    assert pieces == ["Hello", "Ġworld", "Ġin", "Ġ", "2", "0", "2", "4"]


def test_default_chat_template():
    tok = weights_util.default_tokenizer()
    assert tok.apply_chat_template(QUESTION) == SMOLLM_CHAT
    ids = tok.encode_chat(QUESTION)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # three <|im_start|>, two <|im_end|>
    assert tok.decode(ids) == SMOLLM_CHAT


def test_default_detokenizer_multibyte():
    tok = weights_util.default_tokenizer()
    text = "héllo 世界 🙂 done"
    ids = tok.encode(text)
    for prompt in ([], tok.encode_chat(QUESTION)):
        deltas = _stream(tok, ids, prompt)
        assert "".join(deltas) == tok.decode(ids) == text
        assert all("\ufffd" not in d for d in deltas)
        assert "" in deltas  # some token ended inside a character
