"""Train one peer library's multi-task model on a recsys_mtl prepared dataset; time its training call; score test.

    .peers-venv/bin/python benchmarks/peers/run_peer.py --library deepctr|rechub --model mmoe|ple|esmm|shared_bottom \
        --data demo_out/dataset --out result.json [--epochs 1 --batch-size 2048 --embedding-dim 16 --num-experts 4 \
        --expert-dims 128,64 --tower-dims 32 --lr 0.005 --max-train-rows 0 --seed 0]

Runs in the peers' own venv (benchmarks/peers/setup.sh builds it) and never imports recsys_mtl: it reads the prepared
dataset's schema.toml and parquet shards itself. Tasks: ctr (`click`) and ctcvr (click * conversion, null -> 0); ESMM
uses the library's ESMM (pCTCVR = pCTR * pCVR). samples/s = train rows * epochs / seconds of the library's training
call (deepctr `model.fit`, torch-rechub `MTLTrainer.fit`); the conversion into the library's input format is timed
separately (prepare_seconds). Writes one JSON object to --out.
"""

import argparse
import json
import time
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score

LIBRARIES = ("deepctr", "rechub")
MODELS = ("mmoe", "ple", "esmm", "shared_bottom")


@dataclass
class Split:
    """One split as numpy arrays: ids [N], multi-hot ids [N, L] (0-padded), standardised dense [N], labels [N]."""

    ids: dict[str, np.ndarray] = field(default_factory=dict)
    multi_hot: dict[str, np.ndarray] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    click: np.ndarray | None = None
    conversion: np.ndarray | None = None  # null -> 0

    @property
    def ctcvr(self) -> np.ndarray:
        return self.click * self.conversion

    @property
    def num_rows(self) -> int:
        return len(self.click)

    def features(self) -> dict[str, np.ndarray]:
        """Every input column by feature name, in schema order within each kind."""
        return {**self.ids, **self.multi_hot, **self.dense}

    def take(self, rows: np.ndarray) -> "Split":
        """The rows `rows` of every column."""

        def pick(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {name: values[rows] for name, values in columns.items()}

        return Split(pick(self.ids), pick(self.multi_hot), pick(self.dense), self.click[rows], self.conversion[rows])


@dataclass
class Result:
    """What one library run produced: predictions [N] on test and the timings."""

    p_ctr: np.ndarray
    p_ctcvr: np.ndarray
    train_seconds: float
    loop_seconds: float
    num_params: int
    notes: list[str]


# ---------------------------------------------------------------- reading the prepared dataset


def read_schema(folder: Path) -> dict:
    """schema.toml of a prepared dataset, with `table_sizes` (table -> num_embeddings) added."""
    path = folder / "schema.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {folder} a recsys_mtl prepared dataset?")
    schema = tomllib.loads(path.read_text())
    schema["table_sizes"] = {t["name"]: t["num_embeddings"] for t in schema["tables"]}
    return schema


def label_column(schema: dict, task: str) -> str:
    """The shard column holding `task`'s label (ctr: click, cvr: conversion or purchase)."""
    for label in schema["labels"]:
        if label["task"] == task:
            return label["column"]
    raise KeyError(f"schema has no label for task {task!r}; labels: {[x['task'] for x in schema['labels']]}")


def _padded(column: pa.ChunkedArray, max_len: int | None) -> np.ndarray:
    """A List(Int64) column as [N, L] int64, right-padded with 0 (null lists are empty); L = the longest list."""
    lists = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy().astype(np.int64)  # [N]
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)  # [sum(lengths)]
    width = max(int(lengths.max(initial=0)), 1) if max_len is None else max_len
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(len(values)) - np.repeat(starts, lengths)
    keep = positions < width  # a test list longer than train's longest is cut
    padded = np.zeros((len(lengths), width), dtype=np.int64)  # [N, L]
    padded[rows[keep], positions[keep]] = values[keep]
    return padded


def _standardised(column: pa.ChunkedArray, feature: dict) -> np.ndarray:
    """A raw dense column as recsys_mtl's reader feeds it: log1p if asked, then (x - mean) / std; null -> 0."""
    raw = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan
    if feature.get("transform") == "log1p":
        raw = np.log1p(raw)
    mean, std = feature.get("mean", 0.0), feature.get("std", 1.0)  # the contract's defaults when absent
    return np.nan_to_num((raw - mean) / std, nan=0.0).astype(np.float32)


