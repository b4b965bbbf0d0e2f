"""Hyperparameter search on the default world: a study over configs/demo_space.toml with a small budget per trial,
then its best config against the shipped one, both trained in full over several seeds.

    python benchmarks/bench_tune.py [--config configs/demo.toml] [--space configs/demo_space.toml] [--trials 20]
        [--max-steps 180] [--eval-every 60] [--seeds 0,1,2] [--set KEY=VALUE ...] [--tune-dir DIR] [--out tune]

Needs the prepared, text-encoded default world (make demo). The study runs in this process into --tune-dir (default:
a temporary folder; a kept one resumes), each trial under the space's [study.fixed] with --max-steps and --eval-every;
then best.toml and the config as shipped train in full with every seed and are evaluated on the test split. Writes
benchmarks/results/<out>.json and .md: the study's objective on the test split (mean ± std over the seeds) for both,
the best trial's values, and the time per trial (setup and training) against the process's one start-up.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import tomli_w
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import train_variants
from common import write_results

from recsys_mtl.config import load_config
from recsys_mtl.distributed import process_group
from recsys_mtl.structs import read_toml, to_mapping
from recsys_mtl.tune import tune
from recsys_mtl.tune_space import check_space, load_space


def _process_age() -> float:
    """Seconds since this process started (Linux): the interpreter's and the imports' start-up, so far."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


def _space_with_budget(space: Path, max_steps: int, eval_every: int, folder: Path) -> Path:
    """A copy of `space` whose [study.fixed] trains each trial at most `max_steps` steps, validating every
    `eval_every`."""
    data = read_toml(space)
    fixed = data.setdefault("study", {}).setdefault("fixed", {})
    fixed |= {"train.max_steps": max_steps, "train.eval_every": eval_every}
    path = folder / "space.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--space", type=Path, default=Path("configs/demo_space.toml"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=180, help="each trial's budget (%(default)s)")
    parser.add_argument("--eval-every", type=int, default=60, help="steps between a trial's validations (%(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values of the full trainings (%(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of both configs")
    parser.add_argument("--tune-dir", type=Path, help="the study's TUNE_DIR (default: temporary)")
    parser.add_argument("--out", default="tune", help="results name under benchmarks/results (%(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    device = torch.device(args.device)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    imports_s = _process_age()  # what every trial would pay again in a process of its own
    with tempfile.TemporaryDirectory(prefix="tune-") as tmp, process_group(device):
        tune_dir = args.tune_dir or Path(tmp) / "tune"
        space = _space_with_budget(args.space, args.max_steps, args.eval_every, Path(tmp))
        start = time.perf_counter()
        result = tune(args.config, space, tune_dir, args.trials, device, tuple(args.set))
        study_minutes = (time.perf_counter() - start) / 60
        if result.best is None:
            sys.exit(f"no trial of the study completed; see {tune_dir / 'trials.csv'}")
        objective = check_space(load_space(space), args.config, tuple(args.set)).objective
        shipped = load_config(args.config, args.set)
        chosen = {"shipped": shipped, "tuned": load_config(tune_dir / "best.toml")}
        trained = train_variants(chosen, seeds, Path(tmp) / "full", device)
        trials = optuna.load_study(study_name=result.study_name, storage=result.storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    times = {key: statistics.fmean(t.user_attrs[key] for t in complete) for key in ("seconds", "setup_s", "train_s")}
    rows: list[dict[str, Any]] = []
    for name, summary in trained.items():
        values = [objective.value(metrics) for metrics in summary["seeds"].values()]
        mean, std = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append({"config": name, "objective": objective.describe(), "mean": mean, "std": std, "seeds": values})
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items())
    lines = [
        f"Study: {args.trials} trials of {args.space} on {args.config} ({counts}), each at most {args.max_steps} "
        f"steps validated every {args.eval_every}, in {study_minutes:.1f} min; best trial {result.best.number} "
        f"({result.best.value:.5f} on the validation split): {result.best.params}.",
        "",
        f"Full training (the configs as they are), test split, {objective.describe()}, mean ± std over seeds {seeds}:",
        "",
        "| config | objective | per seed |",
        "|---|---|---|",
        *(
            f"| {r['config']} | {r['mean']:.5f} ± {r['std']:.5f} | {', '.join(f'{v:.5f}' for v in r['seeds'])} |"
            for r in rows
        ),
        "",
        f"Time per complete trial: {times['seconds']:.1f} s = setup {times['setup_s']:.1f} s (dataset, model, sharding "
        f"plan) + training and validation {times['train_s']:.1f} s. Start-up, once per study: imports "
        f"{imports_s:.1f} s + study {result.startup_s:.1f} s.",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    command = f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])
    write_results(
        args.out,
        rows,
        markdown,
        command=command,
        trials=[{"number": t.number, "state": t.state.name.lower(), "value": t.value, **t.params} for t in trials],
        best_params=result.best.params,
        tuned_config=to_mapping(chosen["tuned"]),
        time_per_trial=times,
        startup_s={"imports": imports_s, "study": result.startup_s},
        study_minutes=study_minutes,
        seeds=seeds,
    )


if __name__ == "__main__":
    main()
