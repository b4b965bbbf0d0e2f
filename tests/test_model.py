import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches
from recsys_mtl.errors import InputError
from recsys_mtl.metrics import auc
from recsys_mtl.model.embeddings import TEXT_TABLE_PREFIX, read_table, split_rows
from recsys_mtl.model.experts import raw_gradients
from recsys_mtl.model.ranker import autocast
from recsys_mtl.step import CONFLICT_PREFIX, Trainer, build_trainer, gradient_cosines, predict_batch, train_step
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def _trainer(text_dataset: Path, tiny_bert: Path, **sections: dict) -> tuple[Trainer, Dataset]:
    dataset = Dataset(text_dataset)
    return build_trainer(tiny_config(text_dataset, tiny_bert, **sections), dataset, CPU), dataset


def _batch(dataset: Dataset, size: int = 512, split: str = "train"):
    return next(read_batches(dataset, split, size, ReadOrder(shuffle=True, seed=3)))


def test_ranker_outputs_a_logit_per_task_and_gates_that_sum_to_one(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert)
    output = trainer.model(_batch(dataset, 64))
    assert list(output.logits) == ["ctr", "cvr", "rating", "reads"]
    assert all(v.shape == (64,) for v in output.logits.values())
    assert output.gate_weights.shape == (64, 4, 3)
    torch.testing.assert_close(output.gate_weights.sum(-1), torch.ones(64, 4))
    predictions = predict_batch(trainer, _batch(dataset, 64))
    torch.testing.assert_close(predictions["cvr_joint"], predictions["ctr"] * predictions["cvr"])
    assert ((predictions["rating"] >= 1) & (predictions["rating"] <= 5)).all()
    assert (predictions["reads"] > 0).all()


def test_pooled_inputs_are_each_features_mean_of_its_table_rows(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert)
    model, batch = trainer.sharded.module, _batch(dataset, 64)
    with torch.no_grad():
        inputs = model.inputs(batch)
    features = {f.name: f for f in dataset.schema.sparse_features}
    expected = []
    for name in model.sparse_names:
        weights = read_table(model, features[name].table)  # [rows, D_emb + T * D_own]
        rows = [batch.sparse[name].values()[o:e] for o, e in itertools.pairwise(batch.sparse[name].offsets().tolist())]
        assert features[name].kind == "id" or (any(len(r) > 1 for r in rows) and any(len(r) == 0 for r in rows))
        expected.append(
            torch.stack([weights[r].mean(0) if len(r) else weights.new_zeros(weights.shape[1]) for r in rows])
        )
    own_width = model.own_width
    assert own_width == 8 * len(trainer.specs)
    own_expected = [e[:, -own_width:] for e in expected]
    expected = [e[:, :-own_width] for e in expected]
    torch.testing.assert_close(inputs.pooled, torch.cat(expected, 1))
    torch.testing.assert_close(inputs.own, torch.stack(own_expected, 1))


def test_split_rows_is_the_per_feature_slicing_and_its_gradient_checks() -> None:
    runs, own_width, rows = [(3, 2), (2, 3)], 4, 5  # 2 features 3 wide, 3 features 2 wide, 4 own columns each
    dims = [dim for dim, count in runs for _ in range(count)]
    values = torch.randn(rows, sum(dims) + 5 * own_width, dtype=torch.float64, requires_grad=True)
    scales = torch.rand(rows, 5, 1, dtype=torch.float64) + 0.5
    shared, own = split_rows(values, scales, runs, own_width)
    features = (values * scales.repeat_interleave(torch.tensor([d + own_width for d in dims]), 1)[:, :, 0]).split(
        [d + own_width for d in dims], 1
    )
    torch.testing.assert_close(shared, torch.cat([f[:, :d] for f, d in zip(features, dims, strict=True)], 1))
    torch.testing.assert_close(own, torch.stack([f[:, d:] for f, d in zip(features, dims, strict=True)], 1))
    assert torch.autograd.gradcheck(lambda v: split_rows(v, scales, runs, own_width), (values,))


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, train={"freeze": ["text_projection"]})
    text_before = read_table(trainer.model, TEXT_TABLE_PREFIX + "item_title")
    train_step(trainer, _batch(dataset), step=0)
    trainable = dict(trainer.sharded.dense_optimizer.params)
    assert trainable
    assert not any("text_projections" in name or "text_ebc" in name for name in trainable)
    for name, param in trainable.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    frozen = [p for name, p in trainer.model.named_parameters() if "text_projections" in name]
    assert frozen
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    torch.testing.assert_close(read_table(trainer.model, TEXT_TABLE_PREFIX + "item_title"), text_before)


