"""Model quality over seeds on the default synthetic world: the default config, the other mixtures and single-task
models, each trained with several seeds and evaluated on the test days against the oracle.

    python benchmarks/bench_quality.py [--config configs/demo.toml] [--seeds 0,1,2] [--variants default,single_ctr]

Needs a prepared and text-encoded dataset (make demo builds one). Trains every variant and seed in a temporary folder
and writes benchmarks/results/quality.json:

    {"meta": {...}, "variants": {NAME: {"seeds": {SEED: {metric: value}}, "mean": {metric: value},
                                        "std": {metric: value}}}}

with every test metric of metrics_test.json (oracle ratios and mixture health included), and quality.md: the headline
metrics as mean ± std (sample std over the seeds). NAME: `default` (the config as it is), `shared_bottom`, `mmoe`,
`ple` (the config with that mixture; the default's own mixture is `default`), `single_<task>` (the config on that
task alone; cvr directly on clicked impressions).
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
from common import RESULTS, machine

from recsys_mtl.config import Config, TaskConfig, load_config
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.train import train

SINGLE = {
    "ctr": TaskConfig("ctr"),
    "cvr": TaskConfig("cvr", after="ctr", esmm=False),
    "rating": TaskConfig("rating"),
    "reads": TaskConfig("reads"),
}
COLUMNS = ("ctr/auc", "ratio/ctr/auc", "ctr/auc_cold", "cvr/auc_clicked", "rating/rmse", "reads/poisson_deviance")
HEALTH = ("mixture/dead_experts",)


def variants(base: Config) -> dict[str, Config]:
    """Every variant by name (see the module docstring)."""
    found = {"default": base}
    for arch in ("shared_bottom", "mmoe", "ple"):
        if arch != base.model.arch:
            found[arch] = dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch))
    for name, task in SINGLE.items():
        single_train = dataclasses.replace(base.train, early_stop_metric="")
        found[f"single_{name}"] = dataclasses.replace(base, tasks=(task,), train=single_train)
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


def markdown(results: dict[str, dict], seeds: list[int]) -> str:
    """The headline metrics of every variant as mean ± std."""
    columns = [c for c in (*COLUMNS, *HEALTH) if any(c in r["mean"] for r in results.values())]
    lines = [
        f"Test split of the default synthetic world, mean ± std over seeds {seeds} (lower is better for rmse and "
        "deviance; ratio = model / oracle).",
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
        chosen = {name: chosen[name] for name in args.variants.split(",")}
    device = torch.device(args.device)
    results: dict[str, dict] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in chosen.items():
            per_seed = {}
            for seed in seeds:
                seeded = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
                run = Path(tmp) / f"{name}-{seed}"
                train(seeded, run, device, progress=False)
                per_seed[seed] = evaluate_run(run, "test", device)
                shown = {c: round(per_seed[seed][c], 4) for c in COLUMNS if c in per_seed[seed]}
                print(f"{name} seed {seed}: {shown}", flush=True)
            results[name] = summarise(per_seed)
    command = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:])
    meta = {
        "command": command,
        **machine(),
        "config": args.config,
        "overrides": args.set,
        "seeds": seeds,
        "minutes": (time.perf_counter() - start) / 60,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "variants": results}, indent=1) + "\n")
    text = markdown(results, seeds)
    (RESULTS / f"{args.out}.md").write_text(f"# {args.out}\n\n`{command}`\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
