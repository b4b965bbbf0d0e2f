"""What measuring the gradient conflict (`train.conflict_every`) costs the training step.

    python benchmarks/bench_health.py [--config configs/demo.toml] [--device cpu|cuda] [--steps 50] [--repeats 10]

Two trainers of the config, one with conflict_every = 0 and one with the default (50), train side by side on the same
batches, held in memory (no reading), in alternating windows of `--steps` steps, `--repeats` windows each, after a
warm-up: samples/s of each (median and best window) and their ratio. The loop's rule picks the measuring steps
(train.conflict_due). Then the cost of one measure alone: single measuring steps against plain ones, interleaved
(medians), and what it amortises to at the default interval. Both trainers must see the same losses to the bit.
Writes benchmarks/results/health.json and .md (health_cuda.* with --device cuda).
"""

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_results

from recsys_mtl.config import Config, TrainConfig, load_config
from recsys_mtl.data.batch import Batch
from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches
from recsys_mtl.step import CONFLICT_PREFIX, Trainer, build_trainer, train_step
from recsys_mtl.train import conflict_due

NUM_BATCHES = 16  # distinct batches, cycled
WARMUP_STEPS = 5
SINGLE_STEPS = 15  # pairs of single steps for the cost of one measure


def _rng_states() -> list[torch.Tensor]:
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])]


def _set_rng_states(states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1])


@dataclasses.dataclass
class Side:
    """One variant: its trainer, its step count, every loss it saw and its own random stream (gate dropout draws from
    torch's global generator: without its own stream, a side's draws would depend on the other side's windows)."""

    name: str
    trainer: Trainer  # build_trainer seeds the generator: each side's stream starts where its build left it
    step_fn: Callable[..., dict[str, float]] = train_step  # another revision's (bench_step --a-revision)
    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    rng: list[torch.Tensor] = dataclasses.field(default_factory=_rng_states)

    def run(self, batches: list[Batch], num_steps: int, measure: bool | None = None) -> float:
        """`num_steps` training steps (measuring as the loop would, unless `measure` says); their seconds."""
        every = self.trainer.cfg.train.conflict_every
        _set_rng_states(self.rng)
        start = time.perf_counter()
        for _ in range(num_steps):
            due = conflict_due(every, self.step + 1) if measure is None else measure
            metrics = self.step_fn(self.trainer, batches[self.step % len(batches)], self.step, measure_conflict=due)
            self.losses.append(metrics["loss"])  # .item() in train_step: the step is done, on any device
            self.step += 1
        seconds = time.perf_counter() - start
        self.rng = _rng_states()
        return seconds


def _with_conflict_every(cfg: Config, every: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, conflict_every=every))


def measure(config: Path, device: torch.device, steps: int, repeats: int) -> tuple[list[dict], list[dict]]:
    cfg = load_config(config)
    default = TrainConfig().conflict_every
    dataset = Dataset(cfg.dataset)
    batch_size = cfg.train.batch_size
    order = ReadOrder(shuffle=True, seed=cfg.train.seed)
    batches = [b.to(device) for b in itertools.islice(read_batches(dataset, "train", batch_size, order), NUM_BATCHES)]
    off = Side("conflict_every = 0 (off)", build_trainer(_with_conflict_every(cfg, 0), dataset, device))
    on = Side(
        f"conflict_every = {default} (default)", build_trainer(_with_conflict_every(cfg, default), dataset, device)
    )
    for side in (off, on):
        side.run(batches, WARMUP_STEPS)
    windows: dict[str, list[float]] = {off.name: [], on.name: []}
    for repeat in range(repeats):
        for side in (off, on) if repeat % 2 == 0 else (on, off):  # neither always goes first
            windows[side.name].append(side.run(batches, steps))
            print(f"{side.name}: {steps * batch_size / windows[side.name][-1]:,.0f} samples/s", flush=True)
    identical = off.losses == on.losses
    measured = sum(conflict_due(default, s) for s in range(WARMUP_STEPS + 1, on.step + 1))
    # the cost of one measure: the same step with and without it, interleaved one by one
    plain, measuring = [], []
    for _ in range(SINGLE_STEPS):
        plain.append(off.run(batches, 1, measure=False))
        measuring.append(on.run(batches, 1, measure=True))
    last = train_step(on.trainer, batches[0], on.step, measure_conflict=True)

    rows = []
    for side in (off, on):
        seconds = windows[side.name]
        rows.append(
            {
                "variant": side.name,
                "samples/s (median window)": steps * batch_size / statistics.median(seconds),
                "samples/s (best window)": steps * batch_size / min(seconds),
                "ms/step (median)": 1000 * statistics.median(seconds) / steps,
            }
        )
    plain_ms, measuring_ms = 1000 * statistics.median(plain), 1000 * statistics.median(measuring)
    summary = [
        {
            "measure": "default / off, samples/s of the median windows",
            "value": rows[1]["samples/s (median window)"] / rows[0]["samples/s (median window)"],
        },
        {
            "measure": "default / off, samples/s of the best windows",
            "value": rows[1]["samples/s (best window)"] / rows[0]["samples/s (best window)"],
        },
        {"measure": f"measures in the default's {repeats} windows", "value": measured},
        {"measure": "a plain step, ms (median of single steps)", "value": plain_ms},
        {"measure": "a measuring step, ms (median of single steps)", "value": measuring_ms},
        {"measure": "one measure, ms", "value": measuring_ms - plain_ms},
        {
            "measure": f"one measure every {default} steps, % of step time",
            "value": 100 * (measuring_ms - plain_ms) / default / plain_ms,
        },
        {"measure": f"losses identical over {off.step} steps (off vs default)", "value": str(identical)},
        {"measure": "conflict/mean of the last step", "value": last[f"{CONFLICT_PREFIX}mean"]},
    ]
    for row in summary:
        print(row, flush=True)
    if not identical:
        raise SystemExit("the measure changed the training losses: the steps are not bit-identical")
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=50, help="steps per window (at 50: one measure in each)")
    parser.add_argument("--repeats", type=int, default=10, help="windows per variant")
    args = parser.parse_args()
    rows, summary = measure(args.config, torch.device(args.device), args.steps, args.repeats)
    cfg = load_config(args.config)
    markdown = "\n".join(
        [
            print_table(
                rows,
                f"training step with and without the gradient-conflict measure ({args.config}, batch "
                f"{cfg.train.batch_size}, {args.device}; {args.repeats} alternating windows of {args.steps} steps)",
            ),
            print_table(summary, "ratio and the cost of one measure"),
        ]
    )
    command = "python benchmarks/bench_health.py " + " ".join(sys.argv[1:])
    name = "health" if args.device == "cpu" else f"health_{args.device}"
    write_results(name, [*rows, *summary], markdown, command=command)


if __name__ == "__main__":
    main()
