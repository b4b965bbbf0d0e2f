"""Evaluation: predict a whole split, then exact metrics for the model and, where the data has one, for the oracle."""

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import Tensor

from recsys_mtl.config import Config
from recsys_mtl.data.batch import Batch
from recsys_mtl.data.loader import Dataset, ReadOrder, count_batches, read_batches
from recsys_mtl.distributed import average_norm_statistics, world
from recsys_mtl.errors import InputError, MissingInputError, reading
from recsys_mtl.files import atomic_write_text
from recsys_mtl.metrics import MixtureHealth, auc, gate_entropy, is_task_metric, task_metrics
from recsys_mtl.model.experts import Mixture, MixtureLevel
from recsys_mtl.model.ranker import RankerOutput, autocast
from recsys_mtl.report import CalibrationCurve, EvaluationDetails, write_report
from recsys_mtl.run import load_run
from recsys_mtl.tasks import TaskSpec, add_joint, predict

if TYPE_CHECKING:
    from recsys_mtl.explain import ExplainSettings

log = logging.getLogger(__name__)
CALIBRATION_BINS = 10
COLD_FEATURE = "item_id"  # rows whose item was never seen in training (unknown id 0) give the `auc_cold` metrics


@dataclass
class SplitPredictions:
    """Predictions for N rows of a split (all of them, or one batch's). values/labels/masks: name -> [N];
    gate_weights: their mean over the rows [T, E]; gate_entropy: the mean over the rows of each task's gate entropy
    (metrics.gate_entropy) [T]."""

    values: dict[str, Tensor]
    labels: dict[str, Tensor]
    masks: dict[str, Tensor]
    keys: pl.DataFrame
    gate_weights: Tensor
    gate_entropy: Tensor
    cold: Tensor | None  # [N] bool: the COLD_FEATURE id is unknown (0); None without that feature

    @staticmethod
    def concat(parts: "list[SplitPredictions]") -> "SplitPredictions":
        """The rows of `parts`, in order (gate weights and entropies averaged over all their rows)."""
        sizes = torch.tensor([float(len(p.keys)) for p in parts])  # [P]
        gates = torch.stack([p.gate_weights for p in parts])  # [P, T, E]
        entropies = torch.stack([p.gate_entropy for p in parts])  # [P, T]
        return SplitPredictions(
            values={k: torch.cat([p.values[k] for p in parts]) for k in parts[0].values},
            labels={k: torch.cat([p.labels[k] for p in parts]) for k in parts[0].labels},
            masks={k: torch.cat([p.masks[k] for p in parts]) for k in parts[0].masks},
            keys=pl.concat([p.keys for p in parts]),
            gate_weights=(gates * sizes[:, None, None]).sum(0) / sizes.sum(),  # [T, E]
            gate_entropy=(entropies * sizes[:, None]).sum(0) / sizes.sum(),  # [T]
            cold=torch.cat([p.cold for p in parts if p.cold is not None]) if parts[0].cold is not None else None,
        )


@dataclass(frozen=True)
class Predictor:
    """What evaluation needs of a model: the model (sharded in training, whole when loaded by `load_run`), its tasks,
    its config (for autocast) and the device its inputs go to."""

    model: torch.nn.Module
    specs: tuple[TaskSpec, ...]
    cfg: Config
    device: torch.device


@torch.no_grad()
def predict_split(
    predictor: Predictor, dataset: Dataset, split: str, batch_size: int = 8192
) -> SplitPredictions | None:
    """Run the model over `split` in eval mode and keep every prediction, label and key.

    Under N ranks each rank predicts its own part and rank 0 receives every row (the others get None). Ranks with
    fewer batches repeat their last one, unrecorded, so that the sharded tables' collectives stay in step.
    """
    rank, world_size = world()
    model = predictor.model
    average_norm_statistics(model)
    steps = max(count_batches(dataset, split, batch_size, ReadOrder(r, world_size)) for r in range(world_size))
    batches = read_batches(dataset, split, batch_size, ReadOrder(rank, world_size))
    parts: list[SplitPredictions] = []
    last = None
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            batch = next(batches, None)
            recorded = batch is not None
            if batch is None:  # out of rows (or none at all): a placeholder batch, not recorded
                batch = last if last is not None else next(read_batches(dataset, split, batch_size))
            batch = last = batch.to(predictor.device)
            with autocast(predictor.cfg, predictor.device):
                output = model(batch)
            if recorded:
                parts.append(_part(predictor.specs, batch, output))
    finally:
        model.train(was_training)
    if world_size > 1:
        gathered: list | None = [None] * world_size if rank == 0 else None
        dist.gather_object(parts, gathered, dst=0)
        if gathered is None:  # not rank 0
            return None
        parts = [part for rank_parts in gathered for part in rank_parts]
    return SplitPredictions.concat(parts)


