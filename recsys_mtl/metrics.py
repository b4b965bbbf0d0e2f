"""Exact metrics per task."""

import torch
from torch import Tensor


def auc(labels: Tensor, scores: Tensor) -> float:
    """Exact ROC AUC with ties counted as one half (rank statistic). labels, scores: [N]. NaN without both classes."""
    labels = labels.double().flatten()
    scores = scores.double().flatten()
    num_pos = labels.sum()
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inverse]
    return float((ranks[labels == 1].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
