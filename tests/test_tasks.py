import math

import pytest
import torch

from recsys_mtl.config import Config, TaskConfig
from recsys_mtl.data.schema import SPLITS, LabelSpec, Schema, SplitSpec
from recsys_mtl.errors import InputError
from recsys_mtl.metrics import task_metrics
from recsys_mtl.tasks import (
    HIGHER_IS_BETTER,
    TASK_KINDS,
    TaskSpec,
    add_joint,
    after_rows,
    better,
    headline_metric,
    is_headline,
    predict,
    task_specs,
)

CTR = TaskSpec(name="ctr", kind="binary", loss="bce", weight=1.0)
CVR = TaskSpec(name="cvr", kind="binary", loss="bce", weight=1.0, after="ctr")
RATING = TaskSpec(name="rating", kind="regression", loss="mse", weight=1.0, min=1.0, max=5.0)
READS = TaskSpec(name="reads", kind="count", loss="poisson", weight=1.0)
LN3 = math.log(3)


def _schema() -> Schema:
    labels = (
        LabelSpec(column="click", task="ctr", kind="binary"),
        LabelSpec(column="conversion", task="cvr", kind="binary"),
        LabelSpec(column="stars", task="rating", kind="regression", min=1.0, max=5.0),
        LabelSpec(column="num_reads", task="reads", kind="count"),
    )
    splits = {split: SplitSpec(files=(f"{split}.parquet",), num_rows=1) for split in SPLITS}
    return Schema(name="tiny", tables=(), features=(), labels=labels, splits=splits)


def test_predict_turns_hand_made_logits_into_label_units_and_the_joint_probability() -> None:
    logits = {
        "ctr": torch.tensor([0.0, LN3]),  # sigmoid: 1/2, 3/4
        "cvr": torch.tensor([0.0, -LN3]),  # 1/2, 1/4
        "rating": torch.tensor([0.0, LN3, -100.0, 100.0]),  # 1 + 4 * sigmoid: 3, 4, then the bounds
        "reads": torch.tensor([0.0, math.log(2.5)]),  # exp: 1, 2.5
    }
    predictions = predict(logits, (CTR, CVR, RATING, READS))
    assert list(predictions) == ["ctr", "cvr", "rating", "reads", "cvr_joint"]
    torch.testing.assert_close(predictions["ctr"], torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(predictions["cvr"], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(predictions["cvr_joint"], torch.tensor([0.25, 0.1875]))  # pCTR * pCVR
    torch.testing.assert_close(predictions["rating"], torch.tensor([3.0, 4.0, 1.0, 5.0]))
    torch.testing.assert_close(predictions["reads"], torch.tensor([1.0, 2.5]))


def test_a_task_after_an_untrained_one_has_no_joint_probability() -> None:
    direct = TaskSpec(name="cvr", kind="binary", loss="bce", weight=1.0, after="ctr", esmm=False)
    assert list(predict({"cvr": torch.tensor([0.0])}, (direct,))) == ["cvr"]


def test_add_joint_multiplies_oracle_probabilities() -> None:
    oracle = {"ctr": torch.tensor([0.2, 0.5], dtype=torch.float64), "cvr": torch.tensor([0.5, 0.1])}
    values = add_joint(oracle, (CTR, CVR))
    torch.testing.assert_close(values["cvr_joint"], torch.tensor([0.1, 0.05], dtype=torch.float64))
    assert "cvr_joint" not in oracle  # the caller's dict is left alone


def test_after_rows_are_the_labelled_rows_where_the_preceding_task_is_one() -> None:
    labels = {"ctr": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), "cvr": torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])}
    masks = {
        "ctr": torch.tensor([True, True, True, False, True]),  # row 3: click unknown
        "cvr": torch.tensor([True, True, False, True, True]),  # row 2: conversion unknown
    }
    assert after_rows(CVR, labels, masks).tolist() == [True, False, False, False, False]


@pytest.mark.parametrize(
    ("spec", "headline"),
    [(CTR, "ctr/auc"), (CVR, "cvr/auc_clicked"), (RATING, "rating/rmse"), (READS, "reads/poisson_deviance")],
)
def test_each_kind_has_its_headline_metric(spec: TaskSpec, headline: str) -> None:
    assert headline_metric(spec) == headline
    assert is_headline(headline)
    assert not is_headline(f"oracle/{headline}")


