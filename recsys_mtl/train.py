"""The training loop: validation, early stopping, metrics logs, checkpoints and resume.

metrics.jsonl holds one JSON object a line, {"kind", "step", metrics...}: "train" (running means of the step losses and
samples_per_s, every `train.log_every` steps), "valid" (every validation, with "weight/<task>": the loss weight each
task had then) and "health" (every `train.conflict_every` steps: the cosine of each pair of tasks' gradients on the
last shared layer, "conflict/<a>~<b>", and their mean, "conflict/mean"; see step.gradient_cosines). TensorBoard gets
the same numbers as "<kind>/<metric>".

A run dir holds one run (config.toml, checkpoints/, metrics.jsonl, tensorboard/) and one writer: `train` holds it
locked throughout. A plain train never starts over an existing run, and a resume continues the run only under the
same config (see RESUMABLE), from its last checkpoint, replacing whatever the killed process logged after it.
"""

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from recsys_mtl.checkpoint import (
    Progress,
    check_link,
    fingerprint,
    load_checkpoint,
    read_progress,
    save_checkpoint,
)
from recsys_mtl.config import Config, load_config
from recsys_mtl.data.batch import Batch
from recsys_mtl.data.loader import Dataset, ReadOrder, count_batches, read_batches
from recsys_mtl.distributed import average_norm_statistics, init_process_group, world
from recsys_mtl.errors import InputError, MissingInputError, OutputExistsError
from recsys_mtl.evaluate import Predictor, split_metrics
from recsys_mtl.files import atomic_write_text, locked
from recsys_mtl.hardware import bf16_choice
from recsys_mtl.metrics import format_metric
from recsys_mtl.step import (
    CONFLICT_PREFIX,
    Trainer,
    build_trainer,
    init_optimizer_state,
    train_step,
    training_state,
)
from recsys_mtl.structs import list_differences
from recsys_mtl.tasks import TaskSpec, better, headline_metric
from recsys_mtl.warm_start import parent_checkpoint, warm_start

log = logging.getLogger(__name__)
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
WEIGHT_PREFIX = "weight/"  # validation metrics "weight/<task>": the task's loss weight at that step
RUN_FILES = (CONFIG_FILE, "checkpoints", METRICS_FILE)  # any of them: the dir holds a run
# what a resume may change: how long to train, how often to log, validate and checkpoint, the patience, where the
# run dir is and how tables are placed; how often the gradient conflict is measured (the steps stay the same, to the
# bit). Anything else (dataset, tasks, model, text, loss, optim, batch size, seed, schedule, ...) changes what the
# steps compute, and the data position (in batches) would skip or repeat rows.
# `train.epochs` may grow a finished run; the linear learning-rate decay then follows the new length.
RESUMABLE = (
    "run_dir",
    "sharding",
    "uvm_caching",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.conflict_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.patience",
)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]  # the training loss at every log line
    valid: list[dict[str, float]]  # validation metrics at every validation
    best: dict[str, float]
    stopped_early: bool
    setup_s: float = 0.0  # seconds from the call to the first step: dataset, model, sharding plan, checkpoint loads


def main_metric(cfg: Config, specs: tuple[TaskSpec, ...]) -> str:
    """The early-stopping metric: `train.early_stop_metric`, else the first task's headline metric."""
    return cfg.train.early_stop_metric or headline_metric(specs[0])


def set_learning_rate(trainer: Trainer, step: int, per_epoch: int) -> None:
    """The dense learning rate of `step` (a function of the step alone, so a resumed run follows the same curve):
    `optim.decay` "epoch": linearly to 5% of `optim.lr` within every epoch of `per_epoch` steps, restarting at `lr`
    (so an early-stopped run's first epoch is a one-epoch run's); "linear": to 5% over all `train.epochs`."""
    optim = trainer.cfg.optim
    if optim.decay == "none":
        scale = 1.0
    else:
        period = max(per_epoch * (trainer.cfg.train.epochs if optim.decay == "linear" else 1), 1)
        scale = 1.0 - 0.95 * min((step % period if optim.decay == "epoch" else step) / period, 1.0)
    for group in trainer.sharded.dense_optimizer.param_groups:
        group["lr"] = optim.lr * scale


