"""The tasks: each configured task joined with its label, and everything its kind decides.

A task's kind (`TaskSpec.task_kind`) is its label's kind, binary, regression or count, or "after" for a binary task
that follows another one (cvr after ctr). `TASK_KINDS` holds, per kind, how a logit becomes a prediction in label
units (binary -> sigmoid, a probability; regression -> min + (max - min) * sigmoid, bounded to the label's range;
count -> exp, an expected count), the loss it takes, its metrics and its headline metric. A task after another also
has the joint probability p(after) * p(task) (pCTCVR = pCTR * pCVR) and is judged alone on the rows where the task it
follows is 1. A new kind is one more row here, with its loss in model/losses.py and any new metric in metrics.py.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from recsys_mtl.config import Config
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError

JOINT_SUFFIX = "_joint"  # predictions[cvr + JOINT_SUFFIX] is pCTCVR; in a predictions parquet, pred_cvr_joint
# the metrics that improve upwards (the AUCs); every other one (losses, errors, deviances) improves downwards
HIGHER_IS_BETTER = frozenset({"auc", "gauc", "auc_clicked", "ctcvr_auc", "auc_cold"})


@dataclass(frozen=True)
class TaskSpec:
    """A configured task joined with its label in the schema."""

    name: str
    kind: str  # the label's: binary | regression | count
    loss: str  # bce | mse | huber | poisson
    weight: float
    after: str | None = None
    esmm: bool = True
    min: float = 0.0
    max: float = 1.0

    @property
    def task_kind(self) -> str:
        """The key of this task in TASK_KINDS: "after" for a task after another, else the label's kind."""
        return "after" if self.after is not None else self.kind


@dataclass(frozen=True)
class TaskKind:
    """What a kind of task means.

    transform: logit [B] float32 -> prediction in label units [B].
    loss: the loss the kind always takes; None: the task's `loss` setting ("auto" meaning mse).
    metrics: what metrics.task_metrics reports for it, in that order; the first is the headline metric (the default
        early-stopping metric, and the report's validation curve).
    """

    transform: Callable[[Tensor, TaskSpec], Tensor]
    loss: str | None
    metrics: tuple[str, ...]

    @property
    def headline(self) -> str:
        return self.metrics[0]


def _probability(logit: Tensor, spec: TaskSpec) -> Tensor:
    return torch.sigmoid(logit)


def _bounded(logit: Tensor, spec: TaskSpec) -> Tensor:
    return spec.min + (spec.max - spec.min) * torch.sigmoid(logit)


def _expected_count(logit: Tensor, spec: TaskSpec) -> Tensor:
    return torch.exp(logit)  # log link


TASK_KINDS: dict[str, TaskKind] = {
    "binary": TaskKind(_probability, "bce", ("auc", "gauc", "logloss", "calibration")),
    "after": TaskKind(_probability, "bce", ("auc_clicked", "ctcvr_auc", "ctcvr_logloss")),
    "regression": TaskKind(_bounded, None, ("rmse", "mae")),
    "count": TaskKind(_expected_count, "poisson", ("poisson_deviance", "rmse", "rmse_log1p")),
}


def task_specs(cfg: Config, schema: Schema) -> tuple[TaskSpec, ...]:
    """The tasks of `cfg`, in order, with kinds and bounds from `schema`.

    Raises:
        InputError: a task has no label in the dataset; `after` names a non-binary label or is set on a non-binary task.
    """
    labels = {label.task: label for label in schema.labels}
    specs = []
    for task in cfg.tasks:
        if task.name not in labels:
            raise InputError(f"task {task.name!r} has no label in dataset {schema.name!r} (tasks: {sorted(labels)})")
        label = labels[task.name]
        if task.after is not None and (task.after not in labels or labels[task.after].kind != "binary"):
            raise InputError(f"task {task.name!r}: after = {task.after!r} must name a binary label of the dataset")
        if task.after is not None and label.kind != "binary":
            raise InputError(f"task {task.name!r}: after = {task.after!r} needs a binary task")
        kind = TASK_KINDS["after" if task.after is not None else label.kind]
        specs.append(
            TaskSpec(
                name=task.name,
                kind=label.kind,
                loss=kind.loss or ("mse" if task.loss == "auto" else task.loss),
                weight=task.weight,
                after=task.after,
                esmm=task.esmm,
                min=label.min if label.min is not None else 0.0,
                max=label.max if label.max is not None else 1.0,
            )
        )
    return tuple(specs)


def to_label_units(spec: TaskSpec, logit: Tensor) -> Tensor:
    """The prediction a task's logit stands for: a probability, a bounded rating or an expected count.

    Args:
        logit: [B].

    Returns:
        [B] float32.
    """
    return TASK_KINDS[spec.task_kind].transform(logit.float(), spec)


def add_joint(values: dict[str, Tensor], specs: tuple[TaskSpec, ...]) -> dict[str, Tensor]:
    """`values` and, for each task after another one that `values` holds, its joint probability under
    `<task>_joint`: p(after) * p(task), e.g. pCTCVR = pCTR * pCVR.

    Args:
        values: task -> [N] probabilities (predictions or an oracle's).
    """
    joint = {spec.name + JOINT_SUFFIX: values[spec.after] * values[spec.name] for spec in specs if spec.after in values}
    return values | joint


def predict(logits: dict[str, Tensor], specs: tuple[TaskSpec, ...]) -> dict[str, Tensor]:
    """Predictions in label units (see `to_label_units`); for a task after another, both its own conditional
    probability (key `name`) and the joint one (key `name + "_joint"`, e.g. pCTCVR).

    Args:
        logits: task -> [B].

    Returns:
        task -> [B] float32.
    """
    return add_joint({spec.name: to_label_units(spec, logits[spec.name]) for spec in specs}, specs)


def after_rows(spec: TaskSpec, labels: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
    """The rows where a task after another one is judged alone: its label is present and the label of the task it
    follows is present and 1 (the clicked rows, for cvr after ctr).

    Args:
        labels, masks: task -> [N]; a false mask is an absent label.

    Returns:
        [N] bool.

    Raises:
        ValueError: the task follows no other task.
    """
    if spec.after is None:
        raise ValueError(f"task {spec.name!r} has after = None, expected the name of the task it follows")
    return masks[spec.name] & masks[spec.after] & (labels[spec.after] == 1)


def headline_metric(spec: TaskSpec) -> str:
    """`<task>/<metric>`: the metric a task is judged by (binary: auc; after another: auc_clicked; regression: rmse;
    count: poisson_deviance)."""
    return f"{spec.name}/{TASK_KINDS[spec.task_kind].headline}"


def is_headline(metric: str) -> bool:
    """Whether `metric` is a `<task>/<metric>` name (not oracle/..., ratio/...) of some kind's headline metric."""
    parts = metric.split("/")
    return len(parts) == 2 and parts[1] in {kind.headline for kind in TASK_KINDS.values()}


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` improves on `best` for `metric` (AUCs up, losses and errors down); NaN never improves."""
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if metric.split("/")[-1] in HIGHER_IS_BETTER else value < best
