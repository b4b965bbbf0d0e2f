"""Exact metrics per task, keyed `<task>/<metric>`; which ones a task has is its kind's (tasks.TASK_KINDS).

binary: auc, gauc (by user, impression-weighted over users with both classes), logloss, calibration (mean prediction /
mean label). A task `after` another (cvr): auc_clicked (pCVR on rows where the other task's label is 1) and
ctcvr_auc, ctcvr_logloss (pCTR * pCVR on every row). regression: rmse, mae. count: poisson_deviance, rmse (of the
counts against the predicted means), rmse_log1p (of log1p(count) against its expectation under the predicted Poisson).

A metric that is undefined on the data (an AUC whose labels are all 0 or all 1, any metric without labelled rows) is
NaN, never an exception; `format_metric` shows it as "—". Which way each one improves: tasks.better.

Mixture health (a model with more than one expert), keyed `mixture/...`: see `MixtureHealth`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_mtl.tasks import JOINT_SUFFIX, TASK_KINDS, TaskSpec, after_rows


def auc(labels: Tensor, scores: Tensor) -> float:
    """Exact ROC AUC, ties counted as one half (the rank statistic). labels, scores: [N]. NaN without both classes."""
    labels = labels.double().flatten()
    scores = scores.double().flatten()
    num_pos = labels.sum()
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    mean_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2  # average rank of each tie group
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels == 1].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def gauc(labels: Tensor, scores: Tensor, groups: np.ndarray) -> float:
    """Group AUC: the AUC within each group (user), averaged with weights = the group's rows; groups with one class
    only are left out. labels, scores, groups: [N]."""
    df = pl.DataFrame({"g": groups, "y": labels.double().numpy(), "s": scores.double().numpy()})
    per_group = (
        df.with_columns(pl.col("s").rank("average").over("g").alias("r"))
        .group_by("g")
        .agg(
            pl.len().alias("n"),
            pl.col("y").sum().alias("pos"),
            (pl.col("r") * pl.col("y")).sum().alias("rank_sum"),
        )
        .filter((pl.col("pos") > 0) & (pl.col("pos") < pl.col("n")))
        .sort("g")  # a fixed order: the weighted sum is then the same to the last bit on every run
        .with_columns(
            (
                (pl.col("rank_sum") - pl.col("pos") * (pl.col("pos") + 1) / 2)
                / (pl.col("pos") * (pl.col("n") - pl.col("pos")))
            ).alias("auc")
        )
    )
    if per_group.height == 0:
        return float("nan")
    return float((per_group["auc"] * per_group["n"]).sum()) / float(per_group["n"].sum())


def logloss(labels: Tensor, probs: Tensor) -> float:
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def poisson_deviance(counts: Tensor, rates: Tensor) -> float:
    """Mean Poisson deviance 2 * (y log(y / mu) - (y - mu)), with y log y = 0 at y = 0."""
    y, mu = counts.double(), rates.double().clamp(min=1e-12)
    term = torch.where(y > 0, y * torch.log(y / mu), torch.zeros_like(y))
    return float((2 * (term - (y - mu))).mean())


@dataclass(frozen=True)
class _Evaluation:
    """One evaluation set. predictions: as from tasks.predict; labels, masks: task -> [N]; users: [N] or None."""

    predictions: dict[str, Tensor]
    labels: dict[str, Tensor]
    masks: dict[str, Tensor]
    users: np.ndarray | None

    def labelled(self, spec: TaskSpec, prediction: str | None = None) -> tuple[Tensor, Tensor]:
        """(labels, predictions) on the task's labelled rows, each [n]; `prediction` names other predictions."""
        mask = self.masks[spec.name]
        return self.labels[spec.name][mask], self.predictions[prediction or spec.name][mask]


def calibration(labels: Tensor, probs: Tensor) -> float:
    """Mean prediction / mean label; NaN without a positive label."""
    return float(probs.double().mean() / labels.double().mean()) if labels.sum() > 0 else math.nan


def rmse(labels: Tensor, predictions: Tensor) -> float:
    return float((predictions.double() - labels.double()).pow(2).mean().sqrt())


def mae(labels: Tensor, predictions: Tensor) -> float:
    return float((predictions.double() - labels.double()).abs().mean())