def test_fused_update_changes_only_the_embedding_rows_of_the_batch(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert)
    batch = _batch(dataset, 64)
    before = read_table(trainer.model, "user")
    train_step(trainer, batch, step=0)
    changed = (read_table(trainer.model, "user") != before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == sorted(set(batch.sparse["user_id"].values().tolist()))


def test_a_tasks_own_tables_learn_from_that_task_alone(text_dataset: Path, tiny_bert: Path) -> None:
    # without gate dropout: a row left with one expert that its ReLUs shut off has no gradient into its embeddings
    model = {"task_embedding_dim": 8, "gate_dropout": 0.0}
    trainer, dataset = _trainer(text_dataset, tiny_bert, model=model, train={"schedule": "alternating"})
    batch = _batch(dataset, 64)
    before = read_table(trainer.model, "user")
    dim = Dataset(text_dataset).schema.table("user").embedding_dim
    assert before.shape[1] == dim + 8 * len(trainer.specs)  # each row: [shared | T x D_own]
    train_step(trainer, batch, step=1)  # step 1 trains ctr alone
    after = read_table(trainer.model, "user")
    users = sorted(set(batch.sparse["user_id"].values().tolist()))
    assert (after[:, :dim] != before[:, :dim]).any(dim=1).nonzero().flatten().tolist() == users
    columns = {spec.name: slice(dim + 8 * t, dim + 8 * (t + 1)) for t, spec in enumerate(trainer.specs)}
    assert (after[:, columns["ctr"]] != before[:, columns["ctr"]]).any(dim=1).nonzero().flatten().tolist() == users
    assert torch.equal(after[:, columns["rating"]], before[:, columns["rating"]])


def _steps(trainer: Trainer, dataset: Dataset, num_steps: int) -> None:
    for step, batch in enumerate(read_batches(dataset, "train", 512)):
        if step == num_steps:
            break
        train_step(trainer, batch, step)


def test_uncertainty_weights_move(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, loss={"weighting": "uncertainty"})
    _steps(trainer, dataset, 6)
    log_vars = trainer.loss.log_vars.detach()
    assert (log_vars.abs() > 1e-3).all()
    assert not torch.allclose(log_vars[0], log_vars[2])


def test_alternating_step_trains_only_its_task_tower(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, train={"schedule": "alternating"})
    train_step(trainer, _batch(dataset), step=1)  # step 1 trains ctr alone
    towers = trainer.sharded.module.towers
    assert towers["ctr"].mlp[0].weight.grad.abs().sum() > 0
    assert towers["rating"].mlp[0].weight.grad.abs().sum() == 0


def _train_and_score(trainer: Trainer, dataset: Dataset, epochs: int) -> float:
    step = 0
    for epoch in range(epochs):
        for batch in read_batches(dataset, "train", 256, ReadOrder(shuffle=True, epoch=epoch)):
            train_step(trainer, batch, step)
            step += 1
    scores, labels = [], []
    for batch in read_batches(dataset, "test", 4096):
        scores.append(predict_batch(trainer, batch)["ctr"])
        labels.append(batch.labels["ctr"])
    return auc(torch.cat(labels), torch.cat(scores))


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "mmoe"},
        {"arch": "mmoe", "task_embedding_dim": 0},
        pytest.param({"arch": "ple"}, marks=pytest.mark.slow),
        pytest.param({"arch": "shared_bottom"}, marks=pytest.mark.slow),
    ],
)
def test_training_raises_ctr_auc_on_held_out_days(text_dataset: Path, tiny_bert: Path, model: dict) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, model=model)
    # ~250 steps on 21k rows; the oracle reaches about 0.8 on these held-out days, which hold cold items
    assert _train_and_score(trainer, dataset, epochs=3) > 0.6


def test_bert_finetuning_trains_only_its_last_layers(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, text={"finetune_layers": 1})
    train_step(trainer, _batch(dataset, 128), step=0)
    bert = trainer.sharded.module.text_finetuner.bert
    assert all(p.grad is None for p in bert.encoder.layer[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bert.encoder.layer[1].attention.parameters())
    assert trainer.sharded.module.text_ebc is None


@pytest.mark.parametrize(
    "tasks",
    [[{"name": "ctr"}], [{"name": "rating"}], [{"name": "ctr"}, {"name": "cvr", "after": "ctr", "esmm": False}]],
)
def test_any_subset_of_tasks_trains(text_dataset: Path, tiny_bert: Path, tasks: list[dict]) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, tasks=tasks)
    metrics = train_step(trainer, _batch(dataset), step=0)
    assert sorted(metrics) == sorted(["loss", *(f"{t['name']}/loss" for t in tasks)])
    assert torch.isfinite(torch.tensor(list(metrics.values()))).all()


