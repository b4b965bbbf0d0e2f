import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys_mtl.cli import main
from recsys_mtl.config import TextConfig
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError, MissingInputError
from recsys_mtl.text import TextEncoder, encode_dataset, load_text_vectors, mean_pool, resolve_model

CPU = torch.device("cpu")


@pytest.fixture
def dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "ds", ignore=shutil.ignore_patterns("text_emb")))


def test_each_text_is_encoded_once_and_only_new_or_changed_texts_later(dataset: Path, tiny_bert: Path) -> None:
    cfg = TextConfig(model=str(tiny_bert), dtype="float32")
    schema = Schema.load(dataset)
    first = encode_dataset(dataset, cfg, CPU, progress=False)
    assert first == {t.name: t.num_texts - 1 for t in schema.texts}
    vectors = load_text_vectors(dataset, schema, cfg)
    assert vectors["item_title"].shape == (schema.texts[0].num_texts, 32)
    assert (vectors["item_title"][0] == 0).all()
    assert encode_dataset(dataset, cfg, CPU, progress=False) == {"item_title": 0, "ad_text": 0}

    titles = dataset / "text" / "item_title.parquet"
    table = pl.read_parquet(titles)
    table.with_columns(
        pl.when(pl.col("id") == 2).then(pl.lit("brand new words")).otherwise("text").alias("text")
    ).write_parquet(titles)
    assert encode_dataset(dataset, cfg, CPU, progress=False) == {"item_title": 1, "ad_text": 0}
    again = load_text_vectors(dataset, schema, cfg)["item_title"]
    changed = (again != vectors["item_title"]).any(dim=1).nonzero().flatten().tolist()
    assert changed == [2]
    assert encode_dataset(dataset, TextConfig(model=str(tiny_bert), dtype="bfloat16"), CPU, progress=False) == first


def test_stored_vectors_equal_a_fresh_encoding(dataset: Path, tiny_bert: Path) -> None:
    cfg = TextConfig(model=str(tiny_bert), batch_size=7)
    encode_dataset(dataset, cfg, CPU, progress=False)
    texts = pl.read_parquet(dataset / "text" / "ad_text.parquet").sort("id")["text"].to_list()
    fresh = TextEncoder(cfg, CPU).encode(texts)
    stored = load_text_vectors(dataset, Schema.load(dataset), cfg)["ad_text"][1:]
    torch.testing.assert_close(stored, fresh)


def test_padding_does_not_change_a_text_embedding(tiny_bert: Path) -> None:
    encoder = TextEncoder(TextConfig(model=str(tiny_bert), batch_size=8), CPU)
    alone = encoder.encode(["red shoes"])
    padded = encoder.encode(["red shoes", "the ultimate guide to hiking boots on a budget for the long trail"])
    torch.testing.assert_close(alone[0], padded[0], rtol=1e-5, atol=1e-5)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_missing_or_foreign_vectors_are_refused(dataset: Path, tiny_bert: Path) -> None:
    schema = Schema.load(dataset)
    with pytest.raises(MissingInputError, match=r"run `recsys-mtl encode-text"):
        load_text_vectors(dataset, schema, TextConfig(model=str(tiny_bert)))
    encode_dataset(dataset, TextConfig(model=str(tiny_bert)), CPU, progress=False)
    with pytest.raises(
        InputError, match=r"expected .* from all-MiniLM-L6-v2@bfloat16@128 or all-MiniLM-L6-v2@float32@128"
    ):
        load_text_vectors(dataset, schema, TextConfig())
    vectors = dataset / "text_emb" / "ad_text.parquet"
    vectors.write_bytes(vectors.read_bytes()[:-30])
    with pytest.raises(InputError, match=rf"{vectors}: cannot read it"):
        load_text_vectors(dataset, schema, TextConfig(model=str(tiny_bert)))


def test_unknown_model_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match=r"not 'all-MiniLM-L6-v2' and not a folder with config\.json"):
        resolve_model(str(tmp_path))


def test_packaged_minilm_is_found_locally() -> None:
    folder = resolve_model("all-MiniLM-L6-v2")
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()


def test_encode_text_command_reports_new_texts(
    dataset: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["encode-text", str(dataset), "--model", str(tiny_bert), "--quiet"]) == 0
    assert "item_title: 300 new, ad_text: 40 new" in capsys.readouterr().out
    assert main(["encode-text", str(dataset), "--model", str(tiny_bert), "--quiet"]) == 0
    assert "item_title: 0 new, ad_text: 0 new" in capsys.readouterr().out


@pytest.mark.slow
def test_packaged_minilm_encodes_the_default_world_once(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "ds"
    assert main(["synth", "--out", str(raw), "--quiet"]) == 0
    assert main(["prepare", str(raw), "--out", str(out)]) == 0
    assert encode_dataset(out, TextConfig(), CPU, progress=False) == {"item_title": 5000, "ad_text": 500}
    assert encode_dataset(out, TextConfig(), CPU, progress=False) == {"item_title": 0, "ad_text": 0}
    vectors = load_text_vectors(out, Schema.load(out), TextConfig())["item_title"]
    assert vectors.shape == (5001, 384)


def test_another_max_length_encodes_again_and_the_truncated_share_is_reported(
    dataset: Path, tiny_bert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long = TextConfig(model=str(tiny_bert), max_length=64)
    titles = pl.read_parquet(dataset / "text" / "item_title.parquet")["text"].to_list()
    lengths = TextEncoder(long, CPU).token_lengths(titles)
    short = TextConfig(model=str(tiny_bert), max_length=int(np.median(lengths)))
    caplog.set_level("INFO", logger="recsys_mtl.text")
    first = encode_dataset(dataset, short, CPU, progress=False)
    cut = int((lengths > short.max_length).sum())
    assert 0 < cut < len(titles)
    assert f"{cut} of them ({100 * cut / len(titles):.1f}%, median {int(np.median(lengths))} tokens)" in caplog.text
    assert encode_dataset(dataset, long, CPU, progress=False) == first  # a new key: every text again
    with pytest.raises(InputError, match=f"@float32@{short.max_length}: run"):
        load_text_vectors(dataset, Schema.load(dataset), short)
