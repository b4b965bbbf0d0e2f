"""recsys_mtl against two peer libraries (deepctr-torch, torch-rechub): training samples/s, CTR AUC and CTCVR AUC of
MMoE, PLE, ESMM and shared-bottom on the same prepared datasets, with the same shapes.

    python benchmarks/bench_peers.py [--datasets default,big,ali] [--models mmoe,ple,esmm,shared_bottom]
        [--libraries deepctr,rechub] [--epochs 1] [--batch-size 2048] [--fp32] [--quick] [--out peers]

Datasets: `default` = the demo world (demo_out/dataset, `make demo` builds it); `big` = a world with >= 1M embedding
rows (demo_out/peers_big, synthesised and prepared here when missing); `ali` = the 200-row Ali-CCP sample (prepared
into demo_out/peers_ali; a functional check, its AUCs are noise). Ours trains in this process (recsys_mtl.train, CPU;
samples/s of the training loop from metrics.jsonl), each peer in the peers' venv (benchmarks/peers/setup.sh builds
.peers-venv; run_peer.py times the library's own fit call). ESMM is compared with our shared_bottom whose cvr task is
`after = "ctr"` (ESMM: pCTCVR = pCTR * pCVR on every row). Ours trains with the config's own settings (bf16 where the
chip has it, as `train.bf16 = "auto"` decides); `--fp32` adds our run in fp32, the peers' dtype, with its ratios.
`--quick` trains on about 50k rows only: a functional check, not numbers to quote. Writes
benchmarks/results/<out>.json and .md (with --quick: <out>_quick.*).
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import tomli_w
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, machine_line, print_table, write_results

from recsys_mtl.config import Config, TaskConfig, load_config
from recsys_mtl.data.loader import Dataset
from recsys_mtl.evaluate import evaluate_run
from recsys_mtl.model.ranker import MultiTaskRanker
from recsys_mtl.train import train

REPO = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
PEERS_PYTHON = REPO / ".peers-venv" / "bin" / "python"
CLI = [sys.executable, "-m", "recsys_mtl"]
DATASETS = {
    "default": REPO / "demo_out" / "dataset",
    "big": REPO / "demo_out" / "peers_big" / "dataset",
    "ali": REPO / "demo_out" / "peers_ali",
}
ALI_RAW = REPO.parent / "shared" / "data" / "ali-ccp-sample"
# 1.5M users leave 651k of them in the train days (heavy users take most impressions): 817k table rows in all; 4M
# users give ~960k users in train, ~1.13M rows in all, for the same 2M impressions (the same training work)
BIG_WORLD = {"impressions": 2_000_000, "users": 4_000_000, "items": 200_000, "ads": 20_000}
BIG_MIN_ROWS = 1_000_000
OUR_ARCH = {"mmoe": "mmoe", "ple": "ple", "shared_bottom": "shared_bottom", "esmm": "shared_bottom"}
SHAPE = {"embedding_dim": 16, "num_experts": 4, "expert_dims": (128, 64), "tower_dims": (32,)}
METRICS = ("ctr/auc", "cvr/ctcvr_auc")
CPU = torch.device("cpu")


# ---------------------------------------------------------------- datasets


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def big_description() -> dict:
    """The shipped synthetic description with min_count = 1 for the user / item / ad tables (every id of train gets a
    row) and 16-wide user / item tables (the peers' --embedding-dim)."""
    description = tomllib.loads((REPO / "data_prep" / "descriptions" / "synthetic.toml").read_text())
    for table in ("user", "item", "ad"):
        description.setdefault("tables", {}).setdefault(table, {})["min_count"] = 1
        description["tables"][table]["embedding_dim"] = SHAPE["embedding_dim"]
    description["name"] = "synthetic_big"
    return description


def table_sizes(dataset: Path) -> dict[str, int]:
    """table -> num_embeddings from a prepared dataset's schema.toml."""
    schema = tomllib.loads((dataset / "schema.toml").read_text())
    return {t["name"]: t["num_embeddings"] for t in schema["tables"]}


def _read_toml(path: Path) -> dict:
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def ensure_big(dataset: Path) -> None:
    """Synthesise and prepare the large-table world unless it is there with the same parameters and description;
    refuse it if its tables hold fewer than 1M rows in all."""
    root, raw = dataset.parent, dataset.parent / "raw"
    world = _read_toml(raw / "world.toml")
    fresh = all(world.get(key) == value for key, value in BIG_WORLD.items())
    if not fresh:
        print(f"synthesising the big world into {raw} ...", flush=True)
        options = [a for key, value in BIG_WORLD.items() for a in (f"--{key}", str(value))]
        _run([*CLI, "synth", "--out", str(raw), *options, "--quiet", "--overwrite"])
    description, path = big_description(), root / "synthetic_big.toml"
    if not fresh or not (dataset / "schema.toml").is_file() or _read_toml(path) != description:
        header = "# written by benchmarks/bench_peers.py from data_prep/descriptions/synthetic.toml\n"
        path.write_text(header + tomli_w.dumps(description))
        print(f"preparing {dataset} with {path} ...", flush=True)
        _run([*CLI, "prepare", str(raw), "--out", str(dataset), "--description", str(path), "--overwrite"])
    sizes = table_sizes(dataset)
    print(f"big world tables ({sum(sizes.values()):,} rows in all): {sizes}", flush=True)
    if sum(sizes.values()) < BIG_MIN_ROWS:
        raise ValueError(f"{dataset}: {sum(sizes.values()):,} embedding rows in all, expected >= {BIG_MIN_ROWS:,}")


def ensure_dataset(name: str, ali_raw: Path) -> Path:
    """The prepared dataset `name`, built first where this script knows how."""
    dataset = DATASETS[name]
    if name == "big":
        ensure_big(dataset)
    elif name == "ali" and not (dataset / "schema.toml").is_file():
        _run([*CLI, "prepare", str(ali_raw), "--out", str(dataset), "--description", "ali_ccp", "--overwrite"])
    if not (dataset / "schema.toml").is_file():
        raise FileNotFoundError(f"{dataset} is not a prepared dataset: run `make demo` first")
    return dataset


# ---------------------------------------------------------------- ours


def our_config(base: Config, dataset: Path, arch: str, args: argparse.Namespace, max_steps: int) -> Config:
    """The demo config reshaped like the peers: ctr + cvr after ctr (ESMM), no text, no cross layers, no id dropout."""
    model = dataclasses.replace(
        base.model,
        arch=arch,
        text_dim=0,
        cross_layers=0,
        input_norm="batch",  # without cross layers and text, a batch norm on the features helps (README)
        num_experts=SHAPE["num_experts"],
        expert_dims=SHAPE["expert_dims"],
        tower_dims=SHAPE["tower_dims"],
    )
    steps = math.ceil(Dataset(dataset).num_rows("train") / args.batch_size) * args.epochs
    steps = min(steps, max_steps or steps)
    train_cfg = dataclasses.replace(
        base.train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        max_steps=max_steps,
        id_dropout=0.0,
        early_stop_metric="",
        log_every=max(1, steps // 8),
    )
    tasks = (TaskConfig("ctr"), TaskConfig("cvr", after="ctr"))
    return dataclasses.replace(base, dataset=str(dataset), tasks=tasks, model=model, train=train_cfg, run_dir="")


def our_variants(base: Config, dataset: Path, arch: str, args: argparse.Namespace, max_steps: int) -> dict:
    """Our runs of `arch`: "default" (the config's own settings: bf16 where the chip has it), and with --fp32 "fp32"
    (train.bf16 = false, as the peers train)."""
    cfg = our_config(base, dataset, arch, args, max_steps)
    fp32 = {"fp32": dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bf16=False))} if args.fp32 else {}
    return {"default": cfg, **fp32}


