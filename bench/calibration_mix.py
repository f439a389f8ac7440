"""Image+text calibration vs text-only: the multimodal fraction alpha (paper Table 3, Figs. 6b and 7).

On tiny-vlm, for each alpha: round(alpha * N) of the N calibration sequences are
image+question samples (the bundled photos), the rest Wikipedia text. With that
calibration, `luq.quantize` measures the entropy ranking and quantizes (its final pass:
each layer's Hessian from the quantized layers before it):

- LUQ: the k lowest-entropy layers of *this* calibration at BiLLM, the rest GPTQ-4 g128;
- GPTQ-4 g128 on every layer (the ranking does not matter; only the Hessians do).

Each model is scored on held-out generated VQA (exact match, per kind) and on held-out
Wikipedia perplexity, and the LUQ layers chosen at each alpha are listed (how much the
ranking moves with the calibration).

    python -m bench.calibration_mix                    # alpha 0, .25, .5, .75, 1: ~30 min on 2 cores
    python -m bench.calibration_mix --alphas 0,0.5,1   # ~18 min

Writes bench/results/calibration_mix.json and .png and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.frontier import Metric
import luq
from luq.calibration import CalibrationConfig, calibration_batches, multimodal_fraction
from luq.models.loading import load_model
from luq.quant.dense import dequantize_modules

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    p.add_argument("--layers", type=int, default=3, help="k: layers at BiLLM in the LUQ model")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=16, help="K-means clusters of the entropy ranking")
    p.add_argument("--vqa-per-kind", type=int, default=15)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS / "calibration_mix.json")
    p.add_argument("--work", type=Path, default=Path("out/bench-calibration-mix"), help="artifacts go here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    net, processor, adapter = load_model("tiny-vlm", args.device, torch.float32)
    vqa = Metric("tiny-vlm", net, processor, args, CalibrationConfig(samples=args.samples, seq_len=args.seq_len))
    text = Metric("smollm2", net, processor.tokenizer, args,
                  CalibrationConfig(samples=args.samples, seq_len=args.seq_len))

    def score() -> dict:
        return {"vqa": vqa(), "perplexity": text()["value"]}

    rows = [{"alpha": None, "model": "full precision", **score()}]
    print(f"full precision: VQA {rows[0]['vqa']['value']:.3f}, perplexity {rows[0]['perplexity']:.2f}", flush=True)
    for alpha in [float(a) for a in args.alphas.split(",")]:
        calibration = CalibrationConfig(alpha=alpha, samples=args.samples, seq_len=args.seq_len, seed=0)
        fraction = multimodal_fraction(calibration_batches(processor, adapter, calibration))
        for name, kw in (("LUQ", {"allocate": "entropy", "n_low_layers": args.layers}),
                         ("GPTQ-4", {"formats": ("gptq4-g128",)})):
            t = time.perf_counter()
            # `luq quantize` with this calibration: variant pass (fp Hessians), the plan, the sequential final pass
            out = args.work / f"alpha{alpha}-{name}"
            report = luq.quantize("tiny-vlm", out, luq.LUQConfig(calibration=calibration, kmeans_clusters=args.k, **kw),
                                  device=args.device, log=lambda s: None)
            model, _, _ = luq.load(out, device=args.device)
            dequantize_modules(model)  # scoring speed only: the same weights as plain linears
            vqa.net = text.net = model
            row = {"alpha": alpha, "model": name, **score(), "avg_bits": report["avg_bits"],
                   "low_layers": report["low_layers"] if name == "LUQ" else [],
                   "multimodal_fraction": fraction, "kmeans_clusters": args.k,
                   "quantize_seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(f"alpha={alpha:.2f} {name:>6}: VQA {row['vqa']['value']:.3f}, perplexity {row['perplexity']:.2f}, "
                  f"bits {row['avg_bits']:.3f}, low-bit layers {row['low_layers']}", flush=True)
    result = {"model": "tiny-vlm", "layers": args.layers, "samples": args.samples, "seq_len": args.seq_len,
              "vqa_questions": vqa.n, "perplexity_tokens": text.n, "rows": rows, "threads": torch.get_num_threads(),
              "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(table(result))


def table(result: dict) -> str:
    kinds = list(result["rows"][0]["vqa"]["by_kind"])
    lines = [f"tiny-vlm, LUQ with k = {result['layers']} BiLLM layers; {result['vqa_questions']} held-out VQA questions, "
             f"{result['perplexity_tokens']} held-out Wikipedia tokens", "",
             "| alpha | model | multimodal token fraction | VQA acc | " + " | ".join(kinds)
             + " | perplexity | BiLLM layers |", "|---" * (6 + len(kinds)) + "|"]
    for r in result["rows"]:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
        frac = f"{r['multimodal_fraction']:.2f}" if "multimodal_fraction" in r else "-"
        lines.append(f"| {alpha} | {r['model']} | {frac} | {r['vqa']['value']:.3f} | "
                     + " | ".join(f"{r['vqa']['by_kind'][k]:.2f}" for k in kinds)
                     + f" | {r['perplexity']:.2f} | {_low_layers(r) or ''} |")
    return "\n".join(lines)


def _low_layers(row: dict) -> list[int]:
    """The LUQ row's low layers (a result of an older luq names them "low_bit_layers")."""
    return row.get("low_layers", row.get("low_bit_layers")) or []


def plot(result: dict, path: Path) -> None:
    from luq.report import plt, save_figure  # the Agg backend, luq's figure style

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fp = result["rows"][0]
    for name in ("LUQ", "GPTQ-4"):
        rows = [r for r in result["rows"] if r["model"] == name]
        axes[0].plot([r["alpha"] for r in rows], [r["vqa"]["value"] for r in rows], marker="o", label=name)
        axes[1].plot([r["alpha"] for r in rows], [r["perplexity"] for r in rows], marker="o", label=name)
    axes[0].axhline(fp["vqa"]["value"], color="gray", linestyle=":", label="full precision")
    axes[1].axhline(fp["perplexity"], color="gray", linestyle=":", label="full precision")
    axes[0].set(xlabel="alpha (multimodal fraction of calibration)", ylabel="held-out VQA accuracy",
                title=f"tiny-vlm: LUQ k={result['layers']} and GPTQ-4")
    axes[1].set(xlabel="alpha", ylabel="held-out Wikipedia perplexity", title="text quality")
    for ax in axes:
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
