"""The project's defaults on the synthetic world and on the shipped real data: each dataset trained with a config that
sets only the dataset and its tasks (every other key the project's default), against the former one-epoch default.

    python benchmarks/bench_defaults.py [--seeds 0,1,2] [--datasets synthetic,reviews]

Needs the prepared, text-encoded datasets: demo_out/dataset (make demo) and demo_out/reviews (prepare
../shared/data/womens-clothing-reviews --description reviews, then encode-text). Writes
benchmarks/results/defaults.json ({"meta": ..., "datasets": {NAME: {VARIANT: bench_quality.summarise(...)}}}) and
defaults.md: the test metrics of every dataset and variant as mean ± std over the seeds, with the steps trained.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import run_meta, train_variants
from common import RESULTS, write_markdown

from recsys_mtl.config import load_config
from recsys_mtl.files import atomic_write_text

# name -> (dataset, tasks, overrides every variant takes)
DATASETS = {
    "synthetic": (
        "demo_out/dataset",
        [{"name": "ctr"}, {"name": "cvr", "after": "ctr"}, {"name": "rating"}, {"name": "reads"}],
        [],
    ),
    # its vectors were encoded at 64 tokens (a text setting, not what this compares)
    "reviews": (
        "demo_out/reviews",
        [{"name": "rating"}, {"name": "recommend"}, {"name": "helpful"}],
        ["text.max_length=64"],
    ),
}
VARIANTS = {"one epoch (former default)": ["train.epochs=1"], "defaults": []}
SHOWN = {
    "synthetic": ("ctr/auc", "cvr/auc_clicked", "rating/rmse", "reads/poisson_deviance", "train/steps"),
    "reviews": ("rating/rmse", "recommend/auc", "helpful/poisson_deviance", "train/steps"),
}


def markdown(results: dict[str, dict[str, dict]], seeds: list[int]) -> str:
    lines = [f"Test split, mean ± std over seeds {seeds}; a config with only `dataset` and `tasks` set.", ""]
    for dataset, variants in results.items():
        columns = SHOWN[dataset]
        lines += [f"**{dataset}**", "", "| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, result in variants.items():
            digits = {c: ".0f" if c == "train/steps" else ".4f" for c in columns}
            cells = [f"{result['mean'][c]:{digits[c]}} ± {result['std'][c]:{digits[c]}}" for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args()
    args.config, args.set = "(dataset and tasks only)", []
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="defaults-") as tmp:
        for name in args.datasets.split(","):
            dataset, tasks, overrides = DATASETS[name]
            path = Path(tmp) / f"{name}.toml"
            path.write_text(tomli_w.dumps({"dataset": str(Path(dataset).resolve()), "tasks": tasks}))
            chosen = {variant: load_config(path, [*overrides, *extra]) for variant, extra in VARIANTS.items()}
            results[name] = train_variants(chosen, seeds, Path(tmp) / name, torch.device("cpu"), f"{name}: ")
            meta = run_meta(args, seeds, start)
            RESULTS.mkdir(exist_ok=True)
            atomic_write_text(RESULTS / "defaults.json", json.dumps({"meta": meta, "datasets": results}, indent=1))
            write_markdown("defaults", meta["command"], markdown(results, seeds))


if __name__ == "__main__":
    main()