def expected_log1p(rates: Tensor, chunk: int = 65_536) -> Tensor:
    """E[log(1 + Y)] for Y ~ Poisson(rate), each rate: the estimate of log1p(count) with the least squared error under
    the model (log1p(rate) overestimates it: log is concave). Summed over k < 256 below a rate of 100, else the
    second-order approximation log1p(mu) - mu / (2 (1 + mu)^2). The sum stops where no rate has mass left (beyond the
    largest rate + 12 standard deviations + 30)."""
    mu = rates.double().clamp(min=1e-12)
    top = float(mu.clamp(max=100).nan_to_num(100).max()) if len(mu) else 0.0  # a NaN rate stays NaN
    k = torch.arange(min(256, int(top + 12 * top**0.5 + 30)), dtype=torch.float64)
    exact = (
        torch.cat(
            [
                ((k * part.log()[:, None] - part[:, None] - torch.lgamma(k + 1)).exp() * k.log1p()).sum(1)
                for part in mu.clamp(max=100).split(chunk)
            ]
        )
        if len(mu)
        else mu
    )
    return torch.where(mu < 100, exact, mu.log1p() - mu / (2 * (1 + mu) ** 2))


def rmse_log1p(counts: Tensor, rates: Tensor) -> float:
    """RMSE of log1p(count) against its expectation under the predicted Poisson rates (see expected_log1p)."""
    return float((expected_log1p(rates) - counts.double().log1p()).pow(2).mean().sqrt())


def _gauc(spec: TaskSpec, data: _Evaluation) -> float | None:
    if data.users is None:
        return None
    return gauc(*data.labelled(spec), data.users[data.masks[spec.name].numpy()])


def _auc_clicked(spec: TaskSpec, data: _Evaluation) -> float:
    rows = after_rows(spec, data.labels, data.masks)
    return auc(data.labels[spec.name][rows], data.predictions[spec.name][rows])


def _on_joint(metric: Callable[[Tensor, Tensor], float]) -> Callable[[TaskSpec, _Evaluation], float | None]:
    """`metric` of the joint probability on the task's labelled rows; None when the task it follows is not trained."""

    def joint_metric(spec: TaskSpec, data: _Evaluation) -> float | None:
        joint = spec.name + JOINT_SUFFIX
        return metric(*data.labelled(spec, joint)) if joint in data.predictions else None

    return joint_metric


def _on_labelled(metric: Callable[[Tensor, Tensor], float]) -> Callable[[TaskSpec, _Evaluation], float]:
    """`metric` of the task's own predictions on its labelled rows."""
    return lambda spec, data: metric(*data.labelled(spec))


# metric name -> its value for one task, or None where the data lacks what it needs (users, the joint probability)
METRICS: dict[str, Callable[[TaskSpec, _Evaluation], float | None]] = {
    "auc": _on_labelled(auc),
    "gauc": _gauc,
    "logloss": _on_labelled(logloss),
    "calibration": _on_labelled(calibration),
    "auc_clicked": _auc_clicked,
    "ctcvr_auc": _on_joint(auc),
    "ctcvr_logloss": _on_joint(logloss),
    "rmse": _on_labelled(rmse),
    "mae": _on_labelled(mae),
    "poisson_deviance": _on_labelled(poisson_deviance),
    "rmse_log1p": _on_labelled(rmse_log1p),
}


