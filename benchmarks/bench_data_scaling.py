"""How model quality grows with the amount of data: the multi-task default model and the single-task CTR model,
trained on synthetic worlds of 10^6 to 10^7 impressions and evaluated on the test days against the oracle.

    python benchmarks/bench_data_scaling.py [--sizes 1000000,3000000,10000000] [--worlds default,scaled] [--seeds 0]
        [--variants default,single_ctr] [--set KEY=VALUE ...] [--out data_scaling] [--keep DIR]

Two worlds at each size N: `default` keeps the default world's users, items and ads (more history per user as N
grows); `scaled` grows them with N (common.scaled_world, as benchmarks/bench_synth.py: users N/50, items N/200, ads
N/2000, never below the default's), so the history per user stays the same. The two are the same world up to
N = 10^6, trained once. Each world is generated, prepared and its texts encoded (as `recsys-mtl encode-text` does),
then every variant of bench_quality.py (the config, configs/demo.toml, on that dataset) is trained with every seed and
evaluated on the test split. Writes benchmarks/results/<out>.json:

    {"meta": {...}, "worlds": {WORLD: {N: {VARIANT: {"seeds": {SEED: {metric: value}}, "mean": {metric: value},
                                                     "std": {metric: value}}}}}}

<out>.md (the headline metrics as mean ± std per world, size and variant) and <out>.png (ratio/ctr/auc, the model's
AUC over the oracle's, against N), all three rewritten after every world so that a long run keeps what it finished.
The worlds are generated in a temporary folder, or kept in DIR/<world>-<N> with --keep DIR and reused from there.

A full run (the defaults) takes about 70 minutes per seed on 2 CPU cores: synth + prepare ~7 s per 10^6 rows, text
encoding ~175 texts/s (~5 min for the 55k texts of the scaled 10^7 world), training ~1 min per 10^6 rows per variant
(27 x 10^6 rows for each variant).
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import COLUMNS, run_meta, train_variants, variants
from common import RESULTS, scaled_world, write_markdown

from data_prep.description import load_description
from data_prep.prepare import prepare
from data_prep.synth import WorldConfig, generate_world
from recsys_mtl.config import Config, TextConfig, load_config
from recsys_mtl.files import atomic_file, atomic_write_text
from recsys_mtl.text import encode_dataset

PLOTTED = "ratio/ctr/auc"


def default_world(impressions: int) -> WorldConfig:
    """The default world's users, items and ads with `impressions` rows."""
    return WorldConfig(impressions=impressions)


WORLDS: dict[str, Callable[[int], WorldConfig]] = {"default": default_world, "scaled": scaled_world}


@contextmanager
def world_folder(keep: Path | None, name: str) -> Iterator[Path]:
    """`keep/name`, left in place for the next run, or a temporary folder removed when the block ends."""
    if keep is not None:
        yield keep / name
        return
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        yield Path(tmp)


def build_dataset(world: WorldConfig, folder: Path, text: TextConfig, device: torch.device) -> Path:
    """Generate `world` into folder/raw, prepare it into folder/dataset and encode its texts; reuse what is there.

    Returns:
        The prepared dataset folder (its oracle is read from folder/raw, which must stay).

    Raises:
        ValueError: folder/raw holds another world.
    """
    raw, dataset = folder / "raw", folder / "dataset"
    if raw.is_dir():
        found = tomllib.loads((raw / "world.toml").read_text())
        if found != dataclasses.asdict(world):
            raise ValueError(f"{raw} holds the world {found}, expected {dataclasses.asdict(world)}: remove it")
    else:
        generate_world(raw, world, progress=False)
    if not dataset.is_dir():
        prepare(raw, dataset, load_description("synthetic"))
    encode_dataset(dataset, text, device, progress=False)  # skips texts already encoded with this model
    return dataset


def measure(
    world: WorldConfig,
    label: str,
    folder: Path,
    base: Config,
    names: list[str],
    seeds: list[int],
    device: torch.device,
) -> dict[str, dict]:
    """Build `world` in `folder` and train and evaluate the variants `names` of `base` on it (runs in a temp folder);
    `label` starts its progress lines.

    Returns:
        variant -> summarise() of its test metrics per seed.
    """
    start = time.perf_counter()
    dataset = build_dataset(world, folder, base.text, device)
    seconds = time.perf_counter() - start
    print(
        f"{label}: {world.users:,} users, {world.items:,} items, {world.ads:,} ads, ready in {seconds:.0f} s",
        flush=True,
    )
    chosen = variants(dataclasses.replace(base, dataset=str(dataset)))
    with tempfile.TemporaryDirectory(prefix="runs-") as runs:
        return train_variants({name: chosen[name] for name in names}, seeds, Path(runs), device, f"{label} ")


