"""The training loop: validation, early stopping, metrics logs, checkpoints and resume."""

import itertools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from recsys_mtl.checkpoint import fingerprint, load_checkpoint, read_progress, save_checkpoint
from recsys_mtl.config import Config
from recsys_mtl.data.loader import Dataset, count_batches, read_batches
from recsys_mtl.distributed import average_norm_statistics, world
from recsys_mtl.evaluate import split_metrics
from recsys_mtl.files import atomic_write_text
from recsys_mtl.metrics import better
from recsys_mtl.model.losses import TaskSpec
from recsys_mtl.trainer import Trainer, build_trainer, train_step, training_state

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]  # the training loss at every log line
    valid: list[dict[str, float]]  # validation metrics at every validation
    best: dict[str, float]
    stopped_early: bool


def main_metric(cfg: Config, specs: tuple[TaskSpec, ...]) -> str:
    """The early-stopping metric: `train.early_stop_metric`, else the first task's headline metric."""
    if cfg.train.early_stop_metric:
        return cfg.train.early_stop_metric
    spec = specs[0]
    if spec.after is not None:
        return f"{spec.name}/auc_clicked"
    return f"{spec.name}/" + {"binary": "auc", "regression": "rmse", "count": "poisson_deviance"}[spec.kind]


def set_learning_rate(trainer: Trainer, step: int, total_steps: int) -> None:
    """The dense learning rate of `step` (a function of the step alone, so a resumed run follows the same curve)."""
    optim = trainer.cfg.optim
    scale = 1.0 if optim.decay == "none" else 1.0 - 0.95 * min(step / max(total_steps, 1), 1.0)
    for group in trainer.sharded.dense_optimizer.param_groups:
        group["lr"] = optim.lr * scale


