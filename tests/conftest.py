import os
import shutil
from pathlib import Path

import pytest
import torch

from data_prep.description import load_description
from data_prep.prepare import prepare
from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.config import Config
from recsys_mtl.structs import from_mapping

REPO = Path(__file__).resolve().parents[1]
# the project's small real datasets live beside the checkout (../shared/data); a clone elsewhere can point at them
SHARED_DATA_CANDIDATES = [
    Path(os.environ.get("RECSYS_MTL_SHARED_DATA", REPO.parent / "shared" / "data")),
    Path("/work/shared/data"),
]
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
    for root in SHARED_DATA_CANDIDATES:
        if (root / name).is_dir():
            return root / name
    pytest.skip(f"{name} not found under {[str(p) for p in SHARED_DATA_CANDIDATES]}; set RECSYS_MTL_SHARED_DATA")


def make_tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT with a 99-token word-piece vocabulary, saved as a local transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *(f"##{c}" for c in letters), *"0123456789"]
    vocab += [*".,:;!?'-()%&/", "the", "on", "to", "of", "in", "and", "for", "shoes", "dress", "guide", "video"]
    vocab = vocab[:99]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=len(vocab)
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="session")
def text_dataset(tiny_dataset: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset with its titles and ad texts encoded by the tiny BERT."""
    from recsys_mtl.config import TextConfig
    from recsys_mtl.text import encode_dataset

    out = Path(shutil.copytree(tiny_dataset, tmp_path_factory.mktemp("text") / "synthetic"))
    encode_dataset(out, TextConfig(model=str(tiny_bert)), torch.device("cpu"), progress=False)
    return out


def tiny_config(dataset: Path, bert: Path, **sections: dict | list) -> Config:
    """A small config for the tiny world: all four tasks (cvr ESMM after ctr), small experts and towers."""

    data = {
        "dataset": str(dataset),
        "tasks": [{"name": "ctr"}, {"name": "cvr", "after": "ctr"}, {"name": "rating"}, {"name": "reads"}],
        "model": {"expert_dims": [32, 16], "tower_dims": [8], "dense_dims": [8], "text_dim": 8, "num_experts": 3},
        "text": {"model": str(bert)},
        "train": {"batch_size": 512, "epochs": 1, "bf16": False},  # fp32 on every machine: exact comparisons
    }
    for section, values in sections.items():
        data[section] = (
            values if section in ("tasks", "sharding", "uvm_caching") else {**data.get(section, {}), **values}
        )
    return from_mapping(Config, data, "tiny_config")
