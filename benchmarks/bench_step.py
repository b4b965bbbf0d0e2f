"""Two training steps side by side: samples/s of config A and config B (overrides of one config), or of the code at
a git revision against the working tree's.

    python benchmarks/bench_step.py --b model.task_embedding_dim=0 [--a KEY=VALUE ...] [--config configs/demo.toml]
        [--a-revision REV] [--peers ARCH] [--steps 20] [--repeats 8] [--out step_task_tables]

`--a-revision REV` runs side A on the package as it was at git revision REV (extracted from git into a temporary
folder and imported under another name), side B on the working tree's: what a code change is worth, measured in one
process. `--peers ARCH` takes the peer benchmark's shape of ARCH (bench_peers: ctr + cvr, no text, no cross layers,
batch 2048) instead of --config. Each side reads its own batches (the same rows) and holds them in memory; the two
train in alternating windows of `--steps` steps after a warm-up (bench_health.Side), `--repeats` windows each, each
with its own random stream: samples/s of each (median and best window), the ratio A / B of the median windows, the
quartiles of the windows' paired ratios (each B window against the A window next to it: a shared machine's load moves
both), and whether the two sides' losses are equal to the bit. Writes benchmarks/results/<out>.json and .md.
"""

import argparse
import importlib
import io
import itertools
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_health import NUM_BATCHES, WARMUP_STEPS, Side
from bench_peers import DATASETS, OUR_ARCH, REPO, our_config
from common import print_table, write_results

from recsys_mtl.config import load_config


def package_at(revision: str, folder: Path) -> str:
    """Extract the recsys_mtl package as of git `revision` into `folder` under another name (its own imports renamed
    alike); returns that name, importable once `folder` is on sys.path."""
    name = "recsys_mtl_at_" + re.sub(r"\W", "_", revision)
    archive = subprocess.run(["git", "archive", revision, "recsys_mtl"], cwd=REPO, capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--a-revision {revision}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "recsys_mtl").rename(folder / name)
    for path in (folder / name).rglob("*.py"):
        path.write_text(re.sub(r"\brecsys_mtl\b", name, path.read_text()))
    return name


def build_side(name: str, package: str, config: Path, overrides: list[str], device: torch.device) -> tuple[Side, list]:
    """A Side on `package`'s code (recsys_mtl or an extracted revision) and its NUM_BATCHES training batches."""
    load = importlib.import_module(f"{package}.config").load_config
    loader = importlib.import_module(f"{package}.data.loader")
    step = importlib.import_module(f"{package}.step")
    cfg = load(config, overrides)
    dataset = loader.Dataset(cfg.dataset)
    side = Side(name, step.build_trainer(cfg, dataset, device), step_fn=step.train_step)
    order = loader.ReadOrder(shuffle=True, seed=cfg.train.seed)
    reader = loader.read_batches(dataset, "train", cfg.train.batch_size, order)
    return side, [b.to(device) for b in itertools.islice(reader, NUM_BATCHES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.toml"))
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="overrides of config A")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="overrides of config B")
    parser.add_argument("--a-revision", metavar="REV", help="side A on the code at git revision REV (e.g. HEAD~1)")
    parser.add_argument("--peers", choices=sorted(OUR_ARCH), help="the peer benchmark's shape of this model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=20, help="steps per window")
    parser.add_argument("--repeats", type=int, default=8, help="windows per side")
    parser.add_argument("--out", default="step", help="results name under benchmarks/results (%(default)s)")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 2:
        parser.error("--steps must be >= 1 and --repeats >= 2 (the paired windows' quartiles)")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        config = args.config
        if args.peers:  # written out, so that another revision's load_config reads it too
            shape = argparse.Namespace(batch_size=2048, epochs=1)
            config = Path(tmp) / "peers.toml"
            our_config(load_config(args.config), DATASETS["default"], OUR_ARCH[args.peers], shape, 0).save(config)
        package_a = "recsys_mtl"
        if args.a_revision:
            sys.path.insert(0, tmp)
            package_a = package_at(args.a_revision, Path(tmp))
        revision = f" at {args.a_revision}" if args.a_revision else ""
        names = [f"A {' '.join(args.a) or '(the config)'}{revision}", f"B {' '.join(args.b) or '(the config)'}"]
        sides = [
            build_side(names[0], package_a, config, args.a, device),
            build_side(names[1], "recsys_mtl", config, args.b, device),
        ]
        batch_size = len(sides[0][1][0].keys)
        for side, batches in sides:
            side.run(batches, WARMUP_STEPS)
        windows: dict[str, list[float]] = {side.name: [] for side, _ in sides}
        for repeat in range(args.repeats):
            for side, batches in sides if repeat % 2 == 0 else sides[::-1]:  # neither always goes first
                windows[side.name].append(side.run(batches, args.steps))
                print(f"{side.name}: {args.steps * batch_size / windows[side.name][-1]:,.0f} samples/s", flush=True)
    rows = [
        {
            "side": name,
            "samples/s (median window)": args.steps * batch_size / statistics.median(seconds),
            "samples/s (best window)": args.steps * batch_size / min(seconds),
            "ms/step (median)": 1000 * statistics.median(seconds) / args.steps,
        }
        for name, seconds in windows.items()
    ]
    ratio = rows[0]["samples/s (median window)"] / rows[1]["samples/s (median window)"]
    paired = statistics.quantiles([b / a for a, b in zip(*windows.values(), strict=True)], n=4)  # A's speed over B's
    same = sides[0][0].losses == sides[1][0].losses
    summary = {
        "A / B (median windows)": ratio,
        "A / B paired, quartiles": f"{paired[0]:.3f} / {paired[1]:.3f} / {paired[2]:.3f}",
        "losses equal to the bit": same,
    }
    markdown = "\n".join(
        [
            print_table(
                rows,
                f"training step of {f'the peers shape of {args.peers}' if args.peers else args.config} (batch "
                f"{batch_size}, {args.device}; {args.repeats} alternating windows of {args.steps} steps)",
            ),
            f"\nA / B, samples/s of the median windows: {ratio:.3f}; of the paired windows (quartiles): "
            f"{summary['A / B paired, quartiles']}; the two sides' losses {'equal' if same else 'differ'} "
            f"({len(sides[0][0].losses)} steps each)",
        ]
    )
    print(markdown.splitlines()[-1])
    command = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    write_results(args.out, [*rows, summary], markdown, command=command)


if __name__ == "__main__":
    main()
