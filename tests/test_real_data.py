"""End to end on the shipped real datasets with their shipped configs (slow)."""

import math
from pathlib import Path

import polars as pl
import pytest
import torch

from data_prep.description import load_description
from data_prep.prepare import prepare
from recsys_mtl.config import TextConfig, load_config
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.text import encode_dataset
from recsys_mtl.train import train
from tests.conftest import REPO, shared_data

CPU = torch.device("cpu")


@pytest.mark.slow
def test_ali_ccp_config_trains_and_evaluates(tmp_path: Path) -> None:
    prepare(shared_data("ali-ccp-sample"), tmp_path / "ali", load_description("ali_ccp"))
    cfg = load_config(REPO / "configs" / "ali_ccp.toml", [f'dataset="{tmp_path / "ali"}"'])
    result = train(cfg, tmp_path / "run", CPU, progress=False)
    assert result.steps == 2 * 4  # 100 rows, batch 32
    metrics = evaluate_run(tmp_path / "run", "valid", CPU)
    assert set(metrics) >= {"ctr/auc", "ctr/logloss", "cvr/auc_clicked", "cvr/ctcvr_auc"}
    assert math.isfinite(metrics["ctr/logloss"])


@pytest.mark.slow
def test_reviews_config_trains_with_text_and_evaluates(tmp_path: Path, tiny_bert: Path) -> None:
    prepare(shared_data("womens-clothing-reviews"), tmp_path / "reviews", load_description("reviews"))
    encode_dataset(tmp_path / "reviews", TextConfig(model=str(tiny_bert)), CPU, progress=False)
    overrides = [f'dataset="{tmp_path / "reviews"}"', f'text.model="{tiny_bert}"']
    cfg = load_config(REPO / "configs" / "reviews.toml", overrides)
    train(cfg, tmp_path / "run", CPU, progress=False)
    metrics = evaluate_run(tmp_path / "run", "test", CPU)
    # a random BERT carries little sentiment, so the model has little more than item and age: it must not do worse
    # than a constant rating by much, and must rank recommendations above chance
    ratings = pl.read_parquet(tmp_path / "reviews" / "test")["rating"]
    assert metrics["rating/rmse"] < 1.05 * ratings.std()
    assert metrics["recommend/auc"] > 0.5
    assert 0.8 < metrics["recommend/calibration"] < 1.2
    assert math.isfinite(metrics["helpful/poisson_deviance"])