def _part(specs: tuple[TaskSpec, ...], batch: Batch, output: RankerOutput) -> SplitPredictions:
    """One batch's predictions, on the CPU."""
    has_cold = COLD_FEATURE in batch.sparse.keys()  # noqa: SIM118 (a KeyedJaggedTensor, not a dict)
    return SplitPredictions(
        values={k: v.cpu() for k, v in predict(output.logits, specs).items()},
        labels={k: v.cpu() for k, v in batch.labels.items()},
        masks={k: v.cpu() for k, v in batch.masks.items()},
        keys=batch.keys,
        gate_weights=output.gate_weights.float().mean(0).cpu(),  # [T, E]
        gate_entropy=gate_entropy(output.gate_weights).mean(0).cpu(),  # [T]
        cold=batch.sparse[COLD_FEATURE].values().cpu() == 0 if has_cold else None,
    )


def oracle_predictions(dataset: Dataset, keys: pl.DataFrame, specs: tuple[TaskSpec, ...]) -> dict[str, Tensor] | None:
    """The oracle's predictions for the rows of `keys`, in the same order, or None when the data has no oracle.

    Raises:
        InputError: the oracle files (in the raw folder the dataset was prepared from) are gone or unreadable.
    """
    oracle = dataset.schema.oracle
    if oracle is None or not all(s.name in oracle.columns for s in specs):
        return None
    wanted = keys.select(oracle.key).with_row_index("__row")
    table = pl.scan_parquet(list(oracle.files)).select(oracle.key, *oracle.columns.values())
    with reading(f"the oracle files of {dataset.folder} ({Path(oracle.files[0]).parent})"):
        joined = wanted.lazy().join(table, on=oracle.key, how="left").sort("__row").collect()
    values = {
        s.name: torch.from_numpy(joined[oracle.columns[s.name]].fill_null(np.nan).to_numpy().copy()) for s in specs
    }
    return add_joint(values, specs)


def split_metrics(
    predictor: Predictor, dataset: Dataset, split: str
) -> tuple[dict[str, float], SplitPredictions | None]:
    """Model metrics on `split`; where the data has an oracle, also `oracle/<metric>` and `ratio/<metric>`; where the
    model has more than one expert, its mixture's health (`mixture/...`, see metrics.MixtureHealth).

    Exact over the whole split: under N ranks they are computed once, on rank 0, and sent to every rank (so that all
    take the same early-stopping decision); only rank 0 gets the predictions.
    """
    preds = predict_split(predictor, dataset, split)
    metrics = {}
    if preds is not None:
        metrics = _metrics(predictor.specs, dataset, preds) | mixture_health(predictor, preds)
        warn_undefined(metrics, preds, split)
    if world()[1] > 1:
        shared = [metrics]
        dist.broadcast_object_list(shared, src=0)
        metrics = shared[0]
    return metrics, preds


def _metrics(specs: tuple[TaskSpec, ...], dataset: Dataset, preds: SplitPredictions) -> dict[str, float]:
    users = preds.keys["user_id"].to_numpy() if "user_id" in preds.keys.columns else None
    metrics = task_metrics(preds.values, preds.labels, preds.masks, specs, users) | cold_metrics(preds, specs)
    oracle = oracle_predictions(dataset, preds.keys, specs)
    if oracle is not None:
        oracle_metrics = task_metrics(oracle, preds.labels, preds.masks, specs, users)
        oracle_metrics |= cold_metrics(dataclasses.replace(preds, values=oracle), specs)
        metrics |= {f"oracle/{k}": v for k, v in oracle_metrics.items()}
        metrics |= {f"ratio/{k}": metrics[k] / v for k, v in oracle_metrics.items() if v}
    return metrics


def mixture_health(predictor: Predictor, preds: SplitPredictions) -> dict[str, float]:
    """The `mixture/...` metrics of the predictor's model (whole, or wrapped for training) on `preds`; none when the
    model has a single expert (shared_bottom)."""
    mixture = next(m for m in predictor.model.modules() if isinstance(m, Mixture))
    if len(mixture.expert_names) < 2:
        return {}
    last = cast(MixtureLevel, mixture.levels[-1])
    gate_mask = last.gate_mask[: mixture.num_tasks].cpu()  # [T, E] the task gates of the last level
    tasks = [spec.name for spec in predictor.specs]  # the gates' order
    health = MixtureHealth.measure(preds.gate_weights, preds.gate_entropy, gate_mask, tasks, mixture.expert_names)
    return health.to_metrics()


