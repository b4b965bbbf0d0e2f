from pathlib import Path

import pytest

from recsys_mtl.config import Config, TaskConfig, load_config
from recsys_mtl.errors import InputError

CONFIG = """
dataset = "demo_out/dataset"
tasks = [{ name = "ctr" }, { name = "cvr", after = "ctr" }]
[model]
arch = "ple"
[train]
batch_size = 1024
"""


def test_config_loads_with_overrides_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    cfg = load_config(path, ["train.batch_size=256", "model.expert_dims=[64, 32]", "text.model=/models/bert"])
    assert cfg.model.arch == "ple"
    assert cfg.train.batch_size == 256
    assert cfg.model.expert_dims == (64, 32)
    assert cfg.text.model == "/models/bert"
    assert cfg.tasks[1] == TaskConfig(name="cvr", after="ctr")
    cfg.save(tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "unknown key train.lrr"),
        ("model.arch=moe", r"model.arch in .*expected one of \['shared_bottom', 'mmoe', 'ple'\], got 'moe'"),
        ("model.num_experts=0", "model.num_experts must be >= 1"),
        ("train.freeze=['towers']", r"train.freeze\[0\] in .*expected one of"),
        ("batch_size", "must look like section.key=value"),
        ("optim.lr=0", r"\[optim\] in .*optim.embedding_lr and optim.lr must be > 0, got 0.1, 0.0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
        ("loss.huber_delta=0", r"\[loss\] in .*huber_delta > 0 expected, got 1.5, 0.0, 0.025, 0.0"),
        ("model.dense_dims=[16, 0]", r"dense_dims must be positive and cross_layers, cross_rank >= 0, got \(16, 0\)"),
        ("model.cross_rank=-1", r"cross_layers, cross_rank >= 0, got \(16,\), 2, -1"),
        ("tasks=[{ name = 'ctr', weight = -1 }]", "task 'ctr': weight must be >= 0, got -1.0"),
        ("tasks=[{ name = 'ctr', after = 'ctr' }]", "task 'ctr': after must name another task, got itself"),
        ("dataset=''", "dataset must name a prepared dataset folder"),
    ],
)
def test_bad_config_values_are_refused_with_the_key(tmp_path: Path, override: str, message: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    with pytest.raises(InputError, match=message) as caught:
        load_config(path, [override])
    assert caught.type is InputError


def test_task_after_must_name_a_configured_task() -> None:
    with pytest.raises(ValueError, match="after = 'ctr' is not among tasks"):
        Config(dataset="d", tasks=(TaskConfig("cvr", after="ctr"),))
