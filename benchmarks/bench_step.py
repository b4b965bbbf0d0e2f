"""Two configs' training steps side by side: samples/s of config A and config B (overrides of one config).

    python benchmarks/bench_step.py --b model.task_embedding_dim=0 [--a KEY=VALUE ...] [--config configs/demo.toml]
        [--steps 20] [--repeats 8] [--out step_task_tables]

Both trainers train on the same batches, held in memory (no reading), in alternating windows of `--steps` steps after
a warm-up (bench_health.Side), `--repeats` windows each: samples/s of each (median and best window) and the ratio A / B.
Writes benchmarks/results/<out>.json and .md.
"""

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_health import NUM_BATCHES, WARMUP_STEPS, Side
from common import print_table, write_results

from recsys_mtl.config import load_config
from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches
from recsys_mtl.step import build_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="overrides of config A")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="overrides of config B")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--repeats", type=int, default=8, help="windows per config")
    parser.add_argument("--out", default="step", help="results name under benchmarks/results (%(default)s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    configs = {f"A {' '.join(args.a) or '(the config)'}": args.a, f"B {' '.join(args.b) or '(the config)'}": args.b}
    sides = []
    for name, overrides in configs.items():
        cfg = load_config(args.config, overrides)
        dataset = Dataset(cfg.dataset)
        sides.append(Side(name, build_trainer(cfg, dataset, device)))
    order = ReadOrder(shuffle=True, seed=cfg.train.seed)
    batch_size = cfg.train.batch_size
    batches = [b.to(device) for b in itertools.islice(read_batches(dataset, "train", batch_size, order), NUM_BATCHES)]
    for side in sides:
        side.run(batches, WARMUP_STEPS)
    windows: dict[str, list[float]] = {side.name: [] for side in sides}
    for repeat in range(args.repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:  # neither always goes first
            windows[side.name].append(side.run(batches, args.steps))
            print(f"{side.name}: {args.steps * batch_size / windows[side.name][-1]:,.0f} samples/s", flush=True)
    rows = [
        {
            "config": name,
            "samples/s (median window)": args.steps * batch_size / statistics.median(seconds),
            "samples/s (best window)": args.steps * batch_size / min(seconds),
            "ms/step (median)": 1000 * statistics.median(seconds) / args.steps,
        }
        for name, seconds in windows.items()
    ]
    ratio = rows[0]["samples/s (median window)"] / rows[1]["samples/s (median window)"]
    markdown = "\n".join(
        [
            print_table(
                rows,
                f"training step of {args.config} (batch {batch_size}, {args.device}; {args.repeats} alternating "
                f"windows of {args.steps} steps)",
            ),
            f"\nA / B, samples/s of the median windows: {ratio:.3f}",
        ]
    )
    print(markdown.splitlines()[-1])
    command = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    write_results(args.out, [*rows, {"A / B (median windows)": ratio}], markdown, command=command)


if __name__ == "__main__":
    main()
