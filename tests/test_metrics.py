import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, mean_absolute_error, mean_poisson_deviance, mean_squared_error, roc_auc_score

from recsys_mtl.metrics import (
    MixtureHealth,
    auc,
    calibration,
    dead_experts,
    expected_log1p,
    format_metric,
    gate_entropy,
    gauc,
    logloss,
    poisson_deviance,
    rmse_log1p,
    task_metrics,
)
from recsys_mtl.tasks import TaskSpec

RNG = np.random.default_rng(0)
LABELS = (RNG.random(2000) < 0.3).astype(np.float64)
SCORES = np.round(0.4 * LABELS + RNG.random(2000), 2)  # rounded: many ties


def test_auc_matches_scikit_learn_with_ties() -> None:
    assert auc(torch.tensor(LABELS), torch.tensor(SCORES)) == pytest.approx(roc_auc_score(LABELS, SCORES), abs=1e-12)


def test_gauc_is_the_impression_weighted_mean_of_per_user_aucs() -> None:
    users = RNG.integers(0, 20, 2000)
    expected, weight = 0.0, 0
    for u in np.unique(users):
        rows = users == u
        if 0 < LABELS[rows].sum() < rows.sum():
            expected += roc_auc_score(LABELS[rows], SCORES[rows]) * rows.sum()
            weight += rows.sum()
    assert gauc(torch.tensor(LABELS), torch.tensor(SCORES), users) == pytest.approx(expected / weight, abs=1e-12)


def test_losses_and_errors_match_scikit_learn() -> None:
    probs = np.clip(SCORES / 1.5, 0.01, 0.99)
    assert logloss(torch.tensor(LABELS), torch.tensor(probs)) == pytest.approx(log_loss(LABELS, probs), rel=1e-9)
    counts, rates = RNG.poisson(2.0, 500).astype(float), RNG.random(500) * 4 + 0.1
    expected = mean_poisson_deviance(counts, rates)
    assert poisson_deviance(torch.tensor(counts), torch.tensor(rates)) == pytest.approx(expected, rel=1e-9)
    ratings, predicted = RNG.integers(1, 6, 300).astype(float), RNG.random(300) * 4 + 1
    spec = TaskSpec(name="rating", kind="regression", loss="mse", weight=1.0, min=1, max=5)
    metrics = task_metrics(
        {"rating": torch.tensor(predicted)},
        {"rating": torch.tensor(ratings)},
        {"rating": torch.ones(300, dtype=torch.bool)},
        (spec,),
    )
    assert metrics["rating/rmse"] == pytest.approx(mean_squared_error(ratings, predicted) ** 0.5, rel=1e-9)
    assert metrics["rating/mae"] == pytest.approx(mean_absolute_error(ratings, predicted), rel=1e-9)


def test_shuffled_rows_give_the_same_metrics() -> None:
    spec = TaskSpec(name="ctr", kind="binary", loss="bce", weight=1.0)
    users = RNG.integers(0, 50, 2000)
    probs = torch.tensor(np.clip(SCORES / 1.5, 0.01, 0.99))
    args = ({"ctr": probs}, {"ctr": torch.tensor(LABELS)}, {"ctr": torch.ones(2000, dtype=torch.bool)}, (spec,), users)
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(1))
    shuffled = (
        {"ctr": probs[order]},
        {"ctr": torch.tensor(LABELS)[order]},
        {"ctr": torch.ones(2000, dtype=torch.bool)},
        (spec,),
        users[order.numpy()],
    )
    assert task_metrics(*args) == pytest.approx(task_metrics(*shuffled), rel=1e-12)


