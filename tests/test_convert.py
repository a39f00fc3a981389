"""A converted checkpoint serves the same tokens as its source, restored onto each mesh."""

import subprocess
import sys

from jdisagg import cards
from jdisagg.cards import write_checkpoint as convert
from jdisagg.engine import Engine
from jdisagg.sched.params import SamplingParams


def test_checkpoint_round_trip_through_engine(tmp_path):
    out = tmp_path / "ckpt"
    convert("tiny-opt", str(out))
    assert cards.load_card(str(out)).kind == "orbax"
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    source = Engine("tiny-opt", "cpu-single", warm_up=False, progress=False).generate(prompts, params)
    restored = Engine(str(out), "cpu-tp2-pp2", warm_up=False, progress=False)
    # Each decode stage restored only its half of the layers.
    layer_q = restored.decode[0].runner.params["layers"]["q"]["kernel"]
    assert {s.data.shape[0] for s in layer_q.addressable_shards} == {restored.cfg.n_layers // 2}
    assert [c.tokens for c in restored.generate(prompts, params)] == [c.tokens for c in source]


def test_convert_cli_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jdisagg.convert", "--model", "nope", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr
