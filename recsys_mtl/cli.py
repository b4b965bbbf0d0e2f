"""`recsys-mtl`: one console script, one subcommand per stage of the pipeline. Parses, then calls library functions."""

import argparse
import logging
import sys
from pathlib import Path

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError)


def _synth(args: argparse.Namespace) -> None:
    from data_prep.synth import WorldConfig, generate_world

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
    from data_prep.description import load_description
    from data_prep.prepare import prepare

    schema = prepare(args.raw, args.out, load_description(args.description), overwrite=args.overwrite)
    rows = ", ".join(f"{name} {split.num_rows:,}" for name, split in schema.splits.items())
    print(
        f"prepared {schema.name!r} to {args.out}: {rows} rows; {len(schema.features)} features, "
        f"{len(schema.texts)} texts, tasks {[label.task for label in schema.labels]}"
    )


def _encode_text(args: argparse.Namespace) -> None:
    import torch

    from recsys_mtl.config import TextConfig
    from recsys_mtl.text import encode_dataset

    cfg = TextConfig(model=args.model, batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype)
    encoded = encode_dataset(args.dataset, cfg, torch.device(args.device), progress=not args.quiet)
    done = ", ".join(f"{name}: {n:,} new" for name, n in encoded.items()) or "no text features"
    print(f"encoded texts of {args.dataset} with {cfg.model} ({cfg.dtype}): {done}")


def build_parser() -> argparse.ArgumentParser:
    from data_prep.synth import WorldConfig
    from recsys_mtl.config import TextConfig

    parser = argparse.ArgumentParser(
        prog="recsys-mtl",
        description="Multi-task ranking for e-commerce: synthetic data, preparation, training, scoring.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    text_defaults = TextConfig()
    enc = sub.add_parser(
        "encode-text",
        help="encode every distinct text of a prepared dataset once with a local BERT",
        description="Write DATASET/text_emb/<name>.parquet: one mean-pooled vector per text, keyed by id, with the "
        "model and a hash of the text. Texts already encoded by the same model are skipped.",
    )
    enc.add_argument("dataset", type=Path, help="prepared dataset folder")
    enc.add_argument(
        "--model", default=text_defaults.model, help="packaged all-MiniLM-L6-v2 or a local folder (%(default)s)"
    )
    enc.add_argument("--batch-size", type=int, default=text_defaults.batch_size, help="texts per batch (%(default)s)")
    enc.add_argument("--max-length", type=int, default=text_defaults.max_length, help="tokens per text (%(default)s)")
    enc.add_argument("--dtype", choices=["float32", "bfloat16"], default=text_defaults.dtype, help="(%(default)s)")
    enc.add_argument("--device", default="cpu", help="cpu or cuda (%(default)s)")
    enc.add_argument("--quiet", action="store_true", help="no progress bar")
    enc.set_defaults(func=_encode_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"recsys-mtl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
