import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from recsys_mtl.attribution import Attributor, FeatureGroups
from recsys_mtl.cli import _explain_settings, build_parser, main
from recsys_mtl.data.loader import Dataset, read_batches
from recsys_mtl.errors import InputError
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.explain import ExplainSettings, Explanation, explain, rank_correlation
from recsys_mtl.metrics import auc
from recsys_mtl.model.embeddings import TEXT_TABLE_PREFIX, write_table
from recsys_mtl.model.experts import GradientBalance, raw_gradients
from recsys_mtl.run import TrainedRun, build_ranker, load_run
from recsys_mtl.tasks import predict, task_specs
from recsys_mtl.train import train
from tests.conftest import tiny_config

CPU = torch.device("cpu")
SMALL = ExplainSettings(sample=1_500, attribution_rows=200, steps=8, repeats=1, rows=2, top=3)


@pytest.fixture(scope="module")
def fresh(text_dataset: Path, tiny_bert: Path) -> TrainedRun:
    """An untrained ranker on the tiny world (seeded weights): enough to hold the methods to their references."""
    torch.manual_seed(0)
    cfg = tiny_config(text_dataset, tiny_bert)
    dataset = Dataset(text_dataset)
    model, vectors = build_ranker(cfg, text_dataset, dataset.schema, CPU)
    for name, table in vectors.items():
        write_table(model, TEXT_TABLE_PREFIX + name, table)
    return TrainedRun(cfg, dataset.schema, task_specs(cfg, dataset.schema), Path("unused"), model.eval())


