import importlib
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_step import package_at  # benchmarks/ is not a package


def test_a_revision_is_imported_whole_from_its_own_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_step --a-revision: every module of the extracted package comes from its copy, none from the working
    tree's recsys_mtl (else the benchmark would compare the working tree with itself)."""
    name = package_at("HEAD", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    step = importlib.import_module(f"{name}.step")
    config = importlib.import_module(f"{name}.config")
    assert step.Dataset.__module__ == f"{name}.data.loader"  # its own imports, renamed
    assert config.load_config(REPO / "configs" / "demo.toml").model.arch == "mmoe"
    extracted = [m for key, m in sys.modules.items() if key.startswith(name)]
    assert len(extracted) > 10
    assert all(Path(m.__file__).is_relative_to(tmp_path) for m in extracted if getattr(m, "__file__", None))
