"""Shared-bottom, MMoE and PLE as one module: levels of stacked experts mixed by per-task softmax gates.

- shared_bottom: one level, one shared expert (every gate is trivially 1: the level has no gate parameters).
- mmoe: one level of E shared experts, one gate per task over all of them.
- ple: L levels (CGC) of shared experts and task-specific experts; task t's gate mixes its own and the shared experts,
  and below the last level a shared gate mixes all of them for the next level's shared experts.

All experts of a level are computed together (weights stacked as [E, in, out], one batched matmul per layer).

With `model.balance`, the tasks' gradients on the last level's expert outputs (the shared representation) are balanced
before they are summed: one backward still reaches the experts and the fused embedding tables, only the sum changes.
"""

import contextlib
import math
from collections.abc import Iterator
from typing import cast

import torch
from torch import Tensor, nn

from recsys_mtl.config import ModelConfig


class ExpertStack(nn.Module):
    """E MLP experts with stacked weights. forward: [B, D_in] (one input) or [B, E, D_in] -> [B, E, D_exp]."""

    def __init__(self, num_experts: int, in_dim: int, dims: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip((in_dim, *dims[:-1]), dims, strict=True):
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default initialisation, expert by expert
            self.weights.append(nn.Parameter(torch.empty(num_experts, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, d_out).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # the experts' activations laid out [E, B, D_h]: each expert's rows contiguous, so that the backward's batched
        # matmuls read them as they are (a [B, E, D_h] view made torch copy them transposed: 8 ms a step at batch 4096)
        hidden = x if x.dim() == 2 else x.transpose(0, 1)  # [B, D_in] or [E, B, D_in]
        for weight, bias in zip(self.weights, self.biases, strict=True):
            num_experts, d_in, d_out = weight.shape
            # relu in place on the matmul's own output (not a view of it: autograd would copy the whole base back)
            if hidden.dim() == 2:  # one input: all experts in one plain matmul, [D_in, E * D_h]
                flat = torch.addmm(bias.reshape(-1), hidden, weight.transpose(0, 1).reshape(d_in, -1))  # [B, E * D_h]
                hidden = flat.relu_().view(len(x), num_experts, d_out).transpose(0, 1).contiguous()  # [E, B, D_h]
            else:
                hidden = torch.baddbmm(bias.unsqueeze(1), hidden, weight).relu_()  # [E, B, D_h]
            hidden = self.dropout(hidden)
        return hidden.transpose(0, 1)  # [B, E, D_exp]


class GradientBalance(nn.Module):
    """How the tasks' gradients on the shared expert outputs are combined (`model.balance`).

    none: summed as they are. norm: task t's gradient is scaled to share_t times the mean of the tasks' gradient norms
    (each norm a running mean over steps; the shares are the tasks' weights over their mean): the tasks pull the shared
    part as hard as their weights say, whatever their loss scales or label counts. Their own towers and gates are
    untouched.
    """

    running_norms: Tensor  # [G] buffers, registered in __init__
    shares: Tensor

    def __init__(self, mode: str, shares: list[float], momentum: float = 0.9) -> None:
        super().__init__()
        self.mode = mode
        self.momentum = momentum
        self.enabled = True  # see `raw_gradients`
        self.register_buffer("running_norms", torch.zeros(len(shares)), persistent=mode == "norm")
        self.register_buffer("shares", torch.tensor(shares) / max(sum(shares) / len(shares), 1e-12), persistent=False)

    @torch.no_grad()
    def forward(self, gate_weights: Tensor, grad: Tensor) -> Tensor:
        """The scale of each gate's gradient.

        Args:
            gate_weights: [B, G, E]. grad: [B, G, D] the gradient on each gate's mixture; gate g's gradient on the
                expert outputs is then gate_weights[:, g, :, None] * grad[:, g, None, :], whose norm is computed
                without building it: |w_b|^2 |g_b|^2 summed over rows b.

        Returns:
            [G] the factor each gate's gradient is multiplied by before the gates' gradients are summed.
        """
        if not self.enabled:
            return torch.ones(grad.shape[1], device=grad.device)
        squares = (gate_weights.float() ** 2).sum(-1) * (grad.float() ** 2).sum(-1)  # [B, G]
        norms = squares.sum(0).sqrt()  # [G]
        seen = norms > 0  # a task without a labelled row in the batch has no gradient and keeps its running norm
        first = seen & (self.running_norms == 0)
        blended = torch.where(first, norms, self.momentum * self.running_norms + (1 - self.momentum) * norms)
        self.running_norms.copy_(torch.where(seen, blended, self.running_norms))
        known = self.running_norms > 0
        target = self.running_norms[known].mean() if known.any() else norms.new_ones(())
        return torch.where(known, self.shares * target / self.running_norms.clamp(min=1e-12), 1.0)


@contextlib.contextmanager
def raw_gradients(model: nn.Module) -> Iterator[None]:
    """Within it, the tasks' gradients on the expert outputs are summed as they are and no running norm moves: for
    gradients taken outside the training backward (the conflict measure, GradNorm), which must leave the step as
    it was."""
    balances = [m for m in model.modules() if isinstance(m, GradientBalance)]
    for balance in balances:
        balance.enabled = False
    try:
        yield
    finally:
        for balance in balances:
            balance.enabled = True


class _BalancedMix(torch.autograd.Function):
    """mix = gate_weights @ expert_out per gate, whose backward combines the gates' gradients on expert_out with a
    GradientBalance instead of summing them."""

    @staticmethod
    def forward(ctx, gate_weights: Tensor, expert_out: Tensor, balance: GradientBalance) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate_weights, expert_out)
        ctx.balance = balance
        return torch.einsum("bge,bed->bgd", gate_weights, expert_out)  # [B, G, D]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor, None]:  # type: ignore[override]
        gate_weights, expert_out = ctx.saved_tensors
        grad_gates = None  # none for a single expert's constant gates
        if ctx.needs_input_grad[0]:
            grad_gates = torch.einsum("bgd,bed->bge", grad, expert_out)  # [B, G, E]: each gate's own, unscaled
        scale = ctx.balance(gate_weights, grad).to(grad.dtype)  # [G]
        grad_experts = torch.einsum("bge,bgd->bed", gate_weights, grad * scale[:, None])  # [B, E, D]
        return grad_gates, grad_experts, None


def mix(gate_weights: Tensor, expert_out: Tensor, balance: GradientBalance | None) -> Tensor:
    """[B, G, E] gate weights, [B, E, D] expert outputs -> [B, G, D] one mixture per gate."""
    if balance is None or balance.mode == "none" or not torch.is_grad_enabled():
        return torch.einsum("bge,bed->bgd", gate_weights, expert_out)
    return _BalancedMix.apply(gate_weights, expert_out, balance)


class MixtureLevel(nn.Module):
    """One level: experts plus G softmax gates (T task gates, and a shared gate if `shared_gate`).

    Expert order: the `num_shared` shared experts, then `num_task_experts` per task in task order.
    """

    gate_mask: Tensor  # [G, E] buffers, registered in __init__
    owner: Tensor  # [E]

    def __init__(
        self, in_dim: int, num_tasks: int, num_shared: int, num_task_experts: int, cfg: ModelConfig, shared_gate: bool
    ) -> None:
        super().__init__()
        num_experts = num_shared + num_tasks * num_task_experts
        num_gates = num_tasks + int(shared_gate)
        owner = [num_tasks] * num_shared + [t for t in range(num_tasks) for _ in range(num_task_experts)]
        mask = torch.zeros(num_gates, num_experts, dtype=torch.bool)
        for gate in range(num_gates):
            mask[gate] = torch.tensor([o in (gate, num_tasks) or gate == num_tasks for o in owner])
        self.register_buffer("gate_mask", mask, persistent=False)  # [G, E]
        self.register_buffer("owner", torch.tensor(owner), persistent=False)  # [E] input row of each expert
        self.experts = ExpertStack(num_experts, in_dim, cfg.expert_dims, cfg.dropout)
        # [D_in, G, E]: one matmul for all gates, and a contiguous gradient (DDP copies strided ones into its buckets);
        # none over a single expert (shared_bottom), where every gate is 1
        self.gates = nn.Parameter(torch.randn(in_dim, num_gates, num_experts) * 0.01) if num_experts > 1 else None
        self.num_gates = num_gates
        self.gate_dropout = cfg.gate_dropout
        self.balance: GradientBalance | None = None  # set on the last level by Mixture

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Mix the experts.

        Args:
            inputs: [B, D_in] (every expert and gate reads the same input) or [B, T + 1, D_in] (row t feeds
                task t's experts and gate, the last row the shared experts and the shared gate).

        Returns:
            ([B, G, D_exp] one mixture per gate, [B, G, E] gate weights, zero outside each gate's experts).
        """
        expert_out = self.experts(inputs if inputs.dim() == 2 else inputs[:, self.owner])  # [B, E, D_exp]
        if self.gates is None:
            gate_weights = torch.ones(len(inputs), self.num_gates, 1, device=inputs.device)  # [B, G, 1]
            return mix(gate_weights, expert_out, self.balance), gate_weights
        if inputs.dim() == 2:
            logits = (inputs @ self.gates.flatten(1)).view(-1, *self.gates.shape[1:])  # [B, G, E]
        else:
            logits = torch.einsum("bgi,ige->bge", inputs[:, : self.num_gates], self.gates)  # [B, G, E]
        routable = self.gate_mask  # [G, E]
        if self.training and self.gate_dropout > 0:  # drop experts from gates, so no gate can rest on one expert
            kept = routable & (torch.rand(logits.shape, device=logits.device) >= self.gate_dropout)  # [B, G, E]
            routable = torch.where(kept.any(-1, keepdim=True), kept, routable)  # a gate left with none keeps all
        gate_weights = logits.masked_fill(~routable, float("-inf")).softmax(-1)  # [B, G, E]
        return mix(gate_weights, expert_out, self.balance), gate_weights  # [B, G, D_exp]


class Mixture(nn.Module):
    """The configured mixture. forward: x [B, D_in] -> ([B, T, D_exp] one input per tower, [B, T, E] gate weights)."""

    def __init__(self, in_dim: int, num_tasks: int, cfg: ModelConfig, shares: list[float] | None = None) -> None:
        """shares: each task's share of the shared gradient under `model.balance = "norm"` (default: equal)."""
        super().__init__()
        if cfg.arch == "shared_bottom":
            shape = [(1, 0)]
        elif cfg.arch == "mmoe":
            shape = [(cfg.num_experts, 0)]
        else:
            shape = [(cfg.num_experts, cfg.num_task_experts)] * cfg.num_levels
        self.levels = nn.ModuleList(
            MixtureLevel(
                in_dim if i == 0 else cfg.expert_dims[-1], num_tasks, shared, task, cfg, shared_gate=i < len(shape) - 1
            )
            for i, (shared, task) in enumerate(shape)
        )
        last = cast(MixtureLevel, self.levels[-1])
        last.balance = GradientBalance(cfg.balance, shares or [1.0] * num_tasks)
        self.num_tasks = num_tasks
        self.expert_names = [f"shared{i}" for i in range(shape[-1][0])] + [
            f"task{t}.{i}" for t in range(num_tasks) for i in range(shape[-1][1])
        ]
        self.out_dim = cfg.expert_dims[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = x  # [B, D_in], then [B, G, D_exp]
        for level in self.levels:
            hidden, gate_weights = level(hidden)  # [B, G, D_exp], [B, G, E]
        return hidden[:, : self.num_tasks], gate_weights[:, : self.num_tasks]
