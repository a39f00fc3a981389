"""launch/demo.ipynb runs: its code cells, in order, as one script on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def notebook_script(path: Path) -> str:
    """The notebook's code cells as Python; IPython magics and shell lines (the install) dropped."""
    cells = json.loads(path.read_text())["cells"]
    lines = [
        line.rstrip("\n")
        for cell in cells
        if cell["cell_type"] == "code"
        for line in cell["source"]
        if not line.lstrip().startswith(("%", "!"))
    ]
    return "\n".join(lines) + "\n"


def test_demo_notebook_runs_on_cpu(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text(notebook_script(LAUNCH / "demo.ipynb"))
    root = str(LAUNCH.parent)  # importable without an install too
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=LAUNCH, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the default preset, disaggregated: its two instances on two devices
    assert "mesh preset cpu" in out and "prefill[0]: devices [0]" in out and "decode[0]: devices [1]" in out
    assert "Paris" in out
    assert "KV transfer" in out and "MiB" in out
    assert "goodput at 90% attainment (TTFT <= 10s, TPOT <= 2s)" in out
    assert not list(LAUNCH.glob("*.png"))  # plots go to a temporary folder
