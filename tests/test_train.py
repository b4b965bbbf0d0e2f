import json
import math
from pathlib import Path

import pytest
import torch

import recsys_mtl.train as train_module
from recsys_mtl.checkpoint import fingerprint, read_progress
from recsys_mtl.cli import main
from recsys_mtl.config import load_config
from recsys_mtl.data.loader import Dataset
from recsys_mtl.errors import InputError, MissingInputError, OutputExistsError
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.files import locked
from recsys_mtl.train import check_finite, conflict_due, train
from tests.conftest import tiny_config

CPU = torch.device("cpu")
STEPS_PER_EPOCH = -(-21_428 // 512)  # the tiny world's training rows at the default test batch size


def _cfg(text_dataset: Path, tiny_bert: Path, **train_section):
    return tiny_config(text_dataset, tiny_bert, train={"epochs": 2, "log_every": 10, **train_section})


def _step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "progress.json").read_text())["step"]


def test_a_run_learns_and_writes_logs_checkpoints_and_report(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = train(_cfg(text_dataset, tiny_bert, batch_size=256), run, CPU, progress=False)
    assert result.steps == 2 * -(-21_428 // 256)
    assert len(result.valid) == 2
    assert result.best["ctr/auc"] > 0.6
    # each checkpoint is a link to the folder of its latest version; the older version is gone
    entries = {p.name: p for p in (run / "checkpoints").iterdir()}
    assert {name for name, p in entries.items() if p.is_symlink()} == {"best", "last"}
    assert {"best", "last", entries["best"].readlink().name, entries["last"].readlink().name} == set(entries)
    assert _step_of(entries["last"]) == result.steps
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
    steps = 2 * STEPS_PER_EPOCH  # two epochs; the kill lands mid-epoch 0
    whole = train(_cfg(text_dataset, tiny_bert, max_steps=steps), tmp_path / "whole", CPU, progress=False)
    killed = train(_cfg(text_dataset, tiny_bert, max_steps=17), tmp_path / "resumed", CPU, progress=False)
    assert killed.steps == 17
    assert killed.valid == []
    resumed = train(
        _cfg(text_dataset, tiny_bert, max_steps=steps), tmp_path / "resumed", CPU, resume=True, progress=False
    )
    assert resumed.steps == whole.steps == steps
    assert len(whole.valid) == 2
    assert resumed.valid == whole.valid  # the same metrics, to the last bit, at both validations
    assert resumed.losses == whole.losses[-len(resumed.losses) :]


class _Kill(BaseException):
    """What a kill does to a run: it stops at once (a BaseException: no handler of the code under test catches it)."""


def test_a_restart_replaces_what_the_killed_run_logged_after_its_checkpoint(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = _cfg(text_dataset, tiny_bert, max_steps=30, checkpoint_every=10, checkpoint_minutes=0.0)
    save = train_module.save_checkpoint

    def killed_at_step_20(path, state, progress):
        if progress.step == 20:
            raise _Kill
        save(path, state, progress)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_at_step_20)
    with pytest.raises(_Kill):
        train(cfg, run, CPU, progress=False)
    monkeypatch.undo()
    before = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before] == [10, 20]  # step 20 was logged, its checkpoint never written
    assert _step_of(run / "checkpoints" / "last") == 10

    resumed = train(cfg, run, CPU, resume=True, progress=False)
    assert resumed.steps == 30
    after = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [10, 20, 30]
    assert after[0] == before[0]
    speed = "samples_per_s"
    assert {k: v for k, v in after[1].items() if k != speed} == {k: v for k, v in before[1].items() if k != speed}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30]


