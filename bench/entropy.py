"""Output-activation entropy of every decoder layer on the real models (paper Figs. 2, 8, 9).

SmolLM2-135M on text calibration (alpha 0), its off-grid control smollm2-offgrid (every
weight moved off its GGUF grid, luq.zoo.offgrid; alpha 0), tiny-vlm on image+text
calibration (alpha 0.5, the bundled photos and their questions) and its off-grid control
tiny-vlm-offgrid (alpha 0.5), N x L tokens each. For each model:
the entropy per layer at the chosen K (Eq. 2-5), the same clusters' entropy over text
tokens and over image tokens (Fig. 2), the layer ranking (Eq. 6), and the Kendall
distance between the rankings of consecutive K of the grid with the K that Kneedle
picks (Fig. 9).

    python -m bench.entropy                                   # every model, a few minutes each on 2 CPU cores
    python -m bench.entropy --models smollm2-offgrid --reuse  # one model; the others' saved results kept

Writes bench/results/entropy-<model>/ (entropy.json and luq's three entropy plots),
bench/results/entropy.png (entropy vs relative depth of every model, Fig. 8, with
tiny-vlm's text and image tokens) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from luq.calibration import CalibrationConfig, calibration_batches, multimodal_fraction
from luq.models.loading import load_model
from luq.pipeline import measure_entropy
from luq.report import plot_entropy

RESULTS = Path(__file__).parent / "results"
MODELS = {"smollm2": 0.0, "smollm2-offgrid": 0.0, "tiny-vlm": 0.5, "tiny-vlm-offgrid": 0.5}


def run(model: str, alpha: float, args) -> dict:
    t0 = time.perf_counter()
    calibration = CalibrationConfig(alpha=alpha, samples=args.samples, seq_len=args.seq_len, seed=0)
    net, processor, adapter = load_model(model, args.device, torch.float32)
    batches = calibration_batches(processor, adapter, calibration)
    result = measure_entropy(net, adapter, batches, k=args.k, device=args.device, seed=0).to_json()
    result["tokens"]["multimodal_fraction"] = multimodal_fraction(batches)
    result.update(model=model, calibration=vars(calibration), seconds=round(time.perf_counter() - t0, 1))
    out = args.out / f"entropy-{model}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "entropy.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_entropy(result, out, title=f"{model}: output-activation entropy per layer (alpha={alpha})")
    return result


def _clusters(r: dict) -> int:
    """The chosen K (an entropy.json of an older luq names it "k")."""
    return r.get("kmeans_clusters", r.get("k"))


def table(results: dict[str, dict]) -> str:
    lines = []
    for model, r in results.items():
        t = r["tokens"]
        lines += [f"{model}: K = {_clusters(r)} (Kneedle on the grid), {t['text']} text + {t['image']} image tokens "
                  f"(padding {t['padding']} left out), {r['seconds']} s",
                  f"lowest-entropy layers first: {r['ranking']}",
                  "Kendall distance between consecutive K: " + ", ".join(f"K={k}: {d:.3f}" for k, d in r["kendall"]),
                  ""]
    names = list(results)
    header = "| layer | " + " | ".join(
        f"{m} all" + (f" | {m} text | {m} image" if any(v is not None for v in results[m]["image_entropy"]) else "")
        for m in names) + " |"
    lines += [header, "|---" * (header.count("|") - 1) + "|"]
    for i in range(max(len(r["entropy"]) for r in results.values())):
        cells = []
        for m in names:
            r = results[m]
            multimodal = any(v is not None for v in r["image_entropy"])
            keys = ("entropy", "text_entropy", "image_entropy") if multimodal else ("entropy",)
            cells += [f"{r[k][i]:.3f}" if i < len(r[k]) and r[k][i] is not None else "" for k in keys]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    for m, r in results.items():
        pairs = [(t, im) for t, im in zip(r["text_entropy"], r["image_entropy"]) if t is not None and im is not None]
        if pairs:
            higher = sum(im > t for t, im in pairs)
            lines.append(f"\n{m}: image-token entropy above text-token entropy in {higher} of {len(pairs)} layers "
                         f"(paper, Fig. 2: above in every layer)")
    return "\n".join(lines)


def plot_depth(results: dict[str, dict], path: Path) -> None:
    """Entropy vs relative depth for every model; tiny-vlm's text and image tokens dashed (Figs. 2, 8)."""
    from luq.report import plt, save_figure  # the Agg backend, luq's figure style

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for model, r in results.items():
        n = len(r["entropy"])
        depth = [i / max(1, n - 1) for i in range(n)]
        line, = axes[0].plot(depth, r["entropy"], marker="o", ms=3, label=f"{model} (K={_clusters(r)})")
        for key, style in (("text_entropy", "--"), ("image_entropy", ":")):
            if any(v is not None for v in r[key]) and any(v is not None for v in r["image_entropy"]):
                axes[0].plot(depth, [float("nan") if v is None else v for v in r[key]], style,
                             color=line.get_color(), label=f"{model}, {key.split('_')[0]} tokens")
        axes[1].plot([k for k, _ in r["kendall"]], [d for _, d in r["kendall"]], marker="o", color=line.get_color(),
                     label=model)
        axes[1].axvline(_clusters(r), color=line.get_color(), linestyle="--", alpha=0.6)
    axes[0].set(xlabel="relative depth (layer / last layer)", ylabel="entropy (nats)",
                title="Output-activation entropy vs depth")
    axes[1].set(xlabel="K (clusters)", ylabel="Kendall distance to the previous K",
                title="Ranking stability vs K (dashed: chosen K)")
    for ax in axes:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--k", type=int, default=None, help="fix K instead of Kneedle on the grid")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reuse", action="store_true", help="add the saved results of the models not run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {m: run(m, MODELS[m], args) for m in args.models.split(",")}
    if args.reuse:  # the other models' last results, for the combined table and plot
        for m in MODELS:
            path = args.out / f"entropy-{m}" / "entropy.json"
            if m not in results and path.is_file():
                results[m] = json.loads(path.read_text())
        results = {m: results[m] for m in MODELS if m in results}
    plot_depth(results, args.out / "entropy.png")
    print(table(results))


if __name__ == "__main__":
    main()
