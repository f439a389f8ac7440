"""The results tables of README.md and docs/*.md, rendered from the result files in bench/results/.

    python -m bench.docs            # rewrite every generated table in place (`make docs`)
    python -m bench.docs --check    # change nothing; exit 1 listing the tables that differ from their files

In the markdown a generated table sits between two marker comments:

    <!-- table: NAME source=bench/results/FILE.json -->
    | ... the table ... |
    <!-- /table -->

NAME picks one renderer below (`@table(NAME, *sources)`: a small function that reads its result files and
returns the markdown table); the opening marker is rewritten too, so it always names the files the table
comes from. Everything outside the markers is left as it is. No torch, no luq import: only the JSON files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench import gguf as gguf_bench

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "bench/results"

MARKER = re.compile(r"<!-- table: (?P<name>[\w.-]+)(?P<attrs>[^>]*?)\s*-->\n(?P<body>.*?)<!-- /table -->", re.S)

TABLES: dict[str, tuple[tuple[str, ...], Callable[..., str]]] = {}


def table(name: str, *sources: str):
    """Register the renderer of table NAME; it gets the parsed JSON of each source, in order."""
    def register(fn):
        TABLES[name] = (sources, fn)
        return fn
    return register


def doc_files(root: Path = ROOT) -> list[Path]:
    """The files whose tables are generated: README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ------------------------------------------------------------------------------------------- formatting

