"""Exact metrics per task, keyed `<task>/<metric>`.

binary: auc, gauc (by user, impression-weighted over users with both classes), logloss, calibration (mean prediction /
mean label). A task `after` another (cvr): auc_clicked (pCVR on rows where the other task's label is 1) and
ctcvr_auc (pCTR * pCVR on every row). regression: rmse, mae. count: poisson_deviance, rmse_log1p.

A metric that is undefined on the data (an AUC whose labels are all 0 or all 1, any metric without labelled rows) is
NaN, never an exception; `format_metric` shows it as "—".
"""

import math

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_mtl.model.losses import TaskSpec

HIGHER_IS_BETTER = ("auc", "gauc", "auc_clicked", "ctcvr_auc")


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
    return float((per_group["auc"] * per_group["n"]).sum() / per_group["n"].sum())


def logloss(labels: Tensor, probs: Tensor) -> float:
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    y = labels.double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def poisson_deviance(counts: Tensor, rates: Tensor) -> float:
    """Mean Poisson deviance 2 * (y log(y / mu) - (y - mu)), with y log y = 0 at y = 0."""
    y, mu = counts.double(), rates.double().clamp(min=1e-12)
    term = torch.where(y > 0, y * torch.log(y / mu), torch.zeros_like(y))
    return float((2 * (term - (y - mu))).mean())


def task_metrics(
    predictions: dict[str, Tensor],
    labels: dict[str, Tensor],
    masks: dict[str, Tensor],
    specs: tuple[TaskSpec, ...],
    users: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric of every task on one evaluation set.

    Args:
        predictions: output of losses.predict (probabilities, ratings, counts; `<task>_joint` for `after` tasks), [N].
        labels, masks: task -> [N]; a false mask is an absent label.
        users: [N] user ids for gAUC, or None.
    """
    out: dict[str, float] = {}
    for spec in specs:
        mask = masks[spec.name]
        y, p = labels[spec.name][mask], predictions[spec.name][mask]
        name = spec.name
        if spec.after is not None:
            clicked = mask & masks[spec.after] & (labels[spec.after] == 1)
            out[f"{name}/auc_clicked"] = auc(labels[name][clicked], predictions[name][clicked])
            if f"{name}_joint" in predictions:  # the task it follows is trained too
                out[f"{name}/ctcvr_auc"] = auc(y, predictions[f"{name}_joint"][mask])
                out[f"{name}/ctcvr_logloss"] = logloss(y, predictions[f"{name}_joint"][mask])
        elif spec.kind == "binary":
            out[f"{name}/auc"] = auc(y, p)
            if users is not None:
                out[f"{name}/gauc"] = gauc(y, p, users[mask.numpy()])
            out[f"{name}/logloss"] = logloss(y, p)
            out[f"{name}/calibration"] = float(p.double().mean() / y.double().mean()) if y.sum() > 0 else math.nan
        elif spec.kind == "regression":
            error = p.double() - y.double()
            out[f"{name}/rmse"] = float(error.pow(2).mean().sqrt())
            out[f"{name}/mae"] = float(error.abs().mean())
        else:
            out[f"{name}/poisson_deviance"] = poisson_deviance(y, p)
            out[f"{name}/rmse_log1p"] = float((p.double().log1p() - y.double().log1p()).pow(2).mean().sqrt())
    return out


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for people: `digits` decimals, or "—" when it is undefined (None or NaN)."""
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` improves on `best` for `metric` (AUCs up, losses and errors down)."""
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if metric.split("/")[-1] in HIGHER_IS_BETTER else value < best