def count_params(cfg: Config) -> int:
    """Parameters of our model for `cfg` (embedding tables included), built on the meta device."""
    model = MultiTaskRanker(cfg, Dataset(cfg.dataset).schema, {})
    return sum(p.numel() for p in model.parameters())


def run_ours(cfg: Config, run: Path) -> dict:
    """Train `cfg` into `run`, evaluate it on test: samples/s (training loop, last log record), AUCs, parameters."""
    result = train(cfg, run, CPU, progress=False)
    dataset = Dataset(cfg.dataset)
    rows = min(result.steps * cfg.train.batch_size, dataset.num_rows("train") * cfg.train.epochs)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    # the loop counts batch_size rows a step: a short last batch (a dataset smaller than a batch) is counted as rows
    logged = last["step"] * cfg.train.batch_size
    rate = last["samples_per_s"] * min(logged, dataset.num_rows("train") * cfg.train.epochs) / logged
    metrics = evaluate_run(run, "test", CPU)
    return {
        "library": "recsys_mtl",
        "model": cfg.model.arch,
        "rows": rows,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "samples_per_s": rate,
        **{k: metrics.get(k, float("nan")) for k in METRICS},
        "num_params": count_params(cfg),
        "notes": our_notes(cfg, dataset),
    }


def our_notes(cfg: Config, dataset: Dataset) -> list[str]:
    """How our side is set up, for the record."""
    dims = sorted({t.embedding_dim for t in dataset.schema.tables})
    return [
        "tasks ctr + cvr after ctr (ESMM: pCTCVR = pCTR * pCVR trained on every row)",
        f"embedding dims from the dataset's schema: {dims}; tables shared as the schema says",
        f"embeddings: fused Adagrad lr {cfg.optim.embedding_lr} ("
        + (
            f"per element: each row also holds the tasks' own {cfg.model.task_embedding_dim}-wide embeddings"
            if cfg.model.task_embedding_dim
            else "row-wise"
        )
        + f"); dense: {cfg.optim.dense} lr {cfg.optim.lr}"
        f" decayed {cfg.optim.decay}; loss {cfg.loss.reduction}-level, {cfg.loss.weighting} weighting",
        f"dense features through an MLP {list(cfg.model.dense_dims)}; gates: "
        + ("none (one expert)" if cfg.model.arch == "shared_bottom" else "one softmax layer per task"),
        f"input_norm = {cfg.model.input_norm!r} on the concatenated features (no cross layers, no text here)",
        "samples/s: training loop incl. reading parquet batches (metrics.jsonl), validation and checkpoints excluded"
        + (" (but those between epochs are inside the cumulative rate)" if cfg.train.epochs > 1 else ""),
    ]


