"""How good is the sensitivity estimate? Predicted vs measured KL on a real model, out of sample.

The measured allocation plans on a cheap estimate (luq.sensitivity: per-token Fisher, one layer-wise
backward pass) computed on the sensitivity windows. This bench measures the real thing exllamav3-style --
one linear alone in one format inside the full-precision model, the KL of its next-token distributions
from full precision -- and compares:

* on held-out windows: the validation windows (the ones held-out perplexity is scored on), disjoint from
  the calibration windows behind the Hessians and from the sensitivity windows the estimate and the
  knapsack saw (checked window by window: each window's slot in the text is recorded);
* on the sensitivity windows themselves (in sample), for comparison (`--no-in-sample` skips it).
  The validation windows are text only: for tiny-vlm (alpha 0.5) the in-sample windows hold images and
  the held-out ones do not.

Pairs are stratified, not drawn at random: `--linears` N linears spread over the layers and the kinds
(q/k/v/o/gate/up/down), each measured in EVERY format of the menu, so that comparisons within one bit
width (g32 vs g64 vs g128, one linear vs another) are complete. Reported: Spearman and the median
predicted/measured ratio over all pairs; Spearman within each bit width; per bit width, how many linears
get the order of their group sizes right (and Kendall's tau averaged); Spearman within each format across
the linears; and additivity: for knapsack plans at several budgets, the summed predicted cost against the
KL measured with the whole plan in place.

A linear of layer L changes nothing before layer L, so its KL is measured from layer L on: the
full-precision hidden state entering layer L is kept once and fed as `inputs_embeds` to the decoder cut
to layers L.. (checked once against the whole forward, `prefix_check`).

    python -m bench.sensitivity --model smollm2-offgrid      # 16 x 256 calibration, 16 sensitivity windows
    python -m bench.sensitivity --linears 2 --menu gptq4-g128,gptq4-g32 --no-plans    # a quick try

Writes bench/results/sensitivity-<model>.json (after every linear, so `--resume` goes on from there) and
prints the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from scipy.stats import kendalltau, pearsonr, spearmanr
from torch import nn

from bench.common import add_model_args, calibration_of
from luq.assembly import Assembly, linear_names
from luq.calibration import text_token_ids, text_windows, validation_windows
from luq.capture import TEXT
from luq.config import LUQConfig
from luq.models import UNIT_KINDS
from luq.plan import knapsack, uniform_plan
from luq.quant import DEFAULT_MENU, parse_formats
from luq.sensitivity import output_kl, reference_log_probs
from luq.session import Session

RESULTS = Path(__file__).parent / "results"
GPTQ = re.compile(r"gptq(\d+)-g(\d+)")


def pick_linears(names: list[list[str]], n: int) -> list[str]:
    """n linears spread evenly over the layers, the kind cycling through each layer's linears
    (q, k, v, o, gate, up, down for Llama), so every kind appears once n >= 7."""
    layers = len(names)
    picked = []
    for i in range(n):
        layer = round(i * (layers - 1) / max(n - 1, 1))
        kinds = names[layer]
        picked.append(kinds[i % len(kinds)])
    if len(set(picked)) != len(picked):
        raise SystemExit(f"--linears {n} picks a linear twice on {layers} layers; ask for fewer")
    return picked


def window_slots(token_ids: torch.Tensor, windows: torch.Tensor) -> list[int]:
    """Each window's slot (token offset // seq_len) in the text: windows are whole slots."""
    seq_len = windows.shape[1]
    slots = token_ids[:token_ids.numel() // seq_len * seq_len].view(-1, seq_len)
    out = []
    for w in windows:
        hit = (slots == w).all(1).nonzero().flatten().tolist()
        out.append(hit[0] if hit else -1)
    return out


def window_digests(windows) -> list[str]:
    return [hashlib.sha256(w.to(torch.int64).numpy().tobytes()).hexdigest()[:16] for w in windows]


def text_batches_of(windows: torch.Tensor, batch_size: int = 8):
    return [({"input_ids": w, "attention_mask": torch.ones_like(w)}, torch.full(w.shape, TEXT, dtype=torch.int8))
            for w in windows.split(batch_size)]


class Windows:
    """One set of windows: its batches, the full-precision reference, and the full-precision hidden
    state entering each measured layer (for the KL measured from that layer on)."""

    def __init__(self, net: nn.Module, decoder: nn.Module, batches, layers: list[int]):
        self.net, self.decoder, self.batches = net, decoder, batches
        self.reference = reference_log_probs(net, batches, dtype=torch.float32)
        self.hidden: dict[int, list[torch.Tensor]] = {i: [] for i in layers if i > 0}
        handles = []
        for i in self.hidden:
            def keep(module, args, kwargs, i=i):
                self.hidden[i].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
            handles.append(decoder.layers[i].register_forward_pre_hook(keep, with_kwargs=True))
        try:
            with torch.no_grad():
                for inputs, _ in batches:
                    net(**inputs, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.floor = output_kl(net, batches, self.reference)  # the full-precision model against itself

    def kl(self, from_layer: int = 0) -> float:
        """KL from the reference of the model as it stands, run from layer `from_layer` on (0: whole)."""
        if from_layer == 0:
            return output_kl(self.net, self.batches, self.reference)
        layers = self.decoder.layers
        cut = [({"inputs_embeds": h, "attention_mask": inputs["attention_mask"]}, kinds)
               for h, (inputs, kinds) in zip(self.hidden[from_layer], self.batches)]
        self.decoder.layers = nn.ModuleList(list(layers)[from_layer:])
        try:
            return output_kl(self.net, cut, self.reference)
        finally:
            self.decoder.layers = layers


def bits_group(fmt: str) -> tuple[int, int] | None:
    m = GPTQ.fullmatch(fmt)
    return (int(m[1]), int(m[2])) if m else None


def rho(xs, ys) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(spearmanr(xs, ys).statistic)


def ratio_median(pred, meas) -> float | None:
    r = [p / m for p, m in zip(pred, meas) if m > 0]
    return statistics.median(r) if r else None


def summarize(rows: list[dict], key: str, menu: list[str], linears: list[str]) -> dict:
    """The statistics of predicted against rows[*][key] (a measured KL)."""
    rows = [r for r in rows if r.get(key) is not None]
    pred, meas = [r["predicted"] for r in rows], [r[key] for r in rows]
    logs = (torch.tensor(pred).clamp_min(1e-12).log().tolist(), torch.tensor(meas).clamp_min(1e-12).log().tolist())
    out = {"pairs": len(rows), "spearman": rho(pred, meas),
           "pearson_log": float(pearsonr(*logs).statistic) if len(rows) > 2 else None,
           "median_ratio": ratio_median(pred, meas)}
    by = {(r["linear"], r["format"]): r for r in rows}
    widths = sorted({bg[0] for f in menu if (bg := bits_group(f))})
    out["by_bits"] = {}
    for b in widths:
        fmts = [f for f in menu if (bg := bits_group(f)) and bg[0] == b]
        sub = [r for r in rows if r["format"] in fmts]
        entry = {"pairs": len(sub), "spearman": rho([r["predicted"] for r in sub], [r[key] for r in sub]),
                 "median_ratio": ratio_median([r["predicted"] for r in sub], [r[key] for r in sub])}
        if len(fmts) > 1:  # the order of the group sizes, linear by linear
            same, taus, n, by_size = 0, [], 0, 0
            for lin in linears:
                got = [by.get((lin, f)) for f in fmts]
                if any(g is None for g in got):
                    continue
                p, m = [g["predicted"] for g in got], [g[key] for g in got]
                n += 1
                same += sorted(fmts, key=lambda f: p[fmts.index(f)]) == sorted(fmts, key=lambda f: m[fmts.index(f)])
                by_size += sorted(fmts, key=lambda f: m[fmts.index(f)]) == sorted(fmts, key=lambda f: bits_group(f)[1])
                tau = kendalltau(p, m).statistic
                if tau == tau:  # not nan
                    taus.append(float(tau))
            # smaller_groups_cost_less: linears whose measured order is simply the group size's (what a rule
            # with no estimate would say)
            entry["group_order"] = {"formats": fmts, "linears": n, "same_order": same,
                                    "kendall_tau_mean": statistics.mean(taus) if taus else None,
                                    "smaller_groups_cost_less": by_size}
        out["by_bits"][str(b)] = entry
    out["by_format"] = {}
    for f in menu:
        sub = [r for r in rows if r["format"] == f]
        out["by_format"][f] = {"linears": len(sub), "spearman": rho([r["predicted"] for r in sub], [r[key] for r in sub]),
                               "median_ratio": ratio_median([r["predicted"] for r in sub], [r[key] for r in sub])}
    per_linear = [rho([by[(lin, f)]["predicted"] for f in menu if (lin, f) in by],
                      [by[(lin, f)][key] for f in menu if (lin, f) in by]) for lin in linears]
    per_linear = [x for x in per_linear if x is not None]
    out["within_linear_spearman_mean"] = statistics.mean(per_linear) if per_linear else None
    return out


def group_orders_agree(rows: list[dict], menu: list[str], linears: list[str], a: str, b: str) -> dict:
    """Per bit width, the linears whose order of the group sizes is the same by rows[*][a] and by
    rows[*][b] (two measurements: how stable the measured order itself is)."""
    by = {(r["linear"], r["format"]): r for r in rows}
    out = {}
    for width in sorted({bg[0] for f in menu if (bg := bits_group(f))}):
        fmts = [f for f in menu if (bg := bits_group(f)) and bg[0] == width]
        if len(fmts) < 2:
            continue
        same = n = 0
        for lin in linears:
            got = [by.get((lin, f)) for f in fmts]
            if any(g is None or g.get(a) is None or g.get(b) is None for g in got):
                continue
            n += 1
            same += sorted(fmts, key=lambda f: got[fmts.index(f)][a]) == sorted(fmts, key=lambda f: got[fmts.index(f)][b])
        out[str(width)] = {"linears": n, "same_order": same}
    return out


def statistics_of(rows: list[dict], menu: list[str], linears: list[str]) -> dict:
    """Every statistic of the result file, from its pairs."""
    in_sample = any(r.get("measured_in_sample") is not None for r in rows)
    return {"out_of_sample": summarize(rows, "measured", menu, linears),
            "in_sample": summarize(rows, "measured_in_sample", menu, linears) if in_sample else None,
            "heldout_vs_in_sample_spearman": rho([r["measured_in_sample"] for r in rows], [r["measured"] for r in rows])
            if in_sample else None,
            "heldout_vs_in_sample_group_order": group_orders_agree(rows, menu, linears, "measured", "measured_in_sample")
            if in_sample else None}


def resummarize(path: Path) -> None:
    """Recompute the statistics of a finished result file from its pairs (nothing measured again)."""
    r = json.loads(path.read_text())
    if not r.get("complete"):
        raise SystemExit(f"{path} is not complete (run the bench with --resume)")
    r.update(statistics_of(r["pairs"], r["menu"], r["linears"]))
    path.write_text(json.dumps(r, indent=1) + "\n")
    report(r)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--sensitivity-samples", type=int, default=16)
    p.add_argument("--heldout-samples", type=int, default=16, help="held-out (validation) windows the KL is measured on")
    p.add_argument("--menu", default=",".join(DEFAULT_MENU))
    p.add_argument("--linears", type=int, default=12, help="linears measured, each in every format of the menu")
    p.add_argument("--no-in-sample", action="store_true", help="measure on the held-out windows only")
    p.add_argument("--no-plans", action="store_true", help="skip the knapsack plans (additivity)")
    p.add_argument("--resume", action="store_true", help="keep the pairs the result file already holds")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--summarize", type=Path, default=None, metavar="FILE",
                   help="recompute the statistics of a finished result file from its pairs, measure nothing")
    args = p.parse_args(argv)
    if args.summarize:
        return resummarize(args.summarize)
    t_start = time.perf_counter()
    calibration = calibration_of(args)
    menu = list(parse_formats(args.menu))
    config = LUQConfig(calibration=calibration, budget_gb=1.0, formats=menu, kmeans_clusters=args.k,
                       sensitivity_samples=args.sensitivity_samples, validation_samples=args.heldout_samples,
                       keep=UNIT_KINDS)  # the decoder's linears
    # luq's own steps: load, calibration and sensitivity windows, the variant pass, the estimate
    session = Session(args.model, config, device="cpu", dtype=torch.float32, stream=False)
    measurement = session.measure()
    t_pass, t_estimate = session.seconds["layer_pass"], session.seconds["sensitivity"]
    net, adapter = session.net, session.adapter
    sizes, costs = measurement.sizes, measurement.costs
    decoder = adapter.decoder(net)

    # the windows: calibration (Hessians), sensitivity (the estimate, the knapsack), held out (validation)
    ids = text_token_ids(session.processor, calibration.text)
    calib = text_windows(ids, calibration.n_text, calibration.seq_len, calibration.seed)
    heldout = validation_windows(ids, args.heldout_samples, calibration.seq_len, calibration.seed, calibration.n_text)
    sens_text = [inputs["input_ids"] for inputs, _ in session.sens_batches if "pixel_values" not in inputs]
    sens_text = torch.cat(sens_text) if sens_text else heldout[:0]
    slots = {"calibration": window_slots(ids, calib), "sensitivity": window_slots(ids, sens_text),
             "heldout": window_slots(ids, heldout)}
    digests = {k: window_digests(w) for k, w in (("calibration", calib), ("sensitivity", sens_text), ("heldout", heldout))}
    assert -1 not in slots["heldout"] and -1 not in slots["sensitivity"], "a window is not a whole slot of the text"
    for a, b in (("heldout", "sensitivity"), ("heldout", "calibration"), ("sensitivity", "calibration")):
        assert not set(slots[a]) & set(slots[b]), f"{a} and {b} windows share slots"
        assert not set(digests[a]) & set(digests[b]), f"{a} and {b} windows share a window's tokens"
    windows_info = {"seq_len": calibration.seq_len, "slots_in_text": ids.numel() // calibration.seq_len,
                    "slots": slots, "sha256_16": digests, "disjoint": True,
                    "sensitivity_multimodal_sequences": sum(int(inputs["input_ids"].shape[0])
                                                            for inputs, _ in session.sens_batches
                                                            if "pixel_values" in inputs)}

    names = linear_names(net, adapter)
    layer_of = {n: i for i, layer in enumerate(names) for n in layer}
    picked = pick_linears(names, args.linears)
    layers = sorted({layer_of[n] for n in picked})
    t0 = time.perf_counter()
    can_cut = not adapter.multimodal  # a multimodal top model builds its inputs_embeds itself
    sets = {"heldout": Windows(net, decoder, text_batches_of(heldout), layers if can_cut else [])}
    if not args.no_in_sample:
        sets["in_sample"] = Windows(net, decoder, session.sens_batches, layers if can_cut else [])
    t_reference = time.perf_counter() - t0
    assembly = Assembly(net, adapter, session.cache, "cpu", dense=True)

    def measured(plan: dict, from_layer: int = 0) -> dict[str, float]:
        assembly.apply(plan)
        try:
            return {k: w.kl(from_layer if can_cut else 0) for k, w in sets.items()}
        finally:
            assembly.undo()

    out = args.out or RESULTS / f"sensitivity-{args.model}.json"
    settings = {"model": args.model, "calibration": asdict(calibration),
                "sensitivity_samples": args.sensitivity_samples, "heldout_samples": args.heldout_samples,
                "menu": menu, "linears": picked, "in_sample": not args.no_in_sample}
    done = {}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            done = {(r["linear"], r["format"]): r for r in old["pairs"]}
            print(f"resuming: {len(done)} pairs already measured")
        else:
            print(f"{out} was measured with other settings: measuring every pair again")

    # once: the KL from layer L on against the whole forward, for one pair with L > 0
    check_name = next((n for n in picked if layer_of[n] > 0), None)
    prefix_check = None
    if check_name is not None and can_cut:
        assembly.apply({check_name: menu[0]})
        try:
            w = sets["heldout"]
            prefix_check = {"linear": check_name, "format": menu[0], "whole_forward": w.kl(0),
                            "from_layer": w.kl(layer_of[check_name])}
        finally:
            assembly.undo()
        rel = abs(prefix_check["whole_forward"] - prefix_check["from_layer"]) / max(prefix_check["whole_forward"], 1e-12)
        prefix_check["relative_difference"] = rel
        print(f"prefix check ({check_name}, {menu[0]}): whole {prefix_check['whole_forward']:.6g}, "
              f"from layer {layer_of[check_name]} {prefix_check['from_layer']:.6g}", flush=True)
        assert rel < 1e-3, prefix_check

    rows, pair_seconds = [], []
    total = len(picked) * len(menu)
    t_pairs = time.perf_counter()
    for li, name in enumerate(picked):
        for fmt in menu:
            if (name, fmt) in done:
                rows.append(done[(name, fmt)])
                continue
            t1 = time.perf_counter()
            kl = measured({name: fmt}, layer_of[name])
            pair_seconds.append(time.perf_counter() - t1)
            rows.append({"linear": name, "layer": layer_of[name], "kind": name.rsplit(".", 1)[-1], "format": fmt,
                         "predicted": costs[name][fmt], "measured": kl["heldout"], "measured_in_sample": kl.get("in_sample"),
                         "seconds": round(pair_seconds[-1], 2)})
        left = total - len(rows)
        eta = statistics.mean(pair_seconds) * left if pair_seconds else 0
        print(f"  {len(rows)}/{total} pairs ({li + 1}/{len(picked)} linears), "
              f"{time.perf_counter() - t_pairs:.0f} s so far, ETA {eta / 60:.1f} min for the pairs", flush=True)
        partial = {"settings": settings, "complete": False, "pairs": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(partial, indent=1) + "\n")
    t_measure = statistics.mean(pair_seconds) if pair_seconds else None

    plans = []
    if not args.no_plans:
        all_names = [n for layer in names for n in layer]
        low = sizes.total_bytes(uniform_plan(all_names, "gptq2-g128"))
        high = sizes.total_bytes(uniform_plan(all_names, "gptq4-g128"))
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            t1 = time.perf_counter()
            result = knapsack(sizes, costs, menu, int(low + frac * (high - low)))
            kl = measured(result.plan)
            plans.append({"budget": f"GPTQ-2 g128 + {frac:g} x (GPTQ-4 g128 - GPTQ-2 g128)",
                          "total_bytes": result.total_bytes, "avg_bits": sizes.avg_bits(result.plan),
                          "predicted": result.cost, "measured": kl["heldout"], "measured_in_sample": kl.get("in_sample")})
            print(f"  plan {frac:g}: predicted {result.cost:.4f}, measured held out {kl['heldout']:.4f} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)

    result = {"settings": settings, "complete": True, "model": args.model, "menu": menu, "linears": picked,
              "windows": windows_info,
              "floor": {k: w.floor for k, w in sets.items()},
              "prefix_check": prefix_check,
              **statistics_of(rows, menu, picked),
              "plans": plans, "pairs": rows,
              "seconds": {"variant_pass": round(t_pass, 1), "estimate": round(t_estimate, 1),
                          "references": round(t_reference, 1),
                          "measured_kl_per_pair": None if t_measure is None else round(t_measure, 2),
                          "total": round(time.perf_counter() - t_start, 1)},
              "sensitivity_tokens": sum(int(b[0]["input_ids"].numel()) for b in session.sens_batches),
              "heldout_tokens": int(heldout.numel()),
              "threads": torch.get_num_threads()}
    out.write_text(json.dumps(result, indent=1) + "\n")
    report(result)


def _f(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def report(r: dict) -> None:
    o, i = r["out_of_sample"], r["in_sample"] or {}
    print(f"\n{r['model']}: {len(r['linears'])} linears x {len(r['menu'])} formats; held-out windows "
          f"{r['heldout_tokens']} tokens, sensitivity windows {r['sensitivity_tokens']} tokens (disjoint)")
    print("| | held out | in sample |\n|---|---:|---:|")
    print(f"| Spearman, all pairs | {_f(o['spearman'])} | {_f(i.get('spearman'))} |")
    print(f"| median predicted/measured | {_f(o['median_ratio'])} | {_f(i.get('median_ratio'))} |")
    print(f"| Spearman within one linear (mean) | {_f(o['within_linear_spearman_mean'])} | "
          f"{_f(i.get('within_linear_spearman_mean'))} |")
    for b, e in o["by_bits"].items():
        ie = i.get("by_bits", {}).get(b, {})
        print(f"| {b}-bit: Spearman ({e['pairs']} pairs) | {_f(e['spearman'])} | {_f(ie.get('spearman'))} |")
        if "group_order" in e:
            g, ig = e["group_order"], ie.get("group_order", {})
            print(f"| {b}-bit: group order right | {g['same_order']}/{g['linears']} | "
                  f"{ig.get('same_order', '—')}/{ig.get('linears', '—')} |")
            print(f"| {b}-bit: Kendall tau of the groups (mean) | {_f(g['kendall_tau_mean'])} | "
                  f"{_f(ig.get('kendall_tau_mean'))} |")
            print(f"| {b}-bit: measured order is by group size | {g['smaller_groups_cost_less']}/{g['linears']} | "
                  f"{ig.get('smaller_groups_cost_less', '—')}/{ig.get('linears', '—')} |")
    for f, e in o["by_format"].items():
        print(f"| {f}: Spearman across linears | {_f(e['spearman'])} | "
              f"{_f(i.get('by_format', {}).get(f, {}).get('spearman'))} |")
    if r["heldout_vs_in_sample_spearman"] is not None:
        print(f"Spearman(measured held out, measured in sample) = {r['heldout_vs_in_sample_spearman']:.3f}; "
              "group order the same held out and in sample: " +
              ", ".join(f"{b}-bit {g['same_order']}/{g['linears']}"
                        for b, g in r["heldout_vs_in_sample_group_order"].items()))
    s = r["seconds"]
    print(f"time: variant pass {s['variant_pass']:.0f} s, estimate {s['estimate']:.0f} s, references "
          f"{s['references']:.0f} s, measured KL {_f(s['measured_kl_per_pair'], '.1f')} s per pair, total {s['total']:.0f} s")
    if r["plans"]:
        print("\n| knapsack plan total MB | true avg bits | predicted KL (sum) | measured, held out | measured, in sample |")
        print("|---|---|---|---|---|")
        for q in r["plans"]:
            print(f"| {q['total_bytes'] / 1e6:.2f} | {q['avg_bits']:.3f} | {q['predicted']:.4f} | {q['measured']:.4f} | "
                  f"{_f(q['measured_in_sample'], '.4f')} |")


if __name__ == "__main__":
    main()
