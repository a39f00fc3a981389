"""Reading the small TOML files of ``models/`` and ``meshes/``, with errors that name the file."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve(name_or_path: str, folder: str, what: str) -> Path:
    """A file path as given, or ``<repo>/<folder>/<name>.toml``; a clear error lists known names."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        return path
    candidate = REPO_ROOT / folder / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in (REPO_ROOT / folder).glob("*.toml"))
    raise ValueError(f"unknown {what} {name_or_path!r}; known: {', '.join(known)} (or give a path to a .toml file)")


def read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from None


def check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
