"""Prepared dataset -> stream of Batch: row groups read as Arrow, made into tensors by column, never by row.

Rank r of w reads the r-th of w equal, contiguous parts of the (optionally shuffled) row-group sequence; a row group on
a boundary is split by rows. So ranks read disjoint parts, together every row exactly once, and their row counts differ
by at most one.
"""

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_mtl.data.batch import Batch
from recsys_mtl.data.schema import KEY_PREFIX, SPLITS, Schema, check_dataset
from recsys_mtl.errors import reading

# pyarrow's default pool (mimalloc) decodes a row group 6x slower once torch has run a training step in the process
# (120 vs 18 ms for the default world's 65k rows): the system allocator keeps it fast
pa.set_memory_pool(pa.system_memory_pool())


@dataclass(frozen=True)
class RowGroup:
    """Rows [offset, offset + num_rows) of one parquet row group: the reader's unit of work."""

    path: Path
    index: int
    num_rows: int
    offset: int = 0


class Dataset:
    """A prepared dataset folder, checked against its schema when opened."""

    def __init__(self, folder: Path | str, check: bool = True) -> None:
        self.folder = Path(folder)
        self.schema = Schema.load(self.folder)
        if check:
            check_dataset(self.folder, self.schema)

    def row_groups(self, split: str) -> list[RowGroup]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        groups = []
        for name in self.schema.splits[split].files:
            path = self.folder / name
            with reading(path):
                meta = pq.ParquetFile(path).metadata
            groups += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
        return groups

    def num_rows(self, split: str) -> int:
        return self.schema.splits[split].num_rows


