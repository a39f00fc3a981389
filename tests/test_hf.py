"""Hugging Face directories: write_hf/read_hf round trips, config mapping, checkpoint variants."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import weights_util

from jdisagg.model import attention, decoder
from jdisagg.model.config import shape
from jdisagg.weights.hf import config_from_hf, read_hf, write_hf

SHAPES = ["tiny-llama", "tiny-qwen2", "tiny-opt"]


@pytest.mark.parametrize("name", SHAPES)
def test_round_trip(tmp_path, name):
    cfg = shape(name)
    params = decoder.init_params(cfg, jax.random.key(3))
    write_hf(tmp_path, cfg, params, weights_util.tiny_tokenizer())
    cfg2, params2, tok = read_hf(tmp_path)
    assert cfg2 == cfg
    weights_util.assert_matches_abstract(cfg, params2)
    weights_util.assert_same_tree(params, params2)
    assert ("lm_head" in params2["head"]) == (not cfg.tie_embeddings)
    assert tok.bos_id == 1 and tok.eos_ids == (2,) and tok.chat_template == weights_util.CHATML


def test_sharded_checkpoint_without_model_prefix(tmp_path):
    """facebook/opt-* checkpoints name tensors without "model."; big ones are split in shards."""
    cfg = shape("tiny-opt")
    params = decoder.init_params(cfg, jax.random.key(4))
    write_hf(tmp_path, cfg, params, weights_util.tiny_tokenizer())
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        file = f"model-{shard + 1:05d}-of-00002.safetensors"
        # bfloat16 on disk, as most checkpoints are: read back as float32.
        safetensors.numpy.save_file({n.removeprefix("model."): tensors[n].astype(ml_dtypes.bfloat16) for n in part},
                                    tmp_path / file)  # fmt: skip
        weight_map.update(dict.fromkeys((n.removeprefix("model.") for n in part), file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg2, params2, _ = read_hf(tmp_path)
    assert cfg2 == cfg
    weights_util.assert_matches_abstract(cfg, params2)
    weights_util.assert_same_tree(params, params2, atol=1e-2)  # bfloat16 rounding of ~N(0, 0.02) weights


def test_missing_pieces(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_hf(tmp_path)
    cfg = shape("tiny-llama")
    write_hf(tmp_path, cfg, decoder.init_params(cfg, jax.random.key(0)), weights_util.tiny_tokenizer())
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight is missing"):
        read_hf(tmp_path)


def _llama_config(**changes):
    hf = dict(
        model_type="llama", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=[2, 3], tie_word_embeddings=False,
    )  # fmt: skip
    hf.update(changes)
    return hf


def test_config_mapping():
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192, unused=None)  # fmt: skip
    cfg = config_from_hf(_llama_config(rope_scaling=scaling, head_dim=16))
    assert cfg.arch == "llama" and cfg.n_kv_heads == 2 and cfg.head_dim == 16 and cfg.eos_ids == (2, 3)
    assert cfg.rope_scaling == tuple(sorted((k, v) for k, v in scaling.items() if v is not None))
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-6 and not cfg.qkv_bias
    assert config_from_hf(_llama_config(model_type="qwen2")).qkv_bias
    mistral = config_from_hf(_llama_config(model_type="mistral", sliding_window=1024))
    assert mistral.max_seq_len == 1024
    assert config_from_hf(_llama_config(model_type="mistral", sliding_window=None)).max_seq_len == 4096


def test_config_rejections():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
        config_from_hf(_llama_config(model_type="gpt_neox"))
    opt = dict(model_type="opt", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               ffn_dim=128, max_position_embeddings=2048)  # fmt: skip
    assert config_from_hf(opt).tie_embeddings
    with pytest.raises(ValueError, match="do_layer_norm_before"):
        config_from_hf({**opt, "do_layer_norm_before": False})
    with pytest.raises(ValueError, match="word_embed_proj_dim"):
        config_from_hf({**opt, "word_embed_proj_dim": 32})


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = shape(name)
    params = decoder.init_params(cfg, jax.random.key(5))
    write_hf(tmp_path, cfg, params, weights_util.tiny_tokenizer())
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    tokens = np.array([[1, 40, 90, 120, 7, 200, 33, 5]])
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens)).logits[:, -1].numpy()
    pos = jnp.arange(tokens.shape[1])[None]
    x = decoder.embed(cfg, params, tokens, pos)
    x, _ = decoder.forward_layers(
        cfg, params["layers"], x, pos, attention.PromptKV.empty(cfg, 1, tokens.shape[1]), unroll=False
    )
    np.testing.assert_allclose(np.asarray(decoder.logits(cfg, params, x[:, -1])), expected, atol=1e-4)
