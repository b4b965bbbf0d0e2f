"""Model quality over seeds on the default synthetic world: the default config, the other mixtures and single-task
models, each trained with several seeds and evaluated on the test days against the oracle.

    python benchmarks/bench_quality.py [--config configs/demo.toml] [--seeds 0,1,2] [--variants default,single_ctr]

Needs a prepared and text-encoded dataset (make demo builds one). Trains every variant and seed in a temporary folder
and writes benchmarks/results/quality.json:

    {"meta": {...}, "variants": {NAME: {"seeds": {SEED: {metric: value}}, "mean": {metric: value},
                                        "std": {metric: value}}}}

with every test metric of metrics_test.json (oracle ratios and mixture health included), and quality.md: the headline
metrics as mean ± std (sample std over the seeds). NAME: `default` (the config as it is), `shared_bottom`, `mmoe`,
`ple` (the config with that mixture; the config's own mixture is `default`), `single_<task>` (the config on each of
its tasks alone; a task after another one directly on that one's positive rows: cvr on clicked impressions).
"""

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_markdown

from recsys_mtl.config import Config, TaskConfig, load_config
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.files import atomic_write_text
from recsys_mtl.tasks import is_headline
from recsys_mtl.train import train

COLUMNS = ("ctr/auc", "ratio/ctr/auc", "ctr/auc_cold", "cvr/auc_clicked", "rating/rmse", "reads/poisson_deviance")
HEALTH = ("mixture/dead_experts",)


def variants(base: Config) -> dict[str, Config]:
    """Every variant by name (see the module docstring)."""
    found = {"default": base}
    for arch in ("shared_bottom", "mmoe", "ple"):
        if arch != base.model.arch:
            found[arch] = dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch))
    for task in base.tasks:  # alone; a task after another one (cvr after ctr) directly on that one's positive rows
        single = TaskConfig(task.name, loss=task.loss, after=task.after, esmm=False)
        single_train = dataclasses.replace(base.train, early_stop_metric="")
        found[f"single_{task.name}"] = dataclasses.replace(base, tasks=(single,), train=single_train)
    return found


def summarise(seeds: dict[int, dict[str, float]]) -> dict[str, dict]:
    """The per-seed metrics with their mean and sample std (over the seeds that have the metric)."""
    names = sorted({name for metrics in seeds.values() for name in metrics})
    values = {name: [m[name] for m in seeds.values() if name in m and not math.isnan(m[name])] for name in names}
    return {
        "seeds": seeds,
        "mean": {name: statistics.fmean(v) for name, v in values.items() if v},
        "std": {name: statistics.stdev(v) if len(v) > 1 else 0.0 for name, v in values.items() if v},
    }


def train_variants(
    chosen: dict[str, Config], seeds: list[int], runs: Path, device: torch.device, label: str = ""
) -> dict[str, dict]:
    """Train every variant with every seed into runs/<variant>-<seed> and evaluate it on the test split; `label`
    starts its progress lines.

    Returns:
        variant -> summarise() of its test metrics (and `train/steps`, the steps it trained) per seed.
    """
    results = {}
    for name, cfg in chosen.items():
        per_seed = {}
        for seed in seeds:
            start = time.perf_counter()
            run = runs / f"{name}-{seed}"
            trained = train(
                dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed)), run, device, progress=False
            )
            per_seed[seed] = evaluate_run(run, "test", device) | {"train/steps": float(trained.steps)}
            shown = {c: round(per_seed[seed][c], 4) for c in COLUMNS if c in per_seed[seed]}
            minutes = (time.perf_counter() - start) / 60
            print(f"{label}{name} seed {seed} ({minutes:.1f} min): {shown}", flush=True)
        results[name] = summarise(per_seed)
    return results


def run_meta(args: argparse.Namespace, seeds: list[int], start: float) -> dict[str, object]:
    """The results file's meta: the command line, the machine, the config and its overrides, the seeds and the
    minutes since `start` (a perf_counter reading)."""
    return {
        "command": f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
        **machine(),
        "config": args.config,
        "overrides": args.set,
        "seeds": seeds,
        "minutes": (time.perf_counter() - start) / 60,
    }


def markdown(results: dict[str, dict], seeds: list[int], dataset: str) -> str:
    """The headline metrics of every variant as mean ± std."""
    found = {name for r in results.values() for name in r["mean"]}
    others = sorted(name for name in found if is_headline(name) and name not in COLUMNS)
    columns = [c for c in (*COLUMNS, *others, *HEALTH) if c in found]
    lines = [
        f"Test split of {dataset}, mean ± std over seeds {seeds} (lower is better for rmse and deviance; ratio = "
        "model / oracle).",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, result in results.items():
        cells = [f"{result['mean'][c]:.4f} ± {result['std'][c]:.4f}" if c in result["mean"] else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--data", default=None, help="prepared dataset (default: the config's)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (%(default)s)")
    parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default="quality", help="results name under benchmarks/results (%(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    base = load_config(args.config, args.set)
    if args.data:
        base = dataclasses.replace(base, dataset=args.data)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = variants(base)
    if args.variants:
        if unknown := [n for n in args.variants.split(",") if n not in chosen]:
            parser.error(f"--variants: unknown {unknown}, expected some of {list(chosen)}")
        chosen = {name: chosen[name] for name in args.variants.split(",")}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = train_variants(chosen, seeds, Path(tmp), torch.device(args.device))
    meta = run_meta(args, seeds, start)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps({"meta": meta, "variants": results}, indent=1) + "\n")
    text = markdown(results, seeds, base.dataset)
    write_markdown(args.out, meta["command"], text)
    print(text)


if __name__ == "__main__":
    main()
