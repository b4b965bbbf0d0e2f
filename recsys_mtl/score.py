"""Offline batch scoring: a trained run over a prepared split or raw parquet rows, into parquet shards of predictions.

The input's row groups are cut into shards of consecutive row groups (`part-00000.parquet`, ... in OUT_DIR, one per
shard, whatever the number of ranks). Rank r of N scores shards r, r + N, ...; each shard is written to a temporary
file and renamed, so a finished-looking shard is always whole, and a rerun skips the shards already there. Every rank
holds a whole copy of the model (fp32, or with int8 embedding tables), so ranks never wait on each other while
scoring; memory stays bounded by one row group and one shard's predictions.
"""

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.ao.quantization import PlaceholderObserver, QConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from tqdm import tqdm

from recsys_mtl.checkpoint import PROGRESS_FILE, SafeReader, fingerprint, read_progress, trained_checkpoint
from recsys_mtl.config import Config, load_config
from recsys_mtl.data.loader import BatchBuilder
from recsys_mtl.data.schema import KEY_PREFIX, SCHEMA_FILE, SPLITS, Schema, check_dataset
from recsys_mtl.distributed import world
from recsys_mtl.files import atomic_write_text
from recsys_mtl.model.losses import TaskSpec, predict, task_specs
from recsys_mtl.model.ranker import MultiTaskRanker
from recsys_mtl.trainer import autocast, build_ranker

log = logging.getLogger(__name__)
MANIFEST_FILE = "scoring.json"
SUMMARY_FILE = "summary.json"
RawEncoder = Callable[[pl.DataFrame, str], pl.DataFrame]  # raw rows, their source -> shard rows (data_prep.encode)
MissingText = Literal["empty", "error"]


@dataclass(frozen=True)
class ScoreShard:
    """Row groups `row_groups` of input file `path`, scored into OUT_DIR/part-<index>.parquet."""

    index: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


@dataclass
class ScoreSummary:
    """What one call scored (rows and shards summed over ranks)."""

    rows: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0  # the largest resident set of a rank
    shards_written: list[str] = field(default_factory=list)
    shards_skipped: int = 0
    unknown_ids: dict[str, int] = field(default_factory=dict)  # id feature -> rows with the unknown id 0
    missing_text: dict[str, int] = field(default_factory=dict)  # text feature -> rows scored with the empty text

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def load_scoring_model(
    run_dir: Path, device: torch.device, int8: bool = False
) -> tuple[Config, Schema, MultiTaskRanker, tuple[TaskSpec, ...]]:
    """The run's config, dataset schema, and model (best checkpoint, else last) in eval mode, whole on this process.

    The checkpoint is read without collectives, so it loads whatever number of ranks saved it. With `int8`, every
    embedding table (text tables too) becomes a torchrec quantized table (int8 rows, row-wise scale and bias).

    Raises:
        FileNotFoundError: no config.toml or checkpoint in `run_dir`.
        ValueError: the checkpoint does not match the config or the dataset.
    """
    cfg = load_config(Path(run_dir) / "config.toml")
    schema = Schema.load(Path(cfg.dataset))
    checkpoint = trained_checkpoint(run_dir)
    read_progress(checkpoint, fingerprint(cfg, schema))
    model, _ = build_ranker(cfg, Path(cfg.dataset), schema, device)  # its text tables come from the checkpoint
    dcp.load({"model": model.state_dict()}, storage_reader=SafeReader(checkpoint), no_dist=True)
    if int8:
        qconfig = QConfig(activation=PlaceholderObserver, weight=PlaceholderObserver.with_args(dtype=torch.qint8))
        for name in ("ebc", "text_ebc"):
            tables = getattr(model, name)
            if tables is not None:
                tables.qconfig = qconfig
                setattr(model, name, QuantEmbeddingBagCollection.from_float(tables))
    return cfg, schema, model.to(device).eval(), task_specs(cfg, schema)


def input_files(inp: Path, split: str, raw: bool) -> list[Path]:
    """The parquet files to score: a prepared dataset's `split`, or raw parquet (a file, a folder of them, a glob).

    Raises:
        FileNotFoundError: nothing to score at `inp`.
    """
    if not raw:
        schema = Schema.load(inp)
        return [inp / name for name in schema.splits[split].files]
    if inp.is_file():
        return [inp]
    files = sorted(inp.rglob("*.parquet")) if inp.is_dir() else sorted(inp.parent.glob(inp.name))
    if not files:
        raise FileNotFoundError(f"{inp}: no parquet files to score")
    return files


