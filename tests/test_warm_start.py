"""`train --init-from`: a run starts from a trained run, on its dataset or on the next period's (tables grown)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from data_prep.prepare import prepare
from data_prep.synth import generate_world
from recsys_mtl.checkpoint import load_checkpoint, trained_checkpoint
from recsys_mtl.config import Config, TextConfig, load_config
from recsys_mtl.data.description import read_description
from recsys_mtl.data.encode import DESCRIPTION_FILE
from recsys_mtl.data.loader import Dataset, ReadOrder, read_batches
from recsys_mtl.errors import InputError
from recsys_mtl.model.embeddings import read_table
from recsys_mtl.step import Trainer, build_trainer, init_optimizer_state, predict_batch, training_state
from recsys_mtl.text import encode_dataset
from recsys_mtl.train import train
from recsys_mtl.warm_start import parent_checkpoint, warm_start
from tests.conftest import TINY_WORLD, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def parent_run(text_dataset: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run on the tiny world (task weights learned by uncertainty weighting)."""
    run = tmp_path_factory.mktemp("parent") / "run"
    cfg = tiny_config(
        text_dataset, tiny_bert, train={"max_steps": 30, "eval_every": 15}, loss={"weighting": "uncertainty"}
    )
    train(cfg, run, CPU, progress=False)
    return run


@pytest.fixture(scope="module")
def next_dataset(text_dataset: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The next period: a world with more users and items (new ids), prepared from the tiny dataset."""
    folder = tmp_path_factory.mktemp("day2")
    world = dataclasses.replace(TINY_WORLD, users=500, items=360, seed=8, impressions=12_000)
    raw = generate_world(folder / "raw", world, progress=False)
    out = folder / "dataset"
    prepare(raw, out, read_description(text_dataset / DESCRIPTION_FILE), parent=text_dataset)
    encode_dataset(out, TextConfig(model=str(tiny_bert)), CPU, progress=False)
    return out


def _loaded(cfg: Config, checkpoint: Path) -> Trainer:
    """A trainer with `checkpoint` loaded as a resume loads it."""
    trainer = build_trainer(cfg, Dataset(cfg.dataset), CPU)
    init_optimizer_state(trainer)
    load_checkpoint(checkpoint, training_state(trainer))
    return trainer


def _child(parent: Path, dataset: Path) -> Trainer:
    cfg = load_config(parent / "config.toml")
    cfg = dataclasses.replace(cfg, dataset=str(dataset), train=dataclasses.replace(cfg.train, init_from=str(parent)))
    trainer = build_trainer(cfg, Dataset(dataset), CPU)
    warm_start(trainer, parent_checkpoint(parent, cfg, Dataset(dataset).schema))
    return trainer


def test_a_warm_start_predicts_exactly_as_its_parent(parent_run: Path, text_dataset: Path) -> None:
    parent = _loaded(load_config(parent_run / "config.toml"), trained_checkpoint(parent_run))
    child = _child(parent_run, text_dataset)
    batch = next(read_batches(Dataset(text_dataset), "valid", 1024, ReadOrder()))
    expected, got = predict_batch(parent, batch), predict_batch(child, batch)
    for task, values in expected.items():
        assert torch.equal(values, got[task]), task
    torch.testing.assert_close(child.loss.log_vars, parent.loss.log_vars, rtol=0, atol=0)  # the task weights too
    assert child.loss.log_vars.abs().sum() > 0


def test_grown_tables_keep_the_old_rows_and_start_new_ones_as_the_unknown_row(
    parent_run: Path, next_dataset: Path, text_dataset: Path
) -> None:
    old, new = Dataset(text_dataset).schema, Dataset(next_dataset).schema
    grown = [t.name for t in new.tables if t.num_embeddings > old.table(t.name).num_embeddings]
    assert {"user", "item"} <= set(grown)
    parent = _loaded(load_config(parent_run / "config.toml"), trained_checkpoint(parent_run))
    child = _child(parent_run, next_dataset)
    for name in grown:
        rows = old.table(name).num_embeddings
        before, after = read_table(parent.model, name), read_table(child.model, name)
        assert torch.equal(after[:rows], before)  # bit for bit
        assert torch.equal(after[rows:], before[:1].expand(len(after) - rows, -1))
    momentum = {
        name: state
        for name, state in child.model.fused_optimizer.state_dict()["state"].items()
        if "embedding_bags.user.weight" in name
    }
    (state,) = momentum.values()
    (accumulator,) = list(state.values())
    values = torch.cat([s.tensor for s in accumulator.local_shards()])
    rows = old.table("user").num_embeddings
    assert (values[0] > 0).any()
    assert torch.equal(values[rows:], values[:1].expand(len(values) - rows, *values.shape[1:]))  # as the unknown row's


def test_a_run_records_its_parent_and_refuses_one_it_cannot_start_from(
    parent_run: Path, next_dataset: Path, text_dataset: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        next_dataset,
        tiny_bert,
        train={"max_steps": 10, "eval_every": 10, "init_from": str(parent_run)},
        loss={"weighting": "uncertainty"},
    )
    result = train(cfg, tmp_path / "child", CPU, progress=False)
    assert load_config(tmp_path / "child" / "config.toml").train.init_from == str(parent_run)
    assert result.valid[-1]["ctr/auc"] > 0.55  # another world (seed 8): 10 steps from a 30-step parent
    valid = [json.loads(line) for line in (tmp_path / "child" / "metrics.jsonl").read_text().splitlines()]
    assert {"weight/ctr", "weight/rating"} <= set(valid[-1])  # the task weights in use, logged

    other = tiny_config(next_dataset, tiny_bert, model={"num_experts": 2}, loss={"weighting": "uncertainty"})
    with pytest.raises(InputError, match=r"model\.num_experts: parent 3, now 2"):
        parent_checkpoint(parent_run, other, Dataset(next_dataset).schema)
    unrelated = tmp_path / "unrelated"  # the same raw rows prepared afresh: its ids may mean other rows
    prepare(Path(Dataset(next_dataset).schema.source), unrelated, read_description(text_dataset / DESCRIPTION_FILE))
    with pytest.raises(InputError, match="nor prepared from it"):
        parent_checkpoint(parent_run, dataclasses.replace(cfg, dataset=str(unrelated)), Dataset(unrelated).schema)
    shrunk = tiny_config(text_dataset, tiny_bert, loss={"weighting": "uncertainty"})
    with pytest.raises(
        InputError, match=r"tables\.user: parent \[\d+, \d+\], now \[\d+, \d+\] \(a table may only grow"
    ):
        parent_checkpoint(tmp_path / "child", shrunk, Dataset(text_dataset).schema)
