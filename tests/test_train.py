import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from recsys_mtl.checkpoint import SafeReader
from recsys_mtl.cli import main
from recsys_mtl.config import load_config
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.train import train
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def _cfg(text_dataset: Path, tiny_bert: Path, **train_section):
    return tiny_config(text_dataset, tiny_bert, train={"epochs": 2, "log_every": 10, **train_section})


def test_a_run_learns_and_writes_logs_checkpoints_and_report(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = train(_cfg(text_dataset, tiny_bert, batch_size=256), run, CPU, progress=False)
    assert result.steps == 2 * -(-21_428 // 256)
    assert len(result.valid) == 2
    assert result.best["ctr/auc"] > 0.6
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best", "last"}
    assert load_config(run / "config.toml") == _cfg(text_dataset, tiny_bert, batch_size=256)
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("valid") == 2
    assert kinds.count("train") == result.steps // 10
    assert any((run / "tensorboard").iterdir())

    metrics = evaluate_run(run, "test", CPU)
    assert metrics["ctr/auc"] > 0.6
    assert 0.75 < metrics["oracle/ctr/auc"] < 0.9
    assert metrics["ratio/ctr/auc"] == pytest.approx(metrics["ctr/auc"] / metrics["oracle/ctr/auc"])
    assert {"cvr/auc_clicked", "cvr/ctcvr_auc", "rating/rmse", "rating/mae", "reads/poisson_deviance"} <= set(metrics)
    saved = json.loads((run / "metrics_test.json").read_text())
    assert saved == pytest.approx(metrics, nan_ok=True)
    report = (run / "report_test.md").read_text()
    assert "| ctr/auc |" in report
    for png in ("learning_curves.png", "expert_utilisation_test.png", "calibration_test.png"):
        assert (run / png).read_bytes().startswith(b"\x89PNG")


def test_resume_after_a_kill_equals_an_uninterrupted_run(text_dataset: Path, tiny_bert: Path, tmp_path: Path) -> None:
    steps = 2 * -(-21_428 // 512)  # two epochs; the kill lands mid-epoch 0
    whole = train(_cfg(text_dataset, tiny_bert, max_steps=steps), tmp_path / "whole", CPU, progress=False)
    killed = train(_cfg(text_dataset, tiny_bert, max_steps=17), tmp_path / "resumed", CPU, progress=False)
    assert killed.steps == 17
    assert killed.valid == []
    resumed = train(
        _cfg(text_dataset, tiny_bert, max_steps=steps), tmp_path / "resumed", CPU, resume=True, progress=False
    )
    assert resumed.steps == whole.steps == steps
    assert resumed.valid == whole.valid  # the same metrics, to the last bit, at both validations
    assert resumed.losses == whole.losses[-len(resumed.losses) :]


def test_a_checkpoint_for_another_model_is_refused(text_dataset: Path, tiny_bert: Path, tmp_path: Path) -> None:
    train(_cfg(text_dataset, tiny_bert, max_steps=3), tmp_path / "run", CPU, progress=False)
    other = tiny_config(text_dataset, tiny_bert, model={"num_experts": 5}, train={"max_steps": 6})
    with pytest.raises(ValueError, match=r"does not match the config: model\.num_experts: checkpoint 3, config 5"):
        train(other, tmp_path / "run", CPU, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(_cfg(text_dataset, tiny_bert, max_steps=3), tmp_path / "run", CPU, progress=False)


class _Exploit:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-recsys-mtl-test",))


def test_checkpoint_metadata_is_never_unpickled_beyond_dcp_classes(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(pickle.UnpicklingError, match=r"shutil\.rmtree, which is not allowed"):
        SafeReader(tmp_path).read_metadata()


def test_train_and_evaluate_from_the_command_line(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        f'dataset = "{text_dataset}"\ntasks = [{{ name = "ctr" }}]\n[text]\nmodel = "{tiny_bert}"\n'
        "[model]\nexpert_dims = [16]\ntower_dims = [8]\ntext_dim = 4\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--set", "train.max_steps=5", "--quiet"]) == 0
    assert "trained 5 steps" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--split", "valid"]) == 0
    out = capsys.readouterr().out
    assert "ctr/auc" in out
    assert (run / "report_valid.md").is_file()
    assert main(["train", "--config", str(config), "--out", str(run), "--set", "model.arch=moe"]) == 2
    assert "model.arch in" in capsys.readouterr().err
