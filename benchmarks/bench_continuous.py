"""Training on tomorrow's data, replayed: a drifting synthetic world, a model trained on its first week, then for
each later day three strategies, each evaluated on the day after:

    python benchmarks/bench_continuous.py [--days 21] [--first-week 7] [--impressions 630000] [--keep DIR]

- frozen: the first week's model, never updated;
- incremental: `prepare --from` the previous day's dataset, `encode-text` (new texts only), `train --init-from` the
  previous day's run on that day alone;
- retrain: a fresh dataset of every day so far and a model trained on it from scratch.

Every model scores the next day's raw impressions (`score`, encoded with the model's own vocabularies: ids it never
saw go to the unknown row) and is judged on their labels: ctr/auc, ctr/auc_cold (impressions of items launched on the
judged day or in the two days before: at most one or two updates have seen them), cvr/auc_clicked, rating/rmse,
reads/poisson_deviance, and what the update cost (train_seconds, train_rows). Writes benchmarks/results/continuous.json:

    {"meta": {...}, "days": [DAY, ...], "strategies": {"frozen" | "incremental" | "retrain": {metric: [one per day]}},
     "seeds": {SEED: {strategy: {metric: [one per day]}}}}

"strategies" holds the means over the seeds (`--seeds`, train.seed of every run; the world and datasets are built
once); continuous.md the means over the days (± the std over seeds) and continuous.png the metric per day per strategy
and the cumulative compute.
Each dataset splits its rows at random (5% validate); the config is the demo one (`--config`, `--set`), with
`--update-set` overrides for the incremental updates.
"""

import argparse
import dataclasses
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_markdown

from data_prep.description import load_description
from data_prep.prepare import prepare
from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.config import Config, load_config
from recsys_mtl.data.description import Description
from recsys_mtl.files import atomic_write_text
from recsys_mtl.metrics import auc, poisson_deviance, rmse
from recsys_mtl.score import score
from recsys_mtl.text import encode_dataset
from recsys_mtl.train import train

STRATEGIES = ("frozen", "incremental", "retrain")
METRICS = ("ctr/auc", "ctr/auc_cold", "cvr/auc_clicked", "rating/rmse", "reads/poisson_deviance")
SIDE_TABLES = ("users.parquet", "items.parquet", "ads.parquet")
COSTS = ("train_seconds", "train_rows")
COLD_DAYS = 2  # ctr/auc_cold: impressions of items launched on the judged day or in the 2 days before


def day_folder(world: Path, days: range, out: Path) -> Path:
    """A raw folder of `world` holding only the impressions (and oracle rows) of `days`: links, not copies."""
    out.mkdir(parents=True)
    for name in SIDE_TABLES:
        (out / name).symlink_to(world / name)
    for table in ("impressions", "oracle"):
        (out / table).mkdir()
    for part in sorted((world / "impressions").glob("*.parquet")):
        if pl.scan_parquet(part).select(pl.first("day")).collect().item() in days:  # a part holds one day
            for table in ("impressions", "oracle"):
                (out / table / part.name).symlink_to(world / table / part.name)
    return out


def daily_description() -> Description:
    """The synthetic description with a random split (94% train, 5% valid, 1% test) instead of the last days: every
    strategy then trains on the same share of every hour of every day (a split by time would hold out the end of each
    day from the daily updates, but only the end of the last day from a retraining)."""
    desc = load_description("synthetic")
    split = dataclasses.replace(desc.split, method="random", column=None, valid=0.05, test=0.01)
    return dataclasses.replace(desc, split=split)


def build(raw: Path, out: Path, desc: Description, cfg: Config, parent: Path | None = None) -> Path:
    """Prepare `raw` into `out` (from `parent`) and encode its texts (only those without a carried vector)."""
    prepare(raw, out, desc, parent=parent)
    encode_dataset(out, cfg.text, torch.device("cpu"), progress=False)
    return out


def fit(cfg: Config, dataset: Path, run: Path, init_from: Path | None = None) -> tuple[float, int]:
    """Train `cfg` on `dataset` into `run`; (seconds, rows trained on)."""
    train_cfg = dataclasses.replace(cfg.train, init_from=str(init_from) if init_from else "")
    start = time.perf_counter()
    result = train(
        dataclasses.replace(cfg, dataset=str(dataset), train=train_cfg), run, torch.device("cpu"), progress=False
    )
    return time.perf_counter() - start, result.steps * cfg.train.batch_size


