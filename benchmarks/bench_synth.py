"""Synthetic world generation and preparation: rows/s and peak memory at two sizes (memory must stay bounded); the
entities grow with the impressions (common.scaled_world).

python benchmarks/bench_synth.py [--sizes 1000000 10000000]
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, scaled_world, write_results

CHILD = """
import json, resource, sys, time
from pathlib import Path
from data_prep.synth import WorldConfig, generate_world
from data_prep.description import load_description
from data_prep.prepare import prepare
stage, world, raw, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
start = time.perf_counter()
if stage == "synth":
    generate_world(raw, WorldConfig(**world), overwrite=True, progress=False)
else:
    prepare(raw, out, load_description("synthetic"), overwrite=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--device", default="cpu", help="ignored: data preparation runs on the CPU")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            raw, out = Path(tmp) / f"raw{n}", Path(tmp) / f"ds{n}"
            world = json.dumps(dataclasses.asdict(scaled_world(n)))
            for stage in ("synth", "prepare"):
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, stage, world, str(raw), str(out)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(
                    {
                        "stage": stage,
                        "impressions": n,
                        "seconds": round(result["seconds"], 1),
                        "rows_per_s": round(n / result["seconds"]),
                        "peak_rss_mb": round(result["peak_rss_mb"]),
                    }
                )
                print(rows[-1], flush=True)
    markdown = print_table(rows, "synthetic world: generation (synth) and preparation (prepare)")
    write_results("synth", rows, markdown, command="python benchmarks/bench_synth.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
