"""`recsys-mtl explain`: which input features each task and each task's gate rely on, on a sample of a split, by
integrated gradients (Captum) checked against an exact permutation importance (attribution.py); the top features of
single rows; written as explain_<split>.json, one PNG per task and a markdown section (also in the evaluate report)."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor
from tqdm import tqdm

from recsys_mtl.attribution import Attributor, FeatureGroups, Sample, key_filter
from recsys_mtl.data.loader import Dataset
from recsys_mtl.data.schema import SPLITS
from recsys_mtl.errors import InputError
from recsys_mtl.files import atomic_write_text
from recsys_mtl.report import save_figure
from recsys_mtl.run import TrainedRun, load_run
from recsys_mtl.tasks import headline_metric

ALL_TASKS = ("ctr", "cvr", "rating", "reads")


class Driver(NamedTuple):
    """A term of the synthetic world's generator: the features that carry it, the tasks whose labels it enters."""

    features: tuple[str, ...]
    tasks: tuple[str, ...]


# The terms the synthetic world draws its labels from (data_prep/synth.py, the click / conversion / rating / read-rate
# lines), as the synthetic description names the features that carry them. The user's taste is their age band's and
# gender's vectors plus noise of their own; the item's latent vector its category's centroid plus its brand's and its
# title words' vectors; its quality its brand's and title words' plus noise of its own. Reads are counted on clicks, so
# the click's terms enter them too. city and bid enter no label.
SYNTHETIC_DRIVERS = {
    "affinity, user side": Driver(("user_id", "age_band", "gender", "recent_categories"), ALL_TASKS),
    "affinity, item side": Driver(("item_id", "category", "brand", "item_title"), ALL_TASKS),
    "quality": Driver(("item_id", "brand", "item_title"), ("cvr", "rating", "reads")),
    "price": Driver(("price",), ("cvr",)),
    "length": Driver(("length",), ("reads",)),
    "position": Driver(("position",), ("ctr", "reads")),
    "none": Driver(("city", "bid"), ()),
}


@dataclass(frozen=True)
class ExplainSettings:
    """What to measure; the flag of `recsys-mtl explain` in brackets."""

    sample: int = 20_000  # rows drawn from the split (seeded) for the permutation importance; 0: all (--sample)
    attribution_rows: int = 2_000  # of those, how many integrated gradients explain (--ig-rows)
    steps: int = 16  # integrated gradients' steps (--steps)
    repeats: int = 2  # shuffles per feature (--repeats)
    rows: int = 3  # rows explained one by one: the first that match `keys`, else the sample's first (--rows)
    keys: tuple[str, ...] = ()  # COLUMN=VALUE: explain the rows whose key column has that value (--key)
    top: int = 5  # features shown per task and row (--top)
    seed: int = 0  # (--seed)

    def __post_init__(self) -> None:
        limits = {"sample": 0, "attribution_rows": 1, "steps": 2, "repeats": 1, "rows": 0, "top": 1}
        flags = {"attribution_rows": "ig-rows"}
        for name, low in limits.items():
            if getattr(self, name) < low:
                raise InputError(f"--{flags.get(name, name)} must be >= {low}, got {getattr(self, name)}")


@dataclass(frozen=True)
class RowExplanation:
    """One row: its keys, each task's prediction and its `top` features, largest |attribution| first."""

    keys: dict[str, object]
    predictions: dict[str, float]
    top: dict[str, list[tuple[str, float]]]  # task -> (feature, signed attribution to the task's logit)


@dataclass(frozen=True)
class Explanation:
    """What `explain` measured; its JSON is `dataclasses.asdict`.

    importance: method -> task -> feature -> value. integrated_gradients: the mean |attribution| to the task's logit;
        permutation: the fall of the task's headline metric when the feature is shuffled; gate_integrated_gradients:
        the mean |attribution| to the task's gate weights, summed over its experts; gate_permutation: the mean
        total-variation distance the gate moves when the feature is shuffled (both empty when no gate has a choice).
    completeness: task -> mean |sum of a row's attributions - (f(row) - f(baseline))| / mean |f(row) - f(baseline)|,
        integrated gradients' own check (0: exact).
    agreement: task -> the rank correlation (Spearman) of the features' importance under the two task methods.
    drivers: on the synthetic world, driver (SYNTHETIC_DRIVERS) -> method -> task -> the rank among the features of
        the best-ranked feature that carries it (1 = the most important).
    """

    split: str
    num_rows: int  # the rows drawn from the split
    task_rows: dict[str, int]  # task -> those it is judged on (attribution.Sample.judged_rows): shuffled for it
    attribution_rows: dict[str, int]  # task -> the first of those, which integrated gradients explain
    features: list[str]
    metrics: dict[str, str]  # task -> the headline metric whose fall the permutation importance measures
    importance: dict[str, dict[str, dict[str, float]]]
    completeness: dict[str, float]
    agreement: dict[str, float]
    rows: list[RowExplanation]
    drivers: dict[str, dict[str, dict[str, int]]]
    settings: ExplainSettings

    def ranking(self, method: str, task: str) -> list[str]:
        """The features by importance, largest first (undefined ones last)."""
        values = self.importance[method][task]
        return sorted(values, key=lambda f: -values[f] if not math.isnan(values[f]) else math.inf)


