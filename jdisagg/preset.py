"""Mesh presets: which devices each prefill and decode instance uses, its mesh axes and
its budgets. Read from TOML files in ``meshes/`` (format in README.md).

A preset is either disaggregated (``[[prefill]]`` and ``[[decode]]`` instances on
disjoint devices) or one of the baselines that run both phases on one mesh per instance:
``[[colocated]]`` (continuous batching, prefill first) or ``[[chunked]]`` (prompts are
prefilled in ``chunk_tokens`` pieces piggybacked on decode steps). Each instance may
override the logical-to-mesh axis rules in a ``rules`` table; the default is
``jdisagg.model.axes.DEFAULT_RULES``. Reading a preset imports no jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from jdisagg import toml_file
from jdisagg.model import axes
from jdisagg.model.config import ModelConfig

ROLES = ("prefill", "decode", "colocated", "chunked")
DECODE_ATTENTION = ("dot", "pallas")  # how decode rows attend over their pages (decode_attention below)
# A pipelined decode instance's default steps_per_call: a 2-stage pipeline of 2 micro-batches
# then keeps its stages busy 16 of every 17 ticks (jdisagg.runtime.decode).
PIPELINE_STEPS = 8
_TOP_KEYS = {
    "name",
    "description",
    "page_size",
    "max_seq_len",
    "length_buckets",
    "unroll_layers",
    "decode_attention",
    *ROLES,
}
_INSTANCE_KEYS = {
    "devices",
    "pp",
    "tp",
    "rules",
    "max_batch",
    "token_budget",
    "buffer_tokens",
    "pages",
    "micro_batches",
    "chunk_tokens",
    "batch_buckets",
    "steps_per_call",
}


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """One prefill, decode or colocated instance: its devices, mesh axes and budgets."""

    role: str
    index: int
    devices: tuple[int, ...]
    pp: int = 1
    tp: int = 1
    rules: Mapping[str, str | None] = dataclasses.field(default_factory=lambda: axes.DEFAULT_RULES)
    # prefill: prompts per call (also at most token_budget / the smallest length bucket);
    # decode: requests per step
    max_batch: int = 8
    token_budget: int = 2048  # prefill: prompt tokens packed into one call (L_m); longer prompts run alone
    buffer_tokens: int = 0  # prefill, colocated: prefix tokens held for decode to pull before prefill pauses
    pages: int = 0  # decode: KV pages in the pool, the null page included; 0 sizes it from free memory
    micro_batches: int = 0  # decode: pipeline micro-batches; 0 means pp
    chunk_tokens: int = 0  # chunked: prompt tokens prefilled per decode step
    # Compiled decode batch sizes (decode, colocated, chunked); () means powers of two up to
    # max_batch. Prefill has none: a call packs its prompts into one row of tokens.
    batch_buckets: tuple[int, ...] = ()
    # decode: decode steps per device call, each row's sampled token fed back on the device, so
    # a pipeline (pp > 1) fills and drains once per call instead of once per step. A preset's
    # default: 1, or PIPELINE_STEPS where pp > 1.
    steps_per_call: int = 1

    @property
    def where(self) -> str:
        return f"{self.role}[{self.index}]"

    @property
    def runs_prefill(self) -> bool:
        return self.role in ("prefill", "colocated")

    @property
    def runs_decode(self) -> bool:
        return self.role in ("decode", "colocated", "chunked")


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    name: str
    page_size: int
    max_seq_len: int  # prompt plus output tokens of one request
    instances: tuple[InstanceSpec, ...]
    # Compiled prompt lengths: each prompt's prefix KV is cut to one, and a packed prefill row
    # is one (or 1.5x / 2x steps past the largest, up to token_budget). () means powers of
    # two up to max_seq_len.
    length_buckets: tuple[int, ...] = ()
    description: str = ""
    source: str = ""
    # Unroll the loop over layers in every program: on GPUs a scanned loop copies each
    # layer's weights out of the stacked arrays, so unrolled decode is faster, but each
    # shape compiles several times longer (measured in BENCHMARKS.md). Off by default.
    unroll_layers: bool = False
    # How decode rows attend over their pages (attention.PagedKV): "dot" gathers the pages
    # of the batch's widest length bucket and runs matmuls (any platform, any sharding);
    # "pallas" runs a kernel over each request's own pages: the Triton one
    # (jdisagg.paged_kernel) on GPUs, JAX's TPU paged attention (jdisagg.tpu_attention) on
    # TPUs, either interpreted on CPU for tests; on an instance of several devices each device
    # runs it over its own heads and its pipeline stage's layers (attention.HeadSplit).
    decode_attention: str = "dot"

    @property
    def colocated(self) -> bool:
        """Both phases share each instance's devices (``colocated`` or ``chunked``)."""
        return any(i.role in ("colocated", "chunked") for i in self.instances)

    @property
    def prefill(self) -> tuple[InstanceSpec, ...]:
        return tuple(i for i in self.instances if i.runs_prefill)

    @property
    def decode(self) -> tuple[InstanceSpec, ...]:
        return tuple(i for i in self.instances if i.runs_decode)

    def device_count(self) -> int:
        return sum(len(i.devices) for i in self.instances)

    def validate(self, cfg: ModelConfig, n_devices: int, platform: str = "") -> None:
        """Checks the preset against the model and the host (``platform``: "cpu", "gpu",
        "tpu"; "" skips that check); errors name the offending field."""
        where = self.source or self.name
        if self.decode_attention == "pallas" and platform not in ("", "cpu", "gpu", "tpu"):
            raise ValueError(
                f'{where}: decode_attention = "pallas" has kernels for GPUs and TPUs; on {platform} use "dot"'
            )
        for spec in self.instances:
            for d in spec.devices:
                if not 0 <= d < n_devices:
                    raise ValueError(
                        f"{where}: {spec.where}.devices asks for device {d}, but this host has {n_devices} "
                        f"device(s) (0..{n_devices - 1}); the preset needs {self.device_count()}"
                    )
            sizes = {"pp": spec.pp, "tp": spec.tp}
            axes.check_divisible(cfg, sizes, spec.rules, f"{where}: {spec.where}")
            if spec.runs_decode and spec.pages and spec.pages - 1 < -(-self.max_seq_len // self.page_size):
                raise ValueError(
                    f"{where}: {spec.where}.pages={spec.pages} cannot hold one request of max_seq_len="
                    f"{self.max_seq_len} tokens ({-(-self.max_seq_len // self.page_size)} pages of "
                    f"{self.page_size} plus the null page)"
                )
            if spec.runs_decode and spec.max_batch % spec.micro_batches:
                raise ValueError(
                    f"{where}: {spec.where}.max_batch={spec.max_batch} must be a multiple of "
                    f"micro_batches={spec.micro_batches}"
                )
            heads, kv_heads = spec.rules.get(axes.HEADS), spec.rules.get(axes.KV_HEADS)
            if self.decode_attention == "pallas" and spec.runs_decode and len(spec.devices) > 1 and heads != kv_heads:
                raise ValueError(
                    f'{where}: decode_attention = "pallas" runs on each device over its own heads, but '
                    f"{spec.where}.rules split heads over {heads!r} and kv_heads over {kv_heads!r}; "
                    'put both on one mesh axis, or use "dot"'
                )
        if self.max_seq_len > cfg.max_seq_len:
            raise ValueError(
                f"{where}: max_seq_len={self.max_seq_len} exceeds the model's context of {cfg.max_seq_len} tokens"
            )


def _positive(table: dict, key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}.{key} must be a positive integer (got {value!r})")
    return value


def _instance(role: str, index: int, table: dict, where: str) -> InstanceSpec:
    at = f"{where}: {role}[{index}]"
    if not isinstance(table, dict):
        raise ValueError(f"{at} must be a table ([[{role}]])")
    toml_file.check_keys(table, _INSTANCE_KEYS, at)
    devices = table.get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, int) for d in devices):
        raise ValueError(f"{at}.devices must be a non-empty list of device indices")
    if len(set(devices)) != len(devices):
        raise ValueError(f"{at}.devices lists a device twice: {devices}")
    pp, tp = _positive(table, "pp", at, 1), _positive(table, "tp", at, 1)
    if pp * tp != len(devices):
        raise ValueError(f"{at}: pp * tp = {pp * tp} but devices lists {len(devices)} device(s)")
    if role == "prefill" and "batch_buckets" in table:
        raise ValueError(
            f"{at}.batch_buckets: a prefill call packs its prompts into one row of tokens, so it has no "
            "batch sizes to compile; max_batch (prompts per call) and token_budget bound it"
        )
    if role != "decode" and "steps_per_call" in table:
        raise ValueError(
            f"{at}.steps_per_call: only [[decode]] instances run several decode steps per call "
            "(here prompts would wait for all of them)"
        )
    if role in ("prefill", "colocated", "chunked") and pp != 1:
        raise ValueError(f"{at}.pp={pp}: prefill runs tensor parallel only (pp must be 1)")
    rules = dict(axes.DEFAULT_RULES)
    user_rules = table.get("rules", {})
    if not isinstance(user_rules, dict):
        raise ValueError(f"{at}.rules must be a table of logical axis = mesh axis")
    for logical, mesh_axis in user_rules.items():
        if mesh_axis not in (*axes.MESH_AXES, ""):
            raise ValueError(f'{at}.rules.{logical} = {mesh_axis!r}: mesh axes are {axes.MESH_AXES} or ""')
        rules[logical] = mesh_axis or None
    runs_decode = role in ("decode", "colocated", "chunked")
    pages = 0
    if runs_decode and "pages" in table:
        pages = _positive(table, "pages", at, 0)
        if pages < 2:
            raise ValueError(f"{at}.pages must be >= 2 (page 0 is reserved), or left out to size the pool from memory")
    return InstanceSpec(
        role=role,
        index=index,
        devices=tuple(devices),
        pp=pp,
        tp=tp,
        rules=MappingProxyType(rules),
        max_batch=_positive(table, "max_batch", at, 8),
        token_budget=_positive(table, "token_budget", at, 2048),
        # A colocated replica's prefixes wait for its own decode: one batch ahead is enough.
        buffer_tokens=_positive(
            table, "buffer_tokens", at, (1 if role == "colocated" else 4) * table.get("token_budget", 2048)
        ),
        pages=pages,
        micro_batches=_positive(table, "micro_batches", at, pp) if runs_decode else 0,
        chunk_tokens=_positive(table, "chunk_tokens", at, 512) if role == "chunked" else 0,
        batch_buckets=_buckets(table, "batch_buckets", at, top=table.get("max_batch", 8)),
        steps_per_call=_positive(table, "steps_per_call", at, PIPELINE_STEPS if pp > 1 else 1),
    )


