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
from recsys_mtl.evaluate import Predictor, SplitPredictions, oracle_predictions, split_metrics, warn_undefined
from recsys_mtl.model.embeddings import TEXT_TABLE_PREFIX, write_table
from recsys_mtl.run import build_ranker
from recsys_mtl.tasks import TaskSpec, task_specs
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def test_undefined_metrics_are_warned_per_task_and_split(caplog: pytest.LogCaptureFixture) -> None:
    preds = SplitPredictions(
        values={"ctr": torch.tensor([0.1, 0.9, 0.5]), "rating": torch.tensor([3.0, 4.0, 2.0])},
        labels={"ctr": torch.tensor([1.0, 1.0, 0.0]), "rating": torch.tensor([0.0, 0.0, 0.0])},
        masks={"ctr": torch.tensor([True, True, False]), "rating": torch.zeros(3, dtype=torch.bool)},
        keys=pl.DataFrame({"impression_id": [1, 2, 3]}),
        gate_weights=torch.ones(2, 1),
        gate_entropy=torch.zeros(2),
        cold=None,
    )
    metrics = {
        "ctr/auc": math.nan,
        "ctr/logloss": 0.2,
        "rating/rmse": math.nan,
        "oracle/ctr/auc": math.nan,
        "mixture/ctr/gate_entropy": math.nan,
    }
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


def _part(rows: int, gate_weights: list[float], gate_entropy: float) -> SplitPredictions:
    return SplitPredictions(
        values={},
        labels={},
        masks={},
        keys=pl.DataFrame({"impression_id": list(range(rows))}),
        gate_weights=torch.tensor([gate_weights]),
        gate_entropy=torch.tensor([gate_entropy]),
        cold=None,
    )


def test_concat_averages_gate_weights_and_entropies_over_rows_not_parts() -> None:
    whole = SplitPredictions.concat([_part(1, [1.0, 0.0], 0.0), _part(3, [0.5, 0.5], math.log(2))])
    torch.testing.assert_close(whole.gate_weights, torch.tensor([[0.625, 0.375]]))
    torch.testing.assert_close(whole.gate_entropy, torch.tensor([0.75 * math.log(2)]))


@pytest.mark.parametrize("arch", ["ple", "shared_bottom"])
def test_split_metrics_hold_the_mixture_health_of_a_model_with_experts(
    text_dataset: Path, tiny_bert: Path, arch: str
) -> None:
    cfg = tiny_config(text_dataset, tiny_bert, model={"arch": arch, "num_levels": 1})
    dataset = Dataset(text_dataset)
    model, vectors = build_ranker(cfg, text_dataset, dataset.schema, CPU)
    for name, table in vectors.items():
        write_table(model, TEXT_TABLE_PREFIX + name, table)
    specs = task_specs(cfg, dataset.schema)
    metrics, preds = split_metrics(Predictor(model, specs, cfg, CPU), dataset, "valid")
    assert preds is not None
    mixture = {k: v for k, v in metrics.items() if "mixture/" in k}
    if arch == "shared_bottom":
        assert mixture == {}
        return
    # ple, 3 shared experts and 1 per task: each task routes to the shared ones and its own
    assert not any(k.startswith(("oracle/", "ratio/")) for k in mixture)
    experts = model.mixture.expert_names
    for t, spec in enumerate(specs):
        loads = {k.rsplit("/", 1)[1]: v for k, v in mixture.items() if k.startswith(f"mixture/{spec.name}/load/")}
        assert list(loads) == ["shared0", "shared1", "shared2", f"task{t}.0"]
        assert sum(loads.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(loads.values()) == [float(preds.gate_weights[t, experts.index(e)]) for e in loads]
        assert 0 < mixture[f"mixture/{spec.name}/gate_entropy"] <= math.log(4) + 1e-6
    torch.testing.assert_close(preds.gate_weights.sum(-1), torch.ones(len(specs)))  # zero outside each task's experts
    dead = [e for e in experts if all(mixture.get(f"mixture/{s.name}/load/{e}", 0.0) < 0.02 for s in specs)]
    assert mixture["mixture/dead_experts"] == pytest.approx(len(dead) / len(experts))
