"""Checkpoints with torch.distributed.checkpoint: model (sharded tables included), fused and dense optimizer state,
loss weights and RNG as tensors; step, data position, the model's shape and a checksum of every stored tensor as JSON
(progress.json).

A checkpoint `checkpoints/last` is a link to `last.0` or `last.1`: a new one is written whole into the other folder,
the link is switched to it in one atomic rename, and only then is the older folder deleted, so a kill never leaves a
run without a loadable latest checkpoint.

Loading runs no code, whatever the files hold: the metadata is unpickled with an allow-list of exact (module, name)
pairs, must describe tensors only (no pickled "bytes" items) in plain files inside the folder, and every stored
tensor must match its checksum before torch.load(weights_only=True) reads it. A checkpoint that fails any of this is
refused with an InputError naming the file.

With one process, DCP runs without its collectives (`no_dist`): measured here, after a collective save on a 1-rank
gloo group every later training step ran about 1.8x slower.
"""

import dataclasses
import io
import json
import os
import pickle
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from recsys_mtl.config import Config
from recsys_mtl.data.schema import Schema
from recsys_mtl.distributed import world
from recsys_mtl.errors import InputError, MissingInputError, reading
from recsys_mtl.structs import from_mapping, list_differences, to_mapping

PROGRESS_FILE = "progress.json"
METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint"
# every global in DCP's metadata (torch 2.13): its dataclasses, torch sizes, dtypes and layouts, the checkpoint's path
_ALLOWED_GLOBALS = frozenset(
    {
        ("pathlib", "PosixPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        (f"{_DCP}.filesystem", "_StorageInfo"),
        *(
            (f"{_DCP}.metadata", name)
            for name in (
                "BytesStorageMetadata",  # unpickled only to be refused by name
                "ChunkStorageMetadata",
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
    }
)


@dataclass
class Progress:
    """The JSON part of a checkpoint: where the run is, what its tensors were made for, and their checksums."""

    fingerprint: dict[str, Any]  # see `fingerprint`
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already trained on
    best: float | None = None  # the best value of the early-stopping metric so far
    stale: int = 0  # validations since it last improved
    world_size: int = 1  # ranks of the run that saved it
    running: dict[str, float] = field(default_factory=dict)  # moving averages of the step metrics, as logged
    checksums: dict[str, int] = field(default_factory=dict)  # "<file>@<offset>" -> CRC-32 of a stored tensor

    def __post_init__(self) -> None:
        if min(self.step, self.epoch, self.batch, self.stale) < 0 or self.world_size < 1:
            raise ValueError(
                f"step, epoch, batch and stale must be >= 0 and world_size >= 1, got {self.step}, {self.epoch}, "
                f"{self.batch}, {self.stale}, {self.world_size}"
            )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, allow_nan=False) + "\n"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: exactly the globals of `_ALLOWED_GLOBALS`, never a dotted name (pickle would follow
    `torch.os.system` from an allowed module to anything)."""

    def __init__(self, data: bytes, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise InputError(
                f"{self.source}: refers to {module}.{name}, which checkpoint metadata may not hold "
                "(not a recsys-mtl checkpoint, or tampered with)"
            )
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """FileSystemReader of a checked checkpoint: its metadata is read and checked when the reader is made (see
    `read_metadata`), and each stored tensor is checked against its checksum before DCP's torch.load(weights_only=True)
    reads it.

    Raises:
        MissingInputError / InputError: from `read_metadata` and `read_progress`, naming the file.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(Path(path))
        self.metadata = read_metadata(Path(path))
        self.checksums = read_progress_file(Path(path)).checksums
        self.reading: Path | None = None  # the file being read, for error messages

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.metadata.storage_meta = self.metadata.storage_meta or StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata

    def _slice_file(self, file: IO[bytes], sinfo: _StorageInfo) -> IO[bytes]:
        self.reading = Path(self.path) / sinfo.relative_path
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        key = _checksum_key(sinfo)
        if self.checksums and zlib.crc32(data) != self.checksums.get(key):  # none: written before checksums
            raise InputError(
                f"{self.reading}: the tensor at byte {sinfo.offset} does not match its checksum in {PROGRESS_FILE} "
                "(the file is corrupt, or was changed after it was written)"
            )
        return io.BytesIO(data)


class _TensorPlanner(DefaultLoadPlanner):
    """DCP's load planner without the one step that unpickles: a bytes item is refused, never torch.load()ed."""

    def __init__(self, source: Path) -> None:
        super().__init__()
        self.source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise InputError(
            f"{self.source}: entry {read_item.dest_index.fqn!r} is a pickled object; recsys-mtl checkpoints hold "
            "tensors only"
        )


def fingerprint(cfg: Config, schema: Schema) -> dict[str, Any]:
    """What a checkpoint's tensors depend on: tasks, model shape, text model and the dataset's tables; `inputs` names
    the layout of the tables and of the dense network's input columns (checkpoints without it, from before the tasks'
    own columns moved into the shared tables, had other tables and read the features in schema order)."""
    return {
        "inputs": "tables widest first, rows [shared | tasks' own]",
        "tasks": [t.name for t in cfg.tasks],
        "model": to_mapping(cfg.model),
        "text": {
            "model": cfg.text.model,
            "dtype": cfg.text.dtype,
            "max_length": cfg.text.max_length,
            "finetune_layers": cfg.text.finetune_layers,
        },
        "loss.weighting": cfg.loss.weighting,
        "tables": {t.name: [t.num_embeddings, t.embedding_dim] for t in schema.tables},
        "texts": {t.name: t.num_texts for t in schema.texts},
    }


def save_checkpoint(path: Path, state: dict[str, Any], progress: Progress) -> None:
    """Write `state` (tensors, sharded or not) and `progress` as checkpoint `path` (a link, see the module), from
    every rank. A kill at any moment leaves `path` a whole checkpoint: the previous one or this one.

    Raises:
        InputError: `path` is a folder (see `check_link`).
    """
    path = Path(path)
    rank, world_size = world()
    folder, old = _folders(path)
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)  # what a kill left of an earlier save; the link is elsewhere
        folder.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=folder, no_dist=world_size == 1)
    if rank == 0:
        checksums = _checksums(folder, read_metadata(folder))
        (folder / PROGRESS_FILE).write_text(dataclasses.replace(progress, checksums=checksums).to_json())
        link = path.with_name(f".{path.name}.link")
        link.unlink(missing_ok=True)
        link.symlink_to(folder.name)
        os.replace(link, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def check_link(path: Path) -> None:
    """Refuse checkpoint `path` if it is a folder (written before checkpoints were links), which no save can replace
    atomically.

    Raises:
        InputError: saying how to turn it into a link.
    """
    if path.exists() and not path.is_symlink():
        raise InputError(
            f"{path} is a checkpoint folder of an older recsys-mtl; checkpoints are now links: "
            f"`mv {path} {path}.0 && ln -s {path.name}.0 {path}`, then resume"
        )


def _folders(path: Path) -> tuple[Path, Path]:
    """(the folder a new checkpoint `path` is written to, the one it replaces), as rank 0 sees them."""
    check_link(path)
    names = [f"{path.name}.0", f"{path.name}.1"]
    if path.is_symlink() and os.readlink(path) == names[0]:
        names.reverse()
    if world()[1] > 1:
        dist.broadcast_object_list(names, src=0)
    return path.with_name(names[0]), path.with_name(names[1])


def _checksum_key(info: _StorageInfo) -> str:
    return f"{info.relative_path}@{info.offset}"


def _checksums(folder: Path, metadata: Metadata) -> dict[str, int]:
    """The CRC-32 of every stored tensor of the checkpoint in `folder`."""
    checksums = {}
    for info in metadata.storage_data.values():
        with (folder / info.relative_path).open("rb") as file:
            file.seek(info.offset)
            checksums[_checksum_key(info)] = zlib.crc32(file.read(info.length))
    return checksums


def read_metadata(folder: Path) -> Metadata:
    """The DCP metadata of the checkpoint in `folder`, unpickled through the allow-list and checked: tensors only, each
    stored in a plain file of `folder` that is long enough to hold it.

    Raises:
        MissingInputError: the metadata or a file it lists is missing.
        InputError: garbage, a global off the allow-list, a bytes item, a path leaving `folder`, a truncated file.
    """
    file = Path(folder) / METADATA_FILE
    if not file.is_file():
        raise MissingInputError(f"{file}: no such file (not a checkpoint, or an unfinished one)")
    with reading(file):
        data = file.read_bytes()
    try:
        metadata = _MetadataUnpickler(data, file).load()
    except InputError:
        raise
    except Exception as err:  # garbage bytes make the unpickler raise almost any type
        raise InputError(f"{file}: not checkpoint metadata ({type(err).__name__}: {err})") from err
    if not (
        isinstance(metadata, Metadata)
        and isinstance(metadata.state_dict_metadata, dict)
        and isinstance(metadata.storage_data, dict)
    ):
        raise InputError(f"{file}: not checkpoint metadata (a {type(metadata).__name__})")
    for name, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            raise InputError(f"{file}: entry {name!r} is a pickled object; recsys-mtl checkpoints hold tensors only")
        if not isinstance(item, TensorStorageMetadata):
            raise InputError(f"{file}: entry {name!r} is a {type(item).__name__}, not a tensor")
    for info in metadata.storage_data.values():
        _check_stored(info, Path(folder), file)
    return metadata


def _check_stored(info: Any, folder: Path, metadata_file: Path) -> None:
    """Refuse a storage entry that is malformed, leaves `folder`, is transformed or lies past the end of its file."""
    if not (
        isinstance(info, _StorageInfo)
        and isinstance(info.relative_path, str)
        and isinstance(info.offset, int)
        and isinstance(info.length, int)
        and min(info.offset, info.length) >= 0
    ):
        raise InputError(f"{metadata_file}: malformed storage entry {info!r}")
    name = info.relative_path
    if Path(name).name != name or name in ("", ".", ".."):
        raise InputError(f"{metadata_file}: a tensor is stored at {name!r}, outside the checkpoint folder")
    if info.transform_descriptors:
        raise InputError(f"{metadata_file}: a tensor is stored transformed ({info.transform_descriptors})")
    data_file = folder / name
    if data_file.is_symlink() or not data_file.is_file():
        raise MissingInputError(f"{data_file}: missing, or not a plain file (listed in {metadata_file})")
    size = data_file.stat().st_size
    if info.offset + info.length > size:
        raise InputError(
            f"{data_file}: truncated: a tensor ends at byte {info.offset + info.length}, the file at {size}"
        )


def read_progress_file(path: Path) -> Progress:
    file = Path(path) / PROGRESS_FILE
    if not file.is_file():
        raise MissingInputError(f"{path}: no checkpoint ({PROGRESS_FILE} missing)")
    with reading(file):
        text = file.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{file}: not valid JSON ({err})") from err
    return from_mapping(Progress, data, str(file))


def read_progress(path: Path, expected: dict[str, Any]) -> Progress:
    """The JSON part of checkpoint `path`, after checking it was made for the same model and data.

    Raises:
        MissingInputError: no checkpoint at `path`.
        InputError: a malformed progress.json, or a fingerprint that differs from `expected` (listing every
            difference).
    """
    progress = read_progress_file(path)
    differences = list_differences(progress.fingerprint, expected)
    if differences:
        raise InputError(f"{path} does not match the config: " + "; ".join(differences))
    return progress


def load_checkpoint(path: Path, state: dict[str, Any], no_dist: bool | None = None) -> None:
    """Load the tensors of checkpoint `path` into `state` in place (each rank reads its own shards): the one way a
    checkpoint is read, by resume, evaluate and score.

    Args:
        no_dist: read without collectives (whatever the number of ranks that saved it); default: with one rank.

    Raises:
        MissingInputError: the checkpoint or one of its files is missing.
        InputError: a checkpoint refused (see the module) or unreadable, naming the file.
    """
    reader = SafeReader(Path(path))
    try:
        dcp.load(
            state,
            storage_reader=reader,
            planner=_TensorPlanner(Path(path)),
            no_dist=world()[1] == 1 if no_dist is None else no_dist,
        )
    except CheckpointException as err:  # DCP wraps whatever a rank raised
        failure = next(iter(err.failures.values()))[0]
        if isinstance(failure, InputError) or not isinstance(failure, Exception):  # ours, or an interrupt
            raise failure from err
        message = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
        raise InputError(
            f"{reader.reading or path}: cannot load the checkpoint ({type(failure).__name__}: {message})"
        ) from err


def trained_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a trained run is used with: its best, else its last (the folder the link points to, so that a
    training run switching the link meanwhile cannot mix two checkpoints)."""
    best = Path(run_dir) / "checkpoints" / "best"
    return (best if best.exists() else Path(run_dir) / "checkpoints" / "last").resolve()


def _barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
