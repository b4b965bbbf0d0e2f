"""`recsys-mtl`: one console script, one subcommand per stage of the pipeline. Parses, then calls library functions."""

import argparse
import dataclasses
import gc
import logging
import os
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

# packages that add subcommands register `add_commands(subparsers)` under this entry-point group (data_prep does)
COMMANDS_GROUP = "recsys_mtl.commands"
# third-party deprecation notices that say nothing about the user's run (shown with --verbose)
KNOWN_WARNINGS = (
    ".*HeuristicalStorageReservation.*",
    ".*broadcast_buffers.*",
    ".*torch.distributed is disabled.*",
    ".*This API is deprecated.*",
    ".*Please use DTensor instead.*",
    ".*torch.jit.*deprecated.*",
    ".*Failed to import.*",
    ".*is now DEPRECATED.*",
)


def _encode_text(args: argparse.Namespace) -> None:
    import torch

    from recsys_mtl.config import TextConfig, load_config
    from recsys_mtl.text import encode_dataset, text_dtype

    cfg = load_config(args.config).text if args.config else TextConfig()
    flags = {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length, "dtype": args.dtype}
    cfg = dataclasses.replace(cfg, **{key: value for key, value in flags.items() if value is not None})
    device = torch.device(args.device)
    encoded = encode_dataset(args.dataset, cfg, device, progress=not args.quiet)
    done = ", ".join(f"{name}: {n:,} new" for name, n in encoded.items()) or "no text features"
    dtype = text_dtype(cfg, device) + (" (auto)" if cfg.dtype == "auto" else "")
    print(f"encoded texts of {args.dataset} with {cfg.model} ({dtype}, {cfg.max_length} tokens): {done}")