def _buckets(table: dict, key: str, where: str, top: int, multiple: int = 1) -> tuple[int, ...]:
    """An optional sorted list of compiled sizes; the largest must be ``top`` (or cover it)."""
    values = table.get(key)
    if values is None:
        return ()
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, int) and v > 0 and v % multiple == 0 for v in values)
        or values != sorted(set(values))
    ):
        raise ValueError(f"{where}.{key} must be an increasing list of positive multiples of {multiple}")
    if values[-1] < top:
        raise ValueError(f"{where}.{key}: the largest ({values[-1]}) must be at least {top}")
    return tuple(values)


def parse(data: dict, where: str) -> MeshPreset:
    toml_file.check_keys(data, _TOP_KEYS, where)
    page_size = _positive(data, "page_size", where, 16)
    max_seq_len = _positive(data, "max_seq_len", where, 2048)
    instances = []
    for role in ROLES:
        tables = data.get(role, [])
        if isinstance(tables, dict):
            tables = [tables]
        instances += [_instance(role, i, t, where) for i, t in enumerate(tables)]
    has = {i.role for i in instances}
    shared = has & {"colocated", "chunked"}
    if shared and has - shared:
        raise ValueError(f"{where}: a preset is either colocated/chunked or has prefill and decode instances, not both")
    if not shared and not {"prefill", "decode"} <= has:
        raise ValueError(
            f"{where}: needs at least one [[prefill]] and one [[decode]] instance, or [[colocated]] or [[chunked]]"
        )
    seen: dict[int, str] = {}
    for spec in instances:
        for d in spec.devices:
            if d in seen:
                raise ValueError(f"{where}: device {d} is in both {seen[d]}.devices and {spec.where}.devices")
            seen[d] = spec.where
    return MeshPreset(
        length_buckets=_buckets(data, "length_buckets", where, top=max_seq_len, multiple=page_size),
        name=str(data.get("name", Path(where).stem)),
        page_size=page_size,
        max_seq_len=max_seq_len,
        instances=tuple(instances),
        description=str(data.get("description", "")),
        source=where,
        unroll_layers=_bool(data, "unroll_layers", where),
        decode_attention=_choice(data, "decode_attention", where, DECODE_ATTENTION),
    )


def _bool(data: dict, key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, not {value!r}")
    return value


def _choice(data: dict, key: str, where: str, choices: tuple[str, ...]) -> str:
    value = data.get(key, choices[0])
    if value not in choices:
        raise ValueError(f"{where}: {key} must be one of {', '.join(map(repr, choices))}, not {value!r}")
    return value


def load_preset(name_or_path: str) -> MeshPreset:
    """A preset by name (``meshes/<name>.toml``) or path."""
    path = toml_file.resolve(name_or_path, "meshes", "mesh preset")
    return parse(toml_file.read(path), str(path))
