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
    paths.append(_save(fig, out_dir / "entropy_vs_depth.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, label in (("text_entropy", "text tokens"), ("image_entropy", "image tokens")):
        values = result.get(key) or []
        if any(v is not None for v in values):
            ax.plot(layers, [float("nan") if v is None else v for v in values], marker="o", label=label)
    ax.set(xlabel="decoder layer", ylabel="entropy (nats)", title="Entropy by token kind (same clusters)")
    ax.legend()
    paths.append(_save(fig, out_dir / "entropy_by_modality.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ks = [k for k, _ in result["kendall"]]
    ax.plot(ks, [d for _, d in result["kendall"]], marker="o")
    ax.axvline(result["k"], color="tab:red", linestyle="--", label=f"chosen K = {result['k']}")
    ax.set(xlabel="K (clusters)", ylabel="Kendall distance to previous K", title="Ranking stability vs K")
    ax.legend()
    paths.append(_save(fig, out_dir / "k_stability.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
