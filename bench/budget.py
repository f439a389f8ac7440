"""The budget mode's must-show points, each made by `luq.quantize` exactly as a user runs it
(sequential final pass included) and scored from the written artifact on held-out data.

For the model, in one run and one shared variant cache:
- uniform GPTQ-4 g128, GPTQ-3 g128 and GPTQ-2 g128 (`--formats gptqB-g128`);
- the paper's method at k = 3 (`--allocate entropy --n-low-layers 3`);
- the measured allocation (the default) at the bytes of uniform GPTQ-3 and at the bytes of
  entropy-LUQ k = 3 (`--budget-gb` = those sizes), over the decoder alone (`--keep
  embed,head,vision`, the budget mode's own gain) and over the whole model (the default: the
  embedding, head and vision tower join the budget);
- the whole model below every decoder-only size: SmolLM2 at 75 MB, tiny-vlm at 75% of uniform
  GPTQ-4's bytes;
- like for like (`--set whole` runs only these): uniform GPTQ-4/3/2 g128 of the whole model (the
  embedding and head quantized too, as llama.cpp does: `--keep ""`), and the measured allocation
  at uniform whole-model GPTQ-3's bytes and at 75% of uniform whole-model GPTQ-4's bytes.
Scores: SmolLM2: perplexity on held-out Wikipedia windows (disjoint from the calibration,
sensitivity and threshold windows); tiny-vlm: accuracy on held-out generated VQA questions.
Prints a table and the ratios the issue asks for; writes bench/results/budget-<model>.json.

    python -m bench.budget                      # SmolLM2, 16 x 256 calibration
    python -m bench.budget --model tiny-vlm     # alpha 0.5
    python -m bench.budget --model smollm2-offgrid --set whole --out bench/results/budget-whole-smollm2-offgrid.json
    python -m bench.budget --model smollm2-offgrid --set whole --menu clip   # -> budget-whole-smollm2-offgrid-clip.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import luq
from bench.common import add_model_args, calibration_of, is_vlm
from luq.quant.dense import dequantize_modules
from luq.quant.formats import CLIP_MENU

RESULTS = Path(__file__).parent / "results"


def work_dir(model: str) -> Path:
    """Where the artifacts of MODEL's runs are written by default."""
    return Path("out/bench-budget" + ("" if model == "smollm2" else f"-{model}"))


