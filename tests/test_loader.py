import math
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from recsys_mtl.data.loader import BatchBuilder, Dataset, ReadOrder, count_batches, read_batches
from recsys_mtl.errors import InputError


@pytest.fixture(scope="module")
def dataset(tiny_dataset: Path) -> Dataset:
    return Dataset(tiny_dataset)


def _ids(dataset: Dataset, split: str = "train", **kwargs) -> list[int]:
    return [
        i for b in read_batches(dataset, split, 700, ReadOrder(**kwargs)) for i in b.keys["impression_id"].to_list()
    ]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_every_row_exactly_once(dataset: Dataset, world_size: int, shuffle: bool) -> None:
    parts = [_ids(dataset, rank=r, world_size=world_size, shuffle=shuffle, seed=5) for r in range(world_size)]
    everything = [i for part in parts for i in part]
    assert len(everything) == len(set(everything)) == dataset.num_rows("train")
    assert set(everything) == set(pl.read_parquet(dataset.folder / "train")["key_impression_id"])
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1  # boundary row groups are split by rows
    assert [count_batches(dataset, "train", 700, ReadOrder(r, world_size)) for r in range(world_size)] == [
        math.ceil(size / 700) for size in sizes
    ]


def test_shuffle_is_seeded_and_changes_with_the_epoch(dataset: Dataset) -> None:
    plain = _ids(dataset)
    first = _ids(dataset, shuffle=True, seed=1)
    assert first == _ids(dataset, shuffle=True, seed=1)
    assert first != _ids(dataset, shuffle=True, seed=1, epoch=1)
    assert first != plain
    assert sorted(first) == sorted(plain)


def test_batches_have_the_requested_size(dataset: Dataset) -> None:
    rows = dataset.num_rows("valid")
    sizes = [len(b) for b in read_batches(dataset, "valid", 1024, ReadOrder(shuffle=True))]
    assert sizes == [1024] * (rows // 1024) + ([rows % 1024] if rows % 1024 else [])
    assert [len(b) for b in read_batches(dataset, "valid", 1024, ReadOrder(drop_last=True))] == [1024] * (rows // 1024)


def test_batch_holds_exactly_the_shard_rows(dataset: Dataset) -> None:
    batch = next(read_batches(dataset, "test", 300))
    rows = pl.read_parquet(dataset.folder / dataset.schema.splits["test"].files[0]).head(300)
    schema = dataset.schema
    assert batch.sparse.keys() == list(schema.kjt_keys)
    assert batch.sparse.stride() == 300
    features = batch.sparse.to_dict()
    assert features["user_id"].values().tolist() == rows["user_id"].to_list()
    assert features["item_title"].values().tolist() == rows["item_title"].to_list()
    recent = features["recent_categories"]
    assert recent.lengths().tolist() == rows["recent_categories"].list.len().to_list()
    assert recent.values().tolist() == [v for row in rows["recent_categories"].to_list() for v in row]
    price = schema.dense_features[0]
    assert price.name == "price"
    expected = [0.0 if p is None else (math.log1p(p) - price.mean) / price.std for p in rows["price"].to_list()]
    torch.testing.assert_close(batch.dense[:, 0], torch.tensor(expected, dtype=torch.float32))
    assert batch.masks["rating"].tolist() == rows["rating"].is_not_null().to_list()
    assert batch.labels["rating"].tolist() == rows["rating"].fill_null(0).to_list()
    assert batch.labels["ctr"].tolist() == rows["click"].to_list()
    assert batch.keys.columns == ["impression_id", "user_id", "item_id", "ad_id"]
    assert batch.keys["impression_id"].to_list() == rows["key_impression_id"].to_list()


def test_batch_moves_to_a_device_unchanged(dataset: Dataset) -> None:
    batch = next(read_batches(dataset, "valid", 64))
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.sparse.values(), batch.sparse.values())
    assert torch.equal(moved.dense, batch.dense)
    assert all(torch.equal(moved.masks[t], batch.masks[t]) for t in batch.masks)


def test_dense_features_are_standardised_on_train(dataset: Dataset) -> None:
    dense = torch.cat([b.dense for b in read_batches(dataset, "train", 4096)])  # [N, D_dense]
    present = pl.read_parquet(dataset.folder / "train").select(f.name for f in dataset.schema.dense_features)
    for d, column in enumerate(present.columns):
        mask = torch.from_numpy(present[column].is_not_null().to_numpy())
        assert dense[mask, d].mean().item() == pytest.approx(0.0, abs=1e-4)
        assert dense[mask, d].std().item() == pytest.approx(1.0, abs=1e-3)
        assert (dense[~mask, d] == 0).all()


def test_bad_reader_arguments_are_refused(dataset: Dataset) -> None:
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        ReadOrder(rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(read_batches(dataset, "train", 0))


def test_unknown_split_is_refused(dataset: Dataset) -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        next(read_batches(dataset, "validation", 8))


def test_non_finite_dense_values_are_read_as_null_and_counted(dataset: Dataset) -> None:
    frame = pl.read_parquet(dataset.folder / dataset.schema.splits["test"].files[0]).head(4)
    frame = frame.with_columns(
        pl.Series("price", [math.inf, -5.0, None, 9.0], pl.Float32),  # log1p: -5 has no logarithm
        pl.Series("bid", [math.nan, 1.0, 2.0, None], pl.Float32),
    )
    build = BatchBuilder(dataset.schema)
    assert build.non_finite(frame) == {"price": 2, "length": 0, "bid": 1}  # nulls are not counted
    dense = build(frame).dense  # [4, D_dense]: price, length, bid
    price, bid = (dataset.schema.dense_features[i] for i in (0, 2))
    expected_price = [0.0, 0.0, 0.0, (math.log1p(9.0) - price.mean) / price.std]
    expected_bid = [0.0, (1.0 - bid.mean) / bid.std, (2.0 - bid.mean) / bid.std, 0.0]
    torch.testing.assert_close(dense[:, 0], torch.tensor(expected_price))
    torch.testing.assert_close(dense[:, 2], torch.tensor(expected_bid))


def test_truncated_shard_read_mid_split_is_refused_naming_it(tiny_dataset: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_dataset, tmp_path / "ds"))
    opened = Dataset(folder)
    shard = folder / opened.schema.splits["train"].files[-1]
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(InputError, match=rf"{shard}: cannot read it"):
        list(read_batches(opened, "train", 4096))