class MetricsLog:
    """Metrics as JSON lines (metrics.jsonl) and TensorBoard scalars (tensorboard/), written by rank 0 only.

    Resumed at checkpoint step `resumed_at`, it first drops what the killed run logged after that step (JSON lines
    and, through `purge_step`, TensorBoard events), so that a restart never appends to a future that did not happen.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_at: int | None = None) -> None:
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            file = run_dir / METRICS_FILE
            if resumed_at is not None and file.exists():
                lines = file.read_text().splitlines(keepends=True)
                atomic_write_text(file, "".join(line for line in lines if _logged_step(line) <= resumed_at))
            self.file = file.open("a")
            purge_step = None if resumed_at is None else resumed_at + 1  # the events of the checkpoint's step stay
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)

    def write(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        self.file.flush()
        for name, value in metrics.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)
        self.writer.flush()  # what is logged is on disk, like the JSON lines, when a kill comes

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.writer.close()


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line a kill cut short
        return math.inf


@dataclass
class _Run:
    """A run in progress: what the loop's steps read and update."""

    cfg: Config
    trainer: Trainer
    dataset: Dataset
    progress: Progress
    checkpoints: Path
    metrics: MetricsLog
    bar: tqdm
    metric: str  # the early-stopping metric
    per_epoch: int  # steps per epoch (of the learning-rate schedule)
    conflict_every: int  # steps between gradient-conflict measures; 0: never
    on_validation: Callable[[int, dict[str, float]], None] | None = None  # (step, metrics) after each validation
    losses: list[float] = field(default_factory=list)
    valid: list[dict[str, float]] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    saved_at: float = field(default_factory=time.monotonic)  # when `last` was last saved (or the run started)
    start_step: int = 0
    saved_step: int = -1  # the step of the last `last` saved or loaded