def main(argv=None) -> None:
    from bench.frontier import Metric

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--vqa-per-kind", type=int, default=15)
    p.add_argument("--work", type=Path, default=None, help="default out/bench-budget[-MODEL]")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--set", choices=("all", "whole"), default="all",
                   help="whole: only the whole-model uniform baselines and the measured allocation at their bytes")
    p.add_argument("--menu", choices=("default", "clip"), default="default",
                   help="with --set whole: clip runs every row with GPTQ on clipped grids (--formats clip)")
    args = p.parse_args(argv)
    args.work = args.work or work_dir(args.model)
    calibration = calibration_of(args)
    common = dict(calibration=calibration, validation_samples=args.eval_samples, measure_kl=True)  # uniform rows too
    if args.set == "all":   # the paper's entropy ranking is one of its rows (K-means clusters)
        common["kmeans_clusters"] = args.k

    def run(name: str, **kw) -> dict:
        t0 = time.perf_counter()
        report = luq.quantize(args.model, args.work / name, luq.LUQConfig(**common, **kw), log=lambda s: None)
        model, processor, _ = luq.load(args.work / name)
        dequantize_modules(model)  # the same weights as plain linears: scoring speed only
        metric = Metric(args.model, model, processor, args, calibration)
        row = {"name": name, "total_bytes": report["total_bytes"], "avg_bits": report["avg_bits"],
               "bytes_by_kind": report["bytes_by_kind"],
               **metric(), "predicted_cost": report.get("predicted_cost"), "measured_cost": report.get("measured_cost"),
               "plan_formats": sorted({i["format"] for i in report["linears"].values()}),
               "low_layers": report.get("low_layers", []), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:>28}  {row['total_bytes'] / 1e6:8.2f} MB  {row['avg_bits']:.3f} bits  {metric.name} "
              f"{row['value']:.4g}  ({row['seconds']} s)", flush=True)
        return row

    rows = {}
    if args.set == "whole":
        return whole_model(args, run)
    for bits in (4, 3, 2):
        rows[f"uniform GPTQ-{bits} g128"] = run(f"uniform-gptq{bits}", formats=(f"gptq{bits}-g128",))
    rows["entropy-LUQ k=3"] = run("entropy-k3", allocate="entropy", n_low_layers=3)
    decoder_only = ("embed", "head", "vision")
    for label, ref in (("GPTQ-3", "uniform GPTQ-3 g128"), ("entropy-LUQ k=3", "entropy-LUQ k=3")):
        slug = f"{ref.split()[0]}-{ref.split()[-1]}"
        rows[f"measured (decoder only) at {label}'s bytes"] = run(
            f"measured-decoder-at-{slug}", budget_gb=rows[ref]["total_bytes"] / 1e9, keep=decoder_only)
        rows[f"measured (whole model) at {label}'s bytes"] = run(
            f"measured-whole-at-{slug}", budget_gb=rows[ref]["total_bytes"] / 1e9)
    vqa = is_vlm(args.model)
    small = 0.75 * rows["uniform GPTQ-4 g128"]["total_bytes"] if vqa else 75e6
    small_label = "75% of GPTQ-4's bytes" if vqa else "75 MB"
    rows[f"measured (whole model) at {small_label}"] = run("measured-whole-small", budget_gb=small / 1e9)

    def compare(a: str, b: str) -> float:  # VQA: difference in accuracy; perplexity: ratio
        return rows[a]["value"] - rows[b]["value"] if vqa else rows[a]["value"] / rows[b]["value"]

    op = "-" if vqa else "/"
    checks = {}
    for scope in ("decoder only", "whole model"):
        checks[f"measured ({scope}) {op} GPTQ-3 at GPTQ-3's bytes"] = compare(
            f"measured ({scope}) at GPTQ-3's bytes", "uniform GPTQ-3 g128")
        checks[f"measured ({scope}) {op} entropy-LUQ at k=3's bytes"] = compare(
            f"measured ({scope}) at entropy-LUQ k=3's bytes", "entropy-LUQ k=3")
    checks[f"whole model at {small_label} {op} uniform GPTQ-4"] = compare(
        f"measured (whole model) at {small_label}", "uniform GPTQ-4 g128")
    checks[f"whole model at {small_label}: MB"] = rows[f"measured (whole model) at {small_label}"]["total_bytes"] / 1e6
    result = {"model": args.model, "calibration": {"samples": args.samples, "seq_len": args.seq_len, "alpha": calibration.alpha},
              "metric": "VQA accuracy" if vqa else "perplexity", "rows": rows, "checks": checks,
              "threads": torch.get_num_threads()}
    out = args.out or RESULTS / f"budget-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n| configuration | total MB | true avg bits | {result['metric']} | KL from fp (nats/token) | "
          "outside the decoder |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        kl = "" if r["measured_cost"] is None else f"{r['measured_cost']:.4f}"
        outside = "; ".join(f"{kind} {info['bytes'] / 1e6:.1f} MB ({', '.join(sorted(info['formats']))})"
                            for kind, info in r["bytes_by_kind"].items() if kind != "decoder") or "kept fp16"
        print(f"| {name} | {r['total_bytes'] / 1e6:.2f} | {r['avg_bits']:.3f} | {r['value']:.4g} | {kl} | {outside} |")
    for name, value in checks.items():
        print(f"{name}: {value:.3f}")


def whole_model(args, run) -> None:
    """Uniform GPTQ-B g128 of the whole model (nothing kept at float16) and the measured allocation (the
    default menu, the whole model in the budget) at whole-model GPTQ-3's bytes and at 75% of GPTQ-4's.
    --menu clip: the same with GPTQ on clipped grids (`luq.quant.formats.CLIP_MENU`: the same stored bytes),
    4 and 3 bits."""
    clip = args.menu == "clip"
    suffix, label, menu = ("-clip", " (clipped grids)", {"formats": CLIP_MENU}) if clip else ("", "", {})
    rows = {}
    for bits in (4, 3) if clip else (4, 3, 2):
        rows[f"uniform whole-model GPTQ-{bits} g128{label}"] = run(f"uniform-whole-gptq{bits}{suffix}",
                                                                  formats=(f"gptq{bits}-g128{suffix}",), keep=())
    gptq3, gptq4 = rows[f"uniform whole-model GPTQ-3 g128{label}"], rows[f"uniform whole-model GPTQ-4 g128{label}"]
    at3 = f"measured at whole-model GPTQ-3's bytes{label}"
    at75 = f"measured at 75% of whole-model GPTQ-4's bytes{label}"
    rows[at3] = run(f"measured-at-whole-gptq3{suffix}", budget_gb=gptq3["total_bytes"] / 1e9, **menu)
    rows[at75] = run(f"measured-at-75pc-whole-gptq4{suffix}", budget_gb=0.75 * gptq4["total_bytes"] / 1e9, **menu)
    checks = {"measured / uniform GPTQ-3 at its bytes": rows[at3]["value"] / gptq3["value"],
              "measured at 75% of GPTQ-4's bytes / uniform GPTQ-4": rows[at75]["value"] / gptq4["value"]}
    result = {"model": args.model, "set": "whole", "menu": args.menu,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len}, "metric": "perplexity",
              "eval_samples": args.eval_samples, "rows": rows, "checks": checks, "threads": torch.get_num_threads()}
    out = args.out or RESULTS / f"budget-whole-{args.model}{suffix}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, r in rows.items():
        print(f"{name}: {r['total_bytes'] / 1e6:.2f} MB, perplexity {r['value']:.3f}")
    for name, value in checks.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
