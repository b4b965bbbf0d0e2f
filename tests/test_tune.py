import csv
import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch

from recsys_mtl.cli import main
from recsys_mtl.config import load_config
from recsys_mtl.errors import InputError
from recsys_mtl.tune import tune
from recsys_mtl.tune_space import check_space, load_space, to_overrides
from tests.conftest import tiny_config

CPU = torch.device("cpu")
SPACE = """
["optim.lr"]
type = "float"
low = 1e-3
high = 2e-2
log = true

["model.num_experts"]
type = "int"
low = 2
high = 4

["model.expert_dims"]
type = "categorical"
choices = [[32, 16], [16]]

["tasks.ctr.weight"]
type = "float"
low = 0.5
high = 2.0

[study]
objective = { "ctr/auc" = 1.0, "rating/rmse" = -0.5 }
pruner = "none"

[study.fixed]
"train.max_steps" = 8
"train.eval_every" = 4
"""


def _write(folder: Path, space: str, dataset: Path) -> tuple[Path, Path]:
    """A tiny config (no text branch: no BERT needed) and a space file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.toml"
    cfg = tiny_config(dataset, Path("unused"), model={"text_dim": 0}, train={"early_stop_metric": "ctr/auc"})
    cfg.save(config)
    (folder / "space.toml").write_text(space)
    return config, folder / "space.toml"


@pytest.fixture(scope="module")
def study(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(config, space, TUNE_DIR) of a finished 3-trial study on the tiny world."""
    config, space = _write(tmp_path_factory.mktemp("tune"), SPACE, tiny_dataset)
    out = config.parent / "out"
    result = tune(config, space, out, 3, CPU)
    assert result.counts == {"complete": 3}
    return config, space, out


def _trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}").get_trials()


def test_a_study_writes_the_best_config_the_trials_and_a_report(study: tuple[Path, Path, Path]) -> None:
    config, _, out = study
    trials = _trials(out)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert trials[0].params == {"optim.lr": 0.005, "model.num_experts": 3, "model.expert_dims": "[32, 16]"} | {
        "tasks.ctr.weight": 1.0
    }  # the first trial takes the config's own values
    best = max(trials, key=lambda t: t.value or 0.0)
    tuned = load_config(out / "best.toml")
    assert tuned.optim.lr == best.params["optim.lr"]
    assert tuned.model.num_experts == best.params["model.num_experts"]
    assert str(list(tuned.model.expert_dims)) == best.params["model.expert_dims"]
    assert tuned.tasks[0].weight == best.params["tasks.ctr.weight"]
    assert (tuned.train.max_steps, tuned.train.eval_every) == (0, 0)  # [study.fixed] is the trials' budget only
    assert tuned.run_dir == str(out / "best")
    base = load_config(config)
    assert tuned.tasks[1:] == base.tasks[1:]
    assert tuned.model.tower_dims == base.model.tower_dims
    for trial in trials:  # every trial is a normal run dir, trained under [study.fixed]
        run = load_config(out / "trials" / f"{trial.number:04d}" / "config.toml")
        assert (run.train.max_steps, run.train.eval_every, run.optim.lr) == (8, 4, trial.params["optim.lr"])
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert all(float(r["setup_s"]) > 0 and float(r["train_s"]) > 0 for r in rows)
    report = (out / "report.md").read_text()
    assert f"**Best: trial {best.number}**" in report
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert f"]({name}.png)" in report
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_a_trial_value_is_the_weighted_objective_at_its_best_validation(study: tuple[Path, Path, Path]) -> None:
    out = study[2]
    for trial in _trials(out):
        lines = (out / "trials" / f"{trial.number:04d}" / "metrics.jsonl").read_text().splitlines()
        valid = [m for m in map(json.loads, lines) if m["kind"] == "valid"]
        assert len(valid) == 2 == len(trial.intermediate_values)
        best = max(valid, key=lambda m: m["ctr/auc"])  # the early-stopping metric picks the kept checkpoint
        assert trial.value == 1.0 * best["ctr/auc"] + -0.5 * best["rating/rmse"]
        assert trial.intermediate_values == {
            i: 1.0 * m["ctr/auc"] + -0.5 * m["rating/rmse"] for i, m in enumerate(valid)
        }


