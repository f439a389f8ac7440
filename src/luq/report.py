"""Plots a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_entropy(result: dict, out_dir: Path, title: str = "") -> list[Path]:
    """entropy_vs_depth.png, entropy_by_modality.png, k_stability.png from an entropy.json dict."""
    out_dir = Path(out_dir)
    paths = []
    layers = list(range(len(result["entropy"])))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, result["entropy"], marker="o")
    for rank, layer in enumerate(result["ranking"][:5]):
        ax.annotate(str(rank + 1), (layer, result["entropy"][layer]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8, color="tab:red")
    ax.set(xlabel="decoder layer", ylabel=f"entropy (nats, K={result['k']})",
           title=title or "Output-activation entropy per layer (red: lowest-entropy ranks)")
    paths.append(save_figure(fig, out_dir / "entropy_vs_depth.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (("text_entropy", "text tokens"), ("image_entropy", "image tokens")):
        values = result.get(key) or []
        if any(v is not None for v in values):
            ax.plot(layers, [float("nan") if v is None else v for v in values], marker="o", label=label)
    ax.set(xlabel="decoder layer", ylabel="entropy (nats)", title="Entropy by token kind (same clusters)")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "entropy_by_modality.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ks = [k for k, _ in result["kendall"]]
    ax.plot(ks, [d for _, d in result["kendall"]], marker="o")
    ax.axvline(result["k"], color="tab:red", linestyle="--", label=f"chosen K = {result['k']}")
    ax.set(xlabel="K (clusters)", ylabel="Kendall distance to previous K", title="Ranking stability vs K")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "k_stability.png"))
    return paths


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_rows(report: dict) -> list[dict]:
    """One row per k the run looked at (each searched k, else the chosen one)."""
    by_k = {f["k"]: f for f in report["frontier"]}
    steps = report.get("search") or [{"k": report["k"], "value": None}]
    return [{"k": s["k"], "avg_bits": by_k[s["k"]]["avg_bits"], "nominal_avg_bits": by_k[s["k"]]["nominal_avg_bits"],
             "total_gb": by_k[s["k"]]["total_bytes"] / 1e9, "metric": s["value"], "chosen": s["k"] == report["k"]}
            for s in sorted(steps, key=lambda s: s["k"])]


def format_summary(report: dict) -> str:
    metric = report.get("metric") or "metric"
    lines = [f"{'k':>4} {'true bits':>10} {'nominal':>8} {'total GB':>10} {metric:>12}",
             "-" * 48]
    for r in summary_rows(report):
        value = "" if r["metric"] is None else f"{r['metric']:.4f}"
        lines.append(f"{r['k']:>4} {r['avg_bits']:>10.3f} {r['nominal_avg_bits']:>8.3f} {r['total_gb']:>10.4f} "
                     f"{value:>12}{'  <- chosen' if r['chosen'] else ''}")
    lines.append(f"low-bit layers ({report['k']}): {report['low_bit_layers']}")
    return "\n".join(lines)


def print_summary(report: dict) -> None:
    print(format_summary(report))


def plot_frontier(report: dict, out_dir: Path) -> Path:
    """frontier.png: the metric of every evaluated k against true avg bits, or, when no
    metric was evaluated, the artifact size against k (true and nominal bits)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if report.get("search"):
        rows = summary_rows(report)
        ax.plot([r["avg_bits"] for r in rows], [r["metric"] for r in rows], marker="o")
        for r in rows:
            ax.annotate(f"k={r['k']}", (r["avg_bits"], r["metric"]), textcoords="offset points", xytext=(3, 4),
                        fontsize=7, color="tab:red" if r["chosen"] else "black")
        ax.set(xlabel="true avg bits per decoder weight (from bytes)", ylabel=report["metric"],
               title="Quality vs bits for each k evaluated")
    else:
        f = report["frontier"]
        ax.plot([x["k"] for x in f], [x["avg_bits"] for x in f], marker=".", label="true bits (bytes)")
        ax.plot([x["k"] for x in f], [x["nominal_avg_bits"] for x in f], marker=".", label="nominal (paper)")
        ax.axvline(report["k"], color="tab:red", linestyle="--", label=f"chosen k = {report['k']}")
        ax.set(xlabel="layers at ~1 bit (k)", ylabel="avg bits per decoder weight", title="Bits vs k")
        ax.legend()
    return save_figure(fig, Path(out_dir) / "frontier.png")


def plot_run(report: dict, out_dir: Path) -> list[Path]:
    """Every plot of a quantization run (luq_report.json): the frontier and the entropy plots."""
    from luq.entropy import entropy_ranking

    entropy_view = dict(report, k=report["entropy_k"], ranking=entropy_ranking(report["entropy"]))
    return [plot_frontier(report, out_dir)] + plot_entropy(entropy_view, out_dir)
