"""How good is the sensitivity estimate? Predicted vs measured KL on a real model.

The measured allocation plans on a cheap estimate (luq.sensitivity: per-token Fisher, one
layer-wise backward pass). This bench measures the real thing exllamav3-style for a sample
of (linear, format) pairs -- that linear alone in that format inside the full-precision
model, the KL of its next-token distributions from full precision on the same held-out
sensitivity windows -- and reports the rank correlation (Spearman) and the ratio of
predicted to measured. It also checks additivity: for knapsack plans at several budgets,
the summed predicted cost against the KL measured with the whole plan in place.
Timing: the variant pass, the estimate, and the measured KL per pair, in one run.

    python -m bench.sensitivity                  # SmolLM2, 16 x 256 calibration, 8 sensitivity windows
    python -m bench.sensitivity --model tiny-vlm

Writes bench/results/sensitivity-<model>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr

from bench.common import add_model_args, calibration_of
from luq.assembly import Assembly, linear_names
from luq.config import LUQConfig
from luq.models import UNIT_KINDS
from luq.plan import knapsack, uniform_plan
from luq.quant import DEFAULT_MENU, parse_formats
from luq.sensitivity import output_kl, reference_log_probs
from luq.session import Session

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--sensitivity-samples", type=int, default=16)
    p.add_argument("--menu", default=",".join(DEFAULT_MENU))
    p.add_argument("--pairs", type=int, default=120, help="(linear, format) pairs whose KL is measured")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    calibration = calibration_of(args)
    menu = parse_formats(args.menu)
    config = LUQConfig(calibration=calibration, budget_gb=1.0, formats=menu, kmeans_clusters=args.k,
                       sensitivity_samples=args.sensitivity_samples, keep=UNIT_KINDS)  # the decoder's linears
    # luq's own steps: load, calibration and sensitivity windows, the variant pass, the estimate
    session = Session(args.model, config, device="cpu", dtype=torch.float32, stream=False)
    measurement = session.measure()
    t_pass, t_estimate = session.seconds["layer_pass"], session.seconds["sensitivity"]
    net, adapter, batches = session.net, session.adapter, session.sens_batches
    sizes, costs = measurement.sizes, measurement.costs
    reference = reference_log_probs(net, batches)
    assembly = Assembly(net, adapter, session.cache, "cpu", dense=True)

    def measured(plan: dict) -> float:
        assembly.apply(plan)
        try:
            return output_kl(net, batches, reference)
        finally:
            assembly.undo()

    names = [n for layer in linear_names(net, adapter) for n in layer]
    rng = random.Random(0)
    pairs = rng.sample([(n, f) for n in names for f in menu], min(args.pairs, len(names) * len(menu)))
    t0 = time.perf_counter()
    rows = []
    for i, (name, fmt) in enumerate(pairs):
        rows.append({"linear": name, "format": fmt, "predicted": costs[name][fmt], "measured": measured({name: fmt})})
        if i % 20 == 0:
            print(f"  {i}/{len(pairs)} pairs measured", flush=True)
    t_measure = (time.perf_counter() - t0) / len(pairs)
    pred = [r["predicted"] for r in rows]
    meas = [r["measured"] for r in rows]
    logs = [(torch.tensor(pred).clamp_min(1e-9).log(), torch.tensor(meas).clamp_min(1e-9).log())]
    ratio = sorted(p_ / m for p_, m in zip(pred, meas) if m > 0)
    low = sizes.total_bytes(uniform_plan(names, "gptq2-g128"))
    high = sizes.total_bytes(uniform_plan(names, "gptq4-g128"))
    plans = []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        result = knapsack(sizes, costs, menu, int(low + frac * (high - low)))
        plans.append({"total_bytes": result.total_bytes, "avg_bits": sizes.avg_bits(result.plan),
                      "predicted": result.cost, "measured": measured(result.plan)})
    result = {"model": args.model, "menu": list(menu), "pairs": rows,
              "spearman": spearmanr(pred, meas).statistic,
              "pearson_log": pearsonr(logs[0][0].tolist(), logs[0][1].tolist()).statistic,
              "median_ratio": ratio[len(ratio) // 2], "plans": plans,
              "seconds": {"variant_pass": round(t_pass, 1), "estimate": round(t_estimate, 1),
                          "measured_kl_per_pair": round(t_measure, 2)},
              "sensitivity_tokens": sum(int(b[0]["input_ids"].numel()) for b in batches),
              "threads": torch.get_num_threads()}
    out = args.out or RESULTS / f"sensitivity-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.model}: {len(rows)} (linear, format) pairs, {result['sensitivity_tokens']} sensitivity tokens")
    print(f"Spearman(predicted, measured) = {result['spearman']:.3f}; Pearson of logs = {result['pearson_log']:.3f}; "
          f"median predicted/measured = {result['median_ratio']:.3f}")
    print(f"time: variant pass {t_pass:.0f} s (cached parts read), estimate {t_estimate:.0f} s for "
          f"{len(names) * len(menu)} pairs, measured KL {t_measure:.1f} s per pair "
          f"(all pairs: ~{t_measure * len(names) * len(menu) / 60:.0f} min)")
    print("\n| knapsack plan total MB | true avg bits | predicted KL (sum) | measured KL (whole plan) |")
    print("|---|---|---|---|")
    for q in plans:
        print(f"| {q['total_bytes'] / 1e6:.2f} | {q['avg_bits']:.3f} | {q['predicted']:.4f} | {q['measured']:.4f} |")


if __name__ == "__main__":
    main()
