"""Explanations against the synthetic world's truth: for each term the generator draws the labels from
(explain.SYNTHETIC_DRIVERS), the rank of its best-ranked feature for each task under integrated gradients and under
the permutation importance, on a trained run of the default world; and each task's top features under both.

    python benchmarks/bench_explain.py [RUN_DIR] [--split test] [--sample 0] [--ig-rows 2000] [--repeats 2]

Reads the run, writes nothing into it: the tables go to benchmarks/results/explain.{json,md}.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

from recsys_mtl.explain import SYNTHETIC_DRIVERS, ExplainSettings, explain
from recsys_mtl.run import load_run

TOP = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=Path("demo_out/runs/mmoe"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--sample", type=int, default=0, help="rows drawn from the split; 0: all (%(default)s)")
    parser.add_argument("--ig-rows", type=int, default=2_000, help="(%(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="(%(default)s)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = ExplainSettings(sample=args.sample, attribution_rows=args.ig_rows, repeats=args.repeats, rows=0)
    start = time.perf_counter()
    run = load_run(args.run_dir, device)
    explanation = explain(run, args.split, settings, progress=True)
    seconds = time.perf_counter() - start
    tasks = list(explanation.metrics)

    driver_rows = []
    for name, ranks in explanation.drivers.items():
        driver = SYNTHETIC_DRIVERS[name]
        for method, label in (("integrated_gradients", "ig"), ("permutation", "perm")):
            cells = {t: f"{ranks[method][t]}{'*' if t in driver.tasks else ''}" for t in tasks}
            driver_rows.append({"driver": name, "features": ", ".join(driver.features), "method": label, **cells})
    top_rows = [
        {
            "task": task,
            "rows (ig / perm)": f"{explanation.attribution_rows[task]:,} / {explanation.task_rows[task]:,}",
            "ig top": ", ".join(explanation.ranking("integrated_gradients", task)[:TOP]),
            "perm top": ", ".join(explanation.ranking("permutation", task)[:TOP]),
            "perm metric": explanation.metrics[task],
            "ig completeness error": round(explanation.completeness[task], 4),
            "rank correlation": round(explanation.agreement[task], 2),
        }
        for task in tasks
    ]
    title = (
        f"Rank (1 = first of {len(explanation.features)} features) of the generator's terms, {args.run_dir} on its "
        f"{args.split} split; * = the term enters that task's label"
    )
    markdown = print_table(driver_rows, title)
    markdown += "\n" + print_table(top_rows, f"Each task's top {TOP} features under both methods")
    write_results(
        "explain",
        [*driver_rows, *top_rows],
        markdown,
        command="python " + " ".join(sys.argv),
        run=str(args.run_dir),
        split=args.split,
        num_rows=explanation.num_rows,
        settings=dataclasses.asdict(settings),
        seconds=round(seconds, 1),
    )


if __name__ == "__main__":
    main()
