"""Quality vs TRUE bits, and the layer-order comparison, on a real model (paper Figs. 1, 4-6a, Table 2).

The measured allocation (luq's default budget mode): at budgets from uniform GPTQ-2's
size to GPTQ-4's (plus GPTQ-3's exact size and the size of entropy-LUQ at k = 3), the
knapsack plan over the format menu on measured sensitivity. For each order (entropy,
reverse-entropy, depth, three seeded random orders) and each k, the first k layers of the
order at BiLLM and the rest at GPTQ-4 g128; beside them uniform configurations: GPTQ
4/3/2 (luq's, and llmcompressor's as the peer), round-to-nearest 4/3/2, BiLLM on every
layer and HQQ at 2 and 1 bit (group 64) as data-free peers. Each point is scored on
held-out data (disjoint from the calibration and sensitivity windows) and placed at the
average bits per decoder weight counted from stored bytes, with the paper's nominal bits
beside.

- `--model smollm2`: perplexity on held-out Wikipedia windows (disjoint from calibration);
  `--model smollm2-offgrid` the same on its off-grid control (luq.zoo.offgrid).
- `--model tiny-vlm`: exact-match accuracy on held-out generated VQA (luq.zoo.tinyvlm), per
  question kind and overall; calibration is image+text (`--alpha`, default 0.5).

The measured allocation's sizes and costs are luq's own (`luq.Session.measure`, the steps
of `luq quantize`), its plans at each budget `luq.plan.knapsack`'s; the uniform baselines
outside the menu get one more pass (`pipeline.layer_pass`) into the same variant cache.
Every configuration is assembled from the variant cache (the same one `luq quantize` fills
for the same calibration), without the sequential final pass, so nothing is quantized
twice (bench/budget.py measures the must-show points through `luq.quantize`, final pass
included); peers whose package is missing (llmcompressor: `make bench`; hqq) are left out and said so.

    python -m bench.frontier                        # SmolLM2, ~25 min on 2 cores (cold cache)
    python -m bench.frontier --model tiny-vlm       # ~30 min on 2 cores (cold cache)

Writes bench/results/frontier-<model>.json, frontier-<model>.png (metric vs true and
nominal bits) and orders-<model>.png (metric vs k per order), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import add_model_args, calibration_of, is_vlm
from luq.assembly import Assembly, linear_names, size_table
from luq.calibration import CalibrationConfig, text_token_ids, validation_windows
from luq.config import LUQConfig
from luq.eval.perplexity import token_window_perplexity
from luq.models import UNIT_KINDS
from luq.pipeline import LayerSummary, layer_pass
from luq.plan import entropy_plan, knapsack, layer_order, threshold_search, uniform_plan
from luq.quant import DEFAULT_MENU, Format, get_format, parse_formats, register_format
from luq.session import Session

RESULTS = Path(__file__).parent / "results"
ORDERS = "entropy,reverse-entropy,depth,random0,random1,random2"
VQA_SEED = 2_000_029  # held-out generated questions: a stream neither training nor its monitoring used


def baselines(peers: bool) -> tuple[dict, list[str]]:
    """(label -> format name, notes about peers left out); peers are registered as formats."""
    from bench.peer import peer_available
    from bench.peers import HQQ, PeerGPTQ, hqq_available

    labels = {"GPTQ-4 g128 (luq)": "gptq4-g128", "GPTQ-3 g128 (luq)": "gptq3-g128", "GPTQ-2 g128 (luq)": "gptq2-g128",
              "RTN-4 g128": "rtn4-g128", "RTN-3 g128": "rtn3-g128", "RTN-2 g128": "rtn2-g128",
              "BiLLM (every layer)": "billm"}
    notes = []
    if peers and peer_available():
        for bits in (4, 3, 2):
            register_format(Format(f"peer-gptq{bits}-g128", PeerGPTQ(bits=bits), "llmcompressor's GPTQ"), replace=True)
            labels[f"GPTQ-{bits} g128 (llmcompressor)"] = f"peer-gptq{bits}-g128"
    elif peers:
        notes.append("llmcompressor not installed (`make bench` installs it): its GPTQ is left out")
    if peers and hqq_available():
        for bits in (2, 1):
            register_format(Format(f"hqq{bits}-g64", HQQ(bits=bits, group_size=64), "HQQ, data-free"), replace=True)
            labels[f"HQQ-{bits} g64"] = f"hqq{bits}-g64"
    elif peers:
        notes.append("hqq not installed (`pip install hqq termcolor`): HQQ is left out")
    return labels, notes


def order_of(name: str, entropy: list[float]) -> list[int]:
    """An order by name; `randomN` is the random order of seed N."""
    if name.startswith("random") and name[6:].isdigit():
        return layer_order("random", entropy, seed=int(name[6:]))
    return layer_order(name, entropy)


class Metric:
    """The score of the model as it stands: held-out perplexity (text) or VQA accuracy (VLM)."""

    def __init__(self, model_name: str, net, processor, args, calibration: CalibrationConfig) -> None:
        self.net, self.processor = net, processor
        self.vqa = is_vlm(model_name)
        if self.vqa:
            from luq.zoo import tinyvlm

            self.name, self.higher_is_better = "VQA accuracy", True
            self.samples = tinyvlm.make_samples(args.vqa_per_kind, seed=VQA_SEED)
            self.n = len(self.samples)
        else:
            self.name, self.higher_is_better = "perplexity", False
            self.windows = validation_windows(text_token_ids(processor, None), args.eval_samples, calibration.seq_len,
                                              0, calibration.samples)
            self.n = int(self.windows.numel())

    def __call__(self) -> dict:
        if not self.vqa:
            return {"value": token_window_perplexity(self.net, self.windows)}
        from luq.zoo import tinyvlm

        predictions = tinyvlm.answer_questions(self.net, self.processor, [s.image for s in self.samples],
                                               [s.question for s in self.samples])
        hits: dict[str, list[bool]] = {}
        for s, p in zip(self.samples, predictions):
            hits.setdefault(s.kind, []).append(tinyvlm.is_correct(p, s.answer))
        every = [h for kind in hits.values() for h in kind]
        return {"value": sum(every) / len(every), "by_kind": {k: sum(v) / len(v) for k, v in hits.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--eval-samples", type=int, default=16, help="held-out windows of --seq-len tokens (text)")
    p.add_argument("--vqa-per-kind", type=int, default=15, help="held-out generated questions per kind (tiny-vlm)")
    p.add_argument("--orders", default=ORDERS)
    p.add_argument("--ks", default=None,
                   help="comma-separated k of the entropy order (default: every k for smollm2; 0,3,6,10,15,30 "
                        "for tiny-vlm)")
    p.add_argument("--order-ks", default=None,
                   help="comma-separated k of the other orders (default: 0,1,2,3,5,8,10,15,20,25,30 for smollm2; "
                        "as --ks for tiny-vlm)")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="leave out llmcompressor and HQQ")
    p.add_argument("--menu", default=",".join(DEFAULT_MENU), help="formats of the measured allocation")
    p.add_argument("--budgets", type=int, default=7, help="evenly spaced budgets from GPTQ-2's size to GPTQ-4's")
    p.add_argument("--sensitivity-samples", type=int, default=16)
    p.add_argument("--whole-model", action="store_true",
                   help="also the measured allocation with the embedding, head and vision tower in the budget, "
                        "from the smallest reachable size up to GPTQ-4's")
    p.add_argument("--hessians", default="fp", choices=("fp", "sequential"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"frontier-{args.model}.json"

    t0 = time.perf_counter()
    calibration = calibration_of(args)
    menu = parse_formats(args.menu)
    labels, notes = baselines(args.peers)   # the peers are registered as formats before the config names them
    # luq's measured allocation, as `luq quantize` measures it: the variant pass over the menu (entropy
    # too), the units outside the decoder with --whole-model (in luq's unit menu: the default menu's
    # plus GPTQ-6, or --menu), the sensitivity of every (linear or unit, format)
    config = LUQConfig(calibration=calibration, budget_gb=1.0, kmeans_clusters=args.k, hessians=args.hessians,
                       formats=None if tuple(menu) == tuple(DEFAULT_MENU) else menu,
                       keep=None if args.whole_model else UNIT_KINDS,
                       validation_samples=args.eval_samples, sensitivity_samples=args.sensitivity_samples)
    ended: dict[str, float] = {}

    def on_stage(stage: str, seconds: float | None) -> None:
        if seconds is not None:
            ended[stage] = time.perf_counter()

    session = Session(args.model, config, device=args.device, dtype=torch.float32, stream=False, on_stage=on_stage)
    net, processor, adapter, units = session.net, session.processor, session.adapter, session.units
    # the uniform baselines outside the menu (RTN, BiLLM, the peers) are no plan of the measured allocation:
    # one more pass puts them in the same variant cache, on the same Hessians (chain: the menu's first format)
    extra = [f for f in dict.fromkeys(labels.values()) if f not in menu]
    baseline_layers = layer_pass(net, adapter, session.batches, formats=[get_format(f) for f in extra],
                                 cache=session.cache, hessians=args.hessians, chain_format=get_format(menu[0]),
                                 device=args.device, seed=calibration.seed, entropy=False,
                                 desc="baselines").layers if extra else None
    measurement = session.measure()
    passed, costs = measurement.passed, measurement.costs
    t_quant = ended["layer_pass"] - t0
    t_sens = time.perf_counter() - ended["layer_pass"]
    names = linear_names(net, adapter)
    every_linear = [n for layer in names for n in layer]
    # the decoder alone (the menu and the baselines); with --whole-model, luq's table of the whole model
    sizes = size_table(net, adapter, with_formats(passed.layers, baseline_layers), session.storage_dtype)
    whole = measurement.sizes if units else None
    n = len(names)
    metric = Metric(args.model, net, processor, args, calibration)
    full_precision = metric()
    assembly = Assembly(net, adapter, session.cache, args.device, dense=True, units=units)

    def evaluate(plan: dict) -> dict:
        table = whole if set(plan) & set(units) else sizes
        assembly.apply(plan)
        score = metric()
        assembly.undo()
        return {**score, "avg_bits": table.avg_bits(plan), "nominal_avg_bits": table.nominal_avg_bits(plan),
                "total_bytes": table.total_bytes(plan)}

    uniform = {}
    for label, fmt in labels.items():
        uniform[label] = evaluate(uniform_plan(every_linear, fmt))
        print(f"{label:>30}  bits {uniform[label]['avg_bits']:.3f}  {metric.name} {uniform[label]['value']:.4g}",
              flush=True)
    vqa_ks = "0,3,6,10,15,30"
    entropy_ks = list(range(n + 1)) if args.ks is None and not metric.vqa else \
        [int(x) for x in (args.ks or vqa_ks).split(",")]
    other_ks = [int(x) for x in (args.order_ks or args.ks or (vqa_ks if metric.vqa else "0,1,2,3,5,8,10,15,20,25,30"))
                .split(",")]
    seen: dict[tuple, dict] = {}  # k = 0 and k = n are the same model in every order
    curves = {}
    for order_name in [o for o in args.orders.split(",") if o]:
        order = order_of(order_name, passed.entropy.entropy)
        curves[order_name] = {"order": order, "points": []}
        for k in (entropy_ks if order_name == "entropy" else other_ks):
            plan = entropy_plan(order, k, names, "gptq4-g128", "billm")
            key = tuple(sorted(plan.items()))
            if key not in seen:
                seen[key] = evaluate(plan)
            point = dict(seen[key], k=k)
            curves[order_name]["points"].append(point)
            print(f"{order_name:>16} k={k:2d}  bits {point['avg_bits']:.3f}  {metric.name} {point['value']:.4g}",
                  flush=True)

    low = sizes.total_bytes(uniform_plan(every_linear, "gptq2-g128"))
    high = sizes.total_bytes(uniform_plan(every_linear, "gptq4-g128"))
    budgets = {f"{i}/{args.budgets - 1} of GPTQ-2..GPTQ-4": int(low + (high - low) * i / (args.budgets - 1))
               for i in range(args.budgets)}
    budgets["GPTQ-3 g128's bytes"] = sizes.total_bytes(uniform_plan(every_linear, "gptq3-g128"))
    budgets["entropy-LUQ k=3's bytes"] = sizes.total_bytes(entropy_plan(layer_order("entropy", passed.entropy.entropy), 3,
                                                                        names, "gptq4-g128", "billm"))
    measured = []
    for label, budget in sorted(budgets.items(), key=lambda kv: kv[1]):
        result = knapsack(sizes, costs, menu, budget)
        point = dict(evaluate(result.plan), budget=label, budget_bytes=budget, predicted_cost=result.cost,
                     formats={f: sum(1 for v in result.plan.values() if v == f) for f in sorted(set(result.plan.values()))})
        fits = {name: u["value"] for name, u in uniform.items() if u["total_bytes"] <= budget}
        better = [name for name, v in fits.items()
                  if (v > point["value"] if metric.higher_is_better else v < point["value"])]
        point["uniform_better"] = better
        measured.append(point)
        print(f"{'measured':>16} {label:>26}  bits {point['avg_bits']:.3f}  {metric.name} {point['value']:.4g}"
              f"  (uniform that fit and beat it: {better or 'none'})", flush=True)

    whole_model = []
    if whole is not None:  # the embedding, head and vision tower in the budget too, down to the smallest reachable
        smallest = whole.total_bytes(whole.extreme_plan(menu))
        for i in range(args.budgets):
            budget = int(smallest + (high - smallest) * i / (args.budgets - 1))
            result = knapsack(whole, costs, menu, budget)
            point = dict(evaluate(result.plan), budget_bytes=budget, predicted_cost=result.cost,
                         outside={name: result.plan[name] for name in units if units[name].kind != "vision"},
                         vision_formats={f: sum(1 for n in units if units[n].kind == "vision" and result.plan[n] == f)
                                         for f in sorted({result.plan[n] for n in units if units[n].kind == "vision"})})
            whole_model.append(point)
            print(f"{'whole model':>16} {budget / 1e6:8.2f} MB  {metric.name} {point['value']:.4g}  outside: "
                  f"{point['outside']} vision {point['vision_formats']}", flush=True)

    checks = search_checks(curves["entropy"]["points"], metric.higher_is_better) \
        if "entropy" in curves and entropy_ks == list(range(n + 1)) else []
    result = {"model": args.model, "metric": metric.name, "higher_is_better": metric.higher_is_better,
              "calibration": {"samples": args.samples, "seq_len": args.seq_len, "alpha": calibration.alpha, "seed": 0},
              "eval_size": metric.n, "eval_unit": "questions" if metric.vqa else "tokens",
              "full_precision": full_precision, "uniform": uniform, "curves": curves, "notes": notes,
              "measured": measured, "whole_model": whole_model, "menu": list(menu),
              "binary_vs_exhaustive": checks, "entropy": passed.entropy.entropy,
              "kmeans_clusters": passed.entropy.kmeans_clusters,
              "hessians": args.hessians, "threads": torch.get_num_threads(),
              "seconds": {"variant_pass": round(t_quant, 1), "sensitivity": round(t_sens, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot_frontier(result, out.with_suffix(".png"))
    plot_bytes(result, out.with_name(out.stem + "-bytes.png"))
    plot_orders(result, out.with_name(out.name.replace("frontier", "orders")).with_suffix(".png"))
    print(table(result))


def with_formats(layers: list[LayerSummary], more: list[LayerSummary] | None) -> list[LayerSummary]:
    """The variant pass's per-layer summaries with another pass's formats added to each linear."""
    if more is None:
        return layers
    return [replace(layer, linears={name: dict(info, formats={**info["formats"], **other.linears[name]["formats"]})
                                    for name, info in layer.linears.items()},
                    seconds={**layer.seconds, **other.seconds}) for layer, other in zip(layers, more)]


def search_checks(points: list[dict], higher_is_better: bool) -> list[dict]:
    """For several thresholds, the k of the binary search (paper) and of an exhaustive scan
    (the largest k whose every smaller k also passes) on the measured curve."""
    values = [p["value"] for p in points]
    n = len(values) - 1
    drops = (0.01, 0.02, 0.05, 0.1, 0.2) if higher_is_better else (0.5, 1, 2, 5, 10, 20, 50)

    def drop(k: int) -> float:
        return values[0] - values[k] if higher_is_better else values[k] - values[0]

    out = []
    for max_drop in drops:
        exhaustive = 0
        while exhaustive < n and drop(exhaustive + 1) <= max_drop:
            exhaustive += 1
        binary, steps = threshold_search(lambda k: values[k], n, max_drop, higher_is_better=higher_is_better)
        out.append({"max_drop": max_drop, "binary": binary, "exhaustive": exhaustive, "evaluations": len(steps)})
    return out


def _fmt(result: dict, value: float) -> str:
    return f"{value:.3f}" if result["higher_is_better"] else f"{value:.2f}"


def table(result: dict) -> str:
    fp = result["full_precision"]["value"]
    lines = [f"{result['model']}: full precision {result['metric']} {_fmt(result, fp)} on {result['eval_size']} "
             f"held-out {result['eval_unit']}", *[f"note: {n}" for n in result["notes"]], "",
             f"| configuration | true avg bits | nominal bits | total MB | {result['metric']} |", "|---|---|---|---|---|"]
    rows = list(result["uniform"].items())
    entropy = result["curves"].get("entropy")
    if entropy:
        rows += [(f"LUQ entropy order, k={p['k']}", p) for p in entropy["points"]
                 if p["k"] % 5 == 0 or p["k"] in (1, 2, 3) or len(entropy["points"]) < 12]
    for name, r in sorted(rows, key=lambda item: -item[1]["avg_bits"]):
        lines.append(f"| {name} | {r['avg_bits']:.3f} | {r['nominal_avg_bits']:.3f} | {r['total_bytes'] / 1e6:.1f} | "
                     f"{_fmt(result, r['value'])} |")
    if result.get("measured"):
        lines += ["", f"Measured allocation (menu: {', '.join(result['menu'])}), without the final pass", "",
                  f"| budget | total MB | true avg bits | {result['metric']} | predicted KL | uniform that fit and beat it |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {m['budget']} | {m['total_bytes'] / 1e6:.2f} | {m['avg_bits']:.3f} | {_fmt(result, m['value'])} | "
                  f"{m['predicted_cost']:.4f} | {', '.join(m['uniform_better']) or 'none'} |" for m in result["measured"]]
    if result.get("whole_model"):
        lines += ["", "Measured allocation over the whole model (embedding, head, vision tower in the budget too)", "",
                  f"| total MB | {result['metric']} | predicted KL | embedding / head | vision linears |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m['total_bytes'] / 1e6:.2f} | {_fmt(result, m['value'])} | {m['predicted_cost']:.4f} | "
                  f"{', '.join(m['outside'].values())} | "
                  f"{', '.join(f'{n} {f}' for f, n in m['vision_formats'].items()) or '-'} |"
                  for m in result["whole_model"]]
    orders = list(result["curves"])
    lines += ["", f"{result['metric']} by number of BiLLM layers k, per order", "",
              "| k | " + " | ".join(orders) + " |", "|---" * (len(orders) + 1) + "|"]
    by_k = {o: {p["k"]: p["value"] for p in result["curves"][o]["points"]} for o in orders}
    for k in sorted(set().union(*[set(v) for v in by_k.values()])):
        if all(k in by_k[o] for o in orders) or len(orders) == 1:
            lines.append(f"| {k} | " + " | ".join(_fmt(result, by_k[o][k]) for o in orders) + " |")
    if result["binary_vs_exhaustive"]:
        lines += ["", f"| max {result['metric']} drop | binary search k | exhaustive k | evaluations |",
                  "|---|---|---|---|"]
        lines += [f"| {c['max_drop']} | {c['binary']} | {c['exhaustive']} | {c['evaluations']} |"
                  for c in result["binary_vs_exhaustive"]]
    return "\n".join(lines)


def plot_frontier(result: dict, path: Path) -> None:
    """Metric vs true bits (left) and vs the paper's nominal bits (right)."""
    from luq.report import plt, save_figure  # the Agg backend, luq's figure style

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in zip(axes, ("avg_bits", "nominal_avg_bits"),
                              ("true bits (stored bytes)", "nominal bits (as the paper counts)")):
        entropy = result["curves"].get("entropy")
        if entropy:
            pts = entropy["points"]
            ax.plot([p[key] for p in pts], [p["value"] for p in pts], marker=".", label="LUQ (entropy order), k=0..")
        if result.get("measured"):
            pts = sorted(result["measured"], key=lambda m: m[key])
            ax.plot([p[key] for p in pts], [p["value"] for p in pts], marker="o", color="black",
                    label="measured allocation (luq default)")
        markers = iter("sD^v<>pP*XhH8d")
        for name, r in result["uniform"].items():
            ax.scatter([r[key]], [r["value"]], marker=next(markers), s=45, label=name, zorder=3)
        ax.axhline(result["full_precision"]["value"], color="gray", linestyle=":", label="full precision")
        ax.set(xlabel=f"average bits per decoder weight: {title}")
        if not result["higher_is_better"]:
            ax.set_yscale("log")
    axes[0].set(ylabel=result["metric"] + ("" if result["higher_is_better"] else " (log)"))
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{result['model']}: {result['metric']} vs bits")
    save_figure(fig, path)


