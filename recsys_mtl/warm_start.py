"""`train --init-from PARENT_RUN`: start a run from a trained run's model and optimizer state, on the same dataset or
on a later period of it (`prepare --from`), whose tables may have grown.

Every tensor of the parent's checkpoint (model, fused row-wise Adagrad state, dense optimizer, task weights) is read
whole on every rank, without collectives, so the parent may have run on any number of ranks; each rank then copies
the rows and columns of its own shards. A table that grew keeps its old rows bit for bit; its new rows (ids the
parent never saw) start as the parent's row 0, the unknown id those rows were encoded as before, weights and
Adagrad state alike: the first predictions are the parent's, and a new id goes on learning at the pace of the row it
was (an empty state would make its first steps full-size jumps along one noisy gradient). The frozen text
tables come from the new dataset's vectors, not from the parent. The RNG and the data position start afresh.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from recsys_mtl.checkpoint import (
    fingerprint,
    load_checkpoint,
    read_metadata,
    read_progress_file,
    trained_checkpoint,
)
from recsys_mtl.config import Config, load_config
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError, MissingInputError
from recsys_mtl.model.embeddings import copy_whole
from recsys_mtl.model.ranker import MultiTaskRanker
from recsys_mtl.step import Trainer, init_optimizer_state, training_state
from recsys_mtl.structs import list_differences

log = logging.getLogger(__name__)
GROWABLE = ("tables", "texts")  # fingerprint keys whose sizes may grow from the parent to the child


def parent_checkpoint(parent: Path, cfg: Config, schema: Schema) -> Path:
    """The checkpoint of run `parent` (its best, else its last) for a run of `cfg` on dataset `schema` to start from,
    checked against them.

    Raises:
        MissingInputError: `parent` holds no trained run.
        InputError: the model, tasks, text model or loss weighting differ, a table shrank or changed its width, or the
            dataset is neither the parent's nor prepared from it (`prepare --from`, at any depth); every difference
            listed.
    """
    parent = Path(parent)
    if not (parent / "config.toml").is_file():
        raise MissingInputError(f"--init-from {parent}: no run there (config.toml missing)")
    checkpoint = trained_checkpoint(parent)
    saved, current = read_progress_file(checkpoint).fingerprint, fingerprint(cfg, schema)
    differences = list_differences(
        {k: v for k, v in saved.items() if k not in GROWABLE},
        {k: v for k, v in current.items() if k not in GROWABLE},
        ("parent", "now"),
    )
    for key in GROWABLE:
        for name in sorted(set(saved[key]) | set(current[key])):
            old, new = saved[key].get(name), current[key].get(name)  # [rows, dim] of a table, rows of a text
            shapes = [value if isinstance(value, list) else [value] for value in (old, new)]
            if old is None or new is None or shapes[1][0] < shapes[0][0] or shapes[1][1:] != shapes[0][1:]:
                differences.append(f"{key}.{name}: parent {old!r}, now {new!r} (a table may only grow)")
    parent_dataset = Path(load_config(parent / "config.toml").dataset).resolve()
    if not _descends(Path(cfg.dataset).resolve(), parent_dataset):
        differences.append(
            f"dataset: {cfg.dataset} is neither the parent's {parent_dataset} nor prepared from it (prepare "
            "--from), so its ids may mean other rows"
        )
    if differences:
        raise InputError(f"--init-from {parent}: this run cannot start from it: {'; '.join(differences)}")
    return checkpoint


def _descends(dataset: Path, ancestor: Path) -> bool:
    """Whether `dataset` is `ancestor` or was prepared from it through a chain of `prepare --from`."""
    seen = set()
    while dataset != ancestor:
        if dataset in seen or not (dataset / "schema.toml").is_file():
            return False
        seen.add(dataset)
        parent = Schema.load(dataset).parent
        if not parent:
            return False
        dataset = Path(parent)
    return True


@torch.no_grad()
def warm_start(trainer: Trainer, checkpoint: Path) -> None:
    """Load `checkpoint` (checked by `parent_checkpoint`) into the freshly built `trainer` (see the module)."""
    metadata = read_metadata(checkpoint)
    source: dict[str, Any] = {
        name: torch.empty(item.size, dtype=item.properties.dtype)
        for name, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata) and name != "rng"  # read_metadata refused anything else
    }
    load_checkpoint(checkpoint, source, no_dist=True)
    init_optimizer_state(trainer)
    target, _ = flatten_state_dict({k: v for k, v in training_state(trainer).items() if k != "rng"})
    grown = []
    for name, value in target.items():
        if not isinstance(value, Tensor | ShardedTensor) or MultiTaskRanker.is_frozen_table(name):
            continue
        if name not in source:
            raise InputError(f"--init-from: {checkpoint} has no tensor {name!r}")
        old = source[name]
        if tuple(old.shape) != tuple(value.shape):
            old = _grow(old, tuple(value.shape))
            grown.append(name)
        copy_whole(value, old)
    log.info("initialised from %s; grown: %s", checkpoint, ", ".join(grown) or "nothing")


def _grow(old: Tensor, shape: tuple[int, ...]) -> Tensor:
    """`old` with copies of its row 0 appended up to `shape` rows (a table's weights or its optimizer state)."""
    return torch.cat([old, old[:1].expand(shape[0] - old.shape[0], *old.shape[1:])])
