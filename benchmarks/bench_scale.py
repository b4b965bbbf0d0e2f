"""Training samples/s at 1 and 2 ranks (torchrun, gloo on CPU), and batch-scoring rows/s (fp32 and int8 tables, 1 and
2 ranks) with the int8 tables' metric drift, on the default synthetic world.

    python benchmarks/bench_scale.py [--config configs/demo.toml] [--steps 120]

Needs the prepared, text-encoded dataset of the config (make demo builds it). Every measurement runs the real
command line (`recsys-mtl train|score`, under torchrun for 2 ranks) in a temporary folder, one after the other.
Training rates are taken over the logged steps after the first log point (warm-up excluded); the 2-rank run
checkpoints halfway, so its rate before and after a collective checkpoint save is reported too.
Writes benchmarks/results/scale_<device>.json.
"""

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

from recsys_mtl.config import load_config
from recsys_mtl.metrics import auc

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "recsys_mtl"]
SINGLE = [sys.executable, "-m", "recsys_mtl"]


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _window_rates(run: Path, batch_size: int, world_size: int) -> list[tuple[int, float]]:
    """(step, samples/s over the steps since the previous log point), from the cumulative rates in metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["samples_per_s"]) for r in records if r["kind"] == "train"]
    seconds = [(step, step * batch_size * world_size / rate) for step, rate in logged]  # since the first step
    return [(b, (b - a) * batch_size * world_size / (tb - ta)) for (a, ta), (b, tb) in itertools.pairwise(seconds)]


def train_rows(config: Path, steps: int, tmp: Path, device: str) -> list[dict]:
    cfg = load_config(config)
    rows = []
    for ranks, launcher in ((1, SINGLE), (2, TORCHRUN)):
        run = tmp / f"train_{ranks}"
        per_rank_steps = steps // ranks  # the same samples in all
        sets = [f"train.max_steps={per_rank_steps}", f"train.log_every={per_rank_steps // 6}"]
        sets += [f"train.checkpoint_every={per_rank_steps // 2}", "train.early_stop_metric="]
        command = [*launcher, "train", "--config", str(config), "--out", str(run), "--quiet", "--device", device]
        _run([*command, *(a for s in sets for a in ("--set", s))])
        rates = _window_rates(run, cfg.train.batch_size, ranks)
        half = per_rank_steps // 2
        before = [rate for step, rate in rates if step <= half]
        after = [rate for step, rate in rates if step > half + per_rank_steps // 6]  # skip the window with the save
        rows.append(
            {
                "ranks": ranks,
                "batch/rank": cfg.train.batch_size,
                "steps/rank": per_rank_steps,
                "samples/s": sum(r for _, r in rates) / len(rates),
                "before ckpt": sum(before) / len(before),
                "after ckpt": sum(after) / len(after),
            }
        )
        print(rows[-1], flush=True)
    return rows


def _score(command: list[str], out: Path, name: str, ranks: int) -> dict:
    _run([*command, "--out", str(out), "--quiet"])
    summary = json.loads((out / "summary.json").read_text())
    row = {"ranks": ranks, "scoring": name, "rows": summary["rows"], "rows/s": summary["rows_per_second"]}
    print(row | {"peak MB": summary["peak_memory_mb"]}, flush=True)
    return row | {"peak MB": summary["peak_memory_mb"]}


def score_rows(config: Path, tmp: Path, device: str) -> tuple[list[dict], dict]:
    cfg = load_config(config)
    run = str(tmp / "train_1")  # the 1-rank run trained above
    rows, scores = [], {}
    for ranks, launcher, int8 in ((1, SINGLE, False), (1, SINGLE, True), (2, TORCHRUN, False), (2, TORCHRUN, True)):
        out = tmp / f"score_{ranks}_{int8}"
        command = [*launcher, "score", run, cfg.dataset, "--device", device, "--rows-per-shard", "65536"]
        name = "test split, int8 tables" if int8 else "test split, fp32"
        rows.append(_score([*command, *(["--int8"] if int8 else [])], out, name, ranks))
        scores[int8] = pl.concat(pl.read_parquet(p) for p in sorted(out.glob("part-*.parquet")))
    raw = Path(cfg.dataset).parent / "raw" / "impressions"
    if raw.is_dir():  # raw rows: encoded with the saved vocabularies, side tables joined
        command = [*SINGLE, "score", run, str(raw), "--device", device]
        rows.append(_score(command, tmp / "score_raw", "raw impressions, fp32", 1))
    clicks = torch.from_numpy(pl.read_parquet(Path(cfg.dataset) / "test", columns=["click"])["click"].to_numpy())
    fp32, int8 = scores[False], scores[True]
    drift = {
        "ctr/auc fp32": auc(clicks, fp32["pred_ctr"].to_torch()),
        "ctr/auc int8": auc(clicks, int8["pred_ctr"].to_torch()),
        "pred_ctr max |diff|": float((fp32["pred_ctr"] - int8["pred_ctr"]).abs().max()),
        "pred_rating max |diff|": float((fp32["pred_rating"] - int8["pred_rating"]).abs().max()),
    }
    return rows, drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--steps", type=int, default=240, help="training steps at 1 rank (half as many at 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        training = train_rows(args.config, args.steps, Path(tmp), args.device)
        scoring, drift = score_rows(args.config, Path(tmp), args.device)
    markdown = "\n".join(
        [
            print_table(training, f"training, {args.config} ({args.device})"),
            print_table(scoring, "batch scoring (rows/s over the whole command: model load included)"),
            print_table([drift], "int8 tables against fp32 (test split)"),
        ]
    )
    command = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    write_results(f"scale_{args.device}", training + scoring + [drift], markdown, command=command)


if __name__ == "__main__":
    main()
