"""What each format of the menu costs in the variant pass: one pass of `luq quantize`'s
variant stage (`pipeline.layer_pass`, full-precision Hessians and the entropy ranking, as the
budget mode runs it) over every decoder linear, in every format of the default menu plus
--extra, with a fresh variant cache; per format the solver seconds summed over the linears, and
the pass's own work (forwards, Hessians, entropy) as the rest of its wall time.

    python -m bench.menu_cost [--model smollm2] [--extra billm-k5g64r,billm-k8g64,billm-k16g64]

Issue 13 bounds the budget mode's measuring at 2x the old variant pass (GPTQ-4 + BiLLM); the
table prints each menu's pass against that pass, all from this one run (the formats' solves
alternate layer by layer, so load on the machine falls on every format alike).
Writes --out (default bench/results/menu_cost-<model>.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import add_model_args, calibration_of
from luq.api import variant_cache
from luq.calibration import calibration_batches
from luq.config import LUQConfig
from luq.models.loading import load_model
from luq.pipeline import layer_pass
from luq.quant import DEFAULT_MENU, get_format, parse_formats

RESULTS = Path(__file__).parent / "results"
OLD_PASS = ("gptq4-g128", "billm")   # the variant pass before the budget mode


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--extra", default="billm-k5g64r,billm-k8g64,billm-k16g64",
                   help="formats timed beside the default menu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = [f for f in parse_formats(args.extra) if f not in DEFAULT_MENU]
    names = list(DEFAULT_MENU) + [f for f in OLD_PASS + tuple(extra) if f not in DEFAULT_MENU]
    calibration = calibration_of(args)
    config = LUQConfig(calibration=calibration, budget_gb=1.0, formats=tuple(names), k_means=args.k)
    net, processor, adapter = load_model(args.model, "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        cache = variant_cache(net, config, Path(tmp))
        t0 = time.perf_counter()
        passed = layer_pass(net, adapter, calibration_batches(processor, adapter, calibration),
                            formats=[get_format(n) for n in names], cache=cache, k=args.k, seed=0, desc="variants")
        wall = time.perf_counter() - t0
    solve = {n: 0.0 for n in names}
    for layer in passed["layers"]:
        for name, seconds in layer["seconds"].items():
            solve[name] += seconds
    shared = wall - sum(solve.values())

    def menu_pass(menu) -> float:
        return shared + sum(solve[n] for n in menu)

    old = menu_pass(OLD_PASS)
    menus = {"old pass (GPTQ-4 g128 + BiLLM)": OLD_PASS, "default menu (12 GPTQ)": DEFAULT_MENU}
    for f in extra:
        menus[f"default + {f}"] = tuple(DEFAULT_MENU) + (f,)
    if len(extra) > 1:
        menus[f"default + {' + '.join(extra)}"] = tuple(DEFAULT_MENU) + tuple(extra)
    print(f"{args.model}, {calibration.samples} x {calibration.seq_len} tokens, {args.threads} threads: pass wall "
          f"{wall:.0f} s, of which solves {sum(solve.values()):.0f} s, the rest (forwards, Hessians, entropy) "
          f"{shared:.0f} s\n")
    print("| format | solver s (all linears) | / GPTQ-4 g128 |\n|---|---:|---:|")
    for n in names:
        print(f"| {n} | {solve[n]:.1f} | {solve[n] / solve['gptq4-g128']:.2f} |")
    print("\n| menu | variant pass s | / old pass |\n|---|---:|---:|")
    for label, menu in menus.items():
        print(f"| {label} | {menu_pass(menu):.0f} | {menu_pass(menu) / old:.2f} |")
    out = args.out or RESULTS / f"menu_cost-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "samples": calibration.samples, "seq_len": calibration.seq_len,
                               "threads": args.threads, "torch": torch.__version__, "wall_s": wall,
                               "shared_s": shared, "solver_s": solve,
                               "menus": {k: {"formats": list(v), "pass_s": menu_pass(v), "vs_old": menu_pass(v) / old}
                                         for k, v in menus.items()}}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
