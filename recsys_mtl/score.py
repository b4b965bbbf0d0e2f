"""Offline batch scoring: a trained run over a prepared split or raw rows, into parquet shards of predictions.

The input's parquet row groups are cut into shards of consecutive row groups (text files into runs of rows), written as
`part-00000.parquet`, ... in OUT_DIR (one per shard, whatever the number of ranks). Rank r of N scores shards r, r + N,
...; each shard is written to a temporary file and renamed, so a finished-looking shard is always whole, and a rerun
skips the shards already there: those whose parquet metadata carries this job's manifest digest (so a file the scorer
did not write never counts as scores). OUT_DIR holds nothing else, never is, holds or lies inside the input, and has
one writer at a time. Every rank holds a whole copy of the model (fp32, or with int8 embedding tables), so ranks never
wait on each other while scoring; memory stays bounded by one row group and one shard's predictions.
"""

import hashlib
import json
import logging
import resource
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from recsys_mtl.checkpoint import PROGRESS_FILE
from recsys_mtl.data.description import ReadDesc
from recsys_mtl.data.encode import RawEncoder, scan_raw
from recsys_mtl.data.loader import BatchBuilder
from recsys_mtl.data.schema import KEY_PREFIX, SCHEMA_FILE, SPLITS, Schema, check_dataset
from recsys_mtl.distributed import world
from recsys_mtl.errors import InputError, MissingInputError, OutputExistsError, reading
from recsys_mtl.files import LOCK_FILE, atomic_file, atomic_write_text, check_output, locked
from recsys_mtl.hardware import bf16_choice
from recsys_mtl.model.ranker import autocast
from recsys_mtl.run import TrainedRun, load_run
from recsys_mtl.tasks import predict

log = logging.getLogger(__name__)
MANIFEST_FILE = "scoring.json"
SUMMARY_FILE = "summary.json"
OUT_FILES = (MANIFEST_FILE, SUMMARY_FILE, LOCK_FILE, "part-*.parquet", ".part-*.tmp-*")  # all OUT_DIR may hold
DIGEST_KEY = "recsys_mtl.scoring"  # parquet metadata of a shard: the digest of the manifest it was scored under
MissingText = Literal["empty", "error"]
TEXT_ROWS = 65_536  # rows of a text file encoded at a time


@dataclass(frozen=True)
class ScoreShard:
    """Row groups `row_groups` of parquet input file `path` (or, in a text file, its `num_rows` rows from
    `first_row`), scored into OUT_DIR/part-<index>.parquet."""

    index: int
    path: str
    row_groups: tuple[int, ...]
    num_rows: int
    first_row: int = 0

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


