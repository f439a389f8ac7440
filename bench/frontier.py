"""Perplexity vs TRUE bits on real SmolLM2-135M: LUQ at every k, beside uniform baselines.

For k = 0..30 layers at BiLLM in the chosen order(s) (the rest GPTQ-4 g128), and for
uniform GPTQ-4, GPTQ-3, GPTQ-2 (g128) and BiLLM on every layer, the perplexity on
held-out Wikipedia windows (disjoint from the calibration windows) against the average
bits per decoder weight counted from stored bytes, with the paper's nominal bits beside.
Every configuration is assembled from the variant cache (the same one `luq quantize`
fills with the same calibration), so nothing is quantized twice. Also checks that the
binary search of `--max-drop` lands where an exhaustive scan of the curve does.

    python -m bench.frontier                 # entropy order (about 20 min on 2 CPU cores, cold cache)
    python -m bench.frontier --orders entropy,reverse-entropy,depth,random

Writes bench/results/frontier.json and frontier.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from luq.api import Assembly, size_model, variant_cache
from luq.eval.perplexity import token_window_perplexity
from luq.calibration import CalibrationConfig, calibration_batches, text_token_ids, validation_windows
from luq.config import LUQConfig
from luq.models.loading import load_model, parse_dtype
from luq.pipeline import layer_pass
from luq.plan import HIGH, LOW, assignment, layer_order, threshold_search
from luq.quant import GPTQ

RESULTS = Path(__file__).parent / "results"
UNIFORM = {"gptq3": GPTQ(bits=3), "gptq2": GPTQ(bits=2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16, help="held-out windows of --seq-len tokens")
    p.add_argument("--k", type=int, default=100, help="K-means clusters of the entropy ranking")
    p.add_argument("--orders", default="entropy")
    p.add_argument("--ks", default=None, help="comma-separated k to evaluate (default: every k)")
    p.add_argument("--hessians", default="fp", choices=("fp", "sequential"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "frontier.json")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    calibration = CalibrationConfig(samples=args.samples, seq_len=args.seq_len, seed=0)
    config = LUQConfig(calibration=calibration, layers=0, k_means=args.k, hessians=args.hessians)
    net, tokenizer, adapter = load_model(args.model, args.device, torch.float32)
    batches = calibration_batches(tokenizer, adapter, calibration)
    main_cache = variant_cache(net, config, config.variants())
    extra_cache = variant_cache(net, config, UNIFORM)
    passed = layer_pass(net, adapter, batches, variants=config.variants(), cache=main_cache, hessians=args.hessians,
                        k=args.k, device=args.device, seed=0, desc="LUQ variants")
    extra = layer_pass(net, adapter, batches, variants=UNIFORM, cache=extra_cache, hessians=args.hessians, k=args.k,
                       device=args.device, seed=0, desc="GPTQ-3/2", entropy=False)
    t_quant = time.perf_counter() - t0
    layers = [dict(a, bytes={**a["bytes"], **b["bytes"]}, nominal_bits={**a["nominal_bits"], **b["nominal_bits"]})
              for a, b in zip(passed["layers"], extra["layers"])]
    sizes = size_model(net, adapter, layers, parse_dtype(config.storage_dtype))
    n = sizes.n_layers
    windows = validation_windows(text_token_ids(tokenizer, None), args.eval_samples, args.seq_len, 0, args.samples)
    fp_ppl = token_window_perplexity(net, windows)
    assembly = Assembly(net, adapter, [main_cache, extra_cache], args.device, dense=True)

    def evaluate(variants: list[str]) -> dict:
        assembly.apply(variants)
        ppl = token_window_perplexity(net, windows)
        assembly.undo()
        return {"ppl": ppl, "avg_bits": sizes.avg_bits(variants), "nominal_avg_bits": sizes.nominal_avg_bits(variants),
                "total_bytes": sizes.total_bytes(variants)}

    uniform = {"GPTQ-4 g128": evaluate([HIGH] * n), "GPTQ-3 g128": evaluate(["gptq3"] * n),
               "GPTQ-2 g128": evaluate(["gptq2"] * n), "BiLLM (all layers)": evaluate([LOW] * n)}
    curves = {}
    for order_name in args.orders.split(","):
        order = layer_order(order_name, passed["entropy"], seed=0)
        curves[order_name] = {"order": order, "points": []}
        for k in (range(n + 1) if args.ks is None else [int(x) for x in args.ks.split(",")]):
            point = evaluate(assignment(order, k, n))
            curves[order_name]["points"].append(dict(point, k=k))
            print(f"{order_name:>16} k={k:2d}  bits {point['avg_bits']:.3f}  ppl {point['ppl']:.2f}", flush=True)

    checks = search_checks(curves["entropy"]["points"]) if "entropy" in curves and args.ks is None else []
    result = {"model": args.model, "calibration": vars(calibration) if hasattr(calibration, "__dict__") else None,
              "eval_tokens": int(windows.numel()), "fp32_ppl": fp_ppl, "uniform": uniform, "curves": curves,
              "binary_vs_exhaustive": checks, "entropy": passed["entropy"], "entropy_k": passed["k"],
              "hessians": args.hessians, "seconds": {"quantize": round(t_quant, 1),
                                                     "total": round(time.perf_counter() - t0, 1)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(table(result))


def search_checks(points: list[dict]) -> list[dict]:
    """For several thresholds, the k of the binary search (paper) and of an exhaustive scan
    (the largest k whose every smaller k also passes) on the measured curve."""
    ppl = [p["ppl"] for p in points]
    n = len(ppl) - 1
    out = []
    for max_drop in (0.5, 1, 2, 5, 10, 20, 50):
        exhaustive = 0
        while exhaustive < n and ppl[exhaustive + 1] - ppl[0] <= max_drop:
            exhaustive += 1
        binary, steps = threshold_search(lambda k: ppl[k], n, max_drop, higher_is_better=False)
        out.append({"max_drop": max_drop, "binary": binary, "exhaustive": exhaustive, "evaluations": len(steps)})
    return out


def table(result: dict) -> str:
    lines = [f"FP32 perplexity {result['fp32_ppl']:.2f} on {result['eval_tokens']} held-out tokens", "",
             "| configuration | true avg bits | nominal bits | total MB | perplexity |", "|---|---|---|---|---|"]
    for name, r in result["uniform"].items():
        lines.append(f"| {name} | {r['avg_bits']:.3f} | {r['nominal_avg_bits']:.3f} | {r['total_bytes'] / 1e6:.1f} | "
                     f"{r['ppl']:.2f} |")
    for order, curve in result["curves"].items():
        for p in curve["points"]:
            if p["k"] % 5 == 0 or p["k"] in (1, 2, 3):
                lines.append(f"| LUQ {order}, k={p['k']} | {p['avg_bits']:.3f} | {p['nominal_avg_bits']:.3f} | "
                             f"{p['total_bytes'] / 1e6:.1f} | {p['ppl']:.2f} |")
    if result["binary_vs_exhaustive"]:
        lines += ["", "| max ppl increase | binary search k | exhaustive k | evaluations |", "|---|---|---|---|"]
        lines += [f"| {c['max_drop']} | {c['binary']} | {c['exhaustive']} | {c['evaluations']} |"
                  for c in result["binary_vs_exhaustive"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for order, curve in result["curves"].items():
        pts = curve["points"]
        ax.plot([p["avg_bits"] for p in pts], [p["ppl"] for p in pts], marker=".", label=f"LUQ ({order} order), k=0..")
    markers = iter("sD^v")
    for name, r in result["uniform"].items():
        ax.scatter([r["avg_bits"]], [r["ppl"]], marker=next(markers), s=50, label=name, zorder=3)
    ax.axhline(result["fp32_ppl"], color="gray", linestyle=":", label="FP32")
    ax.set_yscale("log")
    ax.set(xlabel="true average bits per decoder weight (stored bytes)", ylabel="held-out perplexity (log)",
           title=f"{result['model']}: quality vs true bits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
