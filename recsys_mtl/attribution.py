"""Feature attribution of a MultiTaskRanker: how much each input feature matters to each task and to each task's gate.

A feature group is what the dense network reads of one input feature (`RankerInputs`): a sparse feature's pooled
embedding together with each task's own pooled embedding of it, a text feature's projected vector, or one dense
feature. Each task is explained on the rows it is judged on (`judged_rows`: its labelled rows; for cvr after ctr, the
clicked ones), by two methods:

- integrated gradients (Captum), row by row: the group's part of f(row) - f(baseline), the baseline being the sample's
  mean of every group; a group's importance is the mean |attribution| over the rows, in the units of f (a task's logit,
  a gate's weight on an expert);
- permutation: the group's rows shuffled across the task's rows by a seeded generator (so exact: the same sample gives
  the same numbers); a group's importance is how much worse the task's headline metric gets, and how far the task's
  gate moves (the mean total-variation distance between its weights before and after).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import polars as pl
import torch
from captum.attr import IntegratedGradients
from torch import Tensor
from tqdm import tqdm

from recsys_mtl.data.loader import Dataset, count_batches, read_batches
from recsys_mtl.data.schema import Schema
from recsys_mtl.errors import InputError
from recsys_mtl.metrics import task_metrics
from recsys_mtl.model.experts import MixtureLevel, raw_gradients
from recsys_mtl.model.ranker import MultiTaskRanker, RankerInputs, RankerOutput
from recsys_mtl.tasks import HIGHER_IS_BETTER, TaskSpec, after_rows, headline_metric, predict

CHUNK_ROWS = 8192  # rows per forward pass (and per integrated-gradients chunk of rows x steps)


class FeatureGroups:
    """The model's inputs as G named groups: the sparse features (`MultiTaskRanker.sparse_names` order), the text
    features, the dense ones.

    split: RankerInputs -> G x [B, W_g]; join: the inverse. A sparse group is [B, D_emb + T * D_own]: its shared pooled
    embedding, then its tasks' own (`model.task_embedding_dim`); a text group [B, text_dim]; a dense group [B, 1].
    """

    def __init__(self, model: MultiTaskRanker, schema: Schema) -> None:
        features = {f.name: f for f in schema.sparse_features}
        self.sparse_dims = [schema.feature_table(features[name]).embedding_dim for name in model.sparse_names]
        self.has_own = model.own_width > 0
        self.num_texts = len(model.text_names)
        self.names = [*model.sparse_names, *model.text_names, *(f.name for f in schema.dense_features)]

    def split(self, inputs: RankerInputs) -> tuple[Tensor, ...]:
        sparse = inputs.pooled.split(self.sparse_dims, 1)  # F x [B, D_emb]
        if inputs.own is not None:
            sparse = tuple(torch.cat([p, own], 1) for p, own in zip(sparse, inputs.own.unbind(1), strict=True))
        return (*sparse, *inputs.texts, *inputs.dense.split(1, dim=1))  # G x [B, W_g]

    def join(self, groups: Sequence[Tensor]) -> RankerInputs:
        num_sparse = len(self.sparse_dims)
        sparse = groups[:num_sparse]
        pooled = torch.cat([g[:, :dim] for g, dim in zip(sparse, self.sparse_dims, strict=True)], 1)
        own = torch.stack([g[:, dim:] for g, dim in zip(sparse, self.sparse_dims, strict=True)], 1)
        texts = list(groups[num_sparse : num_sparse + self.num_texts])
        dense_parts = groups[num_sparse + self.num_texts :]
        dense = torch.cat(list(dense_parts), 1) if dense_parts else groups[0].new_zeros(len(groups[0]), 0)
        return RankerInputs(pooled, own if self.has_own else None, texts, dense)  # dense [B, D_dense]


@dataclass(frozen=True)
class Sample:
    """Rows of a split as the dense network reads them: groups G x [N, W_g] (FeatureGroups), labels and masks
    task -> [N] (CPU), keys (N rows)."""

    groups: tuple[Tensor, ...]
    labels: dict[str, Tensor]
    masks: dict[str, Tensor]
    keys: pl.DataFrame

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: Tensor) -> "Sample":
        """The rows at `index` ([n] int64, CPU), in that order."""
        return Sample(
            tuple(g[index.to(g.device)] for g in self.groups),
            {t: v[index] for t, v in self.labels.items()},
            {t: m[index] for t, m in self.masks.items()},
            self.keys[index.numpy()],
        )

    def first(self, num_rows: int) -> "Sample":
        return self.take(torch.arange(min(num_rows, len(self))))

    def judged_rows(self, spec: TaskSpec) -> "Sample":
        """The rows `spec`'s task is judged on: its labelled rows; for a task after another, those where the other's
        label is 1 (cvr: the clicked rows)."""
        rows = after_rows(spec, self.labels, self.masks) if spec.after is not None else self.masks[spec.name]
        return self.take(rows.nonzero().flatten())

    @staticmethod
    def concat(parts: "list[Sample]") -> "Sample":
        return Sample(
            tuple(torch.cat(gs) for gs in zip(*(p.groups for p in parts), strict=True)),
            {t: torch.cat([p.labels[t] for p in parts]) for t in parts[0].labels},
            {t: torch.cat([p.masks[t] for p in parts]) for t in parts[0].masks},
            pl.concat([p.keys for p in parts]),
        )


@dataclass(frozen=True)
class Attributor:
    """A whole model in eval mode (`run.load_run`), its feature groups and its tasks."""

    model: MultiTaskRanker
    groups: FeatureGroups
    specs: tuple[TaskSpec, ...]

    def run(self, groups: Sequence[Tensor]) -> RankerOutput:
        return self.model.head(self.groups.join(groups))

    @torch.no_grad()
    def read_sample(
        self, dataset: Dataset, split: str, order: Tensor, keys: list[tuple[str, str]], max_keyed: int, progress: bool
    ) -> tuple[Sample, Sample]:
        """(the rows `order` draws, in its order; the first `max_keyed` rows in split order whose key column has the
        value of one of `keys` (column, value)).

        Args:
            order: [n] distinct row numbers of `split`.
        """
        num_rows = dataset.num_rows(split)
        position = torch.full((num_rows,), -1, dtype=torch.long)
        position[order] = torch.arange(len(order))  # [num_rows] where each row goes in the sample, -1: not drawn
        drawn_parts, keyed_parts = [], []
        start, num_keyed = 0, 0
        batches = read_batches(dataset, split, CHUNK_ROWS)
        for batch in tqdm(batches, total=count_batches(dataset, split, CHUNK_ROWS), disable=not progress, desc="read"):
            drawn = position[start : start + len(batch)] >= 0  # [B]
            start += len(batch)
            keyed = torch.zeros(len(batch), dtype=torch.bool)  # [B]
            for column, value in keys:
                keyed |= torch.from_numpy((batch.keys[column].cast(pl.String) == value).fill_null(False).to_numpy())
            keyed &= keyed.cumsum(0) <= max_keyed - num_keyed
            num_keyed += int(keyed.sum())
            if drawn.any() or keyed.any():
                groups = self.groups.split(self.model.inputs(batch.to(self.model_device)))
                rows = Sample(groups, batch.labels, batch.masks, batch.keys)
                drawn_parts.append(rows.take(drawn.nonzero().flatten()))
                keyed_parts.append(rows.take(keyed.nonzero().flatten()))
        sample = Sample.concat(drawn_parts).take(torch.argsort(position[position >= 0]))  # split order -> `order`
        return sample, Sample.concat(keyed_parts)

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def gate_experts(self) -> list[list[int]]:
        """Per task, the experts its gate can route to; none at all when no gate has a choice (one expert)."""
        mask = cast(MixtureLevel, self.model.mixture.levels[-1]).gate_mask[: len(self.specs)]  # [T, E]
        experts = [row.nonzero().flatten().tolist() for row in mask]
        return experts if any(len(e) > 1 for e in experts) else []

    def integrated_gradients(
        self, rows: Sample, baselines: tuple[Tensor, ...], output: Callable[[RankerOutput], Tensor], steps: int
    ) -> Tensor:
        """Captum's integrated gradients of `output` (RankerOutput -> [N]) from `baselines` (G x [1, W_g]) to the
        rows, summed within each group: [N, G] (CPU)."""
        if not len(rows):
            return torch.zeros(0, len(rows.groups))
        method = IntegratedGradients(lambda *groups: output(self.run(groups)))
        with raw_gradients(self.model):  # true gradients, and the training's gradient balance left as it was
            attributions = method.attribute(rows.groups, baselines, n_steps=steps, internal_batch_size=CHUNK_ROWS)
        return torch.stack([a.detach().sum(1) for a in attributions], 1).cpu()  # [N, G]

    def task_attributions(
        self, rows: dict[str, Sample], baselines: tuple[Tensor, ...], steps: int, progress: tqdm
    ) -> dict[str, Tensor]:
        """Task -> [N_t, G] signed integrated gradients of its logit (what `tasks.predict` turns into its prediction)
        on its rows."""
        out = {}
        for task, sample in rows.items():
            out[task] = self.integrated_gradients(sample, baselines, _logit(task), steps)
            progress.update()
        return out

    def gate_attributions(
        self, rows: dict[str, Sample], baselines: tuple[Tensor, ...], steps: int, progress: tqdm
    ) -> dict[str, Tensor]:
        """Task -> [N_t, G]: per row, the |integrated gradients| of the task's gate weight on each expert it can route
        to, summed over those experts (how much a group moves the routing); empty when no gate has a choice."""
        out = {}
        for t, experts in enumerate(self.gate_experts()):
            task = self.specs[t].name
            total = torch.zeros(len(rows[task]), len(baselines))  # [N_t, G]
            for e in experts:
                total += self.integrated_gradients(rows[task], baselines, _gate_weight(t, e), steps).abs()
                progress.update()
            out[task] = total
        return out

    @torch.no_grad()
    def outputs(self, groups: Sequence[Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """(predictions, task -> [N] as `tasks.predict`; gate weights [N, T, E]), CHUNK_ROWS at a time, on the CPU."""
        parts = [self.run(chunk) for chunk in zip(*(g.split(CHUNK_ROWS) for g in groups), strict=True)]
        logits = {t: torch.cat([p.logits[t] for p in parts]).cpu() for t in parts[0].logits}
        return predict(logits, self.specs), torch.cat([p.gate_weights for p in parts]).float().cpu()

    def permutation_importance(
        self, rows: dict[str, Sample], repeats: int, seed: int, progress: tqdm
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Each group's rows shuffled across each task's rows, `repeats` times (shuffle r of a task drawn from seed + r,
        the same for every group), the results averaged.

        Returns:
            (task -> [G] the fall of its headline metric (AUC: base - shuffled; RMSE, deviance: shuffled - base;
            NaN where undefined), task -> [G] the mean total-variation distance its gate's weights move).
        """
        drops, shifts = {}, {}
        for t, spec in enumerate(self.specs):
            sample = rows[spec.name]
            num_groups = len(sample.groups)
            drops[spec.name], shifts[spec.name] = torch.zeros(num_groups, dtype=torch.float64), torch.zeros(num_groups)
            if not len(sample):
                drops[spec.name] += float("nan")
                continue
            base, base_gates = self._metric(spec, sample, sample.groups)
            for r in range(repeats):
                order = torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed + r))
                for g in range(num_groups):
                    shuffled = [x[order.to(x.device)] if i == g else x for i, x in enumerate(sample.groups)]
                    metric, gates = self._metric(spec, sample, shuffled)
                    drops[spec.name][g] += (base - metric) / repeats
                    shifts[spec.name][g] += 0.5 * (gates[:, t] - base_gates[:, t]).abs().sum(-1).mean() / repeats
                    progress.update()
        return drops, shifts

    def _metric(self, spec: TaskSpec, sample: Sample, groups: Sequence[Tensor]) -> tuple[float, Tensor]:
        """(spec's headline metric on the sample's rows with these groups, turned so that higher is better; the gate
        weights [N, T, E])."""
        predictions, gates = self.outputs(groups)
        name = headline_metric(spec)
        value = task_metrics(predictions, sample.labels, sample.masks, (spec,))[name]
        return (value if name.split("/")[1] in HIGHER_IS_BETTER else -value), gates


def _logit(task: str) -> Callable[[RankerOutput], Tensor]:
    return lambda output: output.logits[task]  # [B]


def _gate_weight(task: int, expert: int) -> Callable[[RankerOutput], Tensor]:
    return lambda output: output.gate_weights[:, task, expert]  # [B]


def key_filter(keys: tuple[str, ...], dataset: Dataset) -> list[tuple[str, str]]:
    """(column, value) of each COLUMN=VALUE.

    Raises:
        InputError: a malformed one, or a column that is not one of the dataset's key columns.
    """
    filters = []
    for key in keys:
        column, equals, value = key.partition("=")
        if not equals:
            raise InputError(f"--key {key!r}: expected COLUMN=VALUE, e.g. impression_id=42")
        if column not in dataset.schema.keys:
            raise InputError(
                f"--key {key}: {column!r} is not a key column of {dataset.folder} ({list(dataset.schema.keys)})"
            )
        filters.append((column, value))
    return filters