def train(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    resume: bool = False,
    progress: bool = True,
    on_validation: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `cfg` into `run_dir`: validation and early stopping, JSONL / TensorBoard metrics, checkpoints.

    With `resume`, continues from `run_dir/checkpoints/last` (model, optimizers, RNG, data position) and reaches the
    same state as a run that was never interrupted. `run_dir` is locked for the whole call (by rank 0).
    `on_validation(step, metrics)` is called after every validation (logged, best checkpoint saved); an exception it
    raises ends the run there (hyperparameter search prunes a trial so, see tune.py).

    Raises:
        OutputExistsError: `run_dir` is locked by another process, or holds a run and `resume` is false.
        MissingInputError: a missing dataset, or nothing to resume.
        InputError: a resume whose config differs from the run's (listing every difference), a checkpoint made for
            another model or data, or refused as unsafe or corrupt; a non-finite training loss.
    """
    run_dir = Path(run_dir)
    init_process_group(device)  # the rank decides who locks and checks the run dir
    rank = world()[0]
    with locked(run_dir) if rank == 0 else nullcontext():
        if rank == 0:
            _check_run_dir(run_dir, cfg, resume)
        return _train(cfg, run_dir, device, resume, progress, on_validation)


def _check_run_dir(run_dir: Path, cfg: Config, resume: bool) -> None:
    """Refuse a plain train into a run, and a resume of another config or of nothing."""
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not resume:
        if held:
            raise OutputExistsError(
                f"{run_dir} already holds a run ({', '.join(held)}); pass --resume to continue it, or choose another "
                "--out"
            )
        return
    if not (run_dir / CONFIG_FILE).is_file():
        raise MissingInputError(f"{run_dir}: no run to resume ({CONFIG_FILE} missing)")
    for name in ("best", "last"):
        check_link(run_dir / "checkpoints" / name)
    saved = load_config(run_dir / CONFIG_FILE)
    differences = list_differences(_meaning(saved), _meaning(cfg), ("run", "now"))
    if differences:
        raise InputError(
            f"--resume: the config differs from the run's {run_dir / CONFIG_FILE}: {'; '.join(differences)}. Resume "
            f"with the run's values, or train into another --out (a resume may change only {', '.join(RESUMABLE)})"
        )


def _meaning(cfg: Config) -> dict:
    """The config as a tree, without the keys a resume may change."""
    tree = dataclasses.asdict(cfg)
    for key in RESUMABLE:
        *parents, leaf = key.split(".")
        table = tree
        for part in parents:
            table = table[part]
        del table[leaf]
    return tree


def _train(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    resume: bool,
    progress: bool,
    on_validation: Callable[[int, dict[str, float]], None] | None,
) -> TrainResult:
    entered = time.monotonic()
    dataset = Dataset(cfg.dataset)
    trainer = build_trainer(cfg, dataset, device)
    rank, world_size = world()
    checkpoints = run_dir / "checkpoints"
    position = Progress(fingerprint(cfg, dataset.schema))
    if resume:
        position = _resume(trainer, (checkpoints / "last").resolve(), position.fingerprint)
    elif cfg.train.init_from:
        warm_start(trainer, parent_checkpoint(Path(cfg.train.init_from), cfg, dataset.schema))
    position.world_size = world_size
    if rank == 0:
        cfg.save(run_dir / CONFIG_FILE)
        plan = str(trainer.sharded.plan)
        atomic_write_text(run_dir / "sharding_plan.txt", plan + "\n")
        log.info("sharding plan over %d rank(s):\n%s", world_size, plan)
        log.info("%s", bf16_choice(cfg.train.bf16, device))
    per_epoch = -(-dataset.num_rows("train") // (cfg.train.batch_size * world_size))
    total = min(cfg.train.max_steps or 1 << 62, per_epoch * cfg.train.epochs)
    run = _Run(
        cfg=cfg,
        trainer=trainer,
        dataset=dataset,
        progress=position,
        checkpoints=checkpoints,
        metrics=MetricsLog(run_dir, enabled=rank == 0, resumed_at=position.step if resume else None),
        bar=tqdm(total=total, initial=position.step, desc="train", unit="step", disable=not progress or rank != 0),
        metric=main_metric(cfg, trainer.specs),
        per_epoch=per_epoch,
        conflict_every=_conflict_every(trainer),
        on_validation=on_validation,
        start_step=position.step,
        saved_step=position.step if resume else -1,
    )
    try:
        stopped = _fit(run)
        if run.saved_step != position.step:
            _save(run, "last")
    finally:
        run.bar.close()
        run.metrics.close()
    best = next((m for m in run.valid if m.get(run.metric) == position.best), {})
    return TrainResult(run_dir, position.step, run.losses, run.valid, best, stopped, run.started_at - entered)


def _conflict_every(trainer: Trainer) -> int:
    """`train.conflict_every`, or 0 (said once) when the shared layer the conflict is measured on is frozen."""
    every = trainer.cfg.train.conflict_every
    if every and not any(p.requires_grad for p in trainer.sharded.module.shared_parameters()):
        log.warning("train.conflict_every = %d: no gradient conflict is measured, the shared layer is frozen", every)
        return 0
    return every


def conflict_due(every: int, step: int) -> bool:
    """Whether step number `step` (counted from 1) measures the gradient conflict, with `every` steps between."""
    return every > 0 and step % every == 0


def _resume(trainer: Trainer, last: Path, expected: dict) -> Progress:
    """Load checkpoint `last` into `trainer` (and the RNG); its progress, the batch rescaled to this world size."""
    position = read_progress(last, expected)
    world_size = world()[1]
    if position.world_size != world_size:  # the same samples into the epoch; the ranks' parts of it differ, though
        position.batch = position.batch * position.world_size // world_size
        log.warning(
            "resuming a %d-rank run on %d ranks: the epoch continues after the same number of samples, not the "
            "same rows; the learning-rate schedule follows the new steps per epoch",
            position.world_size,
            world_size,
        )
    init_optimizer_state(trainer)
    state = training_state(trainer)
    load_checkpoint(last, state)
    torch.set_rng_state(cast(Tensor, state["rng"]))
    log.info("resumed %s at step %d (epoch %d, batch %d)", last, position.step, position.epoch, position.batch)
    return position


def _fit(run: _Run) -> bool:
    """Train until the epochs or `train.max_steps` are done, or early stopping; True when it stopped early."""
    cfg, position = run.cfg.train, run.progress
    rank, world_size = world()
    while position.epoch < cfg.epochs:
        order = ReadOrder(rank, world_size, shuffle=True, seed=cfg.seed, epoch=position.epoch, drop_last=world_size > 1)
        # every rank takes the same number of steps (the sharded tables' collectives must stay in step)
        steps = min(
            count_batches(run.dataset, "train", cfg.batch_size, dataclasses.replace(order, rank=r))
            for r in range(world_size)
        )
        batches = read_batches(run.dataset, "train", cfg.batch_size, order, start_batch=position.batch)
        epoch = position.epoch
        for batch in itertools.islice(batches, max(steps - position.batch, 0)):
            _step(run, batch)
            if position.batch == steps:  # the epoch is done before anything of this step is validated or saved
                position.epoch, position.batch = epoch + 1, 0
            if _after_step(run, epoch_done=position.epoch > epoch):
                return True
            if cfg.max_steps and position.step >= cfg.max_steps:
                return False
        if position.epoch == epoch:  # no batch was left (an older checkpoint saved at the epoch's very end)
            position.epoch, position.batch = epoch + 1, 0
    return False


def _step(run: _Run, batch: Batch) -> None:
    """One training step: the update, its loss checked, the log lines."""
    position, cfg = run.progress, run.cfg.train
    set_learning_rate(run.trainer, position.step, run.per_epoch)
    measure = conflict_due(run.conflict_every, position.step + 1)
    step_metrics = train_step(run.trainer, batch.to(run.trainer.device), position.step, measure_conflict=measure)
    health = {k: step_metrics.pop(k) for k in [k for k in step_metrics if k.startswith(CONFLICT_PREFIX)]}
    position.step += 1
    position.batch += 1
    check_finite(step_metrics, position.step)
    position.running = {k: 0.9 * position.running.get(k, v) + 0.1 * v for k, v in step_metrics.items()}
    run.bar.update(1)
    if position.step % cfg.log_every == 0:
        rows = (position.step - run.start_step) * cfg.batch_size * world()[1]
        rows_per_s = rows / (time.monotonic() - run.started_at)
        run.losses.append(step_metrics["loss"])
        run.metrics.write("train", position.step, {**position.running, "samples_per_s": rows_per_s})
        run.bar.set_postfix(loss=f"{position.running['loss']:.4f}", samples_s=f"{rows_per_s:,.0f}")
    if health:  # this step's batch alone, not a running mean: a smoothed conflict would hide a flip of sign
        run.metrics.write("health", position.step, health)


def check_finite(step_metrics: dict[str, float], step: int) -> None:
    """Stop at the first non-finite loss, before anything of that state is validated or saved.

    Raises:
        InputError: naming the step and the task(s) whose mean loss is nan or inf (else the total).
    """
    bad = [
        f"loss of task {name.removesuffix('/loss')!r} is {value}"
        for name, value in step_metrics.items()
        if name != "loss" and not math.isfinite(value)
    ]
    if not bad and not math.isfinite(step_metrics["loss"]):
        bad = [f"the total loss is {step_metrics['loss']}"]
    if bad:
        raise InputError(f"step {step}: {', '.join(bad)}; check optim.lr, the task weights and the data")


def _after_step(run: _Run, epoch_done: bool) -> bool:
    """Validate and checkpoint as the config says; True when it is time to stop early."""
    cfg, step = run.cfg.train, run.progress.step
    validate = step % cfg.eval_every == 0 if cfg.eval_every else epoch_done
    stop = _validate(run) if validate else False
    timed = _checkpoint_time(run)  # on every rank and step: a collective under torchrun
    stepped = step % cfg.checkpoint_every == 0 if cfg.checkpoint_every else validate
    if timed or stepped:
        _save(run, "last")
    return stop


def _checkpoint_time(run: _Run) -> bool:
    """Whether `train.checkpoint_minutes` have passed since `last` was saved, by rank 0's clock (so that every rank
    takes the same decision)."""
    minutes = run.cfg.train.checkpoint_minutes
    if not minutes:
        return False
    due = time.monotonic() - run.saved_at >= 60 * minutes
    if world()[1] > 1:
        flag = torch.tensor([int(due)], device=run.trainer.device)
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def _validate(run: _Run) -> bool:
    """Validate and keep the best checkpoint (never for a NaN metric); True when it is time to stop early.

    Raises:
        InputError: `train.early_stop_metric` is not among the validation metrics.
    """
    position = run.progress
    trainer = run.trainer
    predictor = Predictor(trainer.model, trainer.specs, trainer.cfg, trainer.device)
    metrics, _ = split_metrics(predictor, run.dataset, "valid")
    weights = trainer.loss.weights().tolist()  # the task weights in use (they move under uncertainty and gradnorm)
    metrics |= {f"{WEIGHT_PREFIX}{s.name}": w for s, w in zip(trainer.specs, weights, strict=True)}
    run.valid.append(metrics)
    run.metrics.write("valid", position.step, metrics)
    if run.metric not in metrics:
        raise InputError(f"train.early_stop_metric = {run.metric!r} is not among the metrics {sorted(metrics)}")
    value = metrics[run.metric]
    if better(run.metric, value, position.best):
        position.best, position.stale = value, 0
        _save(run, "best")
    else:
        position.stale += 1
    if world()[0] == 0:
        log.info(
            "step %d: valid %s = %s (best %s)",
            position.step,
            run.metric,
            format_metric(value, 5),
            format_metric(position.best, 5),
        )
    if run.on_validation is not None:
        run.on_validation(position.step, metrics)
    return position.stale >= run.cfg.train.patience


def _save(run: _Run, name: str) -> None:
    average_norm_statistics(run.trainer.model)
    save_checkpoint(run.checkpoints / name, training_state(run.trainer), run.progress)
    if name == "last":
        run.saved_at, run.saved_step = time.monotonic(), run.progress.step