def test_gradnorm_moves_task_weights_and_keeps_their_sum(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, loss={"weighting": "gradnorm"})
    _steps(trainer, dataset, 5)
    weights = trainer.loss.gradnorm_weights
    assert weights.sum().item() == pytest.approx(4.0)
    assert not torch.allclose(weights, torch.ones(4))


def test_bf16_autocast_step_keeps_fp32_losses(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, train={"bf16": True}, loss={"reduction": "sample"})
    batch = _batch(dataset, 256)
    metrics = train_step(trainer, batch, step=0)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert all(v.dtype == torch.float32 for v in predict_batch(trainer, batch).values())
    with torch.no_grad(), autocast(trainer.cfg, trainer.device):
        logits = trainer.model(batch.to(trainer.device)).logits
    assert all(v.dtype == torch.float32 for v in logits.values())  # the towers run in fp32 under bf16 autocast


def test_sharding_per_table_follows_the_config(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, sharding={"item": "column_wise", "city": "data_parallel"})
    plan = str(trainer.sharded.plan)
    rows: dict[str, str] = {}
    for line in plan.splitlines():  # the first table of the plan: sharding type and kernel per table
        if "|" in line:
            rows.setdefault(line.split("|")[0].strip(), line)
    assert "column_wise" in rows["item"]
    assert "fused" in rows["item"]
    assert "data_parallel" in rows["city"]
    assert "table_wise" in rows["user"]
    before = read_table(trainer.model, "city")
    train_step(trainer, _batch(dataset), step=0)
    assert (read_table(trainer.model, "city") != before).any()  # data-parallel tables are trained too
    with pytest.raises(InputError, match="sharding names unknown tables"):
        _trainer(text_dataset, tiny_bert, sharding={"nope": "table_wise"})
    with pytest.raises(ValueError, match=r"uvm_caching = \['item'\] needs --device cuda"):
        _trainer(text_dataset, tiny_bert, uvm_caching=["item"])


@pytest.mark.parametrize(
    ("norm", "kind"), [("batch", torch.nn.BatchNorm1d), ("layer", torch.nn.LayerNorm), ("none", torch.nn.Identity)]
)
def test_input_norm_follows_the_config(text_dataset: Path, tiny_bert: Path, norm: str, kind: type) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert, model={"input_norm": norm})
    assert isinstance(trainer.sharded.module.input_norm, kind)
    assert train_step(trainer, _batch(dataset), step=0)["loss"] > 0


def _conflicts(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(CONFLICT_PREFIX)}


def test_gradient_cosines_of_hand_made_gradients() -> None:
    grads = {  # two parameters each: a [1, 2] matrix and a [1] bias
        "ctr": [torch.tensor([[1.0, 0.0]]), torch.tensor([2.0])],
        "same": [torch.tensor([[3.0, 0.0]]), torch.tensor([6.0])],  # ctr x 3: the same direction
        "opposite": [torch.tensor([[-0.5, 0.0]]), torch.tensor([-1.0])],
        "orthogonal": [torch.tensor([[0.0, 4.0]]), torch.tensor([0.0])],
    }
    cosines = gradient_cosines(grads)
    expected = {
        "conflict/ctr~same": 1.0,
        "conflict/ctr~opposite": -1.0,
        "conflict/ctr~orthogonal": 0.0,
        "conflict/same~opposite": -1.0,
        "conflict/same~orthogonal": 0.0,
        "conflict/opposite~orthogonal": 0.0,
        "conflict/mean": -1 / 6,
    }
    assert list(cosines) == list(expected)
    assert cosines == pytest.approx(expected, abs=1e-12)
    # 45 degrees: (1, 0, 0) against (1, 1, 0)
    diagonal = gradient_cosines(
        {"a": [torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])], "b": [torch.ones(1, 2), torch.zeros(1)]}
    )
    assert diagonal == pytest.approx({"conflict/a~b": 1 / math.sqrt(2), "conflict/mean": 1 / math.sqrt(2)})


def test_a_task_without_a_gradient_is_left_out_of_the_cosines() -> None:
    grads = {"ctr": [torch.tensor([1.0, 0.0])], "cvr": [torch.zeros(2)], "rating": [torch.tensor([1.0, 1.0])]}
    assert gradient_cosines(grads) == pytest.approx(
        {"conflict/ctr~rating": 1 / math.sqrt(2), "conflict/mean": 1 / math.sqrt(2)}
    )
    assert gradient_cosines({"ctr": [torch.tensor([1.0, 0.0])], "cvr": [torch.zeros(2)]}) == {}


