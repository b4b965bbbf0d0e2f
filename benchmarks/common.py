"""Helpers shared by the benchmark scripts: timing, tables, result files."""

import json
import platform
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from data_prep.synth import WorldConfig
from recsys_mtl.files import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def scaled_world(impressions: int) -> WorldConfig:
    """A world whose users, items and ads grow with `impressions` (the same history per user), never below the
    default world's."""
    return WorldConfig(
        impressions=impressions,
        users=max(20_000, impressions // 50),
        items=max(5_000, impressions // 200),
        ads=max(500, impressions // 2000),
    )


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` wall-clock runs of fn, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def print_table(rows: list[dict], title: str) -> str:
    """Print `rows` as a markdown table under `title`; return the same text."""
    columns = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    lines = [f"\n{title}\n", "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}" if abs(value) >= 10 else f"{value:.5g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the matmul dtype's speed


def machine() -> dict[str, object]:
    """The CPU model, its speed-relevant flags, threads and library versions, for every results file."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    try:
        fbgemm = version("fbgemm_gpu_cpu")
    except PackageNotFoundError:  # the CUDA build
        fbgemm = version("fbgemm_gpu")
    return {
        "machine": platform.machine(),
        "cpu": fields.get("model name", platform.processor()),
        "cpu_flags": [f for f in SPEED_FLAGS if f in flags],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fbgemm": fbgemm,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def machine_line(info: dict[str, object]) -> str:
    """One line naming the machine of a `machine()` record."""
    flags = ", ".join(info["cpu_flags"]) or "none of " + ", ".join(SPEED_FLAGS)  # type: ignore[arg-type]
    gpu = f"; GPU {info['cuda']}" if info["cuda"] else ""
    versions = f"torch {info['torch']}, fbgemm {info['fbgemm']}"
    return f"Machine: {info['cpu']} ({info['machine']}; flags {flags}), {info['threads']} threads{gpu}; {versions}"


def write_markdown(name: str, command: str, body: str) -> None:
    """benchmarks/results/<name>.md: a title, the command that made it, the machine it ran on, then `body`."""
    RESULTS.mkdir(exist_ok=True)
    command_line = f"`{command}`\n\n" if command else ""
    atomic_write_text(RESULTS / f"{name}.md", f"# {name}\n\n{command_line}{machine_line(machine())}\n\n{body}\n")


def write_results(name: str, rows: list[dict], markdown: str = "", **meta: object) -> Path:
    """benchmarks/results/<name>.json (meta + rows) and, given the printed tables, <name>.md."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    info = {**machine(), **meta}
    atomic_write_text(path, json.dumps({"meta": info, "rows": rows}, indent=2) + "\n")
    if markdown:
        write_markdown(name, str(meta.get("command", "")), markdown)
    print(f"\nwrote {path}")
    return path