def plot_bytes(result: dict, path: Path) -> None:
    """Metric vs the artifact's total bytes: the decoder-only and whole-model measured curves
    beside every uniform configuration (the question a user with X MB of device memory asks)."""
    from luq.report import plt, save_figure  # the Agg backend, luq's figure style

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, label, color in (("measured", "measured, decoder only", "black"),
                              ("whole_model", "measured, whole model (embedding, head, vision too)", "tab:red")):
        pts = sorted(result.get(key) or [], key=lambda m: m["total_bytes"])
        if pts:
            ax.plot([p["total_bytes"] / 1e6 for p in pts], [p["value"] for p in pts], marker="o", color=color,
                    label=label)
    markers = iter("sD^v<>pP*XhH8d")
    for name, r in result["uniform"].items():
        ax.scatter([r["total_bytes"] / 1e6], [r["value"]], marker=next(markers), s=45, label=name, zorder=3)
    ax.axhline(result["full_precision"]["value"], color="gray", linestyle=":", label="full precision")
    if not result["higher_is_better"]:
        ax.set_yscale("log")
    ax.set(xlabel="artifact size (MB, every stored byte)", ylabel=result["metric"],
           title=f"{result['model']}: {result['metric']} vs true bytes")
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def plot_orders(result: dict, path: Path) -> None:
    """Metric vs the number of BiLLM layers, one line per order (paper Fig. 6a)."""
    from luq.report import plt, save_figure  # the Agg backend, luq's figure style

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for order, curve in result["curves"].items():
        style = ":" if order.startswith("random") else "-"
        ax.plot([p["k"] for p in curve["points"]], [p["value"] for p in curve["points"]], style, marker=".",
                label=order)
    ax.axhline(result["full_precision"]["value"], color="gray", linestyle=":", label="full precision")
    if not result["higher_is_better"]:
        ax.set_yscale("log")
    ax.set(xlabel="layers at BiLLM (k)", ylabel=result["metric"], title=f"{result['model']}: layer orders")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
