from pathlib import Path

import pytest

from data_prep.description import load_description
from data_prep.prepare import prepare
from data_prep.synth import WorldConfig, generate_world

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_WORLD = WorldConfig(impressions=30_000, users=400, items=300, ads=40, days=7, seed=7, chunk_rows=4_000)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic world (30k impressions over 7 days), written once per test session."""
    return generate_world(tmp_path_factory.mktemp("world") / "raw", TINY_WORLD, progress=False)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world prepared with the shipped synthetic description, in small shards and row groups."""
    desc = load_description("synthetic")
    desc = type(desc)(**{**desc.__dict__, "rows_per_shard": 8_000, "row_group_size": 1_000})
    out = tmp_path_factory.mktemp("dataset") / "synthetic"
    prepare(tiny_world, out, desc)
    return out


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is not available")
    return path