def test_only_headline_metrics_are_headlines() -> None:
    assert [m for m in ("ctr/logloss", "cvr/ctcvr_auc", "ctr/auc_cold", "rating/mae", "loss") if is_headline(m)] == []


@pytest.mark.parametrize(
    ("metric", "value", "best", "improves"),
    [
        ("ctr/auc", 0.71, 0.70, True),
        ("ctr/auc", 0.69, 0.70, False),
        ("cvr/auc_clicked", 0.6, 0.5, True),
        ("oracle/cvr/ctcvr_auc", 0.6, 0.5, True),
        ("ctr/auc_cold", 0.6, 0.5, True),
        ("rating/rmse", 0.9, 1.0, True),
        ("rating/rmse", 1.1, 1.0, False),
        ("reads/poisson_deviance", 0.5, 0.6, True),
        ("ctr/logloss", 0.4, 0.5, True),
        ("ctr/auc", 0.5, None, True),  # anything defined beats nothing
        ("ctr/auc", 0.5, math.nan, True),
        ("ctr/auc", math.nan, None, False),  # NaN never improves
        ("ctr/auc", math.nan, 0.5, False),
        ("rating/rmse", math.nan, 0.5, False),
    ],
)
def test_aucs_improve_upwards_and_losses_and_errors_downwards(
    metric: str, value: float, best: float | None, improves: bool
) -> None:
    assert better(metric, value, best) is improves


def test_every_kind_reports_exactly_its_metrics_headline_first() -> None:
    labels = {
        "ctr": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "cvr": torch.tensor([1.0, 0.0, 0.0, 0.0]),
        "rating": torch.tensor([1.0, 5.0, 3.0, 2.0]),
        "reads": torch.tensor([0.0, 2.0, 1.0, 4.0]),
    }
    masks = {task: torch.ones(4, dtype=torch.bool) for task in labels}
    logits = {task: torch.tensor([0.3, -0.2, 0.1, 0.4]) for task in labels}
    specs = (CTR, CVR, RATING, READS)
    metrics = task_metrics(predict(logits, specs), labels, masks, specs, users=torch.arange(4).numpy() % 2)
    expected = [f"{s.name}/{m}" for s in specs for m in TASK_KINDS[s.task_kind].metrics]
    assert list(metrics) == expected
    assert {m.split("/")[1] for m in expected} & HIGHER_IS_BETTER == {"auc", "gauc", "auc_clicked", "ctcvr_auc"}


def test_task_specs_join_the_config_with_the_schema() -> None:
    tasks = (
        TaskConfig("cvr", after="ctr", esmm=False),
        TaskConfig("rating", loss="huber", weight=0.5),
        TaskConfig("reads"),
        TaskConfig("ctr", loss="huber"),  # a binary task's loss is always bce
    )
    specs = task_specs(Config(dataset="-", tasks=tasks), _schema())
    assert specs == (
        TaskSpec(name="cvr", kind="binary", loss="bce", weight=1.0, after="ctr", esmm=False),
        TaskSpec(name="rating", kind="regression", loss="huber", weight=0.5, min=1.0, max=5.0),
        TaskSpec(name="reads", kind="count", loss="poisson", weight=1.0),
        TaskSpec(name="ctr", kind="binary", loss="bce", weight=1.0),
    )
    assert [s.task_kind for s in specs] == ["after", "regression", "count", "binary"]
    assert task_specs(Config(dataset="-", tasks=(TaskConfig("rating"),)), _schema())[0].loss == "mse"


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ((TaskConfig("clicks"),), "task 'clicks' has no label in dataset 'tiny' (tasks: ['ctr', 'cvr', 'rating', "),
        ((TaskConfig("cvr", after="reads", esmm=False),), "task 'cvr': after = 'reads' must name a binary label"),
        ((TaskConfig("rating", after="ctr", esmm=False),), "task 'rating': after = 'ctr' needs a binary task"),
    ],
)
def test_task_specs_refuse_tasks_the_dataset_cannot_feed(tasks: tuple[TaskConfig, ...], message: str) -> None:
    with pytest.raises(InputError) as caught:
        task_specs(Config(dataset="-", tasks=tasks), _schema())
    assert str(caught.value).startswith(message)
