"""The training step with glibc's default malloc settings and with `hardware.keep_freed_memory`, side by side.

    python benchmarks/bench_memory.py [--config configs/demo.toml] [--batch-sizes 2048,4096,16384] [--steps 32]
        [--repeats 2] [--out memory]

Each (batch size, setting) trains in its own process (the malloc settings are process-wide), on batches held in
memory after a warm-up, the two settings alternating `--repeats` times: samples/s, page faults and kernel (system) CPU
time per step, peak RSS. Writes benchmarks/results/<out>.json and .md.
"""

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

SETTINGS = ("glibc defaults", "kept (ours)")
WARMUP_STEPS = 8


def child(config: Path, batch_size: int, steps: int, keep: bool) -> dict:
    """One process's measurement (run with --child)."""
    import torch

    import recsys_mtl.step as step
    from recsys_mtl.config import load_config
    from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches

    if not keep:
        step.keep_freed_memory = lambda: False  # build_trainer calls it: leave glibc as it starts
    cfg = load_config(config, [f"train.batch_size={batch_size}"])
    dataset = Dataset(cfg.dataset)
    trainer = step.build_trainer(cfg, dataset, torch.device("cpu"))
    order = ReadOrder(shuffle=True, seed=cfg.train.seed)
    batches = list(itertools.islice(read_batches(dataset, "train", batch_size, order), 8))
    for i in range(WARMUP_STEPS):
        step.train_step(trainer, batches[i % len(batches)], i)
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(steps):
        step.train_step(trainer, batches[i % len(batches)], WARMUP_STEPS + i)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "samples/s": steps * batch_size / seconds,
        "page faults / step": (after.ru_minflt - before.ru_minflt) / steps,
        "kernel CPU ms / step": 1000 * (after.ru_stime - before.ru_stime) / steps,
        "peak RSS MB": after.ru_maxrss / 1024,
    }


def measure(args: argparse.Namespace, batch_size: int, keep: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--config", str(args.config), "--steps", str(args.steps)]
    command += ["--batch-sizes", str(batch_size)] + (["--keep"] if keep else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--batch-sizes", default="2048,4096,16384")
    parser.add_argument("--steps", type=int, default=32, help="measured steps per process")
    parser.add_argument("--repeats", type=int, default=2, help="processes per setting and batch size")
    parser.add_argument("--out", default="memory", help="results name under benchmarks/results (%(default)s)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.child:
        print(json.dumps(child(args.config, batch_sizes[0], args.steps, args.keep)))
        return
    rows = []
    for batch_size in batch_sizes:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for keep in (False, True) if repeat % 2 == 0 else (True, False):  # neither always goes first
                runs[keep].append(measure(args, batch_size, keep))
                print(f"batch {batch_size}, {SETTINGS[keep]}: {runs[keep][-1]}", flush=True)
        medians = {keep: {k: statistics.median(r[k] for r in done) for k in done[0]} for keep, done in runs.items()}
        for keep in (False, True):
            speedup = medians[keep]["samples/s"] / medians[False]["samples/s"]
            rows.append({"batch": batch_size, "malloc": SETTINGS[keep], **medians[keep], "vs defaults": speedup})
    title = f"training step of {args.config}, batches in memory, median of {args.repeats} processes each"
    markdown = print_table(rows, title)
    write_results(args.out, rows, markdown, command="python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
