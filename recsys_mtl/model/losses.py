"""Per-task losses (always fp32), their reduction and weighting.

Losses by `TaskSpec.loss` (see tasks.py for the kinds): bce on sigmoid(logit); mse or huber on the bounded rating
(tasks.to_label_units); poisson, the log-link NLL. A task `after` another one (cvr after ctr) is ESMM-style by
default: the joint p(after) * p(task) is supervised on every row; without esmm, the task alone on tasks.after_rows.
A null label is absent: it contributes nothing.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_mtl.config import Config
from recsys_mtl.tasks import TaskSpec, after_rows, to_label_units


def _log1mexp(log_p: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    log_p = log_p.clamp(max=-1e-7)
    return torch.where(log_p > -math.log(2), torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def sample_losses(
    logits: dict[str, Tensor],
    labels: dict[str, Tensor],
    masks: dict[str, Tensor],
    specs: tuple[TaskSpec, ...],
    huber_delta: float = 1.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-row losses of every task, in fp32, and the rows that count.

    Args:
        logits, labels: task -> [B]. masks: task -> [B] bool, true where the label is present.

    Returns:
        (task -> [B] loss, 0 where it does not count; task -> [B] bool mask of the rows that count).
    """
    losses, used = {}, {}
    for spec in specs:
        logit, target = logits[spec.name].float(), labels[spec.name].float()
        mask = masks[spec.name]
        if spec.after is not None and spec.esmm:
            log_p = F.logsigmoid(logits[spec.after].float()) + F.logsigmoid(logit)  # log(pCTR * pCVR)
            loss = -(target * log_p + (1 - target) * _log1mexp(log_p))
        elif spec.after is not None:
            mask = after_rows(spec, labels, masks)
            loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        elif spec.loss == "bce":
            loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        elif spec.loss == "poisson":
            loss = torch.exp(logit) - target * logit  # Poisson NLL with log link, without the log(y!) constant
        else:
            prediction = to_label_units(spec, logit)
            if spec.loss == "huber":
                loss = F.huber_loss(prediction, target, reduction="none", delta=huber_delta)
            else:
                loss = (prediction - target) ** 2
        losses[spec.name] = torch.where(mask, loss, torch.zeros_like(loss))
        used[spec.name] = mask
    return losses, used


class MultiTaskLoss(nn.Module):
    """Weights, reduces and sums the task losses into one scalar.

    weighting: fixed (the tasks' weights), uncertainty (Kendall et al.: a learned log-variance s per task,
    exp(-s) * L + s / 2, with 0.5 * exp(-s) for regression), or gradnorm (weights updated by `gradnorm_step`).
    """

    fixed_weights: Tensor  # [T] buffers, registered in __init__
    regression_scale: Tensor
    gradnorm_weights: Tensor
    initial_losses: Tensor

    def __init__(self, cfg: Config, specs: tuple[TaskSpec, ...]) -> None:
        super().__init__()
        self.specs = specs
        self.reduction = cfg.loss.reduction
        self.weighting = cfg.loss.weighting
        self.huber_delta = cfg.loss.huber_delta
        self.alpha = cfg.loss.gradnorm_alpha
        self.gradnorm_lr = cfg.loss.gradnorm_lr
        fixed = torch.tensor([s.weight for s in specs], dtype=torch.float32)
        self.register_buffer("fixed_weights", fixed)
        self.register_buffer("regression_scale", torch.tensor([0.5 if s.kind == "regression" else 1.0 for s in specs]))
        self.log_vars = nn.Parameter(torch.zeros(len(specs)), requires_grad=self.weighting == "uncertainty")
        self.register_buffer("gradnorm_weights", fixed * len(specs) / fixed.sum().clamp(min=1e-12))
        self.register_buffer("initial_losses", torch.zeros(len(specs)))

    def weights(self) -> Tensor:
        """Current weight of each task. Returns [T]."""
        if self.weighting == "uncertainty":
            return self.regression_scale * torch.exp(-self.log_vars)
        if self.weighting == "gradnorm":
            return self.gradnorm_weights
        return self.fixed_weights

    def forward(
        self, logits: dict[str, Tensor], labels: dict[str, Tensor], masks: dict[str, Tensor], active: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Total loss and the per-task mean losses.

        Args:
            logits, labels, masks: task -> [B].
            active: [T] float, 1 for the tasks this step trains (the alternating schedule zeroes the others).

        Returns:
            (scalar total loss, [T] mean loss per task over the rows where its label counts).
        """
        losses, used = sample_losses(logits, labels, masks, self.specs, self.huber_delta)
        per_row = torch.stack([losses[s.name] for s in self.specs])  # [T, B]
        counts = torch.stack([used[s.name].sum() for s in self.specs]).clamp(min=1)  # [T]
        task_means = per_row.sum(1) / counts  # [T]
        weights = self.weights() * active  # [T]
        per_task = weights * task_means  # task level: mean per task, then the weighted sum
        per_sample = (weights[:, None] * per_row).sum(0)  # sample level: weighted sum over a row's tasks ...
        total = per_task.sum() if self.reduction == "task" else per_sample.mean()  # ... then the mean over rows
        if self.weighting == "uncertainty":
            total = total + (self.log_vars * active).sum() / 2
        return total, task_means

    @torch.no_grad()
    def gradnorm_step(self, task_grad_norms: Tensor, task_means: Tensor) -> None:
        """One GradNorm update (Chen et al., 2018) of the task weights, then renormalise them to sum to T.

        Args:
            task_grad_norms: [T] norms of each task's (unweighted) loss gradient on the shared parameters.
            task_means: [T] current mean losses.
        """
        if not self.initial_losses.any():
            self.initial_losses.copy_(task_means.clamp(min=1e-8))
        weighted_norms = self.gradnorm_weights * task_grad_norms  # [T]
        ratios = task_means / self.initial_losses
        target = weighted_norms.mean() * (ratios / ratios.mean()) ** self.alpha  # [T]
        grad = torch.sign(weighted_norms - target) * task_grad_norms  # d|G_t - target_t| / d w_t
        updated = (self.gradnorm_weights - self.gradnorm_lr * grad).clamp(min=1e-3)
        self.gradnorm_weights.copy_(updated * len(self.specs) / updated.sum())


def active_tasks(step: int, num_tasks: int, schedule: str) -> Tensor:
    """Which tasks a step trains. joint: all. alternating: all on even steps, task (step // 2) % T on odd ones.

    Returns:
        [T] float mask.
    """
    active = torch.ones(num_tasks)
    if schedule == "alternating" and step % 2 == 1:
        active = torch.zeros(num_tasks)
        active[(step // 2) % num_tasks] = 1.0
    return active
