import pytest
import torch
import torch.nn.functional as F

from recsys_mtl.config import ModelConfig
from recsys_mtl.model.experts import ExpertStack, GradientBalance, Mixture
from recsys_mtl.model.interaction import CrossNet

NUM_TASKS, IN_DIM, BATCH = 3, 12, 8


def _mixture(arch: str) -> Mixture:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, num_experts=4, num_task_experts=2, num_levels=2, expert_dims=(16, 6), gate_dropout=0.0)
    return Mixture(IN_DIM, NUM_TASKS, cfg)


@pytest.mark.parametrize(("arch", "num_experts"), [("shared_bottom", 1), ("mmoe", 4), ("ple", 4 + NUM_TASKS * 2)])
def test_mixture_shapes_and_gates_sum_to_one(arch: str, num_experts: int) -> None:
    task_inputs, gates = _mixture(arch)(torch.randn(BATCH, IN_DIM))
    assert task_inputs.shape == (BATCH, NUM_TASKS, 6)
    assert gates.shape == (BATCH, NUM_TASKS, num_experts)
    torch.testing.assert_close(gates.sum(-1), torch.ones(BATCH, NUM_TASKS))
    assert (gates >= 0).all()


def test_ple_task_gates_ignore_other_tasks_experts() -> None:
    _, gates = _mixture("ple")(torch.randn(BATCH, IN_DIM))  # experts: 4 shared, then 2 per task
    for task in range(NUM_TASKS):
        own = [*range(4), 4 + 2 * task, 5 + 2 * task]
        others = [e for e in range(4 + 2 * NUM_TASKS) if e not in own]
        assert (gates[:, task, others] == 0).all()
        assert (gates[:, task, own] > 0).all()


@pytest.mark.parametrize("per_expert_input", [False, True])
def test_stacked_experts_equal_a_loop_over_experts(per_expert_input: bool) -> None:
    torch.manual_seed(1)
    stack = ExpertStack(num_experts=5, in_dim=7, dims=(11, 3))
    x = torch.randn(BATCH, 5, 7) if per_expert_input else torch.randn(BATCH, 7)
    looped = []
    for e in range(5):
        hidden = x[:, e] if per_expert_input else x
        for weight, bias in zip(stack.weights, stack.biases, strict=True):
            hidden = torch.relu(F.linear(hidden, weight[e].T, bias[e]))
        looped.append(hidden)
    torch.testing.assert_close(stack(x), torch.stack(looped, dim=1))


def test_mmoe_equals_gate_weighted_sum_of_its_experts() -> None:
    mixture = _mixture("mmoe")
    x = torch.randn(BATCH, IN_DIM)
    level = mixture.levels[0]
    expert_out = level.experts(x)  # [B, E, D]
    gates = torch.softmax(torch.einsum("bi,ige->bge", x, level.gates), -1)
    expected = torch.stack([(gates[:, t, :, None] * expert_out).sum(1) for t in range(NUM_TASKS)], dim=1)
    torch.testing.assert_close(mixture(x)[0], expected)


def test_shared_bottom_gives_every_task_the_expert_output_and_has_no_gate_parameters() -> None:
    mixture, x = _mixture("shared_bottom"), torch.randn(BATCH, IN_DIM)
    task_inputs, gates = mixture(x)
    assert (gates == 1).all()
    expert_out = mixture.levels[0].experts(x)[:, 0]  # [B, D]
    for task in range(NUM_TASKS):
        torch.testing.assert_close(task_inputs[:, task], expert_out, rtol=0, atol=0)
    assert not any("gates" in name for name, _ in mixture.named_parameters())
    task_inputs.sum().backward()  # the tasks' gradients summed on the expert: every parameter has one
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixture.parameters())


def test_gate_dropout_drops_experts_in_training_only() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mmoe", num_experts=4, expert_dims=(16, 6), gate_dropout=0.5)
    mixture, x = Mixture(IN_DIM, NUM_TASKS, cfg), torch.randn(256, IN_DIM)
    _, gates = mixture(x)  # training mode
    torch.testing.assert_close(gates.sum(-1), torch.ones(256, NUM_TASKS))
    dropped = (gates == 0).float().mean().item()
    assert 0.4 < dropped < 0.6  # half the experts, less the gates that would have lost every one (1/16)
    mixture.eval()
    _, gates = mixture(x)
    assert (gates > 0).all()  # evaluation routes to every expert
    plain = Mixture(IN_DIM, NUM_TASKS, ModelConfig(arch="mmoe", num_experts=4, expert_dims=(16, 6)))
    plain.load_state_dict(mixture.state_dict())
    plain.eval()
    torch.testing.assert_close(plain(x)[1], gates)


