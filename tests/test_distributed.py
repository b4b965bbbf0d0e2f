"""The process group and the sharding plan; two ranks under torchrun on CPU (gloo) against one rank, on the tiny world
(slow: two trainer processes)."""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.distributed as dist

from recsys_mtl import distributed
from recsys_mtl.config import load_config
from recsys_mtl.data.schema import Schema
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.model.embeddings import TEXT_TABLE_PREFIX
from recsys_mtl.run import build_ranker
from recsys_mtl.score import score
from recsys_mtl.train import train
from tests.conftest import tiny_config

CPU = torch.device("cpu")

CONFIG = """dataset = "{dataset}"
tasks = [{{ name = "ctr" }}, {{ name = "cvr", after = "ctr" }}, {{ name = "rating" }}, {{ name = "reads" }}]
[text]
model = "{bert}"
[model]
expert_dims = [32, 16]
tower_dims = [8]
text_dim = 8
num_experts = 3
[train]
batch_size = 256
epochs = 2
"""


def test_the_process_group_is_left_after_the_block_with_a_barrier_only_on_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    left: list[bool] = []
    destroy = distributed.destroy_process_group
    monkeypatch.setattr(distributed, "destroy_process_group", lambda failed: [left.append(failed), destroy(failed)])
    with distributed.process_group(CPU) as group:
        assert (dist.get_rank(group), dist.get_world_size(group)) == (0, 1)
    assert not dist.is_initialized()
    with pytest.raises(KeyError, match="a bug"), distributed.process_group(CPU):
        raise KeyError("a bug")
    assert not dist.is_initialized()
    assert left == [False, True]  # failed: no barrier, the peers may never arrive


def test_every_table_is_planned_and_frozen_parts_stop_training(text_dataset: Path, tiny_bert: Path) -> None:
    cfg = tiny_config(text_dataset, tiny_bert)
    schema = Schema.load(text_dataset)
    model, _ = build_ranker(cfg, text_dataset, schema)
    names = model.table_names()
    widest_first = sorted(schema.tables, key=lambda t: -t.embedding_dim)
    assert names == [t.name for t in widest_first] + [TEXT_TABLE_PREFIX + t.name for t in schema.texts]
    assert list(distributed._constraints(model, cfg)) == names
    assert [n for n, _ in model.named_parameters() if model.is_frozen_table(n)] == [
        f"text_ebc.embedding_bags.{TEXT_TABLE_PREFIX}{t.name}.weight" for t in schema.texts
    ]
    model.freeze(("shared", "text_projection"))
    frozen = {name.split(".")[0] for name, param in model.named_parameters() if not param.requires_grad}
    assert frozen == {"mixture", "text_projections"}


@pytest.mark.slow
def test_two_ranks_reach_the_metrics_of_one(text_dataset: Path, tiny_bert: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(dataset=text_dataset, bert=tiny_bert))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "recsys_mtl", "train"]
    done = subprocess.run(
        [*command, "--config", str(config), "--out", str(tmp_path / "two"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained") == 1  # rank 0 reports
    assert "table_wise" in (tmp_path / "two" / "sharding_plan.txt").read_text()
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    two_valid = [r for r in two if r["kind"] == "valid"][-1]
    one = train(load_config(config), tmp_path / "one", torch.device("cpu"), progress=False)
    assert abs(two_valid["ctr/auc"] - one.valid[-1]["ctr/auc"]) < 0.03
    assert two_valid["ctr/auc"] > 0.6
    # the best 2-rank checkpoint loads on 1 rank and predicts exactly as the 2 ranks did
    best = max((r for r in two if r["kind"] == "valid"), key=lambda r: r["ctr/auc"])
    reloaded = evaluate_run(tmp_path / "two", "valid", torch.device("cpu"))
    assert reloaded["ctr/auc"] == pytest.approx(best["ctr/auc"], abs=1e-9)
    assert reloaded["rating/rmse"] == pytest.approx(best["rating/rmse"], rel=1e-6)

    # and scores on 2 ranks exactly as on 1: every row once, in order, the same predictions
    scoring = [*command[:-1], "score", str(tmp_path / "two"), str(text_dataset), "--out", str(tmp_path / "s2")]
    done = subprocess.run(
        [*scoring, "--quiet", "--rows-per-shard", "1000"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("scored 4,285 rows") == 1
    score(tmp_path / "two", text_dataset, tmp_path / "s1", torch.device("cpu"), rows_per_shard=1000, progress=False)
    two_ranks = pl.concat(pl.read_parquet(p) for p in sorted((tmp_path / "s2").glob("part-*.parquet")))
    one_rank = pl.concat(pl.read_parquet(p) for p in sorted((tmp_path / "s1").glob("part-*.parquet")))
    assert two_ranks.equals(one_rank)

    # a 2-rank run resumes on 1 rank for a third epoch, and the 1-rank run on 2 ranks
    third = load_config(config, ["train.epochs=3"])
    resumed = train(third, tmp_path / "two", torch.device("cpu"), resume=True, progress=False)
    assert resumed.steps == two[-1]["step"] + -(-21_428 // 256)
    assert resumed.valid[-1]["ctr/auc"] > 0.6
    (tmp_path / "three.toml").write_text(
        CONFIG.format(dataset=text_dataset, bert=tiny_bert).replace("epochs = 2", "epochs = 3")
    )
    done = subprocess.run(
        [*command, "--config", str(tmp_path / "three.toml"), "--out", str(tmp_path / "one"), "--quiet", "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == one.steps + 21_428 // 512  # a third epoch at 2 ranks of 256 rows
    assert [r for r in records if r["kind"] == "valid"][-1]["ctr/auc"] > 0.6

    # a 2-rank run starts from the 1-rank run (--init-from) and records it
    child = [*command, "--config", str(config), "--out", str(tmp_path / "child"), "--quiet"]
    done = subprocess.run(
        [*child, "--init-from", str(tmp_path / "one"), "--set", "train.max_steps=4", "--set", "train.eval_every=4"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_config(tmp_path / "child" / "config.toml").train.init_from == str((tmp_path / "one").resolve())
    child_valid = [json.loads(line) for line in (tmp_path / "child" / "metrics.jsonl").read_text().splitlines()]
    assert child_valid[-1]["ctr/auc"] > 0.6  # a trained model from the first step
