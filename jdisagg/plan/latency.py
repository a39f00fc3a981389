"""Latency models of the compiled programs, fitted from profiled points (plain Python + NumPy).

Each program's time is a non-negative linear combination of a few features of its call. Two
forms are fitted for prefill and decode and the one with the smaller held-out error is kept:

* ``paper`` (DistServe, DESIGN.md section 1, with the model's constants folded into the
  coefficients): prefill ``C1*t + C2*t2 + C3`` (t prompt tokens of the call, t2 the sum of
  their squared lengths); decode ``C4 + C5*context`` (context: the batch's total tokens).
* ``bucketed`` (what jdisagg's programs compute): a prefill call packs its prompts into one
  row of a compiled token bucket N, so it costs ``N`` and ``N^2`` (attention over the row)
  rather than the prompt tokens, plus ``t2`` and one cut per prompt; a decode step runs a
  compiled batch bucket and reads ``read`` KV positions (each row's own context with the
  Pallas kernel, the batch bucket times the page-table width with ``dot``), plus a host cost
  per row.

Features, by name (``features`` builds them; the fits store only names and coefficients):

    prefill: one, tokens, sq_tokens, row, sq_row, prompts
    decode:  one, rows, batch, context, read
    mixed:   the decode features, and chunk_context (the chunk's last position + 1)
    insert:  one, tokens      (pulling one prefix into the decode pool: bucket tokens)
    transfer: one, bytes      (moving one prefix between devices)

Fitting minimizes the squared *relative* error (rows scaled by 1/time) under non-negative
coefficients (Lawson-Hanson NNLS), so short calls weigh as much as long ones and no term can
make a bigger call cheaper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

FORMS: dict[str, dict[str, tuple[str, ...]]] = {
    "prefill": {
        "paper": ("one", "tokens", "sq_tokens"),
        "bucketed": ("one", "row", "sq_row", "sq_tokens", "prompts"),
    },
    "decode": {
        "paper": ("one", "context"),
        "bucketed": ("one", "rows", "batch", "read"),
    },
    "mixed": {"bucketed": ("one", "rows", "batch", "read", "chunk_context")},
    "insert": {"linear": ("one", "tokens")},
    "transfer": {"linear": ("one", "bytes")},
}
HELD_OUT = 0.25  # fraction of the points kept out of the fit to measure its error


@dataclasses.dataclass(frozen=True)
class Fit:
    """``seconds = sum(coef[i] * x[features[i]])`` for one program kind."""

    form: str
    features: tuple[str, ...]
    coef: tuple[float, ...]
    # Relative error on held-out points, per form tried: {"paper": {"mean": .., "max": ..}, ...}
    errors: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)

    def __call__(self, x: Mapping[str, float]) -> float:
        return sum(c * x[f] for f, c in zip(self.features, self.coef, strict=True))

    def as_dict(self) -> dict:
        return {"form": self.form, "features": list(self.features), "coef": list(self.coef), "errors": self.errors}

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> Fit:
        try:
            features, coef = tuple(str(f) for f in d["features"]), tuple(float(c) for c in d["coef"])
            form = str(d["form"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: a fit needs form, features and coef ({e})") from None
        known = {f for forms in FORMS.values() for fs in forms.values() for f in fs}
        if len(features) != len(coef) or not features or set(features) - known:
            raise ValueError(f"{where}: features {list(features)} and coef {list(coef)} do not match")
        if not all(math.isfinite(c) and c >= 0 for c in coef):
            raise ValueError(f"{where}: coefficients must be finite and >= 0, not {list(coef)}")
        return cls(form, features, coef, d.get("errors", {}))


# ---- features -------------------------------------------------------------------------------


def prefill_features(lengths: Sequence[int], row: int) -> dict[str, float]:
    """One prefill call of prompts of ``lengths`` packed into a row of ``row`` tokens."""
    t = sum(lengths)
    return {
        "one": 1.0,
        "tokens": float(t),
        "sq_tokens": float(sum(n * n for n in lengths)),
        "row": float(row),
        "sq_row": float(row * row),
        "prompts": float(len(lengths)),
    }


def decode_features(rows: int, batch: int, context: int, read: int, chunk_context: int = 0) -> dict[str, float]:
    """One decode step of ``rows`` requests in a batch bucket of ``batch``, ``context`` tokens in
    all, ``read`` KV positions read; ``chunk_context``: a mixed step's chunk end position."""
    return {
        "one": 1.0,
        "rows": float(rows),
        "batch": float(batch),
        "context": float(context),
        "read": float(read),
        "chunk_context": float(chunk_context),
    }


# ---- fitting --------------------------------------------------------------------------------


def nnls(a: np.ndarray, b: np.ndarray, iterations: int = 200) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    m, n = a.shape
    x, passive = np.zeros(n), np.zeros(n, bool)
    for _ in range(iterations):
        w = a.T @ (b - a @ x)
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12 * max(1.0, np.abs(w).max()):
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def _solve(points: Sequence[tuple[Mapping[str, float], float]], features: tuple[str, ...]) -> np.ndarray:
    a = np.array([[x[f] for f in features] for x, _ in points], float)
    y = np.array([t for _, t in points], float)
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    coef = nnls(a / scale / y[:, None], np.ones(len(y)))  # relative error: rows over their time
    return coef / scale


def relative_errors(fit_coef, features, points) -> dict[str, float]:
    errs = [abs(sum(c * x[f] for f, c in zip(features, fit_coef, strict=True)) / t - 1) for x, t in points]
    return {"mean": float(np.mean(errs)), "max": float(np.max(errs)), "points": len(errs)}


def split(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out points (every point trains when there are few)."""
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, round(n * HELD_OUT)) if n >= 8 else 0
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def fit(kind: str, points: Sequence[tuple[Mapping[str, float], float]], seed: int = 0) -> Fit:
    """The best form of ``kind`` for ``points`` ((features, seconds) pairs) by held-out error;
    the kept form is then refitted on every point."""
    if not points:
        raise ValueError(f"no profiled points to fit the {kind} model")
    train, held = split(len(points), seed)
    errors, best = {}, None
    for form, features in FORMS[kind].items():
        coef = _solve([points[i] for i in train], features)
        check = [points[i] for i in held] or [points[i] for i in train]
        errors[form] = relative_errors(coef, features, check) | {"held_out": bool(held)}
        if best is None or errors[form]["mean"] < errors[best]["mean"] * 0.98:  # ties go to the first (paper)
            best = form
    features = FORMS[kind][best]
    return Fit(best, features, tuple(float(c) for c in _solve(points, features)), errors)
