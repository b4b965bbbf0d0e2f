"""One training step: the Trainer (sharded model, optimizers, multi-task loss) and `train_step` (one scalar loss,
one backward), which can also measure the gradient conflict between the tasks. The loop around it (validation,
checkpoints, resume) is train.py."""

import dataclasses
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.config import Config
from recsys_mtl.data.batch import Batch
from recsys_mtl.data.loader import Dataset
from recsys_mtl.distributed import ShardedRanker, shard_model, world
from recsys_mtl.hardware import keep_freed_memory
from recsys_mtl.model.embeddings import TEXT_TABLE_PREFIX, write_table
from recsys_mtl.model.experts import raw_gradients
from recsys_mtl.model.losses import MultiTaskLoss, active_tasks
from recsys_mtl.model.ranker import RankerOutput, autocast
from recsys_mtl.run import build_ranker
from recsys_mtl.tasks import TaskSpec, predict, task_specs


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
    def model(self) -> DistributedModelParallel:
        return self.sharded.model


def build_trainer(cfg: Config, dataset: Dataset, device: torch.device) -> Trainer:
    """Model (with text vectors loaded into its frozen tables), sharding, optimizers and loss for `cfg`.

    Raises:
        ValueError / FileNotFoundError: a task without a label, text features not encoded, a bad config.
    """
    schema = dataset.schema
    specs = task_specs(cfg, schema)
    torch.manual_seed(cfg.train.seed)
    # fp32 on CPU: values below 1e-38 (which training produces) take a slow path that made a run's steps 2x slower as
    # it went on (benchmarks/results/step_bf16.md); flushed to zero, they cost nothing and change no loss measurably
    torch.set_flush_denormal(True)
    keep_freed_memory()
    model, vectors = build_ranker(cfg, dataset.folder, schema)
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
    with autocast(trainer.cfg, trainer.device):
        return trainer.model(batch)


def drop_ids(
    kjt: KeyedJaggedTensor, features: tuple[str, ...], rate: float, generator: torch.Generator
) -> KeyedJaggedTensor:
    """Replace each id of `features` by the unknown id 0 with probability `rate`, so that row 0 learns to stand for
    items never seen in training (their text and side features then carry the ranking)."""
    keys = kjt.keys()
    chosen = torch.tensor([key in features for key in keys])  # [F]
    per_value = torch.repeat_interleave(chosen, torch.tensor(kjt.length_per_key()))  # [sum of lengths]
    dropped = per_value & (torch.rand(per_value.shape, generator=generator) < rate)
    values = torch.where(dropped.to(kjt.values().device), torch.zeros_like(kjt.values()), kjt.values())
    return KeyedJaggedTensor(keys=keys, values=values, lengths=kjt.lengths(), stride=kjt.stride())


CONFLICT_PREFIX = "conflict/"  # train_step's keys of the gradient conflict: "conflict/<a>~<b>", "conflict/mean"


def train_step(trainer: Trainer, batch: Batch, step: int, measure_conflict: bool = False) -> dict[str, float]:
    """One optimisation step on `batch` (already on the device).

    With `measure_conflict`, the gradient conflict between the tasks is measured on this step's graph before the
    backward (see `task_conflicts`); the step itself is the same, to the bit, with or without it.

    Returns:
        "loss" (the scalar that was minimised) and "<task>/loss" (mean over rows whose label counts); when measured,
        also "conflict/<a>~<b>" and "conflict/mean" (see `gradient_cosines`).
    """
    cfg = trainer.cfg
    # before the forward pass: DDP's gradient buckets are prepared there, and clearing grads after it loses the sync
    trainer.sharded.dense_optimizer.zero_grad()
    if trainer.loss_optimizer is not None:
        trainer.loss_optimizer.zero_grad()
    if cfg.train.id_dropout > 0:
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)  # the same on a resumed run
        sparse = drop_ids(batch.sparse, cfg.train.id_dropout_features, cfg.train.id_dropout, generator)
        batch = dataclasses.replace(batch, sparse=sparse)
    output = forward(trainer, batch)
    active = active_tasks(step, len(trainer.specs), cfg.train.schedule).to(trainer.device)
    total, task_means = trainer.loss(output.logits, batch.labels, batch.masks, active)
    if cfg.loss.tower_l2 > 0:
        total = total + cfg.loss.tower_l2 * sum(w.float().pow(2).sum() for w in trainer.sharded.module.tower_weights())
    conflicts: dict[str, float] = {}
    if cfg.loss.weighting == "gradnorm" or measure_conflict:
        grads = _task_gradients(trainer, task_means)  # one set of gradients serves both
        if cfg.loss.weighting == "gradnorm":
            trainer.loss.gradnorm_step(_gradient_norms(grads), task_means.detach())
        if measure_conflict:
            conflicts = task_conflicts(grads, [s.name for s in trainer.specs])
    total.backward()  # also applies the fused row-wise Adagrad to the embedding rows of this batch
    trainer.sharded.dense_optimizer.step()
    if trainer.loss_optimizer is not None:
        trainer.loss_optimizer.step()
    return {
        "loss": total.item(),
        **{f"{s.name}/loss": v.item() for s, v in zip(trainer.specs, task_means, strict=True)},
        **conflicts,
    }