def test_checkpoints_are_also_taken_by_time(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_config(Path(__file__).parents[1] / "configs" / "demo.toml").train.checkpoint_minutes == 10.0
    saved = []
    save = train_module.save_checkpoint

    def recording(path, state, progress):
        saved.append((path.name, progress.step))
        save(path, state, progress)

    monkeypatch.setattr(train_module, "save_checkpoint", recording)
    train(_cfg(text_dataset, tiny_bert, max_steps=3, checkpoint_minutes=1e-9), tmp_path / "often", CPU, progress=False)
    assert saved == [("last", 1), ("last", 2), ("last", 3)]  # the end of the run saves no second copy of step 3
    saved.clear()
    train(_cfg(text_dataset, tiny_bert, max_steps=3, checkpoint_minutes=0.0), tmp_path / "never", CPU, progress=False)
    assert saved == [("last", 3)]


def test_a_resume_under_another_config_is_refused_listing_every_difference(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train(_cfg(text_dataset, tiny_bert, max_steps=3), run, CPU, progress=False)
    config = (run / "config.toml").read_bytes()
    other = tiny_config(
        text_dataset,
        tiny_bert,
        model={"num_experts": 5},
        optim={"lr": 0.01},
        loss={"reduction": "task"},
        train={"batch_size": 256, "seed": 1, "epochs": 2, "max_steps": 6},
    )
    with pytest.raises(InputError) as refused:
        train(other, run, CPU, resume=True, progress=False)
    assert str(refused.value).startswith(
        f"--resume: the config differs from the run's {run / 'config.toml'}: loss.reduction: run 'sample', now 'task'; "
        "model.num_experts: run 3, now 5; optim.lr: run 0.005, now 0.01; train.batch_size: run 512, now 256; "
        "train.seed: run 0, now 1. "
    )
    assert (run / "config.toml").read_bytes() == config
    with pytest.raises(OutputExistsError, match="pass --resume to continue it"):
        train(_cfg(text_dataset, tiny_bert, max_steps=3), run, CPU, progress=False)

    # what a resume may change: how long, how often it logs, measures and saves
    longer = _cfg(text_dataset, tiny_bert, max_steps=5, log_every=1, conflict_every=2, checkpoint_minutes=0.0)
    assert train(longer, run, CPU, resume=True, progress=False).steps == 5
    assert load_config(run / "config.toml") == longer


def test_a_checkpoint_for_another_model_or_data_is_refused(text_dataset: Path, tiny_bert: Path, tmp_path: Path) -> None:
    train(_cfg(text_dataset, tiny_bert, max_steps=2), tmp_path / "run", CPU, progress=False)
    other = tiny_config(text_dataset, tiny_bert, model={"num_experts": 5})
    with pytest.raises(InputError, match=r"does not match the config: model\.num_experts: checkpoint 3, config 5"):
        read_progress(tmp_path / "run" / "checkpoints" / "last", fingerprint(other, Dataset(text_dataset).schema))


@pytest.mark.parametrize("held", ["config.toml", "checkpoints/last", "metrics.jsonl"])
def test_a_plain_train_into_a_run_is_refused(text_dataset: Path, tiny_bert: Path, tmp_path: Path, held: str) -> None:
    (tmp_path / held).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / held).write_text("")
    with pytest.raises(OutputExistsError, match=f"holds a run \\({held.split('/')[0]}\\); pass --resume"):
        train(_cfg(text_dataset, tiny_bert), tmp_path, CPU, progress=False)
    assert (tmp_path / held).read_text() == ""


def test_a_resume_of_nothing_and_a_locked_run_dir_are_refused(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    with pytest.raises(MissingInputError, match="no run to resume"):
        train(_cfg(text_dataset, tiny_bert), tmp_path / "empty", CPU, resume=True, progress=False)
    with locked(tmp_path / "busy"), pytest.raises(OutputExistsError, match=r"busy is in use by another process"):
        train(_cfg(text_dataset, tiny_bert), tmp_path / "busy", CPU, progress=False)


def test_a_non_finite_loss_stops_the_run_before_that_state_is_saved(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(text_dataset, tiny_bert, optim={"lr": 1e30}, train={"eval_every": 1, "checkpoint_minutes": 0})
    with pytest.raises(InputError) as stopped:
        train(cfg, run, CPU, progress=False)
    assert str(stopped.value) == (
        "step 2: loss of task 'ctr' is nan, loss of task 'cvr' is nan, loss of task 'rating' is nan, loss of task "
        "'reads' is nan; check optim.lr, the task weights and the data"
    )
    validated = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in validated] == [1]  # step 2's state was never validated or saved
    assert _step_of(run / "checkpoints" / "best") == _step_of(run / "checkpoints" / "last") == 1


def test_a_nan_validation_metric_is_never_the_best(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "split_metrics", lambda *args: ({"ctr/auc": math.nan}, None))
    cfg = _cfg(text_dataset, tiny_bert, max_steps=2, eval_every=1, patience=5)
    result = train(cfg, tmp_path / "run", CPU, progress=False)
    assert len(result.valid) == 2
    assert result.best == {}
    assert not (tmp_path / "run" / "checkpoints" / "best").exists()
    assert _step_of(tmp_path / "run" / "checkpoints" / "last") == 2


def test_check_finite_names_the_step_and_every_task() -> None:
    check_finite({"loss": 0.5, "ctr/loss": 0.4}, step=3)
    with pytest.raises(InputError, match=r"^step 37: loss of task 'rating' is nan, loss of task 'reads' is inf; check"):
        check_finite({"loss": math.nan, "ctr/loss": 0.4, "rating/loss": math.nan, "reads/loss": math.inf}, step=37)
    with pytest.raises(InputError, match=r"^step 4: the total loss is -inf; check optim.lr"):
        check_finite({"loss": -math.inf, "ctr/loss": 0.4}, step=4)


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
    assert main(["train", "--config", str(config), "--out", str(run), "--resume", "--set", "train.seed=3"]) == 2
    assert capsys.readouterr().err.endswith(
        f"recsys-mtl train: error: --resume: the config differs from the run's {run / 'config.toml'}: "
        "train.seed: run 0, now 3. Resume with the run's values, or train into another --out (a resume may change "
        "only run_dir, sharding, uvm_caching, train.epochs, train.max_steps, train.log_every, train.conflict_every, "
        "train.eval_every, train.checkpoint_every, train.checkpoint_minutes, train.patience)\n"
    )


def _records(run: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


def test_the_gradient_conflict_is_logged_as_health_lines_and_leaves_the_run_unchanged(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    on, off = (_cfg(text_dataset, tiny_bert, max_steps=4, log_every=1, conflict_every=every) for every in (1, 0))
    measured = train(on, tmp_path / "on", CPU, progress=False)
    plain = train(off, tmp_path / "off", CPU, progress=False)
    assert measured.losses == plain.losses  # every step's loss, to the bit
    speed = "samples_per_s"
    assert [{k: v for k, v in r.items() if k != speed} for r in _records(tmp_path / "on", "train")] == [
        {k: v for k, v in r.items() if k != speed} for r in _records(tmp_path / "off", "train")
    ]
    assert _records(tmp_path / "off", "health") == []
    health = _records(tmp_path / "on", "health")
    assert [r["step"] for r in health] == [1, 2, 3, 4]
    pairs = ["ctr~cvr", "ctr~rating", "ctr~reads", "cvr~rating", "cvr~reads", "rating~reads"]
    for record in health:
        assert list(record) == ["kind", "step", *(f"conflict/{p}" for p in pairs), "conflict/mean"]
        assert all(-1 <= record[f"conflict/{p}"] <= 1 for p in pairs)
        assert record["conflict/mean"] == pytest.approx(sum(record[f"conflict/{p}"] for p in pairs) / 6)
    events = EventAccumulator(str(tmp_path / "on" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("health/conflict/mean")] == [1, 2, 3, 4]
    assert events.Scalars("health/conflict/ctr~cvr")[0].value == pytest.approx(health[0]["conflict/ctr~cvr"])


def test_the_conflict_is_measured_every_conflict_every_steps_and_never_on_a_frozen_shared_layer(
    text_dataset: Path, tiny_bert: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert [step for step in range(1, 121) if conflict_due(50, step)] == [50, 100]
    assert not any(conflict_due(0, step) for step in range(1, 121))
    assert load_config(Path(__file__).parents[1] / "configs" / "demo.toml").train.conflict_every == 50
    with pytest.raises(InputError, match=r"train\.conflict_every must be >= 0 \(0: never\), got -1"):
        _cfg(text_dataset, tiny_bert, conflict_every=-1)
    frozen = tiny_config(text_dataset, tiny_bert, train={"freeze": ["shared"], "max_steps": 2, "conflict_every": 1})
    train(frozen, tmp_path / "frozen", CPU, progress=False)
    assert _records(tmp_path / "frozen", "health") == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "recsys_mtl.train" and r.levelname == "WARNING"]
    assert warnings == ["train.conflict_every = 1: no gradient conflict is measured, the shared layer is frozen"]


@pytest.mark.parametrize(
    ("decay", "epochs", "expected"),
    [
        ("epoch", 3, [1.0, 0.525, 1.0, 0.525, 1.0]),  # restarts every epoch of 10 steps
        ("linear", 1, [1.0, 0.525, 0.05, 0.05, 0.05]),  # the same first epoch as "epoch" for any number of epochs
        ("linear", 2, [1.0, 0.7625, 0.525, 0.2875, 0.05]),
        ("none", 3, [1.0] * 5),
    ],
)
def test_the_learning_rate_decays_within_each_epoch_or_over_the_run(decay: str, epochs: int, expected: list) -> None:
    from types import SimpleNamespace

    from recsys_mtl.config import OptimConfig, TrainConfig

    group = {"lr": 0.0}
    cfg = SimpleNamespace(optim=OptimConfig(lr=2.0, decay=decay), train=TrainConfig(epochs=epochs))  # type: ignore[arg-type]
    trainer = SimpleNamespace(cfg=cfg, sharded=SimpleNamespace(dense_optimizer=SimpleNamespace(param_groups=[group])))
    rates = []
    for step in (0, 5, 10, 15, 20):
        train_module.set_learning_rate(trainer, step, per_epoch=10)  # type: ignore[arg-type]
        rates.append(group["lr"] / 2.0)
    assert rates == pytest.approx(expected)