def read_split(folder: Path, schema: dict, split: str, multi_hot_len: dict[str, int] | None = None) -> Split:
    """Every feature and the ctr / cvr labels of `split` (its shards as listed in schema.toml)."""
    files = [folder / f for f in schema["splits"][split]["files"]]
    click_col, cvr_col = label_column(schema, "ctr"), label_column(schema, "cvr")
    columns = [f["name"] for f in schema["features"]] + [click_col, cvr_col]
    table = pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
    out = Split()
    for feature in schema["features"]:
        column = table[feature["name"]]
        if feature["kind"] == "id":
            out.ids[feature["name"]] = pc.fill_null(column, 0).to_numpy().astype(np.int64)
        elif feature["kind"] == "multi_hot":
            out.multi_hot[feature["name"]] = _padded(column, (multi_hot_len or {}).get(feature["name"]))
        else:
            out.dense[feature["name"]] = _standardised(column, feature)
    out.click = pc.fill_null(table[click_col], 0).to_numpy().astype(np.float32)
    out.conversion = pc.fill_null(table[cvr_col], 0).to_numpy().astype(np.float32)
    return out


def owners(schema: dict) -> dict[str, str]:
    """table -> the feature whose embedding the table's other features share (an id feature when there is one)."""
    owner: dict[str, str] = {}
    for feature in sorted(schema["features"], key=lambda f: f["kind"] != "id"):  # stable: id features first
        if feature["kind"] != "dense":
            owner.setdefault(feature["table"], feature["name"])
    return owner


# ---------------------------------------------------------------- deepctr-torch


def _import_deepctr() -> types.ModuleType:
    """deepctr_torch, without the version check it starts on import (a thread that queries the package registry)."""
    import requests

    real_get = requests.get
    requests.get = lambda *args, **kwargs: types.SimpleNamespace(status_code=0, text="")  # "not ok": nothing logged
    try:
        import deepctr_torch.models.multitask as multitask
    finally:
        requests.get = real_get
    return multitask


def _deepctr_columns(schema: dict, train: Split, dim: int) -> list:
    """SparseFeat per id feature, VarLenSparseFeat (mean over non-zero ids) per multi-hot, DenseFeat per dense.

    Features of one table share one nn.Embedding through `embedding_name` = the table.
    """
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    sizes = schema["table_sizes"]
    columns = []
    for feature in schema["features"]:
        name, kind = feature["name"], feature["kind"]
        if kind == "dense":
            columns.append(DenseFeat(name, 1))
            continue
        sparse = SparseFeat(name, sizes[feature["table"]], dim, embedding_name=feature["table"])
        if kind == "id":
            columns.append(sparse)
        else:
            columns.append(VarLenSparseFeat(sparse, maxlen=train.multi_hot[name].shape[1], combiner="mean"))
    return columns


def _fix_deepctr_ple(model: torch.nn.Module, args: argparse.Namespace, input_dim: int) -> None:
    """deepctr-torch 0.3.0's PLE builds `specific_expert_num` shared experts per level where it means
    `shared_expert_num` (forward then indexes past the list); rebuild them as the constructor intended."""
    from deepctr_torch.layers import DNN

    levels = [
        torch.nn.ModuleList(
            [
                torch.nn.ModuleList(
                    DNN(input_dim if level == 0 else args.expert_dims[-1], args.expert_dims, seed=args.seed)
                    for _ in range(args.num_experts)
                )
            ]
        )
        for level in range(model.num_levels)
    ]
    model.shared_experts = torch.nn.ModuleList(levels)