def test_cvr_metrics_use_clicked_rows_and_the_joint_probability() -> None:
    ctr = TaskSpec(name="ctr", kind="binary", loss="bce", weight=1.0)
    cvr = TaskSpec(name="cvr", kind="binary", loss="bce", weight=1.0, after="ctr")
    clicks = torch.tensor([1.0, 1, 1, 0, 0, 1])
    conversions = torch.tensor([1.0, 0, 1, 0, 0, 0])
    p_ctr = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    p_cvr = torch.tensor([0.6, 0.1, 0.5, 0.9, 0.9, 0.4])
    ones = torch.ones(6, dtype=torch.bool)
    metrics = task_metrics(
        {"ctr": p_ctr, "cvr": p_cvr, "cvr_joint": p_ctr * p_cvr},
        {"ctr": clicks, "cvr": conversions},
        {"ctr": ones, "cvr": ones},
        (ctr, cvr),
    )
    clicked = clicks == 1
    assert metrics["cvr/auc_clicked"] == pytest.approx(roc_auc_score(conversions[clicked], p_cvr[clicked]))
    assert metrics["cvr/ctcvr_auc"] == pytest.approx(roc_auc_score(conversions, p_ctr * p_cvr))


def test_constant_labels_give_undefined_aucs_not_an_error() -> None:
    ctr = TaskSpec(name="ctr", kind="binary", loss="bce", weight=1.0)
    probs = torch.tensor([0.2, 0.4, 0.6, 0.8])
    metrics = task_metrics(
        {"ctr": probs},
        {"ctr": torch.zeros(4)},
        {"ctr": torch.ones(4, dtype=torch.bool)},
        (ctr,),
        np.array([1, 1, 2, 2]),
    )
    assert math.isnan(metrics["ctr/auc"])
    assert math.isnan(metrics["ctr/gauc"])
    assert math.isnan(metrics["ctr/calibration"])  # no positives to divide by
    assert metrics["ctr/logloss"] == pytest.approx(log_loss([0, 0, 0, 0], probs.numpy(), labels=[0, 1]))
    assert [format_metric(metrics[k], 3) for k in ("ctr/auc", "ctr/logloss")] == ["—", "0.815"]
    assert format_metric(None) == "—"
    assert format_metric(0.123456) == "0.1235"


def test_calibration_is_mean_prediction_over_mean_label() -> None:
    assert calibration(torch.tensor([1.0, 0, 0, 1]), torch.tensor([0.6, 0.2, 0.2, 0.2])) == pytest.approx(0.6)


def test_a_task_after_an_untrained_one_has_no_joint_metrics() -> None:
    cvr = TaskSpec(name="cvr", kind="binary", loss="bce", weight=1.0, after="ctr", esmm=False)
    ones = torch.ones(4, dtype=torch.bool)
    metrics = task_metrics(
        {"cvr": torch.tensor([0.5, 0.1, 0.8, 0.95])},
        {"ctr": torch.tensor([1.0, 1, 1, 0]), "cvr": torch.tensor([1.0, 0, 0, 1])},
        {"ctr": ones, "cvr": ones},
        (cvr,),
    )
    assert metrics == {"cvr/auc_clicked": 0.5}  # clicked rows only: 0.5 beats 0.1, not 0.8 (0.75 with row 3)


def _health(gate_weights: torch.Tensor, gate_mask: torch.Tensor, tasks: list[str], experts: list[str]) -> MixtureHealth:
    """MixtureHealth of per-row gate weights [B, T, E], reduced over the rows as evaluation does."""
    return MixtureHealth.measure(gate_weights.mean(0), gate_entropy(gate_weights).mean(0), gate_mask, tasks, experts)


def test_a_collapsed_gate_has_zero_entropy_and_every_other_expert_dead() -> None:
    experts = ["shared0", "shared1", "shared2", "shared3"]
    gate_weights = torch.zeros(5, 2, 4)
    gate_weights[:, :, 1] = 1.0  # both tasks, every row: all weight on shared1
    health = _health(gate_weights, torch.ones(2, 4, dtype=torch.bool), ["ctr", "rating"], experts)
    assert health.entropy == {"ctr": 0.0, "rating": 0.0}
    assert health.loads["ctr"] == {"shared0": 0.0, "shared1": 1.0, "shared2": 0.0, "shared3": 0.0}
    assert health.dead_share == 3 / 4
    assert health.dead() == ["shared0", "shared2", "shared3"]


def test_a_uniform_gate_has_entropy_ln_e_and_no_dead_expert() -> None:
    experts = [f"shared{i}" for i in range(8)]
    health = _health(torch.full((3, 1, 8), 1 / 8), torch.ones(1, 8, dtype=torch.bool), ["ctr"], experts)
    assert health.entropy["ctr"] == pytest.approx(math.log(8), rel=1e-6)
    assert health.max_entropy("ctr") == pytest.approx(math.log(8))
    assert health.loads["ctr"] == pytest.approx(dict.fromkeys(experts, 1 / 8))
    assert health.dead_share == 0.0
    assert health.dead() == []


