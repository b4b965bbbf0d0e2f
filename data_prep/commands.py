"""The `recsys-mtl synth` and `recsys-mtl prepare` subcommands. data_prep builds on recsys_mtl, never the reverse,
so it registers them with the console script through the `recsys_mtl.commands` entry point (pyproject.toml)."""

import argparse
from pathlib import Path

from data_prep.description import load_description
from data_prep.prepare import prepare
from data_prep.synth import WorldConfig, generate_world


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add synth and prepare to the console script's subcommands."""
    defaults = WorldConfig()
    synth = sub.add_parser(
        "synth",
        help="generate a synthetic e-commerce world with a known ground truth",
        description="Write raw parquet tables (users, items, ads, impressions/) and the oracle/ table of true "
        "probabilities for every impression. The same seed gives the same bytes.",
    )
    synth.add_argument("--out", type=Path, required=True, help="output folder for the raw tables")
    synth.add_argument(
        "--impressions", type=int, default=defaults.impressions, help="impressions in the log (%(default)s)"
    )
    synth.add_argument("--users", type=int, default=defaults.users, help="number of users (%(default)s)")
    synth.add_argument(
        "--items", type=int, default=defaults.items, help="number of items, products and content (%(default)s)"
    )
    synth.add_argument("--ads", type=int, default=defaults.ads, help="number of ads (%(default)s)")
    synth.add_argument("--days", type=int, default=defaults.days, help="days covered by the log, >= 3 (%(default)s)")
    synth.add_argument("--seed", type=int, default=defaults.seed, help="random seed (%(default)s)")
    synth.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_synth)

    prep = sub.add_parser(
        "prepare",
        help="turn raw tables into a prepared dataset (schema.toml + parquet shards)",
        description="Build vocabularies, dense statistics (train split only), the time/random/file split, text "
        "tables and parquet shards, as a dataset description says. Written atomically; checked before it lands.",
    )
    prep.add_argument("raw", type=Path, help="folder with the raw tables")
    prep.add_argument("--out", type=Path, required=True, help="output dataset folder")
    prep.add_argument(
        "--description",
        default="synthetic",
        help="description TOML, or a shipped one: synthetic, ali_ccp, reviews (default: %(default)s)",
    )
    prep.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prep.set_defaults(func=_prepare)


def _synth(args: argparse.Namespace) -> None:
    cfg = WorldConfig(
        impressions=args.impressions,
        users=args.users,
        items=args.items,
        ads=args.ads,
        days=args.days,
        seed=args.seed,
    )
    generate_world(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote synthetic world ({cfg.impressions:,} impressions) to {args.out}")


def _prepare(args: argparse.Namespace) -> None:
    schema = prepare(args.raw, args.out, load_description(args.description), overwrite=args.overwrite)
    rows = ", ".join(f"{name} {split.num_rows:,}" for name, split in schema.splits.items())
    print(
        f"prepared {schema.name!r} to {args.out}: {rows} rows; {len(schema.features)} features, "
        f"{len(schema.texts)} texts, tasks {[label.task for label in schema.labels]}"
    )