def _task_gradients(trainer: Trainer, task_means: Tensor) -> list[list[Tensor]]:
    """Each task's loss gradient on the last shared layer (`MultiTaskRanker.shared_parameters`), zeros where a task
    does not reach a parameter. Only those parameters are differentiated: no gradient reaches the embeddings, the
    fused optimizer does not run, and the graph is kept for the step's backward.

    Returns:
        T lists, one tensor per shared parameter, of that parameter's shape.
    """
    shared = trainer.sharded.module.shared_parameters()
    grads = []
    for mean in task_means:
        with raw_gradients(trainer.sharded.module):
            task_grads = torch.autograd.grad(mean, shared, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(shared, task_grads, strict=True)])
    return grads


def _gradient_norms(grads: list[list[Tensor]]) -> Tensor:
    """The norm of each task's gradient (GradNorm's G_t, unweighted). Returns [T]."""
    norms = []
    for task_grads in grads:
        squares = sum(((g.float() ** 2).sum() for g in task_grads), torch.zeros((), device=task_grads[0].device))
        norms.append(torch.sqrt(squares + 1e-12))
    return torch.stack(norms)


def task_conflicts(grads: list[list[Tensor]], names: list[str]) -> dict[str, float]:
    """The gradient conflict of a step: `gradient_cosines` of the tasks' gradients on the last shared layer.

    Under torchrun the gradients are first summed over the ranks (one all-reduce of [T, P] floats, P the size of the
    shared layer), so that every rank gets the cosines of the whole global batch's gradients, whose sum the update
    follows. Collective: every rank calls it on the same steps.

    Args:
        grads: T lists of tensors (see `_task_gradients`), in `names` order.
    """
    flat = torch.stack([torch.cat([g.float().flatten() for g in task_grads]) for task_grads in grads])  # [T, P]
    if world()[1] > 1:
        dist.all_reduce(flat)  # the sum: a cosine does not depend on the scale
    return gradient_cosines({name: [row] for name, row in zip(names, flat, strict=True)})


def gradient_cosines(grads: dict[str, list[Tensor]]) -> dict[str, float]:
    """The cosine between each pair of tasks' gradients, in [-1, 1]: 1 when they pull the shared parameters the same
    way, 0 independently, below 0 against each other (a conflict). A task whose gradient is zero (no labelled row in
    the batch, or no path to the parameters) has no direction: its pairs are left out.

    Args:
        grads: task -> its gradient, one tensor per parameter (the same shapes for every task).

    Returns:
        "conflict/<a>~<b>" for each pair (a before b in `grads` order) and "conflict/mean" over those pairs; {} when
        fewer than two tasks have a gradient.
    """
    vectors = {name: torch.cat([g.detach().double().flatten() for g in parts]) for name, parts in grads.items()}
    norms = {name: torch.linalg.vector_norm(v) for name, v in vectors.items()}
    names = [name for name in vectors if norms[name] > 0]
    if len(names) < 2:
        return {}
    unit = torch.stack([vectors[name] / norms[name] for name in names])  # [T', P], T' tasks with a gradient
    cosines = (unit @ unit.T).clamp(-1.0, 1.0).tolist()  # [T', T']
    pairs = itertools.combinations(range(len(names)), 2)
    conflicts = {f"{CONFLICT_PREFIX}{names[i]}~{names[j]}": cosines[i][j] for i, j in pairs}
    return {**conflicts, f"{CONFLICT_PREFIX}mean": sum(conflicts.values()) / len(conflicts)}


@torch.no_grad()
def predict_batch(trainer: Trainer, batch: Batch) -> dict[str, Tensor]:
    """Predictions in label units (see tasks.predict) for one batch; the model is put in eval mode."""
    trainer.model.eval()
    try:
        return predict(forward(trainer, batch).logits, trainer.specs)
    finally:
        trainer.model.train()


def init_optimizer_state(trainer: Trainer) -> None:
    """Create the dense and loss optimizers' state tensors (empty until a first step), for a checkpoint to be loaded
    or copied into."""
    for optimizer in (trainer.sharded.dense_optimizer, trainer.loss_optimizer):
        if optimizer is not None:
            optimizer.init_state()


def training_state(trainer: Trainer) -> dict[str, object]:
    """Every tensor a resumed run needs: model (sharded tables too), fused and dense optimizer state, loss, RNG."""
    fused = trainer.model.fused_optimizer.state_dict()
    # the frozen text tables have an empty state, which DCP saves on some world sizes and not on others
    fused["state"] = {name: value for name, value in fused["state"].items() if value}
    state: dict[str, object] = {
        "model": trainer.model.state_dict(),
        "fused_optimizer": fused,
        "dense_optimizer": trainer.sharded.dense_optimizer.state_dict(),
        "loss": trainer.loss.state_dict(),
        "rng": torch.get_rng_state(),
    }
    if trainer.loss_optimizer is not None:
        state["loss_optimizer"] = trainer.loss_optimizer.state_dict()
    return state