def build_deepctr(
    model_name: str, schema: dict, train: Split, args: argparse.Namespace
) -> tuple[torch.nn.Module, list]:
    """A deepctr-torch multitask model with the benchmark's shape; defaults otherwise. Returns (model, notes)."""
    multitask = _import_deepctr()
    columns = _deepctr_columns(schema, train, args.embedding_dim)
    common = {"task_types": ("binary", "binary"), "task_names": ("ctr", "ctcvr"), "device": "cpu", "seed": args.seed}
    experts, towers = tuple(args.expert_dims), tuple(args.tower_dims)
    notes = []
    if model_name == "mmoe":
        model = multitask.MMOE(
            columns,
            num_experts=args.num_experts,
            expert_dnn_hidden_units=experts,
            tower_dnn_hidden_units=towers,
            **common,
        )
        notes.append("MMOE gates: deepctr default gate_dnn_hidden_units=(64,) before the softmax layer")
    elif model_name == "ple":
        model = multitask.PLE(
            columns,
            shared_expert_num=args.num_experts,
            specific_expert_num=1,
            num_levels=2,
            expert_dnn_hidden_units=experts,
            tower_dnn_hidden_units=towers,
            **common,
        )
        _fix_deepctr_ple(model, args, model.input_dim)
        notes.append(
            "PLE: deepctr 0.3.0 builds specific_expert_num shared experts (IndexError when shared > specific); "
            f"its shared experts were rebuilt to {args.num_experts} per level before compile"
        )
    elif model_name == "shared_bottom":
        model = multitask.SharedBottom(
            columns, bottom_dnn_hidden_units=experts, tower_dnn_hidden_units=towers, **common
        )
    else:
        model = multitask.ESMM(columns, tower_dnn_hidden_units=experts + towers, **common)
        notes.append(f"ESMM: no shared bottom in deepctr's ESMM; each tower is {experts + towers} over the embeddings")
    model.compile(torch.optim.Adam(model.parameters(), lr=args.lr), loss=["binary_crossentropy"] * 2)
    if max(schema["table_sizes"].values()) > 2**24:
        notes.append("WARNING: a table exceeds 2^24 rows: deepctr feeds ids as float32, so large ids are rounded")
    notes.append(
        "deepctr defaults kept: BCE summed over the batch per task, l2_reg_embedding=1e-5 on whole tables, "
        "init_std=1e-4, dense nn.Embedding gradients (Adam updates every row each step)"
    )
    return model, notes


def run_deepctr(schema: dict, train: Split, test: Split, args: argparse.Namespace) -> Result:
    """Build, fit (timed) and predict test with deepctr-torch."""
    start = time.perf_counter()
    model, notes = build_deepctr(args.model, schema, train, args)
    x_train, y_train = train.features(), np.stack([train.click, train.ctcvr], axis=1)  # [N, 2]
    x_test = test.features()
    args.prepare_seconds += time.perf_counter() - start
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=2, shuffle=True)
    seconds = time.perf_counter() - start
    preds = model.predict(x_test, batch_size=max(args.batch_size, 8192))  # [N, 2]: p_ctr, p_ctcvr
    num_params = sum(p.numel() for p in model.parameters())
    notes.append("fit time includes deepctr's own np.concatenate of the inputs into one float tensor")
    return Result(preds[:, 0], preds[:, 1], seconds, seconds, num_params, notes)


# ---------------------------------------------------------------- torch-rechub


def _rechub_features(schema: dict, dim: int, with_dense: bool) -> list:
    """SparseFeature per id, SequenceFeature (mean, padding_idx 0) per multi-hot, DenseFeature per dense feature.

    Features of one table share the first id feature's embedding through `shared_with`.
    """
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature

    sizes, owner = schema["table_sizes"], owners(schema)
    out = []
    for feature in schema["features"]:
        name, kind = feature["name"], feature["kind"]
        if kind == "dense":
            if with_dense:
                out.append(DenseFeature(name))
            continue
        shared = owner[feature["table"]] if owner[feature["table"]] != name else None
        size = sizes[feature["table"]]
        if kind == "id":
            out.append(SparseFeature(name, size, embed_dim=dim, shared_with=shared))
        else:
            out.append(SequenceFeature(name, size, embed_dim=dim, pooling="mean", shared_with=shared, padding_idx=0))
    return out


