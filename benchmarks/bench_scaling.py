"""How training cost grows with the work: samples/s and peak memory of the default model (configs/demo.toml, without
text) at total embedding-table sizes of 10^5 to 10^7 rows and several batch sizes.

    python benchmarks/bench_scaling.py [--sizes 1e5,1e6,1e7] [--batches 1024,4096,16384] [--steps 8]

Each point runs in its own process (so its peak memory is its own) on a generated dataset with the default world's
features: the user, item and ad tables scaled to 60 / 30 / 10% of the size, the small tables as they are, ids drawn
from a skewed (power-law) distribution, random labels. Writes benchmarks/results/scaling_<device>.json, .md and .png.
"""

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, write_results

from recsys_mtl.config import load_config
from recsys_mtl.data.loader import Dataset, read_batches
from recsys_mtl.data.schema import SPLITS, Schema, SplitSpec
from recsys_mtl.step import build_trainer, train_step

SCALED = {"user": 0.6, "item": 0.3, "ad": 0.1}


def make_dataset(template: Path, out: Path, total_rows: int, num_rows: int) -> Path:
    """A prepared dataset with `template`'s features (no texts), the big tables scaled to `total_rows` rows."""
    schema = Schema.load(template)
    tables = tuple(
        dataclasses.replace(t, num_embeddings=int(total_rows * SCALED[t.name])) if t.name in SCALED else t
        for t in schema.tables
    )
    sizes = {t.name: t.num_embeddings for t in tables}
    rng = np.random.default_rng(0)
    columns: dict[str, object] = {}
    for f in schema.features:
        if f.kind == "id":
            columns[f.name] = (sizes[f.table] * rng.random(num_rows) ** 3).astype(np.int64)  # a few hot rows
        elif f.kind == "multi_hot":
            lengths = rng.integers(0, 6, num_rows)
            flat = rng.integers(0, sizes[f.table], int(lengths.sum()))
            columns[f.name] = pl.Series(np.split(flat, np.cumsum(lengths)[:-1])).cast(pl.List(pl.Int64))
        else:
            columns[f.name] = rng.lognormal(size=num_rows).astype(np.float32)
    click = (rng.random(num_rows) < 0.05).astype(np.float32)
    labels = {
        "click": click,
        "conversion": np.where(click == 1, (rng.random(num_rows) < 0.25).astype(np.float32), np.nan),
        "rating": np.where(rng.random(num_rows) < 0.02, rng.integers(1, 6, num_rows).astype(np.float32), np.nan),
        "reads": np.where(rng.random(num_rows) < 0.3, rng.poisson(0.2, num_rows).astype(np.float32), np.nan),
    }
    frame = pl.DataFrame(columns).with_columns(
        pl.Series(name, values, dtype=pl.Float32, nan_to_null=True) for name, values in labels.items()
    )
    out.mkdir(parents=True)
    splits = {}
    for split in SPLITS:
        (out / split).mkdir()
        frame.write_parquet(out / split / "00000000.parquet", row_group_size=16_384)
        splits[split] = SplitSpec(files=(f"{split}/00000000.parquet",), num_rows=num_rows)
    Schema(name="scaling", tables=tables, features=schema.features, labels=schema.labels, splits=splits).save(out)
    return out


def measure(config: Path, total_rows: int, batch_size: int, steps: int, device: torch.device) -> dict:
    """Train `steps` steps (after two warm-up steps) of the config's model on a generated dataset."""
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(load_config(config).dataset)
        folder = make_dataset(template, Path(tmp) / "data", total_rows, batch_size * (steps + 2))
        cfg = load_config(config, [f"dataset={json.dumps(str(folder))}", "model.text_dim=0"])
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))
        dataset = Dataset(folder)
        start = time.perf_counter()
        trainer = build_trainer(cfg, dataset, device)
        build_seconds = time.perf_counter() - start
        batches = [b.to(device) for b in read_batches(dataset, "train", batch_size)]
        for step, batch in enumerate(batches[:2]):
            train_step(trainer, batch, step)
        start = time.perf_counter()
        for step, batch in enumerate(batches[2:]):
            train_step(trainer, batch, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {
        "table rows": total_rows,
        "batch": batch_size,
        "samples/s": batch_size * steps / seconds,
        "ms/step": 1000 * seconds / steps,
        "peak MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model build s": build_seconds,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for batch in sorted({r["batch"] for r in rows}):
        points = [r for r in rows if r["batch"] == batch]
        sizes = [r["table rows"] for r in points]
        speed.plot(sizes, [r["samples/s"] for r in points], marker="o", label=f"batch {batch}")
        memory.plot(sizes, [r["peak MB"] for r in points], marker="o", label=f"batch {batch}")
    for axis, label in ((speed, "training samples/s"), (memory, "peak memory (MB)")):
        axis.set_xscale("log")
        axis.set_xlabel("embedding-table rows in all")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--batches", default="1024,4096,16384")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--one", nargs=2, type=float, metavar=("ROWS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a single point, in its own process
        row = measure(args.config, int(args.one[0]), int(args.one[1]), args.steps, torch.device(args.device))
        print(json.dumps(row))
        return
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            command = [sys.executable, __file__, "--config", str(args.config), "--steps", str(args.steps)]
            command += ["--device", args.device, "--one", str(size), str(batch)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    markdown = print_table(rows, f"training cost by table size and batch ({args.config} without text, {args.device})")
    plot(rows, RESULTS / f"scaling_{args.device}.png")
    command = "python benchmarks/bench_scaling.py " + " ".join(sys.argv[1:])
    write_results(
        f"scaling_{args.device}", rows, markdown + f"\n\n![scaling](scaling_{args.device}.png)", command=command
    )


if __name__ == "__main__":
    main()