def _expert_grads(balance: str, weights: tuple[float, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of every mixture parameter, and of the expert outputs, for a weighted sum of the tasks' outputs."""
    torch.manual_seed(0)
    mixture = Mixture(IN_DIM, NUM_TASKS, ModelConfig(arch="mmoe", num_experts=4, expert_dims=(16, 6), balance=balance))
    task_inputs, _ = mixture(torch.randn(BATCH, IN_DIM))
    sum(w * task_inputs[:, t].sum() for t, w in enumerate(weights)).backward()
    return [p.grad for p in mixture.parameters()], mixture.levels[0].balance.running_norms


def test_balance_norm_rescales_only_the_shared_part_and_ignores_loss_scales() -> None:
    plain, _ = _expert_grads("none", (1.0, 10.0, 100.0))
    balanced, norms = _expert_grads("norm", (1.0, 10.0, 100.0))
    torch.testing.assert_close(balanced[0], plain[0])  # the gates (task-specific) keep their gradients
    assert not torch.allclose(balanced[1], plain[1])  # the experts' sum is rebalanced
    # each task pulls the experts as hard as the others: the tasks' loss scales no longer change the direction
    unscaled, unscaled_norms = _expert_grads("norm", (1.0, 1.0, 1.0))
    torch.testing.assert_close(norms, unscaled_norms * torch.tensor([1.0, 10.0, 100.0]))  # first step: as seen
    direction = [torch.cat([g.flatten() for g in grads[1:]]) for grads in (balanced, unscaled)]
    torch.testing.assert_close(direction[0] / direction[0].norm(), direction[1] / direction[1].norm())


def test_balance_norm_gives_each_task_its_share_of_the_mean_norm() -> None:
    gate_weights = torch.ones(1, 2, 1)  # [B=1, G=2, E=1]
    grad = torch.tensor([[[2.0, 0.0], [0.0, 4.0]]])  # [B, G, D=2]: norms 2 and 4
    balance = GradientBalance("norm", [1.0, 3.0])  # shares 0.5 and 1.5 of the mean norm 3
    torch.testing.assert_close(balance(gate_weights, grad), torch.tensor([0.75, 1.125]))  # 0.5 * 3 / 2, 1.5 * 3 / 4
    torch.testing.assert_close(balance.running_norms, torch.tensor([2.0, 4.0]))
    balance(gate_weights, grad * torch.tensor([1.0, 0.0])[:, None])  # task 1 without labels this step
    torch.testing.assert_close(balance.running_norms, torch.tensor([2.0, 4.0]))  # it keeps its running norm
    # the norm of a gate's gradient on the expert outputs, computed without building it
    weights, grads = torch.rand(5, 2, 3), torch.randn(5, 2, 4)
    fresh = GradientBalance("norm", [1.0, 1.0])
    fresh(weights, grads)
    built = weights[..., None] * grads[:, :, None, :]  # [B, G, E, D]
    torch.testing.assert_close(fresh.running_norms, built.transpose(0, 1).flatten(1).norm(dim=1))


def test_cross_layers_follow_the_formula_and_its_gradients_and_run_in_the_autocast_dtype() -> None:
    torch.manual_seed(0)
    cross, x0 = CrossNet(IN_DIM, 2), torch.randn(BATCH, IN_DIM, requires_grad=True)
    for layer in cross.layers:
        torch.nn.init.normal_(layer.bias)
    x = x0
    for layer in cross.layers:  # DCN-v2: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l
        x = x0 * (x @ layer.weight.T + layer.bias) + x
    out, grad = cross(x0), torch.randn(BATCH, IN_DIM)
    torch.testing.assert_close(out, x)
    inputs = [x0, *cross.parameters()]
    for ours, formula in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(x, inputs, grad), strict=True):
        torch.testing.assert_close(ours, formula)
    x, x0 = x.detach(), x0.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = cross(x0)
    assert low.dtype == torch.bfloat16  # one cast of x_0, every layer in bf16
    torch.testing.assert_close(low.float(), x, rtol=0.05, atol=0.05)


def test_low_rank_cross_layers_equal_full_layers_of_their_product() -> None:
    torch.manual_seed(0)
    low, full, x0 = CrossNet(IN_DIM, 2, rank=3), CrossNet(IN_DIM, 2), torch.randn(BATCH, IN_DIM)
    with torch.no_grad():
        for low_layer, full_layer in zip(low.layers, full.layers, strict=True):
            down, up = low_layer  # W = U V: V [3, D_in], U [D_in, 3]
            torch.nn.init.normal_(up.bias)
            full_layer.weight.copy_(up.weight @ down.weight)
            full_layer.bias.copy_(up.bias)
    assert sum(p.numel() for p in low.parameters()) == 2 * (2 * 3 * IN_DIM + IN_DIM)
    torch.testing.assert_close(low(x0), full(x0))
