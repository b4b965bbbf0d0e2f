import math

import pytest
import torch
import torch.nn.functional as F

from recsys_mtl.config import Config, LossConfig, TaskConfig
from recsys_mtl.model.losses import MultiTaskLoss, active_tasks, sample_losses
from recsys_mtl.tasks import TaskSpec

CTR = TaskSpec(name="ctr", kind="binary", loss="bce", weight=1.0)
CVR = TaskSpec(name="cvr", kind="binary", loss="bce", weight=1.0, after="ctr")
RATING = TaskSpec(name="rating", kind="regression", loss="mse", weight=1.0, min=1.0, max=5.0)
READS = TaskSpec(name="reads", kind="count", loss="poisson", weight=1.0)


def _inputs(n: int = 6, seed: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    logits = {t: torch.randn(n, generator=g) for t in ("ctr", "cvr", "rating", "reads")}
    clicks = torch.tensor([1.0, 0, 1, 0, 0, 1])[:n]
    labels = {
        "ctr": clicks,
        "cvr": torch.tensor([1.0, 0, 0, 0, 0, 1])[:n],
        "rating": torch.tensor([5.0, 0, 0, 0, 0, 2])[:n],
        "reads": torch.tensor([3.0, 0, 1, 0, 0, 0])[:n],
    }
    masks = {
        "ctr": torch.ones(n, dtype=torch.bool),
        "cvr": torch.ones(n, dtype=torch.bool),
        "rating": torch.tensor([True, False, False, False, False, True])[:n],
        "reads": torch.tensor([True, True, True, False, False, False])[:n],
    }
    return logits, labels, masks


def test_binary_loss_matches_hand_computed() -> None:
    logits, labels = {"ctr": torch.tensor([0.0, 2.0])}, {"ctr": torch.tensor([1.0, 0.0])}
    losses, _ = sample_losses(logits, labels, {"ctr": torch.ones(2, dtype=torch.bool)}, (CTR,))
    assert losses["ctr"].mean().item() == pytest.approx((math.log(2) + math.log1p(math.e**2)) / 2, rel=1e-6)


def test_masked_losses_ignore_absent_labels_exactly() -> None:
    logits, labels, masks = _inputs()
    specs = (CTR, CVR, RATING, READS)
    losses, used = sample_losses(logits, labels, masks, specs)
    garbage = {t: torch.where(masks[t], labels[t], torch.full_like(labels[t], 1e6)) for t in labels}
    again, _ = sample_losses(logits, garbage, masks, specs)
    for task in labels:
        assert torch.equal(losses[task], again[task])
        assert (losses[task][~used[task]] == 0).all()
    rating = 1 + 4 * torch.sigmoid(logits["rating"][[0, 5]])
    torch.testing.assert_close(losses["rating"][[0, 5]], (rating - torch.tensor([5.0, 2.0])) ** 2)


def test_esmm_supervises_the_product_of_ctr_and_cvr_on_every_row() -> None:
    logits, labels, masks = _inputs()
    losses, used = sample_losses(logits, labels, masks, (CTR, CVR))
    p_ctcvr = torch.sigmoid(logits["ctr"]) * torch.sigmoid(logits["cvr"])
    torch.testing.assert_close(losses["cvr"], F.binary_cross_entropy(p_ctcvr, labels["cvr"], reduction="none"))
    assert used["cvr"].all()


def test_direct_cvr_is_supervised_on_clicked_rows_only() -> None:
    logits, labels, masks = _inputs()
    direct = TaskSpec(name="cvr", kind="binary", loss="bce", weight=1.0, after="ctr", esmm=False)
    losses, used = sample_losses(logits, labels, masks, (CTR, direct))
    assert used["cvr"].tolist() == [True, False, True, False, False, True]
    expected = F.binary_cross_entropy_with_logits(logits["cvr"], labels["cvr"], reduction="none") * used["cvr"]
    torch.testing.assert_close(losses["cvr"], expected)


def test_poisson_loss_is_the_log_link_nll_and_huber_caps_large_errors() -> None:
    logits, labels, masks = _inputs()
    losses, _ = sample_losses(logits, labels, masks, (READS,))
    expected = F.poisson_nll_loss(logits["reads"], labels["reads"], log_input=True, reduction="none") * masks["reads"]
    torch.testing.assert_close(losses["reads"], expected)
    huber = TaskSpec(name="rating", kind="regression", loss="huber", weight=1.0, min=1.0, max=5.0)
    far = {"rating": torch.tensor([-20.0, 20.0])}
    target = {"rating": torch.tensor([5.0, 1.0])}
    mask = {"rating": torch.ones(2, dtype=torch.bool)}
    mse, _ = sample_losses(far, target, mask, (RATING,))
    capped, _ = sample_losses(far, target, mask, (huber,), huber_delta=1.0)
    assert (capped["rating"] < mse["rating"]).all()
    assert capped["rating"][0].item() == pytest.approx(4 - 0.5, rel=1e-4)  # |1 - 5| = 4 -> delta * (4 - delta / 2)


def _loss(reduction: str = "task", weighting: str = "fixed") -> MultiTaskLoss:
    tasks = (TaskConfig("ctr", weight=2.0), TaskConfig("rating"))
    cfg = Config(dataset="-", tasks=tasks, loss=LossConfig(reduction=reduction, weighting=weighting))
    specs = (TaskSpec("ctr", "binary", "bce", 2.0), RATING)
    return MultiTaskLoss(cfg, specs)


def test_task_and_sample_level_reductions_match_hand_computation() -> None:
    logits, labels, masks = _inputs()
    losses, _ = sample_losses(logits, labels, masks, (CTR, RATING))
    ctr_mean = losses["ctr"].sum() / 6
    rating_mean = losses["rating"].sum() / 2
    total, means = _loss("task")(logits, labels, masks, torch.ones(2))
    torch.testing.assert_close(means, torch.stack([ctr_mean, rating_mean]))
    torch.testing.assert_close(total, 2 * ctr_mean + rating_mean)
    total, _ = _loss("sample")(logits, labels, masks, torch.ones(2))
    torch.testing.assert_close(total, (2 * losses["ctr"] + losses["rating"]).mean())


def test_uncertainty_weighting_follows_kendalls_form() -> None:
    loss = _loss(weighting="uncertainty")
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.5, -1.0]))
    logits, labels, masks = _inputs()
    total, means = loss(logits, labels, masks, torch.ones(2))
    expected = math.exp(-0.5) * means[0] + 0.5 / 2 + 0.5 * math.exp(1.0) * means[1] - 1.0 / 2
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradnorm_raises_the_weight_of_the_task_with_the_smaller_gradient() -> None:
    loss = _loss(weighting="gradnorm")
    before = loss.gradnorm_weights.clone()
    loss.gradnorm_step(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1.0]))
    after = loss.gradnorm_weights
    assert after.sum().item() == pytest.approx(2.0)
    assert after[1] / after[0] > before[1] / before[0]


def test_alternating_schedule_trains_one_task_between_joint_steps() -> None:
    steps = [active_tasks(s, 3, "alternating").tolist() for s in range(6)]
    assert steps == [[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]]
    assert active_tasks(5, 3, "joint").tolist() == [1, 1, 1]