def plan_shards(files: list[Path], rows_per_shard: int) -> list[ScoreShard]:
    """Consecutive row groups of each file, up to `rows_per_shard` rows a shard (at least one row group)."""
    shards: list[ScoreShard] = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        groups: list[int] = []
        rows = 0
        for i in range(meta.num_row_groups):
            size = meta.row_group(i).num_rows
            if groups and rows + size > rows_per_shard:
                shards.append(ScoreShard(len(shards), str(path), tuple(groups), rows))
                groups, rows = [], 0
            groups.append(i)
            rows += size
        if groups:
            shards.append(ScoreShard(len(shards), str(path), tuple(groups), rows))
    return shards


def score(
    run_dir: Path,
    inp: Path,
    out: Path,
    device: torch.device,
    *,
    split: str = "test",
    encoder: RawEncoder | None = None,
    int8: bool = False,
    batch_size: int = 8192,
    rows_per_shard: int = 1 << 20,
    missing_text: MissingText = "empty",
    overwrite: bool = False,
    progress: bool = True,
) -> ScoreSummary:
    """Score `inp` with the run in `run_dir` into parquet shards under `out`: the key columns, then `pred_<task>`
    (and `pred_<task>_joint` for a task after another: pCTCVR for cvr after ctr), one row per input row, in order.

    Args:
        inp: a prepared dataset folder (its `split` is scored; it must have the run's vocabularies), or raw parquet
            rows when `encoder` is given (a file, a folder, a glob).
        encoder: raw rows -> shard rows with the run's vocabularies (data_prep.encode.RawEncoder).
        int8: score with int8-quantized embedding tables.
        missing_text: "empty": rows whose item has no text vector use the empty-text row (zeros, as in training) and
            are counted; "error": refuse them.
        overwrite: replace scores of another input or model in `out` instead of refusing.

    Returns:
        The summary over all ranks (on every rank); rank 0 also writes it to `out/summary.json`.

    Raises:
        FileExistsError: `out` holds scores of another input, model or option set (and not `overwrite`).
        ValueError: a prepared input with other vocabularies than the run's; a row without text under "error".
    """
    start = time.perf_counter()
    rank, world_size = world()
    if batch_size < 1 or rows_per_shard < 1:
        raise ValueError(f"batch_size and rows_per_shard must be >= 1, got {batch_size}, {rows_per_shard}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    inp, out = Path(inp), Path(out)
    cfg, schema, model, specs = load_scoring_model(run_dir, device, int8)
    if encoder is None:
        _check_prepared_input(inp, schema, split)
    checkpoint = trained_checkpoint(run_dir)
    shards = plan_shards(input_files(inp, split, raw=encoder is not None), rows_per_shard)
    manifest = {
        "run": str(Path(run_dir).resolve()),
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_written_ns": (checkpoint / PROGRESS_FILE).stat().st_mtime_ns,  # a retrained run differs
        "input": str(inp.resolve()),
        "split": split if encoder is None else None,
        "int8": int8,
        "shards": [asdict(s) for s in shards],
    }
    _claim(out, manifest, overwrite, rank)
    mine = [s for s in shards if s.index % world_size == rank]
    todo = [s for s in mine if not _finished(out / s.name, s.num_rows)]
    summary = ScoreSummary(shards_skipped=len(mine) - len(todo))
    if summary.shards_skipped:
        log.info("rank %d: %d of its %d shards are already in %s", rank, summary.shards_skipped, len(mine), out)
    build = BatchBuilder(schema)
    bar = tqdm(
        total=sum(s.num_rows for s in todo),
        unit="row",
        unit_scale=True,
        desc=f"score (rank {rank} of {world_size})" if world_size > 1 else "score",
        disable=not progress or rank != 0,
    )
    with torch.inference_mode(), autocast(cfg, device):
        for shard in todo:
            parts = []
            for frame in _frames(shard, schema, encoder):
                _count_fallbacks(frame, schema, summary, missing_text, shard)
                for offset in range(0, frame.height, batch_size):
                    batch = build(frame.slice(offset, batch_size)).to(device)
                    values = predict(model(batch).logits, specs)
                    parts.append(batch.keys.with_columns(_columns(values)))
                    bar.update(len(batch))
            _write_shard(out / shard.name, pl.concat(parts), shard)
            summary.rows += shard.num_rows
            summary.shards_written.append(shard.name)
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = _merge(summary, world_size)
    if rank == 0:
        atomic_write_text(
            out / SUMMARY_FILE, json.dumps(asdict(summary) | {"rows_per_second": summary.rows_per_second})
        )
    return summary


def _check_prepared_input(inp: Path, schema: Schema, split: str) -> None:
    """A prepared input must share the run's encoding: tables, features (with their statistics) and text tables."""
    if not (inp / SCHEMA_FILE).is_file():
        raise FileNotFoundError(f"{inp}: not a prepared dataset (no {SCHEMA_FILE}); raw parquet needs an encoder")
    theirs = Schema.load(inp)
    for part in ("tables", "features", "texts", "labels"):
        if getattr(theirs, part) != getattr(schema, part):
            raise ValueError(
                f"{inp}: its {part} differ from those of the run's dataset, so its ids mean other things; "
                "score its raw rows instead"
            )
    check_dataset(inp, theirs, splits=(split,))


def _claim(out: Path, manifest: dict, overwrite: bool, rank: int) -> None:
    """Refuse an `out` that holds scores of something else (or clear it with `overwrite`); record what this is."""
    path = out / MANIFEST_FILE
    text = json.dumps(manifest, indent=1)
    if path.is_file() and path.read_text() != text:
        if not overwrite:
            raise FileExistsError(
                f"{out} holds scores of another input, model or option set ({path}); "
                "choose another --out or pass --overwrite"
            )
        if rank == 0:
            for old in out.glob("part-*.parquet"):
                old.unlink()
    if rank == 0:
        for stale in out.glob(".part-*.tmp-*"):  # left by a killed run; no rank writes before the barrier
            stale.unlink()
    if world()[1] > 1:
        dist.barrier()  # every rank has compared before rank 0 replaces the manifest
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


def _finished(path: Path, num_rows: int) -> bool:
    return path.is_file() and pq.ParquetFile(path).metadata.num_rows == num_rows


def _frames(shard: ScoreShard, schema: Schema, encoder: RawEncoder | None) -> Iterator[pl.DataFrame]:
    """The shard's rows as shard-format frames, one row group at a time."""
    reader = pq.ParquetFile(shard.path)
    columns = None if encoder is not None else list(schema.columns())
    for index in shard.row_groups:
        frame = pl.from_arrow(reader.read_row_group(index, columns=columns))
        yield encoder(frame, f"{shard.path} (row group {index})") if encoder is not None else frame  # type: ignore[arg-type]


def _count_fallbacks(
    frame: pl.DataFrame, schema: Schema, summary: ScoreSummary, missing_text: MissingText, shard: ScoreShard
) -> None:
    """Count rows with the unknown id (0) per id feature and rows without a text vector per text feature."""
    for f in schema.sparse_features:
        if f.kind == "id":
            summary.unknown_ids[f.name] = summary.unknown_ids.get(f.name, 0) + int((frame[f.name] == 0).sum())
    for text in schema.texts:
        # rows that have a key (a null key has no text to miss), where the data carries it as a key column
        has_key = frame[KEY_PREFIX + text.key].is_not_null() if text.key in schema.keys else True
        missing = int(((frame[text.name] == 0) & has_key).sum())
        if missing and missing_text == "error":
            raise ValueError(
                f"{shard.path}: {missing} rows have a {text.key!r} without a {text.name!r} text vector; "
                "encode their texts (prepare and encode-text) or score with --missing-text empty"
            )
        summary.missing_text[text.name] = summary.missing_text.get(text.name, 0) + missing


def _columns(values: dict[str, torch.Tensor]) -> list[pl.Series]:
    return [pl.Series(f"pred_{name}", value.float().cpu().numpy()) for name, value in values.items()]


def _write_shard(path: Path, frame: pl.DataFrame, shard: ScoreShard) -> None:
    if frame.height != shard.num_rows:
        raise ValueError(
            f"{shard.path}: scored {frame.height} rows of row groups {shard.row_groups}, expected {shard.num_rows}"
        )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.write_parquet(tmp)
    tmp.replace(path)


def _merge(summary: ScoreSummary, world_size: int) -> ScoreSummary:
    """The summaries of all ranks, added up (seconds: the slowest rank's)."""
    if world_size == 1:
        return summary
    gathered: list[ScoreSummary | None] = [None] * world_size
    dist.all_gather_object(gathered, summary)
    total = ScoreSummary()
    for part in (p for p in gathered if p is not None):
        total.rows += part.rows
        total.seconds = max(total.seconds, part.seconds)
        total.peak_memory_mb = max(total.peak_memory_mb, part.peak_memory_mb)
        total.shards_written += part.shards_written
        total.shards_skipped += part.shards_skipped
        for name, count in part.unknown_ids.items():
            total.unknown_ids[name] = total.unknown_ids.get(name, 0) + count
        for name, count in part.missing_text.items():
            total.missing_text[name] = total.missing_text.get(name, 0) + count
    total.shards_written.sort()
    return total
