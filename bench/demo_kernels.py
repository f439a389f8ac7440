"""The last step of `make demo` (examples/demo.py on its artifact), with luq's fast kernels and
with the tiled de-quantizing path (LUQ_KERNEL=tiled, what every linear ran before them).

    python -m bench.demo_kernels [--artifact out/demo] [--repeats 2]

Each run is a fresh process (loading, both models answering every question); the two settings
alternate and the median wall time of each is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default=str(HERE / "out" / "demo"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not (Path(args.artifact) / "config.json").is_file():
        raise SystemExit(f"no artifact at {args.artifact}: run `make demo` first")
    times: dict[str, list[float]] = {"auto": [], "tiled": []}
    for _ in range(args.repeats):
        for kernel in times:
            env = dict(os.environ, LUQ_KERNEL=kernel, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(HERE / "examples" / "demo.py"), args.artifact], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[kernel].append(time.perf_counter() - t0)
    fast, tiled = statistics.median(times["auto"]), statistics.median(times["tiled"])
    print("| examples/demo.py | wall s (median) |\n|---|---:|")
    print(f"| fast kernels (default) | {fast:.1f} |\n| LUQ_KERNEL=tiled | {tiled:.1f} |")
    print(f"\ntiled / fast: {tiled / fast:.2f}x ({args.repeats} runs each, alternating)")


if __name__ == "__main__":
    main()
