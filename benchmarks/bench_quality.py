"""Model quality on the default synthetic world: shared-bottom, MMoE, PLE and single-task models, with and without
text, against the oracle; and CTR AUC on test items never seen in training (cold start), with and without text.

    python benchmarks/bench_quality.py [--data demo_out/dataset] [--epochs 3]

Needs a prepared and text-encoded dataset (make demo builds one). Trains every variant in a temporary folder and
writes benchmarks/results/quality.json; prints the table the README shows.
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

from recsys_mtl.config import Config, TaskConfig, load_config
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.train import train

ALL_TASKS = (TaskConfig("ctr"), TaskConfig("cvr", after="ctr"), TaskConfig("rating"), TaskConfig("reads"))
SINGLE = {
    "ctr": (TaskConfig("ctr"),),
    "cvr": (TaskConfig("cvr", after="ctr", esmm=False),),
    "rating": (TaskConfig("rating"),),
    "reads": (TaskConfig("reads"),),
}
COLUMNS = ("ctr/auc", "ctr/auc_cold", "cvr/auc_clicked", "rating/rmse", "reads/poisson_deviance")


def _variant(base: Config, arch: str, text: bool, tasks: tuple[TaskConfig, ...]) -> Config:
    model = dataclasses.replace(base.model, arch=arch, text_dim=base.model.text_dim if text else 0)
    train_cfg = dataclasses.replace(base.train, early_stop_metric="", epochs=base.train.epochs)
    return dataclasses.replace(base, tasks=tasks, model=model, train=train_cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--data", default=None, help="prepared dataset (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    base = load_config(args.config)
    if args.data:
        base = dataclasses.replace(base, dataset=args.data)
    if args.epochs:
        base = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=args.epochs))
    device = torch.device(args.device)
    variants = [(f"{arch}, text", _variant(base, arch, True, ALL_TASKS)) for arch in ("shared_bottom", "mmoe", "ple")]
    variants.append(("mmoe, no text", _variant(base, "mmoe", False, ALL_TASKS)))
    variants += [(f"single {task}, text", _variant(base, "mmoe", True, tasks)) for task, tasks in SINGLE.items()]
    variants.append(("single ctr, no text", _variant(base, "mmoe", False, SINGLE["ctr"])))
    rows, oracle = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in variants:
            start = time.perf_counter()
            run = Path(tmp) / name.replace(", ", "_").replace(" ", "_")
            train(cfg, run, device, progress=False)
            metrics = evaluate_run(run, "test", device)
            oracle |= {k: metrics[f"oracle/{k}"] for k in COLUMNS if f"oracle/{k}" in metrics}
            rows.append(
                {
                    "model": name,
                    **{k: metrics.get(k, float("nan")) for k in COLUMNS},
                    "minutes": (time.perf_counter() - start) / 60,
                }
            )
            print(rows[-1], flush=True)
    rows.append({"model": "oracle", **{k: oracle.get(k, float("nan")) for k in COLUMNS}, "minutes": 0.0})
    markdown = print_table(rows, "test split of the default synthetic world (lower is better for rmse and deviance)")
    write_results("quality", rows, markdown, command="python benchmarks/bench_quality.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