def test_ple_loads_cover_only_the_experts_a_task_routes_to() -> None:
    # PLE-like: shared0 for both tasks, task0.0 for ctr only, task1.0 for rating only
    experts = ["shared0", "task0.0", "task1.0"]
    gate_mask = torch.tensor([[True, True, False], [True, False, True]])
    gate_weights = torch.tensor(
        [
            [[0.98, 0.02, 0.0], [0.5, 0.0, 0.5]],
            [[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]],
        ]
    )  # [B=2, T=2, E=3]
    health = _health(gate_weights, gate_mask, ["ctr", "rating"], experts)
    assert health.loads["ctr"] == pytest.approx({"shared0": 0.99, "task0.0": 0.01})  # no task1.0: ctr cannot route
    assert health.loads["rating"] == pytest.approx({"shared0": 0.7, "task1.0": 0.3})
    row_entropy = -(0.98 * math.log(0.98) + 0.02 * math.log(0.02))  # the second ctr row: one expert, entropy 0
    rating_entropy = (math.log(2) - 0.9 * math.log(0.9) - 0.1 * math.log(0.1)) / 2
    assert health.entropy == pytest.approx({"ctr": row_entropy / 2, "rating": rating_entropy}, rel=1e-6)
    assert health.max_entropy("ctr") == pytest.approx(math.log(2))
    # task0.0 (0.01 from ctr, the only task that routes to it) is dead; rating's 0 on task0.0 does not count
    assert health.dead() == ["task0.0"]
    assert health.dead_share == pytest.approx(1 / 3)
    metrics = health.to_metrics()
    assert list(metrics) == [
        "mixture/ctr/gate_entropy",
        "mixture/ctr/load/shared0",
        "mixture/ctr/load/task0.0",
        "mixture/rating/gate_entropy",
        "mixture/rating/load/shared0",
        "mixture/rating/load/task1.0",
        "mixture/dead_experts",
    ]
    assert MixtureHealth.from_metrics({"ctr/auc": 0.7, **metrics}) == health
    assert MixtureHealth.from_metrics({"ctr/auc": 0.7}) is None


def test_an_expert_no_task_routes_to_counts_as_dead() -> None:
    loads = torch.tensor([[0.5, 0.5, 0.0]])
    assert dead_experts(loads, torch.tensor([[True, True, False]])).tolist() == [False, False, True]


def test_expected_log1p_is_the_poisson_mean_of_log1p_and_beats_a_constant_where_log1p_of_the_rate_does_not() -> None:
    torch.manual_seed(0)
    rates = torch.tensor([0.05, 0.5, 3.0, 40.0, 99.0, 400.0])
    samples = torch.poisson(rates.repeat(200_000, 1))
    torch.testing.assert_close(expected_log1p(rates), samples.log1p().mean(0).double(), atol=3e-3, rtol=1e-3)
    # skewed counts (most rows 0, a few large), predicted with their true rates
    true = torch.where(torch.rand(20_000) < 0.9, 0.2, 30.0)
    counts = torch.poisson(true)
    constant = torch.full_like(true, float(counts.mean()))
    assert rmse_log1p(counts, true) < rmse_log1p(counts, constant)
    naive = float((true.double().log1p() - counts.double().log1p()).pow(2).mean().sqrt())
    assert rmse_log1p(counts, true) < naive


def test_expected_log1p_stops_its_sum_only_where_no_rate_has_mass_left() -> None:
    k = torch.arange(256, dtype=torch.float64)
    for rates in (torch.tensor([0.01, 0.7, 2.5]), torch.tensor([0.3, 9.0]), torch.tensor([55.0, 99.9])):
        mu = rates.double()
        full = ((k * mu.log()[:, None] - mu[:, None] - torch.lgamma(k + 1)).exp() * k.log1p()).sum(1)  # all terms
        torch.testing.assert_close(expected_log1p(rates), full, atol=1e-12, rtol=1e-12)