def test_a_rerun_resumes_with_only_the_missing_trials_and_refuses_another_space(
    study: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, space, finished = study
    out = Path(shutil.copytree(finished, tmp_path / "out", ignore=shutil.ignore_patterns("trials")))
    before = {t.number: t.value for t in _trials(out)}
    args = ["tune", "--config", str(config), "--space", str(space), "--out", str(out)]
    assert main([*args, "--trials", "4"]) == 0
    assert "4 complete" in capsys.readouterr().out
    trials = _trials(out)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert {t.number: t.value for t in trials[:3]} == before
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0003"]  # the copy holds only the new run
    assert main([*args, "--trials", "4"]) == 0  # done: nothing to train
    assert len(_trials(out)) == 4

    other = tmp_path / "space.toml"
    other.write_text(SPACE.replace("high = 4", "high = 6"))
    assert main([*args[:4], str(other), *args[5:], "--trials", "5"]) == 2
    err = capsys.readouterr().err
    assert "recsys-mtl tune: error: study 'tune' in sqlite:///" in err
    assert "params.model.num_experts.high: study 4, now 6" in err
    assert len(_trials(out)) == 4


def test_a_pruner_that_must_prune_ends_trials_at_their_first_validation(tiny_dataset: Path, tmp_path: Path) -> None:
    prune_all = SPACE.replace('pruner = "none"', 'pruner = "threshold"\nlower = 10.0\nwarmup_validations = 0')
    config, space = _write(tmp_path, prune_all, tiny_dataset)
    result = tune(config, space, tmp_path / "out", 2, CPU)
    assert result.counts == {"pruned": 2}
    assert result.best is None
    assert not (tmp_path / "out" / "best.toml").exists()
    for trial in _trials(tmp_path / "out"):
        assert len(trial.intermediate_values) == 1
        lines = (tmp_path / "out" / "trials" / f"{trial.number:04d}" / "metrics.jsonl").read_text()
        assert lines.count('"kind": "valid"') == 1
    assert "2 pruned" in (tmp_path / "out" / "report.md").read_text()


def test_a_trial_whose_loss_diverges_fails_and_counts_as_done(tiny_dataset: Path, tmp_path: Path) -> None:
    diverging = SPACE.replace('["optim.lr"]', '["optim.weight_decay"]').replace(
        "[study.fixed]", '[study.fixed]\n"optim.lr" = 1e30'
    )
    config, space = _write(tmp_path, diverging, tiny_dataset)
    result = tune(config, space, tmp_path / "out", 1, CPU)
    assert result.counts == {"fail": 1}
    (trial,) = _trials(tmp_path / "out")
    assert "loss of task" in trial.user_attrs["error"]
    assert "check optim.lr" in (tmp_path / "out" / "trials.csv").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('["optim.lr"]', '["optim.lrr"]'), "space.toml: [optim.lrr] = 0.001: unknown key optim.lrr in"),
        (("low = 2\n", "low = 2.5\n"), "[model.num_experts] in {space}: an int takes whole low, high and step"),
        (("high = 4\n", 'high = 4\nlog = "yes"\n'), "log in {space}: expected bool, got 'yes'"),
        (("low = 1e-3", "low = 0.5"), "[optim.lr] in {space}: low = 0.5 > high = 0.02"),
        (("[[32, 16], [16]]", "[[32, 16], [0]]"), "[model.expert_dims] = [0]: "),
        (('"ctr/auc" = 1.0', '"ctr/acu" = 1.0'), "[study] ['ctr/acu']: not validation metrics of the config"),
        (('["tasks.ctr.weight"]', '["tasks.click.weight"]'), "[tasks.click.weight] = 0.5: tasks.click.weight: the"),
        (('pruner = "none"', 'pruner = "often"'), "study.pruner in {space}: expected one of"),
        (('pruner = "none"', 'pruner = "none"\nmetric = "ctr/auc"'), "give metric or objective, not both"),
        (('"train.eval_every" = 4', '"train.eval_every" = -1'), "space.toml: [study.fixed]: [train] in"),
    ],
)
def test_bad_space_files_are_refused_naming_the_file_and_the_key(
    tiny_dataset: Path, tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    assert change[0] in SPACE
    config, space = _write(tmp_path, SPACE.replace(*change), tiny_dataset)
    with pytest.raises(InputError) as raised:
        check_space(load_space(space), config)
    assert message.format(space=space) in str(raised.value)
    assert str(space) in str(raised.value)


def test_values_become_set_overrides_with_task_keys_as_one_tasks_override(tiny_dataset: Path) -> None:
    cfg = tiny_config(tiny_dataset, Path("unused"))
    overrides = to_overrides(cfg, {"model.arch": "ple", "tasks.rating.weight": 2.0, "model.expert_dims": [8, 4]})
    assert overrides == [
        'model.arch="ple"',
        "model.expert_dims=[8, 4]",
        'tasks=[{"name" = "ctr"}, {"name" = "cvr", "after" = "ctr"}, {"name" = "rating", "weight" = 2.0}, '
        '{"name" = "reads"}]',
    ]


def test_tune_has_help_and_refuses_a_missing_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--help"])
    assert exit_info.value.code == 0
    assert "--storage" in capsys.readouterr().out
    args = ["--config", "configs/demo.toml", "--space", str(tmp_path / "no.toml"), "--trials", "2", "--out", "x"]
    assert main(["tune", *args]) == 2
    assert capsys.readouterr().err == f"recsys-mtl tune: error: {tmp_path / 'no.toml'}: no such file\n"


def test_a_bad_storage_or_trial_count_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    config, space = _write(tmp_path, SPACE, tiny_dataset)
    with pytest.raises(InputError, match="--storage nosuch://db: NoSuchModuleError"):
        tune(config, space, tmp_path / "out", 1, CPU, storage="nosuch://db")
    with pytest.raises(InputError, match="--trials must be >= 1, got 0"):
        tune(config, space, tmp_path / "out", 0, CPU)
    with pytest.raises(InputError, match="is, contains or lies inside the input"):
        tune(config, space, tiny_dataset / "tune", 1, CPU)
