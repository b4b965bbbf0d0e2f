"""Evaluation: predict a whole split, then exact metrics for the model and, where the data has one, for the oracle."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_mtl.data.loader import Dataset, read_batches
from recsys_mtl.metrics import task_metrics
from recsys_mtl.model.losses import TaskSpec, predict

CALIBRATION_BINS = 10


@dataclass
class SplitPredictions:
    """Predictions for every row of a split. values/labels/masks: name -> [N]; gate_weights: mean [T, E]."""

    values: dict[str, Tensor]
    labels: dict[str, Tensor]
    masks: dict[str, Tensor]
    keys: pl.DataFrame
    gate_weights: Tensor


@torch.no_grad()
def predict_split(trainer, dataset: Dataset, split: str, batch_size: int = 8192) -> SplitPredictions:
    """Run the model over `split` in eval mode and keep every prediction, label and key."""
    model = trainer.model
    model.eval()
    values, labels, masks, keys, gates = [], [], [], [], []
    try:
        for batch in read_batches(dataset, split, batch_size):
            batch = batch.to(trainer.device)
            with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.cfg.train.bf16):
                output = model(batch)
            values.append({k: v.cpu() for k, v in predict(output.logits, trainer.specs).items()})
            labels.append({k: v.cpu() for k, v in batch.labels.items()})
            masks.append({k: v.cpu() for k, v in batch.masks.items()})
            keys.append(batch.keys)
            gates.append(output.gate_weights.float().sum(0).cpu())  # [T, E]
    finally:
        model.train()
    num_rows = sum(len(k) for k in keys)
    return SplitPredictions(
        values={k: torch.cat([v[k] for v in values]) for k in values[0]},
        labels={k: torch.cat([v[k] for v in labels]) for k in labels[0]},
        masks={k: torch.cat([v[k] for v in masks]) for k in masks[0]},
        keys=pl.concat(keys),
        gate_weights=torch.stack(gates).sum(0) / num_rows,
    )


def oracle_predictions(dataset: Dataset, keys: pl.DataFrame, specs: tuple[TaskSpec, ...]) -> dict[str, Tensor] | None:
    """The oracle's predictions for the rows of `keys`, in the same order, or None when the data has no oracle."""
    oracle = dataset.schema.oracle
    if oracle is None or not all(s.name in oracle.columns for s in specs):
        return None
    wanted = keys.select(oracle.key).with_row_index("__row")
    table = pl.scan_parquet(list(oracle.files)).select(oracle.key, *oracle.columns.values())
    joined = wanted.lazy().join(table, on=oracle.key, how="left").sort("__row").collect()
    values = {
        s.name: torch.from_numpy(joined[oracle.columns[s.name]].fill_null(np.nan).to_numpy().copy()) for s in specs
    }
    for spec in specs:
        if spec.after is not None:
            values[f"{spec.name}_joint"] = values[spec.after] * values[spec.name]
    return values


def split_metrics(trainer, dataset: Dataset, split: str) -> tuple[dict[str, float], SplitPredictions]:
    """Model metrics on `split`, plus `oracle/<metric>` and `ratio/<metric>` (model / oracle) where there is an oracle."""
    preds = predict_split(trainer, dataset, split)
    users = preds.keys["user_id"].to_numpy() if "user_id" in preds.keys.columns else None
    metrics = task_metrics(preds.values, preds.labels, preds.masks, trainer.specs, users)
    oracle = oracle_predictions(dataset, preds.keys, trainer.specs)
    if oracle is not None:
        oracle_metrics = task_metrics(oracle, preds.labels, preds.masks, trainer.specs, users)
        metrics |= {f"oracle/{k}": v for k, v in oracle_metrics.items()}
        metrics |= {f"ratio/{k}": metrics[k] / v for k, v in oracle_metrics.items() if v}
    return metrics, preds


def calibration_curve(preds: SplitPredictions, task: str) -> dict[str, list[float]]:
    """Mean prediction and mean label in equal-count bins of the prediction (for a binary task)."""
    mask = preds.masks[task]
    p, y = preds.values[task][mask].double(), preds.labels[task][mask].double()
    order = torch.argsort(p)
    bins = [b for b in torch.tensor_split(order, CALIBRATION_BINS) if len(b)]
    return {"predicted": [float(p[b].mean()) for b in bins], "observed": [float(y[b].mean()) for b in bins]}


def write_json(path: Path, data: dict) -> None:
    import json

    from recsys_mtl.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