# ---------------------------------------------------------------- peers


def run_peer(library: str, model: str, dataset: Path, args: argparse.Namespace, rows: int, out: Path) -> dict:
    """run_peer.py in the peers' venv; its JSON, or a row of nans whose notes hold the error."""
    command = [str(PEERS_PYTHON), str(PEERS / "run_peer.py"), "--library", library, "--model", model]
    command += ["--data", str(dataset), "--out", str(out), "--epochs", str(args.epochs)]
    command += ["--batch-size", str(args.batch_size), "--embedding-dim", str(SHAPE["embedding_dim"])]
    command += ["--num-experts", str(SHAPE["num_experts"]), "--expert-dims", ",".join(map(str, SHAPE["expert_dims"]))]
    command += ["--tower-dims", ",".join(map(str, SHAPE["tower_dims"]))]
    command += ["--max-train-rows", str(rows)] if rows else []
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode == 0:
        return json.loads(out.read_text())
    error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    print(f"  {library} {model} FAILED: {error}", flush=True)
    nan = float("nan")
    return {"library": library, "model": model, "samples_per_s": nan, "ctr/auc": nan, "cvr/ctcvr_auc": nan,
            "notes": [f"failed: {done.stderr[-2000:]}"]}  # fmt: skip


# ---------------------------------------------------------------- the table


def table_row(dataset: str, system: str, model: str, record: dict, ours: dict, ours_fp32: dict | None) -> dict:
    """One line of the table; `ours / peer` is our samples/s over this system's ('-' on our own lines), and with
    `ours_fp32`, `ours fp32 / peer` the same for our run in fp32."""
    ratio = "-" if record["library"] == "recsys_mtl" else ours["samples_per_s"] / record["samples_per_s"]
    row = {"dataset": dataset, "system": system, "model": model, "samples/s": record["samples_per_s"]}
    row["ours / peer"] = ratio
    if ours_fp32 is not None:
        row["ours fp32 / peer"] = "-" if ratio == "-" else ours_fp32["samples_per_s"] / record["samples_per_s"]
    return {**row, **{k: record[k] for k in METRICS}}