class BatchBuilder:
    """Turns a frame of shard rows into a Batch: vectorised over columns, never looping over rows."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        dense = schema.dense_features
        self.dense_columns = [f.name for f in dense]
        self.log1p = np.array([f.transform == "log1p" for f in dense])
        self.mean = np.array([f.mean for f in dense], dtype=np.float32)
        self.std = np.array([f.std for f in dense], dtype=np.float32)
        self.multi_hot = {f.name for f in schema.features if f.kind == "multi_hot"}
        self.columns = [*schema.columns()]

    def __call__(self, df: pl.DataFrame) -> Batch:
        """Build a Batch from B shard rows.

        Returns:
            Batch with sparse lengths [F * B], dense [B, D_dense], labels and masks [B] per task.
        """
        num_rows = df.height
        values, lengths = [], []
        for key in self.schema.kjt_keys:
            column = df.get_column(key)
            if key in self.multi_hot:  # through Arrow: polars' list expressions wait on its thread pool
                lists = column.to_arrow()
                lengths.append(pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int32))
                values.append(pc.list_flatten(lists).to_numpy())
            else:
                lengths.append(np.ones(num_rows, dtype=np.int32))
                values.append(column.to_numpy())
        sparse = KeyedJaggedTensor(
            keys=list(self.schema.kjt_keys),
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),  # [sum of lengths]
            lengths=torch.from_numpy(np.concatenate(lengths)),  # [F * B], feature-major
        )
        dense = self._standardised(df)  # [B, D_dense]
        dense = np.where(np.isfinite(dense), dense, np.float32(0.0))  # null or non-finite: 0, the train mean
        labels, masks = {}, {}
        for label in self.schema.labels:
            target = df.get_column(label.column).to_numpy().astype(np.float32, copy=False)  # [B], NaN = absent
            present = ~np.isnan(target)
            labels[label.task] = torch.from_numpy(np.where(present, target, 0.0).astype(np.float32))
            masks[label.task] = torch.from_numpy(present)
        keys = pl.DataFrame([df.get_column(KEY_PREFIX + k).alias(k) for k in self.schema.keys])
        return Batch(sparse=sparse, dense=torch.from_numpy(dense), labels=labels, masks=masks, keys=keys)

    def non_finite(self, df: pl.DataFrame) -> dict[str, int]:
        """Per dense column, the rows of `df` whose value is not finite after its transform and standardisation
        (inf, NaN, log1p of a value < -1): the rows that `__call__` treats as null. Nulls are not counted."""
        null = df.select(pl.col(self.dense_columns).is_null()).to_numpy().reshape(df.height, len(self.dense_columns))
        bad = ~np.isfinite(self._standardised(df)) & ~null
        return dict(zip(self.dense_columns, bad.sum(0).tolist(), strict=True))  # [D_dense] -> per column

    def _standardised(self, df: pl.DataFrame) -> np.ndarray:
        """The dense columns after transform and train standardisation: [B, D_dense] float32, NaN where null."""
        columns = [df.get_column(c).to_numpy().astype(np.float32, copy=False) for c in self.dense_columns]
        dense = np.stack(columns, 1) if columns else np.zeros((df.height, 0), np.float32)  # [B, D_dense], NaN = null
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # non-finite results are handled after
            dense = np.where(self.log1p, np.log1p(dense), dense)
            return (dense - self.mean) / self.std


@dataclass(frozen=True)
class ReadOrder:
    """Which rows a reader takes and in what order; `read_batches` and `count_batches` take the same one.

    rank / world_size: this reader takes the rank-th of world_size contiguous parts of the row groups. shuffle:
    permute the row groups (the same permutation on every rank) and the rows within windows of row groups, seeded by
    (seed, epoch). drop_last: drop the final partial batch.
    """

    rank: int = 0
    world_size: int = 1
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    drop_last: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")

    def generator(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])


def read_batches(
    dataset: Dataset,
    split: str,
    batch_size: int,
    order: ReadOrder = ReadOrder(),
    *,
    shuffle_window: int = 4,
    start_batch: int = 0,
) -> Iterator[Batch]:
    """Stream `split` as Batches of `batch_size` rows (the last one smaller unless `order.drop_last`).

    Args:
        dataset: an opened prepared dataset.
        split: "train", "valid" or "test".
        batch_size: rows per batch.
        order: which part of the split, shuffled or not (see ReadOrder).
        shuffle_window: row groups mixed together when shuffling rows.
        start_batch: skip this many batches first (resuming mid-epoch); they are read but not built.

    Raises:
        ValueError: bad batch_size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = order.generator()
    mine = rank_row_groups(dataset, split, order.rank, order.world_size, rng if order.shuffle else None)
    build = BatchBuilder(dataset.schema)
    columns = build.columns
    window = shuffle_window if order.shuffle else 1
    pending: pl.DataFrame | None = None
    for start in range(0, len(mine), window):
        frames = [_read_row_group(group, columns) for group in mine[start : start + window]]
        frame = pl.concat(frames, rechunk=False)
        if order.shuffle:
            frame = frame[rng.permutation(frame.height)]
        if pending is not None:
            frame = pl.concat([pending, frame], rechunk=False)
        num_full = frame.height // batch_size * batch_size
        for offset in range(0, num_full, batch_size):
            if start_batch > 0:
                start_batch -= 1
                continue
            yield build(frame.slice(offset, batch_size))
        pending = frame.slice(num_full) if num_full < frame.height else None
    if pending is not None and not order.drop_last and start_batch == 0:
        yield build(pending)


def rank_row_groups(
    dataset: Dataset, split: str, rank: int, world_size: int, rng: np.random.Generator | None = None
) -> list[RowGroup]:
    """The rows rank `rank` reads: its contiguous 1 / world_size of the row groups (permuted by `rng` when shuffling),
    cut at row boundaries."""
    groups = dataset.row_groups(split)
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    total = sum(g.num_rows for g in groups)
    low, high = total * rank // world_size, total * (rank + 1) // world_size
    mine, start = [], 0
    for group in groups:
        first, last = max(low, start), min(high, start + group.num_rows)
        if first < last:
            mine.append(dataclasses.replace(group, offset=first - start, num_rows=last - first))
        start += group.num_rows
    return mine


def count_batches(dataset: Dataset, split: str, batch_size: int, order: ReadOrder = ReadOrder()) -> int:
    """How many batches `read_batches` yields with the same arguments (from the row-group sizes, without reading)."""
    rng = order.generator() if order.shuffle else None
    rows = sum(g.num_rows for g in rank_row_groups(dataset, split, order.rank, order.world_size, rng))
    return rows // batch_size if order.drop_last else -(-rows // batch_size)


def _read_row_group(group: RowGroup, columns: list[str]) -> pl.DataFrame:
    with reading(group.path):
        table = pq.ParquetFile(group.path).read_row_group(group.index, columns=columns)
    return pl.from_arrow(table.slice(group.offset, group.num_rows))  # type: ignore[return-value]
