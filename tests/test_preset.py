"""Mesh presets: every shipped preset parses; bad ones fail with the offending field named."""

from pathlib import Path

import pytest

from jdisagg import preset
from jdisagg.model.config import shape

MESHES = Path(__file__).resolve().parent.parent / "meshes"
GOOD = """
page_size = 16
max_seq_len = 512
[[prefill]]
devices = [0, 1, 2, 3]
tp = 4
[[decode]]
devices = [4, 5, 6, 7]
pp = 2
tp = 2
pages = 64
"""


def _load(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return preset.load_preset(str(path))


@pytest.mark.parametrize("path", sorted(MESHES.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_presets_parse(path):
    p = preset.load_preset(str(path))
    assert p.decode and (p.prefill or p.colocated)
    assert p.device_count() <= 8


def test_presets_by_name_and_required_platforms():
    names = {p.stem for p in MESHES.glob("*.toml")}
    assert {"cpu", "gpu-2", "gpu-4", "gpu-8", "tpu-v5e-8", "tpu-v6e-8"} <= names
    assert preset.load_preset("cpu").name == "cpu"
    with pytest.raises(ValueError, match="unknown mesh preset 'nope'; known: .*cpu"):
        preset.load_preset("nope")
    with pytest.raises(FileNotFoundError):
        preset.load_preset("/no/such/preset.toml")


def test_unroll_layers_is_read(tmp_path):
    assert not _load(tmp_path, GOOD).unroll_layers
    assert _load(tmp_path, GOOD.replace("max_seq_len = 512", "max_seq_len = 512\nunroll_layers = true")).unroll_layers


def test_decode_attention_is_read(tmp_path):
    assert _load(tmp_path, GOOD).decode_attention == "dot"
    text = GOOD.replace("max_seq_len = 512", 'max_seq_len = 512\ndecode_attention = "pallas"')
    assert _load(tmp_path, text).decode_attention == "pallas"


def test_good_preset_validates(tmp_path):
    _load(tmp_path, GOOD).validate(shape("tiny-llama"), 8)
    assert _load(tmp_path, GOOD.replace("pages = 64", "")).decode[0].pages == 0  # sized from memory at start


def test_pages_must_be_given_without_memory_statistics(tmp_path):
    from jdisagg.engine import Engine

    path = tmp_path / "p.toml"
    path.write_text(GOOD.replace("pages = 64", ""))
    with pytest.raises(ValueError, match=r"decode\[0\].pages is required on this platform"):
        Engine("tiny-llama", str(path), warm_up=False, progress=False)


@pytest.mark.parametrize(
    "edit,message",
    [
        (("pp = 2\ntp = 2", "pp = 2\ntp = 1"), r"decode\[0\]: pp \* tp = 2 but devices lists 4"),
        (("devices = [4, 5, 6, 7]", "devices = [3, 4, 5, 6]"), r"device 3 is in both prefill\[0\].devices and decode"),
        (("pages = 64", "pages = 1"), r"decode\[0\].pages"),
        (("tp = 4", "tp = 4\ntpp = 1"), r"prefill\[0\]: unknown field\(s\) tpp"),
        (("page_size = 16", "page_size = 0"), r"page_size must be a positive integer"),
        (("[[decode]]", "[[decoder]]"), r"unknown field\(s\) decoder"),
        (("devices = [0, 1, 2, 3]", "devices = [0, 0, 2, 3]"), r"lists a device twice"),
        (("tp = 4", "tp = 2\npp = 2"), r"prefill\[0\].pp=2: prefill runs tensor parallel only"),
        (("max_seq_len = 512", "max_seq_len = ["), r"invalid TOML"),
        (("max_seq_len = 512", "max_seq_len = 512\nunroll_layers = 1"), r"unroll_layers must be true or false"),
        (
            ("max_seq_len = 512", 'max_seq_len = 512\ndecode_attention = "fast"'),
            r"decode_attention must be one of 'dot', 'pallas', not 'fast'",
        ),
    ],
)
def test_bad_preset_names_the_field(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        _load(tmp_path, GOOD.replace(*edit, 1))


def test_preset_against_model_and_host(tmp_path):
    p = _load(tmp_path, GOOD)
    with pytest.raises(ValueError, match=r"decode\[0\].devices asks for device 6, but this host has 6 device"):
        p.validate(shape("tiny-llama"), 6)
    # SmolLM2 has 3 kv heads: tp=4 cannot shard them.
    with pytest.raises(ValueError, match=r"prefill\[0\].tp=4 does not divide the model's (heads|kv_heads) \(9|3\)"):
        p.validate(shape("smollm2-135m"), 8)
    five_layers = shape("tiny-llama").replace(n_layers=5)
    with pytest.raises(ValueError, match=r"decode\[0\].pp=2 does not divide the model's layers \(5\)"):
        p.validate(five_layers, 8)
    # The kernels run per device over each device's heads (attention.HeadSplit): pp=2 x tp=2 takes
    # them; rules that split query heads and KV heads differently do not.
    pallas_text = GOOD.replace("max_seq_len = 512", 'max_seq_len = 512\ndecode_attention = "pallas"')
    for platform in ("gpu", "tpu"):
        _load(tmp_path, pallas_text).validate(shape("tiny-llama"), 8, platform)
    split_kv = _load(tmp_path, pallas_text + 'rules = { kv_heads = "" }\n')
    with pytest.raises(
        ValueError,
        match=r"\"pallas\" runs on each device over its own heads, but decode\[0\]\.rules split heads over "
        r"'tp' and kv_heads over None; put both on one mesh axis, or use \"dot\"$",
    ):
        split_kv.validate(shape("tiny-llama"), 8)
    one_device = _load(
        tmp_path, 'max_seq_len = 512\ndecode_attention = "pallas"\n[[colocated]]\ndevices = [0]\npages = 64\n'
    )
    one_device.validate(shape("tiny-llama"), 1, "gpu")
    one_device.validate(shape("tiny-llama"), 1, "tpu")  # JAX's TPU paged attention (tpu_attention)
    with pytest.raises(ValueError, match=r"\"pallas\" has kernels for GPUs and TPUs; on metal use \"dot\""):
        one_device.validate(shape("tiny-llama"), 1, "metal")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        p.validate(shape("tiny-llama").replace(max_seq_len=256), 8)
    with pytest.raises(ValueError, match="needs at least one"):
        _load(tmp_path, "[[prefill]]\ndevices = [0]\n")