def _device(name: str):
    """The torch device; under torchrun, "cuda" means this rank's own GPU (LOCAL_RANK)."""
    import torch

    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def _train(args: argparse.Namespace) -> None:
    import dataclasses

    from recsys_mtl.config import load_config
    from recsys_mtl.distributed import process_group
    from recsys_mtl.errors import InputError
    from recsys_mtl.metrics import format_metric, is_task_metric
    from recsys_mtl.train import train

    cfg = load_config(args.config, args.set)
    run_dir = args.out or (Path(cfg.run_dir) if cfg.run_dir else None)
    if run_dir is None:
        raise InputError("give --out RUN_DIR or run_dir in the config")
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if args.init_from is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(args.init_from.resolve())))
    device = _device(args.device)
    with process_group(device):
        result = train(cfg, run_dir, device, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    best = ", ".join(f"{k} {format_metric(v)}" for k, v in result.best.items() if is_task_metric(k))
    print(f"trained {result.steps} steps into {run_dir}" + (" (stopped early)" if result.stopped_early else ""))
    print(f"best validation: {best}")


def _evaluate(args: argparse.Namespace) -> None:
    from recsys_mtl.distributed import process_group
    from recsys_mtl.evaluate import evaluate_run
    from recsys_mtl.metrics import MixtureHealth, format_metric, has_oracle, is_task_metric

    explain = None
    if args.explain:  # Captum imported only where asked for
        from recsys_mtl.explain import ExplainSettings

        explain = ExplainSettings()
    device = _device(args.device)
    with process_group(device):
        metrics = evaluate_run(args.run_dir, args.split, device, tuple(args.baselines), explain)
    print(f"{'metric':<28}{'model':>10}" + (f"{'oracle':>10}{'ratio':>8}" if has_oracle(metrics) else ""))
    for name, value in metrics.items():
        if is_task_metric(name):
            oracle, ratio = metrics.get(f"oracle/{name}"), metrics.get(f"ratio/{name}")
            extra = f"{format_metric(oracle):>10}{format_metric(ratio, 3):>8}" if oracle is not None else ""
            print(f"{name:<28}{format_metric(value):>10}{extra}")
    health = MixtureHealth.from_metrics(metrics)
    if health is not None:
        print(f"\n{'gates':<10}{'entropy':>8}{'max':>7}  load per expert")
        for task, loads in health.loads.items():
            entropy, top = format_metric(health.entropy[task], 3), format_metric(health.max_entropy(task), 3)
            print(f"{task:<10}{entropy:>8}{top:>7}  " + " ".join(f"{e} {w:.2f}" for e, w in loads.items()))
        print(f"dead experts: {health.dead_share:.0%}" + (f" ({', '.join(health.dead())})" if health.dead() else ""))
    print(f"wrote {args.run_dir / f'metrics_{args.split}.json'} and {args.run_dir / f'report_{args.split}.md'}")
    if args.explain:
        print(f"explained in {args.run_dir / f'explain_{args.split}.json'} and the report's Explanations section")


def _explain_settings(args: argparse.Namespace):
    """The ExplainSettings of `explain`'s flags (a test holds the flags' defaults to the dataclass's)."""
    from recsys_mtl.explain import ExplainSettings

    return ExplainSettings(
        sample=args.sample,
        attribution_rows=args.ig_rows,
        steps=args.steps,
        repeats=args.repeats,
        rows=args.rows,
        keys=tuple(args.key),
        top=args.top,
        seed=args.seed,
    )


def _explain(args: argparse.Namespace) -> None:
    from recsys_mtl.errors import InputError
    from recsys_mtl.explain import explain_run, format_tables

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("explain runs in one process: start it without torchrun")
    settings = _explain_settings(args)
    explanation = explain_run(args.run_dir, args.split, _device(args.device), settings, progress=not args.quiet)
    for title, table in format_tables(explanation).items():
        print(f"\n{title}\n{table}")
    checks = [f"{t} {e:.3f} / {explanation.agreement[t]:.2f}" for t, e in explanation.completeness.items()]
    print("\nintegrated gradients' completeness error / rank correlation with the permutation: " + ", ".join(checks))
    out = args.run_dir / f"explain_{args.split}"
    print(f"\nwrote {out}.json, {out}.md and {out}_<task>.png")


def _score(args: argparse.Namespace) -> None:
    from recsys_mtl.distributed import process_group
    from recsys_mtl.score import score

    device = _device(args.device)
    with process_group(device):
        summary = score(
            args.run_dir,
            args.input,
            args.out,
            device,
            split=args.split,
            side_dir=args.side_dir,
            int8=args.int8,
            batch_size=args.batch_size,
            rows_per_shard=args.rows_per_shard,
            missing_text=args.missing_text,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(
        f"scored {summary.rows:,} rows in {summary.seconds:.1f} s ({summary.rows_per_second:,.0f} rows/s) into "
        f"{args.out}: {len(summary.shards_written)} shard(s) written, {summary.shards_skipped} already there; "
        f"peak memory {summary.peak_memory_mb:,.0f} MB"
    )
    total = summary.rows or 1
    unknown = [f"{name} {count / total:.1%}" for name, count in summary.unknown_ids.items() if count]
    if unknown:
        print("rows on id row 0 (unseen in training, or absent): " + ", ".join(unknown))
    missing = [f"{name} {count:,}" for name, count in summary.missing_text.items() if count]
    if missing:
        print("rows whose key has no text vector (scored with the empty text): " + ", ".join(missing))
    non_finite = [f"{name} {count:,}" for name, count in summary.non_finite.items() if count]
    if non_finite:
        print("rows with an inf / NaN dense value (scored as if it were missing): " + ", ".join(non_finite))


def _tune(args: argparse.Namespace) -> None:
    import optuna

    from recsys_mtl.distributed import process_group
    from recsys_mtl.errors import InputError
    from recsys_mtl.tune import tune

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("tune runs its trials in one process: start it without torchrun (machines share --storage)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune itself logs one line per trial
    if not args.verbose:  # not every trial's sharding plan and validations
        logging.getLogger("recsys_mtl.train").setLevel(logging.WARNING)
    device = _device(args.device)
    with process_group(device):
        result = tune(
            args.config, args.space, args.out, args.trials, device, tuple(args.set), args.storage, args.study_name
        )
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    print(f"study {result.study_name!r} in {result.storage}: {counts}; objective {result.objective}")
    if result.best is None:
        print(f"no trial completed, so no best.toml; see {args.out / 'trials.csv'}")
        return
    print(f"best trial {result.best.number}: {result.best.value:.5g} with {result.best.params}")
    print(f"wrote {args.out / 'best.toml'}, {args.out / 'trials.csv'} and {args.out / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    from recsys_mtl.config import TextConfig

    parser = argparse.ArgumentParser(
        prog="recsys-mtl",
        description="Multi-task ranking for e-commerce: synthetic data, preparation, training, scoring.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for plugin in entry_points(group=COMMANDS_GROUP):  # data_prep's synth and prepare, which build on this package
        plugin.load()(sub)

    text_defaults = TextConfig()
    enc = sub.add_parser(
        "encode-text",
        help="encode every distinct text of a prepared dataset once with a local BERT",
        description="Write DATASET/text_emb/<name>.parquet: one mean-pooled vector per text, keyed by id, with the "
        "model and a hash of the text. Texts already encoded by the same model are skipped.",
    )
    enc.add_argument("dataset", type=Path, help="prepared dataset folder")
    enc.add_argument("--config", type=Path, help="take the text settings of this training config (flags override)")
    enc.add_argument("--model", help=f"packaged all-MiniLM-L6-v2 or a local folder ({text_defaults.model})")
    enc.add_argument("--batch-size", type=int, help=f"texts per batch ({text_defaults.batch_size})")
    enc.add_argument("--max-length", type=int, help=f"tokens a text is cut to ({text_defaults.max_length})")
    enc.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        help=f"auto: bfloat16 where the chip has native bf16 ({text_defaults.dtype})",
    )
    enc.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(func=_encode_text)

    tr = sub.add_parser(
        "train",
        help="train a multi-task model (validation, early stopping, checkpoints, JSONL + TensorBoard metrics)",
        description="Train the model a TOML config describes. The resolved config is saved in the run dir; "
        "--resume continues a killed run from its last checkpoint; --init-from starts from another run (the next day).",
    )
    tr.add_argument("--config", type=Path, required=True, help="TOML config (see configs/)")
    tr.add_argument("--out", type=Path, help="run dir (default: run_dir of the config)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR/checkpoints/last under the run's config (only how long and how often may change)",
    )
    tr.add_argument(
        "--init-from",
        type=Path,
        metavar="RUN_DIR",
        help="start from a trained run's model and optimizer state (its best checkpoint, else its last), on its "
        "dataset or on one prepared from it with prepare --from (tables grow); recorded as train.init_from",
    )
    tr.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)

    ev = sub.add_parser(
        "evaluate",
        help="metrics of a trained run on a split, and its report",
        description="Write RUN_DIR/metrics_SPLIT.json (<task>/<metric>, oracle/<task>/<metric> where the data has an "
        "oracle) and RUN_DIR/report_SPLIT.md with its plots.",
    )
    ev.add_argument("run_dir", type=Path, help="a run dir written by train")
    ev.add_argument("--split", default="test", choices=["train", "valid", "test"], help="(%(default)s)")
    ev.add_argument("--baselines", type=Path, nargs="*", default=[], help="evaluated runs to compare with")
    ev.add_argument(
        "--explain",
        action="store_true",
        help="also explain the model (recsys-mtl explain with its defaults): explain_SPLIT.json, its plots and a "
        "section of the report",
    )
    ev.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    ev.set_defaults(func=_evaluate)

    ex = sub.add_parser(
        "explain",
        help="which input features each task and each task's gate rely on (integrated gradients, permutation)",
        description="On rows of a split drawn at random, each task on the rows it is judged on: each input feature's "
        "importance for each task (Captum's integrated gradients of the task's logit, checked by the exact permutation "
        "importance on its headline metric) and for each task's gate; the top features of single rows. Writes "
        "RUN_DIR/explain_SPLIT.json, explain_SPLIT.md and one PNG per task; prints the tables.",
    )
    ex.add_argument("run_dir", type=Path, help="a run dir written by train")
    ex.add_argument("--split", default="test", choices=["train", "valid", "test"], help="(%(default)s)")
    ex.add_argument("--sample", type=int, default=20_000, help="rows drawn from the split; 0: all (%(default)s)")
    ex.add_argument("--ig-rows", type=int, default=2_000, help="rows per task for integrated gradients (%(default)s)")
    ex.add_argument("--steps", type=int, default=16, help="integrated gradients' steps (%(default)s)")
    ex.add_argument("--repeats", type=int, default=2, help="shuffles per feature and task (%(default)s)")
    ex.add_argument("--rows", type=int, default=3, help="rows explained one by one (%(default)s)")
    ex.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="explain the rows whose key column has this value (e.g. impression_id=42), not the sample's first",
    )
    ex.add_argument("--top", type=int, default=5, help="features shown per task and row (%(default)s)")
    ex.add_argument("--seed", type=int, default=0, help="of the sample and the shuffles (%(default)s)")
    ex.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    ex.set_defaults(func=_explain)

    sc = sub.add_parser(
        "score",
        help="batch-score a prepared split or raw rows (parquet or csv) into parquet shards of predictions",
        description="Write OUT/part-*.parquet: the key columns, pred_<task> and pred_cvr_joint (pCTCVR), one row per "
        "input row in input order. Raw rows are encoded with the run's vocabularies (unseen ids -> the unknown row); "
        "missing side-table columns are joined from --side-dir. Under torchrun each rank scores its own shards; a "
        "rerun skips the shards already written.",
    )
    sc.add_argument("run_dir", type=Path, help="a run dir written by train")
    sc.add_argument(
        "input",
        type=Path,
        help="a prepared dataset folder, or raw rows (parquet, or text files as the dataset's description reads "
        "them): a file, a folder or a glob",
    )
    sc.add_argument("--out", type=Path, required=True, help="output folder of parquet shards")
    sc.add_argument("--split", default="test", choices=["train", "valid", "test"], help="of a prepared input")
    sc.add_argument("--side-dir", type=Path, help="side tables for raw rows (default: the dataset's raw folder)")
    sc.add_argument("--int8", action="store_true", help="int8-quantized embedding tables (torchrec quantized EBC)")
    sc.add_argument("--batch-size", type=int, default=8192, help="(%(default)s)")
    sc.add_argument("--rows-per-shard", type=int, default=1 << 20, help="rows per output shard, about (%(default)s)")
    sc.add_argument(
        "--missing-text",
        default="empty",
        choices=["empty", "error"],
        help="rows whose item has no text vector: score with the empty text, or refuse (%(default)s)",
    )
    sc.add_argument("--overwrite", action="store_true", help="replace scores of another input or model in --out")
    sc.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    sc.add_argument("--quiet", action="store_true", help="no progress bar")
    sc.set_defaults(func=_score)

    tu = sub.add_parser(
        "tune",
        help="hyperparameter search (Optuna): trials of a config over a search space, best config and report",
        description="Search a space of config keys (SPACE.toml: one table per key and a [study] table) with Optuna; "
        "every trial trains in this process into TUNE_DIR/trials/NNNN, poor ones are pruned at a validation. The "
        "study lives in TUNE_DIR/study.db (or --storage): a rerun resumes it, machines on one --storage share it. "
        "Writes TUNE_DIR/best.toml (for train --config), trials.csv and report.md with plots.",
    )
    tu.add_argument("--config", type=Path, required=True, help="the TOML config trials start from")
    tu.add_argument("--space", type=Path, required=True, help="search space TOML (see configs/demo_space.toml)")
    tu.add_argument("--trials", type=int, required=True, help="trials the study should hold done, in all")
    tu.add_argument("--out", type=Path, required=True, metavar="TUNE_DIR", help="trials, best.toml, report")
    tu.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all trials")
    tu.add_argument("--storage", help="SQLAlchemy URL of the study's database (default: sqlite in TUNE_DIR)")
    tu.add_argument("--study-name", default="tune", help="(%(default)s)")
    tu.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    tu.set_defaults(func=_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # a torch-internal notice on every run
    for name in ("recsys_mtl", "data_prep"):  # ours at INFO; torchrec / fbgemm chatter only from WARNING up
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.verbose:
        for pattern in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    from recsys_mtl.errors import InputError

    try:
        args.func(args)
    except InputError as err:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"recsys-mtl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def console() -> int:
    """The console script (and `python -m recsys_mtl`): `main` in a process of its own.

    torch, torchrec and their imports leave ~400k objects that live until the process ends; the garbage collector's
    full passes went over them 6 times during the imports and again at exit (1-1.5 s of an evaluate). Here full passes
    run 100x less often, and what is alive when the command ends stays out of the exit's passes.
    """
    gc.set_threshold(*gc.get_threshold()[:2], 1000)
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(console())
