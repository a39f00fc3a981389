"""``python -m jdisagg.generate``: output, and exit status 2 with a message on bad input."""

import json
import subprocess
import sys

import pytest

from jdisagg.engine import Engine
from jdisagg.sched.params import SamplingParams


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "jdisagg.generate", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_json_matches_engine():
    proc = _run(
        "--model",
        "tiny-llama",
        "--mesh",
        "cpu-tp2-pp2",
        "--prompt_ids",
        "5,6,7,8",
        "--max_tokens",
        "5",
        "--ignore_eos",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    engine = Engine("tiny-llama", "cpu-single", warm_up=False, progress=False)
    expected = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert result["tokens"] == expected.tokens and result["finish_reason"] == "length"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--mesh", "nope", "--prompt", "hi"], "unknown mesh preset 'nope'"),
        (["--model", "tiny-llama", "--mesh", "cpu-single", "--prompt_ids", "1,2", "--top_p", "0"], "top_p"),
        (["--model", "tiny-llama", "--mesh", "cpu-single", "--prompt", "hi"], "no tokenizer"),
        (["--model", "tiny-llama"], "give at least one --prompt"),
    ],
)
def test_bad_input_exits_2(args, message):
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