@pytest.mark.parametrize(("weighting", "balance"), [("fixed", "none"), ("gradnorm", "none"), ("fixed", "norm")])
def test_measuring_the_conflict_leaves_the_steps_bit_identical(
    text_dataset: Path, tiny_bert: Path, weighting: str, balance: str
) -> None:
    runs = []
    for measure in (False, True):
        trainer, dataset = _trainer(
            text_dataset,
            tiny_bert,
            loss={"weighting": weighting},
            model={"balance": balance},
            train={"id_dropout": 0.1},
        )
        batches = itertools.islice(read_batches(dataset, "train", 512, ReadOrder(shuffle=True, seed=3)), 3)
        metrics = [train_step(trainer, b, step, measure_conflict=measure) for step, b in enumerate(batches)]
        runs.append((trainer, metrics))
    (plain, plain_metrics), (measured, measured_metrics) = runs
    assert all(_conflicts(m) == {} for m in plain_metrics)
    assert all(len(_conflicts(m)) == 6 + 1 for m in measured_metrics)  # 4 tasks: 6 pairs and the mean
    assert [{k: v for k, v in m.items() if k not in _conflicts(m)} for m in measured_metrics] == plain_metrics
    # the same state to the bit: one backward into the fused tables per step, the same dense and GradNorm updates
    plain_state, measured_state = _local_state(plain), _local_state(measured)
    assert list(plain_state) == list(measured_state)
    assert any("embedding_bags.user.weight" in name for name in plain_state)
    for name, value in plain_state.items():
        assert torch.equal(value, measured_state[name]), name


def _local_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of the model (this rank's shards of the tables), the loss and both optimizers, by a flat name."""
    tree = {
        "model": trainer.model.state_dict(),
        "loss": trainer.loss.state_dict(),
        "fused_optimizer": trainer.model.fused_optimizer.state_dict()["state"],
        "dense_optimizer": trainer.sharded.dense_optimizer.state_dict()["state"],
    }
    flat: dict[str, torch.Tensor] = {}

    def visit(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                visit(f"{prefix}.{key}", child)
        elif isinstance(value, ShardedTensor):
            flat[prefix] = torch.cat([shard.tensor for shard in value.local_shards()])
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    visit("", tree)
    return flat


def test_the_conflict_is_the_cosine_of_the_task_gradients_on_the_last_shared_layer(
    text_dataset: Path, tiny_bert: Path
) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert)
    batch = _batch(dataset)
    conflicts = _conflicts(train_step(trainer, batch, step=0, measure_conflict=True))
    # the reference: a fresh copy of the model, one plain backward per task into .grad of the shared weights
    reference, _ = _trainer(text_dataset, tiny_bert)
    ranker = reference.sharded.module  # outside the DDP wrapper: several backward passes of one forward
    output = ranker(batch)
    _, task_means = reference.loss(output.logits, batch.labels, batch.masks, torch.ones(4))
    (shared,) = ranker.shared_parameters()
    grads = []
    with raw_gradients(ranker):  # each task's own gradient, as the tasks' gradients are before balancing
        for mean in task_means:
            shared.grad = None
            mean.backward(retain_graph=True)
            grads.append(shared.grad.flatten().clone())
    names = ["ctr", "cvr", "rating", "reads"]
    expected = {
        f"conflict/{names[i]}~{names[j]}": F.cosine_similarity(grads[i], grads[j], dim=0).item()
        for i, j in itertools.combinations(range(4), 2)
    }
    expected["conflict/mean"] = sum(expected.values()) / 6
    assert conflicts == pytest.approx(expected, abs=1e-5)
    assert -1 < conflicts["conflict/mean"] < 1


def test_a_task_without_labelled_rows_is_left_out_of_the_conflict(text_dataset: Path, tiny_bert: Path) -> None:
    trainer, dataset = _trainer(text_dataset, tiny_bert)
    batch = _batch(dataset)
    unlabelled = dataclasses.replace(batch, masks={**batch.masks, "rating": torch.zeros_like(batch.masks["rating"])})
    conflicts = _conflicts(train_step(trainer, unlabelled, step=0, measure_conflict=True))
    assert list(conflicts) == ["conflict/ctr~cvr", "conflict/ctr~reads", "conflict/cvr~reads", "conflict/mean"]
