"""From files to a model: the ranker a config and dataset describe, and a trained run loaded for inference.

The one way a trained run is used: `evaluate` and `score` both call `load_run`, which reads the run's config, checks
its checkpoint against the dataset and loads it (safely, see checkpoint.py) into one whole model on this process.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.ao.quantization import PlaceholderObserver, QConfig
from torchrec import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from recsys_mtl.checkpoint import fingerprint, load_checkpoint, read_progress, trained_checkpoint
from recsys_mtl.config import Config, load_config
from recsys_mtl.data.schema import Schema
from recsys_mtl.hardware import keep_freed_memory
from recsys_mtl.model.ranker import MultiTaskRanker
from recsys_mtl.tasks import TaskSpec, task_specs
from recsys_mtl.text import load_text_vectors, read_texts


def build_ranker(
    cfg: Config, folder: Path, schema: Schema, device: torch.device | None = None
) -> tuple[MultiTaskRanker, dict[str, Tensor]]:
    """The ranker for `cfg` (on the meta device unless `device` is given) and the text vectors of its frozen text
    tables, read from dataset `folder` (empty without text or when BERT is fine-tuned inside the model)."""
    use_text = cfg.model.text_dim > 0 and bool(schema.texts)
    finetune = use_text and cfg.text.finetune_layers > 0
    vectors = load_text_vectors(folder, schema, cfg.text) if use_text and not finetune else {}
    texts = read_texts(folder, schema) if finetune else None
    text_dims = {name: v.shape[1] for name, v in vectors.items()}
    return MultiTaskRanker(cfg, schema, text_dims, texts, device), vectors


@dataclass(frozen=True)
class TrainedRun:
    """A trained run ready for inference: its config, dataset schema, tasks, the checkpoint loaded, and the model
    (whole on this process, in eval mode)."""

    cfg: Config
    schema: Schema
    specs: tuple[TaskSpec, ...]
    checkpoint: Path
    model: MultiTaskRanker


def load_run(run_dir: Path, device: torch.device, int8: bool = False) -> TrainedRun:
    """Load the run in `run_dir` (its best checkpoint, else its last) for inference.

    The checkpoint is read without collectives, so it loads whatever number of ranks saved it. With `int8`, every
    embedding table (text tables too) becomes a torchrec quantized table (int8 rows, row-wise scale and bias).

    Raises:
        MissingInputError: no config.toml or checkpoint in `run_dir`.
        InputError: the checkpoint does not match the config or the dataset, or is refused as unsafe or corrupt.
    """
    keep_freed_memory()
    cfg = load_config(Path(run_dir) / "config.toml")
    schema = Schema.load(Path(cfg.dataset))
    checkpoint = trained_checkpoint(run_dir)
    read_progress(checkpoint, fingerprint(cfg, schema))
    model, _ = build_ranker(cfg, Path(cfg.dataset), schema, device)  # its text tables come from the checkpoint
    load_checkpoint(checkpoint, {"model": model.state_dict()}, no_dist=True)
    if int8:
        qconfig = QConfig(activation=PlaceholderObserver, weight=PlaceholderObserver.with_args(dtype=torch.qint8))
        for name, module in list(model.named_modules()):
            if isinstance(module, EmbeddingBagCollection):
                module.qconfig = qconfig
                model.set_submodule(name, QuantEmbeddingBagCollection.from_float(module))
    return TrainedRun(cfg, schema, task_specs(cfg, schema), checkpoint, model.to(device).eval())
