"""The `recsys-mtl synth` and `recsys-mtl prepare` subcommands. data_prep builds on recsys_mtl, never the reverse,
so it registers them with the console script through the `recsys_mtl.commands` entry point (pyproject.toml)."""

import argparse
from pathlib import Path

from data_prep.description import load_description
from data_prep.prepare import prepare
from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.data.description import read_description
from recsys_mtl.data.encode import DESCRIPTION_FILE


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
    synth.add_argument(
        "--taste-drift", type=float, default=0.0, help="latent units a user's taste moves per day (0: none)"
    )
    synth.add_argument(
        "--item-half-life", type=float, default=0.0, help="days for an item's popularity to halve (0: never)"
    )
    synth.add_argument(
        "--price-drift", type=float, default=0.0, help="log units an item's price moves per day (0: none)"
    )
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
        help="description TOML, or a shipped one: synthetic, ali_ccp, reviews (default: synthetic; with --from, "
        "the parent's)",
    )
    prep.add_argument(
        "--from",
        dest="parent",
        type=Path,
        help="a prepared dataset this raw data continues (the next day): its ids keep their indices, new ones are "
        "added, its dense statistics and text vectors are kept",
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
        taste_drift=args.taste_drift,
        item_half_life=args.item_half_life,
        price_drift=args.price_drift,
    )
    generate_world(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote synthetic world ({cfg.impressions:,} impressions) to {args.out}")


def _prepare(args: argparse.Namespace) -> None:
    if args.parent is not None and args.description is None:
        desc = read_description(args.parent / DESCRIPTION_FILE)
        print(f"description {desc.name!r}: the parent's ({args.parent / DESCRIPTION_FILE})")
    else:
        desc = load_description(args.description or "synthetic")
        if args.description is None:
            print(f"description {desc.name!r} (the default; --description names another)")
    schema = prepare(args.raw, args.out, desc, overwrite=args.overwrite, parent=args.parent)
    rows = ", ".join(f"{name} {split.num_rows:,}" for name, split in schema.splits.items())
    print(
        f"prepared {schema.name!r} to {args.out}: {rows} rows; {len(schema.features)} features, "
        f"{len(schema.texts)} texts, tasks {[label.task for label in schema.labels]}"
    )
    if args.parent is not None:
        grown = ", ".join(f"{t.name} {t.num_embeddings:,}" for t in schema.tables if t.encoding == "vocab")
        print(f"continues {args.parent}: tables (rows) {grown}; run encode-text to encode only new or changed texts")