_SUP = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def md(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; align: one letter per column, l (text) or r (numbers)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mb(nbytes: float | None) -> str:
    return "" if nbytes is None else f"{nbytes / 1e6:.2f}"


def ppl(v: float) -> str:
    """A perplexity: 2 decimals below 1,000, whole numbers below 10^5, then m × 10^e."""
    if v < 1000:
        return f"{v:.2f}"
    if v < 1e5:
        return f"{v:,.0f}"
    e = len(str(int(v))) - 1
    return f"{v / 10 ** e:.1f} × 10{str(e).translate(_SUP)}"


def bits(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def acc(v: float) -> str:
    return f"{v:.3f}"


def bold(s: str, on: bool = True) -> str:
    return f"**{s}**" if on and s else s


def fmt_name(f: str) -> str:
    """gptq4-g128 -> GPTQ-4 g128 (other names as they are)."""
    m = re.fullmatch(r"gptq(\d)-g(\d+)", f)
    return f"GPTQ-{m[1]} g{m[2]}" if m else f


def fmt_range(formats: dict[str, int]) -> str:
    """{'gptq3-g128': 4, 'gptq6-g64': 2, ...} -> 'GPTQ-3 to GPTQ-6' (the bit widths used)."""
    widths = sorted({int(m[1]) for f in formats if (m := re.fullmatch(r"gptq(\d)-g\d+", f))})
    if not widths:
        return ", ".join(sorted(formats))
    return f"GPTQ-{widths[0]}" if len(widths) == 1 else f"GPTQ-{widths[0]} to GPTQ-{widths[-1]}"


def value(v: float, higher_is_better: bool) -> str:
    return acc(v) if higher_is_better else ppl(v)


# ------------------------------------------------------------------------------------------- README

# README's table is gguf-smollm2-offgrid-default (below, with docs/gguf.md's).


# ------------------------------------------------------------------------------------------- docs/results.md

def _budget_rows(b, keys):
    higher = b["metric"] != "perplexity"
    out = []
    for label, key, strong in keys:
        r = b["rows"][key]
        kl = "" if r["measured_cost"] is None else f"{r['measured_cost']:.4f}"
        out.append([bold(label, strong), mb(r["total_bytes"]), bits(r["avg_bits"]),
                    bold(value(r["value"], higher), strong), kl])
    return out


_DECODER_ONLY = [("uniform GPTQ-4 g128", "uniform GPTQ-4 g128", False),
                 ("measured at entropy-LUQ k=3's bytes", "measured (decoder only) at entropy-LUQ k=3's bytes", True),
                 ("entropy-LUQ k=3 (`--allocate entropy --n-low-layers 3`)", "entropy-LUQ k=3", False),
                 ("measured at GPTQ-3's bytes", "measured (decoder only) at GPTQ-3's bytes", True),
                 ("uniform GPTQ-3 g128", "uniform GPTQ-3 g128", False),
                 ("uniform GPTQ-2 g128", "uniform GPTQ-2 g128", False)]


@table("budget-smollm2", f"{RESULTS}/budget-smollm2.json")
def budget_smollm2(b):
    return md(["configuration", "total MB", "true avg bits", "perplexity", "KL from fp (nats/token)"],
              _budget_rows(b, _DECODER_ONLY), "lrrrr")


@table("budget-tiny-vlm", f"{RESULTS}/budget-tiny-vlm.json")
def budget_tiny_vlm(b):
    return md(["configuration", "total MB", "true avg bits", "VQA accuracy", "KL from fp (nats/token)"],
              _budget_rows(b, _DECODER_ONLY), "lrrrr")


def _outside(row) -> str:
    kinds = row.get("bytes_by_kind", {})
    if "embed" not in kinds:
        return "embedding" + (" and vision tower" if "vision" in kinds or row.get("_vlm") else "") + " fp16"
    e = kinds["embed"]
    text = f"embedding {fmt_name(next(iter(e['formats'])))}, {mb(e['bytes'])} MB"
    if "vision" in kinds:
        v = kinds["vision"]
        text += f"; vision {mb(v['bytes'])} MB ({fmt_range(v['formats'])})"
    return text


def _whole_rows(b, keys):
    higher = b["metric"] != "perplexity"
    vlm = b["model"] != "smollm2"
    out = []
    for label, key, strong in keys:
        r = dict(b["rows"][key], _vlm=vlm)
        kl = "" if r["measured_cost"] is None else f"{r['measured_cost']:.4f}"
        out.append([bold(label, strong), mb(r["total_bytes"]), bits(r["avg_bits"]),
                    bold(value(r["value"], higher), strong), kl, _outside(r)])
    return out


@table("budget-whole-smollm2", f"{RESULTS}/budget-smollm2.json")
def budget_whole_smollm2(b):
    keys = [("uniform GPTQ-4 g128", "uniform GPTQ-4 g128", False),
            ("measured, decoder only, at entropy-LUQ k=3's bytes", "measured (decoder only) at entropy-LUQ k=3's bytes", False),
            ("measured, whole model, at entropy-LUQ k=3's bytes", "measured (whole model) at entropy-LUQ k=3's bytes", True),
            ("uniform GPTQ-3 g128", "uniform GPTQ-3 g128", False),
            ("measured, decoder only, at GPTQ-3's bytes", "measured (decoder only) at GPTQ-3's bytes", False),
            ("measured, whole model, at GPTQ-3's bytes", "measured (whole model) at GPTQ-3's bytes", True),
            ("measured, whole model, at 75 MB", "measured (whole model) at 75 MB", True),
            ("uniform GPTQ-2 g128 (the menu's smallest decoder-only size)", "uniform GPTQ-2 g128", False)]
    return md(["configuration", "total MB", "true bits (quantized weights)", "perplexity", "KL from fp",
               "outside the decoder"], _whole_rows(b, keys), "lrrrrl")


@table("budget-whole-tiny-vlm", f"{RESULTS}/budget-tiny-vlm.json")
def budget_whole_tiny_vlm(b):
    keys = [("uniform GPTQ-4 g128", "uniform GPTQ-4 g128", False),
            ("measured, decoder only, at entropy-LUQ k=3's bytes", "measured (decoder only) at entropy-LUQ k=3's bytes", False),
            ("measured, whole model, at entropy-LUQ k=3's bytes", "measured (whole model) at entropy-LUQ k=3's bytes", True),
            ("uniform GPTQ-3 g128", "uniform GPTQ-3 g128", False),
            ("measured, decoder only, at GPTQ-3's bytes", "measured (decoder only) at GPTQ-3's bytes", False),
            ("measured, whole model, at GPTQ-3's bytes", "measured (whole model) at GPTQ-3's bytes", True),
            ("measured, whole model, at 75% of GPTQ-4's bytes", "measured (whole model) at 75% of GPTQ-4's bytes", True)]
    return md(["configuration", "total MB", "true bits (quantized weights)", "VQA accuracy", "KL from fp",
               "outside the decoder"], _whole_rows(b, keys), "lrrrrl")


def _decoder_only_points(f) -> list[tuple[str, dict]]:
    """Every decoder-only configuration of a frontier run: uniform, entropy-LUQ points, measured points."""
    pts = [(name, u) for name, u in f["uniform"].items()]
    for order, curve in f.get("curves", {}).items():
        pts += [(f"LUQ {order} k={p['k']}", p) for p in curve["points"] if 0 < p["k"] < 30]
    pts += [(f"measured decoder-only at {_measured_label(m['budget'])}", m) for m in f.get("measured", [])]
    return pts


def _best_fitting(f, nbytes: int) -> str:
    higher = f["higher_is_better"]
    fits = [(n, p) for n, p in _decoder_only_points(f) if p["total_bytes"] <= nbytes]
    if not fits:
        smallest = min(p["total_bytes"] for _, p in _decoder_only_points(f))
        return f"none (the smallest is {mb(smallest)} MB)"
    name, p = (max if higher else min)(fits, key=lambda np_: np_[1]["value"])
    return f"{name}: {value(p['value'], higher)}"


def _measured_label(budget: str) -> str:
    """'0/6 of GPTQ-2..GPTQ-4' -> "GPTQ-2's size", '6/6 ...' -> "GPTQ-4's size", '2/6 ...' -> '2/6'."""
    m = re.fullmatch(r"(\d+)/(\d+) of GPTQ-2..GPTQ-4", budget)
    if not m:
        return budget
    if m[1] == "0":
        return "GPTQ-2's size"
    return "GPTQ-4's size" if m[1] == m[2] else f"{m[1]}/{m[2]}"


def sig(x: float) -> str:
    """A time in ms: 2 decimals from 1, else 3."""
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _merged_measured(f) -> list[tuple[str, dict]]:
    """The measured points, one row per distinct plan (the budget that equals GPTQ-3's bytes is one row)."""
    out: list[tuple[str, dict]] = []
    for m in f["measured"]:
        label = _measured_label(m["budget"])
        if out and out[-1][1]["total_bytes"] == m["total_bytes"] and out[-1][1]["value"] == m["value"]:
            out[-1] = (f"{out[-1][0]} = {label}", out[-1][1])
        else:
            out.append((label, m))
    return out


@table("frontier-measured-smollm2", f"{RESULTS}/frontier-smollm2-measured.json")
def frontier_measured_smollm2(f):
    rows = []
    for label, m in _merged_measured(f):
        better = ", ".join(m["uniform_better"]) or "none"
        rows.append([label, mb(m["total_bytes"]), bits(m["avg_bits"]), ppl(m["value"]),
                     f"{m['predicted_cost']:.4f}", better, _best_fitting_uniform(f, m["total_bytes"])])
    return md(["budget", "total MB", "true avg bits", "perplexity", "predicted KL",
               "uniform that fits and beats it", "best uniform that fits"], rows, "lrrrrll")


def _best_fitting_uniform(f, nbytes: int) -> str:
    higher = f["higher_is_better"]
    fits = [(n, u) for n, u in f["uniform"].items() if u["total_bytes"] <= nbytes]
    if not fits:
        return "none"
    name, u = (max if higher else min)(fits, key=lambda nu: nu[1]["value"])
    return f"{name}: {value(u['value'], higher)}"


def _whole_frontier(f, vision: bool) -> str:
    higher = f["higher_is_better"]
    rows = []
    for w in f["whole_model"]:
        emb = fmt_name(next(iter(w["outside"].values())))
        row = [mb(w["budget_bytes"]), mb(w["total_bytes"]), value(w["value"], higher), emb]
        if vision:
            vf = w["vision_formats"]
            row.append(f"all {sum(vf.values())} at {fmt_name(next(iter(vf)))}" if len(vf) == 1 else fmt_range(vf))
        row.append(_best_fitting(f, w["total_bytes"]))
        rows.append(row)
    header = ["budget MB", "total MB", "perplexity" if not higher else "VQA accuracy", "embedding (tied head)"]
    header += ["vision tower + projector linears"] if vision else []
    header += ["best decoder-only configuration that fits"]
    return md(header, rows, "rrrl" + ("l" if vision else "") + "l")


@table("menu-cost", f"{RESULTS}/menu_cost-smollm2.json")
def menu_cost(m):
    rows = [[name, ", ".join(fmt_name(x) for x in menu["formats"]) if len(menu["formats"]) <= 3 else
             f"{len(menu['formats'])} formats", f"{menu['pass_s']:.0f}", f"{menu['vs_old']:.2f}"]
            for name, menu in m["menus"].items()]
    rows.append(["(the pass's own work: forwards, Hessians, entropy)", "", f"{m['shared_s']:.0f}", ""])
    return md(["menu", "formats", "variant pass s", "× the old pass"], rows, "llrr")


def _r(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _sensitivity_rows(s) -> list[list[str]]:
    """The rows of a bench.sensitivity run: held out, in sample, and the measurement against itself."""
    o, i = s["out_of_sample"], s["in_sample"] or {}
    same = s.get("heldout_vs_in_sample_group_order") or {}
    n_lin, n_fmt = len(s["linears"]), len(s["menu"])
    rows = [[f"Spearman ρ, all {o['pairs']} pairs ({n_lin} linears × {n_fmt} formats)", _r(o["spearman"]),
             _r(i.get("spearman")), _r(s["heldout_vs_in_sample_spearman"])],
            ["median predicted / measured", _r(o["median_ratio"]), _r(i.get("median_ratio")), ""],
            [f"ρ within one linear, over its {n_fmt} formats (mean over linears)", _r(o["within_linear_spearman_mean"]),
             _r(i.get("within_linear_spearman_mean")), ""]]
    for b, e in o["by_bits"].items():
        ie = i.get("by_bits", {}).get(b, {})
        rows.append([f"{b}-bit: ρ over its {e['pairs']} pairs (linears × groups)", _r(e["spearman"]),
                     _r(ie.get("spearman")), ""])
        if "group_order" in e:
            g, ig = e["group_order"], ie.get("group_order")
            groups = "/".join(f.rsplit("-", 1)[-1] for f in g["formats"])
            rows.append([f"{b}-bit: linears whose {groups} order comes out right; Kendall τ (mean)",
                         f"{g['same_order']}/{g['linears']}; {_r(g['kendall_tau_mean'])}",
                         "—" if not ig else f"{ig['same_order']}/{ig['linears']}; {_r(ig['kendall_tau_mean'])}",
                         f"{same[b]['same_order']}/{same[b]['linears']}" if b in same else ""])
            smallest = "<".join(sorted((f.rsplit("-", 1)[-1] for f in g["formats"]), key=lambda x: int(x[1:])))
            rows.append([f"{b}-bit: linears whose measured order is simply {smallest} (no estimate needed)",
                         f"{g['smaller_groups_cost_less']}/{g['linears']}",
                         "—" if not ig else f"{ig['smaller_groups_cost_less']}/{ig['linears']}", ""])
        fmts = [f for f in s["menu"] if f.startswith(f"gptq{b}-")]
        per = [o["by_format"][f]["spearman"] for f in fmts]
        iper = [i.get("by_format", {}).get(f, {}).get("spearman") for f in fmts]
        rows.append([f"{b}-bit: ρ across the {n_lin} linears in one format, "
                     f"{'/'.join(f.rsplit('-', 1)[-1] for f in fmts)}", " / ".join(map(_r, per)),
                     " / ".join(map(_r, iper)), ""])
    return rows


@table("sensitivity-out-of-sample", f"{RESULTS}/sensitivity-smollm2-offgrid.json", f"{RESULTS}/sensitivity-smollm2.json")
def sensitivity_out_of_sample(off, on):
    """The off-grid control held out, in sample and against itself; SmolLM2 (on its grid) held out."""
    w = off["windows"]
    header = ["predicted (from the sensitivity windows) against measured KL",
              f"off-grid control: held out ({len(w['slots']['heldout'])} validation windows)",
              f"off-grid: in sample (the {len(w['slots']['sensitivity'])} sensitivity windows)",
              "off-grid: measured held out against measured in sample", "SmolLM2 (on its grid): held out"]
    rows = []
    for a, b in zip(_sensitivity_rows(off), _sensitivity_rows(on), strict=True):
        assert a[0] == b[0], (a[0], b[0])   # the same linears, menu and windows
        rows.append([*a, b[1]])
    return md(header, rows, "lrrrr")


@table("sensitivity-plans", f"{RESULTS}/sensitivity-smollm2-offgrid.json", f"{RESULTS}/sensitivity-smollm2.json")
def sensitivity_plans(off, on):
    rows = []
    for q, o in zip(off["plans"], on["plans"], strict=True):
        rows.append([mb(q["total_bytes"]), bits(q["avg_bits"]), f"{q['predicted']:.4f}", f"{q['measured']:.4f}",
                     f"{q['predicted'] / q['measured']:.2f}",
                     "" if q["measured_in_sample"] is None else f"{q['measured_in_sample']:.4f}",
                     f"{o['predicted']:.4f}", f"{o['measured']:.4f}", f"{o['predicted'] / o['measured']:.2f}"])
    return md(["knapsack plan total MB", "true avg bits", "off-grid: predicted KL (sum)", "measured, held out",
               "predicted / measured", "measured, in sample", "SmolLM2: predicted KL (sum)", "measured, held out",
               "predicted / measured"], rows, "r" * 9)


def _spearman_with_index(xs: list[float]) -> float:
    """Spearman's rho of xs against 0..n-1 (no ties in real entropies)."""
    n = len(xs)
    rank = {i: r for r, i in enumerate(sorted(range(n), key=lambda i: xs[i]))}
    d2 = sum((rank[i] - i) ** 2 for i in range(n))
    return 1 - 6 * d2 / (n * (n * n - 1))


def _span(xs) -> str:
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.2f}–{max(xs):.2f}" if xs else "—"


def _kendall_distance(r1: list[int], r2: list[int]) -> float:
    """The share of layer pairs that two rankings (lowest entropy first) put in opposite orders."""
    p1, p2 = {l: i for i, l in enumerate(r1)}, {l: i for i, l in enumerate(r2)}
    pairs = [(a, b) for a in p1 for b in p1 if a < b]
    return sum((p1[a] - p1[b]) * (p2[a] - p2[b]) < 0 for a, b in pairs) / len(pairs)


def _spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho of two per-layer series (no ties in real entropies)."""
    rx = sorted(range(len(xs)), key=lambda i: xs[i])
    ry = sorted(range(len(ys)), key=lambda i: ys[i])
    return _spearman_with_index([ry.index(i) for i in rx])


def _entropy_col(e) -> list[str]:
    """One model's column of the entropy tables: tokens, K, its stability, the profile, text vs image."""
    chosen = e.get("kmeans_clusters", e.get("k"))   # "k": an entropy.json of an older luq
    tok = e["tokens"]
    tokens = (f"{tok['text']:,} text" if not tok["image"] else
              f"{tok['text']:,} text + {tok['image']:,} image ({tok['padding']:,} padding left out)")
    kendall = ", ".join(bold(f"{d:.2f} (K={k})", k == chosen) if k in (e["kendall"][0][0], chosen) else f"{d:.2f}"
                        for k, d in e["kendall"])
    image = e["image_entropy"]
    has_image = any(x is not None for x in image)
    higher = sum(i > t_ for t_, i in zip(e["text_entropy"], image) if i is not None)
    return [tokens, str(chosen), kendall, _span(e["entropy"]), f"{_spearman_with_index(e['entropy']):.2f}",
            ", ".join(map(str, e["ranking"][:10])) + ", …",
            _span(e["text_entropy"]) if has_image else "—", _span(image) if has_image else "—",
            bold(f"{higher} of {len(image)}") if has_image else "—"]


_ENTROPY_LABELS = ["tokens", "K picked by Kneedle on {8, …, 200}", "Kendall distance between the rankings at consecutive K",
                   "entropy per layer (nats)", "Spearman ρ of entropy vs layer index", "lowest-entropy layers first",
                   "text-token entropy per layer", "image-token entropy per layer",
                   "layers where image tokens have the higher entropy"]


def _against(a, b) -> list[str]:
    """How model b's entropy profile and ranking compare with model a's."""
    return [f"{_spearman(a['entropy'], b['entropy']):.2f}", f"{_kendall_distance(a['ranking'], b['ranking']):.2f}",
            f"{len(set(a['ranking'][:10]) & set(b['ranking'][:10]))} of 10"]


@table("entropy", f"{RESULTS}/entropy-smollm2/entropy.json", f"{RESULTS}/entropy-smollm2-offgrid/entropy.json",
       f"{RESULTS}/entropy-tiny-vlm/entropy.json")
def entropy_table(s, o, t):
    labels = _ENTROPY_LABELS + [
        "against SmolLM2's: Spearman ρ of the per-layer entropy", "against SmolLM2's: Kendall distance of the ranking",
        "against SmolLM2's: first 10 layers in common"]
    a, b, c = _entropy_col(s), _entropy_col(o), _entropy_col(t)
    b += _against(s, o)
    a += ["—"] * 3
    c += ["—"] * 3
    return md(["", f"SmolLM2-135M (text, α = {s['calibration']['alpha']:g})",
               f"off-grid control (text, α = {o['calibration']['alpha']:g})",
               f"tiny-vlm (α = {t['calibration']['alpha']:g})"],
              [[label, x, y, z] for label, x, y, z in zip(labels, a, b, c)])


@table("entropy-tiny-vlm-offgrid", f"{RESULTS}/entropy-tiny-vlm/entropy.json",
       f"{RESULTS}/entropy-tiny-vlm-offgrid/entropy.json")
def entropy_tiny_vlm_offgrid(t, o):
    """tiny-vlm and its off-grid control side by side, the control's profile and ranking against tiny-vlm's."""
    labels = _ENTROPY_LABELS + [
        "against tiny-vlm's: Spearman ρ of the per-layer entropy", "against tiny-vlm's: Kendall distance of the ranking",
        "against tiny-vlm's: first 10 layers in common"]
    a, b = _entropy_col(t), _entropy_col(o)
    a += ["—"] * 3
    b += _against(t, o)
    k = str(t.get("kmeans_clusters", t.get("k")))   # both at tiny-vlm's K: the same number of clusters
    ranks = [sorted(range(len(e["entropy_by_k"][k])), key=lambda i: e["entropy_by_k"][k][i]) for e in (t, o)]
    same_k = [{"entropy": e["entropy_by_k"][k], "ranking": r} for e, r in zip((t, o), ranks)]
    labels += [f"at K = {k}: entropy per layer (nats)", f"at K = {k}: Spearman ρ of entropy vs layer index",
               f"at K = {k}: lowest-entropy layers first",
               f"at K = {k}, against tiny-vlm's: Spearman ρ of the per-layer entropy",
               f"at K = {k}, against tiny-vlm's: Kendall distance of the ranking",
               f"at K = {k}, against tiny-vlm's: first 10 layers in common"]
    for col, e in zip((a, b), same_k):
        col += [_span(e["entropy"]), f"{_spearman_with_index(e['entropy']):.2f}", ", ".join(map(str, e["ranking"][:10])) + ", …"]
    a += ["—"] * 3
    b += _against(*same_k)
    return md(["", f"tiny-vlm (α = {t['calibration']['alpha']:g})",
               f"tiny-vlm-offgrid (α = {o['calibration']['alpha']:g})"],
              [[label, x, y] for label, x, y in zip(labels, a, b)])


_ORDERS = ["entropy", "reverse-entropy", "depth", "random0", "random1", "random2"]


def _orders(f) -> str:
    higher = f["higher_is_better"]
    orders = [o for o in _ORDERS if o in f["curves"]]   # a run with --orders has only those
    by = {o: {p["k"]: p["value"] for p in f["curves"][o]["points"]} for o in orders}
    ks = sorted(set(by["depth"]) | set(by.get("reverse-entropy", {})))
    return md(["k", *orders], [[k, *(value(by[o][k], higher) if k in by[o] else "" for o in orders)] for k in ks],
              "r" * (1 + len(orders)))


_UNIFORM_LABEL = {"GPTQ-4 g128 (luq)": "GPTQ-4 g128 (luq) = LUQ k=0", "BiLLM (every layer)": "BiLLM on every layer = LUQ k=30",
                  "GPTQ-2 g128 (luq)": "GPTQ-2 g128 (luq) = measured at GPTQ-2's bytes"}


def _frontier_all(f) -> str:
    higher = f["higher_is_better"]
    entries = []   # (avg_bits, order, label, point, strong)
    for name, u in f["uniform"].items():
        entries.append((u["avg_bits"], 0, _UNIFORM_LABEL.get(name, name), u, False))
    for p in f["curves"]["entropy"]["points"]:
        if 0 < p["k"] < 30:
            entries.append((p["avg_bits"], 2, f"LUQ entropy order, k={p['k']}", p, False))
    for label, m in _merged_measured(f):
        if m["budget"].startswith("0/6"):
            continue   # it is uniform GPTQ-2
        strong = "GPTQ" in label or "entropy" in label
        text = {"GPTQ-4's size": "measured allocation at GPTQ-4's bytes", "3/6 = GPTQ-3 g128's bytes": "measured at GPTQ-3's bytes",
                "entropy-LUQ k=3's bytes": "measured at entropy-LUQ k=3's bytes"}.get(label, f"measured, {label}")
        entries.append((m["avg_bits"], 1, text, m, strong))
    entries.sort(key=lambda e: (-e[0], e[1]))
    rows = [[bold(label, strong), bits(p["avg_bits"]), "" if order == 1 else f"{p['nominal_avg_bits']:.3f}",
             f"{p['total_bytes'] / 1e6:.1f}", bold(value(p["value"], higher), strong)]
            for _, order, label, p, strong in entries]
    return md(["configuration", "true avg bits", "nominal bits", "total MB",
               "VQA accuracy" if higher else "perplexity"], rows, "lrrrr")


# one renderer, a table per run: orders per k (section 2), every configuration by true bits (section 3), the
# whole-model allocation by bytes (sections 0b and 3)
for _run in ("smollm2", "tiny-vlm", "smollm2-offgrid", "tiny-vlm-offgrid"):
    table(f"orders-{_run}", f"{RESULTS}/frontier-{_run}.json")(_orders)
for _run, _file in (("smollm2", "smollm2-all"), ("tiny-vlm", "tiny-vlm"), ("smollm2-offgrid", "smollm2-offgrid"),
                    ("tiny-vlm-offgrid", "tiny-vlm-offgrid")):
    table(f"frontier-all-{_run}", f"{RESULTS}/frontier-{_file}.json")(_frontier_all)
for _name, _file, _vision in (("frontier-whole-smollm2", "smollm2-whole", False),
                              ("frontier-whole-tiny-vlm", "tiny-vlm-whole", True),
                              ("frontier-all-whole-tiny-vlm", "tiny-vlm", True),
                              ("frontier-all-whole-smollm2-offgrid", "smollm2-offgrid", False),
                              ("frontier-all-whole-tiny-vlm-offgrid", "tiny-vlm-offgrid", True)):
    table(_name, f"{RESULTS}/frontier-{_file}.json")(partial(_whole_frontier, vision=_vision))


@table("frontier-peers-smollm2-vs-offgrid", f"{RESULTS}/frontier-smollm2-all.json",
       f"{RESULTS}/frontier-smollm2-offgrid.json")
def frontier_peers_smollm2_vs_offgrid(on, off):
    """Every uniform configuration and the measured allocation at GPTQ-3's and GPTQ-4's bytes, on SmolLM2 (on its
    grid) and on the off-grid control: the same settings, decoder only, no final pass."""
    fp_on, fp_off = on["full_precision"]["value"], off["full_precision"]["value"]
    rows = [["full precision", "", ppl(fp_on), "1.00", ppl(fp_off), "1.00"]]
    pts = [(name, on["uniform"][name], off["uniform"][name]) for name in on["uniform"] if name in off["uniform"]]
    for budget, label in (("6/6 of GPTQ-2..GPTQ-4", "measured allocation at GPTQ-4's bytes"),
                          ("GPTQ-3 g128's bytes", "measured at GPTQ-3's bytes")):
        pts.append((label, next(m for m in on["measured"] if m["budget"] == budget),
                    next(m for m in off["measured"] if m["budget"] == budget)))
    for name, a, b in sorted(pts, key=lambda x: -x[2]["avg_bits"]):
        strong = name.startswith("measured")
        rows.append([bold(name, strong), bits(b["avg_bits"]), ppl(a["value"]), ppl(a["value"] / fp_on),
                     bold(ppl(b["value"]), strong), ppl(b["value"] / fp_off)])
    return md(["configuration", "true avg bits", "SmolLM2 (on its grid): perplexity", "× its full precision",
               "off-grid control: perplexity", "× its full precision"], rows, "lrrrrr")


@table("calibration-mix", f"{RESULTS}/calibration_mix.json")
def calibration_mix(c):
    kinds = list(c["rows"][0]["vqa"]["by_kind"])
    rows = []
    for r in c["rows"]:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
        frac = "-" if r["alpha"] is None else f"{r['multimodal_fraction']:.2f}"
        low = ", ".join(map(str, r.get("low_layers", r.get("low_bit_layers")) or []))   # older: low_bit_layers
        rows.append([alpha, r["model"], frac, acc(r["vqa"]["value"]),
                     *(f"{r['vqa']['by_kind'][k]:.2f}" for k in kinds), f"{r['perplexity']:.2f}", f"[{low}]" if low else ""])
    return md(["α", "model", "multimodal token fraction", "VQA acc", *kinds, "perplexity", "BiLLM layers"], rows,
              "llrr" + "r" * len(kinds) + "rl")


_COST_TOOLS = {"luq": "luq GPTQ-4 g64 (sequential)", "llmcompressor": "llmcompressor `oneshot` GPTQ-4 g64",
               "luq-e2e": "`luq.quantize`, k = 0, g64, end to end"}


@table("cost", f"{RESULTS}/cost.json")
def cost(c):
    rows = []
    for key, w in c["workers"].items():
        first = True
        for r in w["rows"]:
            if r["stage"] == "import":
                continue
            rss = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
            rows.append([_COST_TOOLS.get(key, key) if first else "", r["stage"], f"{r['seconds']:.1f}", rss])
            first = False
            if r.get("solver_s") is not None:
                rows.append(["", "↳ of which the solves (and packing)", f"{r['solver_s']:.1f}", ""])
        rows.append(["", f"**total, with import** (artifact {w['artifact_mb']:.1f} MB)", f"**{w['total_s']:.1f}**",
                     f"**{w['peak_rss_mb']:.0f}**"])
    return md(["tool", "stage", "seconds", "peak RSS MB"], rows, "llrr")


# ------------------------------------------------------------------------------------------- docs/performance.md

_VARIANT = {"luq gptq4-g128": "luq gptq4-g128", "luq gptq3-g128": "luq gptq3-g128",
            "luq mix-10-billm": "luq 10 BiLLM + 20 GPTQ-4 layers",
            "luq mix-10-k5g64r": "luq 10 compact BiLLM (billm-k5g64r) + 20 GPTQ-4 layers"}


@table("inference", f"{RESULTS}/inference-smollm2.json", f"{RESULTS}/inference-tiny-vlm.json")
def inference(*runs):
    rows = []
    for run in runs:
        for r in run["rows"]:
            model = {"smollm2": "SmolLM2", "tiny-vlm": "tiny-vlm, image + question"}.get(r["model"], r["model"])
            strong = r["variant"].startswith("luq") and r["model"] == "smollm2" and "gptq3" not in r["variant"]
            rows.append([f"{model} ({r['prompt_tokens']} tok)", _VARIANT.get(r["variant"], r["variant"]),
                         f"{r['prefill_tok_s']:.0f}", f"{r['prefill_x']:.2f}", f"{r['decode_tok_s']:.1f}",
                         bold(f"{r['decode_x']:.2f}", strong), f"{r['prefill_cpu_x']:.2f}", f"{r['decode_cpu_x']:.2f}",
                         f"{r['resident_bytes'] / 1e6:.1f}",
                         "" if r["stored_bytes"] is None else f"{r['stored_bytes'] / 1e6:.1f}",
                         "" if not r["transient_bytes"] else f"{r['transient_bytes'] / 1e6:.1f}"])
    return md(["model (prompt)", "variant", "prefill tok/s", "x", "decode tok/s", "x", "x by CPU: prefill", "decode",
               "resident MB", "stored MB", "transient MB"], rows, "llrrrrrrrrr")


@table("inference-avx2", f"{RESULTS}/inference-avx2.json")
def inference_avx2(run):
    """The same bench on an AVX2-only CPU (torch capability AVX2): torch's int4 op gives way to luq's GEMV there."""
    return inference(run)


@table("inference-avx2-layer", f"{RESULTS}/inference-avx2.json")
def inference_avx2_layer(run):
    return inference_layer(run)


@table("inference-layer", f"{RESULTS}/inference-smollm2.json")
def inference_layer(run):
    s = run["synthetic_layer"]
    rows = [["one token, ms", f"{s['float32_ms']:.1f}", f"{s['gptq4_ms']:.1f}", bold(f"{s['ratio']:.2f}"),
             f"{s['cpu_ratio']:.2f}"],
            ["128-token prompt, ms", f"{s['prompt_float32_ms']:.0f}", f"{s['prompt_gptq4_ms']:.0f}",
             f"{s['prompt_ratio']:.2f}", f"{s['prompt_cpu_ratio']:.2f}"],
            ["resident MB", f"{s['float32_bytes'] / 1e6:.0f}", f"{s['gptq4_bytes'] / 1e6:.0f}", "", ""],
            ["transient tile MB", "", f"{s['gptq4_transient_bytes'] / 1e6:.1f}", "", ""]]
    return md([f"one decoder layer, width {s['width']}, MLP {s['intermediate']}", "float32", "GPTQ-4 g128",
               "ratio", "ratio by CPU time"], rows, "lrrrr")


@table("gptq-clip", f"{RESULTS}/gptq-clip.json")
def gptq_clip(run):
    rows = [[f"GPTQ-{r['bits']} g{r['group_size']}", bold(f"{r['error_ratio_mean']:.3f}"),
             f"{r['error_ratio_min']:.3f}–{r['error_ratio_max']:.3f}", f"{100 * r['rows_clipped']:.0f}%",
             f"{r['time_ratio_median']:.2f}"] for r in run["rows"]]
    return md(["grid", "output error / min-max's (mean of 21)", "per linear", "rows on the clipped grid",
               "solving time / min-max's"], rows, "lrrrr")


def budget_like_for_like(b):
    """Uniform whole-model GPTQ (embedding and head quantized too) and the measured allocation at their bytes."""
    rows = []
    for name, r in b["rows"].items():
        outside = "; ".join(f"{kind} {info['bytes'] / 1e6:.1f} MB ({', '.join(fmt_name(f) for f in sorted(info['formats']))})"
                            for kind, info in r["bytes_by_kind"].items() if kind != "decoder")
        luq_row = name.startswith("measured")
        rows.append([bold(name, luq_row), mb(r["total_bytes"]), bits(r["avg_bits"]), bold(ppl(r["value"]), luq_row),
                     "" if r.get("measured_cost") is None else f"{r['measured_cost']:.4f}", outside])
    checks = [[k, f"{v:.3f}"] for k, v in b["checks"].items()]
    return (md(["model", "total MB", "true avg bits", "perplexity", "KL from fp", "embedding / head"], rows, "lrrrrl")
            + "\n" + md(["ratio", "value"], checks, "lr"))


for _model in ("smollm2-offgrid", "smollm2"):   # bench.budget --set whole
    table(f"like-for-like-{_model}", f"{RESULTS}/budget-whole-{_model}.json")(budget_like_for_like)


def budget_clip(minmax, clipped):
    """The like-for-like rows on min-max grids (bench.budget --set whole) beside the same rows on clipped grids
    (--menu clip): the same bytes, GPTQ's grids fitted two ways."""
    label = " (clipped grids)"
    rows = []
    for name, c in clipped["rows"].items():
        m = minmax["rows"][name.removesuffix(label)]
        luq_row = name.startswith("measured")
        rows.append([bold(name.removesuffix(label), luq_row), mb(c["total_bytes"]), ppl(m["value"]),
                     bold(ppl(c["value"]), luq_row), f"{c['value'] / m['value']:.3f}",
                     f"{m['measured_cost']:.4f}", f"{c['measured_cost']:.4f}"])
    r = clipped["rows"]
    at75 = r[f"measured at 75% of whole-model GPTQ-4's bytes{label}"]["value"]
    at3 = r[f"measured at whole-model GPTQ-3's bytes{label}"]["value"]
    checks = [["clipped, at 75% of GPTQ-4's bytes / uniform GPTQ-4 on min-max grids",
               f"{at75 / minmax['rows']['uniform whole-model GPTQ-4 g128']['value']:.3f}"],
              ["clipped, at 75% of GPTQ-4's bytes / uniform GPTQ-4 on clipped grids",
               f"{at75 / r[f'uniform whole-model GPTQ-4 g128{label}']['value']:.3f}"],
              ["clipped, at GPTQ-3's bytes / uniform GPTQ-3 on min-max grids",
               f"{at3 / minmax['rows']['uniform whole-model GPTQ-3 g128']['value']:.3f}"],
              ["clipped, at GPTQ-3's bytes / uniform GPTQ-3 on clipped grids",
               f"{at3 / r[f'uniform whole-model GPTQ-3 g128{label}']['value']:.3f}"]]
    return (md(["model", "total MB", "perplexity, min-max grids", "perplexity, clipped grids", "clipped / min-max",
                "KL, min-max", "KL, clipped"], rows, "lrrrrrr") + "\n" + md(["ratio", "value"], checks, "lr"))


for _model in ("smollm2-offgrid", "smollm2"):   # bench.budget --set whole --menu clip
    table(f"like-for-like-clip-{_model}", f"{RESULTS}/budget-whole-{_model}.json",
          f"{RESULTS}/budget-whole-{_model}-clip.json")(budget_clip)


def tuned(run):
    """bench.tune: each like-for-like row before and after `luq tune` (the same bytes), on the same held-out windows."""
    rows = []
    for name, r in run["rows"].items():
        luq_row = name.startswith("measured")
        rows.append([bold(name.removesuffix(" (clipped grids)"), luq_row), mb(r["total_bytes"]), ppl(r["value_before"]),
                     bold(ppl(r["value"]), luq_row), f"{r['ratio']:.3f}",
                     f"{r['kl_first_steps']:.3f} → {r['kl_last_steps']:.3f}", f"{r['tune_seconds'] / 60:.0f}"])
    checks = [[k, f"{v:.3f}"] for k, v in run["checks"].items()]
    return (md(["model", "total MB", "perplexity", f"perplexity after {run['tune']['steps']} tuning steps",
                "tuned / not", "KL on the tuning windows, first → last steps", "tuning minutes"], rows, "lrrrrrr")
            + ("\n" + md(["ratio", "value"], checks, "lr") if checks else ""))


table("tuned-smollm2-offgrid-clip", f"{RESULTS}/tune-smollm2-offgrid-clip.json")(tuned)
# four times the text and twice the steps, the rates decayed (cosine), on the two rows of the 75% target
table("tuned-smollm2-offgrid-clip-s100-w512-cosine",
      f"{RESULTS}/tune-smollm2-offgrid-clip-s100-w512-cosine.json")(tuned)
# twice that again: 200 steps on 1024 windows, the 75% row alone
table("tuned-smollm2-offgrid-clip-s200-w1024-cosine",
      f"{RESULTS}/tune-smollm2-offgrid-clip-s200-w1024-cosine.json")(tuned)


def _types(types: dict[str, int]) -> str:
    """{'Q4_K': 16, 'Q5_0': 166, 'F32': 61} -> 'Q5_0 166, Q4_K 16' (the float vectors left out)."""
    return ", ".join(f"{t} {n}" for t, n in sorted(types.items(), key=lambda x: -x[1]) if t not in ("F32",))


def _gguf_name(r) -> str:
    if r["tool"] == "luq":
        held = {"auto": "", "file": ", its file's speed", "none": ", --speed-of none"}[gguf_bench.speed_of(r)]
        tuned = f", luq tune {r['tune_steps']} steps" if r.get("tune_steps") else ""
        return f"luq at {gguf_bench.preset_of(r)}{held}{tuned}"
    if r["tool"] == "auto-round":   # autoround-Q4_K_M-i50
        preset = r["name"].removeprefix("autoround-").rsplit("-i", 1)[0]
        how = f"{r['iters']} iters" if r["iters"] else "no tuning, imatrix RTN"
        return f"AutoRound {preset} ({how}, {r['nsamples']} x {r['seqlen']} tokens)"
    return r["name"]


def gguf_rows(g):
    """Every file of a bench.gguf run: llama.cpp's presets, luq's GGUFs (and AutoRound's), by size."""
    rows = []
    for r in sorted((r for r in g["rows"] if "error" not in r), key=lambda r: -r["tensor_bytes"]):
        speed = [f"{r['prefill_tps']:.0f}", f"{r['decode_tps']:.1f}"] if "decode_tps" in r else ["", ""]
        name = _gguf_name(r)
        rows.append([bold(name, r["tool"] == "luq"), mb(r["tensor_bytes"]), mb(r["file_bytes"]),
                     f"{r['kl_divergence']:.4f}", ppl(r["perplexity"]), *speed, _types(r["types"])])
    return md(["file", "tensor MB", "file MB", "mean KL", "perplexity", "prefill tok/s", "decode tok/s",
               "tensor types"], rows, "lrrrrrrl")


def _preset_held_to(r) -> str | None:
    """The preset whose speed a `--speed-of auto` row was held to ("llama.cpp's Q3_K_M (91.7 MB, ...)" -> Q3_K_M),
    or None below the smallest."""
    held = re.match(r"llama\.cpp's (\S+)", r.get("speed_held_to") or "")
    return held.group(1) if held else None


def _held_to(r) -> str:
    preset = _preset_held_to(r)
    margin = f" + {r['speed_margin']:.1%}" if r.get("speed_margin") else ""
    return f"bytes, speed of {preset}{margin}" if preset else "bytes (no preset this small)"


def gguf_pairs(g):
    """luq at each preset's tensor bytes against that preset (a size in MB against Q2_K): sizes, KL divergence
    and its ratio, decode tokens/s over the preset's."""
    by_name = {r["name"]: r for r in g["rows"] if r["tool"] == "llama.cpp" and "error" not in r}
    smallest = by_name.get("Q2_K") or min(by_name.values(), key=lambda r: r["tensor_bytes"])  # its smallest K preset
    rows = []
    for r in (r for r in g["rows"] if r["tool"] == "luq"):
        target = gguf_bench.preset_of(r)
        peer = by_name.get(target, smallest)
        how = {"auto": _held_to(r), "file": "bytes, that file's speed",
               "none": "bytes"}[gguf_bench.speed_of(r)]
        how += f", then luq tune {r['tune_steps']} steps" if r.get("tune_steps") else ""
        if "error" in r:
            rows.append([target, how, mb(peer["tensor_bytes"]), f"{peer['kl_divergence']:.4f}", "", "", "", "",
                         r["error"]])
            continue
        ratio = r["kl_divergence"] / peer["kl_divergence"]
        if "decode_ratio" in r:   # the median of rounds of A B B A, and their range
            low, high = r["decode_ratio_range"]
            decode = f"{r['decode_ratio']:.2f} ({low:.2f}–{high:.2f})"
        else:
            decode = f"{r['decode_tps'] / peer['decode_tps']:.2f}" if "decode_tps" in r and "decode_tps" in peer else ""
        rows.append([target if target in by_name else f"{target} (vs {peer['name']})", how, mb(peer["tensor_bytes"]),
                     f"{peer['kl_divergence']:.4f}", mb(r["tensor_bytes"]), f"{r['kl_divergence']:.4f}",
                     bold(f"{ratio:.2f}", ratio <= 0.7), decode, ""])
    return md(["size of", "luq matches its", "llama.cpp tensor MB", "llama.cpp KL", "luq tensor MB", "luq KL",
               "KL ratio", "decode ratio", "note"], rows, "llrrrrrrl")


for _model in ("smollm2-offgrid", "smollm2"):   # every file of a bench.gguf run, and luq beside each preset
    table(f"gguf-{_model}", f"{RESULTS}/gguf-{_model}.json")(gguf_rows)
    table(f"gguf-{_model}-pairs", f"{RESULTS}/gguf-{_model}.json")(gguf_pairs)
table("gguf-smollm2-offgrid-autoround", f"{RESULTS}/gguf-smollm2-offgrid-autoround.json")(gguf_rows)   # + AutoRound
table("gguf-smollm2-offgrid-tuned-pairs", f"{RESULTS}/gguf-smollm2-offgrid-tuned.json")(gguf_pairs)   # + luq tune
for _model in ("smollm2-offgrid", "smollm2"):   # the default command, held faster than the preset by a margin
    table(f"gguf-{_model}-margin-pairs", f"{RESULTS}/gguf-{_model}-margin.json")(gguf_pairs)


def _margin_free(r) -> bool:
    """A luq row no speed margin changes: held to size alone, or below every preset (no speed to hold to)."""
    held = gguf_bench.speed_of(r)
    return held == "none" or (held == "auto" and _preset_held_to(r) is None)


@table("gguf-smollm2-offgrid-default", f"{RESULTS}/gguf-smollm2-offgrid-margin.json",
       f"{RESULTS}/gguf-smollm2-offgrid.json")
def gguf_default_pairs(margin, main):
    """README's table: the default command's rows (the margin run, held to each preset's speed with the margin),
    then the main run's rows that no margin changes (below every preset; held to size alone)."""
    presets = {r["name"]: r["kl_divergence"] for r in margin["rows"] if r["tool"] == "llama.cpp" and "error" not in r}
    for r in main["rows"]:   # the main run's rows are paired with the margin run's presets: the same files
        if r["tool"] == "llama.cpp" and r["name"] in presets and r.get("kl_divergence") != presets[r["name"]]:
            raise ValueError(f"{r['name']} scores differently in the two runs: re-run both")
    rows = [r for r in margin["rows"] if r["tool"] == "llama.cpp" or not _margin_free(r)]
    rows += [r for r in main["rows"] if r["tool"] == "luq" and _margin_free(r)]
    return gguf_pairs({"rows": rows})


def _frontier_name(r) -> str:
    """A row of bench.gguf_frontier by what it is: a llama.cpp preset, a luq or AutoRound GGUF, a luq artifact."""
    if r["tool"] == "auto-round":   # autoround-Q4_K_M-i20
        preset, _, iters = r["name"].removeprefix("autoround-").rpartition("-i")
        return f"AutoRound {preset} ({iters} iters)" if iters != "0" else f"AutoRound {preset} (no tuning)"
    if r["tool"] == "llama.cpp":
        return f"llama.cpp {r['name']} (imatrix)"
    if r["tool"] == "luq":
        return _gguf_name(r) + " (GGUF)"
    return r["name"] + " (torch formats)"


def gguf_frontier(g):
    """bench.gguf_frontier: every tool's files de-quantized and scored on one held-out text, by size."""
    fp = g["full_precision"]
    rows = [["full precision", "", "", ppl(fp["perplexity"]), "0", ""]]
    for r in sorted(g["rows"], key=lambda r: -r["tensor_bytes"]):
        luq_row = r["tool"] in ("luq", "luq (torch)")
        kl = "" if r.get("llama_kl") is None else f"{r['llama_kl']:.4f}"
        rows.append([bold(_frontier_name(r), luq_row), r["tool"], mb(r["tensor_bytes"]), bold(ppl(r["perplexity"]), luq_row),
                     f"{r['kl']:.4f}", kl])
    return md(["model", "tool", "tensor MB", "perplexity", "mean KL", "llama.cpp's KL (its text)"], rows, "llrrrr")


for _model in ("smollm2-offgrid", "smollm2"):
    table(f"gguf-frontier-{_model}", f"{RESULTS}/gguf-frontier-{_model}.json")(gguf_frontier)


@table("ggml-speed", f"{RESULTS}/ggml-speed-smollm2-offgrid.json")
def ggml_speed(g):
    """bench.ggml_speed: nanoseconds per weight of each ggml type in llama.cpp's decode, and how well the
    fitted table predicts the files it was not fitted on."""
    ns = g["ns_per_weight"]
    rows = [[t.upper(), f"{v:.4f}", f"{v / ns['q4_0']:.2f}"] for t, v in sorted(ns.items(), key=lambda kv: kv[1])]
    checks = [r for r in g["rows"] if not r["fitted_on"] and r["predicted_tps"] is not None]
    errors = sorted(abs(r["decode_tps"] / r["predicted_tps"] - 1) for r in checks)
    return (md(["type", "ns per weight", "vs Q4_0"], rows, "lrr") + "\n\n"
            + f"Checked on {len(checks)} files it was not fitted on (llama.cpp's presets, luq's and AutoRound's "
              f"files): median error {100 * errors[len(errors) // 2]:.1f}%, largest {100 * errors[-1]:.1f}%.")


@table("kernels-binary", f"{RESULTS}/kernels-binary.json")
def kernels_binary(k):
    rows = []
    for r in k["rows"]:
        planes = r["planes_lookup_ms"][0] if r["planes_lookup_ms"] else None
        one = " / ".join([sig(r["lookup_ms"][0]), "–" if planes is None else sig(planes), sig(r["int4_ms"][0]),
                          sig(r["fp32_ms"][0])])
        held = f"{r['module_bits_per_weight']:.2f}"
        rows.append([r["format"], f"{r['rows']}x{r['cols']}", f"{r['stored_bits_per_weight']:.2f}",
                     bold(held, r["rows"] == 4096),
                     "" if r["planes_module_bits_per_weight"] is None else f"{r['planes_module_bits_per_weight']:.2f}",
                     f"{r['int4_bits_per_weight']:.1f}", one, r["crossover"]])
    return md(["format", "shape", "stored", "the QuantLinear holds", "on the planes (LUQ_KERNEL=binary)",
               "int4 terms (LUQ_KERNEL=int4)", "1 token: lookups / planes / int4 terms / float32, ms",
               "lookups -> tile from (tokens)"], rows, "llrrrrlr")


@table("kernels-threads", f"{RESULTS}/kernels-threads.json")
def kernels_threads(k):
    rows = [[f"{r['rows']}x{r['cols']}", f"{r['rows'] * r['cols'] / 2 ** 20:.2f} M", f"{r['threads_us']:.0f}",
             f"{r['one_thread_us']:.0f}", "one" if r["one_thread_us"] < r["threads_us"] else str(k["threads"])]
            for r in k["rows"]]
    return md(["GPTQ-4 shape", "entries (2^20)", f"{k['threads']} threads, us", "1 thread, us", "faster"], rows,
              "lrrrl")


@table("kernels-crossover", f"{RESULTS}/kernels.json")
def kernels_crossover(k):
    rows = [[r["format"], f"{r['rows']}x{r['cols']}", sig(r["int4_ms"][0]), sig(r["fp32_ms"][0]),
             r["crossover"] if r["crossover"] is not None else "never"] for r in k["rows"]]
    return md(["format", "shape", "int4 kernel, 1 token, ms", "float32 F.linear, 1 token, ms",
               "dense path faster from (tokens)"], rows, "llrrr")


@table("memory-quantize", f"{RESULTS}/memory.json")
def memory_quantize(m):
    rows = []
    for mode, q in m["quantize"].items():
        layers = m["model"]["layers"]
        rows.append([f"{'streamed' if mode == 'stream' else mode}", bold(f"{q['peak_gb']:.2f}"), f"{q['wall_s']:.0f}",
                     f"{q['seconds']['layer_pass']:.0f} ({q['seconds']['layer_pass'] / layers:.0f} per layer)",
                     f"{q['seconds']['final_pass']:.0f} ({q['seconds']['final_pass'] / layers:.0f} per layer)",
                     f"{q['total_bytes'] / 1e9:.3f}"])
    return md(["run", "peak resident GB (whole run)", "wall s", "variant pass s", "final pass s", "artifact GB"], rows,
              "lrrrrr")


@table("memory-load", f"{RESULTS}/memory.json")
def memory_load(m):
    rows = []
    for name, r in m["load"].items():
        loader = "`from_pretrained`" if name.startswith("from_pretrained") else "`luq.load`"
        dtype = name.split()[-1]
        rows.append([loader, dtype + (" (as stored)" if dtype == "float16" else ""),
                     bold(f"{r['ratio_over_baseline']:.2f}", dtype == "float16")])
    rows.sort(key=lambda r: (r[1] != "float16 (as stored)", r[0] != "`luq.load`"))
    return md(["loader", "unquantized tensors at", "peak / artifact bytes"], rows, "llr")


@table("cuda-check", f"{RESULTS}/cuda_check-4096.json", f"{RESULTS}/cuda_check-576.json")
def cuda_check(*runs):
    rows = []
    for run in runs:
        for r in run["results"]:
            ms = r["ms"]["1"]
            err = max(r["errors"].values())
            rows.append([r["format"], f"{r['size']}x{r['size']}", r["kernel"], r["terms"], f"{err:.1e}",
                         f"{ms['int4 op']:.3f}", f"{ms['F.linear bf16']:.3f}",
                         r["crossover"] if r["crossover"] is not None else "not up to 2048"])
    return md(["format", "shape", "kernel", "int4 terms", "largest relative error", "1 token, int4 op, ms",
               "1 token, bfloat16 F.linear, ms", "dense prompt path faster from (tokens)"], rows, "lllrrrrr")


@table("cuda-pipeline", f"{RESULTS}/cuda_pipeline.json")
def cuda_pipeline(c):
    rows = [[r["run"], f"{r['seconds']:.1f}", bits(r["avg_bits"]), ", ".join(r["formats"]), f"{r['cuda_vs_cpu']:.1e}",
             f"{r['cuda_vs_dense']:.1e}", f"{r['cpu_vs_dense']:.1e}"] for r in c["rows"]]
    return md(["run", "quantize s (CUDA)", "true bits", "formats", "logits CUDA vs CPU", "CUDA vs dequantized",
               "CPU vs dequantized"], rows, "lrrlrrr")


# ------------------------------------------------------------------------------------------- docs/formats.md

def _solver_means(s) -> dict[tuple[str, str], dict]:
    """(group, method) -> mean time, error and bits over the group's problems (the SmolLM2 row averages
    its 21 linears, as bench.solvers prints it)."""
    acc_: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in s["rows"]:
        acc_[(r["group"], r["method"])].append(r)
    return {key: {k: sum(r[k] for r in rs) / len(rs) for k in ("time_s", "rel_error", "bits_per_weight", "nominal_bits")}
            for key, rs in acc_.items()}


def _method(m: str) -> str:
    return m.replace("BiLLM compact ", "")


def _solver_table(s, keep: Callable[[str], bool] = lambda m: True) -> str:
    rows = [[g, _method(m), f"{v['time_s']:.3f}", f"{v['rel_error']:.3e}", f"{v['bits_per_weight']:.3f}",
             f"{v['nominal_bits']:.2f}"] for (g, m), v in _solver_means(s).items() if keep(m)]
    return md(["problem", "method", "time/layer (s)", "rel. output error¹", "bits/weight²", "nominal bits"], rows,
              "llrrrr")


@table("solvers", f"{RESULTS}/solvers.json")
def solvers(s):
    return _solver_table(s)


@table("solvers-compact", f"{RESULTS}/solvers_billm_compact.json")
def solvers_compact(s):
    return _solver_table(s, lambda m: m in ("GPTQ-4 g128 ours", "GPTQ-2 g128 ours", "BiLLM") or "compact" in m)


def _vs_billm(s, formats: tuple[str, ...], with_error: bool) -> str:
    means = _solver_means(s)
    rows = []
    for (g, m), v in means.items():
        if _method(m) not in formats:
            continue
        b = means[(g, "BiLLM")]
        row = [g, _method(m), f"{v['bits_per_weight']:.3f}" if with_error else f"{v['bits_per_weight']:.4f}"]
        row += [f"{v['rel_error']:.3e}"] if with_error else []
        row += [f"{v['rel_error'] / b['rel_error']:.3f}", f"{v['time_s'] / b['time_s']:.2f}"]
        rows.append(row)
    header = ["problem", "format", "true bits"] + (["rel. output error"] if with_error else []) + \
             ["error / BiLLM's", "time / BiLLM's"]
    return md(header, rows, "ll" + "r" * (len(header) - 2))


@table("solvers-feedback", f"{RESULTS}/solvers_issue14b.json")
def solvers_feedback(s):
    return _vs_billm(s, ("billm-k4g64", "billm-k5g64f"), with_error=True)


@table("solvers-refit", f"{RESULTS}/solvers_issue14c.json")
def solvers_refit(s):
    return _vs_billm(s, ("billm-k5g64r",), with_error=False)


def _sweep_label(st: dict) -> str:
    runs = " + ".join(f"{k} of {g}" for g, k in st["sparse_runs"])
    extra = [f"{k}={v}" for k, v in st.items() if k not in ("sparse_runs", "col_scale", "column_feedback", "act_order",
                                                            "scale_bits", "scale_octaves", "ref_headroom",
                                                            "col_scale_bits", "row_ref_bits")]
    if st.get("scale_octaves", 5) != 5:
        extra.append(f"scale_octaves={st['scale_octaves']}")
    return f"{runs} sparse; " + ", ".join(extra)


@table("compact-sweep", f"{RESULTS}/billm_compact_sweep.json", f"{RESULTS}/billm_compact_sweep_feedback.json")
def compact_sweep(plain, feedback):
    rows = [["BiLLM's solver (the billm-k<k>g64 family)", _sweep_label(r["settings"]), bits(r["bits_per_weight"]),
             f"{r['error_vs_billm']:.3f}"] for r in plain["rows"]]
    rows += [["column feedback (billm-k5g64f/r family)", _sweep_label(r["settings"]), bits(r["bits_per_weight"]),
              f"{r['error_vs_billm']:.3f}"] for r in feedback["rows"]]
    return md(["solver", "setting", "true bits", "error / BiLLM's"], rows, "llrr")


@table("compact-menu", f"{RESULTS}/frontier-smollm2-compact-before.json", f"{RESULTS}/frontier-smollm2-compact-menu.json",
       f"{RESULTS}/frontier-smollm2-compact.json")
def compact_menu(before, menu, older):
    rows = []
    for (label, b), (_, m), (_, o) in zip(_merged_measured(before), _merged_measured(menu), _merged_measured(older)):
        n_compact = sum(v for k, v in m["formats"].items() if k.startswith("billm"))
        rows.append([f"{b['avg_bits']:.2f} ({label})", ppl(b["value"]), bold(ppl(m["value"]), m["value"] < b["value"]),
                     ppl(o["value"]), n_compact])
    return md(["true bits (budget)", "perplexity, default menu", "`default,compact`", "(with billm-k5g64f)",
               "compact linears of 210"], rows, "lrrrr")


# ------------------------------------------------------------------------------------------- other docs

@table("hessian-source", f"{RESULTS}/hessian_source.json")
def hessian_source(h):
    rows = [[r["k"], "sequential final pass" if r["final_pass"] else "full-precision chain (the variant cache)",
             bits(r["avg_bits"]), f"{r['ppl']:.2f}"] for r in h]
    return md(["k", "Hessians", "true bits", "held-out perplexity"], rows, "rlrr")


@table("gguf-export", f"{RESULTS}/gguf_export.json")
def gguf_export(g):
    rows = [[r["model"], r["runtime"], "" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}",
             "" if r["held_out_ppl"] is None else f"{r['held_out_ppl']:.2f}", f"{r['llama_protocol_ppl']:.2f}"]
            for r in g["rows"]]
    return md(["model", "runtime", "MB", "held-out perplexity (luq's windows)",
               f"perplexity, llama.cpp's protocol ({g['chunks']} chunks of {g['n_ctx']})"], rows, "llrrr")


@table("tiny-vlm-accuracy", "src/luq/data/tiny_vlm/accuracy.json")
def tiny_vlm_accuracy(a):
    answers = {"colour": 8, "shape": 3, "count": 4, "position": 4, "digit": 10, "word": 12, "presence": 2}
    rows = [[k + (" (yes/no)" if k == "presence" else ""), answers.get(k, ""), f"{v:.2f}", f"{a['chance'][k]:.2f}",
             f"{v / a['chance'][k]:.1f}×"] for k, v in a["accuracy"].items()]
    rows.append(["all", "", f"{a['overall']:.2f}", "", ""])
    return md(["question type", "answers", "held-out accuracy", "chance", "over chance"], rows, "lrrrr")


@table("offgrid", f"{RESULTS}/offgrid.json")
def offgrid_controls(o):
    models = o["models"]

    def one(v: float) -> str:
        return "0" if v == 0 else f"{v:.1e}"

    def err(r: dict) -> str:
        return one(r["min"]) if r["min"] == r["max"] else f"{one(r['min'])} – {one(r['max'])}"

    def builds(m: dict) -> str:
        if "builds" not in m:
            return ""
        b = m["builds"]
        return f"`{b['cached']['tensors_sha256'][:12]}`, " + ("the same" if b["match"] else "DIFFERENT")

    rows = [["two builds (cached, fresh): tensors sha256"] + [builds(m) for m in models.values()],
            ["Q4_1 round-to-nearest error, decoder linears"] + [err(m["grid"]["q4_1_rtn"]) for m in models.values()],
            ["decoder linears on Q4_1's grid"] + [f"{m['grid']['on_q4_1_grid']} of {m['grid']['linears']}"
                                                 for m in models.values()],
            ["Q8_0 round-to-nearest error, embedding"] + [one(m["grid"]["embedding"]["q8_0_rtn"])
                                                          for m in models.values()],
            ["luq's RTN-4 g32 error, decoder linears"] + [err(m["grid"]["luq_rtn4_g32"]) for m in models.values()],
            [f"held-out perplexity ({o['text_windows']['n']} × {o['text_windows']['seq_len']} tokens)"]
            + [ppl(m["perplexity"]) for m in models.values()]]
    vlms = [m["vqa"] for m in models.values() if "vqa" in m]
    for kind in (vlms[0]["by_kind"] if vlms else []):
        rows.append([f"VQA accuracy: {kind}"] + [acc(m["vqa"]["by_kind"][kind]) if "vqa" in m else ""
                                                 for m in models.values()])
    if vlms:
        rows.append([f"VQA accuracy: all {o['vqa']['questions']}"] + [bold(acc(m["vqa"]["accuracy"])) if "vqa" in m
                                                                      else "" for m in models.values()])
    return md([""] + list(models), rows, "l" + "r" * len(models))


# ------------------------------------------------------------------------------------------- the rewrite

def render_table(name: str, root: Path = ROOT) -> tuple[str, str]:
    """(opening marker, table) of table NAME from its files."""
    sources, fn = TABLES[name]
    data = [json.loads((root / s).read_text()) for s in sources]
    return f"<!-- table: {name} source={','.join(sources)} -->", fn(*data)


def rewrite(text: str, root: Path = ROOT) -> tuple[str, list[str], list[str]]:
    """text with every generated table rendered again -> (new text, names that changed, unknown names)."""
    changed, unknown = [], []

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            unknown.append(name)
            return m[0]
        head, body = render_table(name, root)
        new = f"{head}\n{body}<!-- /table -->"
        if new != m[0]:
            changed.append(name)
        return new

    return MARKER.sub(sub, text), changed, unknown


def check(root: Path = ROOT) -> list[str]:
    """'FILE: NAME' for every table that differs from what its files render (or whose name is unknown)."""
    out = []
    for path in doc_files(root):
        _, changed, unknown = rewrite(path.read_text(), root)
        rel = path.relative_to(root)
        out += [f"{rel}: {n}" for n in changed] + [f"{rel}: {n} (no renderer of that name)" for n in unknown]
    return out


def used_tables(root: Path = ROOT) -> dict[str, list[str]]:
    """table name -> the files it appears in."""
    seen: dict[str, list[str]] = defaultdict(list)
    for path in doc_files(root):
        for m in MARKER.finditer(path.read_text()):
            seen[m["name"]].append(str(path.relative_to(root)))
    return dict(seen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 listing the tables that differ")
    args = p.parse_args(argv)
    if args.check:
        stale = check()
        for line in stale:
            print(f"differs from its result file: {line}")
        return 1 if stale else 0
    for path in doc_files():
        text = path.read_text()
        new, changed, unknown = rewrite(text)
        for n in unknown:
            print(f"{path.relative_to(ROOT)}: no renderer for table {n!r}", file=sys.stderr)
        if new != text:
            path.write_text(new)
            print(f"{path.relative_to(ROOT)}: rendered {', '.join(changed)}")
        if unknown:
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