@pytest.fixture(scope="module")
def run(text_dataset: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir trained for 3 steps on the tiny world."""
    run = tmp_path_factory.mktemp("explain") / "run"
    train(tiny_config(text_dataset, tiny_bert, train={"max_steps": 3}), run, CPU, progress=False)
    return run


def _attributor(run: TrainedRun) -> Attributor:
    return Attributor(run.model, FeatureGroups(run.model, run.schema), run.specs)


def _json(explanation: Explanation) -> str:
    return json.dumps(dataclasses.asdict(explanation))


def test_the_head_of_the_split_and_joined_feature_groups_is_the_forward(fresh: TrainedRun) -> None:
    batch = next(read_batches(Dataset(fresh.cfg.dataset), "valid", 64))
    attributor = _attributor(fresh)
    with torch.no_grad():
        groups = attributor.groups.split(fresh.model.inputs(batch))
        whole, parted = fresh.model(batch), attributor.run(groups)
    # 16 id features (each with its 4 tasks' own 8-wide embeddings), 2 texts, 3 dense values
    assert len(attributor.groups.names) == len(groups) == 16 + 2 + 3
    assert attributor.groups.names[-5:] == ["item_title", "ad_text", "price", "length", "bid"]
    assert attributor.groups.names[:3] == ["user_id", "item_id", "age_band"]  # the widest tables first
    assert [g.shape[1] for g in groups][:3] == [32 + 4 * 8, 32 + 4 * 8, 16 + 4 * 8]
    assert [g.shape[1] for g in groups][-5:] == [8, 8, 1, 1, 1]
    for task in whole.logits:
        torch.testing.assert_close(parted.logits[task], whole.logits[task], rtol=0, atol=0)
    torch.testing.assert_close(parted.gate_weights, whole.gate_weights, rtol=0, atol=0)


def test_rank_correlation_matches_spearman_with_ties() -> None:
    # ranks (2, 2, 2, 4) and (1.5, 1.5, 3, 4): deviations from 2.5 give covariance 3, variances 3 and 4.5
    a, b = torch.tensor([0.0, 0.0, 0.0, 5.0]), torch.tensor([2.0, 2.0, 7.0, 9.0])
    assert rank_correlation(a, b) == pytest.approx(3 / math.sqrt(3 * 4.5), rel=1e-12)
    assert rank_correlation(b, b) == pytest.approx(1.0)
    assert math.isnan(rank_correlation(a, torch.tensor([1.0, math.nan, 2.0, 3.0])))


def test_explain_is_exact_complete_and_leaves_the_model_as_it_was(fresh: TrainedRun) -> None:
    balance = next(m for m in fresh.model.modules() if isinstance(m, GradientBalance))
    before = balance.running_norms.clone()
    settings = dataclasses.replace(SMALL, steps=24)
    first, second = explain(fresh, "valid", settings), explain(fresh, "valid", settings)
    assert _json(first) == _json(second)  # the same numbers, to the last bit
    torch.testing.assert_close(balance.running_norms, before, rtol=0, atol=0)  # no gradient balance moved
    assert max(first.completeness.values()) < 0.02  # attributions sum to f(row) - f(mean row)
    assert first.num_rows == first.task_rows["ctr"] == 1_500
    assert first.task_rows["cvr"] < first.task_rows["reads"] < first.num_rows  # clicked rows; content rows
    assert first.attribution_rows["ctr"] == 200
    assert set(first.importance["gate_permutation"]) == {"ctr", "cvr", "rating", "reads"}
    assert len(first.rows) == 2
    for row in first.rows:
        for top in row.top.values():
            assert len(top) == 3
            assert [abs(a) for _, a in top] == sorted((abs(a) for _, a in top), reverse=True)


def test_integrated_gradients_equal_a_midpoint_sum_by_hand(fresh: TrainedRun) -> None:
    attributor = _attributor(fresh)
    sample, _ = attributor.read_sample(Dataset(fresh.cfg.dataset), "valid", torch.arange(40), [], 0, False)
    rows = sample.first(4)
    baselines = tuple(g.mean(0, keepdim=True) for g in sample.groups)
    captum = attributor.integrated_gradients(rows, baselines, lambda o: o.logits["rating"], steps=32)  # [4, G]
    steps = 256
    total = [torch.zeros_like(g) for g in rows.groups]
    for k in range(steps):
        alpha = (k + 0.5) / steps
        path = tuple((b + alpha * (x - b)).requires_grad_() for x, b in zip(rows.groups, baselines, strict=True))
        with raw_gradients(fresh.model):
            grads = torch.autograd.grad(attributor.run(path).logits["rating"].sum(), path)
        total = [t + g / steps for t, g in zip(total, grads, strict=True)]
    by_hand = torch.stack(
        [((x - b) * t).sum(1) for x, b, t in zip(rows.groups, baselines, total, strict=True)], 1
    )  # [4, G]
    # Gauss-Legendre with 32 nodes against 256 midpoints, on a path with ReLU kinks: within 1% of the largest
    torch.testing.assert_close(captum, by_hand, rtol=0.01, atol=0.01 * float(by_hand.abs().max()))


def test_permutation_importance_equals_a_shuffle_by_hand(fresh: TrainedRun) -> None:
    settings = ExplainSettings(sample=0, attribution_rows=10, steps=2, repeats=1, rows=0, seed=3)
    explanation = explain(fresh, "valid", settings)
    dataset = Dataset(fresh.cfg.dataset)
    batch = next(read_batches(dataset, "valid", dataset.num_rows("valid")))
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(3))  # the sample: every row, drawn
    shuffle = torch.randperm(len(batch), generator=torch.Generator().manual_seed(3))  # repeat 0 of ctr: seed + 0
    with torch.no_grad():
        inputs = fresh.model.inputs(batch)
        base = fresh.model.head(inputs)
        price = list(explanation.features).index("price") - len(fresh.model.sparse_names) - len(inputs.texts)
        dense = inputs.dense[order]
        dense[:, price] = dense[shuffle, price]
        shuffled = fresh.model.head(dataclasses.replace(inputs, dense=dense[torch.argsort(order)]))
    labels = batch.labels["ctr"]
    drop = auc(labels, predict(base.logits, fresh.specs)["ctr"]) - auc(
        labels, predict(shuffled.logits, fresh.specs)["ctr"]
    )
    assert explanation.importance["permutation"]["ctr"]["price"] == pytest.approx(drop, abs=1e-6)
    moved = 0.5 * (shuffled.gate_weights[:, 0] - base.gate_weights[:, 0]).abs().sum(-1).mean()
    assert explanation.importance["gate_permutation"]["ctr"]["price"] == pytest.approx(float(moved), rel=1e-4)
    assert explanation.task_rows["cvr"] == int((batch.labels["ctr"] == 1).sum())  # cvr: the clicked rows


def test_a_key_filter_explains_the_rows_it_names(fresh: TrainedRun) -> None:
    batch = next(read_batches(Dataset(fresh.cfg.dataset), "valid", 50))
    wanted = int(batch.keys["impression_id"][17])
    settings = dataclasses.replace(SMALL, keys=(f"impression_id={wanted}",), rows=5)
    explanation = explain(fresh, "valid", settings)
    assert [row.keys["impression_id"] for row in explanation.rows] == [wanted]
    assert set(explanation.rows[0].top) == {"ctr", "cvr", "rating", "reads"}


@pytest.mark.parametrize(
    ("split", "changes", "message"),
    [
        ("nope", {}, r"^--split must be one of \['train', 'valid', 'test'\], got 'nope'$"),
        ("valid", {"keys": ("impression_id",)}, r"^--key 'impression_id': expected COLUMN=VALUE"),
        ("valid", {"keys": ("colour=red",)}, r"^--key colour=red: 'colour' is not a key column of .*impression_id"),
        (
            "valid",
            {"keys": ("impression_id=-5",)},
            r"^--key impression_id=-5: no row of the valid split of .* matches$",
        ),
    ],
)
def test_bad_input_is_refused_naming_the_flag(fresh: TrainedRun, split: str, changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        explain(fresh, split, dataclasses.replace(SMALL, **changes))


def test_bad_settings_are_refused_naming_the_flag() -> None:
    with pytest.raises(InputError, match=r"^--steps must be >= 2, got 1$"):
        ExplainSettings(steps=1)
    with pytest.raises(InputError, match=r"^--ig-rows must be >= 1, got 0$"):
        ExplainSettings(attribution_rows=0)


def test_the_flags_default_to_the_settings_defaults() -> None:
    assert _explain_settings(build_parser().parse_args(["explain", "RUN"])) == ExplainSettings()


def test_explain_from_the_command_line_writes_json_plots_and_markdown(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--sample", "800", "--ig-rows", "100", "--steps", "4", "--repeats", "1", "--rows", "1", "--quiet"]
    assert main(["explain", str(run), "--split", "valid", *flags]) == 0
    printed = capsys.readouterr().out
    for title in ("tasks", "gates", "rows", "drivers"):
        assert f"\n{title}\n" in printed
    saved = json.loads((run / "explain_valid.json").read_text())
    assert saved["num_rows"] == 800
    assert saved["metrics"] == {
        "ctr": "ctr/auc",
        "cvr": "cvr/auc_clicked",
        "rating": "rating/rmse",
        "reads": "reads/poisson_deviance",
    }
    assert set(saved["importance"]["integrated_gradients"]["cvr"]) == set(saved["features"])
    assert saved["drivers"]["price"]["permutation"].keys() == {"ctr", "cvr", "rating", "reads"}
    markdown = (run / "explain_valid.md").read_text()
    assert markdown.startswith("## Explanations\n")
    for task in ("ctr", "cvr", "rating", "reads"):
        assert f"![{task}](explain_valid_{task}.png)" in markdown
        assert (run / f"explain_valid_{task}.png").read_bytes().startswith(b"\x89PNG")

    assert main(["explain", str(run.parent / "missing")]) == 2
    assert f"recsys-mtl explain: error: {run.parent / 'missing'}" in capsys.readouterr().err
    assert main(["explain", str(run), "--repeats", "0"]) == 2
    assert "recsys-mtl explain: error: --repeats must be >= 1, got 0" in capsys.readouterr().err


def test_evaluate_with_explain_adds_the_section_to_the_report(run: Path) -> None:
    evaluate_run(run, "valid", CPU, explain=SMALL)
    report = (run / "report_valid.md").read_text()
    assert "\n## Explanations\n" in report
    assert "![reads](explain_valid_reads.png)" in report
    assert json.loads((run / "explain_valid.json").read_text())["settings"] == dataclasses.asdict(SMALL) | {"keys": []}


@pytest.fixture(scope="module")
def learned(text_dataset: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Explanation:
    """A run trained for 2 epochs on the tiny world, explained on its train split (8,000 rows: 5x the test split's
    labelled rows, so that the permutation's metrics move less by chance)."""
    run = tmp_path_factory.mktemp("learned") / "run"
    train(tiny_config(text_dataset, tiny_bert, train={"epochs": 2, "batch_size": 256}), run, CPU, progress=False)
    settings = ExplainSettings(sample=8_000, attribution_rows=500, steps=8, repeats=2)
    return explain(load_run(run, CPU), "train", settings)


@pytest.mark.slow
def test_explanations_rank_the_generators_terms_where_it_put_them(learned: Explanation) -> None:
    """Every assertion holds for train.seed 0 to 7 (the margins in the comments are the smallest seen). Not asserted:
    price for cvr (the tiny world's ~900 clicks teach no model the user x price term: rank 11-20 of 21 under both
    methods) and length under the permutation (reads' deviance on ~2,000 rows moves more by chance than by it)."""
    ig, perm = "integrated_gradients", "permutation"
    user, item = learned.drivers["affinity, user side"], learned.drivers["affinity, item side"]
    for method in (ig, perm):
        for task in ("ctr", "cvr", "rating", "reads"):  # the affinity enters every label: each task's top feature
            assert min(user[method][task], item[method][task]) == 1
        assert max(user[method]["ctr"], item[method]["ctr"]) <= 3  # clicks: both sides of it near the top (3)
        # ratings: the item's quality (3 on the Intel Xeon; 4 under integrated gradients on an AMD EPYC with AVX2,
        # whose float sums differ: of 21 features, on the 126 rated rows)
        assert learned.drivers["quality"][method]["rating"] <= 4
    length, position = learned.drivers["length"][ig], learned.drivers["position"][ig]
    assert length["reads"] < min(length["ctr"], length["cvr"], length["rating"])  # length enters reads only (by 2)
    assert position["ctr"] < min(position["cvr"], position["rating"])  # position enters clicks, not cvr or rating (1)


@pytest.mark.slow
def test_the_two_methods_agree_on_what_matters_most(learned: Explanation) -> None:
    """For ctr, rating and reads (train.seed 0 to 7): integrated gradients' top feature is among the permutation's top
    3, and the rank correlation over all features is at least 0.45 (0.51 the least seen). cvr is judged on ~340 clicked
    rows, where its AUC moves by chance as much as by the lesser features: correlation 0.22 to 0.59."""
    for task in ("ctr", "rating", "reads"):
        assert learned.ranking("integrated_gradients", task)[0] in learned.ranking("permutation", task)[:3]
        assert learned.agreement[task] >= 0.45
    assert learned.agreement["cvr"] > 0