def judge(run: Path, next_day: Path, day: int, out: Path) -> dict[str, float]:
    """The run's metrics on the raw impressions of `next_day`, day `day` (see the module)."""
    score(run, next_day / "impressions", out, torch.device("cpu"), side_dir=next_day, progress=False)
    preds = pl.read_parquet(sorted(out.glob("part-*.parquet")))
    labels = pl.read_parquet(next_day / "impressions").select("impression_id", "click", "conversion", "rating", "reads")
    rows = preds.join(labels, on="impression_id", maintain_order="left")
    launched = pl.read_parquet(next_day / "items.parquet").select("item_id", "launch_day")
    rows = rows.join(launched, on="item_id", maintain_order="left")
    cold = rows["launch_day"] >= day - COLD_DAYS
    clicked = rows.filter(pl.col("click") == 1)
    rated, read = rows.filter(pl.col("rating").is_not_null()), rows.filter(pl.col("reads").is_not_null())

    def t(frame: pl.DataFrame, column: str) -> torch.Tensor:
        return torch.from_numpy(frame[column].cast(pl.Float64).to_numpy().copy())

    return {
        "ctr/auc": auc(t(rows, "click"), t(rows, "pred_ctr")),
        "ctr/auc_cold": auc(t(rows.filter(cold), "click"), t(rows.filter(cold), "pred_ctr")),
        "cvr/auc_clicked": auc(t(clicked, "conversion"), t(clicked, "pred_cvr")),
        "rating/rmse": rmse(t(rated, "rating"), t(rated, "pred_rating")),
        "reads/poisson_deviance": poisson_deviance(t(read, "reads"), t(read, "pred_reads")),
        "cold_share": float(cold.mean()),
    }


