"""Training: the sharded model, its optimizers and the multi-task loss; a step is one scalar loss, one backward."""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.optim.keyed import KeyedOptimizerWrapper
from tqdm import tqdm

from recsys_mtl.checkpoint import fingerprint, load_checkpoint, read_progress, save_checkpoint
from recsys_mtl.config import Config
from recsys_mtl.data.batch import Batch
from recsys_mtl.data.loader import Dataset, read_batches
from recsys_mtl.distributed import ShardedRanker, shard_model
from recsys_mtl.evaluate import split_metrics
from recsys_mtl.metrics import better
from recsys_mtl.model.embeddings import TEXT_TABLE_PREFIX, write_table
from recsys_mtl.model.losses import MultiTaskLoss, TaskSpec, active_tasks, predict, task_specs
from recsys_mtl.model.ranker import MultiTaskRanker, RankerOutput
from recsys_mtl.text import load_text_vectors, read_texts

log = logging.getLogger(__name__)


@dataclass
class Trainer:
    """Everything a training step touches."""

    cfg: Config
    specs: tuple[TaskSpec, ...]
    sharded: ShardedRanker
    loss: MultiTaskLoss
    loss_optimizer: KeyedOptimizerWrapper | None
    device: torch.device

    @property
    def model(self) -> torch.nn.Module:
        return self.sharded.model


def build_trainer(cfg: Config, dataset: Dataset, device: torch.device) -> Trainer:
    """Model (with text vectors loaded into its frozen tables), sharding, optimizers and loss for `cfg`.

    Raises:
        ValueError / FileNotFoundError: a task without a label, text features not encoded, a bad config.
    """
    schema = dataset.schema
    specs = task_specs(cfg, schema)
    torch.manual_seed(cfg.train.seed)
    use_text = cfg.model.text_dim > 0 and bool(schema.texts)
    finetune = use_text and cfg.text.finetune_layers > 0
    vectors = load_text_vectors(dataset.folder, schema, cfg.text) if use_text and not finetune else {}
    texts = read_texts(dataset.folder, schema) if finetune else None
    text_dims = {name: v.shape[1] for name, v in vectors.items()}
    model = MultiTaskRanker(cfg, schema, text_dims, texts)
    sharded = shard_model(model, cfg, device)
    for name, table in vectors.items():
        write_table(sharded.model, TEXT_TABLE_PREFIX + name, table.to(device))
    loss = MultiTaskLoss(cfg, specs).to(device)
    loss_optimizer = None
    if cfg.loss.weighting == "uncertainty":
        params = dict(loss.named_parameters())
        loss_optimizer = KeyedOptimizerWrapper(params, lambda p: torch.optim.Adam(p, lr=cfg.optim.lr))
    return Trainer(cfg, specs, sharded, loss, loss_optimizer, device)


def forward(trainer: Trainer, batch: Batch) -> RankerOutput:
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.cfg.train.bf16):
        return trainer.model(batch)


def train_step(trainer: Trainer, batch: Batch, step: int) -> dict[str, float]:
    """One optimisation step on `batch` (already on the device).

    Returns:
        "loss" (the scalar that was minimised) and "<task>/loss" (mean over rows whose label counts).
    """
    cfg = trainer.cfg
    output = forward(trainer, batch)
    active = active_tasks(step, len(trainer.specs), cfg.train.schedule).to(trainer.device)
    total, task_means = trainer.loss(output.logits, batch.labels, batch.masks, active)
    if cfg.loss.tower_l2 > 0:
        total = total + cfg.loss.tower_l2 * sum(w.float().pow(2).sum() for w in trainer.sharded.module.tower_weights())
    if cfg.loss.weighting == "gradnorm":
        trainer.loss.gradnorm_step(_task_grad_norms(trainer, task_means), task_means.detach())
    trainer.sharded.dense_optimizer.zero_grad()
    if trainer.loss_optimizer is not None:
        trainer.loss_optimizer.zero_grad()
    total.backward()  # also applies the fused row-wise Adagrad to the embedding rows of this batch
    trainer.sharded.dense_optimizer.step()
    if trainer.loss_optimizer is not None:
        trainer.loss_optimizer.step()
    return {
        "loss": total.item(),
        **{f"{s.name}/loss": v.item() for s, v in zip(trainer.specs, task_means, strict=True)},
    }


def _task_grad_norms(trainer: Trainer, task_means: Tensor) -> Tensor:
    """Norm of each task's loss gradient on the last shared layer (no gradient reaches the embeddings). [T]."""
    shared = trainer.sharded.module.shared_parameters()
    norms = []
    for mean in task_means:
        grads = torch.autograd.grad(mean, shared, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 1e-12))
    return torch.stack(norms)


@torch.no_grad()
def predict_batch(trainer: Trainer, batch: Batch) -> dict[str, Tensor]:
    """Predictions in label units (see losses.predict) for one batch; the model is put in eval mode."""
    trainer.model.eval()
    try:
        return predict(forward(trainer, batch).logits, trainer.specs)
    finally:
        trainer.model.train()


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
    return (
        {"binary": f"{spec.name}/auc", "regression": f"{spec.name}/rmse", "count": f"{spec.name}/poisson_deviance"}[
            spec.kind
        ]
        if spec.after is None
        else f"{spec.name}/ctcvr_auc"
    )


def training_state(trainer: Trainer) -> dict[str, object]:
    """Every tensor a resumed run needs: model (sharded tables too), fused and dense optimizer state, loss, RNG."""
    state: dict[str, object] = {
        "model": trainer.model.state_dict(),
        "fused_optimizer": trainer.model.fused_optimizer.state_dict(),
        "dense_optimizer": trainer.sharded.dense_optimizer.state_dict(),
        "loss": trainer.loss.state_dict(),
        "rng": torch.get_rng_state(),
    }
    if trainer.loss_optimizer is not None:
        state["loss_optimizer"] = trainer.loss_optimizer.state_dict()
    return state


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
    rank, world_size = dist.get_rank(), dist.get_world_size()
    expected = fingerprint(cfg, dataset.schema)
    checkpoints = run_dir / "checkpoints"
    position = {"step": 0, "epoch": 0, "batch": 0, "best": None, "stale": 0, "fingerprint": expected}
    if resume:
        position = read_progress(checkpoints / "last", expected)
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
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.toml")
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
        log.info("step %d: valid %s = %.5f (best %.5f)", position["step"], metric, metrics[metric], position["best"])
        return position["stale"] >= cfg.train.patience

    while position["epoch"] < cfg.train.epochs and not stopped:
        batches = read_batches(
            dataset,
            "train",
            cfg.train.batch_size,
            rank=rank,
            world_size=world_size,
            shuffle=True,
            seed=cfg.train.seed,
            epoch=position["epoch"],
            drop_last=world_size > 1,
            start_batch=position["batch"],
        )
        for batch in batches:
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