@dataclass(frozen=True)
class ScoringManifest:
    """What a scoring job writes into OUT_DIR (scoring.json): the same job resumes there, another is refused."""

    run: str
    checkpoint: str
    checkpoint_written_ns: int  # a retrained run differs
    input: str
    split: str | None  # None: raw rows
    int8: bool
    shards: tuple[ScoreShard, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @property
    def digest(self) -> str:
        """Stamped into every shard's parquet metadata: a shard counts as done only if it carries it."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


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
    non_finite: dict[str, int] = field(
        default_factory=dict
    )  # dense feature -> rows whose value was inf / NaN (as null)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


def input_files(inp: Path, split: str, raw: bool) -> list[Path]:
    """The files to score: a prepared dataset's `split`, or raw rows (a file, a folder, a glob): parquet, or the
    delimited text its dataset's description reads (a folder's parquet files, else all its files).

    Raises:
        MissingInputError: nothing to score at `inp`.
    """
    if not raw:
        schema = Schema.load(inp)
        return [inp / name for name in schema.splits[split].files]
    if inp.is_file():
        return [inp]
    if inp.is_dir():
        files = sorted(inp.rglob("*.parquet"))
        files = files or sorted(f for f in inp.rglob("*") if f.is_file() and not f.name.startswith("."))
    else:
        files = sorted(inp.parent.glob(inp.name))
    if not files:
        raise MissingInputError(f"{inp}: no files to score")
    return files


def plan_shards(files: list[Path], rows_per_shard: int, read: ReadDesc | None = None) -> list[ScoreShard]:
    """Consecutive row groups of each parquet file, up to `rows_per_shard` rows a shard (at least one row group);
    runs of `rows_per_shard` rows of each text file (read as `read` says)."""
    shards: list[ScoreShard] = []
    for path in files:
        if path.suffix != ".parquet":
            with reading(path):
                total = scan_raw([path], read or ReadDesc()).select(pl.len()).collect().item()
            for first in range(0, total, rows_per_shard):
                rows = min(rows_per_shard, total - first)
                shards.append(ScoreShard(len(shards), str(path), (), rows, first_row=first))
            continue
        with reading(path):
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
    side_dir: Path | None = None,
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
        inp: a prepared dataset folder (one with a schema.toml: its `split` is scored; it must have the run's
            vocabularies), or else raw rows (a file, a folder, a glob; parquet or the delimited text its dataset's
            description reads), encoded with the run's vocabularies.
        side_dir: the side tables to join into raw rows that lack their columns (default: the raw folder the run's
            dataset was prepared from).
        int8: score with int8-quantized embedding tables.
        missing_text: "empty": rows whose item has no text vector use the empty-text row (zeros, as in training) and
            are counted; "error": refuse them.
        overwrite: replace scores of another input or model in `out` instead of refusing.

    Returns:
        The summary over all ranks (on every rank); rank 0 also writes it to `out/summary.json`.

    Raises:
        OutputExistsError: `out` holds scores of another input, model or option set (and not `overwrite`), files
            that are not scores, or is being written by another process.
        MissingInputError: no parquet files at a raw `inp`, the dataset's description.toml or vocabularies, or a
            side table that raw rows need.
        InputError: `out` is, holds or lies inside the input; a prepared input with other vocabularies than the
            run's; raw rows without a column they need, or of the wrong dtype; a row without text under "error".
    """
    start = time.perf_counter()
    rank, world_size = world()
    if batch_size < 1 or rows_per_shard < 1:
        raise InputError(f"--batch-size and --rows-per-shard must be >= 1, got {batch_size}, {rows_per_shard}")
    if split not in SPLITS:
        raise InputError(f"--split must be one of {SPLITS}, got {split!r}")
    inp, out = Path(inp), Path(out)
    scoring = load_run(run_dir, device, int8)
    log.info("%s", bf16_choice(scoring.cfg.train.bf16, device))
    raw = not (inp / SCHEMA_FILE).is_file()  # the one place that tells a prepared dataset from raw rows
    encoder = RawEncoder(scoring.cfg.dataset, side_dir) if raw else None
    if not raw:
        _check_prepared_input(inp, scoring.schema, split)
    files = input_files(inp, split, raw)
    check_output(out, *([inp] if inp.exists() else files))
    manifest = ScoringManifest(
        run=str(Path(run_dir).resolve()),
        checkpoint=str(scoring.checkpoint.resolve()),
        checkpoint_written_ns=(scoring.checkpoint / PROGRESS_FILE).stat().st_mtime_ns,
        input=str(inp.resolve()),
        split=None if raw else split,
        int8=int8,
        shards=tuple(plan_shards(files, rows_per_shard, encoder.desc.read if encoder is not None else None)),
    )
    with _claimed(out, manifest, overwrite):
        summary = _score_shards(scoring, manifest, out, encoder, missing_text, batch_size, progress)
    summary.seconds = time.perf_counter() - start
    summary.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = _merge(summary, world_size)
    if rank == 0:
        atomic_write_text(
            out / SUMMARY_FILE, json.dumps(asdict(summary) | {"rows_per_second": summary.rows_per_second})
        )
    return summary


def _score_shards(
    scoring: TrainedRun,
    manifest: ScoringManifest,
    out: Path,
    encoder: RawEncoder | None,
    missing_text: MissingText,
    batch_size: int,
    progress: bool,
) -> ScoreSummary:
    """Score this rank's unfinished shards of `manifest` into `out`, each stamped with its digest; this rank's
    summary."""
    rank, world_size = world()
    digest = manifest.digest
    cfg, schema, model = scoring.cfg, scoring.schema, scoring.model
    device = next(model.parameters()).device
    mine = [s for s in manifest.shards if s.index % world_size == rank]
    todo = [s for s in mine if not _finished(out / s.name, s.num_rows, digest)]
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
                _add_counts(summary.non_finite, build.non_finite(frame))
                for offset in range(0, frame.height, batch_size):
                    batch = build(frame.slice(offset, batch_size)).to(device)
                    values = predict(model(batch).logits, scoring.specs)
                    parts.append(batch.keys.with_columns(_columns(values)))
                    bar.update(len(batch))
            _write_shard(out / shard.name, pl.concat(parts), shard, digest)
            summary.rows += shard.num_rows
            summary.shards_written.append(shard.name)
    bar.close()
    return summary


def _check_prepared_input(inp: Path, schema: Schema, split: str) -> None:
    """A prepared input must share the run's encoding: tables, features (with their statistics) and text tables."""
    theirs = Schema.load(inp)
    for part in ("tables", "features", "texts", "labels"):
        if getattr(theirs, part) != getattr(schema, part):
            raise InputError(
                f"{inp}: its {part} differ from those of the run's dataset, so its ids mean other things; "
                "score its raw rows instead"
            )
    check_dataset(inp, theirs, splits=(split,))


