"""GPTQ on clipped grids (`GPTQ(clip=True)`, the `-clip` formats) against GPTQ on min-max grids: layer output
error and solving time on the 21 SmolLM2 linears of layers 0, 15 and 29 (the problems tests/test_solvers_real.py
checks), for each width and group size of the menu.

    python -m bench.gptq_clip      # writes bench/results/gptq-clip.json, prints the table

Output error: ||W X - Q X||^2 / ||W X||^2 through the calibration Hessian. `rows clipped`: the share of rows
whose kept solution is the clipped grid's. Time: the clipped solver's wall time over min-max's, both solved
one after the other on each linear (the clipped solver solves twice).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from luq.quant import GPTQ, relative_output_error
from luq.zoo.smollm2 import smollm2_linear_problems

RESULTS = Path(__file__).parent / "results" / "gptq-clip.json"
SETTINGS = ((2, 64), (2, 128), (3, 32), (3, 64), (3, 128), (4, 32), (4, 64), (4, 128), (8, 128))


def clipped_rows(minmax, clipped) -> float:
    """The share of rows whose scales differ from min-max's: those that kept the clipped grid's solution."""
    return float((minmax.scales != clipped.scales).any(dim=1).float().mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    start = time.perf_counter()
    problems = smollm2_linear_problems()
    rows = []
    for bits, group in SETTINGS:
        ratios, shares, times = [], [], []
        for prob in problems:
            t0 = time.perf_counter()
            minmax = GPTQ(bits, group_size=group).quantize(prob.weight, prob.hessian)
            t1 = time.perf_counter()
            clipped = GPTQ(bits, group_size=group, clip=True).quantize(prob.weight, prob.hessian)
            t2 = time.perf_counter()
            err = [relative_output_error(prob.weight, q.dequantize(), prob.hessian) for q in (minmax, clipped)]
            ratios.append(err[1] / err[0])
            shares.append(clipped_rows(minmax, clipped))
            times.append((t2 - t1) / (t1 - t0))
        row = {"bits": bits, "group_size": group, "linears": len(problems),
               "error_ratio_mean": statistics.fmean(ratios), "error_ratio_min": min(ratios),
               "error_ratio_max": max(ratios), "rows_clipped": statistics.fmean(shares),
               "time_ratio_median": statistics.median(times)}
        rows.append(row)
        print(f"GPTQ-{bits} g{group}: error {row['error_ratio_mean']:.3f}x min-max's (per linear "
              f"{row['error_ratio_min']:.3f}-{row['error_ratio_max']:.3f}), {100 * row['rows_clipped']:.0f}% of "
              f"rows clipped, {row['time_ratio_median']:.2f}x the time", flush=True)
    result = {"problems": "SmolLM2-135M layers 0, 15, 29 (7 linears each), 16 x 256 Wikipedia tokens",
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