def bench_dataset(name: str, dataset: Path, args: argparse.Namespace, base: Config, tmp: Path) -> tuple[list, list]:
    """Ours and every peer on one dataset: (table rows, full records)."""
    steps = max(1, args.quick_rows // args.batch_size) if args.quick else 0
    rows, records, ours_by_arch = [], [], {}
    for model in args.models:
        arch = OUR_ARCH[model]
        label = f"{arch} (cvr after ctr)" if model != "esmm" else "shared_bottom + ESMM cvr"
        if arch not in ours_by_arch:
            for variant, cfg in our_variants(base, dataset, arch, args, steps).items():
                print(f"[{name}] recsys_mtl {arch} {variant} ...", flush=True)
                record = run_ours(cfg, tmp / f"{name}_{arch}_{variant}")
                ours_by_arch.setdefault(arch, {})[variant] = record
                records.append({"dataset": name, "variant": variant, **record})
        ours, ours_fp32 = ours_by_arch[arch]["default"], ours_by_arch[arch].get("fp32")
        rows.append(table_row(name, "recsys_mtl", label, ours, ours, ours_fp32))
        if ours_fp32 is not None:
            rows.append(table_row(name, "recsys_mtl", f"{label}, fp32", ours_fp32, ours, ours_fp32))
        for library in args.libraries:
            print(f"[{name}] {library} {model} ...", flush=True)
            out = tmp / f"{name}_{library}_{model}.json"
            peer = run_peer(library, model, dataset, args, steps * args.batch_size, out)
            records.append({"dataset": name, **peer})
            rows.append(table_row(name, library, model, peer, ours, ours_fp32))
            print(f"  {rows[-1]}", flush=True)
    return rows, records


def caveats(args: argparse.Namespace) -> list[str]:
    """Lines printed above the table: what the numbers are (not) worth."""
    lines = []
    if args.quick:
        lines.append(f"--quick: about {args.quick_rows:,} train rows per run: a functional check, NOT final numbers")
    if "ali" in args.datasets:
        lines.append("ali: the 200-row Ali-CCP sample (100 train, 50 test rows): a functional check, AUCs are noise")
    return lines


def write_markdown(path: Path, rows: list[dict], records: list[dict], title: str, preamble: list[str]) -> None:
    """`path` (markdown): the preamble (command, caveats) as a list, the table and every system's setup notes."""
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_table(rows, title)
    notes = {}
    for record in records:
        key = f"{record['library']} {record['model']}"
        notes.setdefault(key, record.get("notes", []))
    text = ["# Peer benchmark\n", *(f"- {line}" for line in preamble), table.getvalue()]
    text.append("## Setup notes\n")
    text += [f"- **{key}**: " + "; ".join(n.replace("\n", " ")[:500] for n in value) for key, value in notes.items()]
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(text) + "\n")
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    parser.add_argument("--datasets", default="default,big,ali")
    parser.add_argument("--models", default="mmoe,ple,esmm,shared_bottom")
    parser.add_argument("--libraries", default="deepctr,rechub")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--out", default="peers", help="results name under benchmarks/results/")
    parser.add_argument("--fp32", action="store_true", help="also train ours in fp32 (train.bf16 = false)")
    parser.add_argument("--quick", action="store_true", help="train on about --quick-rows rows only")
    parser.add_argument("--quick-rows", type=int, default=50_000)
    parser.add_argument("--ali-raw", type=Path, default=ALI_RAW, help="the Ali-CCP sample folder")
    args = parser.parse_args()
    for key, allowed in (("datasets", DATASETS), ("models", OUR_ARCH), ("libraries", ("deepctr", "rechub"))):
        values = [v.strip() for v in getattr(args, key).split(",") if v.strip()]
        unknown = sorted(set(values) - set(allowed))
        if unknown or not values:
            parser.error(f"--{key}: unknown {unknown}, expected a comma-separated subset of {sorted(allowed)}")
        setattr(args, key, values)
    if args.epochs < 1 or args.batch_size < 1 or args.quick_rows < 1:
        parser.error("--epochs, --batch-size and --quick-rows must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    subprocess.run(["bash", str(PEERS / "setup.sh")], check=True)  # a no-op when the peers' venv is up to date
    base = load_config(args.config)
    datasets = {name: ensure_dataset(name, args.ali_raw) for name in args.datasets}
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dataset in datasets.items():
            more_rows, more_records = bench_dataset(name, dataset, args, base, Path(tmp))
            rows, records = rows + more_rows, records + more_records
    lines = caveats(args)
    title = f"recsys_mtl vs peers, {args.epochs} epoch(s), batch {args.batch_size}, CPU"
    print("\n" + "\n".join(lines))
    print_table(rows, title)
    command = "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:])
    name = f"{args.out}_quick" if args.quick else args.out  # a functional check never overwrites the real results
    write_results(name, rows, command=command, caveats=lines, details=records)
    write_markdown(RESULTS / f"{name}.md", rows, records, title, [f"`{command}`", machine_line(machine()), *lines])


if __name__ == "__main__":
    main()
