"""Plots a person would rather look at than read."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from luq.pipeline import Passes


def plot_entropy(result: dict, out_dir: Path, title: str = "") -> list[Path]:
    """entropy_vs_depth.png, entropy_by_modality.png, k_stability.png from an entropy.json dict."""
    out_dir = Path(out_dir)
    paths = []
    clusters = result.get("kmeans_clusters", result.get("k"))   # "k": an entropy.json of an older luq
    layers = list(range(len(result["entropy"])))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, result["entropy"], marker="o")
    for rank, layer in enumerate(result["ranking"][:5]):
        ax.annotate(str(rank + 1), (layer, result["entropy"][layer]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8, color="tab:red")
    ax.set(xlabel="decoder layer", ylabel=f"entropy (nats, K={clusters})",
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
    ax.axvline(clusters, color="tab:red", linestyle="--", label=f"chosen K = {clusters}")
    ax.set(xlabel="K (clusters)", ylabel="Kendall distance to previous K", title="Ranking stability vs K")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "k_stability.png"))
    return paths


def n_low_layers(row: dict) -> int:
    """The count of low layers of an entropy report, its frontier point or search step (files written
    before luq named it `n_low_layers` say "k")."""
    return row["n_low_layers"] if "n_low_layers" in row else row["k"]


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _method(fmt_names) -> str:
    """The solver family of a set of formats ('gptq', 'billm', ...), or 'mixed'."""
    from luq.quant.formats import get_format

    methods = {get_format(f).settings()["solver"].lower() for f in fmt_names}
    return methods.pop() if len(methods) == 1 else "mixed"


def build_report(model_name, net, adapter, config, passed: Passes, sizes, plan: dict, decision: dict,
                 costs: dict | None) -> dict:
    """luq_report.json: the plan, what it weighs to the byte, what it was predicted and measured
    to cost, and how it was chosen (the stopping rule's search, the frontier of plans). The entropy
    allocation's own facts (n_low_layers, low_layers, order, order_rule) only in its reports; the K-means
    entropy (entropy, kmeans_clusters, kendall, text_entropy, image_entropy, tokens) only where the run
    measured it (the entropy allocation, or a measured one given kmeans_clusters)."""
    from luq.version import __version__
    from luq.plan import layer_plan, plan_cost

    from luq.plan import KEEP

    records = {adapter.layer_prefix(r.index) + name: info
               for r in passed.final_layers or passed.layers for name, info in r.linears.items()}
    if passed.unit_pass is not None:
        records.update(passed.unit_pass.units)
    linears = {}
    for name, fmt in plan.items():
        s = sizes.linears[name]
        linears[name] = {"format": fmt, "layer": s.layer, "kind": records[name].get("kind", "decoder"),
                         "bytes": s.bytes[fmt],
                         "bits_per_weight": 8.0 * s.bytes[fmt] / s.n_weights, "nominal_bits": s.nominal_bits[fmt],
                         "relative_error": 0.0 if fmt == KEEP else records[name]["formats"][fmt]["error"],
                         "predicted_cost": None if costs is None else costs[name][fmt]}
    by_kind: dict[str, dict] = {}
    for info in linears.values():
        row = by_kind.setdefault(info["kind"], {"bytes": 0, "formats": {}})
        row["bytes"] += info["bytes"]
        row["formats"][info["format"]] = row["formats"].get(info["format"], 0) + 1
    entropy = passed.entropy   # None where the run measured no entropy (not asked for)
    layers = []
    for i in range(len(adapter.decoder_layers(net))):
        own = layer_plan(plan, adapter.layer_prefix(i))
        names = [adapter.layer_prefix(i) + n for n in own]
        n_weights = sizes.layer_weights(i)
        errors = [linears[n]["relative_error"] for n in names]
        layers.append({"index": i, "method": _method(own.values()), "formats": own,
                       "bits_per_weight": 8.0 * sizes.layer_bytes(plan, i) / n_weights,
                       "nominal_bits": sum(linears[n]["nominal_bits"] * sizes.linears[n].n_weights for n in names)
                       / n_weights,
                       "bytes": sizes.layer_bytes(plan, i),
                       **({} if entropy is None else {"entropy": entropy.entropy[i]}),
                       "mean_relative_error": sum(errors) / len(errors) if errors else None})
    frontier = []
    for point in decision["frontier"]:
        row = {key: v for key, v in point.items() if key != "plan"}
        row.update(avg_bits=sizes.avg_bits(point["plan"]), nominal_avg_bits=sizes.nominal_avg_bits(point["plan"]),
                   total_bytes=sizes.total_bytes(point["plan"]),
                   predicted_cost=None if costs is None else plan_cost(point["plan"], costs))
        frontier.append(row)
    total = sizes.total_bytes(plan)
    paper = {}
    if config.allocate == "entropy":
        order, n_low = decision["order"], decision["n_low_layers"]
        paper = {"n_low_layers": n_low, "low_layers": sorted(order[:n_low]), "order": order,
                 "order_rule": config.entropy.order if isinstance(config.entropy.order, str) else "explicit"}
    measured_entropy = {} if entropy is None else {
        "entropy": entropy.entropy, "kmeans_clusters": entropy.kmeans_clusters, "kendall": entropy.kendall,
        "text_entropy": entropy.text_entropy, "image_entropy": entropy.image_entropy, "tokens": entropy.tokens}
    return {
        "model": model_name or "smollm2", "family": adapter.family, "luq_version": __version__,
        "allocate": config.allocate, "menu": list(config.menu()), **paper,
        "avg_bits": sizes.avg_bits(plan), "nominal_avg_bits": sizes.nominal_avg_bits(plan),
        "total_bytes": total, "total_gb": total / 1e9, "unquantized_bytes": sizes.base_bytes,
        "unit_kinds": list(config.unit_kinds()), "bytes_by_kind": by_kind,
        "budget_gb": config.budget_gb, "max_drop": config.max_drop,
        "metric": config.metric if decision["search"] else None, "search": decision["search"],
        "predicted_cost": None if costs is None else plan_cost(plan, costs),
        "measured_cost": decision.get("measured_cost"), "cost_unit": "KL from full precision, nats per token",
        "knapsack": decision.get("knapsack"), **measured_entropy,
        "hessians": config.hessians, "final_pass": config.final_pass,
        "calibration": asdict(config.calibration), "layers": layers, "linears": linears, "frontier": frontier,
    }


def kernel_report(net, adapter, plan: dict, device) -> dict:
    """Which kernel serves each format of `plan` on `device` ({format: {kernel: linears}}), each decoder
    layer brought in (a streamed one read from its shards) while its kernels are built."""
    import torch

    from luq.models.streaming import layer_on
    from luq.plan import layer_plan
    from luq.quant.linear import kernels_by_format

    by_format: dict[str, dict[str, int]] = {}
    for i, layer in enumerate(adapter.decoder_layers(net)):
        with layer_on(layer, device):
            for fmt, kinds in kernels_by_format(layer, layer_plan(plan, adapter.layer_prefix(i))).items():
                for kernel, n in kinds.items():
                    by_format.setdefault(fmt, {})[kernel] = by_format.get(fmt, {}).get(kernel, 0) + n
    return {"device": str(torch.device(device)), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "by_format": by_format}


def summary_rows(report: dict) -> list[dict]:
    """One row per configuration the run evaluated (each searched count of low layers or budget), else
    the chosen one."""
    chosen = {"avg_bits": report["avg_bits"], "nominal_avg_bits": report["nominal_avg_bits"],
              "total_gb": report["total_bytes"] / 1e9, "metric": None, "chosen": True, "label": "chosen"}
    if report.get("allocate", "entropy") == "entropy":
        by_n = {n_low_layers(f): f for f in report["frontier"]}
        steps = report.get("search") or [{"n_low_layers": n_low_layers(report), "value": None}]
        rows = []
        for s in sorted(steps, key=n_low_layers):
            point = by_n[n_low_layers(s)]
            rows.append({"label": f"{n_low_layers(s)} low", "avg_bits": point["avg_bits"],
                         "nominal_avg_bits": point["nominal_avg_bits"], "total_gb": point["total_bytes"] / 1e9,
                         "metric": s["value"], "chosen": n_low_layers(s) == n_low_layers(report)})
        return rows
    rows = [{"label": f"{s['budget_bytes'] / 1e9:.4f} GB", "avg_bits": None, "nominal_avg_bits": None,
             "total_gb": s["total_bytes"] / 1e9, "metric": s["value"], "chosen": False}
            for s in sorted(report.get("search") or [], key=lambda s: s["budget_bytes"])]
    return rows + [chosen]


def format_summary(report: dict) -> str:
    metric = report.get("metric") or "metric"
    lines = [f"{'':>12} {'true bits':>10} {'nominal':>8} {'total GB':>10} {metric:>12}", "-" * 56]
    for r in summary_rows(report):
        value = "" if r["metric"] is None else f"{r['metric']:.4f}"
        bits = "" if r["avg_bits"] is None else f"{r['avg_bits']:.3f}"
        nominal = "" if r["nominal_avg_bits"] is None else f"{r['nominal_avg_bits']:.3f}"
        lines.append(f"{r['label']:>12} {bits:>10} {nominal:>8} {r['total_gb']:>10.4f} "
                     f"{value:>12}{'  <- chosen' if r['chosen'] else ''}")
    if report.get("allocate", "entropy") == "entropy":
        low = report["low_layers"] if "low_layers" in report else report["low_bit_layers"]   # older luq's name
        lines.append(f"low-bit layers ({n_low_layers(report)}): {low}")
    else:
        counts: dict[str, int] = {}
        for info in report["linears"].values():
            counts[info["format"]] = counts.get(info["format"], 0) + 1
        lines.append("plan: " + ", ".join(f"{n} x {f}" for f, n in sorted(counts.items(), key=lambda x: -x[1])))
        for kind, info in (report.get("bytes_by_kind") or {}).items():
            formats = ", ".join(f"{n} x {f}" for f, n in sorted(info["formats"].items(), key=lambda x: -x[1]))
            lines.append(f"  {kind}: {info['bytes'] / 1e6:.2f} MB ({formats})")
        costs = [f"{which} {report[key]:.4f}" for which, key in (("predicted", "predicted_cost"),
                                                                 ("measured", "measured_cost"))
                 if report.get(key) is not None]
        if costs:
            lines.append("cost (KL from full precision, nats/token): " + ", ".join(costs))
    gguf = report.get("gguf")
    if gguf and "bytes" in gguf:
        lines.append(f"as GGUF (luq export --format gguf): {gguf['bytes']:,} bytes, of which tensors "
                     f"{gguf['tensor_bytes']:,}")
    elif gguf:
        lines.append(f"no GGUF: {gguf['refused']}")
    return "\n".join(lines)


def print_summary(report: dict) -> None:
    print(format_summary(report))


def plot_frontier(report: dict, out_dir: Path) -> Path:
    """frontier.png: the metric of every evaluated configuration against true avg bits; else,
    for the entropy rule, bits against the count of low layers, and for the measured allocation, the predicted cost
    of the best plan at each budget against its true bits."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    f = report["frontier"]
    if report.get("search") and report.get("allocate", "entropy") == "entropy":
        rows = summary_rows(report)
        ax.plot([r["avg_bits"] for r in rows], [r["metric"] for r in rows], marker="o")
        for r in rows:
            ax.annotate(r["label"], (r["avg_bits"], r["metric"]), textcoords="offset points", xytext=(3, 4),
                        fontsize=7, color="tab:red" if r["chosen"] else "black")
        ax.set(xlabel="true avg bits per decoder weight (from bytes)", ylabel=report["metric"],
               title="Quality vs bits for each count of low layers evaluated")
    elif report.get("allocate", "entropy") == "entropy":
        ax.plot([n_low_layers(x) for x in f], [x["avg_bits"] for x in f], marker=".", label="true bits (bytes)")
        ax.plot([n_low_layers(x) for x in f], [x["nominal_avg_bits"] for x in f], marker=".", label="nominal (paper)")
        ax.axvline(n_low_layers(report), color="tab:red", linestyle="--",
                   label=f"chosen: {n_low_layers(report)} low layers")
        ax.set(xlabel="layers at the low format (n_low_layers)", ylabel="avg bits per decoder weight",
               title="Bits vs low layers")
        ax.legend()
    else:
        points = [x for x in f if x.get("predicted_cost") is not None]
        ax.plot([x["avg_bits"] for x in points], [x["predicted_cost"] for x in points], marker="o",
                label="best plan per budget")
        if report.get("predicted_cost") is not None:
            ax.plot([report["avg_bits"]], [report["predicted_cost"]], "r*", markersize=12, label="chosen")
        ax.set(xlabel="true avg bits per decoder weight (from bytes)", yscale="log",
               ylabel="predicted KL (nats/token)", title="Measured allocation: predicted cost vs true bits")
        ax.legend()
    return save_figure(fig, Path(out_dir) / "frontier.png")


def plot_run(report: dict, out_dir: Path) -> list[Path]:
    """Every plot of a quantization run (luq_report.json): the frontier and, where the run measured
    them, the entropy plots."""
    from luq.entropy import entropy_ranking

    if report.get("entropy") is None:
        return [plot_frontier(report, out_dir)]
    clusters = report.get("kmeans_clusters", report.get("entropy_k"))   # "entropy_k": a report of an older luq
    entropy_view = dict(report, kmeans_clusters=clusters, ranking=entropy_ranking(report["entropy"]))
    return [plot_frontier(report, out_dir)] + plot_entropy(entropy_view, out_dir)