def explain(
    run: TrainedRun, split: str, settings: ExplainSettings = ExplainSettings(), progress: bool = False
) -> Explanation:
    """Measure every feature's importance for every task and gate of `run` (on its device) on a sample of `split`
    (attribution.py).

    Raises:
        InputError: a bad split, a bad --key or one that matches no row, a split without rows.
    """
    if split not in SPLITS:
        raise InputError(f"--split must be one of {list(SPLITS)}, got {split!r}")
    dataset = Dataset(run.cfg.dataset)
    if dataset.num_rows(split) == 0:
        raise InputError(f"--split {split}: the split of {dataset.folder} has no rows")
    attributor = Attributor(run.model, FeatureGroups(run.model, run.schema), run.specs)
    names = attributor.groups.names
    keys = key_filter(settings.keys, dataset)
    num_rows = dataset.num_rows(split)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(settings.seed))
    order = order[: settings.sample or num_rows]
    sample, keyed = attributor.read_sample(dataset, split, order, keys, settings.rows, progress)
    if keys and not len(keyed):
        raise InputError(f"--key {' '.join(settings.keys)}: no row of the {split} split of {dataset.folder} matches")
    explained = keyed if keys else sample.first(settings.rows)
    judged = {spec.name: sample.judged_rows(spec) for spec in run.specs}  # task -> its rows of the sample
    attributed = {task: rows.first(settings.attribution_rows) for task, rows in judged.items()}
    baselines = tuple(g.mean(0, keepdim=True) for g in sample.groups)  # G x [1, W_g]: the mean row
    work = 2 * len(judged) + sum(map(len, attributor.gate_experts())) + len(judged) * len(names) * settings.repeats
    with tqdm(total=work, disable=not progress, desc="explain") as bar:
        task_ig = attributor.task_attributions(attributed, baselines, settings.steps, bar)
        gate_ig = attributor.gate_attributions(attributed, baselines, settings.steps, bar)
        row_ig = attributor.task_attributions(dict.fromkeys(judged, explained), baselines, settings.steps, bar)
        drops, shifts = attributor.permutation_importance(judged, settings.repeats, settings.seed, bar)

    def by_feature(values: Tensor) -> dict[str, float]:
        return dict(zip(names, values.tolist(), strict=True))

    explanation = Explanation(
        split=split,
        num_rows=len(sample),
        task_rows={task: len(rows) for task, rows in judged.items()},
        attribution_rows={task: len(rows) for task, rows in attributed.items()},
        features=names,
        metrics={s.name: headline_metric(s) for s in run.specs},
        importance={
            "integrated_gradients": {t: by_feature(a.abs().mean(0)) for t, a in task_ig.items()},
            "permutation": {t: by_feature(v) for t, v in drops.items()},
            "gate_integrated_gradients": {t: by_feature(a.mean(0)) for t, a in gate_ig.items()},
            "gate_permutation": {t: by_feature(v) for t, v in shifts.items()} if gate_ig else {},
        },
        completeness=_completeness(attributor, attributed, baselines, task_ig),
        agreement={t: rank_correlation(task_ig[t].abs().mean(0), drops[t]) for t in task_ig},
        rows=_row_explanations(attributor, explained, row_ig, settings.top),
        drivers={},
        settings=settings,
    )
    if run.schema.name == "synthetic":
        explanation = dataclasses.replace(explanation, drivers=driver_ranks(explanation, SYNTHETIC_DRIVERS))
    return explanation


