"""A profile: what one machine's compiled programs cost, as fitted latency models (JSON; no jax).

Written by ``python -m jdisagg.plan profile`` (``jdisagg.plan.profiler``) and read by
``simulate`` and ``search``, so plans can be made for hardware the planner does not run on.
The format (README, "Planner"), version 1::

    {"format": "jdisagg.plan.profile/1",
     "model": "llama3-8b", "shape": {ModelConfig fields}, "dtype": "bfloat16",
     "platform": "gpu", "device_kind": "NVIDIA H200", "devices": 1,
     "memory_per_device": bytes (what JAX may allocate on one device),
     "commit": "...", "jax": "0.11.2", "created": "2026-12-01T10:00:00Z",
     "serving": {page_size, max_seq_len, length_buckets, decode_attention, unroll_layers,
                 prefill_max_batch, decode_max_batch, batch_buckets, chunk_tokens},
     "configs": [{"tp": 1, "pp": 1, "weight_bytes": per device, "prefill_scratch": {"N": bytes},
                  "L_m": tokens, "decode_attention": "pallas",
                  "prefill" | "decode" | "mixed" | "insert": Fit, "points": {kind: [[features, s], ...]}}],
     "transfer": {"fit": Fit, "measured": true, "note": "..."},
     "host": {"step_s": .., "row_s": ..}}

A ``Fit`` is ``{"form", "features", "coef", "errors"}`` (``jdisagg.plan.latency``); ``points``
keeps the raw measurements so a profile can be refitted without the machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

from jdisagg.model.config import ModelConfig
from jdisagg.plan.latency import Fit

FORMAT = "jdisagg.plan.profile/1"
# Moving a prefix between two devices when the profile could not measure it (one device):
# the same-split device_put of DESIGN.md section 5 (286 GB/s NVLink, ~0.2 ms dispatch).
DEFAULT_TRANSFER = Fit("linear", ("one", "bytes"), (2e-4, 1 / 286e9))
_SERVING_KEYS = (
    "page_size",
    "max_seq_len",
    "length_buckets",
    "decode_attention",
    "unroll_layers",
    "prefill_max_batch",
    "decode_max_batch",
    "batch_buckets",
    "chunk_tokens",
)


@dataclasses.dataclass(frozen=True)
class Serving:
    """The serving knobs the programs were profiled with; planned presets keep them."""

    page_size: int
    max_seq_len: int
    length_buckets: tuple[int, ...]
    decode_attention: str  # of one-device decode instances; larger ones use "dot"
    unroll_layers: bool
    prefill_max_batch: int
    decode_max_batch: int
    batch_buckets: tuple[int, ...]
    chunk_tokens: int


@dataclasses.dataclass(frozen=True)
class Config:
    """The fitted programs of one (tp, pp) layout."""

    tp: int
    pp: int
    weight_bytes: int  # weights on each device
    L_m: int  # prompt tokens per call past which prefill is compute-bound
    decode_attention: str
    decode: Fit
    insert: Fit
    prefill: Fit | None = None  # pp == 1 only (prefill runs tensor parallel)
    mixed: Fit | None = None
    prefill_scratch: Mapping[int, int] = dataclasses.field(default_factory=dict)  # row tokens -> bytes
    points: Mapping[str, list] = dataclasses.field(default_factory=dict)

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def scratch(self, row: int) -> int:
        """Prefill scratch bytes of a row of ``row`` tokens (linear past the largest profiled)."""
        if not self.prefill_scratch:
            return 0
        sizes = sorted(self.prefill_scratch)
        at = [n for n in sizes if n >= row]
        if at:
            return self.prefill_scratch[at[0]]
        return math.ceil(self.prefill_scratch[sizes[-1]] * row / sizes[-1])


@dataclasses.dataclass(frozen=True)
class Profile:
    model: str
    cfg: ModelConfig  # dtype resolved
    platform: str
    device_kind: str
    devices: int
    memory_per_device: int
    serving: Serving
    configs: tuple[Config, ...]
    transfer: Fit = DEFAULT_TRANSFER
    transfer_measured: bool = False
    host_step_s: float = 0.0  # the scheduler's own time per decode step, and per row of it
    host_row_s: float = 0.0
    # The server's host time per streamed token (listener, event loop, gRPC), which the
    # instance loops wait for: one interpreter runs them all. Calibrated (``plan calibrate``).
    host_token_s: float = 0.0
    commit: str = ""
    jax: str = ""
    created: str = ""
    source: str = ""

    def config(self, tp: int, pp: int = 1) -> Config | None:
        for c in self.configs:
            if (c.tp, c.pp) == (tp, pp):
                return c
        return None

    def layouts(self) -> list[tuple[int, int]]:
        return [(c.tp, c.pp) for c in self.configs]

    # ---- JSON --------------------------------------------------------------------------

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "shape": {f.name: _jsonable(getattr(self.cfg, f.name)) for f in dataclasses.fields(self.cfg)},
            "dtype": self.cfg.dtype,
            "platform": self.platform,
            "device_kind": self.device_kind,
            "devices": self.devices,
            "memory_per_device": self.memory_per_device,
            "commit": self.commit,
            "jax": self.jax,
            "created": self.created,
            "serving": {k: _jsonable(getattr(self.serving, k)) for k in _SERVING_KEYS},
            "configs": [_config_dict(c) for c in self.configs],
            "transfer": {"fit": self.transfer.as_dict(), "measured": self.transfer_measured},
            "host": {"step_s": self.host_step_s, "row_s": self.host_row_s, "token_s": self.host_token_s},
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.as_dict(), indent=1) + "\n")


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _config_dict(c: Config) -> dict:
    out = {"tp": c.tp, "pp": c.pp, "weight_bytes": c.weight_bytes, "L_m": c.L_m}
    out["decode_attention"] = c.decode_attention
    out["prefill_scratch"] = {str(k): v for k, v in sorted(c.prefill_scratch.items())}
    for kind in ("prefill", "decode", "mixed", "insert"):
        if (f := getattr(c, kind)) is not None:
            out[kind] = f.as_dict()
    out["points"] = c.points
    return out


def _int(d: Mapping, key: str, where: str, minimum: int = 0) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{where}: {key} must be an integer >= {minimum}, not {v!r}")
    return v


def _tuple(v):
    return tuple(_tuple(x) for x in v) if isinstance(v, list) else v


def from_dict(d: Mapping, where: str) -> Profile:
    """A profile from its JSON data; ValueError names what is missing or wrong."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{where}: not a jdisagg profile (format {found!r}, expected {FORMAT!r})")
    try:
        shape = {k: _tuple(v) for k, v in d["shape"].items()}
        cfg = ModelConfig(**shape)
        s = d["serving"]
        serving = Serving(**{k: _tuple(s[k]) for k in _SERVING_KEYS})
        configs = []
        for i, c in enumerate(d["configs"]):
            at = f"{where}: configs[{i}]"
            fits = {k: Fit.from_dict(c[k], f"{at}.{k}") for k in ("prefill", "decode", "mixed", "insert") if k in c}
            if "decode" not in fits or "insert" not in fits:
                raise ValueError(f"{at}: needs decode and insert fits")
            configs.append(
                Config(
                    tp=_int(c, "tp", at, 1),
                    pp=_int(c, "pp", at, 1),
                    weight_bytes=_int(c, "weight_bytes", at),
                    L_m=_int(c, "L_m", at, 1),
                    decode_attention=str(c.get("decode_attention", "dot")),
                    prefill_scratch={int(k): int(v) for k, v in c.get("prefill_scratch", {}).items()},
                    points=c.get("points", {}),
                    **fits,
                )
            )
        if not configs:
            raise ValueError(f"{where}: no configs")
        transfer = d.get("transfer", {})
        host = d.get("host", {})
        return Profile(
            model=str(d["model"]),
            cfg=cfg,
            platform=str(d["platform"]),
            device_kind=str(d.get("device_kind", "")),
            devices=_int(d, "devices", where, 1),
            memory_per_device=_int(d, "memory_per_device", where, 1),
            serving=serving,
            configs=tuple(configs),
            transfer=Fit.from_dict(transfer["fit"], f"{where}: transfer") if "fit" in transfer else DEFAULT_TRANSFER,
            transfer_measured=bool(transfer.get("measured", False)),
            host_step_s=float(host.get("step_s", 0.0)),
            host_row_s=float(host.get("row_s", 0.0)),
            host_token_s=float(host.get("token_s", 0.0)),
            commit=str(d.get("commit", "")),
            jax=str(d.get("jax", "")),
            created=str(d.get("created", "")),
            source=where,
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: malformed profile ({type(e).__name__}: {e})") from None


def load(path: str | Path) -> Profile:
    """A profile file; ValueError (one line) for anything that is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"no profile file {path}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read profile {path}: {e}".splitlines()[0]) from None
    return from_dict(data, str(path))


def synthetic(
    cfg: ModelConfig,
    configs: Mapping[tuple[int, int], Mapping[str, tuple[float, ...]]],
    *,
    serving: Serving | None = None,
    memory_per_device: int = 80 * 2**30,
    L_m: int = 2048,
    transfer: Fit = DEFAULT_TRANSFER,
    platform: str = "synthetic",
) -> Profile:
    """A profile from given coefficients (hand-checkable tests, what-if plans). ``configs``
    maps (tp, pp) to coefficient tuples of the forms in ``latency.FORMS``: ``prefill`` and
    ``decode`` in the ``paper`` form, ``mixed`` in the ``bucketed`` form, ``insert`` linear;
    a missing ``mixed`` is the decode step plus the prefill of the chunk's context."""
    from jdisagg.plan.latency import FORMS

    serving = serving or Serving(16, 2048, (128, 256, 512, 1024, 2048), "pallas", False, 16, 256, (), 512)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.dtype]
    out = []
    for (tp, pp), kinds in configs.items():
        fits = {}
        for kind in ("prefill", "decode", "mixed", "insert"):
            form = {"prefill": "paper", "decode": "paper", "mixed": "bucketed", "insert": "linear"}[kind]
            if kind in kinds:
                fits[kind] = Fit(form, FORMS[kind][form], tuple(float(c) for c in kinds[kind]))
        if "mixed" not in fits and "decode" in fits:
            d0, d1 = fits["decode"].coef
            p = fits.get("prefill")
            chunk = p.coef[1] if p else 0.0
            fits["mixed"] = Fit("bucketed", FORMS["mixed"]["bucketed"], (d0, 0.0, 0.0, d1, chunk))
        fits.setdefault("insert", Fit("linear", ("one", "tokens"), (0.0, 0.0)))
        if pp != 1:
            fits.pop("prefill", None)
        weights = cfg.param_count() * itemsize // (tp * pp)
        out.append(Config(tp, pp, weights, L_m, serving.decode_attention, **fits))
    return Profile(
        "synthetic",
        cfg,
        platform,
        "synthetic",
        max(t * p for t, p in configs),
        memory_per_device,
        serving,
        tuple(out),
        transfer,
    )