def _split_user_item(features: list) -> tuple[list, list]:
    """rechub's ESMM concatenates user_features then item_features (the split has no effect on the model): the
    features before the first item-side one (name starting with item) are the user side."""
    first_item = next((i for i, f in enumerate(features) if f.name.startswith("item")), len(features) // 2)
    first_item = min(max(first_item, 1), len(features) - 1)
    return features[:first_item], features[first_item:]


def build_rechub(model_name: str, schema: dict, args: argparse.Namespace) -> tuple[torch.nn.Module, list]:
    """A torch-rechub multi-task model with the benchmark's shape; defaults otherwise. Returns (model, notes)."""
    from torch_rechub.models.multi_task import ESMM, MMOE, PLE, SharedBottom

    torch.manual_seed(args.seed)
    classification = ["classification", "classification"]
    experts = {"dims": list(args.expert_dims)}
    towers = [{"dims": list(args.tower_dims)} for _ in classification]
    notes = [
        "Adam weight_decay=1e-5 (MTLTrainer's default)",
        "rechub MLPs: Linear + BatchNorm1d + ReLU in every layer (its only MLP)",
    ]
    if model_name in ("mmoe", "ple"):
        notes.append("gates: Linear + BatchNorm1d + softmax (rechub's gate MLP)")
    if model_name == "esmm":
        features = _rechub_features(schema, args.embedding_dim, with_dense=False)
        user, item = _split_user_item(features)
        tower = {"dims": list(args.expert_dims) + list(args.tower_dims)}
        notes.append(
            "ESMM: rechub's ESMM embeds sparse features only, so the dense features are left out; no shared "
            f"bottom, each tower is {tower['dims']} over the embeddings"
        )
        return ESMM(user, item, cvr_params=tower, ctr_params=tower), notes
    features = _rechub_features(schema, args.embedding_dim, with_dense=True)
    if model_name == "mmoe":
        model = MMOE(features, classification, args.num_experts, experts, towers)
    elif model_name == "ple":
        model = PLE(features, classification, 2, 1, args.num_experts, experts, towers)
    else:
        model = SharedBottom(features, classification, experts, towers)
    return model, notes


def _rechub_inputs(split: Split, model_name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(x, y) as rechub's DataGenerator takes them; y [N, T]: ESMM [cvr, ctr, ctcvr], else [ctr, ctcvr]."""
    if model_name == "esmm":
        return split.features(), np.stack([split.conversion, split.click, split.ctcvr], axis=1)
    return split.features(), np.stack([split.click, split.ctcvr], axis=1)


def _validation_rows(valid: Split, limit: int, seed: int) -> Split:
    """A seeded sample of at most `limit` valid rows: MTLTrainer.fit needs a val_dataloader (it scores it per epoch)."""
    if valid.num_rows <= limit:
        return valid
    return valid.take(np.sort(np.random.default_rng(seed).choice(valid.num_rows, limit, replace=False)))


def run_rechub(schema: dict, train: Split, valid: Split, test: Split, args: argparse.Namespace, tmp: Path) -> Result:
    """Build, MTLTrainer.fit (timed) and predict test with torch-rechub."""
    from torch.utils.data import DataLoader
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator, PredictDataset

    start = time.perf_counter()
    model, notes = build_rechub(args.model, schema, args)
    x_train, y_train = _rechub_inputs(train, args.model)
    x_valid, y_valid = _rechub_inputs(_validation_rows(valid, 8192, args.seed), args.model)
    x_test, y_test = _rechub_inputs(test, args.model)
    train_dl, valid_dl, _ = DataGenerator(x_train, y_train).generate_dataloader(
        x_val=x_valid, y_val=y_valid, x_test=x_test, y_test=y_test, batch_size=args.batch_size
    )
    trainer = MTLTrainer(
        model,
        task_types=["classification"] * y_train.shape[1],
        optimizer_params={"lr": args.lr, "weight_decay": 1e-5},  # rechub's default weight_decay, our lr
        n_epoch=args.epochs,
        device="cpu",
        model_path=str(tmp),
    )
    args.prepare_seconds += time.perf_counter() - start
    loop = _time_calls(trainer, "train_one_epoch")
    start = time.perf_counter()
    trainer.fit(train_dl, valid_dl)
    seconds = time.perf_counter() - start
    test_dl = DataLoader(PredictDataset(x_test), batch_size=max(args.batch_size, 8192), shuffle=False)
    preds = np.asarray(trainer.predict(trainer.model, test_dl), dtype=np.float64)  # [N, T]
    num_params = sum(p.numel() for p in model.parameters())
    notes.append(
        "fit time includes what MTLTrainer.fit does besides the epochs: scoring a val_dataloader of <= 8,192 "
        "valid rows each epoch, a deepcopy of the best state_dict and torch.save of the model "
        f"(the epochs alone: {loop['seconds']:.1f} s)"
    )
    notes.append("data path: rechub's DataGenerator (map-style TorchDataset, per-row dict collation)")
    p_ctr, p_ctcvr = (preds[:, 1], preds[:, 2]) if args.model == "esmm" else (preds[:, 0], preds[:, 1])
    return Result(p_ctr, p_ctcvr, seconds, loop["seconds"], num_params, notes)


def _time_calls(obj: object, method: str) -> dict[str, float]:
    """Wrap obj.method so that the seconds spent in it add up in the returned dict (the trainer is not changed)."""
    spent = {"seconds": 0.0}
    inner = getattr(obj, method)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - start

    setattr(obj, method, timed)
    return spent


# ---------------------------------------------------------------- main


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's ROC AUC; nan when the labels hold one class only (tiny samples)."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", required=True, choices=LIBRARIES)
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--data", required=True, type=Path, help="a recsys_mtl prepared dataset folder")
    parser.add_argument("--out", required=True, type=Path, help="the result JSON")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--expert-dims", type=_dims, default=(128, 64))
    parser.add_argument("--tower-dims", type=_dims, default=(32,))
    parser.add_argument("--lr", type=float, default=0.005, help="Adam learning rate (recsys_mtl's dense lr)")
    parser.add_argument("--max-train-rows", type=int, default=0, help="a seeded sample of train rows; 0 = all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush float32 denormals to zero (deepctr's init_std=1e-4 PLE then runs ~40x slower on CPU)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.embedding_dim < 1 or not args.expert_dims:
        parser.error("--epochs, --batch-size, --embedding-dim must be >= 1 and --expert-dims non-empty")
    return args


def load_splits(args: argparse.Namespace, schema: dict) -> tuple[Split, Split, Split]:
    """train (sampled to --max-train-rows), valid and test, multi-hot padded to train's longest list."""
    train = read_split(args.data, schema, "train")
    if 0 < args.max_train_rows < train.num_rows:
        rows = np.random.default_rng(args.seed).choice(train.num_rows, args.max_train_rows, replace=False)
        train = train.take(np.sort(rows))
    widths = {name: values.shape[1] for name, values in train.multi_hot.items()}
    valid = read_split(args.data, schema, "valid", widths) if args.library == "rechub" else Split()
    return train, valid, read_split(args.data, schema, "test", widths)


def main(argv: list[str] | None = None) -> None:
    import tempfile

    args = parse_args(argv)
    torch.set_flush_denormal(not args.keep_denormals)
    schema = read_schema(args.data)
    start = time.perf_counter()
    train, valid, test = load_splits(args, schema)
    args.prepare_seconds = time.perf_counter() - start  # the library-specific conversion is added by run_*
    with tempfile.TemporaryDirectory() as tmp:
        if args.library == "deepctr":
            result = run_deepctr(schema, train, test, args)
        else:
            result = run_rechub(schema, train, valid, test, args, Path(tmp))
    notes = [f"optimizer: torch.optim.Adam lr={args.lr} on every parameter, embedding tables included", *result.notes]
    if not args.keep_denormals:
        notes.append("float32 denormals flushed to zero (torch.set_flush_denormal): same losses, no CPU slow path")
    if train.multi_hot:
        notes.append("multi-hot: 0-padded to train's longest list, mean over the non-zero ids")
    out = {
        "library": args.library,
        "model": args.model,
        "rows": train.num_rows,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "train_seconds": result.train_seconds,
        "samples_per_s": train.num_rows * args.epochs / result.train_seconds,
        "loop_seconds": result.loop_seconds,
        "prepare_seconds": args.prepare_seconds,
        "ctr/auc": auc(test.click, result.p_ctr),
        "cvr/ctcvr_auc": auc(test.ctcvr, result.p_ctcvr),
        "num_params": result.num_params,
        "test_rows": test.num_rows,
        "notes": notes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "notes"}))


if __name__ == "__main__":
    main()