@contextmanager
def _claimed(out: Path, manifest: ScoringManifest, overwrite: bool) -> Iterator[None]:
    """Hold `out` for this job while the block runs: one writer (rank 0 holds the lock), nothing in it but this
    job's files, and its manifest recorded. Rank 0 decides; the other ranks raise the same error.

    Raises:
        OutputExistsError: `out` is in use, holds files that are not scores, or scores of another job (and not
            `overwrite`).
    """
    rank, world_size = world()
    with ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                stack.enter_context(locked(out))
                _prepare_out(out, manifest, overwrite)
            except OutputExistsError as err:
                error = str(err)
        if world_size > 1:  # every rank learns rank 0's verdict before any writes
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise OutputExistsError(error)
        yield


def _prepare_out(out: Path, manifest: ScoringManifest, overwrite: bool) -> None:
    """Check what `out` holds against `manifest`, clear old or stale shards, and write the manifest."""
    path = out / MANIFEST_FILE
    shards = sorted(out.glob("part-*.parquet"))
    foreign = sorted(p.name for p in out.iterdir() if not any(fnmatch(p.name, pattern) for pattern in OUT_FILES))
    if foreign or (shards and not path.is_file()):
        names = ", ".join((foreign or [p.name for p in shards])[:3])
        raise OutputExistsError(f"{out} holds files that recsys-mtl score did not write ({names}); choose a new --out")
    text = manifest.to_json()
    if path.is_file() and path.read_text() != text:
        if not overwrite:
            raise OutputExistsError(
                f"{out} holds scores of another input, model or option set ({path}); "
                "choose another --out or pass --overwrite"
            )
        for old in shards:
            old.unlink()
    for stale in out.glob(".part-*.tmp-*"):  # left by a killed run
        stale.unlink()
    atomic_write_text(path, text)


def _finished(path: Path, num_rows: int, digest: str) -> bool:
    """Whether `path` is a whole shard this job wrote (stamped with its digest, with all its rows)."""
    if not path.is_file():
        return False
    meta = pq.ParquetFile(path).metadata
    return meta.num_rows == num_rows and (meta.metadata or {}).get(DIGEST_KEY.encode()) == digest.encode()


def _frames(shard: ScoreShard, schema: Schema, encoder: RawEncoder | None) -> Iterator[pl.DataFrame]:
    """The shard's rows as shard-format frames, one row group (or TEXT_ROWS rows of a text file) at a time."""
    if encoder is not None and not shard.row_groups:
        with reading(shard.path):
            rows = scan_raw([Path(shard.path)], encoder.desc.read).slice(shard.first_row, shard.num_rows).collect()
        for offset in range(0, rows.height, TEXT_ROWS):
            yield encoder(rows.slice(offset, TEXT_ROWS), f"{shard.path} (rows from {shard.first_row + offset:,})")
        return
    reader = pq.ParquetFile(shard.path)
    columns = None if encoder is not None else list(schema.columns())
    for index in shard.row_groups:
        with reading(f"{shard.path} (row group {index})"):
            frame = pl.from_arrow(reader.read_row_group(index, columns=columns))
        yield encoder(frame, f"{shard.path} (row group {index})") if encoder is not None else frame  # type: ignore[arg-type, misc]


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
            raise InputError(
                f"{shard.path}: {missing} rows have a {text.key!r} without a {text.name!r} text vector; "
                "encode their texts (prepare and encode-text) or score with --missing-text empty"
            )
        summary.missing_text[text.name] = summary.missing_text.get(text.name, 0) + missing


def _columns(values: dict[str, torch.Tensor]) -> list[pl.Series]:
    return [pl.Series(f"pred_{name}", value.float().cpu().numpy()) for name, value in values.items()]


def _write_shard(path: Path, frame: pl.DataFrame, shard: ScoreShard, digest: str) -> None:
    if frame.height != shard.num_rows:
        raise ValueError(
            f"{shard.path}: scored {frame.height} rows of row groups {shard.row_groups}, expected {shard.num_rows}"
        )
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp, metadata={DIGEST_KEY: digest})


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
        for mine, theirs in (
            (total.unknown_ids, part.unknown_ids),
            (total.missing_text, part.missing_text),
            (total.non_finite, part.non_finite),
        ):
            _add_counts(mine, theirs)
    total.shards_written.sort()
    return total


def _add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for name, count in counts.items():
        total[name] = total.get(name, 0) + count