def warn_undefined(metrics: dict[str, float], preds: SplitPredictions, split: str) -> None:
    """Log a warning per task whose metrics are undefined (NaN) on `split`, with its labelled rows and label range."""
    by_task: dict[str, list[str]] = {}
    for name, value in metrics.items():
        if math.isnan(value) and is_task_metric(name):
            by_task.setdefault(name.split("/")[0], []).append(name)
    for task, names in by_task.items():
        labels = preds.labels[task][preds.masks[task]]
        if not len(labels):
            why = "no labelled rows"
        elif labels.min() == labels.max():
            why = f"{len(labels)} labelled rows, all {labels.min():g} (an AUC needs both classes)"
        else:  # e.g. cvr/auc_clicked without a clicked row
            why = f"{len(labels)} labelled rows, from {labels.min():g} to {labels.max():g}"
        log.warning("%s split: %s undefined (reported as —): task %r has %s", split, ", ".join(names), task, why)


def cold_metrics(preds: SplitPredictions, specs: tuple[TaskSpec, ...]) -> dict[str, float]:
    """`<task>/auc_cold`: the AUC of each plain binary task on the rows of items never seen in training."""
    if preds.cold is None:
        return {}
    out = {}
    for spec in specs:
        rows = preds.cold & preds.masks[spec.name]
        labels = preds.labels[spec.name][rows]
        if spec.task_kind == "binary" and 0 < labels.sum() < len(labels):
            out[f"{spec.name}/auc_cold"] = auc(labels, preds.values[spec.name][rows])
    return out


def calibration_curve(preds: SplitPredictions, task: str) -> CalibrationCurve:
    """Mean prediction and mean label in equal-count bins of the prediction (for a binary task)."""
    mask = preds.masks[task]
    p, y = preds.values[task][mask].double(), preds.labels[task][mask].double()
    order = torch.argsort(p)
    bins = [b for b in torch.tensor_split(order, CALIBRATION_BINS) if len(b)]
    return CalibrationCurve([float(p[b].mean()) for b in bins], [float(y[b].mean()) for b in bins])


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def evaluate_run(
    run_dir: Path,
    split: str,
    device: torch.device,
    baselines: tuple[Path, ...] = (),
    explain: "ExplainSettings | None" = None,
) -> dict[str, float]:
    """Evaluate a trained run on `split`: metrics_<split>.json, details_<split>.json and report_<split>.md.

    Args:
        baselines: other runs (e.g. single-task) already evaluated on `split`, shown beside this one in the report.
        explain: also explain the model with these settings (explain.py): explain_<split>.json and its plots, and
            its section in the report.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, device)
    dataset = Dataset(run.cfg.dataset)
    metrics, preds = split_metrics(Predictor(run.model, run.specs, run.cfg, device), dataset, split)
    if preds is None:  # not rank 0: rank 0 writes the files
        return metrics
    binary = [s.name for s in run.specs if s.task_kind == "binary"]
    details = EvaluationDetails(
        num_rows=len(preds.keys),
        arch=run.cfg.model.arch,
        tasks=list(run.cfg.task_names),
        experts=list(run.model.mixture.expert_names),
        gate_weights=preds.gate_weights.tolist(),
        calibration={task: calibration_curve(preds, task) for task in binary},
    )
    write_json(run_dir / f"metrics_{split}.json", metrics)
    write_json(run_dir / f"details_{split}.json", dataclasses.asdict(details))
    others = {}
    for baseline in baselines:
        path = Path(baseline) / f"metrics_{split}.json"
        if not path.is_file():
            raise MissingInputError(f"{path} is missing: evaluate the baseline run {baseline} on {split!r} first")
        try:
            others[Path(baseline).name] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: not a metrics file ({err})") from err
    sections = []
    if explain is not None:
        from recsys_mtl.explain import explain as explain_model  # Captum only where asked for
        from recsys_mtl.explain import write_explanation

        log.info("explaining %s on the %s split", run_dir, split)
        sections = write_explanation(run_dir, explain_model(run, split, explain))
    write_report(run_dir, split, metrics, details, others, sections)
    return metrics
