"""One linter and formatter for the whole tree: ruff, configured in pyproject.toml."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: install the test extras (pip install -e '.[test]')")
    for command in (["check"], ["format", "--check"]):
        proc = subprocess.run([ruff, *command, str(ROOT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