def markdown(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    """The headline metrics of every world, size and variant as mean ± std."""
    lines = [
        f"Test split, {'mean ± std over seeds' if len(seeds) > 1 else 'seed'} {seeds} (lower is better for rmse and "
        "deviance; ratio = model / oracle). "
        "default: the default world's users, items and ads; scaled: users N/50, items N/200, ads N/2000, at least "
        "the default's.",
        "",
        "| world | impressions | users | items | variant | " + " | ".join(COLUMNS) + " |",
        "|---|---:|---:|---:|---|" + "---|" * len(COLUMNS),
    ]
    for world, by_size in results.items():
        for size, by_variant in by_size.items():
            world_cfg = WORLDS[world](size)
            for name, result in by_variant.items():
                mean, std = result["mean"], result["std"]
                cells = [
                    "—" if c not in mean else f"{mean[c]:.4f} ± {std[c]:.4f}" if len(seeds) > 1 else f"{mean[c]:.4f}"
                    for c in COLUMNS
                ]
                head = f"| {world} | {size:,} | {world_cfg.users:,} | {world_cfg.items:,} | {name} | "
                lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    """ratio/ctr/auc against impressions (log x), one line per world (line style) and variant (colour), error bars
    the std over seeds; where the worlds coincide their lines overlap."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(name for by_size in results.values() for r in by_size.values() for name in r))
    for style, (world, by_size) in zip(("-", "--", ":", "-."), results.items(), strict=False):
        for colour, name in enumerate(names):
            points = {size: r[name] for size, r in by_size.items() if PLOTTED in r[name]["mean"]}
            if points:
                means = [r["mean"][PLOTTED] for r in points.values()]
                stds = [r["std"][PLOTTED] for r in points.values()]
                label = f"{world} world, {name}"
                ax.errorbar(
                    list(points), means, yerr=stds, color=f"C{colour}", linestyle=style, label=label, marker="o"
                )
    ax.set_xscale("log")
    ax.set(xlabel="impressions", ylabel="model AUC / oracle AUC (ctr)", title="CTR quality against data size")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:  # tmp has no .png suffix: name the format
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_outputs(out: str, results: dict[str, dict[int, dict]], meta: dict[str, object], seeds: list[int]) -> None:
    """benchmarks/results/<out>.json, .md and .png, each replaced in one rename."""
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{out}.json", json.dumps({"meta": meta, "worlds": results}, indent=1) + "\n")
    text = markdown(results, seeds)
    write_markdown(out, meta["command"], f"{text}\n![{PLOTTED}]({out}.png)")
    plot(results, RESULTS / f"{out}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--sizes", default="1000000,3000000,10000000", help="comma-separated impressions (%(default)s)")
    parser.add_argument("--worlds", default="default,scaled", help=f"comma-separated, of {', '.join(WORLDS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values (%(default)s)")
    parser.add_argument("--variants", default="default,single_ctr", help="bench_quality.py names (%(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default="data_scaling", help="results name under benchmarks/results (%(default)s)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep the worlds in DIR and reuse them")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    sizes = sorted({int(float(s)) for s in args.sizes.split(",")})
    worlds, names = args.worlds.split(","), args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    base = load_config(args.config, args.set)
    if unknown := [w for w in worlds if w not in WORLDS]:
        parser.error(f"--worlds: unknown {unknown}, expected some of {list(WORLDS)}")
    if unknown := [n for n in names if n not in variants(base)]:
        parser.error(f"--variants: unknown {unknown}, expected some of {list(variants(base))}")
    keep = args.keep.resolve() if args.keep else None  # the dataset names its oracle files by absolute path
    device = torch.device(args.device)
    results: dict[str, dict[int, dict]] = {world: {} for world in worlds}
    done: dict[WorldConfig, dict[str, dict]] = {}  # up to 10^6 impressions both worlds are the default one
    start = time.perf_counter()
    for size in sizes:
        for world in worlds:
            world_cfg = WORLDS[world](size)
            if world_cfg in done:
                print(f"{world} {size:,}: the same world as one above, its results reused", flush=True)
            else:
                with world_folder(keep, f"{world}-{size}") as folder:
                    done[world_cfg] = measure(world_cfg, f"{world} {size:,}", folder, base, names, seeds, device)
            results[world][size] = done[world_cfg]
            entities = {w: {s: dataclasses.asdict(WORLDS[w](s)) for s in r} for w, r in results.items()}
            meta = {**run_meta(args, seeds, start), "entities": entities}
            write_outputs(args.out, results, meta, seeds)
    print(markdown(results, seeds))
    print(f"wrote {RESULTS / args.out}.json, .md and .png")


if __name__ == "__main__":
    main()