class MetricsLog:
    """Metrics as JSON lines (metrics.jsonl) and TensorBoard scalars (tensorboard/), written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.file = (run_dir / "metrics.jsonl").open("a")
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        self.file.flush()
        for name, value in metrics.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


def train(cfg: Config, run_dir: Path, device: torch.device, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train `cfg` into `run_dir`: validation and early stopping, JSONL / TensorBoard metrics, checkpoints.

    With `resume`, continues from `run_dir/checkpoints/last` (model, optimizers, RNG, data position) and reaches the
    same state as a run that was never interrupted.

    Raises:
        FileNotFoundError / ValueError: missing dataset or checkpoint, a checkpoint made for another model or data.
    """
    run_dir = Path(run_dir)
    dataset = Dataset(cfg.dataset)
    trainer = build_trainer(cfg, dataset, device)
    rank, world_size = world()
    expected = fingerprint(cfg, dataset.schema)
    checkpoints = run_dir / "checkpoints"
    position = {"step": 0, "epoch": 0, "batch": 0, "best": None, "stale": 0, "fingerprint": expected}
    if resume:
        position = read_progress(checkpoints / "last", expected)
        saved_world = position.get("world_size", world_size)
        if saved_world != world_size:  # the same samples into the epoch; the ranks' parts of it differ, though
            position["batch"] = position["batch"] * saved_world // world_size
            log.warning(
                "resuming a %d-rank run on %d ranks: the epoch continues after the same number of samples, not the "
                "same rows; the learning-rate schedule follows the new steps per epoch",
                saved_world,
                world_size,
            )
        for optimizer in (trainer.sharded.dense_optimizer, trainer.loss_optimizer):
            if optimizer is not None:
                optimizer.init_state()  # create the state tensors the checkpoint is loaded into
        state = training_state(trainer)
        load_checkpoint(checkpoints / "last", state)
        torch.set_rng_state(state["rng"])
        log.info(
            "resumed %s at step %d (epoch %d, batch %d)",
            run_dir,
            position["step"],
            position["epoch"],
            position["batch"],
        )
    elif rank == 0 and (checkpoints / "last").exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    position["world_size"] = world_size
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.toml")
        plan = str(trainer.sharded.plan)
        atomic_write_text(run_dir / "sharding_plan.txt", plan + "\n")
        log.info("sharding plan over %d rank(s):\n%s", world_size, plan)
    metric = main_metric(cfg, trainer.specs)
    logger = MetricsLog(run_dir, enabled=rank == 0)
    losses, valid, stopped = [], [], False
    max_steps = cfg.train.max_steps or None
    per_epoch = -(-dataset.num_rows("train") // (cfg.train.batch_size * world_size))
    total = min(max_steps or 1 << 62, per_epoch * cfg.train.epochs)
    bar = tqdm(total=total, initial=position["step"], desc="train", unit="step", disable=not progress or rank != 0)
    running: dict[str, float] = {}
    start, start_step = time.perf_counter(), position["step"]

    def checkpoint(name: str) -> None:
        average_norm_statistics(trainer.model)
        save_checkpoint(checkpoints / name, training_state(trainer), position)

    def validate() -> bool:
        """Validate, keep the best checkpoint; True when it is time to stop early."""
        metrics, _ = split_metrics(trainer, dataset, "valid")
        valid.append(metrics)
        logger.write("valid", position["step"], metrics)
        if metric not in metrics:
            raise ValueError(f"train.early_stop_metric = {metric!r} is not among the metrics {sorted(metrics)}")
        if better(metric, metrics[metric], position["best"]):
            position["best"], position["stale"] = metrics[metric], 0
            checkpoint("best")
        else:
            position["stale"] += 1
        if not cfg.train.checkpoint_every:
            checkpoint("last")
        if rank == 0:
            log.info(
                "step %d: valid %s = %.5f (best %.5f)", position["step"], metric, metrics[metric], position["best"]
            )
        return position["stale"] >= cfg.train.patience

    while position["epoch"] < cfg.train.epochs and not stopped:
        reading = {"shuffle": True, "seed": cfg.train.seed, "epoch": position["epoch"], "drop_last": world_size > 1}
        # every rank takes the same number of steps (the sharded tables' collectives must stay in step)
        steps = min(
            count_batches(dataset, "train", cfg.train.batch_size, rank=r, world_size=world_size, **reading)
            for r in range(world_size)
        )
        batches = read_batches(
            dataset,
            "train",
            cfg.train.batch_size,
            rank=rank,
            world_size=world_size,
            start_batch=position["batch"],
            **reading,
        )
        for batch in itertools.islice(batches, max(steps - position["batch"], 0)):
            set_learning_rate(trainer, position["step"], per_epoch * cfg.train.epochs)  # not max_steps
            step_metrics = train_step(trainer, batch.to(device, non_blocking=True), position["step"])
            position["step"] += 1
            position["batch"] += 1
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in step_metrics.items()}
            bar.update(1)
            if position["step"] % cfg.train.log_every == 0:
                rows_per_s = (
                    (position["step"] - start_step) * cfg.train.batch_size * world_size / (time.perf_counter() - start)
                )
                losses.append(step_metrics["loss"])
                logger.write("train", position["step"], {**running, "samples_per_s": rows_per_s})
                bar.set_postfix(loss=f"{running['loss']:.4f}", samples_s=f"{rows_per_s:,.0f}")
            if cfg.train.eval_every and position["step"] % cfg.train.eval_every == 0:
                stopped = validate()
            if cfg.train.checkpoint_every and position["step"] % cfg.train.checkpoint_every == 0:
                checkpoint("last")
            if stopped or (max_steps and position["step"] >= max_steps):
                break
        else:
            position["epoch"] += 1
            position["batch"] = 0
            if not cfg.train.eval_every:
                stopped = validate()
        if max_steps and position["step"] >= max_steps:
            break
    checkpoint("last")
    bar.close()
    logger.close()
    best = next((m for m in valid if m.get(metric) == position["best"]), {})
    return TrainResult(run_dir, position["step"], losses, valid, best, stopped)