def _completeness(
    attributor: Attributor, rows: dict[str, Sample], baselines: tuple[Tensor, ...], attributions: dict[str, Tensor]
) -> dict[str, float]:
    """Explanation.completeness, from the model's own logits on each task's rows and on the baseline."""
    out = {}
    with torch.no_grad():
        at_base = attributor.run(baselines).logits  # task -> [1]
        for task, attribution in attributions.items():
            gap = (attributor.run(rows[task].groups).logits[task] - at_base[task]).double().cpu()  # [N_t]
            error = (attribution.sum(1).double() - gap).abs().mean() / gap.abs().mean().clamp(min=1e-12)
            out[task] = float(error) if len(gap) else math.nan
    return out


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of a [G] and b [G], ties at their mean rank; NaN where either has a NaN."""
    if a.isnan().any() or b.isnan().any():
        return math.nan
    ranks = []
    for values in (a, b):
        _, inverse, counts = torch.unique(values.double(), return_inverse=True, return_counts=True)  # sorted
        ranks.append((counts.cumsum(0) - (counts - 1) / 2).double()[inverse])  # [G]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def _row_explanations(
    attributor: Attributor, rows: Sample, attributions: dict[str, Tensor], top: int
) -> list[RowExplanation]:
    predictions = attributor.outputs(rows.groups)[0]
    names = attributor.groups.names
    out = []
    for i, keys in enumerate(rows.keys.iter_rows(named=True)):
        tops = {}
        for task, attribution in attributions.items():
            row = attribution[i].cpu()  # [G]
            tops[task] = [(names[g], float(row[g])) for g in row.abs().argsort(descending=True)[:top].tolist()]
        out.append(RowExplanation(keys, {t: float(predictions[t][i]) for t in attributions}, tops))
    return out


def driver_ranks(explanation: Explanation, drivers: dict[str, Driver]) -> dict[str, dict[str, dict[str, int]]]:
    """Driver -> method (integrated_gradients, permutation) -> task -> the best rank (1 = first) of the driver's
    features that `explanation` has; drivers without any are left out."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for name, driver in drivers.items():
        for method in ("integrated_gradients", "permutation"):
            for task in explanation.importance[method]:
                ranking = explanation.ranking(method, task)
                ranks = [ranking.index(f) + 1 for f in driver.features if f in ranking]
                if ranks:
                    out.setdefault(name, {}).setdefault(method, {})[task] = min(ranks)
    return out


def _shares(values: dict[str, float]) -> dict[str, float]:
    """Each value over the sum of the positive ones (a permutation's fall can be below 0 by chance; NaN stays)."""
    total = sum(v for v in values.values() if v > 0) or 1.0
    return {f: v / total for f, v in values.items()}