def task_metrics(
    predictions: dict[str, Tensor],
    labels: dict[str, Tensor],
    masks: dict[str, Tensor],
    specs: tuple[TaskSpec, ...],
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric of every task on one evaluation set: those of its kind (tasks.TASK_KINDS), in that order.

    Args:
        predictions: output of tasks.predict (probabilities, ratings, counts; `<task>_joint` for `after` tasks), [N].
        labels, masks: task -> [N]; a false mask is an absent label.
        users: [N] user ids for gAUC, or None.
    """
    data = _Evaluation(predictions, labels, masks, users)
    out: dict[str, float] = {}
    for spec in specs:
        for metric in TASK_KINDS[spec.task_kind].metrics:
            value = METRICS[metric](spec, data)
            if value is not None:
                out[f"{spec.name}/{metric}"] = value
    return out


MIXTURE_PREFIX = "mixture/"
DEAD_LOAD = 0.02  # an expert is dead when every task that can route to it gives it less mean gate weight than this


def has_oracle(metrics: dict[str, float]) -> bool:
    """Whether evaluated `metrics` carry the oracle's twins (the data has an oracle)."""
    return any(name.startswith("oracle/") for name in metrics)


def is_task_metric(name: str) -> bool:
    """Whether `name` is one of the model's own `<task>/<metric>`, not an `oracle/`, `ratio/` or `mixture/` one."""
    return not name.startswith(("oracle/", "ratio/", MIXTURE_PREFIX))


def gate_entropy(gate_weights: Tensor) -> Tensor:
    """The entropy, in nats, of each gate distribution; 0 log 0 counts as 0 (the experts outside a gate's own).

    Args:
        gate_weights: [..., E], each [E] summing to 1 (e.g. [B, T, E]).

    Returns:
        [...] float32 (e.g. [B, T]): 0 for a gate on one expert, ln(n) for a uniform one on n experts.
    """
    weights = gate_weights.float()
    return -torch.xlogy(weights, weights).sum(-1)  # [...]


def dead_experts(loads: Tensor, gate_mask: Tensor, threshold: float = DEAD_LOAD) -> Tensor:
    """The experts whose load is below `threshold` for every task that can route to them.

    Args:
        loads: [T, E] the mean gate weight of each task on each expert.
        gate_mask: [T, E] bool, whether the task's gate covers the expert (an expert no task covers counts as dead).

    Returns:
        [E] bool.
    """
    return ((loads < threshold) | ~gate_mask).all(0)  # [E]


@dataclass(frozen=True)
class MixtureHealth:
    """How the tasks use the experts of the mixture's last level on a split. As metrics (`to_metrics`):
    `mixture/<task>/gate_entropy`, `mixture/<task>/load/<expert>` and `mixture/dead_experts`.

    entropy: task -> the mean over rows of the entropy (nats) of the task's gate.
    loads: task -> expert -> the mean gate weight the task gives the expert, for the experts it can route to only
        (in PLE its own and the shared ones); they sum to 1 per task.
    dead_share: the share of experts that are dead (`dead_experts`).
    """

    entropy: dict[str, float]
    loads: dict[str, dict[str, float]]
    dead_share: float

    @staticmethod
    def measure(
        mean_weights: Tensor, mean_entropy: Tensor, gate_mask: Tensor, tasks: list[str], experts: list[str]
    ) -> "MixtureHealth":
        """The health of gates whose weights, averaged over the rows, are `mean_weights`.

        Args:
            mean_weights: [T, E] the mean gate weight of each task on each expert.
            mean_entropy: [T] the mean over rows of each task's gate entropy (`gate_entropy`).
            gate_mask: [T, E] bool, whether the task's gate covers the expert (`MixtureLevel.gate_mask`).
            tasks, experts: their names, T and E of them.
        """
        dead = dead_experts(mean_weights, gate_mask)  # [E]
        return MixtureHealth(
            entropy={task: float(h) for task, h in zip(tasks, mean_entropy, strict=True)},
            loads={
                task: {expert: float(w) for expert, w, m in zip(experts, row, covers, strict=True) if m}
                for task, row, covers in zip(tasks, mean_weights, gate_mask, strict=True)
            },
            dead_share=float(dead.double().mean()),
        )

    @property
    def experts(self) -> list[str]:
        """Every expert some task can route to, in the mixture's order."""
        return list(dict.fromkeys(expert for loads in self.loads.values() for expert in loads))

    def max_entropy(self, task: str) -> float:
        """ln(the number of experts `task` can route to): the entropy of a uniform gate."""
        return math.log(len(self.loads[task]))

    def dead(self) -> list[str]:
        """The dead experts' names."""
        experts = self.experts
        loads = torch.tensor([[row.get(e, 0.0) for e in experts] for row in self.loads.values()])  # [T, E]
        covers = torch.tensor([[e in row for e in experts] for row in self.loads.values()])  # [T, E]
        return [e for e, is_dead in zip(experts, dead_experts(loads, covers).tolist(), strict=True) if is_dead]

    def to_metrics(self) -> dict[str, float]:
        out = {}
        for task, loads in self.loads.items():
            out[f"{MIXTURE_PREFIX}{task}/gate_entropy"] = self.entropy[task]
            out |= {f"{MIXTURE_PREFIX}{task}/load/{expert}": load for expert, load in loads.items()}
        return out | {f"{MIXTURE_PREFIX}dead_experts": self.dead_share}

    @staticmethod
    def from_metrics(metrics: dict[str, float]) -> "MixtureHealth | None":
        """The health that `to_metrics` wrote into `metrics`, or None when they have none (one expert)."""
        if f"{MIXTURE_PREFIX}dead_experts" not in metrics:
            return None
        entropy: dict[str, float] = {}
        loads: dict[str, dict[str, float]] = {}
        for name, value in metrics.items():
            parts = name.removeprefix(MIXTURE_PREFIX).split("/")
            if not name.startswith(MIXTURE_PREFIX) or len(parts) < 2:
                continue
            if parts[1:] == ["gate_entropy"]:
                entropy[parts[0]] = value
            elif len(parts) == 3 and parts[1] == "load":
                loads.setdefault(parts[0], {})[parts[2]] = value
        return MixtureHealth(entropy, loads, metrics[f"{MIXTURE_PREFIX}dead_experts"])


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for people: `digits` decimals, or "—" when it is undefined (None or NaN)."""
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"
