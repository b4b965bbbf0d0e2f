import logging
import math
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from recsys_mtl.data.loader import Dataset
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError, MissingInputError
from recsys_mtl.evaluate import SplitPredictions, oracle_predictions, warn_undefined
from recsys_mtl.tasks import TaskSpec


def test_undefined_metrics_are_warned_per_task_and_split(caplog: pytest.LogCaptureFixture) -> None:
    preds = SplitPredictions(
        values={"ctr": torch.tensor([0.1, 0.9, 0.5]), "rating": torch.tensor([3.0, 4.0, 2.0])},
        labels={"ctr": torch.tensor([1.0, 1.0, 0.0]), "rating": torch.tensor([0.0, 0.0, 0.0])},
        masks={"ctr": torch.tensor([True, True, False]), "rating": torch.zeros(3, dtype=torch.bool)},
        keys=pl.DataFrame({"impression_id": [1, 2, 3]}),
        gate_weights=torch.ones(2, 1),
        cold=None,
    )
    metrics = {"ctr/auc": math.nan, "ctr/logloss": 0.2, "rating/rmse": math.nan, "oracle/ctr/auc": math.nan}
    with caplog.at_level(logging.WARNING, logger="recsys_mtl.evaluate"):
        warn_undefined(metrics, preds, "valid")
    assert caplog.messages == [
        "valid split: ctr/auc undefined (reported as —): task 'ctr' has 2 labelled rows, all 1 (an AUC needs both "
        "classes)",
        "valid split: rating/rmse undefined (reported as —): task 'rating' has no labelled rows",
    ]


def test_oracle_files_gone_from_the_raw_folder_are_refused_naming_them(tiny_dataset: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_dataset, tmp_path / "ds"))
    schema = (folder / "schema.toml").read_text()
    (folder / "schema.toml").write_text(schema.replace(str(Schema.load(folder).source), str(tmp_path / "gone")))
    dataset = Dataset(folder)
    ctr = TaskSpec(name="ctr", kind="binary", loss="bce", weight=1.0)
    with pytest.raises(InputError, match=rf"the oracle files of {folder} \({tmp_path / 'gone'}/oracle\): ") as caught:
        oracle_predictions(dataset, pl.DataFrame({"impression_id": [1, 2]}), (ctr,))
    assert caught.type is MissingInputError