def markdown(days: list[int], per_seed: dict[int, dict[str, dict[str, list[float]]]]) -> str:
    """Per strategy, each metric's mean over the days, as the mean ± std of that over the seeds."""
    columns = [*METRICS, *COSTS]
    lines = [
        f"Means over the {len(days)} replayed days {days[0]}..{days[-1]} (each model judged on the day after its last "
        f"update; train_* per update), mean ± std over seeds {list(per_seed)}.",
        "",
        "| strategy | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in STRATEGIES:
        cells = []
        for column in columns:
            means = [statistics.fmean(results[name][column]) for results in per_seed.values()]
            std = statistics.stdev(means) if len(means) > 1 else 0.0
            digits = ".4f" if column in METRICS else ",.1f"
            cells.append(f"{statistics.fmean(means):{digits}} ± {std:{digits}}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(days: list[int], results: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, values in results.items():
        axes[0].plot(days, values["ctr/auc"], marker="o", label=name)
        axes[1].plot(days, values["ctr/auc_cold"], marker="o", label=name)
        axes[2].plot(days, list(itertools.accumulate(values["train_seconds"])), marker="o", label=name)
    for ax, title in zip(
        axes, ("CTR AUC on the next day", "CTR AUC on cold items", "training seconds, cumulative"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("day judged")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (all runs)")
    parser.add_argument(
        "--update-set", action="append", default=[], metavar="KEY=VALUE", help="override for incremental updates"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (%(default)s)")
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--first-week", type=int, default=7, help="days the first model trains on (%(default)s)")
    parser.add_argument("--impressions", type=int, default=630_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--taste-drift", type=float, default=0.05)
    parser.add_argument("--item-half-life", type=float, default=7.0)
    parser.add_argument("--price-drift", type=float, default=0.03)
    parser.add_argument("--out", default="continuous", help="results name under benchmarks/results (%(default)s)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep the work (world, datasets, runs)")
    args = parser.parse_args()
    if not 1 <= args.first_week <= args.days - 2:
        parser.error(f"--first-week must be in [1, --days - 2], got {args.first_week}")
    cfg = load_config(args.config, args.set)
    update_cfg = load_config(args.config, [*args.set, *args.update_set])
    world_cfg = WorldConfig(
        impressions=args.impressions,
        users=args.users,
        items=args.items,
        ads=max(50, args.items // 10),
        days=args.days,
        taste_drift=args.taste_drift,
        item_half_life=args.item_half_life,
        price_drift=args.price_drift,
    )
    desc = daily_description()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    start = time.perf_counter()
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty; give an empty or new folder")
    work = Path(tempfile.mkdtemp(prefix="continuous-")) if args.keep is None else args.keep.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        world = generate_world(work / "world", world_cfg, overwrite=True, progress=False)
        first = args.first_week
        days = list(range(first + 1, args.days))  # judged days: after updating on the day before
        base = build(day_folder(world, range(first), work / "raw-first"), work / "data-first", desc, cfg)
        daily, everything, judged = {}, {}, {}  # by the judged day: the data of the day before, of all days so far
        latest = base
        for day in days:
            update = day - 1
            latest = build(
                day_folder(world, range(update, day), work / f"raw-{update}"),
                work / f"data-day-{update}",
                desc,
                cfg,
                parent=latest,
            )
            daily[day] = latest
            everything[day] = work / f"data-upto-{update}"
            prepare(day_folder(world, range(day), work / f"raw-upto-{update}"), everything[day], desc)
            shutil.copytree(latest / "text_emb", everything[day] / "text_emb")  # keyed by key and text: still valid
            encode_dataset(everything[day], cfg.text, torch.device("cpu"), progress=False)
            judged[day] = day_folder(world, range(day, day + 1), work / f"raw-{day}-judged")
        per_seed: dict[int, dict[str, dict[str, list[float]]]] = {}
        for seed in seeds:
            seeded = {
                name: dataclasses.replace(c, train=dataclasses.replace(c.train, seed=seed))
                for name, c in (("all", cfg), ("update", update_cfg))
            }
            runs = work / f"seed-{seed}"
            first_cost = fit(seeded["all"], base, runs / "first")
            results = per_seed[seed] = {s: {m: [] for m in (*METRICS, "cold_share", *COSTS)} for s in STRATEGIES}
            current = {"frozen": runs / "first", "incremental": runs / "first"}
            for day in days:
                cost = {"frozen": (0.0, 0)}
                cost["incremental"] = fit(seeded["update"], daily[day], runs / f"inc-{day}", current["incremental"])
                current["incremental"] = runs / f"inc-{day}"
                cost["retrain"] = fit(seeded["all"], everything[day], runs / f"all-{day}")
                current["retrain"] = runs / f"all-{day}"
                for name in STRATEGIES:
                    metrics = judge(current[name], judged[day], day, runs / f"scores-{name}-{day}")
                    metrics["train_seconds"], metrics["train_rows"] = cost[name]
                    for key, value in metrics.items():
                        results[name][key].append(value)
                    print(f"seed {seed} day {day} {name}: { {k: round(v, 4) for k, v in metrics.items()} }", flush=True)
            _write(args, days, per_seed, world_cfg, first_cost, start)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _write(
    args: argparse.Namespace,
    days: list[int],
    per_seed: dict[int, dict[str, dict[str, list[float]]]],
    world: WorldConfig,
    first_cost: tuple[float, int],
    start: float,
) -> None:
    """Write the json, md and png for the seeds done so far (a long run keeps what it finished)."""
    meta = {
        "command": f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
        **machine(),
        "config": args.config,
        "overrides": args.set,
        "update_overrides": args.update_set,
        "world": dataclasses.asdict(world),
        "first_week": {"days": args.first_week, "train_seconds": first_cost[0], "train_rows": first_cost[1]},
        "seeds": list(per_seed),
        "minutes": (time.perf_counter() - start) / 60,
    }
    strategies = {
        name: {
            m: [statistics.fmean(s[name][m][d] for s in per_seed.values()) for d in range(len(days))] for m in values
        }
        for name, values in next(iter(per_seed.values())).items()
    }
    RESULTS.mkdir(exist_ok=True)
    data = {"meta": meta, "days": days, "strategies": strategies, "seeds": per_seed}
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps(data, indent=1) + "\n")
    text = markdown(days, per_seed)
    write_markdown(args.out, meta["command"], text)
    plot(days, strategies, RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
