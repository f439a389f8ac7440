"""Solver benchmark: time, layer output error and storage of every luq solver (and the peer GPTQ).

    python -m bench.solvers            # full: synthetic 4096x4096 and 11008x4096, 21 SmolLM2 linears
    python -m bench.solvers --quick    # synthetic 2048x2048 and the SmolLM2 linears
    python -m bench.solvers --only-4096 --methods "GPTQ-4 g128 ours,BiLLM"   # a subset
    python -m bench.solvers --no-11008     # synthetic 4096x4096 and the SmolLM2 linears
    python -m bench.solvers --only-4096 --methods "GPTQ-4 g128 ours,BiLLM" --repeat 3   # median of 3, alternating

Prints a markdown table and writes it as JSON to bench/results/solvers.json.
Progress goes to stderr.

Timing: wall clock, torch's default thread count; with --repeat N each problem is solved N
times, the methods alternating, and the median is reported (beside every time in the JSON). OMP_WAIT_POLICY defaults to PASSIVE
here (set it to override): with OpenMP's spin-waiting, any other busy process on the
machine made a 576x576 GPTQ take 9 s instead of 0.3 s on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.peer import peer_available, peer_gptq
from luq.quant import GPTQ, RTN, BiLLM, Sign, get_format
from luq.quant.hessian import reconstruction_error

RESULTS = Path(__file__).parent / "results" / "solvers.json"
PEER = "GPTQ-4 g128 peer (llmcompressor)"
OURS = "GPTQ-4 g128 ours"
OURS_GIDX = "GPTQ-4 g128 ours, act-order groups + g_idx"
# the compact BiLLM formats of the menu (luq.quant.formats), one row each
COMPACT_FORMATS = ("billm-k16g64", "billm-k8g64", "billm-k4g64", "billm-k5g64f", "billm-k5g64r")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- problems


def synthetic_problem(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H) shaped like an LLM linear, float32.

    Inputs X [n = 2*inp tokens, inp]: 32 shared latent factors (correlated channels) plus
    noise, times lognormal per-channel scales, with 1% of channels 10-50x larger (the
    outlier features of real LLM activations). H = 2/n X^T X.
    W: Student-t(5) entries times lognormal per-column and per-row scales, with 0.5% of
    columns 5x larger.
    """
    g = torch.Generator().manual_seed(seed)
    n, r = 2 * inp, 32
    X = torch.randn(n, r, generator=g) @ (torch.randn(r, inp, generator=g) * 0.3)
    X += torch.randn(n, inp, generator=g)
    ch = torch.exp(0.5 * torch.randn(inp, generator=g))
    hot = torch.randperm(inp, generator=g)[: inp // 100]
    ch[hot] *= 10 + 40 * torch.rand(len(hot), generator=g)
    X *= ch
    H = X.T @ X
    H *= 2 / n
    del X
    t = torch.distributions.StudentT(5.0)
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    W = t.sample((out, inp)) * 0.02
    W *= torch.exp(0.3 * torch.randn(inp, generator=g))[None, :]
    W *= torch.exp(0.2 * torch.randn(out, generator=g))[:, None]
    W[:, torch.randperm(inp, generator=g)[: inp // 200]] *= 5
    return W, H


def problems(quick: bool, only_4096: bool = False, no_11008: bool = False):
    """Yield (group, name, W, H); group names the table row a problem is averaged into."""
    shapes = ([(2048, 2048, 1)] if quick else [(4096, 4096, 1)] if only_4096 or no_11008
              else [(4096, 4096, 1), (11008, 4096, 2)])
    for out, inp, seed in shapes:
        name = f"synthetic {out}x{inp}"
        log(f"building {name}")
        W, H = synthetic_problem(out, inp, seed)
        yield name, name, W, H
    if only_4096:
        return
    from luq.zoo.smollm2 import smollm2_linear_problems

    log("loading SmolLM2-135M problems (layers 0, 15, 29)")
    for p in smollm2_linear_problems():
        yield "SmolLM2-135M, mean of 21 linears", p.name, p.weight, p.hessian


# --------------------------------------------------------------------------- methods


def gptq_format_bpw(W: torch.Tensor, bits: int = 4, group_size: int = 128) -> float:
    """Bits/weight of the standard GPTQ packed format without g_idx: codes + fp16 scale + packed zero per group."""
    return RTN(bits, group_size).quantize(W).bits_per_weight


def methods(with_peer: bool):
    """name -> solve(W, H): a luq QuantizedWeight, or the peer's dequantized weight (a tensor)."""
    def ours(solver, needs_h=True):
        return lambda W, H: solver.quantize(W, H) if needs_h else solver.quantize(W)

    m = {
        "RTN-4 g128": ours(RTN(4, 128), needs_h=False),
        OURS: ours(GPTQ(4, 128, act_order=True, static_groups=True)),
        OURS_GIDX: ours(GPTQ(4, 128, act_order=True, static_groups=False)),
    }
    if with_peer:
        m[PEER] = lambda W, H: peer_gptq(W, H, bits=4, group_size=128, act_order=True)
    m.update({
        "GPTQ-3 g128 ours": ours(GPTQ(3, 128, act_order=True, static_groups=True)),
        "GPTQ-2 g128 ours": ours(GPTQ(2, 128, act_order=True, static_groups=True)),
        "BiLLM": ours(BiLLM()),
        **{f"BiLLM compact {name}": ours(get_format(name).solver) for name in COMPACT_FORMATS},
        "Sign": ours(Sign(), needs_h=False),
    })
    return m


# --------------------------------------------------------------------------- run


def run(quick: bool, only_4096: bool = False, only: list[str] | None = None, no_11008: bool = False,
        repeat: int = 1) -> dict:
    t_start, load_start = time.perf_counter(), os.getloadavg()
    with_peer = peer_available() and (not only or PEER in only)
    if not with_peer:
        log("llmcompressor not importable (or not asked for): the peer GPTQ row is left out")
    meths = methods(with_peer)
    if only:
        unknown = set(only) - set(meths)
        if unknown:
            raise SystemExit(f"unknown methods {sorted(unknown)}; known: {list(meths)}")
        meths = {k: v for k, v in meths.items() if k in only}
    rows, warmed = [], False
    for group, name, W, H in problems(quick, only_4096, no_11008):
        base = reconstruction_error(W, H)
        tiny = W.numel() < 4_000_000
        if tiny and not warmed:  # first call of each solver pays one-off costs; keep them out of small timings
            log(f"warm-up on {name}")
            for f in meths.values():
                f(W, H)
            warmed = True
        times = defaultdict(list)
        for rep in range(repeat - 1):  # extra solves, methods alternating, for the median time
            for mname, f in meths.items():
                log(f"{name} {tuple(W.shape)}: {mname} (timing {rep + 1} of {repeat})")
                t0 = time.perf_counter()
                f(W, H)
                times[mname].append(time.perf_counter() - t0)
        for mname, f in meths.items():
            log(f"{name} {tuple(W.shape)}: {mname}")
            t0 = time.perf_counter()
            q = f(W, H)  # only the solve is timed
            times[mname].append(time.perf_counter() - t0)
            dt = statistics.median(times[mname])
            if isinstance(q, torch.Tensor):  # the peer: 4-bit codes in the standard GPTQ format
                Q, bpw, nominal = q, gptq_format_bpw(W), 4.0
            else:
                Q, bpw, nominal = q.dequantize(), q.bits_per_weight, q.nominal_bits_per_weight
            rows.append({"group": group, "problem": name, "shape": list(W.shape), "method": mname, "time_s": dt,
                         "times_s": times[mname],
                         "rel_error": reconstruction_error(W - Q, H) / base, "bits_per_weight": bpw, "nominal_bits": nominal})
        del W, H
    return {"quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(), "total_wall_s": time.perf_counter() - t_start, "repeat": repeat, "rows": rows}


def aggregate(rows: list[dict], key: str) -> list[dict]:
    """Mean of time / error / bits over the rows sharing (row[key], method), first-seen order."""
    acc = defaultdict(list)
    for r in rows:
        acc[(r[key], r["method"])].append(r)
    return [{"problem": k[0], "method": k[1], "n": len(v),
             **{f: sum(r[f] for r in v) / len(v) for f in ("time_s", "rel_error", "bits_per_weight", "nominal_bits")}}
            for k, v in acc.items()]


def median_note(result: dict) -> str:
    repeat = result.get("repeat", 1)
    return f", times: median of {repeat} alternating solves" if repeat > 1 else ""


def markdown(result: dict) -> str:
    agg = aggregate(result["rows"], "group")
    out = ["| problem | method | time/layer (s) | rel. output error¹ | bits/weight² | nominal bits |",
           "|---|---|---:|---:|---:|---:|"]
    for a in agg:
        out.append(f"| {a['problem']} | {a['method']} | {a['time_s']:.3f} | {a['rel_error']:.3e} | "
                   f"{a['bits_per_weight']:.3f} | {a['nominal_bits']:.2f} |")

    real = [r for r in result["rows"] if r["problem"].startswith("layers.")]
    if real:
        by_type = aggregate([{**r, "type": r["problem"].rpartition(".")[2]} for r in real], "type")
        meths = list(dict.fromkeys(a["method"] for a in by_type))
        types = list(dict.fromkeys(a["problem"] for a in by_type))
        cell = {(a["problem"], a["method"]): a["rel_error"] for a in by_type}
        out += ["", "SmolLM2-135M relative output error¹ by linear, mean over layers 0, 15, 29:", "",
                "| linear | " + " | ".join(meths) + " |", "|---|" + "---:|" * len(meths)]
        out += [f"| {t} | " + " | ".join(f"{cell[t, m]:.2e}" for m in meths) + " |" for t in types]

    out += ["", "¹ tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with the problem's H = 2/n Σ x xᵀ, which equals "
            "‖WX − ŴX‖² / ‖WX‖² over the n calibration tokens (synthetic: the generated X; SmolLM2: "
            "16 Wikipedia sequences of 256 tokens). Real-model rows average the per-linear ratios.",
            "² true bits/weight from the stored bytes (codes, fp16 scales, packed zeros, g_idx, masks). "
            "For the peer: the standard packed GPTQ format of its result (4-bit codes + fp16 scale + 4-bit "
            "zero per group of 128, contiguous groups, no g_idx), i.e. what our RTN / GPTQ store.",
            "All GPTQ rows: act-order (columns solved by decreasing diag H), damp 0.01, block 128, asymmetric. "
            "\"ours\" = luq's default static groups: contiguous groups whose grids are fitted on the original W "
            "(llmcompressor's actorder=\"static\"); \"act-order groups + g_idx\" = the reference GPTQ's "
            "act-order (each group's grid fitted on the error-updated weights, g_idx stored). "
            "Peer = llmcompressor 0.14.0.1 `quantize_weight` as its GPTQModifier calls it: W4A16_ASYM "
            "group-128 scheme, actorder=\"static\" (its default; \"group\" is no longer accepted), "
            "memoryless min-max observer on the original W. SmolLM2's 576 / 1536 columns are not multiples "
            "of 128, which llmcompressor's observer cannot take: W is zero-padded (H padded decoupled), "
            "which is exactly a narrower last group (bench/peer.py).", ""]
    for p in dict.fromkeys(a["problem"] for a in agg):
        cell = {a["method"]: a for a in agg if a["problem"] == p}
        if PEER not in cell:
            continue
        for o in (OURS, OURS_GIDX):
            out.append(f"- {p} — {o.removeprefix('GPTQ-4 g128 ')} vs peer: time ratio "
                       f"{cell[o]['time_s'] / cell[PEER]['time_s']:.2f}, error ratio "
                       f"{cell[o]['rel_error'] / cell[PEER]['rel_error']:.3f}")
    for p in dict.fromkeys(a["problem"] for a in agg):
        cell = {a["method"]: a for a in agg if a["problem"] == p}
        if "BiLLM" not in cell:
            continue
        if OURS in cell:
            out.append(f"- {p} — BiLLM time / GPTQ-4 g128 ours time: {cell['BiLLM']['time_s'] / cell[OURS]['time_s']:.2f}")
        for name in COMPACT_FORMATS:
            c = cell.get(f"BiLLM compact {name}")
            if c:
                out.append(f"- {p} — {name}: {c['bits_per_weight']:.3f} true bits, error "
                           f"{c['rel_error'] / cell['BiLLM']['rel_error']:.3f}x BiLLM's "
                           f"(mean of the per-layer errors), time {c['time_s'] / cell['BiLLM']['time_s']:.2f}x BiLLM's")
    out.append(f"\nTotal wall time {result['total_wall_s']:.0f} s, torch {result['torch']}, "
               f"{result['threads']} threads, OMP_WAIT_POLICY={result['omp_wait_policy']}, load average "
               f"{result['loadavg_start'][0]:.1f} at start / {result['loadavg_end'][0]:.1f} at end"
               f"{' (--quick)' if result['quick'] else ''}"
               f"{median_note(result)}.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 2048x2048 synthetic layer instead of the big two")
    ap.add_argument("--only-4096", action="store_true", help="only the synthetic 4096x4096 layer")
    ap.add_argument("--no-11008", action="store_true", help="the synthetic 4096x4096 and the SmolLM2 linears")
    ap.add_argument("--methods", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="solve each problem this many times, methods alternating; time = the median")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = ap.parse_args(argv)
    result = run(args.quick, args.only_4096, [m for m in args.methods.split(",") if m] or None, args.no_11008,
                 max(1, args.repeat))
    result["markdown"] = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(result["markdown"])
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