def _tables(explanation: Explanation) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each table that the markdown section and the command line show."""
    tables = []
    for title, ig, perm, label in (
        ("tasks", "integrated_gradients", "permutation", "perm"),
        ("gates", "gate_integrated_gradients", "gate_permutation", "moved"),
    ):
        tasks = list(explanation.importance[ig])
        if not tasks:
            continue
        shares = {t: _shares(explanation.importance[ig][t]) for t in tasks}
        features = sorted(explanation.features, key=lambda f: -sum(shares[t][f] for t in tasks))
        header = ["feature", *(f"{t} {column}" for t in tasks for column in ("ig %", label))]
        rows = [
            [f, *(c for t in tasks for c in (f"{100 * shares[t][f]:.1f}", _number(explanation.importance[perm][t][f])))]
            for f in features
        ]
        tables.append((title, header, rows))
    rows = [
        [
            " ".join(f"{k}={v}" for k, v in row.keys.items()),
            task,
            f"{row.predictions[task]:.4g}",
            ", ".join(f"{f} {a:+.3f}" for f, a in top),
        ]
        for row in explanation.rows
        for task, top in row.top.items()
    ]
    if rows:
        tables.append(("rows", ["row", "task", "prediction", "top features (attribution to the logit)"], rows))
    tasks = list(explanation.metrics)
    rows = [
        [
            f"{name} ({', '.join(SYNTHETIC_DRIVERS[name].features)})",
            *(
                f"{ranks[method].get(t, '—')}{'*' if t in SYNTHETIC_DRIVERS[name].tasks else ''}"
                for method in ("integrated_gradients", "permutation")
                for t in tasks
            ),
        ]
        for name, ranks in explanation.drivers.items()
    ]
    if rows:
        header = ["driver (its features)", *(f"{m} {t}" for m in ("ig", "perm") for t in tasks)]
        tables.append(("drivers", header, rows))
    return tables


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.4f}"


def format_tables(explanation: Explanation, markdown: bool = False) -> dict[str, str]:
    """Title -> the table as plain aligned text (the command line), or as markdown."""
    out = {}
    for title, header, rows in _tables(explanation):
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
        out[title] = "\n".join(lines)
    return out


def _plot(explanation: Explanation, task: str, path: Path) -> None:
    """Bars per feature: the share of integrated gradients and of the permutation importance, for the task and its
    gate."""
    panels = [(f"{task}: its logit; {explanation.metrics[task]}", "integrated_gradients", "permutation")]
    if task in explanation.importance["gate_integrated_gradients"]:
        panels.append(
            (f"{task}'s gate: its weights; how far it moves", "gate_integrated_gradients", "gate_permutation")
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 1.2 + 0.28 * len(explanation.features)))
    for ax, (title, ig, perm) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        ig_shares, perm_shares = _shares(explanation.importance[ig][task]), _shares(explanation.importance[perm][task])
        features = sorted(explanation.features, key=lambda f: ig_shares[f])
        y = range(len(features))
        ax.barh([i + 0.2 for i in y], [ig_shares[f] for f in features], height=0.4, label="integrated gradients")
        ax.barh([i - 0.2 for i in y], [perm_shares[f] for f in features], height=0.4, label="permutation")
        ax.set_yticks(list(y), features, fontsize=8)
        ax.set(title=title, xlabel="share of the total")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def write_explanation(run_dir: Path, explanation: Explanation) -> list[str]:
    """Write explain_<split>.json, explain_<split>_<task>.png and explain_<split>.md into `run_dir`; return the
    markdown section (evaluate --explain adds it to its report)."""
    run_dir, split, s = Path(run_dir), explanation.split, explanation.settings
    atomic_write_text(run_dir / f"explain_{split}.json", json.dumps(dataclasses.asdict(explanation), indent=1) + "\n")
    tables = format_tables(explanation, markdown=True)
    metrics = ", ".join(explanation.metrics.values())
    lines = [
        "## Explanations",
        "",
        f"Which input features each task relies on, on {explanation.num_rows:,} rows of the {split} split drawn at "
        f"random (seed {s.seed}), each task on the rows it is judged on (its labelled rows; after another task, where "
        "that one's label is 1). A feature is what the network reads of it: an id feature's pooled embedding (with "
        "each task's own), a text feature's projected vector, a dense value. `ig %`: the feature's share of the "
        f"mean |integrated gradients| (Captum, {s.steps} steps from the mean row) of the task's logit. `perm`: the "
        f"fall of the task's headline metric ({metrics}; for errors and deviances, their rise) when the feature's "
        f"values are shuffled across the task's rows (mean of {s.repeats} shuffles). Rows per task (integrated "
        "gradients / permutation): "
        + ", ".join(f"{t} {explanation.attribution_rows[t]:,} / {n:,}" for t, n in explanation.task_rows.items())
        + ". "
        "Completeness error of integrated gradients (0: exact): "
        + ", ".join(f"{t} {e:.3f}" for t, e in explanation.completeness.items())
        + ". Rank correlation of the two methods: "
        + ", ".join(f"{t} {r:.2f}" for t, r in explanation.agreement.items())
        + ".",
        "",
        tables["tasks"],
        "",
        *(f"![{task}](explain_{split}_{task}.png)" for task in explanation.metrics),
        "",
    ]
    if "gates" in tables:
        lines += [
            "### Gates",
            "",
            "Which features route each task's gate. `ig %`: share of the mean |integrated gradients| of the gate's "
            "weights, summed over its experts. `moved`: the mean total-variation distance between the gate's weights "
            "before and after the shuffle (0: unmoved, 1: routed to other experts entirely).",
            "",
            tables["gates"],
            "",
        ]
    if "rows" in tables:
        lines += ["### Rows", "", f"The {s.top} largest attributions of each task's logit.", "", tables["rows"], ""]
    if "drivers" in tables:
        lines += [
            "### The synthetic world's drivers",
            "",
            "Each term the generator draws the labels from (explain.SYNTHETIC_DRIVERS): the rank among the "
            "features, per task and method, of the best-ranked feature that carries it; * marks the tasks whose "
            "labels it enters.",
            "",
            tables["drivers"],
            "",
        ]
    for task in explanation.metrics:
        _plot(explanation, task, run_dir / f"explain_{split}_{task}.png")
    atomic_write_text(run_dir / f"explain_{split}.md", "\n".join(lines))
    return lines


def explain_run(
    run_dir: Path,
    split: str,
    device: torch.device,
    settings: ExplainSettings = ExplainSettings(),
    progress: bool = False,
) -> Explanation:
    """Load the run in `run_dir`, explain it on `split` and write the files (`write_explanation`)."""
    explanation = explain(load_run(Path(run_dir), device), split, settings, progress)
    write_explanation(run_dir, explanation)
    return explanation
