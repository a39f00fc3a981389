"""Placements as mesh presets: a unit of instances (``Layout``), copies of it laid out on the
devices of one or more nodes, written as the TOML that ``python -m jdisagg.serve --mesh``
reads (README, "Mesh presets").

The preset is built as the TOML's own data and read back with ``jdisagg.preset.parse``, so
the file written is exactly the preset simulated. Serving knobs (page size, buckets, batch
caps, chunk size, decode attention) are the profile's; each prefill-running instance's
``token_budget`` is its layout's L_m. On CPU, where the engine cannot size a pool from
device memory, every decode-running instance gets the ``pages`` the sizing code gives.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from jdisagg.plan.profile import Profile
from jdisagg.preset import MeshPreset, parse


@dataclasses.dataclass(frozen=True)
class Layout:
    """A unit of placement: ``n_prefill`` prefill instances of tp=``prefill_tp`` and
    ``n_decode`` decode instances of (``decode_tp``, ``decode_pp``); or one colocated or
    chunked replica of tp=``decode_tp``."""

    kind: str  # "disaggregated", "colocated" or "chunked"
    prefill_tp: int = 0
    decode_tp: int = 1
    decode_pp: int = 1
    n_prefill: int = 0
    n_decode: int = 1

    @classmethod
    def disaggregated(cls, prefill_tp: int, decode_tp: int, decode_pp: int, n: int, m: int) -> Layout:
        return cls("disaggregated", prefill_tp, decode_tp, decode_pp, n, m)

    @classmethod
    def replica(cls, kind: str, tp: int) -> Layout:
        return cls(kind, tp, tp, 1, 1, 1)

    @property
    def gpus(self) -> int:
        if self.kind != "disaggregated":
            return self.decode_tp
        return self.n_prefill * self.prefill_tp + self.n_decode * self.decode_tp * self.decode_pp

    @property
    def slug(self) -> str:
        """A preset name: plan-2p1-6d1x1 (n prefill of tp, m decode of tp x pp), plan-colocated1."""
        if self.kind != "disaggregated":
            return f"plan-{self.kind}{self.decode_tp}"
        return f"plan-{self.n_prefill}p{self.prefill_tp}-{self.n_decode}d{self.decode_tp}x{self.decode_pp}"

    @property
    def name(self) -> str:
        if self.kind != "disaggregated":
            return f"{self.kind} tp={self.decode_tp}"
        parts = [f"{self.n_prefill} x prefill tp={self.prefill_tp}"] if self.n_prefill else []
        if self.n_decode:
            parts.append(f"{self.n_decode} x decode tp={self.decode_tp} pp={self.decode_pp}")
        return " + ".join(parts)

    def instances(self) -> list[tuple[str, int, int]]:
        """(role, tp, pp) of each instance, prefill first."""
        if self.kind != "disaggregated":
            return [(self.kind, self.decode_tp, 1)]
        return [("prefill", self.prefill_tp, 1)] * self.n_prefill + [
            ("decode", self.decode_tp, self.decode_pp)
        ] * self.n_decode


def attention_compatible(profile: Profile, prefill: Sequence[tuple[int, int]], decode: Sequence[tuple[int, int]]):
    """Whether one preset can hold these layouts: a preset has one ``decode_attention``, and
    each decode layout was profiled with one ("pallas" only on one device)."""
    del prefill
    kinds = {profile.config(tp, pp).decode_attention for tp, pp in decode if profile.config(tp, pp)}
    return len(kinds) <= 1 and not ("pallas" in kinds and any(tp * pp > 1 for tp, pp in decode))


def _place(layout: Layout, copies: int, gpus_per_node: int) -> list[tuple[str, int, int, list[int]]]:
    """Devices for every instance: a unit that fits a node never straddles two; an instance
    never does."""
    out, next_device = [], 0
    for _ in range(copies):
        unit = layout.gpus
        room = gpus_per_node - next_device % gpus_per_node
        if unit <= gpus_per_node and unit > room:
            next_device += room
        for role, tp, pp in layout.instances():
            size = tp * pp
            room = gpus_per_node - next_device % gpus_per_node
            if size > room:
                next_device += room
            out.append((role, tp, pp, list(range(next_device, next_device + size))))
            next_device += size
    return out


def preset_data(profile: Profile, layout: Layout, copies: int = 1, gpus_per_node: int = 8, name: str = "") -> dict:
    """The TOML data of ``copies`` of ``layout``."""
    s = profile.serving
    decode_layouts = [(tp, pp) for role, tp, pp in layout.instances() if role != "prefill"]
    attention = "dot"
    if decode_layouts:
        c = profile.config(*decode_layouts[0])
        attention = c.decode_attention if c is not None else "dot"
    if any(tp * pp > 1 for tp, pp in decode_layouts):
        attention = "dot"
    data: dict = {
        "name": name or layout.slug,
        "description": f"planned: {copies} x [{layout.name}]",
        "page_size": s.page_size,
        "max_seq_len": s.max_seq_len,
        "length_buckets": list(s.length_buckets),
        "decode_attention": attention,
    }
    if s.unroll_layers:
        data["unroll_layers"] = True
    for role, tp, pp, devices in _place(layout, copies, gpus_per_node):
        config = profile.config(tp, pp)
        table: dict = {"devices": devices}
        if tp > 1:
            table["tp"] = tp
        if pp > 1:
            table["pp"] = pp
        if role in ("prefill", "colocated"):
            table["token_budget"] = config.L_m if config is not None else 2048
            if role == "prefill":
                table["max_batch"] = s.prefill_max_batch
        if role != "prefill":
            max_batch = -(-s.decode_max_batch // pp) * pp
            table["max_batch"] = max_batch
            buckets = [b for b in s.batch_buckets if b < max_batch]
            if s.batch_buckets:
                table["batch_buckets"] = [*buckets, max_batch]
        if role == "chunked":
            table["chunk_tokens"] = s.chunk_tokens
        data.setdefault(role, []).append(table)
    return data


def make_preset(
    profile: Profile, layout: Layout, copies: int = 1, gpus_per_node: int = 8, name: str = ""
) -> MeshPreset:
    """The preset of ``copies`` of ``layout`` (with ``pages`` on CPU profiles)."""
    data = preset_data(profile, layout, copies, gpus_per_node, name)
    if not layout.n_decode:  # a prefill side alone (to simulate it): parsed beside a stand-in decode
        spare = 1 + max(d for t in data["prefill"] for d in t["devices"])
        preset = parse({**data, "decode": [{"devices": [spare], "pages": 2**20}]}, f"<plan {layout.name}>")
        return dataclasses.replace(preset, instances=preset.prefill, source="")
    preset = parse(data, f"<plan {layout.name}>")
    if profile.platform == "cpu":
        from jdisagg.plan.system import build

        system = build(preset, profile, gpus_per_node=gpus_per_node)
        for inst in system.decode:
            data[inst.spec.role][inst.spec.index]["pages"] = inst.n_pages
        preset = parse(data, f"<plan {layout.name}>")
    return dataclasses.replace(preset, source="")


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)


def to_toml(preset: MeshPreset, header: Sequence[str] = ()) -> str:
    """The preset as a ``meshes/*.toml`` file, with ``header`` lines as comments on top."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += [f"name = {_value(preset.name)}", f"description = {_value(preset.description)}"]
    lines += [f"page_size = {preset.page_size}", f"max_seq_len = {preset.max_seq_len}"]
    if preset.length_buckets:
        lines.append(f"length_buckets = {_value(list(preset.length_buckets))}")
    lines.append(f"decode_attention = {_value(preset.decode_attention)}")
    if preset.unroll_layers:
        lines.append("unroll_layers = true")
    for spec in preset.instances:
        lines += ["", f"[[{spec.role}]]", f"devices = {_value(list(spec.devices))}"]
        if spec.tp > 1:
            lines.append(f"tp = {spec.tp}")
        if spec.pp > 1:
            lines.append(f"pp = {spec.pp}")
        lines.append(f"max_batch = {spec.max_batch}")
        if spec.runs_prefill:
            lines.append(f"token_budget = {spec.token_budget}  # L_m of the profile")
        if spec.batch_buckets:
            lines.append(f"batch_buckets = {_value(list(spec.batch_buckets))}")
        if spec.role == "chunked":
            lines.append(f"chunk_tokens = {spec.chunk_tokens}")
        if spec.pages:
            lines.append(f"pages = {spec.pages}")
    return "\n".join(lines) + "\n"


def header(profile: Profile, target, best, copies: int, affinity: str) -> list[str]:
    """The comment lines on top of a planned preset: where it came from and what it should do."""
    w = target.workload
    total = best.deployed if best.deployed is not None else best.rate * copies
    return [
        f"Planned by python -m jdisagg.plan search: {profile.model} on {profile.device_kind or profile.platform}",
        f"(profile {profile.source or '-'}, commit {profile.commit[:10] or '-'}), {affinity} node affinity.",
        f"Workload {w.name}, SLOs TTFT {w.slo.ttft_s:g} s / TPOT {w.slo.tpot_s:g} s at {w.target:.0%} attainment.",
        f"Predicted goodput {total:.3g} req/s = {total / (copies * best.gpus):.3g} req/s/GPU; limit: {best.limit}.",
    ]
